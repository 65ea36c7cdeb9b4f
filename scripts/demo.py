"""Ask a running MedLSAM Label server for an automatic segmentation, the way 3D Slicer does, and write the
label file, the result JSON and a QC PNG.

    python scripts/demo.py [--server http://127.0.0.1:8000] [--image ID] [--model medlsam]
                           [--organs Brainstem,Mandible] [--out runs/demo]

Without --image the first unlabeled image of the datastore is used. After a server start the template bank is built
first (minutes): the demo prints its progress from the server's /info/ (``template_bank``) until it is ready, then
asks. Like Slicer, the request is multipart (result_extension .nrrd, result_dtype uint8) through
monailabel.client.MONAILabelClient; the scan itself is downloaded from /datastore/image for the QC picture.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import requests


def bank_line(bank: dict) -> str:
    """One line for the template bank's state as /info/ reports it (``template_bank``)."""
    state = bank.get("state", "?")
    if state == "building" and bank.get("step"):
        return f"template bank: {bank.get('built')} of {bank.get('of')} templates built; {bank['step']}"
    if state == "building":
        last = f" (last: {bank['last']})" if bank.get("last") else ""
        return f"template bank: built {bank.get('built', 0)} of {bank.get('of', '?')} templates{last}"
    if state == "ready":
        organs, seconds = len(bank.get("organs", [])), bank.get("build_s")
        took = f" in {seconds:.0f} s" if isinstance(seconds, (int, float)) else ""
        return f"template bank ready: {len(bank.get('templates', []))} template(s), {organs} organ(s){took}"
    if state == "failed":
        return f"template bank failed: {bank.get('error', 'no reason given')}"
    if state == "not built":
        return "template bank: not started yet (the server loads MedLAM first)"
    return f"template bank: {state}"


def wait_for_bank(server: str, poll_s: float = 2.0, start_s: float = 60.0) -> None:
    """Print the template bank's progress (from /info/) while the server builds it; return once it is built, has
    failed or has no templates (the request then says why). A bank not started within start_s is not waited for."""
    tic, last = time.monotonic(), None
    while True:
        bank = requests.get(f"{server}/info/", timeout=30).json().get("template_bank")
        if not bank:  # a server without template banks
            return
        line = bank_line(bank)
        if line != last:
            print(f"[{time.monotonic() - tic:5.0f} s] {line}", flush=True)
            last = line
        state = bank.get("state")
        if state != "building" and (state != "not built" or time.monotonic() - tic > start_s):
            return
        time.sleep(poll_s)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default="http://127.0.0.1:8000")
    parser.add_argument("--image", help="image id (default: the first unlabeled image)")
    parser.add_argument("--model", default="medlsam", help="medlsam (segmentation) or medlam (boxes only)")
    parser.add_argument("--organs", help="comma-separated organ names (default: all in the template bank)")
    parser.add_argument("--out", default="runs/demo")
    args = parser.parse_args(argv)

    server = args.server.rstrip("/")
    objects, why = datastore_objects(server, args.model)
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    image = args.image or next((k for k, v in sorted(objects.items()) if not v.get("labels", {}).get("final")), None)
    if image is None:
        print("error: no unlabeled image in the datastore; pass --image", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="medlsam-demo-"))
    try:
        return ask(server, args, image, objects, out, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def datastore_objects(server: str, model: str) -> tuple[dict, str]:
    """The server's datastore objects, or why the demo cannot ask it (no server there, no such model)."""
    try:
        info = requests.get(f"{server}/info/", timeout=30).json()
    except requests.RequestException as exc:
        return {}, (
            f"no MONAI Label server at {server} ({type(exc).__name__}); start one with `make serve` "
            "(make demo asks the same PORT: after `PORT=8001 make serve`, run `PORT=8001 make demo`)"
        )
    if model not in info.get("models", {}):
        return {}, f"the server has no model {model!r}; it has {sorted(info.get('models', {}))}"
    datastore = requests.get(f"{server}/datastore/?output=all", timeout=30).json()
    return datastore.get("objects", {}), ""


def ask(server: str, args, image: str, objects: dict, out: Path, tmp: Path) -> int:
    """Wait for the template bank, ask as Slicer does, write the label, the result JSON and the QC picture."""
    from monailabel.client import MONAILabelClient
    from monailabel.client.client import MONAILabelClientException

    client = MONAILabelClient(server, tmpdir=str(tmp))
    params = {"result_extension": ".nrrd", "result_dtype": "uint8"}  # what Slicer sends
    if args.organs:
        params["organs"] = [o.strip() for o in args.organs.split(",") if o.strip()]
    try:
        wait_for_bank(server)
    except requests.RequestException as exc:
        print(f"error: the server at {server} stopped answering ({type(exc).__name__})", file=sys.stderr)
        return 2
    print(
        f"{args.model} on {image} at {server} ... (the first request loads the segmenter: seconds to a minute; "
        "later ones take seconds)",
        flush=True,
    )
    tic = time.perf_counter()
    try:
        result_file, result = client.infer(args.model, image, params)
    except MONAILabelClientException as exc:
        print(f"error: the server refused: {exc.msg}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - tic
    label_path = out / f"{image}_{args.model}.nrrd"
    shutil.move(result_file, label_path)
    (out / f"{image}_{args.model}.json").write_text(json.dumps(result, indent=2))
    qc = qc_picture(server, image, objects, label_path, result, out / f"{image}_{args.model}.png", tmp)
    summary(result, elapsed, label_path, out / f"{image}_{args.model}.json", qc)
    return 0


def qc_picture(server: str, image: str, objects: dict, label_path: Path, result: dict, png: Path, tmp: Path) -> Path:
    """The scan, downloaded as Slicer does, with the label over it (``medlsam.segment.qc``)."""
    response = requests.get(f"{server}/datastore/image", params={"image": image}, timeout=120)
    response.raise_for_status()
    name = objects.get(image, {}).get("image", {}).get("info", {}).get("name") or f"{image}.nii.gz"
    scan = tmp / name
    scan.write_bytes(response.content)

    from medlsam.io.volume import load_ct, read_volume
    from medlsam.segment.qc import qc_montage

    return qc_montage(load_ct(scan), read_volume(label_path).array, result.get("label_names", {}), png)


def summary(result: dict, elapsed: float, label_path: Path, result_path: Path, qc: Path) -> None:
    """What was found, with which templates, MedLAM and segmenter, the server's time by stage, the files."""
    found = [n for n, b in result.get("boxes", {}).items() if b.get("found")]
    print(f"done in {elapsed:.1f} s: {len(found)} organ(s) found {found}, not found {result.get('not_found', [])}")
    medlam = result.get("medlam") or {}
    print(
        f"templates: {', '.join(result.get('templates', [])) or 'none reported'}; MedLAM {medlam.get('path', '?')} "
        f"(fingerprint {medlam.get('fingerprint', '?')}); segmenter {result.get('backend', 'none')}"
    )
    timings = ", ".join(f"{k} {v:.1f} s" for k, v in (result.get("timings_s") or {}).items())
    if timings:
        print(f"server time by stage: {timings}")
    print(f"label  {label_path.resolve()}\nresult {result_path.resolve()}\nQC     {qc.resolve()}")


if __name__ == "__main__":
    sys.exit(main())
