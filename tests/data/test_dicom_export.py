"""NIfTI -> DICOM CT series: HU and physical geometry survive the round trip (SimpleITK/GDCM read-back) for every
axis permutation and flip of a real CT; patient/study fields and fresh UIDs; clear errors on bad input."""

from __future__ import annotations

import itertools

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from medlsam.cli import main
from medlsam.errors import InvalidImageError, MedLSAMError, TemplateError
from medlsam.io.dicom import SeriesFields, export_ct_series, label_to_seg, seg_to_label
from medlsam.io.volume import CTVolume, read_volume, write_volume

ORIENTATIONS = [
    (perm, flips) for perm in itertools.permutations(range(3)) for flips in itertools.product((1, -1), repeat=3)
]


@pytest.fixture(scope="module")
def small_ct(openkbp_case) -> CTVolume:
    """A 24 x 20 x 10 crop of a real OpenKBP CT with an oblique-free but non-trivial affine."""
    volume = read_volume(openkbp_case[0])
    crop = volume.array[50:74, 40:60, 60:70].astype(np.int16)
    affine = np.diag([3.906, 4.2, 2.5, 1.0])
    affine[:3, 3] = [-101.3, 17.25, -402.5]
    return CTVolume(array=crop, affine=affine, source="crop")


def reoriented(volume: CTVolume, perm: tuple[int, ...], flips: tuple[int, ...]) -> CTVolume:
    """The same physical image stored with its axes permuted and flipped (every voxel keeps its world position)."""
    array = np.transpose(volume.array, perm)
    affine = np.eye(4)
    affine[:3, :3] = volume.affine[:3, :3][:, list(perm)]
    affine[:3, 3] = volume.affine[:3, 3]
    for axis, flip in enumerate(flips):
        if flip < 0:
            array = np.flip(array, axis)
            affine[:3, 3] = affine[:3, 3] + affine[:3, axis] * (array.shape[axis] - 1)
            affine[:3, axis] = -affine[:3, axis]
    return CTVolume(array=np.ascontiguousarray(array), affine=affine, source="reoriented")


def assert_same_physical_image(original: CTVolume, back: CTVolume, tolerance_mm: float = 0.01) -> None:
    """Every voxel of ``back`` lies within tolerance of a voxel of ``original`` and holds exactly its value."""
    mapping = np.linalg.inv(original.affine) @ back.affine  # back index -> original index
    signed_perm = np.round(mapping[:3, :3])
    offset = np.round(mapping[:3, 3])
    assert sorted(np.abs(signed_perm).sum(axis=0)) == [1, 1, 1], mapping
    rebuilt = original.affine.copy()
    rebuilt[:3, :3] = original.affine[:3, :3] @ signed_perm
    rebuilt[:3, 3] = original.affine[:3, :3] @ offset + original.affine[:3, 3]
    corners = np.array(list(itertools.product(*[(0, s - 1) for s in back.shape])), dtype=float)
    world_back = corners @ back.affine[:3, :3].T + back.affine[:3, 3]
    world_rebuilt = corners @ rebuilt[:3, :3].T + rebuilt[:3, 3]
    assert np.abs(world_back - world_rebuilt).max() < tolerance_mm
    index = np.indices(back.shape).reshape(3, -1).T
    source = (index @ signed_perm.T + offset).astype(int)
    expected = original.array[source[:, 0], source[:, 1], source[:, 2]].reshape(back.shape)
    np.testing.assert_array_equal(back.array, expected)


@pytest.mark.parametrize("perm,flips", ORIENTATIONS, ids=[f"{p}{f}" for p, f in ORIENTATIONS])
def test_round_trip_every_orientation(small_ct, tmp_path, perm, flips):
    image = reoriented(small_ct, perm, flips)
    assert_same_physical_image(small_ct, image)  # the fixture itself is right
    nifti = tmp_path / "scan.nii.gz"
    write_volume(image.array, image, nifti)
    export_ct_series(nifti, tmp_path / "series")
    back = read_volume(tmp_path / "series")  # SimpleITK's GDCM series reader (sorts slices itself)
    assert_same_physical_image(read_volume(nifti), back)


def test_fields_uids_and_cli(openkbp_case, tmp_path, capsys):
    code = main(
        [
            "dicom",
            "export",
            str(openkbp_case[0]),
            "--out",
            str(tmp_path / "a"),
            "--patient-id",
            "KBP-1",
            "--patient-name",
            "Doe^Jane",
            "--study-description",
            "H&N planning",
        ]
    )
    assert code == 0 and "128 CT slices" in capsys.readouterr().out
    files = sorted((tmp_path / "a").iterdir())
    first = pydicom.dcmread(files[0])
    assert (first.PatientID, str(first.PatientName), first.StudyDescription) == ("KBP-1", "Doe^Jane", "H&N planning")
    assert first.Modality == "CT" and first.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert len({pydicom.dcmread(f).SOPInstanceUID for f in files}) == len(files) == 128
    assert float(first.RescaleSlope) == 1.0 and first.RescaleType == "HU"
    second = export_ct_series(openkbp_case[0], tmp_path / "b", SeriesFields(study_uid=first.StudyInstanceUID))
    assert second.study_uid == first.StudyInstanceUID  # added to the same study
    assert second.series_uid != first.SeriesInstanceUID and second.frame_of_reference_uid != first.FrameOfReferenceUID


def test_fractional_intensities_use_slope(tmp_path):
    array = np.linspace(-1000.25, 1500.75, 20 * 18 * 6).reshape(20, 18, 6).astype(np.float32)
    volume = CTVolume(array=array, affine=np.diag([1.0, 1.0, 2.0, 1.0]))
    write_volume(array, volume, tmp_path / "f.nii.gz")
    series = export_ct_series(tmp_path / "f.nii.gz", tmp_path / "s")
    back = read_volume(tmp_path / "s")
    assert series.rescale_slope < 0.05
    assert np.abs(back.array.astype(np.float64) - array).max() <= series.rescale_slope / 2 + 1e-3


def test_bad_input_is_a_clear_error(openkbp_case, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("keep me")
    with pytest.raises(MedLSAMError, match="not empty"):
        export_ct_series(openkbp_case[0], tmp_path / "full")
    assert (tmp_path / "full" / "x.txt").read_text() == "keep me"
    sheared = sitk.Image(10, 10, 10, sitk.sitkInt16)
    sheared.SetDirection((1, 0, 0, 0.5, 0.866, 0, 0, 0, 1))
    sitk.WriteImage(sheared, str(tmp_path / "sheared.mha"))
    with pytest.raises(InvalidImageError, match="not orthogonal"):
        export_ct_series(tmp_path / "sheared.mha", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    flat = sitk.Image(10, 10, 1, sitk.sitkInt16)
    sitk.WriteImage(flat, str(tmp_path / "flat.nii.gz"))
    with pytest.raises(InvalidImageError):
        export_ct_series(tmp_path / "flat.nii.gz", tmp_path / "out")
    assert main(["dicom", "export", str(tmp_path / "flat.nii.gz"), "--out", str(tmp_path / "out")]) == 2


@pytest.fixture(scope="module")
def ct_series_and_label(openkbp_case, tmp_path_factory):
    """One real OpenKBP CT exported as a DICOM series, and its clinical label."""
    tmp = tmp_path_factory.mktemp("seg")
    return export_ct_series(openkbp_case[0], tmp / "ct"), openkbp_case[1], tmp


def test_seg_round_trip_keeps_organs_and_names(ct_series_and_label, openkbp_case):
    """label -> DICOM SEG (dcmqi) -> label on the image's grid: every voxel back, organ names as segment labels."""
    series, label_path, tmp = ct_series_and_label
    names = {1: "Brainstem", 2: "SpinalCord", 3: "RightParotid", 4: "LeftParotid", 7: "Mandible"}
    seg = label_to_seg(label_path, series.files, names, tmp / "seg.dcm")
    dataset = pydicom.dcmread(seg)
    assert dataset.Modality == "SEG" and dataset.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series_uid
    truth = read_volume(label_path).array
    values = sorted(int(v) for v in np.unique(truth) if v)
    for reference in (openkbp_case[0], series.folder):  # the NIfTI, and the series as GDCM reads it (z flipped)
        label, seg_names = seg_to_label(seg, reference)
        assert seg_names == {i + 1: names.get(v, f"label_{v}") for i, v in enumerate(values)}
        back = np.zeros_like(truth)
        for number, value in zip(sorted(seg_names), values):
            back[label.array == number] = value
        if reference == series.folder:
            back = back[:, :, ::-1]
        np.testing.assert_array_equal(back, truth)


def test_seg_off_the_image_grid_is_refused(ct_series_and_label, openkbp_case, tmp_path):
    """A SEG whose frames do not lie on its image's voxels is a TemplateError (the bank skips it), not a guess."""
    series, label_path, tmp = ct_series_and_label
    seg = label_to_seg(label_path, series.files, {1: "Brainstem"}, tmp_path / "seg.dcm")
    shifted = read_volume(openkbp_case[0])
    shifted.affine[:3, 3] += [1.3, 0.0, 0.7]  # 1.3 mm: a third of a voxel
    write_volume(shifted.array.astype(np.int16), shifted, tmp_path / "shifted.nii.gz")
    with pytest.raises(TemplateError, match="does not lie on its image's voxel grid"):
        seg_to_label(seg, tmp_path / "shifted.nii.gz")
    with pytest.raises(TemplateError, match="not a DICOM SEG"):
        seg_to_label(series.files[0], openkbp_case[0])
    empty = CTVolume(np.zeros((128, 128, 128), np.uint8), read_volume(label_path).affine)
    write_volume(empty.array, empty, tmp_path / "empty.nii.gz")
    with pytest.raises(MedLSAMError, match="empty"):
        label_to_seg(tmp_path / "empty.nii.gz", series.files, {}, tmp_path / "e.dcm")
