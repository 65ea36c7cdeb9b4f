"""Where the shipped weights live (package data: ``medlsam/weights/``, in the wheel too), and where the shared data
is found (configurable through the environment)."""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

from medlsam.errors import CheckpointError, MedLSAMError

# pip installs a package as plain files, so the package data has a real path (torch.load and symlinks need one).
WEIGHTS_DIR = Path(str(files("medlsam") / "weights"))
SHIPPED_MEDLAM = WEIGHTS_DIR / "pretrained_medlam.pt"
SHIPPED_CLICK_REFINER = WEIGHTS_DIR / "click_refiner.pt"


def default_medlam_path() -> Path:
    """The MedLAM checkpoint to use when none is given: $MEDLSAM_MEDLAM or the shipped model."""
    path = Path(os.environ.get("MEDLSAM_MEDLAM", SHIPPED_MEDLAM))
    if not path.is_file():
        raise CheckpointError(f"no MedLAM checkpoint at {path}: pass --model or set MEDLSAM_MEDLAM")
    return path


def checkout_root() -> Path | None:
    """The repository this package runs from (an editable install or the checkout's lib/ on sys.path), else None."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "lib" / "medlsam").is_dir() else None


def data_dir() -> Path:
    """The shared data folder: $MEDLSAM_DATA, else ../shared/data beside the checkout; an installed package has no
    checkout, so there it needs $MEDLSAM_DATA."""
    if os.environ.get("MEDLSAM_DATA"):
        return Path(os.environ["MEDLSAM_DATA"])
    root = checkout_root()
    if root is None:
        raise MedLSAMError("no data folder: set MEDLSAM_DATA (the installed package has no checkout beside it)")
    return root.parent / "shared" / "data"
