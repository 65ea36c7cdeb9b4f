"""Where the shipped weights live, and where data is found (configurable through the environment)."""

from __future__ import annotations

import os
from pathlib import Path

from medlsam.errors import CheckpointError

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_MEDLAM = REPO_ROOT / "apps" / "medlsam" / "model" / "pretrained_medlam.pt"
SHIPPED_CLICK_REFINER = REPO_ROOT / "apps" / "medlsam" / "model" / "click_refiner.pt"


def default_medlam_path() -> Path:
    """The MedLAM checkpoint to use when none is given: $MEDLSAM_MEDLAM or the shipped model."""
    path = Path(os.environ.get("MEDLSAM_MEDLAM", SHIPPED_MEDLAM))
    if not path.is_file():
        raise CheckpointError(f"no MedLAM checkpoint at {path}: pass --model or set MEDLSAM_MEDLAM")
    return path


def data_dir() -> Path:
    """The shared data folder: $MEDLSAM_DATA or ../shared/data beside the repository."""
    return Path(os.environ.get("MEDLSAM_DATA", REPO_ROOT.parent / "shared" / "data"))
