"""A label volume on a DICOM CT series -> a DICOM RT Structure Set (RTSTRUCT) referencing that series.

One ROI per organ (its name, its colour), ROI Interpreted Type ORGAN, generation algorithm AUTOMATIC; on every
slice the organ touches, closed planar contours in patient coordinates (LPS mm): the outlines of the slice's mask
and of its holes as separate contours, which readers combine by the even-odd rule (``medlsam.rt.raster``:
re-rasterising on the CT grid gives back the label exactly). References: the frame of reference, study, series and
every instance (ContourImageSequence of the series and of each contour). Patient and study come from the CT; the
structure set gets new series and instance UIDs. Reading is ``medlsam.rt.rtstruct``.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
from pathlib import Path

import numpy as np

from medlsam.errors import MedLSAMError
from medlsam.io.volume import CTVolume
from medlsam.rt.raster import mask_contours
from medlsam.rt.rtstruct import RTSTRUCT_STORAGE, CTSeries, read_ct_series
from medlsam.utils.atomic import atomic_path

STUDY_COMPONENT = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (retired; what RTReferencedStudy names)
PATIENT_STUDY_FIELDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "OtherPatientIDs", "EthnicGroup",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
    "StudyDescription", "PatientIdentityRemoved", "DeidentificationMethod",
)  # fmt: skip
GRID_TOLERANCE = 0.01  # voxels
VALID = {  # what a copied value must look like to be copied (anonymisers leave hashes in dates and sexes)
    "DA": re.compile(r"(\d{8})?"),
    "TM": re.compile(r"(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?"),
    "CS": re.compile(r"[A-Z0-9 _]{0,16}"),
    "SH": re.compile(r"[^\\\x00-\x1f]{0,16}"),
    "LO": re.compile(r"[^\\\x00-\x1f]{0,64}"),
    "PN": re.compile(r"[^\\\x00-\x1f]{0,64}(=[^\\\x00-\x1f]{0,64}){0,2}"),
    "AS": re.compile(r"(\d{3}[DWMY])?"),
    "UI": re.compile(r"[0-9.]{1,64}"),
}
ENUMERATED = {"PatientSex": {"M", "F", "O", ""}, "PatientIdentityRemoved": {"YES", "NO"}}
log = logging.getLogger(__name__)


def label_on_grid(label: CTVolume, volume: CTVolume) -> np.ndarray:
    """``label``'s array in ``volume``'s voxel order when both grids hold the same voxels (the same physical grid
    stored with axes permuted or flipped, e.g. a NIfTI label of a scan and the scan's DICOM series); else an error."""
    if label.shape == volume.shape and np.allclose(label.affine, volume.affine, atol=1e-4):
        return label.array
    mapping = np.linalg.inv(label.affine) @ volume.affine  # volume index -> label index
    signed = np.round(mapping[:3, :3])
    offset = np.round(mapping[:3, 3])
    same = np.abs(mapping[:3, :3] - signed).max() < 1e-4 and np.abs(mapping[:3, 3] - offset).max() < GRID_TOLERANCE
    if not same or sorted(np.abs(signed).sum(axis=0)) != [1, 1, 1] or np.abs(signed).sum() != 3:
        raise MedLSAMError(
            f"the label {label.source or ''} is not on the CT series' voxel grid (label spacing "
            f"{np.round(label.spacing, 3).tolist()}, origin {np.round(label.affine[:3, 3], 2).tolist()}; CT spacing "
            f"{np.round(volume.spacing, 3).tolist()}, origin {np.round(volume.affine[:3, 3], 2).tolist()})"
        )
    corners = np.array([[0, 0, 0], np.array(volume.shape) - 1], dtype=float) @ signed.T + offset
    if corners.min() < 0 or np.any(corners.max(axis=0) > np.array(label.shape) - 1):
        raise MedLSAMError(f"the label (shape {label.shape}) does not cover the CT series (shape {volume.shape})")
    index = np.indices(volume.shape, dtype=np.int64).reshape(3, -1)
    source = (signed.astype(np.int64) @ index) + offset.astype(np.int64)[:, None]
    return label.array[source[0], source[1], source[2]].reshape(volume.shape)


def _ds(value: float) -> str:
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _image_reference(series: CTSeries, k: int):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.ReferencedSOPClassUID = series.sop_class_uid
    item.ReferencedSOPInstanceUID = series.instance_uids[k]
    return item


def _references(series: CTSeries):
    """ReferencedFrameOfReferenceSequence -> RTReferencedStudySequence -> RTReferencedSeriesSequence -> images."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    series_item = Dataset()
    series_item.SeriesInstanceUID = series.series_uid
    series_item.ContourImageSequence = Sequence([_image_reference(series, k) for k in range(len(series.instance_uids))])
    study_item = Dataset()
    study_item.ReferencedSOPClassUID = STUDY_COMPONENT
    study_item.ReferencedSOPInstanceUID = series.study_uid
    study_item.RTReferencedSeriesSequence = Sequence([series_item])
    frame = Dataset()
    frame.FrameOfReferenceUID = series.frame_of_reference_uid
    frame.RTReferencedStudySequence = Sequence([study_item])
    return Sequence([frame])


def organ_contours(mask: np.ndarray, volume: CTVolume, offset=(0, 0, 0)) -> list[tuple[int, np.ndarray]]:
    """(slice k, (N, 3) LPS mm points) of every closed planar contour of a 3D mask on ``volume``'s grid (the mask
    may be a block of the volume starting at voxel ``offset``)."""
    out = []
    for k in np.nonzero(mask.any(axis=(0, 1)))[0]:
        for polygon in mask_contours(mask[:, :, k]):
            plane = np.full(len(polygon), float(k + offset[2]))
            index = np.column_stack([polygon + np.array(offset[:2], dtype=float), plane])
            out.append((int(k + offset[2]), volume.index_to_world(index)))
    return out


def _roi_contour(value: int, color, contours, series: CTSeries):
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    item = Dataset()
    item.ROIDisplayColor = [int(c) for c in color]
    sequence = []
    for number, (k, points) in enumerate(contours, start=1):
        contour = Dataset()
        contour.ContourImageSequence = Sequence([_image_reference(series, k)])
        contour.ContourGeometricType = "CLOSED_PLANAR"
        contour.NumberOfContourPoints = len(points)
        contour.ContourNumber = number
        # formatted here (16-character Decimal Strings); pydicom's per-value checks would double the writing time
        contour.add(DataElement(0x30060050, "DS", [_ds(v) for v in points.ravel()], already_converted=True))
        sequence.append(contour)
    item.ContourSequence = Sequence(sequence)
    item.ReferencedROINumber = value
    return item


def _valid(keyword: str, element) -> bool:
    """Every value of a copied element is valid for its VR (and its enumerated values, if any)."""
    if element.value is None:
        return False
    values = list(element.value) if element.VM > 1 else [element.value]
    pattern = VALID.get(element.VR)
    for value in values:
        text = str(value)
        if pattern is not None and not pattern.fullmatch(text):
            return False
        if keyword in ENUMERATED and text not in ENUMERATED[keyword]:
            return False
    return True


def _copy_patient_study(header, ds) -> None:
    """Patient and study fields from the CT; a value invalid for its VR (an anonymiser's hash in a date) is left
    empty (all are type 2 or 3) and logged, so the structure set stays valid."""
    dropped = []
    for keyword in PATIENT_STUDY_FIELDS:
        if keyword in header:
            element = header.data_element(keyword)
            if _valid(keyword, element):
                setattr(ds, keyword, element.value)
            else:
                dropped.append(keyword)
    required = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID")
    for keyword in (*required, "AccessionNumber", "ReferringPhysicianName"):
        if keyword not in ds:
            setattr(ds, keyword, "")
    if dropped:
        log.warning("the CT's %s not valid DICOM values: left empty in the RT Structure Set", ", ".join(dropped))


def _base_dataset(series: CTSeries, description: str, series_number: int):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTSTRUCT_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.is_little_endian, ds.is_implicit_VR = True, False
    header = series.header
    ds.SpecificCharacterSet = header.get("SpecificCharacterSet", "ISO_IR 192")
    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.SOPClassUID, ds.SOPInstanceUID = RTSTRUCT_STORAGE, meta.MediaStorageSOPInstanceUID
    _copy_patient_study(header, ds)
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.OperatorsName = ""
    ds.Manufacturer = "MedLSAM Label"
    ds.ManufacturerModelName = "MedLSAM Label"
    ds.SoftwareVersions = "medlsam"
    ds.FrameOfReferenceUID = series.frame_of_reference_uid
    ds.PositionReferenceIndicator = header.get("PositionReferenceIndicator", "")
    ds.InstanceNumber = 1
    ds.StructureSetLabel = description[:16] or "MedLSAM"
    ds.StructureSetName = description[:64]
    ds.StructureSetDate, ds.StructureSetTime = date, time
    ds.ApprovalStatus = "UNAPPROVED"
    return ds


def rtstruct_dataset(
    label: np.ndarray,
    names: dict[int, str],
    series: CTSeries,
    colors: dict[int, tuple[int, int, int]] | None = None,
    description: str = "MedLSAM Label",
    series_number: int = 301,
):
    """The pydicom dataset of an RT Structure Set for ``label`` (on ``series.volume``'s grid), one ROI per value
    present (named by ``names``, ``label_<v>`` otherwise)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from scipy import ndimage

    from medlsam.io.dicom import SEGMENT_COLORS

    if label.min(initial=0) < 0:
        raise MedLSAMError("the label holds negative values: not a label volume")
    counts = np.bincount(label.ravel())
    values = [int(v) for v in np.nonzero(counts)[0] if v != 0]
    if not values:
        raise MedLSAMError("the label is empty: no RT Structure Set to write")
    ds = _base_dataset(series, description, series_number)
    ds.ReferencedFrameOfReferenceSequence = _references(series)
    rois, contours, observations = [], [], []
    boxes = ndimage.find_objects(label)
    for value in values:
        name = str(names.get(value) or f"label_{value}")[:64]
        roi = Dataset()
        roi.ROINumber = value
        roi.ReferencedFrameOfReferenceUID = series.frame_of_reference_uid
        roi.ROIName = name
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = description[:64]
        rois.append(roi)
        color = (colors or {}).get(value) or SEGMENT_COLORS[(value - 1) % len(SEGMENT_COLORS)]
        block = boxes[value - 1]
        outlines = organ_contours(label[block] == value, series.volume, tuple(b.start for b in block))
        contours.append(_roi_contour(value, color, outlines, series))
        observation = Dataset()
        observation.ObservationNumber = value
        observation.ReferencedROINumber = value
        observation.ROIObservationLabel = name[:16]
        observation.RTROIInterpretedType = "ORGAN"
        observation.ROIInterpreter = ""
        observations.append(observation)
    ds.StructureSetROISequence = Sequence(rois)
    ds.ROIContourSequence = Sequence(contours)
    ds.RTROIObservationsSequence = Sequence(observations)
    return ds


def write_rtstruct(
    label: CTVolume | np.ndarray | str | os.PathLike,
    names: dict[int, str],
    series: CTSeries | str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    colors: dict[int, tuple[int, int, int]] | None = None,
    description: str = "MedLSAM Label",
    series_number: int = 301,
) -> Path:
    """Write ``label`` (a CTVolume, a label file, or an array already in the series' voxel order) as an RT
    Structure Set referencing the DICOM series in folder ``series`` (or a CTSeries), atomically; returns the path.
    A label on the same physical grid stored in another axis order (the scan's NIfTI) is accepted."""
    from medlsam.io.volume import read_volume

    series = series if isinstance(series, CTSeries) else read_ct_series(series)
    if isinstance(label, (str, os.PathLike)):
        label = read_volume(label)
    if isinstance(label, CTVolume):
        array = label_on_grid(label, series.volume)
    else:
        array = np.asarray(label)
        if array.shape != series.volume.shape:
            raise MedLSAMError(f"label shape {array.shape} differs from the CT series' {series.volume.shape}")
    if not np.issubdtype(array.dtype, np.integer) and not np.array_equal(array, np.round(array)):
        raise MedLSAMError("the label holds non-integer values: not a label volume")
    dataset = rtstruct_dataset(array.astype(np.int64), names, series, colors, description, series_number)
    out = Path(out_path)
    with atomic_path(out) as tmp:
        dataset.save_as(str(tmp), write_like_original=False)
    return out
