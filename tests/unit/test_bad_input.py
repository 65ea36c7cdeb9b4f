"""Every unusable input fails with InvalidImageError and a message that names the problem."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from medlsam.errors import InvalidImageError, MedLSAMError
from medlsam.io.volume import CTVolume, load_ct, write_volume


def _write(array: np.ndarray, path, spacing=(1.0, 1.0, 1.0)) -> None:
    """Write an (i, j, k) or (i, j) array with SimpleITK."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.T))
    image.SetSpacing(spacing[: array.ndim])
    sitk.WriteImage(image, str(path))


def _ct_like(shape=(40, 36, 30)) -> np.ndarray:
    """Air around a soft-tissue block with some bone: passes the CT checks."""
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[5:-5, 5:-5, 5:-5] = 40.0
    hu[15:20, 15:20, 10:20] = 900.0
    return hu


def test_a_valid_ct_passes(tmp_path):
    _write(_ct_like(), tmp_path / "ok.nii.gz", spacing=(3.0, 3.0, 3.0))
    volume = load_ct(tmp_path / "ok.nii.gz")
    assert volume.shape == (40, 36, 30)


def test_error_type_is_a_medlsam_error():
    assert issubclass(InvalidImageError, MedLSAMError)


@pytest.mark.parametrize("shape", [(64, 64), (64, 64, 1)])
def test_2d_image(tmp_path, shape):
    array = np.full(shape, -1000.0, dtype=np.float32)
    array[10:50, 10:50] = 50.0
    _write(array, tmp_path / "slice.nii.gz")
    with pytest.raises(InvalidImageError, match="2D image"):
        load_ct(tmp_path / "slice.nii.gz")


@pytest.mark.parametrize(
    "value, suffix", [(np.nan, ".nii.gz"), (np.nan, ".nii"), (np.nan, ".nrrd"), (np.inf, ".nii.gz"), (np.inf, ".nrrd")]
)
def test_nan_and_infinite_values(tmp_path, value, suffix):
    """Refused in every format (ITK alone silently reads NaN in NIfTI as 0)."""
    hu = _ct_like()
    hu[20, 20, 15] = value
    _write(hu, tmp_path / f"bad{suffix}", spacing=(3.0, 3.0, 3.0))
    with pytest.raises(InvalidImageError, match="NaN or infinite"):
        load_ct(tmp_path / f"bad{suffix}")


def test_tiny_volume(tmp_path):
    _write(_ct_like((40, 36, 30)), tmp_path / "tiny.nii.gz", spacing=(3.0, 3.0, 1.0))  # 29 mm along k
    with pytest.raises(InvalidImageError, match="too small") as error:
        load_ct(tmp_path / "tiny.nii.gz")
    assert "48 mm" in str(error.value) and "29.0" in str(error.value)


@pytest.mark.parametrize(
    "name, low, high", [("mr", 0.0, 1000.0), ("normalised", 0.0, 1.0), ("uint16 without rescale", 0.0, 4095.0)]
)
def test_intensities_that_are_not_ct(tmp_path, name, low, high):
    rng = np.random.default_rng(0)
    array = rng.uniform(low, high, size=(40, 36, 30)).astype(np.float32)
    array[:5] = low  # some background
    _write(array, tmp_path / "scan.nii.gz", spacing=(3.0, 3.0, 3.0))
    with pytest.raises(InvalidImageError, match="Hounsfield"):
        load_ct(tmp_path / "scan.nii.gz")


def test_garbage_file(tmp_path):
    path = tmp_path / "scan.nii.gz"
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(InvalidImageError, match="cannot be read") as error:
        load_ct(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha"])
def test_truncated_file(tmp_path, suffix):
    """A half-copied file is refused (ITK alone reads a truncated NIfTI as zeros without complaint)."""
    _write(_ct_like().astype(np.int16), tmp_path / f"full{suffix}", spacing=(3.0, 3.0, 3.0))
    data = (tmp_path / f"full{suffix}").read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(InvalidImageError, match="truncated|cannot be read"):
        load_ct(tmp_path / f"cut{suffix}")


def test_text_file_with_unknown_extension(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not an image\n")
    with pytest.raises(InvalidImageError, match="cannot be read"):
        load_ct(path)


def test_missing_file(tmp_path):
    with pytest.raises(InvalidImageError, match="no such file") as error:
        load_ct(tmp_path / "absent.nii.gz")
    assert "absent.nii.gz" in str(error.value)


def test_empty_folder(tmp_path):
    with pytest.raises(InvalidImageError, match="no DICOM series"):
        load_ct(tmp_path)


def test_folder_without_dicom(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    _write(_ct_like(), tmp_path / "scan.nii.gz", spacing=(3.0, 3.0, 3.0))
    with pytest.raises(InvalidImageError, match="no DICOM series"):
        load_ct(tmp_path)


def test_multichannel_image(tmp_path):
    image = sitk.GetImageFromArray(np.zeros((30, 36, 40, 3), dtype=np.float32), isVector=True)
    sitk.WriteImage(image, str(tmp_path / "rgb.nrrd"))
    with pytest.raises(InvalidImageError, match="3 channels"):
        load_ct(tmp_path / "rgb.nrrd")


def test_label_written_for_a_ct_does_not_pass_as_ct(tmp_path):
    """A label map given where a CT is expected (a common mix-up) is refused."""
    hu = _ct_like()
    reference = CTVolume(hu, np.diag([3.0, 3.0, 3.0, 1.0]))
    write_volume((hu > 0).astype(np.uint8), reference, tmp_path / "label.nii.gz")
    with pytest.raises(InvalidImageError, match="Hounsfield"):
        load_ct(tmp_path / "label.nii.gz")
