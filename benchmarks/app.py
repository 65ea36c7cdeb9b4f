"""MONAI Label app benchmark: latencies through the real server, its peak memory, and interactive 3D Dice
against the number of simulated clicks.

    python benchmarks/app.py [--templates 3] [--images 3] [--repeats 5] [--dice-cases 10] [--clicks 1,3,5]
                             [--threads 2] [--tiny] [--dice-only]

1. Builds the sample datastore (scripts/make_sample_datastore.py: OpenKBP train templates with final labels,
   validation scans unlabeled) in a temporary folder, starts `monailabel start_server` on a private copy of
   apps/medlsam (apps/medlsam/model is never written) and drives it over HTTP as Slicer does (multipart,
   .nrrd, uint8). Median latencies: medlsam on each unlabeled scan (the first call, which builds the
   template bank, reported apart), medlam, sam first click (a slice not encoded yet) and later clicks
   (same slice), sam_3d. Peak memory: the server's resident high-water mark (VmHWM).
2. Interactive 3D (library, same code as the sam_3d task): on OpenKBP validation organs, the first click
   at the organ's centre on its middle slice, each later click at the most interior voxel of the largest
   error (foreground if missed, background if spurious); Dice after 1, 3 and 5 clicks.

Writes benchmarks/results/app.md, .png and .json. --tiny: 1 template, 1 image, 1 repeat, 1 case, 2 organs (also
for medlsam), clicks 1,2, at most 3 slices per direction (checks the script, not the numbers). --dice-only: part 2
only (no server).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "scripts"))

from app_server import free_port, private_app, start_server, stop_server, wait_for_server  # noqa: E402
from common import ORGANS, RESULTS, OpenKBP, command_line, machine_line  # noqa: E402
from medlsam.interact.click_simulator import error_click, organ_centre_click  # noqa: E402
from medlsam.utils.metrics import dice  # noqa: E402


def post(url: str, model: str, image: str, params: dict) -> tuple[float, dict]:
    tic = time.perf_counter()
    response = requests.post(f"{url}/infer/{model}?image={image}", data={"params": json.dumps(params)}, timeout=3600)
    elapsed = time.perf_counter() - tic
    if response.status_code != 200:
        raise RuntimeError(f"{model} on {image}: HTTP {response.status_code} {response.text[:300]}")
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    result = {}
    for part in MultipartDecoder(response.content, response.headers["content-type"]).parts:
        if b'name="params"' in part.headers[b"Content-Disposition"]:
            result = json.loads(part.content)
    return elapsed, result


def peak_memory_mb(pid: int) -> float:
    """VmHWM (peak resident set) of the server process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def interactive_dice(kbp: OpenKBP, cases: list[dict], organs: list[str], clicks: list[int], max_slices: int) -> dict:
    from medlsam.interact.interactive import parse_prompts
    from medlsam.interact.propagation import PropagationOptions, segment_volume
    from medlsam.io.volume import load_ct, read_volume
    from medlsam.segment.sam import build_segmenter
    from medlsam.segment.sam.slices import SliceEmbeddings

    segmenter = build_segmenter("lite_medsam")
    rows = []
    for case in cases:
        volume = load_ct(kbp.image(case["id"]))
        label = read_volume(kbp.label(case["id"])).array
        embeddings = SliceEmbeddings(segmenter, volume)
        for organ in organs:
            if organ not in case["contoured"]:
                continue
            truth = label == kbp.values[organ]
            if not truth.any():
                continue
            fg, bg = [organ_centre_click(truth, embeddings.axis)], []
            scores = {}
            for n in range(1, max(clicks) + 1):
                tic = time.perf_counter()
                result = segment_volume(
                    embeddings, parse_prompts(volume.shape, fg, bg or None), PropagationOptions(max_slices=max_slices)
                )
                if n in clicks:
                    scores[n] = (dice(result.mask, truth), time.perf_counter() - tic)
                nxt = error_click(result.mask, truth)
                if nxt is None:
                    for m in clicks:
                        if m > n:
                            scores[m] = scores[n]
                    break
                (fg if nxt[1] else bg).append(nxt[0])
            rows.append(
                {
                    "case": case["id"],
                    "organ": organ,
                    **{f"dice_{n}": round(scores[n][0], 4) for n in scores},
                    **{f"time_{n}": round(scores[n][1], 2) for n in scores},
                }
            )
            print(
                f"  {case['id']} {organ}: " + ", ".join(f"{n} click(s) {scores[n][0]:.3f}" for n in sorted(scores)),
                flush=True,
            )
        embeddings.clear()
    return {"rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--templates", type=int, default=3)
    parser.add_argument("--images", type=int, default=3, help="unlabeled validation scans in the datastore")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dice-cases", type=int, default=10)
    parser.add_argument("--organs", default=",".join(ORGANS))
    parser.add_argument("--clicks", default="1,3,5")
    parser.add_argument("--max-slices", type=int, default=0, help="sam_3d propagation limit per direction")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server and of part 2")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--dice-only", action="store_true", help="part 2 only (no server, no latencies)")
    parser.add_argument("--out", default=str(RESULTS / "app"))
    args = parser.parse_args(argv)
    args.command = command_line("benchmarks/app.py", argv)
    if args.tiny:
        args.templates, args.images, args.repeats, args.dice_cases = 1, 1, 1, 1
        args.organs, args.clicks, args.max_slices = "Brainstem,LeftParotid", "1,2", 3
    torch.set_num_threads(args.threads)
    clicks = [int(c) for c in args.clicks.split(",")]
    organs = [o.strip() for o in args.organs.split(",") if o.strip()]
    kbp = OpenKBP()
    lat: dict[str, list[float]] = {
        k: [] for k in ("medlsam_first", "medlsam", "medlam", "sam_first", "sam_later", "sam_3d")
    }
    details, memory = {}, float("nan")
    if not args.dice_only:
        memory = server_part(args, kbp, organs, lat, details)
    print("interactive 3D Dice ...", flush=True)
    cases = kbp.split("validation")[: args.dice_cases]
    dice_rows = interactive_dice(kbp, cases, organs, clicks, args.max_slices)["rows"]
    write_report(Path(args.out), args, lat, memory, details, dice_rows, clicks, organs)
    return 0


def server_part(args, kbp: OpenKBP, organs: list[str], lat: dict[str, list[float]], details: dict) -> float:
    """Part 1: latencies through a real server on a sample datastore; returns the server's peak memory (MB)."""
    work = Path(tempfile.mkdtemp(prefix="medlsam-app-bench-"))
    studies = work / "studies"
    unlabeled = sample_datastore(kbp, studies, args.templates, args.images)
    app = private_app(work)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = work / "server.log"
    server = start_server(
        app, studies, port, {"models": "medlsam", "threads": args.threads, "adapt_on_save": "false"}, log
    )
    try:
        wait_for_server(url, server, log=log)
        time_medlsam(url, unlabeled, args, organs, lat, details)
        for _ in range(args.repeats):
            lat["medlam"].append(post(url, "medlam", unlabeled[0], {})[0])
        image = unlabeled[-1]
        from medlsam.io.volume import read_volume

        truth = read_volume(kbp.label(image)).array
        time_clicks(url, image, truth, kbp, args.repeats, lat)
        time_sam_3d(url, image, truth, kbp, args, organs, lat, details)
        memory = peak_memory_mb(server.pid)
    finally:
        stop_server(server)
        shutil.rmtree(work, ignore_errors=True)
    return memory


def sample_datastore(kbp: OpenKBP, studies: Path, templates: int, images: int) -> list[str]:
    """scripts/make_sample_datastore.py into ``studies``; returns its unlabeled images' ids."""
    script = str(HERE.parent / "scripts" / "make_sample_datastore.py")
    subprocess.run(
        [sys.executable, script, "--data", str(kbp.root.parent), "--out", str(studies)]
        + ["--templates", str(templates), "--unlabeled", str(images)],
        check=True,
    )
    meta = json.loads((studies / "datastore_v2.json").read_text())["objects"]
    return sorted(k for k, v in meta.items() if not v["labels"].get("final"))


def time_medlsam(url: str, unlabeled: list[str], args, organs: list[str], lat: dict, details: dict) -> None:
    """medlsam on each unlabeled image (the first call apart); with one image, the same image again."""
    for n, image in enumerate(unlabeled):
        params = {"result_extension": ".nrrd", "result_dtype": "uint8"}
        if args.tiny:
            params["organs"] = organs
        elapsed, result = post(url, "medlsam", image, params)
        lat["medlsam_first" if n == 0 else "medlsam"].append(elapsed)
        details.setdefault("medlsam", []).append(
            {
                "image": image,
                "s": round(elapsed, 2),
                "timings_s": result.get("timings_s"),
                "encoder_calls": result.get("encoder_calls"),
                "not_found": result.get("not_found"),
            }
        )
        print(f"medlsam {image}: {elapsed:.1f} s", flush=True)
    if len(unlabeled) == 1:  # the repeat reuses the cached embeddings: localisation + decoder only
        elapsed, _ = post(url, "medlsam", unlabeled[0], {"organs": organs} if args.tiny else {})
        lat["medlsam"].append(elapsed)


def time_clicks(url: str, image: str, truth: np.ndarray, kbp: OpenKBP, repeats: int, lat: dict) -> None:
    """sam: a fresh slice per repeat (first click encodes it), then later clicks on the same slice."""
    brain = truth == kbp.values["Brainstem"]
    mandible = truth == kbp.values["Mandible"]
    organ = mandible if mandible.any() else brain
    ks = np.nonzero(organ.any(axis=(0, 1)))[0]
    for r in range(repeats):
        k = int(ks[(r * 3) % len(ks)])
        plane = organ[:, :, k]
        i, j = np.argwhere(plane)[len(np.argwhere(plane)) // 2]
        lat["sam_first"].append(post(url, "sam", image, {"foreground": [[int(i), int(j), k]]})[0])
        for extra in range(2):
            lat["sam_later"].append(
                post(url, "sam", image, {"foreground": [[int(i), int(j), k]], "background": [[2 + extra, 2, k]]})[0]
            )


def time_sam_3d(url: str, image: str, truth: np.ndarray, kbp: OpenKBP, args, organs, lat: dict, details: dict):
    """sam_3d: one click at an organ's centre per repeat, the organs in turn."""
    for r in range(args.repeats):
        target = [o for o in organs if (truth == kbp.values[o]).any()][r % max(1, len(organs))]
        click = organ_centre_click(truth == kbp.values[target], 2)
        elapsed, result = post(url, "sam_3d", image, {"foreground": [click], "max_slices": args.max_slices})
        lat["sam_3d"].append(elapsed)
        details.setdefault("sam_3d", []).append(
            {
                "organ": target,
                "s": round(elapsed, 2),
                "encoder_calls": result.get("encoder_calls"),
                "slices": result.get("slices"),
            }
        )


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}" if values else "n/a"


def write_report(out: Path, args, lat, memory, details, rows, clicks, organs) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    names = {
        "medlsam_first": "medlsam, first call (loads models, builds the template bank)",
        "medlsam": "medlsam, each further image (with one image: the same image again, slices cached)",
        "medlam": "medlam (localisation only)",
        "sam_first": "sam, first click on a slice (encoder + decoder)",
        "sam_later": "sam, later clicks (decoder)",
        "sam_3d": "sam_3d, one click (propagation)",
    }
    lines = [
        "# MONAI Label app benchmark",
        "",
        f"Machine: {machine_line()}; load average at the end {os.getloadavg()[0]:.1f}. Server: `monailabel "
        f"start_server` with `--conf threads {args.threads}`, LiteMedSAM, shipped MedLAM, {args.templates} "
        f"template(s) from the OpenKBP train split, {args.images} unlabeled validation scan(s); requests as Slicer "
        "(multipart, .nrrd, uint8)." + (" **--tiny run: checks the script, not the numbers.**" if args.tiny else ""),
        "",
        f"Command (from the clone's root, data in `../shared/data`): `{args.command}`",
        "",
        "| request | median s | n |",
        "|---|---|---|",
    ]
    lines += [f"| {names[k]} | {_median(v)} | {len(v)} |" for k, v in lat.items()]
    lines += [
        "",
        f"Server peak resident memory (VmHWM): {memory:.0f} MB.",
        "",
        "Targets: later click < 0.5 s, medlam < 3 s.",
        "",
        "## Interactive 3D: Dice vs simulated clicks (sam_3d algorithm, OpenKBP validation)",
        "",
        "First click at the organ's centre on its middle slice; each later click at the most interior voxel "
        "of the largest 3D error (foreground when missed, background when spurious). "
        f"Propagation limit per direction: {args.max_slices or 'none'}.",
        "",
        "| organ | n | " + " | ".join(f"Dice {c} click(s)" for c in clicks) + " |",
        "|---|---|" + "---|" * len(clicks),
    ]
    for organ in organs + ["all"]:
        sel = [r for r in rows if organ in ("all", r["organ"])]
        if sel:
            lines.append(
                f"| {organ} | {len(sel)} | "
                + " | ".join(f"{np.mean([r[f'dice_{c}'] for r in sel]):.3f}" for c in clicks)
                + " |"
            )
    lines += ["", "Raw: per-request details and per-organ rows in app.json."]
    (out.with_suffix(".md")).write_text("\n".join(lines) + "\n")
    (out.with_suffix(".json")).write_text(
        json.dumps({"latencies_s": lat, "peak_memory_mb": memory, "details": details, "dice": rows}, indent=2)
    )
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    keys = [k for k, v in lat.items() if v]
    axes[0].barh(
        [names[k].split(",")[0] + ("" if "," not in names[k] else "," + names[k].split(",")[1][:18]) for k in keys],
        [statistics.median(lat[k]) for k in keys],
        color="tab:blue",
    )
    axes[0].set_xscale("log")
    axes[0].set_xlabel("median latency (s, log)")
    for organ in organs:
        sel = [r for r in rows if r["organ"] == organ]
        if sel:
            axes[1].plot(clicks, [np.mean([r[f"dice_{c}"] for r in sel]) for c in clicks], marker="o", label=organ)
    axes[1].set_xlabel("clicks")
    axes[1].set_ylabel("Dice")
    axes[1].set_xticks(clicks)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=90)
    plt.close(fig)
    print(f"wrote {out.with_suffix('.md')} and .png")


if __name__ == "__main__":
    sys.exit(main())
