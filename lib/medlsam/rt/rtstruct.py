"""DICOM RT Structure Sets (RTSTRUCT) in: contours rasterised onto a CT series' voxel grid, ROI names mapped to organs.

The grid is the CT as ``medlsam.io.volume.read_volume`` reads the series folder (voxel indices in its array order,
world LPS mm). Every contour is placed by its patient coordinates: it belongs to the slice nearest its plane
(matched by position, never by an index or its ReferencedSOPInstanceUID, which anonymisation often breaks), and a
slice's contours of one ROI are combined by the even-odd rule (XOR: a contour inside another is a hole). Voxels
whose centres lie inside are the ROI's (see ``medlsam.rt.raster``). Targets, PRVs, rings and helpers are
left out unless asked for and every ROI not imported is reported with the reason (``medlsam.rt.roi_names``). Where
ROIs overlap, the smaller keeps the shared voxels; an ROI nearly all inside smaller ones (``Lungs`` beside
``Lung_L`` and ``Lung_R``) is left out as a composite. Writing is ``medlsam.rt.write``.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medlsam.errors import InvalidImageError, TemplateError
from medlsam.io.volume import CTVolume
from medlsam.rt.raster import RoiMask, rasterise_slices
from medlsam.rt.roi_names import RoiDecision, map_rois

RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
SLICE_TOLERANCE = 0.1  # slices: a contour further than this from a CT slice plane is reported (still placed)
PLANE_TOLERANCE = 0.05  # slices: a contour whose points spread more than this across slices is not on one plane
COMPOSITE_FRACTION = 0.95  # an ROI with this share of its voxels inside smaller imported ROIs is a composite
CONTOUR_DATA = 0x30060050


@dataclass
class CTSeries:
    """A DICOM image series read as a volume, with the SOP instance of each slice (k along the volume's axis 2)."""

    folder: Path
    volume: CTVolume
    files: list[Path]  # slice k's file
    instance_uids: list[str]  # slice k's SOPInstanceUID
    sop_class_uid: str
    header: object  # pydicom Dataset of slice 0 (no pixels): patient, study, frame of reference

    @property
    def frame_of_reference_uid(self) -> str:
        return str(getattr(self.header, "FrameOfReferenceUID", ""))

    @property
    def study_uid(self) -> str:
        return str(self.header.StudyInstanceUID)

    @property
    def series_uid(self) -> str:
        return str(self.header.SeriesInstanceUID)


def read_ct_series(folder: str | os.PathLike) -> CTSeries:
    """The image series of a folder (the largest, as ``read_volume`` chooses it) and its instances per slice."""
    import pydicom
    import SimpleITK as sitk

    from medlsam.io.volume import read_volume

    folder = Path(folder)
    volume = read_volume(folder)  # refuses a missing folder, one without a series, and over-budget series
    reader = sitk.ImageSeriesReader()
    files = max((reader.GetGDCMSeriesFileNames(str(folder), s) for s in reader.GetGDCMSeriesIDs(str(folder))), key=len)
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    positions = np.array([[float(x) for x in h.ImagePositionPatient] for h in headers])
    index = volume.world_to_index(positions)
    slices = np.round(index[:, 2]).astype(int)
    if np.abs(index[:, :2]).max() > 0.01 or np.abs(index[:, 2] - slices).max() > 0.01 or len(set(slices)) != len(files):
        raise InvalidImageError(f"{folder}: the slices' positions do not form the series' grid (one per slice)")
    order = np.argsort(slices)
    header = headers[int(order[0])]
    return CTSeries(
        folder,
        volume,
        [Path(files[i]) for i in order],
        [str(headers[i].SOPInstanceUID) for i in order],
        str(header.SOPClassUID),
        header,
    )


@dataclass
class StructureSetImport:
    """A structure set on a CT grid: the label, {value: organ}, {value: RGB}, every ROI's fate, and warnings."""

    label: CTVolume
    names: dict[int, str]
    colors: dict[int, tuple[int, int, int]]
    rois: list[RoiDecision]
    warnings: list[str] = field(default_factory=list)
    voxels: dict[int, int] = field(default_factory=dict)  # value -> voxels in the label

    @property
    def unmapped(self) -> list[str]:
        """Names of the ROIs whose names map to no organ (or to one already taken: duplicates)."""
        return [d.name for d in self.rois if d.status == "unmapped"]

    @property
    def dropped(self) -> dict[str, str]:
        """ROI name -> why a mapped ROI was not imported after all (no voxel on the CT, a composite)."""
        return {d.name: d.reason for d in self.rois if d.status == "dropped"}

    @property
    def excluded(self) -> dict[str, str]:
        """ROI name -> why it was left out by rule (targets, PRVs, rings, helpers, body outline)."""
        return {d.name: d.reason for d in self.rois if d.status == "excluded"}

    def report(self) -> dict:
        """JSON-ready: names, voxels per organ, ROIs (status, organ, reason), unmapped, excluded, warnings."""
        return {
            "names": {str(v): n for v, n in self.names.items()},
            "voxels": {self.names[v]: n for v, n in self.voxels.items()},
            "rois": [d.to_json() for d in self.rois],
            "unmapped": self.unmapped,
            "excluded": self.excluded,
            "dropped": self.dropped,
            "warnings": self.warnings,
        }


def load_rtstruct(path):
    """A pydicom dataset of an RT Structure Set; TemplateError naming the problem for anything else."""
    import pydicom

    if not isinstance(path, (str, os.PathLike)):
        return path
    name = Path(path).name
    try:
        dataset = pydicom.dcmread(str(path))
    except FileNotFoundError:
        raise TemplateError(f"{path}: no such file") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file
        raise TemplateError(f"{name}: not a DICOM file ({type(exc).__name__})") from None
    sop_class = str(dataset.get("SOPClassUID", ""))
    if sop_class != RTSTRUCT_STORAGE and dataset.get("Modality") != "RTSTRUCT":
        raise TemplateError(
            f"{name}: not an RT Structure Set (SOP class {sop_class or 'missing'}, modality "
            f"{dataset.get('Modality', 'missing')})"
        )
    return dataset


def _file_name(dataset) -> str:
    return Path(str(getattr(dataset, "filename", "") or "RTSTRUCT")).name


def check_references(dataset, series: CTSeries, ignore_frame_of_reference: bool = False) -> list[str]:
    """Warnings about the structure set's references to the CT; a TemplateError when it names another frame of
    reference (its patient coordinates are then not the CT's) unless ``ignore_frame_of_reference``."""
    warnings = []
    frames = {str(f.FrameOfReferenceUID) for f in dataset.get("ReferencedFrameOfReferenceSequence", []) or []}
    frames |= {
        str(r.ReferencedFrameOfReferenceUID)
        for r in dataset.get("StructureSetROISequence", []) or []
        if r.get("ReferencedFrameOfReferenceUID")
    }
    ct_frame = series.frame_of_reference_uid
    if frames and ct_frame and ct_frame not in frames:
        message = (
            f"{_file_name(dataset)}: its contours are on frame of reference {', '.join(sorted(frames))}, the CT "
            f"series {series.folder.name} on {ct_frame}: their patient coordinates are not the same"
        )
        if not ignore_frame_of_reference:
            raise TemplateError(message + " (ignore_frame_of_reference / --ignore-frame-of-reference places them)")
        warnings.append(message + ": placed by patient coordinates as asked")
    if not dataset.get("ReferencedFrameOfReferenceSequence"):
        warnings.append("no ReferencedFrameOfReferenceSequence (anonymised?): contours placed by patient coordinates")
    known = set(series.instance_uids)
    referenced = [
        str(image.ReferencedSOPInstanceUID)
        for roi in dataset.get("ROIContourSequence", []) or []
        for contour in roi.get("ContourSequence", []) or []
        for image in contour.get("ContourImageSequence", []) or []
        if image.get("ReferencedSOPInstanceUID")
    ]
    stale = sum(uid not in known for uid in referenced)
    if stale:
        warnings.append(
            f"{stale} of {len(referenced)} contour image references name no instance of this CT series (stale or "
            "anonymised): ignored, every contour is placed by patient coordinates"
        )
    return warnings


def _contour_points(contour) -> np.ndarray:
    """ContourData as (N, 3) floats, parsed from the raw bytes when possible (fast for large structure sets)."""
    raw = contour.get_item(CONTOUR_DATA)
    value = getattr(raw, "value", None)
    if isinstance(value, bytes):
        values = np.array(value.strip(b" \0").split(b"\\"), dtype=np.float64)
    else:
        values = np.asarray(contour.ContourData, dtype=np.float64)
    if values.size % 3:
        return np.zeros((0, 3))
    return values.reshape(-1, 3)


def roi_slices(roi_contour, volume: CTVolume, problems: Counter) -> dict[int, list[np.ndarray]]:
    """One ROI's closed planar contours as {slice k: [(N, 2) (i, j) polygons]}, each on the slice nearest its plane;
    what cannot be placed is counted in ``problems`` (open, point, non-planar, off the CT...)."""
    slices: dict[int, list[np.ndarray]] = {}
    n_slices = volume.shape[2]
    for contour in roi_contour.get("ContourSequence", []) or []:
        kind = str(contour.get("ContourGeometricType", "")).upper()
        if kind != "CLOSED_PLANAR":
            problems[f"{kind.lower() or 'untyped'} contours (only CLOSED_PLANAR encloses voxels)"] += 1
            continue
        points = _contour_points(contour)
        if len(points) < 3 or not np.isfinite(points).all():
            problems["contours with fewer than 3 points"] += 1
            continue
        index = volume.world_to_index(points)
        if np.ptp(index[:, 2]) > PLANE_TOLERANCE:
            problems["contours not in a plane of the CT's slices (oblique or mis-oriented)"] += 1
            continue
        position = float(index[:, 2].mean())
        k = int(np.floor(position + 0.5))
        if not 0 <= k < n_slices:
            problems["contours beyond the CT's first or last slice"] += 1
            continue
        if abs(position - k) > SLICE_TOLERANCE:
            problems["contours between CT slices (placed on the nearest)"] += 1
        slices.setdefault(k, []).append(index[:, :2])
    return slices


def roi_masks(rtstruct, series: CTSeries | str | os.PathLike, numbers=None) -> dict[int, tuple[str, RoiMask | None]]:
    """Every ROI's voxels (or those of ROI ``numbers``), by ROI number: (ROI name, RoiMask or None when empty).
    No name mapping and no overlap rule: each ROI on its own, as an independent reader rasterises it."""
    dataset = load_rtstruct(rtstruct)
    series = series if isinstance(series, CTSeries) else read_ct_series(series)
    names = {int(r.ROINumber): str(r.get("ROIName", "")) for r in dataset.get("StructureSetROISequence", []) or []}
    out = {}
    for roi in dataset.get("ROIContourSequence", []) or []:
        number = int(roi.ReferencedROINumber)
        if numbers is None or number in numbers:
            slices = roi_slices(roi, series.volume, Counter())
            out[number] = (names.get(number, f"ROI {number}"), rasterise_slices(slices, series.volume.shape))
    return out


def _roi_table(dataset) -> list[tuple[int, str, str]]:
    """(number, name, interpreted type) of every ROI, in the file's order; TemplateError for duplicate numbers."""
    types = {
        int(o.ReferencedROINumber): str(o.get("RTROIInterpretedType", "") or "")
        for o in dataset.get("RTROIObservationsSequence", []) or []
        if o.get("ReferencedROINumber") is not None
    }
    table, seen = [], set()
    for roi in dataset.get("StructureSetROISequence", []) or []:
        number = int(roi.ROINumber)
        if number in seen:
            raise TemplateError(f"{_file_name(dataset)}: ROI number {number} is given twice")
        seen.add(number)
        table.append((number, str(roi.get("ROIName", "") or f"ROI {number}").strip(), types.get(number, "")))
    if not table:
        raise TemplateError(f"{_file_name(dataset)}: the structure set has no ROIs")
    return table


def _paint(masks: list[tuple[RoiDecision, RoiMask]], shape, warnings: list[str]) -> tuple[np.ndarray, list]:
    """The label of provisional values 1..N (order of ``masks``), larger ROIs first so that smaller ones keep shared
    voxels; composites (nearly all inside smaller ROIs) are left out. Returns (label, kept (decision, mask))."""
    order = sorted(range(len(masks)), key=lambda n: -masks[n][1].voxels)
    label = np.zeros(shape, dtype=np.uint16)
    for n in order:
        masks[n][1].paint(label, n + 1)
    kept = []
    for n, (decision, mask) in enumerate(masks):
        own = int((label[mask.slices][mask.mask] == n + 1).sum())
        if own < (1 - COMPOSITE_FRACTION) * mask.voxels:
            block = label[mask.slices]
            block[block == n + 1] = 0
            decision.status = "dropped"
            decision.reason = (
                f"composite: {100 * (1 - own / mask.voxels):.1f}% of its voxels belong to smaller imported ROIs"
            )
            continue
        if own < mask.voxels:
            shared = mask.voxels - own
            warnings.append(f"{decision.organ}: {shared} of its voxels overlap smaller ROIs (they keep them)")
        kept.append((n + 1, decision, mask))
    return label, kept


def _values(kept, organs) -> dict[int, int]:
    """provisional value -> final value: the organ's value in ``organs`` (a dict), else 1..N in file order."""
    if isinstance(organs, dict):
        by_name = {name: int(value) for value, name in organs.items()}
        free = max([*by_name.values(), 0]) + 1
        out = {}
        for provisional, decision, _ in kept:
            if decision.organ not in by_name:  # a kept target beside a bank's organs
                by_name[decision.organ], free = free, free + 1
            out[provisional] = by_name[decision.organ]
        return out
    return {provisional: n + 1 for n, (provisional, _, _) in enumerate(kept)}


def read_rtstruct(
    rtstruct,
    series: CTSeries | str | os.PathLike,
    *,
    synonyms=None,
    keep_targets: bool = False,
    organs=None,
    ignore_frame_of_reference: bool = False,
) -> StructureSetImport:
    """An RT Structure Set (path or pydicom dataset) on a CT series (folder or CTSeries): the label on the series'
    grid with {value: organ name}. ``synonyms``: a user's synonyms JSON (or Synonyms); ``keep_targets``: import
    targets, PRVs, rings and helpers too; ``organs``: a bank's {value: name} (or names) to map onto, values kept."""
    dataset = load_rtstruct(rtstruct)
    series = series if isinstance(series, CTSeries) else read_ct_series(series)
    name, shape = _file_name(dataset), series.volume.shape
    warnings = check_references(dataset, series, ignore_frame_of_reference)
    decisions = map_rois(_roi_table(dataset), synonyms, keep_targets, organs)
    contours = {int(r.ReferencedROINumber): r for r in dataset.get("ROIContourSequence", []) or []}
    if not any(r.get("ContourSequence") for r in contours.values()):
        raise TemplateError(f"{name}: the structure set holds no contours")
    masks, placed_any = [], False
    mapped = [d for d in decisions if d.status == "mapped"]
    for decision in mapped:
        problems: Counter = Counter()
        slices = roi_slices(contours[decision.number], series.volume, problems) if decision.number in contours else {}
        placed_any |= bool(slices)
        for problem, count in problems.items():
            warnings.append(f"{decision.name}: {count} {problem}")
        mask = rasterise_slices(slices, shape)
        if mask is None:
            decision.status = "dropped"
            decision.reason = "no contour encloses a voxel centre of the CT"
            decision.reason += f" ({dict(problems)})" if problems else ""
            continue
        masks.append((decision, mask))
    if mapped and not placed_any:
        raise TemplateError(f"{name}: no contour of its organs lies on the CT series {series.folder.name}")
    label, kept = _paint(masks, shape, warnings)
    mapping = _values(kept, organs)
    lut = np.zeros(len(masks) + 1, dtype=np.uint16)
    for provisional, value in mapping.items():
        lut[provisional] = value
    final = lut[label]
    final = final.astype(np.uint8) if final.max(initial=0) <= 255 else final
    colors = {}
    for provisional, decision, _ in kept:
        color = contours[decision.number].get("ROIDisplayColor") if decision.number in contours else None
        if color is not None and len(color) == 3:
            colors[mapping[provisional]] = tuple(int(c) for c in color)
    counts = np.bincount(final.ravel(), minlength=int(final.max(initial=0)) + 1)
    names = {mapping[p]: d.organ for p, d, _ in kept}
    return StructureSetImport(
        label=CTVolume(final, series.volume.affine.copy(), str(getattr(dataset, "filename", "") or "")),
        names=dict(sorted(names.items())),
        colors=colors,
        rois=decisions,
        warnings=warnings,
        voxels={v: int(counts[v]) for v in sorted(names)},
    )


def find_rtstructs(folder: str | os.PathLike) -> list[Path]:
    """The RT Structure Set files of a folder (any name), by their headers."""
    import pydicom

    found = []
    for path in sorted(Path(folder).iterdir()):
        if not path.is_file():
            continue
        try:
            header = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["SOPClassUID", "Modality"])
        except Exception:  # noqa: BLE001 - not DICOM: not a structure set
            continue
        if str(header.get("SOPClassUID", "")) == RTSTRUCT_STORAGE or header.get("Modality") == "RTSTRUCT":
            found.append(path)
    return found
