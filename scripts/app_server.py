"""A real MONAI Label server on a private copy of the app (its model/ folder its own, so nothing is written into
apps/medlsam/model), on a free loopback port: for the app's tests and benchmarks/app.py."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
APP_SOURCE = REPO_ROOT / "apps" / "medlsam"


def private_app(tmp: Path) -> Path:
    """A copy of apps/medlsam (code only) whose model/ folder is private to the test (the app reads the shipped
    MedLAM and click refiner from the medlsam package)."""
    app = tmp / "app"
    shutil.copytree(APP_SOURCE, app, ignore=shutil.ignore_patterns("model", "logs", "bin", "__pycache__"))
    (app / "model").mkdir()
    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    app: Path, studies: Path, port: int, conf: dict, log: Path, tmpdir: Path | None = None
) -> subprocess.Popen:
    """`monailabel start_server` in its own process group; with tmpdir, the server's temporary files go there."""
    cmd = [
        str(Path(sys.executable).parent / "monailabel"),
        "start_server",
        "--app",
        str(app),
        "--studies",
        str(studies),
        "-p",
        str(port),
        "--host",
        "127.0.0.1",
    ]
    for key, value in conf.items():
        cmd += ["--conf", key, str(value)]
    handle = open(log, "w")
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "MONAILABEL_PYEXE": sys.executable}
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    return subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True, env=env)


def wait_for_server(url: str, process: subprocess.Popen, timeout: float = 120, log: Path | None = None) -> dict:
    import requests

    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}: {log.read_text()[-3000:] if log else ''}")
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
