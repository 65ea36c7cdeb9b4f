"""Where results go: the label volume and its JSON, written atomically, and the checks of output paths
made before any work."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from medlsam.errors import MedLSAMError
from medlsam.io.volume import CTVolume, write_volume
from medlsam.utils.atomic import atomic_path

if TYPE_CHECKING:
    from medlsam.segment.pipeline import SegmentationResult

LABEL_SUFFIXES = (".nii.gz", ".nii", ".nrrd")


def _label_suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in LABEL_SUFFIXES if name.endswith(s)), None)


def _check_folder(folder: Path, what: str) -> None:
    if not folder.is_dir():
        raise MedLSAMError(f"cannot write {what}: folder {folder} does not exist")
    probe = folder / f".tmp-{uuid.uuid4().hex}.probe"
    try:
        probe.open("w").close()
    except OSError as exc:
        raise MedLSAMError(f"cannot write {what} in {folder}: {exc.strerror or exc}") from None
    probe.unlink(missing_ok=True)


def check_output_path(out_path) -> None:
    """Raise MedLSAMError now if a label cannot be written to ``out_path`` (bad extension, missing or
    read-only folder, a folder in the way), so that no work is wasted."""
    path = Path(out_path).expanduser()
    if _label_suffix(path) is None:
        raise MedLSAMError(f"output {path}: the label must be NIfTI or NRRD ({', '.join(LABEL_SUFFIXES)})")
    if path.is_dir():
        raise MedLSAMError(f"output {path} is a folder")
    _check_folder(path.parent, f"the label {path.name}")


def check_png_path(png_path) -> Path:
    """Raise MedLSAMError now if the QC picture cannot be written to ``png_path``; its path otherwise."""
    path = Path(png_path).expanduser()
    if path.suffix.lower() != ".png":
        raise MedLSAMError(f"QC picture {path}: must be a .png file")
    if path.is_dir():
        raise MedLSAMError(f"QC picture {path} is a folder")
    _check_folder(path.parent, f"the QC picture {path.name}")
    return path


def write_segmentation(result: SegmentationResult, volume: CTVolume, out_path) -> None:
    """Write the label (NIfTI/NRRD by extension, the input's geometry) and ``out_path + ".json"``.

    Both go to temporary files first and are renamed into place once both are complete, so an error or
    an interrupt leaves neither a partial label nor a label without its JSON."""
    path = Path(out_path).expanduser()
    check_output_path(path)
    json_path = path.parent / (path.name + ".json")
    with atomic_path(path) as tmp_label, atomic_path(json_path) as tmp_json:  # both complete, then both renamed
        tic = time.perf_counter()
        write_volume(result.label, volume, tmp_label)
        result.timings_s["write"] = time.perf_counter() - tic
        with open(tmp_json, "w") as handle:
            json.dump(result.to_json(), handle, indent=2)
