"""Segmentation benchmark on the OpenKBP validation split (protocol: ../shared/docs/evaluation.md).

Per organ Dice and HD95 (a missed organ counts Dice 0 and is never dropped; its HD95 is reported missing)
for the MedLSAM pipeline with MedLAM boxes (WPL and SPL), and with ground-truth prompts: the organ's 3D box
on every slice (WPL) and each slice's own box. Also the time of one scan split by stage and the encoder
calls against the reference approach (one encoder call per organ per slice). Writes
benchmarks/results/segmentation.md, .json and .png.

    python benchmarks/segmentation.py [--model CKPT] [--cases N] [--backend lite_medsam] [--threads 1]

The four rows of one scan share one slice-embedding cache (same window, same crops); the timing split and
the encoder calls are those of the first row (MedLAM WPL), which starts from an empty cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ORGANS, RESULTS, OpenKBP, machine_line, mean_std, template_bank  # noqa: E402

from medlsam.localize import Localizer, LocalizeOptions, OrganLocation  # noqa: E402
from medlsam.metrics import cranio_caudal_axis, dice, hd95, label_box  # noqa: E402
from medlsam.network import load_medlam  # noqa: E402
from medlsam.paths import default_medlam_path  # noqa: E402
from medlsam.pipeline import MedLSAMPipeline, SegmentOptions, write_segmentation  # noqa: E402
from medlsam.sam import build_segmenter  # noqa: E402
from medlsam.sam.slices import SliceEmbeddings  # noqa: E402
from medlsam.volume import load_ct, read_volume  # noqa: E402

ROWS = ["MedLAM boxes, WPL", "MedLAM boxes, SPL", "ground-truth 3D box (WPL)", "ground-truth box of every slice"]
STAGES = ["load", "localize", "encode", "decode", "assemble", "write"]


def truth_locations(label: np.ndarray, contoured: list[str], values: dict[str, int], axis: int,
                    per_slice: bool) -> dict[str, OrganLocation]:
    """Ground-truth prompts: the organ's 3D box, and (per_slice) one 'slab' per slice with that slice's box."""
    out = {}
    for organ in ORGANS:
        if organ not in contoured:
            continue
        mask = label == values[organ]
        box = label_box(mask)
        if box is None:
            continue
        loc = OrganLocation(organ, values[organ], True, box_voxel=[box[0].tolist(), box[1].tolist()], score=1.0)
        if per_slice:
            for k in range(int(box[0][axis]), int(box[1][axis]) + 1):
                sl = label_box(np.take(mask, k, axis=axis))
                if sl is None:
                    continue
                lo, hi = [0, 0, 0], [0, 0, 0]
                inplane = [a for a in range(3) if a != axis]
                for d, a in enumerate(inplane):
                    lo[a], hi[a] = int(sl[0][d]), int(sl[1][d])
                lo[axis] = hi[axis] = k
                loc.slabs.append({"box_voxel": [lo, hi]})
        out[organ] = loc
    return out


def score(pred: np.ndarray, label: np.ndarray, contoured: list[str], values: dict[str, int], spacing) -> dict:
    rows = {}
    for organ in ORGANS:
        if organ not in contoured:
            continue
        truth = label == values[organ]
        if not truth.any():
            continue
        mask = pred == values[organ]
        rows[organ] = {"dice": dice(mask, truth), "hd95": hd95(mask, truth, spacing) if mask.any() else None,
                       "missed": not mask.any()}
    return rows


def run(data: OpenKBP, model, segmenter, cases: list[dict], bank, options: SegmentOptions) -> dict:
    pipelines = {mode: MedLSAMPipeline(Localizer(model, bank, LocalizeOptions(mode=mode)), segmenter,
                                       SegmentOptions(**{**options.__dict__, "mode": mode})) for mode in ("wpl", "spl")}
    results: dict = {row: {} for row in ROWS}
    results["timings"], results["encoder_calls"] = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for case in cases:
            cid = case["id"]
            tic = time.perf_counter()
            volume = load_ct(data.image(cid))
            load_s = time.perf_counter() - tic
            label = read_volume(data.label(cid)).array  # scoring only
            axis = cranio_caudal_axis(volume.affine)
            embeddings = SliceEmbeddings(segmenter, volume, window=options.window)
            outputs = {}
            result = pipelines["wpl"].segment(volume, embeddings=embeddings)
            write_segmentation(result, volume, Path(scratch) / "label.nii.gz")
            results["timings"][cid] = {"load": load_s, **result.timings_s}
            results["encoder_calls"][cid] = {"encoder_calls": result.encoder_calls,
                                             "reference_encoder_calls": result.reference_encoder_calls}
            outputs[ROWS[0]] = result
            outputs[ROWS[1]] = pipelines["spl"].segment(volume, embeddings=embeddings)
            outputs[ROWS[2]] = pipelines["wpl"].segment_locations(
                volume, truth_locations(label, case["contoured"], data.values, axis, False), embeddings=embeddings)
            outputs[ROWS[3]] = pipelines["spl"].segment_locations(
                volume, truth_locations(label, case["contoured"], data.values, axis, True), embeddings=embeddings)
            for row, out in outputs.items():
                results[row][cid] = {"organs": score(out.label, label, case["contoured"], data.values, volume.spacing),
                                     "encoder_calls": out.encoder_calls}
            total = sum(results["timings"][cid][s] for s in STAGES if s in results["timings"][cid])
            line = ", ".join(f"{row.split(',')[0].split(' (')[0]} {np.mean([o['dice'] for o in results[row][cid]['organs'].values()]):.3f}"
                             for row in ROWS[:1] + ROWS[2:3])
            print(f"{cid}: mean Dice {line}; WPL scan {total:.1f} s, {result.encoder_calls} encoder calls "
                  f"(reference {result.reference_encoder_calls})", flush=True)
    return results


def summarise(per_case: dict) -> dict:
    out = {"organs": {}}
    for organ in ORGANS:
        rows = [c["organs"][organ] for c in per_case.values() if organ in c["organs"]]
        if rows:
            out["organs"][organ] = {"n": len(rows), "missed": sum(r["missed"] for r in rows),
                                    "dice": [r["dice"] for r in rows],
                                    "hd95": [r["hd95"] for r in rows if r["hd95"] is not None]}
    means = [np.mean(o["dice"]) for o in out["organs"].values()]
    hds = [np.mean(o["hd95"]) for o in out["organs"].values() if o["hd95"]]
    out.update(dice=float(np.mean(means)), dice_std=float(np.std(means)), hd95=float(np.mean(hds)) if hds else None,
               missed=sum(o["missed"] for o in out["organs"].values()))
    return out


def write_report(results: dict, summaries: dict, model_path: Path, templates: list[str], n_cases: int,
                 options: SegmentOptions, backend: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    timings = results["timings"]
    median = {s: float(np.median([t.get(s, 0.0) for t in timings.values()])) for s in STAGES}
    total = float(np.median([sum(t.get(s, 0.0) for s in STAGES) for t in timings.values()]))
    calls = results["encoder_calls"]
    enc = float(np.median([c["encoder_calls"] for c in calls.values()]))
    ref = float(np.median([c["reference_encoder_calls"] for c in calls.values()]))
    lines = [
        "# Segmentation benchmark (OpenKBP validation split)", "",
        f"- Scans: {n_cases} validation cases; templates: {', '.join(templates)} (as the localisation benchmark); "
        "only contoured organs are scored.",
        f"- MedLAM model: `{model_path}`; segmenter: `{backend}`; options: `{options}`; machine: {machine_line()}.",
        "- Dice: 3D on the scan's own grid, a missed organ (not found, empty mask) counts 0; HD95 in mm over the "
        "organs segmented (misses listed separately). Mean over scans per organ, then over organs (± std over organs).",
        f"- Command: `python benchmarks/segmentation.py --model {model_path.name}" + (f" --cases {n_cases}`" if n_cases < 33 else "`"),
        "", "| prompts | mean Dice | mean HD95 mm | missed | " + " | ".join(ORGANS) + " |",
        "|---|---|---|---|" + "---|" * len(ORGANS)]
    for row, s in summaries.items():
        cells = [f"{np.mean(s['organs'][o]['dice']):.3f}" if o in s["organs"] else "n/a" for o in ORGANS]
        hd = f"{s['hd95']:.1f}" if s["hd95"] is not None else "n/a"
        lines.append(f"| {row} | {s['dice']:.3f} ± {s['dice_std']:.3f} | {hd} | {s['missed']} | " + " | ".join(cells) + " |")
    lines += ["", "## Per organ, MedLAM boxes", "", "| organ | scans | WPL Dice | WPL HD95 mm | WPL missed | SPL Dice | "
              "SPL HD95 mm | SPL missed |", "|---|---|---|---|---|---|---|---|"]
    for organ in ORGANS:
        w, p = summaries[ROWS[0]]["organs"].get(organ), summaries[ROWS[1]]["organs"].get(organ)
        if w and p:
            lines.append(f"| {organ} | {w['n']} | {mean_std(w['dice'])} | {mean_std(w['hd95'])} | {w['missed']} | "
                         f"{mean_std(p['dice'])} | {mean_std(p['hd95'])} | {p['missed']} |")
    lines += ["", "## Time of one scan (MedLAM WPL, median over scans, seconds)", "",
              "| " + " | ".join(STAGES) + " | total |", "|" + "---|" * (len(STAGES) + 1),
              "| " + " | ".join(f"{median[s]:.2f}" for s in STAGES) + f" | {total:.1f} |", "",
              f"Encoder calls per scan (median): {enc:.0f}, against {ref:.0f} for the reference approach "
              f"(one encoder call per organ per slice): {ref / max(enc, 1):.1f}x fewer.", "",
              "![Dice per organ](segmentation.png)", ""]
    (RESULTS / "segmentation.md").write_text("\n".join(lines))
    (RESULTS / "segmentation.json").write_text(json.dumps({"summaries": summaries, "raw": results}, indent=1, default=float))
    plot(summaries, median)


def plot(summaries: dict, median: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(15, 5), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / len(summaries)
    for i, (name, s) in enumerate(summaries.items()):
        values = [np.mean(s["organs"][o]["dice"]) if o in s["organs"] else 0 for o in ORGANS]
        axes[0].bar(np.arange(len(ORGANS)) + i * width, values, width, label=f"{name} ({s['dice']:.3f})")
    axes[0].set_xticks(np.arange(len(ORGANS)) + 0.4 - width / 2, ORGANS, rotation=30)
    axes[0].set_ylabel("Dice (missed = 0)")
    axes[0].set_ylim(0, 1)
    axes[0].legend(fontsize=8)
    bottom = 0.0
    for stage in STAGES:
        axes[1].bar([0], [median[stage]], bottom=bottom, label=stage)
        bottom += median[stage]
    axes[1].set_xticks([0], ["one scan (median)"])
    axes[1].set_ylabel("seconds")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "segmentation.png", dpi=90)


def _option(item: str) -> tuple[str, object]:
    key, _, value = item.partition("=")
    default = SegmentOptions.__dataclass_fields__[key].default
    if isinstance(default, bool):
        return key, value.lower() in ("1", "true", "yes", "on")
    if isinstance(default, tuple):
        return key, tuple(float(v) for v in value.split(","))
    return key, type(default)(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="MedLAM checkpoint (default: the shipped model)")
    parser.add_argument("--data", type=Path, help="openkbp folder (default: $MEDLSAM_DATA/openkbp)")
    parser.add_argument("--cases", type=int, default=0, help="only the first N validation cases")
    parser.add_argument("--backend", default="lite_medsam")
    parser.add_argument("--checkpoint", help="segmenter weights (SAM/MedSAM backends)")
    parser.add_argument("--bank", type=Path, help="template bank file: reused if it exists (same model), else saved there")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a SegmentOptions field, e.g. --set empty_fallback=false --set zoom_below_mm=30")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = OpenKBP(args.data)
    model_path = args.model or default_medlam_path()
    model = load_medlam(model_path)
    segmenter = build_segmenter(args.backend, args.checkpoint)
    cases = data.split("validation")[: args.cases or None]
    templates = data.templates(5)
    options = SegmentOptions(**dict(_option(item) for item in args.set))
    results = run(data, model, segmenter, cases, template_bank(data, model, templates, args.bank), options)
    summaries = {row: summarise(results[row]) for row in ROWS}
    write_report(results, summaries, Path(model_path), templates, len(cases), options, args.backend)
    print((RESULTS / "segmentation.md").read_text())


if __name__ == "__main__":
    main()
