"""Helpers of the app tests: a tiny datastore cut from OpenKBP scans, and (from scripts/app_server.py, shared
with benchmarks/app.py) a private copy of the app, free ports and a real server."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from medlsam.io.volume import CTVolume, read_volume, write_volume

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "scripts"))
from app_server import APP_SOURCE, free_port, private_app, start_server, stop_server, wait_for_server  # noqa: E402

__all__ = [
    "APP_SOURCE",
    "app_modules",
    "require",
    "NAMES",
    "crop",
    "free_port",
    "label_info",
    "private_app",
    "start_server",
    "stop_server",
    "tiny_case",
    "train_tasks",
    "training_processes",
    "wait_for_server",
    "wait_running",
]


def _app_lib_dir() -> Path | None:
    """The folder whose ``lib`` package is imported now (None: none is)."""
    module = sys.modules.get("lib")
    where = getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", [])), None)
    if where is None:
        return None
    return Path(where).resolve().parents[1] if where.endswith(".py") else Path(where).resolve().parent


def _forget_app_modules() -> None:
    for name in [name for name in sys.modules if name == "lib" or name.startswith("lib.")]:
        del sys.modules[name]


@contextmanager
def app_modules(app_dir: Path) -> Iterator[None]:
    """Import the app's ``lib`` package from ``app_dir`` inside the block (another app copy's ``lib`` modules are
    forgotten first) and forget them after it, unless they were already imported from ``app_dir`` before the block
    (a running in-process server of that app keeps its modules)."""
    app_dir = Path(app_dir).resolve()
    ours = _app_lib_dir() == app_dir
    if not ours:
        _forget_app_modules()
    sys.path.insert(0, str(app_dir))
    try:
        yield
    finally:
        sys.path.remove(str(app_dir))
        if not ours:
            _forget_app_modules()


NAMES = {
    1: "Brainstem",
    2: "SpinalCord",
    3: "RightParotid",
    4: "LeftParotid",
    5: "Esophagus",
    6: "Larynx",
    7: "Mandible",
}


def crop(volume: CTVolume, lo, hi, step=(1, 1, 1)) -> CTVolume:
    """volume[lo:hi:step] with the matching affine."""
    sl = tuple(slice(a, b, s) for a, b, s in zip(lo, hi, step))
    affine = volume.affine.copy()
    affine[:3, 3] = volume.index_to_world(np.array(lo, dtype=float))[0]
    affine[:3, :3] = affine[:3, :3] * np.array(step, dtype=float)[None, :]
    return CTVolume(np.ascontiguousarray(volume.array[sl]), affine, volume.source)


# per case: crop (lo, hi) around the brainstem and parotids, every second slice (5-6 mm)
TINY_CROPS = {1: ((32, 32, 28), (96, 96, 76)), 2: ((32, 32, 10), (96, 96, 58)), 3: ((32, 32, 4), (96, 96, 52))}


def tiny_case(data: Path, case: int, organs: list[int] | None, out_dir: Path, name: str | None = None):
    """Write a cropped, z-subsampled OpenKBP case to out_dir/<name>.nii.gz; return (image, label) paths
    (label only kept for `organs`, written to out_dir/<name>_label.nii.gz)."""
    lo, hi = TINY_CROPS[case]
    name = name or f"kbp{case}"
    image = read_volume(data / "openkbp" / "images" / f"openkbp_pt_{case}.nii.gz")
    image.array = image.array.astype(np.int16)
    small = crop(image, lo, hi, (1, 1, 2))
    out_dir.mkdir(parents=True, exist_ok=True)
    image_path = out_dir / f"{name}.nii.gz"
    write_volume(small.array, small, image_path)
    label_path = None
    if organs:
        label = read_volume(data / "openkbp" / "labels" / f"openkbp_pt_{case}.nii.gz")
        cut = crop(label, lo, hi, (1, 1, 2))
        keep = np.where(np.isin(cut.array, organs), cut.array, 0).astype(np.uint8)
        label_path = out_dir / f"{name}_label.nii.gz"
        write_volume(keep, small, label_path)
    return image_path, label_path


def label_info(organs: list[int]) -> dict:
    return {"label_info": [{"name": NAMES[v], "idx": v} for v in organs]}


def require(why: str) -> None:
    """Skip with the reason, or fail when CI demands these tests (MEDLSAM_REQUIRE_DICOMWEB=1)."""
    if why:
        if os.environ.get("MEDLSAM_REQUIRE_DICOMWEB") == "1":
            pytest.fail(f"MEDLSAM_REQUIRE_DICOMWEB=1 but {why}")
        pytest.skip(why)


# ---------------------------------------------------------------------------------- the app tests' datastore
TINY_TRAIN = {
    "epochs": 1,
    "iterations_per_epoch": 1,
    "batch_size": 1,
    "validation_pairs": 1,
    "max_images": 2,
    "threads": int(os.environ.get("MEDLSAM_TEST_THREADS", "1")),
    "publish": "always",
}


def app_images(data_dir: Path, folder: Path) -> dict:
    """The tiny scans of the app tests: three OpenKBP crops (kbp1-3), a fourth template (kbp4), a 2D image and a
    label volume posing as a scan."""
    src = folder / "src"
    paths = {
        "kbp1": tiny_case(data_dir, 1, [1], src),
        "kbp2": tiny_case(data_dir, 2, None, src),
        "kbp3": tiny_case(data_dir, 3, [1, 4], src),
        "kbp4": tiny_case(data_dir, 1, [1, 4], src, name="kbp4"),  # a third template (learning needs 3 labels)
    }
    nib = pytest.importorskip("nibabel")
    flat = src / "flat2d.nii.gz"  # a 2D image
    nib.save(nib.Nifti1Image(np.full((64, 64), -500, np.int16), np.eye(4)), str(flat))
    notct = src / "notct.nii.gz"  # a label volume, not Hounsfield units
    nib.save(
        nib.Nifti1Image(
            np.random.default_rng(0).integers(0, 8, (64, 64, 24)).astype(np.int16), np.diag([4, 4, 5, 1.0])
        ),
        str(notct),
    )
    return {**{k: v for k, v in paths.items()}, "flat2d": (flat, None), "notct": (notct, None)}


def app_datastore(folder: Path, images: dict, labelled: list[str]) -> Path:
    """A local datastore of ``images`` with the brainstem of ``labelled`` saved as final labels."""
    from monailabel.datastore.local import LocalDatastore

    studies = folder / "studies"
    studies.mkdir(parents=True)
    for name, (image, _) in images.items():
        shutil.copy(image, studies / f"{name}.nii.gz")
    store = LocalDatastore(str(studies), extensions=("*.nii.gz",), auto_reload=False)
    for name in labelled:
        store.save_label(name, str(images[name][1]), "final", label_info([1]))
    return studies


# -- a real server's training queue (``server``: {"url": ..., "pid": ...}) --------------------------------------------


def train_tasks(server: dict) -> list[dict]:
    """Every training the server knows (GET /train/?all=true): running, waiting, stopped, dropped."""
    import requests

    response = requests.get(f"{server['url']}/train/", params={"all": "true"}, timeout=30)
    return response.json() if response.status_code == 200 else []


def training_processes(server: dict) -> list[int]:
    """The server's living child processes that run a training (`python -m monailabel.interfaces.utils.app`)."""
    import psutil

    found = []
    for child in psutil.Process(server["pid"]).children(recursive=True):
        try:
            if "monailabel.interfaces.utils.app" in child.cmdline() and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return found


def wait_running(server: dict, timeout: float = 60) -> dict:
    """The running training's task once the server says RUNNING; AssertionError after ``timeout`` seconds."""
    import time

    import requests

    deadline = time.time() + timeout
    while time.time() < deadline:
        response = requests.get(f"{server['url']}/train/", params={"check_if_running": "true"}, timeout=30)
        if response.status_code == 200 and response.json().get("status") == "RUNNING":
            return response.json()
        time.sleep(0.2)
    raise AssertionError(f"no training running after {timeout} s: {train_tasks(server)}")
