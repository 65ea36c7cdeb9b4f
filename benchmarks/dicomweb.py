"""The DICOMweb path, stage by stage: Orthanc start, loading a sample datastore as DICOM CT + SEG, MONAI Label start
on the DICOMweb datastore, the background template-bank build, the first auto-segmentation after start (sent at once,
so it waits for that build), a later one on the same series, a first one on another series, a final label saved as
DICOM SEG (PUT /datastore/label) and the bank rebuild it starts, and OHIF in a real browser (study load, Run to
labelmap shown).

    python benchmarks/dicomweb.py [--templates 3] [--threads 1] [--no-browser]

Writes benchmarks/results/dicomweb.md and .json. Requests are OHIF's (output=image, .nrrd, uint8); the server runs
LiteMedSAM on the prior's boxes (`--conf prior_weight 0.8`: the path that costs encoder time; with the shipped
LiteMedSAM the default is now the prior alone, a few seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "scripts"))

import orthanc  # noqa: E402
from load_dicomweb import load  # noqa: E402

from app_server import free_port, private_app, start_server, stop_server, wait_for_server  # noqa: E402
from common import RESULTS, command_line, machine_line  # noqa: E402

OHIF_PARAMS = {
    "result_extension": ".nrrd",
    "result_dtype": "uint8",
    "result_compress": False,
    "restore_label_idx": False,
}


def infer(api: str, series: str) -> tuple[float, bytes]:
    tic = time.perf_counter()
    answer = requests.post(
        f"{api}/infer/medlsam",
        params={"image": series, "output": "image"},
        data={"params": json.dumps(OHIF_PARAMS)},
        timeout=1800,
    )
    answer.raise_for_status()
    return time.perf_counter() - tic, answer.content


def last_stages(log: Path) -> str:
    lines = [line for line in log.read_text().splitlines() if "medlsam image=" in line and " done in " in line]
    return re.sub(r".*done in ", "", lines[-1]) if lines else ""


def wait_bank(api: str, templates: int, including: str = "", timeout: float = 1800) -> dict:
    """/info/'s template_bank once ready with ``templates`` templates (``including`` this series)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        bank = requests.get(f"{api}/info/", timeout=60).json().get("template_bank", {})
        used = bank.get("templates", [])
        if bank.get("state") == "ready" and len(used) == templates and (not including or including in used):
            return bank
        time.sleep(0.5)
    raise TimeoutError(bank)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("MEDLSAM_DATA", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--templates", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-browser", action="store_true")
    args = parser.parse_args(argv)
    why = orthanc.missing()
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    stages: dict[str, float] = {}
    notes: dict[str, str] = {}
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    tmp = Path(tempfile.mkdtemp(prefix="medlsam-dicomweb-"))
    servers: list = []
    try:
        api, unlabeled = start_all(args, tmp, stages, notes, servers)
        log = tmp / "server.log"
        autosegmentations(api, log, args.templates, unlabeled, stages, notes, tmp / "result.nrrd")
        save_and_rebuild(api, args.templates, unlabeled[1]["series"], tmp / "result.nrrd", stages, notes)
        if not args.no_browser and shutil.which("chromium"):
            ohif(api, unlabeled[0]["study"], tmp / "ohif.png", stages, notes)
    finally:
        for server in servers:
            stop_server(server)
        orthanc.stop(tmp / "orthanc")
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    report = {
        "machine": machine_line(),
        "server_threads": args.threads,
        "templates": args.templates,
        "load_before": load_before,
        "load_after": load_after,
        "command": command_line("benchmarks/dicomweb.py", argv),
        "stages_s": {k: round(v, 2) for k, v in stages.items()},
        "notes": notes,
    }
    write_report(report, stages, notes)
    return 0


def start_all(args, tmp: Path, stages: dict, notes: dict, servers: list) -> tuple[str, list[dict]]:
    """The sample datastore, Orthanc, the datastore loaded into it as DICOM, MONAI Label on it (appended to
    ``servers`` once started); returns the server's URL and the unlabeled series."""
    studies = tmp / "studies"
    script = str(REPO / "scripts" / "make_sample_datastore.py")
    subprocess.run(
        [sys.executable, script, "--data", args.data, "--out", str(studies), "--templates", str(args.templates)]
        + ["--unlabeled", "2"],
        check=True,
    )
    port = free_port()
    tic = time.perf_counter()
    orthanc.start(tmp / "orthanc", port)
    stages["orthanc_start"] = time.perf_counter() - tic
    url = orthanc.dicomweb_url(port)
    tic = time.perf_counter()
    state = load(studies, url, tmp / "loaded.json")
    stages["load_datastore"] = time.perf_counter() - tic
    notes["load_datastore"] = f"{len(state)} CT series ({sum('seg' in e for e in state.values())} with a SEG)"
    unlabeled = [e for e in state.values() if "seg" not in e]
    app = private_app(tmp)
    api_port = free_port()
    api = f"http://127.0.0.1:{api_port}"
    log = tmp / "server.log"
    os.environ["MONAI_LABEL_DICOMWEB_CACHE_PATH"] = str(tmp / "cache")
    conf = {"models": "medlsam", "templates": args.templates, "threads": args.threads, "prior_weight": 0.8}
    conf["adapt_on_save"] = "false"  # a background LiteMedSAM adaptation would disturb the timings
    tic = time.perf_counter()
    server = start_server(app, url, api_port, conf, log)
    servers.append(server)
    wait_for_server(api, server, timeout=300, log=log)
    stages["server_start"] = time.perf_counter() - tic
    return api, unlabeled


def autosegmentations(
    api: str, log: Path, templates: int, unlabeled: list[dict], stages: dict, notes: dict, result: Path
) -> None:
    """The first auto-segmentation after the start (it waits for the bank build), a later one on the same series,
    a first one on another series (its label kept in ``result``)."""
    seconds, _ = infer(api, unlabeled[0]["series"])  # sent at once: waits for the background bank build
    stages["first_autoseg_after_start"] = seconds
    notes["first_autoseg_after_start"] = last_stages(log)
    bank = wait_bank(api, templates)
    stages["bank_build"] = bank["build_s"]
    notes["bank_build"] = f"{len(bank['templates'])} templates, {len(bank['organs'])} organs"
    builds = log.read_text().count("template bank: building from")
    notes["builds"] = f"{builds} bank build(s) in the log (the request waited for the background one)"
    stages["later_autoseg_same_series"], _ = infer(api, unlabeled[0]["series"])
    notes["later_autoseg_same_series"] = last_stages(log)
    stages["first_autoseg_other_series"], label = infer(api, unlabeled[1]["series"])
    notes["first_autoseg_other_series"] = last_stages(log)
    result.write_bytes(label)


def save_and_rebuild(api: str, templates: int, series: str, label: Path, stages: dict, notes: dict) -> None:
    """``label`` saved as the series' final label (DICOM SEG), and the bank rebuild it starts."""
    labels = requests.get(f"{api}/info/", timeout=60).json()["models"]["medlsam"]["labels"]
    info = [{"name": n, "idx": v} for n, v in labels.items()]
    tic = time.perf_counter()
    with open(label, "rb") as handle:
        answer = requests.put(
            f"{api}/datastore/label",
            params={"image": series, "tag": "final"},
            files={"label": ("label.nrrd", handle)},
            data={"params": json.dumps({"label_info": info})},
            timeout=600,
        )
    answer.raise_for_status()
    stages["seg_save"] = time.perf_counter() - tic
    tic = time.perf_counter()
    wait_bank(api, templates, including=series)
    stages["bank_rebuild_after_save"] = time.perf_counter() - tic
    notes["bank_rebuild_after_save"] = (
        f"the saved label is the newest of {templates} templates: 1 built, the others from the cache"
    )


def ohif(api: str, study: str, screenshot: Path, stages: dict, notes: dict) -> None:
    """OHIF in headless Chromium: the study loaded, Run to the labelmap shown."""
    from ohif_driver import run_ohif_autosegmentation
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        shown = run_ohif_autosegmentation(p, shutil.which("chromium"), api, study, screenshot)
    stages["ohif_study_load"] = shown["seconds"]["study_loaded"]
    stages["ohif_run_to_labelmap"] = shown["seconds"]["autosegmentation"]
    notes["ohif_run_to_labelmap"] = "series seen before: cached embeddings"


def write_report(report: dict, stages: dict, notes: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dicomweb.json").write_text(json.dumps(report, indent=2))
    rows = "\n".join(f"| {k.replace('_', ' ')} | {v:.1f} | {notes.get(k, '')} |" for k, v in stages.items())
    threads, templates = report["server_threads"], report["templates"]
    (RESULTS / "dicomweb.md").write_text(
        f"""# The DICOMweb path (Orthanc + MONAI Label + OHIF), stage by stage

Machine: {report["machine"]}; server `--conf threads {threads}`; load average before {" ".join(report["load_before"])},
after {" ".join(report["load_after"])} (the machine is shared: other jobs ran meanwhile).
Command: `{report["command"]}` (sample datastore: {templates} OpenKBP train templates with final labels stored
as DICOM SEG + 2 validation scans; OHIF's requests: `output=image`, `.nrrd`, uint8, `--conf prior_weight 0.8`).

| stage | seconds | notes |
|---|---|---|
{rows}

{notes.get("builds", "")}. The first auto-segmentation after a start is sent as soon as `/info/` answers: it waits
for the bank build the server started in the background, so it costs about the bank build plus one inference; a
later one on the same series reuses the cached slice embeddings; a first one on another series downloads and converts
the series and encodes its slices.
"""
    )
    print((RESULTS / "dicomweb.md").read_text())


if __name__ == "__main__":
    sys.exit(main())
