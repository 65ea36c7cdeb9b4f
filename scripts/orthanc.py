"""A loopback-only Orthanc (Debian packages ``orthanc`` + ``orthanc-dicomweb``) with its own config and storage in a
runtime folder, started and stopped by PID: the DICOMweb server of `make serve-dicomweb` and of the tests.

    python scripts/orthanc.py start --dir runs/orthanc --port 8042   # prints the DICOMweb root once it answers
    python scripts/orthanc.py stop --dir runs/orthanc
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ORTHANC = "Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def missing() -> str:
    """Why Orthanc cannot run here ("" when it can)."""
    if not shutil.which(ORTHANC):
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)"
    if not DICOMWEB_PLUGIN.is_file():
        return f"the Orthanc DICOMweb plugin {DICOMWEB_PLUGIN} is missing (apt-get install orthanc-dicomweb)"
    return ""


def write_config(folder: Path, port: int) -> Path:
    """Orthanc's config: HTTP on 127.0.0.1:port only, no DICOM port, no auth, storage under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "MedLSAM-Orthanc",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "storage"),
        "HttpPort": port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": False,
        "HttpTimeout": 60,
        "StableAge": 1,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Host": f"127.0.0.1:{port}", "Ssl": False},
    }
    path = folder / "orthanc.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def dicomweb_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/dicom-web"


def wait_until_up(port: int, process: subprocess.Popen | None = None, timeout: float = 30) -> None:
    import requests

    deadline = time.time() + timeout
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {process.returncode} (see its log)")
        try:
            if requests.get(f"{dicomweb_url(port)}/studies", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"Orthanc on port {port} did not answer /dicom-web/studies within {timeout} s")


def start(folder: Path, port: int) -> subprocess.Popen:
    """Start Orthanc on 127.0.0.1:port (its PID in folder/orthanc.pid) and wait until DICOMweb answers."""
    why = missing()
    if why:
        raise RuntimeError(why)
    config = write_config(folder, port)
    log = open(folder / "orthanc.log", "w")
    process = subprocess.Popen([ORTHANC, str(config)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (folder / "orthanc.pid").write_text(str(process.pid))
    try:
        wait_until_up(port, process)
    except BaseException:
        stop_pid(process.pid)
        raise
    return process


def stop_pid(pid: int, timeout: float = 10) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                break
        except (ProcessLookupError, FileNotFoundError):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop(folder: Path) -> None:
    pid_file = folder / "orthanc.pid"
    if pid_file.is_file():
        stop_pid(int(pid_file.read_text()))
        pid_file.unlink()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--dir", default="runs/orthanc", help="runtime folder: config, storage, log, PID")
    parser.add_argument("--port", type=int, default=8042)
    args = parser.parse_args(argv)
    folder = Path(args.dir).resolve()
    if args.action == "stop":
        stop(folder)
        return 0
    stop(folder)  # a previous run's Orthanc on this folder
    try:
        start(folder, args.port)
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(dicomweb_url(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
