"""A DICOM series folder (+ its RT Structure Set) -> the CT and its label as NIfTI/NRRD, with the organ names:
what ``medlsam dicom import`` writes, ready for ``medlsam templates build --images ... --labels ... --names ...``.

Files in the output folder: ``image.<fmt>`` (the CT on the series' grid), ``label.<fmt>`` (the organs, same grid),
``names.json`` ({"1": "Liver", ...}, as ``medlsam.utils.names`` reads it) and ``import.json`` (every ROI's fate:
imported as which organ, left out by rule and why, unmapped; warnings). Each file is written atomically.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medlsam.errors import MedLSAMError, TemplateError
from medlsam.rt.rtstruct import StructureSetImport, find_rtstructs, read_ct_series, read_rtstruct

FORMATS = ("nii.gz", "nii", "nrrd")


@dataclass
class SeriesImport:
    """What ``import_series`` wrote: paths, and the structure set's import (None without a structure set)."""

    image: Path
    label: Path | None = None
    names_file: Path | None = None
    report_file: Path | None = None
    rtstruct: Path | None = None
    structures: StructureSetImport | None = None
    lines: list[str] = field(default_factory=list)  # a human summary, one line each


def choose_rtstruct(folder: Path, rtstruct: str | os.PathLike | None) -> Path | None:
    """The structure set to import: the one given, else the only one in the series folder (None when there is
    none); several in the folder need a choice."""
    if rtstruct is not None:
        return Path(rtstruct)
    found = find_rtstructs(folder)
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise MedLSAMError(f"{folder} holds {len(found)} RT Structure Sets ({names}): choose one with --rtstruct")
    return found[0] if found else None


def _summary(result: StructureSetImport, spacing: np.ndarray) -> list[str]:
    voxel_cc = float(np.prod(spacing)) / 1000.0
    roi_of = {d.organ: d.name for d in result.rois if d.status == "mapped"}
    lines = [f"{'value':>5s}  {'organ':16s} {'from ROI':20s} {'voxels':>9s}  {'cc':>8s}"]
    for value, organ in result.names.items():
        voxels = result.voxels.get(value, 0)
        lines.append(f"{value:5d}  {organ:16s} {roi_of.get(organ, ''):20s} {voxels:9d}  {voxels * voxel_cc:8.1f}")
    for decision in result.rois:
        if decision.status == "excluded":
            lines.append(f"left out  {decision.name!r}: {decision.reason}")
    for decision in result.rois:
        if decision.status == "dropped":
            lines.append(f"not imported  {decision.name!r}: {decision.reason}")
    unmapped = [d for d in result.rois if d.status == "unmapped"]
    if unmapped:
        lines.append(f"unmapped ROIs ({len(unmapped)}): " + ", ".join(repr(d.name) for d in unmapped))
        lines.extend(f"  {d.name!r}: {d.reason}" for d in unmapped)
    lines.extend(f"warning: {w}" for w in result.warnings)
    return lines


def import_series(
    series_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    rtstruct: str | os.PathLike | None = None,
    *,
    synonyms=None,
    keep_targets: bool = False,
    organs: dict[int, str] | None = None,
    ignore_frame_of_reference: bool = False,
    fmt: str = "nii.gz",
) -> SeriesImport:
    """Write the series' CT (and, with a structure set, its label, names and report) into ``out_dir``.
    A structure set from which no organ can be imported is a TemplateError (its report is written first)."""
    from medlsam.io.volume import write_volume
    from medlsam.utils.atomic import write_json_atomic

    if fmt not in FORMATS:
        raise MedLSAMError(f"unknown format {fmt!r}: one of {', '.join(FORMATS)}")
    folder, out = Path(series_dir).expanduser(), Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise MedLSAMError(f"{out} exists and is not a folder")
    if not folder.is_dir():
        raise MedLSAMError(f"{folder}: not a folder holding a DICOM series")
    chosen = choose_rtstruct(folder, rtstruct)  # fails before any work when the choice is unclear
    series = read_ct_series(folder)
    volume = series.volume
    out.mkdir(parents=True, exist_ok=True)
    done = SeriesImport(image=out / f"image.{fmt}", rtstruct=chosen)
    write_volume(volume.array, volume, done.image)
    spacing = " x ".join(f"{s:.3g}" for s in volume.spacing)
    done.lines.append(f"image   {done.image}: {' x '.join(map(str, volume.shape))} voxels of {spacing} mm")
    if chosen is None:
        done.lines.append(f"no RT Structure Set given or in {folder}: only the image was written")
        return done
    result = read_rtstruct(
        chosen,
        series,
        synonyms=synonyms,
        keep_targets=keep_targets,
        organs=organs,
        ignore_frame_of_reference=ignore_frame_of_reference,
    )
    done.structures = result
    done.report_file = out / "import.json"
    report = {"series": str(folder), "rtstruct": str(chosen), "image": str(done.image), **result.report()}
    if not result.names:
        write_json_atomic(report, done.report_file)
        reasons = "; ".join(f"{d.name!r}: {d.reason}" for d in result.rois)
        raise TemplateError(f"{chosen.name}: no organ could be imported ({reasons}); see {done.report_file}")
    done.label, done.names_file = out / f"label.{fmt}", out / "names.json"
    write_volume(result.label.array, volume, done.label)
    write_json_atomic({str(v): n for v, n in result.names.items()}, done.names_file)
    write_json_atomic({**report, "label": str(done.label), "names_file": str(done.names_file)}, done.report_file)
    done.lines.append(f"label   {done.label}: {len(result.names)} organs from {chosen.name}; names {done.names_file}")
    done.lines.extend(_summary(result, volume.spacing))
    done.lines.append(f"report  {done.report_file}")
    return done


def rtstruct_templates(
    series_dirs: list[str | os.PathLike],
    rtstructs: list[str | os.PathLike | None] | None = None,
    *,
    names: dict[int, str] | None = None,
    synonyms=None,
    keep_targets: bool = False,
) -> tuple[list, list, dict[int, str], list[str]]:
    """(CT volumes, their labels, {value: organ}, one report line per series) of DICOM series folders and their
    RT Structure Sets (given per folder, or the only one in it), every label numbered by one organ list: ``names``
    when given (ROIs mapped onto them), else the organs in the order first met; ready for ``build_bank``."""
    rtstructs = list(rtstructs) if rtstructs else [None] * len(series_dirs)
    if len(rtstructs) != len(series_dirs):
        raise MedLSAMError(f"{len(series_dirs)} series need as many structure sets, not {len(rtstructs)}")
    organs = dict(names or {})
    images, labels, lines = [], [], []
    for folder, given in zip(series_dirs, rtstructs):
        folder = Path(folder).expanduser()
        chosen = choose_rtstruct(folder, given) if folder.is_dir() else None
        if chosen is None:
            raise MedLSAMError(f"{folder}: a DICOM series folder with an RT Structure Set is needed (--rtstruct)")
        series = read_ct_series(folder)
        result = read_rtstruct(chosen, series, synonyms=synonyms, keep_targets=keep_targets, organs=names)
        if not result.names:
            raise TemplateError(f"{chosen.name}: no organ could be imported onto {folder.name}")
        lut = np.zeros(max(result.names) + 1, dtype=np.uint16)
        for value, organ in result.names.items():
            if organ not in organs.values():
                organs[max(organs, default=0) + 1] = organ
            lut[value] = next(v for v, n in organs.items() if n == organ)
        label = lut[result.label.array]
        images.append(series.volume)
        labels.append(type(result.label)(label.astype(np.uint16), result.label.affine, str(chosen)))
        unmapped = [d.name for d in result.rois if d.status == "unmapped"]
        lines.append(
            f"{folder.name}: {', '.join(result.names.values())} from {chosen.name}"
            + (f"; unmapped ROIs: {', '.join(unmapped)}" if unmapped else "")
        )
    return images, labels, dict(sorted(organs.items())), lines
