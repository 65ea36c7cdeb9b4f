"""Security probe: the attacks of issues 15 and 26 against a real server, each timed, with /info/'s latency and the
server's memory during it.

    python benchmarks/security.py [--data ../shared/data] [--infer-timeout 20]

Builds a small datastore from OpenKBP (one template with its final label, three unlabeled scans as stored, one of
them a symlink to a file outside the datastore), starts `monailabel start_server` on a private copy of apps/medlsam
(loopback, `--conf infer_timeout` as given), builds its template bank and loads SAM once, then runs every attack
while a second thread polls `/info/` every 0.1 s and samples the server's resident memory. For each attack: the
answer (status and the start of its detail), its time, the slowest `/info/` answer during it and the rise of the
server's resident memory over the attack's start.
Writes benchmarks/results/security.md, .json and .png.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import shutil
import sys
import tarfile
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import requests

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "scripts"))

from app_server import free_port, private_app, start_server, stop_server, wait_for_server  # noqa: E402

RESULTS = HERE / "results"


class Probe:
    """Polls /info/ and the server's RSS in the background; ``run`` times one attack and reports what it saw."""

    def __init__(self, url: str, pid: int):
        self.url, self.pid = url, pid
        self.latencies: list[float] = []
        self.rss: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def _poll(self) -> None:
        while not self.stop.is_set():
            tic = time.perf_counter()
            try:
                requests.get(f"{self.url}/info/", timeout=30)
                self.latencies.append(time.perf_counter() - tic)
            except requests.RequestException:
                self.latencies.append(float("inf"))
            self.rss.append(self.rss_mb())
            time.sleep(0.1)

    def run(self, name: str, attack) -> dict:
        self.latencies.clear()
        self.rss.clear()
        start_rss = self.rss_mb()
        tic = time.perf_counter()
        try:
            outcome = attack()
        except requests.RequestException as exc:
            outcome = f"client error {type(exc).__name__}"
        seconds = time.perf_counter() - tic
        time.sleep(0.3)  # one more poll after the answer
        row = {
            "attack": name,
            "outcome": outcome,
            "seconds": round(seconds, 2),
            "info_max_s": round(max(self.latencies, default=float("nan")), 3),
            "info_polls": len(self.latencies),
            "rss_rise_mb": round(max(self.rss, default=start_rss) - start_rss, 1),
        }
        print(json.dumps(row), flush=True)
        return row


def answer(response: requests.Response) -> str:
    try:
        detail = str(response.json().get("detail", ""))[:90]
    except ValueError:
        detail = response.text[:90]
    return f"{response.status_code} {detail}".strip()


def nifti_claiming(shape, payload: bytes = b"") -> bytes:
    import nibabel

    header = nibabel.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    return gzip.compress(header.binaryblock + b"\0" * 4 + payload)


def _infer(url: str, model: str, params: dict, image: str = "kbp_b", timeout: float = 600) -> str:
    return answer(
        requests.post(
            f"{url}/infer/{model}",
            params={"image": image, "output": "json"},
            data={"params": json.dumps(params)},
            timeout=timeout,
        )
    )


def _session_tar(url: str, app: Path) -> str:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        data = b"print('pwned')\n"
        member = tarfile.TarInfo("../../app/lib/configs/evil.py")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    got = requests.put(f"{url}/session/", params={"uncompress": "true"}, files={"files": ("a.tgz", buffer.getvalue())})
    return answer(got) + ("; evil.py written" if list(app.rglob("evil.py")) else "; nothing written")


def _detached(url: str, ct: Path) -> str:
    header = f"NRRD0004\ntype: short\ndimension: 3\nsizes: 128 128 128\nencoding: gzip\ndata file: {ct}\n\n"
    files = {"file": ("d.nrrd", header.encode())}
    return answer(requests.put(f"{url}/datastore/image", params={"image": "detached"}, files=files))


def _delete_link(url: str, folder: Path) -> str:
    target = folder / "shared" / "kbp_link.nii.gz"
    got = requests.delete(f"{url}/datastore/", params={"id": "kbp_link"}, timeout=60)
    return answer(got) + ("; target kept" if target.is_file() else "; TARGET DELETED")


def _cors(url: str) -> str:
    got = requests.options(
        f"{url}/datastore/image",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "PUT"},
    )
    granted = got.headers.get("access-control-allow-origin")
    return f"{got.status_code}, allow-origin {granted!r}"


def _bomb(url: str, shape) -> str:
    files = {"file": ("b.nii.gz", nifti_claiming(shape))}
    return answer(requests.put(f"{url}/datastore/image", params={"image": "bomb"}, files=files))


def _enqueue(url: str) -> str:
    codes = [
        requests.post(f"{url}/train/medlam", params={"enqueue": "true"}, json={"epochs": 1}).status_code
        for _ in range(6)
    ]
    stopped = answer(requests.delete(f"{url}/train/", timeout=60))
    return f"POST x6: {codes}; DELETE /train/: {stopped}"


def _leave(url: str, app: Path) -> str:
    try:
        requests.post(
            f"{url}/infer/sam_3d",
            params={"image": "kbp_c", "output": "json"},
            data={"params": json.dumps({"foreground": [[64, 64, 60]], "min_iou": 0})},
            timeout=2,
        )
        return "answered within 2 s"
    except requests.exceptions.ReadTimeout:
        pass
    tic = time.perf_counter()
    log = app / "logs" / "app.log"
    while "client is no longer waiting" not in log.read_text() and time.perf_counter() - tic < 300:
        time.sleep(0.2)
    return f"client left after 2 s; the server stopped {time.perf_counter() - tic + 2:.1f} s after the request"


def _final_label(url: str, label: Path, params: dict | None = None) -> str:
    extra = {"data": {"params": json.dumps(params)}} if params is not None else {}
    return answer(
        requests.put(
            f"{url}/datastore/label",
            params={"image": "kbp_b", "tag": "final"},
            files={"label": ("l.nii.gz", label.read_bytes())},
            **extra,
        )
    )


def attacks(url: str, folder: Path, studies: Path, app: Path, ct: Path) -> list[tuple[str, object]]:
    label = folder / "label300.nii.gz"
    click = [[64, 64, 60]]
    xss = {"label_info": [{"name": "<img src=x onerror=alert(1)>", "idx": 300}]}
    return [
        ("session archive with ../ member (uncompress=true)", partial(_session_tar, url, app)),
        ("edit: label = a server path", partial(_infer, url, "edit", {"Brainstem": click, "label": str(ct)})),
        ("detached NRRD header naming a CT elsewhere", partial(_detached, url, ct)),
        ("DELETE a symlinked image", partial(_delete_link, url, folder)),
        ("CORS preflight from http://evil.example", partial(_cors, url)),
        (
            "Host: evil.example (DNS rebinding)",
            lambda: answer(requests.get(f"{url}/info/", headers={"Host": "evil.example"})),
        ),
        ("GET /logs/", lambda: answer(requests.get(f"{url}/logs/"))),
        ("70-byte .nii.gz claiming 1000^3 voxels", partial(_bomb, url, (1000, 1000, 1000))),
        ("70-byte .nii.gz claiming 2000^3 voxels", partial(_bomb, url, (2000, 2000, 2000))),
        (
            "sam_3d: one voxel foreground and background",
            partial(_infer, url, "sam_3d", {"foreground": click, "background": click}),
        ),
        ("sam_3d: 10,000 clicks", partial(_infer, url, "sam_3d", {"foreground": click * 10_000})),
        ("edit: 10,000 clicks", partial(_infer, url, "edit", {"Brainstem": click * 10_000})),
        ("medlsam: result_extension .exe", partial(_infer, url, "medlsam", {"result_extension": ".exe"})),
        ("medlsam: device cuda:99", partial(_infer, url, "medlsam", {"device": "cuda:99"})),
        (
            "train medlam: device cuda:99",
            lambda: answer(requests.post(f"{url}/train/medlam", json={"device": "cuda:99"})),
        ),
        ("train: 6 x enqueue, then DELETE /train/", partial(_enqueue, url)),
        (
            "sam_3d past the time bound (min_iou 0, every slice)",
            partial(_infer, url, "sam_3d", {"foreground": click, "min_iou": 0}, "kbp_b"),
        ),
        ("sam_3d, client leaves after 2 s", partial(_leave, url, app)),
        ("final label with value 300, no label_info", partial(_final_label, url, label)),
        ("label_info name <img src=x onerror=alert(1)>", partial(_final_label, url, label, xss)),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    parser.add_argument("--infer-timeout", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "security")
    args = parser.parse_args(argv)

    from medlsam.io.volume import read_volume, write_volume

    kbp = args.data / "openkbp"
    folder = Path(tempfile.mkdtemp(prefix="medlsam-security-"))
    try:
        studies, shared = folder / "studies", folder / "shared"
        studies.mkdir()
        shared.mkdir()
        for name, case in (("kbp_a", 1), ("kbp_b", 201), ("kbp_c", 202)):
            shutil.copy(kbp / "images" / f"openkbp_pt_{case}.nii.gz", studies / f"{name}.nii.gz")
        shutil.copy(kbp / "images" / "openkbp_pt_203.nii.gz", shared / "kbp_link.nii.gz")
        (studies / "kbp_link.nii.gz").symlink_to(shared / "kbp_link.nii.gz")
        truth = read_volume(kbp / "labels" / "openkbp_pt_1.nii.gz")
        write_volume(np.where(truth.array == 1, 1, 0).astype(np.uint8), truth, folder / "brainstem.nii.gz")
        scan_b = read_volume(studies / "kbp_b.nii.gz")
        brainstem_b = read_volume(kbp / "labels" / "openkbp_pt_201.nii.gz").array == 1
        write_volume(np.where(brainstem_b, 300, 0).astype(np.uint16), scan_b, folder / "label300.nii.gz")
        from monailabel.datastore.local import LocalDatastore

        store = LocalDatastore(str(studies), extensions=("*.nii.gz",), auto_reload=False)
        store.save_label(
            "kbp_a", str(folder / "brainstem.nii.gz"), "final", {"label_info": [{"name": "Brainstem", "idx": 1}]}
        )
        app = private_app(folder)
        port, log = free_port(), folder / "server.log"
        conf = {"models": "medlsam", "threads": "1", "adapt_on_save": "false", "infer_timeout": args.infer_timeout}
        process = start_server(app, studies, port, conf, log)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for_server(url, process, timeout=180, log=log)
            requests.post(f"{url}/infer/medlam", params={"image": "kbp_b", "output": "json"}, timeout=600)  # bank
            warm = {"params": json.dumps({"foreground": [[64, 64, 60]]})}  # load SAM once: attacks, not model loads
            requests.post(f"{url}/infer/sam", params={"image": "kbp_a", "output": "json"}, data=warm, timeout=600)
            probe = Probe(url, process.pid)
            ct = studies / "kbp_b.nii.gz"
            rows = [probe.run(name, attack) for name, attack in attacks(url, folder, studies, app, ct)]
            probe.stop.set()
        finally:
            stop_server(process)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    report(rows, args)
    return 0


def report(rows: list[dict], args) -> None:
    import os
    import platform

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"infer_timeout_s": args.infer_timeout, "rows": rows}, indent=1))
    lines = [
        "# Security probe (issues 15 and 26)",
        "",
        "Regenerate from a fresh clone (data in `../shared/data`): "
        "`make setup && .venv/bin/python benchmarks/security.py`.",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores; server at 1 torch thread, "
        f"`--conf infer_timeout {args.infer_timeout:g}`; OpenKBP scans as stored (~4 mm voxels).",
        "",
        "Each attack against a real `monailabel start_server`, while a second client polled `/info/` every 0.1 s and "
        "the server's resident memory was sampled. Targets: `/info/` under 1 s and memory rise under 500 MB during "
        "every attack; no request past its bound.",
        "",
        "| attack | answer | seconds | slowest /info/ (s) | memory rise (MB) |",
        "|---|---|---:|---:|---:|",
    ]
    for row in rows:
        outcome = str(row["outcome"]).replace("|", "\\|")
        lines.append(f"| {row['attack']} | {outcome} | {row['seconds']} | {row['info_max_s']} | {row['rss_rise_mb']} |")
    worst_info = max(r["info_max_s"] for r in rows)
    worst_rss = max(r["rss_rise_mb"] for r in rows)
    lines += ["", f"Slowest `/info/` over all attacks: {worst_info} s; largest memory rise: {worst_rss} MB.", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.35 * len(rows) + 1.5), sharey=True)
    names = [r["attack"] for r in rows]
    axes[0].barh(names, [r["info_max_s"] for r in rows])
    axes[0].axvline(1.0, color="red", linestyle="--")
    axes[0].set_xlabel("slowest /info/ during the attack (s); target < 1")
    axes[1].barh(names, [r["rss_rise_mb"] for r in rows])
    axes[1].axvline(500, color="red", linestyle="--")
    axes[1].set_xlabel("server memory rise (MB); target < 500")
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=90)
    print(f"wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    sys.exit(main())
