"""NIfTI/NRRD (any 3D image SimpleITK reads) -> a DICOM CT series, for putting scans into a PACS.

One CT Image Storage file per slice along the file's third axis: the in-plane axes and the slice positions come
from the image's direction cosines and origin, so any orientation (axis permutation, flip) keeps its physical
geometry; Hounsfield units are stored as unsigned pixels through RescaleSlope/RescaleIntercept; every export gets
fresh Study/Series/SOP/FrameOfReference UIDs unless told otherwise. Optionally stored on a DICOMweb server by STOW-RS.
"""

from __future__ import annotations

import datetime
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medlsam.errors import InvalidImageError, MedLSAMError, TemplateError
from medlsam.utils.atomic import atomic_path

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ORTHOGONAL_TOLERANCE = 1e-4  # |cos| between two axes of the direction matrix
STOW_BATCH = 32  # instances per STOW-RS request


@dataclass
class SeriesFields:
    """Patient, study and series fields of an exported series (UIDs are generated when left empty)."""

    patient_id: str = "ANONYMOUS"
    patient_name: str = "Anonymous"
    study_description: str = ""
    series_description: str = "CT"
    study_uid: str = ""
    series_uid: str = ""
    frame_of_reference_uid: str = ""
    series_number: int = 1
    study_id: str = "1"
    accession_number: str = ""
    study_date: str = field(default_factory=lambda: datetime.date.today().strftime("%Y%m%d"))


@dataclass
class ExportedSeries:
    folder: Path
    files: list[Path]
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    rescale_slope: float
    rescale_intercept: float


def _rescale(array: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Unsigned 16-bit pixels and (slope, intercept) with HU = pixel * slope + intercept.

    Integer HU (the usual CT) round-trips exactly with slope 1; fractional values get the finest slope that fits
    the range in 16 bits (error at most slope / 2)."""
    low, high = float(array.min()), float(array.max())
    if np.array_equal(array, np.round(array)):
        intercept = min(-1024.0, np.floor(low))
        if high - intercept > 65535:
            raise InvalidImageError(
                f"intensity range {low:.0f}..{high:.0f} is wider than 16-bit DICOM pixels hold (65536 values)"
            )
        return (array - intercept).astype(np.uint16), 1.0, intercept
    slope = max(high - low, 1e-6) / 65535.0
    pixels = np.clip(np.round((array - low) / slope), 0, 65535).astype(np.uint16)
    return pixels, slope, low


def _check_axes(direction: np.ndarray) -> None:
    for a, b in ((0, 1), (0, 2), (1, 2)):
        if abs(float(direction[:, a] @ direction[:, b])) > ORTHOGONAL_TOLERANCE:
            raise InvalidImageError(
                f"the image axes are not orthogonal (axes {a} and {b}: cos {direction[:, a] @ direction[:, b]:.4f}): "
                "a DICOM series cannot hold a sheared grid"
            )


def _ds(value: float) -> str:
    """A Decimal String of at most 16 characters."""
    text = f"{value:.10g}"
    return text if len(text) <= 16 else f"{value:.6g}"


def ct_series_datasets(volume, fields: SeriesFields) -> tuple[list, SeriesFields, float, float]:
    """The per-slice pydicom datasets of a CTVolume (slices along its third file axis), with filled-in UIDs."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    array = volume.array
    if array.ndim != 3 or min(array.shape) < 2:
        raise InvalidImageError(f"{volume.source}: a 3D volume is needed, got shape {list(array.shape)}")
    if not np.isfinite(array).all():
        raise InvalidImageError(f"{volume.source}: contains NaN or infinite values")
    spacing = volume.spacing
    direction = volume.affine[:3, :3] / spacing[None, :]
    _check_axes(direction)
    fields = SeriesFields(**vars(fields))
    fields.study_uid = fields.study_uid or generate_uid()
    fields.series_uid = fields.series_uid or generate_uid()
    fields.frame_of_reference_uid = fields.frame_of_reference_uid or generate_uid()
    pixels, slope, intercept = _rescale(array)
    now = datetime.datetime.now()
    row_dir, col_dir, normal = direction[:, 0], direction[:, 1], direction[:, 2]
    window = (40, 400) if slope == 1.0 else ((float(array.max()) + float(array.min())) / 2, np.ptp(array) or 1)
    datasets = []
    for k in range(array.shape[2]):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = fields.study_date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.AccessionNumber = fields.accession_number
        ds.Modality = "CT"
        ds.Manufacturer = "MedLSAM Label"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription, ds.SeriesDescription = fields.study_description, fields.series_description
        ds.PatientName, ds.PatientID = fields.patient_name, fields.patient_id
        ds.PatientBirthDate, ds.PatientSex = "", ""
        ds.KVP = ""
        ds.StudyInstanceUID, ds.SeriesInstanceUID = fields.study_uid, fields.series_uid
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber, ds.AcquisitionNumber = (
            fields.study_id,
            fields.series_number,
            k + 1,
            1,
        )
        position = volume.index_to_world(np.array([0.0, 0.0, float(k)]))[0]
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.ImageOrientationPatient = [_ds(v) for v in np.concatenate([row_dir, col_dir])]
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = fields.frame_of_reference_uid, ""
        ds.SliceLocation = _ds(float(position @ normal))
        ds.SliceThickness = ds.SpacingBetweenSlices = _ds(float(spacing[2]))
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = int(array.shape[1]), int(array.shape[0])  # rows follow file axis 1, columns axis 0
        ds.PixelSpacing = [_ds(float(spacing[1])), _ds(float(spacing[0]))]  # [between rows, between columns]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = _ds(intercept), _ds(slope), "HU"
        ds.WindowCenter, ds.WindowWidth = _ds(float(window[0])), _ds(float(window[1]))
        ds.PixelData = np.ascontiguousarray(pixels[:, :, k].T).tobytes()
        datasets.append(ds)
    return datasets, fields, slope, intercept


def export_ct_series(image_path: str | os.PathLike, out_dir: str | os.PathLike, fields: SeriesFields | None = None):
    """Write ``image_path`` as a DICOM CT series into the new folder ``out_dir`` (one file per slice, atomically:
    the folder appears complete or not at all). Returns an ExportedSeries."""
    from medlsam.io.volume import read_volume

    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MedLSAMError(f"output folder {out} exists and is not empty: give a new folder")
    volume = read_volume(image_path)
    volume.array = volume.array.astype(np.float64, copy=False)
    datasets, fields, slope, intercept = ct_series_datasets(volume, fields or SeriesFields())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{os.getpid()}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        files = []
        for i, ds in enumerate(datasets):
            path = tmp / f"CT{i + 1:05d}.dcm"
            ds.save_as(path, write_like_original=False)
            files.append(out / path.name)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportedSeries(
        out, files, fields.study_uid, fields.series_uid, fields.frame_of_reference_uid, slope, intercept
    )


def stow_files(files: list[str | os.PathLike], url: str, batch: int = STOW_BATCH) -> int:
    """Store DICOM files on a DICOMweb server (STOW-RS, ``url`` = its DICOMweb root); the number stored."""
    import pydicom
    import requests
    from dicomweb_client import DICOMwebClient

    client = DICOMwebClient(url=url.rstrip("/"))
    stored = 0
    for start in range(0, len(files), batch):
        datasets = [pydicom.dcmread(str(f)) for f in files[start : start + batch]]
        try:
            client.store_instances(datasets)
        except requests.RequestException as exc:
            raise MedLSAMError(f"STOW-RS to {url} failed: {exc}") from None
        stored += len(datasets)
    return stored


# ---------------------------------------------------------------------------------------------- DICOM SEG labels
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
GRID_TOLERANCE = 0.01  # voxels: a SEG frame must lie this close to a voxel of its image
SEGMENT_COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))
SEGMENT_COLORS += ((227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))  # matplotlib's tab10


def dcmqi_tool(name: str = "itkimage2segimage") -> str:
    """The dcmqi binary: on PATH, else beside this Python (the venv's bin, PyPI ``dcmqi``); else a clear error."""
    import sys

    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        raise MedLSAMError(f"{name} (dcmqi) not found: pip install dcmqi (requirements.txt pins it)")
    return found


def seg_metadata(names: dict[int, str], description: str = "MedLSAM Label") -> dict:
    """dcmqi's metadata JSON: one segment per label value, its organ name as SegmentLabel."""
    segments = [
        {
            "labelID": int(value),
            "SegmentLabel": name,
            "SegmentDescription": name,
            "SegmentAlgorithmType": "SEMIAUTOMATIC",
            "SegmentAlgorithmName": "MedLSAM Label",
            "SegmentedPropertyCategoryCodeSequence": {
                "CodeValue": "123037004",
                "CodingSchemeDesignator": "SCT",
                "CodeMeaning": "Anatomical Structure",
            },
            "SegmentedPropertyTypeCodeSequence": {
                "CodeValue": "91723000",
                "CodingSchemeDesignator": "SCT",
                "CodeMeaning": "Anatomical structure",
            },
            "recommendedDisplayRGBValue": list(SEGMENT_COLORS[(int(value) - 1) % len(SEGMENT_COLORS)]),
        }
        for value, name in sorted(names.items())
    ]
    return {
        "ContentCreatorName": "MedLSAM^Label",
        "ClinicalTrialSeriesID": "1",
        "ClinicalTrialTimePointID": "1",
        "SeriesDescription": description,
        "SeriesNumber": "300",
        "InstanceNumber": "1",
        "segmentAttributes": [segments],
        "ContentLabel": "SEGMENTATION",
        "ContentDescription": description,
        "ClinicalTrialCoordinatingCenterName": "MedLSAM Label",
        "BodyPartExamined": "",
    }


def label_to_seg(
    label_path: str | os.PathLike,
    series_files: list[str | os.PathLike],
    names: dict[int, str],
    out_path: str | os.PathLike,
    description: str = "MedLSAM Label",
) -> Path:
    """Write a label volume (on its CT series' physical grid) as a DICOM SEG referencing that series, with dcmqi:
    segments numbered 1..N in the order of the label values,
    segment labels = organ names (values without a name get ``label_<v>``)."""
    import json
    import subprocess
    import tempfile

    from medlsam.io.volume import read_volume

    label = read_volume(label_path)
    values = sorted(int(v) for v in np.unique(label.array) if v != 0)
    if not values:
        raise MedLSAMError(f"{Path(label_path).name}: the label is empty, no DICOM SEG to write")
    names = {v: names.get(v) or f"label_{v}" for v in values}
    out = Path(out_path)
    with tempfile.TemporaryDirectory() as tmp:
        meta = Path(tmp) / "meta.json"
        meta.write_text(json.dumps(seg_metadata(names, description)))
        with atomic_path(out) as tmp_out:
            command = [
                dcmqi_tool(),
                "--inputImageList",
                str(label_path),
                "--inputDICOMList",
                ",".join(str(f) for f in series_files),
                "--outputDICOM",
                str(tmp_out),
                "--inputMetadata",
                str(meta),
            ]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0 or not tmp_out.is_file():
                lines = (done.stderr or done.stdout).strip().splitlines()
                raise MedLSAMError(f"itkimage2segimage failed: {lines[-1] if lines else done.returncode}")
    return out


def seg_names(dataset) -> dict[int, str]:
    """{segment number: segment label} of a DICOM SEG dataset."""
    return {
        int(item.SegmentNumber): str(getattr(item, "SegmentLabel", "") or f"label_{int(item.SegmentNumber)}")
        for item in getattr(dataset, "SegmentSequence", [])
    }


def _grid_matches(reference, other, tolerance: float = GRID_TOLERANCE) -> bool:
    """Every voxel of ``other`` (a sitk image) lies on a voxel of ``reference`` (same spacing and axes, up to
    permutation and flips, integer offset)."""

    from medlsam.io.volume import _affine_from_sitk

    mapping = np.linalg.inv(_affine_from_sitk(reference)) @ _affine_from_sitk(other)
    rounded = np.round(mapping)
    return bool(
        np.abs(mapping - rounded).max() < tolerance and np.abs(np.abs(rounded[:3, :3]).sum(axis=0) - 1).max() == 0
    )


def seg_to_label(seg_path: str | os.PathLike, image_path: str | os.PathLike):
    """A DICOM SEG's labels on its image's voxel grid: (label CTVolume in the image file's order, {value: name}).
    Values are segment numbers. A SEG not on the image's grid, reaching outside it, or with overlapping segments
    is a TemplateError naming the problem."""
    import pydicom
    import pydicom_seg
    import SimpleITK as sitk

    from medlsam.io.volume import CTVolume, _affine_from_sitk, _read_sitk

    name = Path(seg_path).name
    try:
        dataset = pydicom.dcmread(str(seg_path))
    except Exception as exc:  # noqa: BLE001 - any unreadable file
        raise TemplateError(f"{name}: not a DICOM file ({type(exc).__name__})") from None
    if dataset.get("SOPClassUID") != SEG_STORAGE:
        raise TemplateError(f"{name}: not a DICOM SEG (SOP class {dataset.get('SOPClassUID')})")
    names = seg_names(dataset)
    try:
        seg_image = pydicom_seg.MultiClassReader().read(dataset).image
    except Exception as exc:  # noqa: BLE001 - pydicom-seg refuses overlapping or malformed segments
        raise TemplateError(f"{name}: cannot read the DICOM SEG ({type(exc).__name__}: {exc})") from None
    reference = _read_sitk(Path(image_path))
    if not _grid_matches(reference, seg_image):
        raise TemplateError(
            f"{name}: the SEG's geometry (spacing {np.round(seg_image.GetSpacing(), 3).tolist()}, origin "
            f"{np.round(seg_image.GetOrigin(), 2).tolist()}) does not lie on its image's voxel grid (spacing "
            f"{np.round(reference.GetSpacing(), 3).tolist()}, origin {np.round(reference.GetOrigin(), 2).tolist()})"
        )
    resampled = sitk.Resample(seg_image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)
    before = np.bincount(sitk.GetArrayViewFromImage(seg_image).ravel().astype(np.int64))
    array = sitk.GetArrayFromImage(resampled).transpose(2, 1, 0)
    after = np.bincount(array.ravel().astype(np.int64), minlength=len(before))
    if not np.array_equal(before[1:], after[1 : len(before)]):
        raise TemplateError(f"{name}: the SEG reaches outside its image's volume")
    volume = CTVolume(array=np.ascontiguousarray(array), affine=_affine_from_sitk(reference), source=str(seg_path))
    return volume, names
