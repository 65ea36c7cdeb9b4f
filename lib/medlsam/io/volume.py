"""Read CT scans (NIfTI, NRRD, MetaImage, DICOM series) and write label volumes, keeping exact geometry.

Voxel indices are always in the file's own array order (i, j, k): the order of nibabel for NIfTI, of
pynrrd for NRRD and of MONAI Label's prompts. World coordinates are ITK's LPS millimetres.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medlsam.errors import InvalidImageError
from medlsam.io.image_header import check_header, check_series_header
from medlsam.utils.atomic import atomic_path

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
MIN_EXTENT_MM = 48.0  # the localiser needs at least a quarter of a 192 mm patch along every axis


@dataclass
class CTVolume:
    """A 3D image in its file's voxel order with the affine from voxel index to LPS world mm."""

    array: np.ndarray  # (i, j, k), float32 for CT (Hounsfield units), integer for labels
    affine: np.ndarray  # 4x4: world_lps = affine @ [i, j, k, 1]
    source: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    def index_to_world(self, index: np.ndarray) -> np.ndarray:
        """Map (N, 3) voxel indices (may be fractional) to (N, 3) world LPS mm."""
        index = np.atleast_2d(np.asarray(index, dtype=np.float64))
        return index @ self.affine[:3, :3].T + self.affine[:3, 3]

    def world_to_index(self, world: np.ndarray) -> np.ndarray:
        """Map (N, 3) world LPS mm to (N, 3) fractional voxel indices."""
        world = np.atleast_2d(np.asarray(world, dtype=np.float64))
        return (world - self.affine[:3, 3]) @ np.linalg.inv(self.affine[:3, :3]).T


def is_image_path(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() or p.name.lower().endswith(IMAGE_SUFFIXES) or p.suffix.lower() == ".dcm"


def _affine_from_sitk(image: sitk.Image) -> np.ndarray:
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.array(image.GetSpacing(), dtype=np.float64)[None, :]
    affine[:3, 3] = image.GetOrigin()
    return affine


def _read_sitk(path: Path) -> sitk.Image:
    if not path.exists():
        raise InvalidImageError(f"{path}: no such file or folder")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise InvalidImageError(f"{path}: folder holds no DICOM series")
            files = max((reader.GetGDCMSeriesFileNames(str(path), s) for s in series), key=len)
            check_series_header(files)
            reader.SetFileNames(files)
            return reader.Execute()
        check_header(path)  # the voxel budget and files naming other files, before any voxel is read
        return sitk.ReadImage(str(path))
    except InvalidImageError:
        raise
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise InvalidImageError(f"{path}: cannot be read as a medical image ({first_line})") from None


def read_volume(path: str | os.PathLike) -> CTVolume:
    """Read any 3D image (CT or label) without checking intensities."""
    path = Path(path)
    image = _read_sitk(path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InvalidImageError(f"{path}: has {image.GetNumberOfComponentsPerPixel()} channels, expected 1")
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() != 3 or min(image.GetSize()) < 2:
        raise InvalidImageError(f"{path}: is a 2D image (size {tuple(image.GetSize())}); a 3D CT volume is needed")
    array = np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0))
    if path.is_file() and path.name.lower().endswith((".nii", ".nii.gz")):
        array = _verify_nifti(path, array)
    return CTVolume(array=array, affine=_affine_from_sitk(image), source=str(path))


def _verify_nifti(path: Path, array: np.ndarray) -> np.ndarray:
    """ITK's NIfTI reader fills a truncated file with zeros and silently turns NaN and infinity into 0:
    read the raw voxels again with nibabel, refuse a truncated file and put the non-finite values back."""
    try:
        import nibabel
    except ImportError:  # nibabel comes with MONAI Label; without it these two checks are skipped
        return array
    try:
        raw = np.asanyarray(nibabel.load(str(path)).dataobj.get_unscaled())
    except Exception as exc:  # noqa: BLE001 - any failure here means damaged voxel data
        raise InvalidImageError(f"{path}: truncated or damaged NIfTI file ({type(exc).__name__}: {exc})") from None
    if raw.dtype.kind == "f" and raw.size == array.size:
        raw = raw.reshape(array.shape)
        bad = ~np.isfinite(raw)
        if bad.any():
            array = array.copy()
            array[bad] = raw[bad]
    return array


def check_ct(volume: CTVolume) -> None:
    """Raise InvalidImageError unless the volume is a plausible 3D CT in Hounsfield units."""
    name = volume.source or "image"
    data = volume.array
    if not np.all(np.isfinite(data)):
        raise InvalidImageError(f"{name}: contains NaN or infinite values")
    extent = volume.spacing * (np.array(volume.shape) - 1)
    if np.any(extent < MIN_EXTENT_MM):
        raise InvalidImageError(
            f"{name}: too small to localise in: extent {np.round(extent, 1).tolist()} mm, "
            f"at least {MIN_EXTENT_MM:.0f} mm along every axis is needed"
        )
    low, high = np.percentile(data[:: max(1, data.shape[0] // 64)], [0.5, 99.9])
    if low > -500 or high > 6000 or high - low < 500:
        raise InvalidImageError(
            f"{name}: intensities do not look like CT Hounsfield units (0.5th percentile {low:.0f}, "
            f"99.9th {high:.0f}); expected air near -1000 HU and soft tissue near 0-100 HU"
        )


def load_ct(path: str | os.PathLike) -> CTVolume:
    """Read a CT scan in Hounsfield units as float32 and check it is usable."""
    volume = read_volume(path)
    volume.array = volume.array.astype(np.float32, copy=False)
    check_ct(volume)
    return volume


def write_volume(array: np.ndarray, reference: CTVolume, path: str | os.PathLike) -> None:
    """Write `array` (in the reference's voxel order) with the reference's geometry, atomically.

    The format follows the extension (.nii.gz, .nii, .nrrd, .mha); a temporary file in the same folder
    is renamed onto `path` only once it is complete.
    """
    path = Path(path)
    if array.shape != reference.shape:
        raise ValueError(f"array shape {array.shape} differs from the reference {reference.shape}")
    if array.dtype == bool:  # SimpleITK has no boolean pixel type
        array = array.astype(np.uint8)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    spacing = reference.spacing
    image.SetSpacing(spacing.tolist())
    image.SetDirection((reference.affine[:3, :3] / spacing[None, :]).ravel().tolist())
    image.SetOrigin(reference.affine[:3, 3].tolist())
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
