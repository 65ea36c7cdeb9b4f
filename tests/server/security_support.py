"""What the security tests share: the datastore they attack (a good template, junk final labels saved before the
gate existed, a linked scan), the server on it, and the probes that check nothing changed."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from app_support import free_port, label_info, private_app, start_server, stop_server, tiny_case, wait_for_server
from medlsam.io.volume import CTVolume, read_volume, write_volume

requests = pytest.importorskip("requests")

THREADS = "1"
JUNK = ["j1", "j2", "j3", "j4", "j5"]  # five images whose (newer) final labels cannot serve as templates


def save(store, image: str, label: Path, info: dict | None = None) -> None:
    store.save_label(image, str(label), "final", info if info is not None else label_info([1]))


def attacked_datastore(folder: Path, data_dir: Path) -> tuple[Path, dict]:
    from monailabel.datastore.local import LocalDatastore

    src = folder / "src"
    kbp1 = tiny_case(data_dir, 1, [1], src)
    kbp2 = tiny_case(data_dir, 2, None, src)
    kbp3 = tiny_case(data_dir, 3, [1], src)
    studies = folder / "studies"
    studies.mkdir()
    shared = folder / "shared_scans"  # a scan the datastore links to (as `make sample-datastore` once did)
    shared.mkdir()
    shutil.copy(kbp2[0], shared / "linked.nii.gz")
    (studies / "linked.nii.gz").symlink_to(shared / "linked.nii.gz")
    for name, path in (
        ("kbp1", kbp1[0]),
        ("kbp2", kbp2[0]),
        ("kbp3", kbp3[0]),
        ("lat", kbp2[0]),
        *((j, kbp2[0]) for j in JUNK),
    ):
        shutil.copy(path, studies / f"{name}.nii.gz")
    image = read_volume(kbp2[0])
    junk = src / "junk"
    junk.mkdir()
    write_volume(np.zeros(image.shape, np.uint8), image, junk / "zeros.nii.gz")
    write_volume(np.ones(image.shape, np.uint8), image, junk / "ones.nii.gz")
    write_volume(np.clip(image.array, -1000, 3000).astype(np.int16) + 1000, image, junk / "ct.nii.gz")
    small = CTVolume(np.zeros((20, 20, 10), np.uint8), image.affine)
    small.array[5:10, 5:10, 3:6] = 1
    write_volume(small.array, small, junk / "small.nii.gz")
    (junk / "text.nii.gz").write_text("not an image\n")
    store = LocalDatastore(str(studies), extensions=("*.nii.gz",), auto_reload=False)
    save(store, "kbp1", kbp1[1])
    # written before the gate existed: the five newest final labels are junk, one with a malformed label_info
    save(store, "j1", junk / "zeros.nii.gz", {"label_info": [{"name": "Brainstem", "idx": "abc"}]})
    for name, file in zip(JUNK[1:], ("ones", "ct", "small", "text")):
        save(store, name, junk / f"{file}.nii.gz")
    store.update_label_info("kbp1", "final", {"ts": 1})  # the oldest
    return studies, {"kbp1": kbp1, "kbp2": kbp2, "kbp3": kbp3, "junk": junk}


def tree(folder: Path, skip: list[Path]) -> dict[str, str]:
    """sha1 of every file under folder, except those under skip."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not any(path == s or s in path.parents for s in skip):
            out[str(path.relative_to(folder))] = hashlib.sha1(path.read_bytes()).hexdigest()
    return out


def security_server(tmp_path_factory, data_dir):
    """A real server on a private app copy and the attacked datastore (the env dict the tests read)."""
    folder = tmp_path_factory.mktemp("security")
    studies, files = attacked_datastore(folder, data_dir)
    app = private_app(folder)
    (folder / "outside").mkdir()
    (app / "model" / "train_stats.json").write_text(json.dumps({"epoch": 1, "total_epochs": 4, "status": "running"}))
    port = free_port()
    log, tmp = folder / "server.log", folder / "tmp"
    tmp.mkdir()
    conf = {"models": "medlsam", "threads": THREADS, "adapt_on_save": "false"}
    process = start_server(app, studies, port, conf, log, tmpdir=tmp)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(url, process, log=log)
        model = app / "model"
        skip = [
            studies,
            model / "templates",
            model / "templates.pt",
            model / "templates.json",
            model / "train_stats.json",
            app / "logs",
            app / "bin",
            log,
            tmp,
        ]
        env = {
            "url": url,
            "folder": folder,
            "studies": studies,
            "app": app,
            "files": files,
            "log": log,
            "process": process,
            "skip": skip,
            "tmp": tmp,
        }
        env["before"] = tree(folder, skip)
        yield env
    finally:
        stop_server(process)


def unchanged(server) -> None:
    """Nothing written outside the datastore, model/ byte-identical, /info/ 200."""
    assert tree(server["folder"], server["skip"]) == server["before"]
    assert requests.get(f"{server['url']}/info/", timeout=30).status_code == 200


def temporary_files(server) -> set[str]:
    """The server's temporary folder (its TMPDIR): an upload is copied there, to be removed after the request."""
    return {path.name for path in server["tmp"].iterdir()}


def infer(server, model: str, image: str, params: dict | None = None, **kwargs):
    return requests.post(
        f"{server['url']}/infer/{model}",
        params={"image": image, "output": "json"},
        data={"params": json.dumps(params or {})},
        timeout=300,
        **kwargs,
    )


def put_label(server, image: str, file: Path | bytes, info: dict | None, tag: str = "final", name=None):
    content = file if isinstance(file, bytes) else file.read_bytes()
    return requests.put(
        f"{server['url']}/datastore/label",
        params={"image": image, "tag": tag},
        data={"params": json.dumps(info or {})},
        files={"label": (name or "label.nii.gz", content)},
        timeout=60,
    )


def unchanged_since(server, before: dict[str, str]) -> None:
    """Nothing written outside the datastore since ``before`` (a tree snapshot), /info/ 200."""
    assert tree(server["folder"], server["skip"]) == before
    assert requests.get(f"{server['url']}/info/", timeout=30).status_code == 200


def nrrd_header(data_file: str, shape=(64, 64, 24)) -> bytes:
    """A 281-byte-style detached NRRD header whose voxels are another file on the server."""
    sizes = " ".join(map(str, shape))
    return (
        f"NRRD0004\ntype: short\ndimension: 3\nsizes: {sizes}\nspace directions: (1,0,0) (0,1,0) (0,0,1)\n"
        f"space: left-posterior-superior\nencoding: raw\nendian: little\ndata file: {data_file}\n\n"
    ).encode()


def nifti_claiming(shape: tuple[int, int, int], payload: bytes = b"") -> bytes:
    """A gzip NIfTI whose header claims ``shape`` int16 voxels but holds only ``payload``."""
    import gzip

    import nibabel

    header = nibabel.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    return gzip.compress(header.binaryblock + b"\0" * 4 + payload)


def peak_rss_mb(process) -> float:
    """The server process's peak resident memory (VmHWM), MB."""
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")
