"""Helpers of the app tests and benchmarks: a tiny datastore cut from OpenKBP scans, a private copy of
the app (so that tests never write into apps/medlsam/model), free ports and a real server."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from medlsam.volume import CTVolume, read_volume, write_volume

REPO_ROOT = Path(__file__).resolve().parents[1]
APP_SOURCE = REPO_ROOT / "apps" / "medlsam"
NAMES = {1: "Brainstem", 2: "SpinalCord", 3: "RightParotid", 4: "LeftParotid", 5: "Esophagus", 6: "Larynx",
         7: "Mandible"}


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


def private_app(tmp: Path) -> Path:
    """A copy of apps/medlsam (code + shipped MedLAM link) whose model/ folder is private to the test."""
    app = tmp / "app"
    shutil.copytree(APP_SOURCE, app, ignore=shutil.ignore_patterns("model", "logs", "bin", "__pycache__"))
    (app / "model").mkdir()
    os.symlink(APP_SOURCE / "model" / "pretrained_medlam.pt", app / "model" / "pretrained_medlam.pt")
    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(app: Path, studies: Path, port: int, conf: dict, log: Path) -> subprocess.Popen:
    cmd = [str(Path(sys.executable).parent / "monailabel"), "start_server", "--app", str(app), "--studies",
           str(studies), "-p", str(port), "--host", "127.0.0.1"]
    for key, value in conf.items():
        cmd += ["--conf", key, str(value)]
    handle = open(log, "w")
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "MONAILABEL_PYEXE": sys.executable}
    return subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True, env=env)


def wait_for_server(url: str, process: subprocess.Popen, timeout: float = 120, log: Path | None = None) -> dict:
    import requests

    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}: "
                               f"{log.read_text()[-3000:] if log else ''}")
        try:
            response = requests.get(f"{url}/info/", timeout=5)
            if response.status_code == 200:
                return response.json()
        except requests.RequestException:
            pass
        time.sleep(1)
    raise TimeoutError(f"server at {url} did not answer within {timeout} s")


def stop_server(process: subprocess.Popen) -> None:
    """Stop the server we started (its own process group: uvicorn and any training child)."""
    import signal

    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(timeout=10)


def json_dump(data, path: Path) -> None:
    path.write_text(json.dumps(data, indent=2))
