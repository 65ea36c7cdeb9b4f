"""Reading and writing volumes: array order and geometry kept in every format (NIfTI, NRRD, MetaImage, DICOM
series, files written by other tools), and atomic writes that leave nothing half-written."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medlsam.io.volume import CTVolume, load_ct, read_volume, write_volume

# -- file formats ---------------------------------------------------------------------------------------


def _asymmetric(phantom) -> CTVolume:
    """The phantom with an oblique-free but permuted, flipped affine, so any axis mix-up shows."""
    ct, _ = phantom
    affine = np.zeros((4, 4))
    affine[:3, :3] = [[0, 0, -2.0], [3.0, 0, 0], [0, -2.5, 0]]
    affine[:3, 3] = (12.5, -7.0, 30.0)
    affine[3, 3] = 1
    return CTVolume(ct.array.astype(np.int16), affine, "asymmetric")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_write_then_read_keeps_array_order_and_geometry(phantom, tmp_path, suffix):
    volume = _asymmetric(phantom)
    path = tmp_path / f"scan{suffix}"
    write_volume(volume.array, volume, path)
    back = read_volume(path)
    assert back.shape == volume.shape
    assert np.array_equal(back.array, volume.array)
    assert np.allclose(back.affine, volume.affine, atol=1e-5)


def test_nifti_index_order_matches_nibabel(phantom, tmp_path):
    nib = pytest.importorskip("nibabel")
    volume = _asymmetric(phantom)
    write_volume(volume.array, volume, tmp_path / "scan.nii.gz")
    image = nib.load(tmp_path / "scan.nii.gz")
    assert np.array_equal(np.asarray(image.dataobj), volume.array)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    assert np.allclose(image.affine, lps_to_ras @ volume.affine, atol=1e-5)


def test_nrrd_index_order_matches_pynrrd(phantom, tmp_path):
    nrrd = pytest.importorskip("nrrd")
    volume = _asymmetric(phantom)
    write_volume(volume.array, volume, tmp_path / "scan.nrrd")
    data, header = nrrd.read(str(tmp_path / "scan.nrrd"))
    assert np.array_equal(data, volume.array)
    assert header["space"] == "left-posterior-superior"
    assert np.allclose(np.asarray(header["space directions"]).T, volume.affine[:3, :3], atol=1e-5)
    assert np.allclose(header["space origin"], volume.affine[:3, 3], atol=1e-5)


def test_nrrd_written_by_another_tool_loads(tmp_path):
    """A NRRD written by pynrrd (not by us) loads with its HU and geometry."""
    nrrd = pytest.importorskip("nrrd")
    rng = np.random.default_rng(1)
    hu = rng.integers(-1024, 1200, size=(30, 28, 26)).astype(np.int16)
    directions = np.array([[2.0, 0, 0], [0, 0, -2.5], [0, 3.0, 0]])  # rows: axis vectors
    header = {
        "space": "left-posterior-superior",
        "space directions": directions,
        "space origin": np.array([-20.0, 15.0, 40.0]),
        "kinds": ["domain"] * 3,
        "encoding": "gzip",
    }
    nrrd.write(str(tmp_path / "scan.nrrd"), hu, header)
    volume = load_ct(tmp_path / "scan.nrrd")
    assert volume.array.dtype == np.float32
    assert np.array_equal(volume.array, hu.astype(np.float32))
    assert np.allclose(volume.affine[:3, :3], directions.T)
    assert np.allclose(volume.affine[:3, 3], [-20.0, 15.0, 40.0])


def write_dicom_series(hu: np.ndarray, affine: np.ndarray, folder: Path) -> None:
    """Write an int16 HU volume (i, j, k) as a minimal CT DICOM series, stored with a -1024 intercept."""
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.ascontiguousarray(hu.transpose(2, 1, 0)).astype(np.int16))
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    direction = affine[:3, :3] / spacing
    image.SetSpacing(spacing.tolist())
    image.SetDirection(direction.ravel().tolist())
    image.SetOrigin(affine[:3, 3].tolist())
    series = f"1.2.826.0.1.3680043.2.1125.{int(time.time() * 1000)}"
    orientation = "\\".join(f"{v:.10f}" for v in (*direction[:, 0], *direction[:, 1]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in {
            "0008|0060": "CT",
            "0020|000d": series + ".1",
            "0020|000e": series + ".2",
            "0020|0037": orientation,
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0013": str(k + 1),
            "0018|0050": f"{spacing[2]:.4f}",
            "0028|1052": "-1024",
            "0028|1053": "1",
        }.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_)


@pytest.mark.parametrize("degrees", [0.0, 30.0])
def test_dicom_series_folder_loads_with_hu_and_geometry(phantom, tmp_path, degrees):
    ct, _ = phantom
    angle = math.radians(degrees)
    affine = np.eye(4)
    affine[:3, :3] = np.array(
        [[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]]
    ) @ np.diag(ct.spacing)
    affine[:3, 3] = (-100.0, -80.0, 200.0)
    hu = ct.array.astype(np.int16)
    hu[0, 0, :] = np.arange(hu.shape[2]) * 50 - 1000  # every slice different: slice order must be right
    write_dicom_series(hu, affine, tmp_path / "series")
    volume = load_ct(tmp_path / "series")
    assert volume.shape == hu.shape
    assert np.array_equal(volume.array, hu.astype(np.float32))
    assert np.allclose(volume.affine, affine, atol=1e-4)


def test_dicom_slices_in_shuffled_file_order_load_sorted(phantom, tmp_path):
    """File names that sort differently from the slice positions must not reorder the slices."""
    ct, _ = phantom
    hu = ct.array.astype(np.int16)
    hu[0, 0, :] = np.arange(hu.shape[2]) * 50 - 1000
    write_dicom_series(hu, ct.affine, tmp_path / "series")
    files = sorted((tmp_path / "series").iterdir())
    for n, f in enumerate(np.random.default_rng(0).permutation(files)):
        f.rename(tmp_path / "series" / f"x{n:03d}.dcm")
    volume = load_ct(tmp_path / "series")
    assert np.array_equal(volume.array, hu.astype(np.float32))
    assert np.allclose(volume.affine, ct.affine, atol=1e-4)


# -- atomic writing -------------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_write_volume_is_atomic_and_keeps_geometry(phantom, tmp_path, suffix):
    ct, label = phantom
    path = tmp_path / f"label{suffix}"
    path.write_bytes(b"old content")
    write_volume(label.array, ct, path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    back = read_volume(path)
    assert np.array_equal(back.array, label.array) and back.array.dtype == np.uint8
    assert np.allclose(back.affine, ct.affine, atol=1e-5)
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()  # ordinary permissions, not mkstemp's 0600


def test_write_volume_accepts_boolean_masks(phantom, tmp_path):
    ct, label = phantom
    write_volume(label.array.astype(bool), ct, tmp_path / "mask.nii.gz")
    assert np.array_equal(read_volume(tmp_path / "mask.nii.gz").array, label.array)


def test_failed_write_leaves_nothing_and_keeps_the_old_file(phantom, tmp_path):
    ct, label = phantom
    with pytest.raises(ValueError, match="shape"):
        write_volume(label.array[:-1], ct, tmp_path / "label.nii.gz")
    assert list(tmp_path.iterdir()) == []
    old = tmp_path / "label.unknown"
    old.write_bytes(b"previous")
    with pytest.raises(RuntimeError):  # SimpleITK has no writer for this extension
        write_volume(label.array, ct, old)
    assert [p.name for p in tmp_path.iterdir()] == [old.name]
    assert old.read_bytes() == b"previous"
