"""Learning curve of ``medlsam learn``: the learnt network, the few-shot template prior and the per-organ choice
against the number of saved labels.

For N in --sizes, the first N train scans of one fixed shuffle (seed 0; nested sets) are the saved labels; the
learner trains on them as ``medlsam learn`` does (its own hold-out, its own choice) and the 33 validation scans are
segmented three ways: the few-shot path (the template prior of the N labels, calibrated as the bank would be), the
learnt network (its prior channels from the same bank) and the per-organ choice. Dice and HD95 per organ on each
scan's own grid, organs not contoured skipped (evaluation protocol), training minutes, inference seconds per scan,
and the learner's held-out estimate beside the validation figure. Each N is saved as it finishes
(results/learning.json), so a later run adds sizes: ``--sizes 40,80`` keeps the sizes already there.

    python benchmarks/learning.py [--sizes 3,5,10,20] [--time-limit-min 25] [--cases 33] [--threads 2]

One-template banks, priors and models go to runs/learning/ (reused when present).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ORGANS, RESULTS, OpenKBP, command_line, machine_line  # noqa: E402
from medlsam.atlas.templates import merge_banks  # noqa: E402
from medlsam.io.volume import load_ct, read_volume  # noqa: E402
from medlsam.learn import fewshot  # noqa: E402
from medlsam.learn.model import LearnedModel, load_learned  # noqa: E402
from medlsam.learn.options import LearnOptions  # noqa: E402
from medlsam.learn.predict import learned_probabilities, to_label  # noqa: E402
from medlsam.learn.trainer import learn  # noqa: E402
from medlsam.medlam.network import load_medlam  # noqa: E402
from medlsam.paths import default_medlam_path  # noqa: E402
from medlsam.utils.atomic import write_json_atomic  # noqa: E402
from medlsam.utils.metrics import dice, hd95  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "learning"
PATHS = ("fewshot", "learned", "choice")


def label_order(data: OpenKBP) -> list[str]:
    """The train scans in the one fixed shuffle (seed 0): the first N are the saved labels at size N."""
    train = [c["id"] for c in data.split("train")]
    return [train[i] for i in np.random.default_rng(0).permutation(len(train))]


def trained(data: OpenKBP, cases: list[str], options: LearnOptions, medlam) -> tuple[LearnedModel, float]:
    """The model of these labels (runs/learning/model-N.pt when there), and its training minutes."""
    path = WORK / f"model-{len(cases)}.pt"
    if path.is_file():
        model = load_learned(path)
        if [Path(s).name for s in model.record.get("labels", [])] == [data.image(c).name for c in cases]:
            return model, float(model.record["total_minutes"])
    model = learn(
        [data.image(c) for c in cases], [data.label(c) for c in cases], data.names, options, medlam, WORK / "cache"
    )
    model.save(path)
    return model, float(model.record["total_minutes"])


def score_scan(data, case: dict, model: LearnedModel, bank, cuts, medlam, digest: str) -> tuple[dict, float, float]:
    """path -> organ -> (Dice, HD95) on one validation scan; the localisation and network seconds (``digest``: the
    bank's ``fewshot.bank_digest``, its priors' cache key)."""
    volume, truth = load_ct(data.image(case["id"])), read_volume(data.label(case["id"])).array
    tic = time.perf_counter()
    priors = fewshot.scan_priors(medlam, bank, volume, None, WORK / "cache", digest)
    localize_s = time.perf_counter() - tic
    organs = model.organs
    shot = dict(zip(organs, fewshot.calibrated_dense(priors, organs, volume.shape, cuts)))
    tic = time.perf_counter()
    net = learned_probabilities(model, volume, priors)
    network_s = time.perf_counter() - tic
    # as medlsam.learn.predict.chosen_probabilities: the network where chosen and where the templates lack the organ
    chosen = {o: (net[o] if model.choice[o] == "learned" or o not in priors else shot[o]) for o in organs}
    values = {o: data.values[o] for o in organs}
    out = {}
    for path, probs in (("fewshot", shot), ("learned", net), ("choice", chosen)):
        label = to_label(probs, values)
        out[path] = {}
        for organ in organs:
            if organ not in case["contoured"]:
                continue
            pred, true = label == values[organ], truth == values[organ]
            out[path][organ] = (dice(pred, true), hd95(pred, true, volume.spacing) if pred.any() else None)
    return out, localize_s, network_s


def summarise(per_scan: list[dict]) -> dict:
    """path -> organ -> {dice, dice_std, hd95 (median over scans with a prediction), missed, scans}; and the mean."""
    out = {}
    for path in PATHS:
        organs = {}
        for organ in ORGANS:
            rows = [s[path][organ] for s in per_scan if organ in s[path]]
            if not rows:
                continue
            d = [r[0] for r in rows]
            h = [r[1] for r in rows if r[1] is not None]
            organs[organ] = {
                "dice": float(np.mean(d)),
                "dice_std": float(np.std(d)),
                "hd95": float(np.mean(h)) if h else None,
                "missed": len(rows) - len(h),
                "scans": len(rows),
            }
        out[path] = {"organs": organs, "mean_dice": float(np.mean([o["dice"] for o in organs.values()]))}
    return out


def run_size(data, order, size: int, options: LearnOptions, medlam, cases: int) -> dict:
    """One point of the curve: train on the first ``size`` labels, score the validation scans."""
    model, minutes = trained(data, order[:size], options, medlam)
    banks = fewshot.one_template_banks(
        medlam,
        [load_ct(data.image(c)) for c in order[:size]],
        [read_volume(data.label(c)) for c in order[:size]],
        data.names,
        WORK / "cache",
    )
    bank = merge_banks(banks)  # uncalibrated: the network's prior channels; model.prior_cuts calibrate the few-shot
    per_scan, localize_s, network_s, digest = [], [], [], fewshot.bank_digest(bank)  # hashed once, not per scan
    for n, case in enumerate(data.split("validation")[:cases], 1):
        scores, loc, net = score_scan(data, case, model, bank, model.prior_cuts, medlam, digest)
        per_scan.append(scores)
        localize_s.append(loc)
        network_s.append(net)
        print(
            f"N={size} scan {n}: " + ", ".join(f"{p} {np.mean([v[0] for v in scores[p].values()]):.3f}" for p in PATHS),
            flush=True,
        )
    held = model.held_out
    return {
        "size": size,
        "labels": order[:size],
        "held_out_labels": [Path(s).name for s in model.record.get("held_out_sources", [])],
        "validation": summarise(per_scan),
        "per_scan": per_scan,
        "held_out": {p: held.get(p, {}) for p in ("learned", "fewshot")},
        "held_out_scans": held.get("scans", {}),
        "choice": model.choice,
        "prior_cuts": model.prior_cuts,
        "training": {k: v for k, v in model.record.items() if k not in ("labels", "held_out_sources")},
        "train_minutes": minutes,
        "localize_s_median": float(np.median(localize_s)),
        "network_s_median": float(np.median(network_s)),
        "validation_scans": len(per_scan),
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = [r["size"] for r in results]
    for p, style in zip(PATHS, ("o--", "s-", "^-")):
        ax.plot(sizes, [r["validation"][p]["mean_dice"] for r in results], style, label=p)
    ax.plot(
        sizes,
        [np.mean(list(r["held_out"]["learned"].values()) or [np.nan]) for r in results],
        "x:",
        label="learned, trainer's held-out estimate",
    )
    ax.axhline(0.75, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("saved labels N")
    ax.set_ylabel("mean Dice (7 organs, validation)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fmt(v, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{digits}f}"


def report(results: list[dict], meta: dict, out: Path = RESULTS / "learning.md") -> str:
    lines = [
        "# Learning from saved labels (`medlsam learn`)",
        "",
        f"Regenerate from a fresh clone: `{meta['command']}` (sizes already in results/{out.stem}.json are kept; "
        "banks, priors and models are cached in runs/learning/).",
        f"Machine: {meta['machine']}; load average (1 min) {meta['load_start']} at the start, {meta['load_end']} "
        "at the end: the 2 cores were shared with other engineers' jobs, so times are upper bounds.",
        f"Learner options: `{json.dumps(meta['options'])}`.",
        "Saved labels: the first N OpenKBP train scans of one fixed shuffle (seed 0, nested). Few-shot path: the "
        "template prior of those N labels (MedLAM + template matching, calibrated cuts from the labels held out one "
        "at a time, as `medlsam templates build` chooses them), cut at 0.5. Learnt: the network alone (its prior "
        "channels from the same bank; each label's own prior, its input in training, as the trainer keeps it across "
        "trainings: made from at least half of the other labels, so a size run after a smaller one may reuse it). "
        "Choice: per organ the path that scored better on the learner's own "
        "held-out labels. Dice on each validation scan's own grid, organs not contoured skipped, a miss counts 0; "
        "HD95 mean over scans with a prediction (misses counted separately).",
        "",
        "| N | few-shot | learnt | choice | learnt, held-out estimate (scans) | few-shot, held-out estimate "
        "| training min | localise s/scan | network s/scan | validation scans |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        v, h = r["validation"], r["held_out"]
        scans = max(r["held_out_scans"].values(), default=0)
        lines.append(
            f"| {r['size']} | {fmt(v['fewshot']['mean_dice'])} | {fmt(v['learned']['mean_dice'])} | "
            f"{fmt(v['choice']['mean_dice'])} | {fmt(np.mean(list(h['learned'].values())) if h['learned'] else None)} "
            f"({scans}) | {fmt(np.mean(list(h['fewshot'].values())) if h['fewshot'] else None)} | "
            f"{r['train_minutes']:.1f} | {r['localize_s_median']:.1f} | {r['network_s_median']:.1f} | "
            f"{r['validation_scans']} |"
        )
    for r in results:
        lines += [
            "",
            f"## N = {r['size']}",
            "",
            "| organ | few-shot Dice | learnt Dice | choice Dice | choice | "
            "held-out learnt / few-shot | HD95 mm few-shot / learnt / choice |",
            "|---|---|---|---|---|---|---|",
        ]
        v = r["validation"]
        for organ in ORGANS:
            if organ not in v["choice"]["organs"]:
                continue
            d = {p: v[p]["organs"][organ] for p in PATHS}
            lines.append(
                f"| {organ} | {fmt(d['fewshot']['dice'])} ± {fmt(d['fewshot']['dice_std'], 2)} | "
                f"{fmt(d['learned']['dice'])} ± {fmt(d['learned']['dice_std'], 2)} | {fmt(d['choice']['dice'])} | "
                f"{r['choice'].get(organ, '')} | {fmt(r['held_out']['learned'].get(organ))} / "
                f"{fmt(r['held_out']['fewshot'].get(organ))} | "
                + " / ".join(f"{fmt(d[p]['hd95'], 1)} ({d[p]['missed']} missed)" for p in PATHS)
                + " |"
            )
        t = r["training"]
        lines.append("")
        lines.append(
            f"Training: {t.get('epochs')} epochs, {t.get('iterations')} iterations, few-shot preparation "
            f"{fmt(t.get('fewshot_minutes'), 1)} min, network {fmt(t.get('train_minutes'), 1)} min; held out: "
            f"{', '.join(r['held_out_labels']) or 'none'}. Command: `{r.get('command', '')}`; load average "
            f"(1 min) at its start and end: {r.get('load_average')}."
        )
    partial = [str(r["size"]) for r in results if r["validation_scans"] < 33]
    if partial:
        lines += [
            "",
            f"**Partial:** N = {', '.join(partial)} scored on the first validation scans only (column "
            "'validation scans'), not the protocol's 33; rerun with `--cases 33` for reportable figures.",
        ]
    lines += ["", f"![learning curve]({out.stem}.png)", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="3,5,10,20")
    parser.add_argument("--time-limit-min", type=float, default=25.0)
    parser.add_argument("--cases", type=int, default=33, help="validation scans (the report uses all 33)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--options", default="{}", help="JSON of further learner options")
    parser.add_argument("--out", type=Path, default=RESULTS / "learning.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    options = LearnOptions.from_dict(
        {"time_limit_min": args.time_limit_min, "threads": args.threads, **json.loads(args.options)}
    )
    data, medlam = OpenKBP(), load_medlam(default_medlam_path())
    order = label_order(data)
    json_path = args.out.with_suffix(".json")
    results = json.loads(json_path.read_text())["results"] if json_path.is_file() else []
    for size in [int(s) for s in args.sizes.split(",")]:
        if any(r["size"] == size and r["validation_scans"] >= args.cases for r in results):
            continue
        results = [r for r in results if r["size"] != size]
        results.append(run_size(data, order, size, options, medlam, args.cases))
        results[-1]["command"] = command_line("benchmarks/learning.py")
        results[-1]["load_average"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
        results.sort(key=lambda r: r["size"])
        meta = {
            "command": command_line("benchmarks/learning.py"),
            "machine": machine_line(),
            "load_start": round(load_start, 2),
            "load_end": round(os.getloadavg()[0], 2),
            "options": options.to_dict(),
        }
        write_json_atomic({"meta": meta, "results": results}, json_path)
        args.out.write_text(report(results, meta, args.out))
        plot(results, args.out.with_suffix(".png"))
        print(f"N={size} written to {args.out}", flush=True)


if __name__ == "__main__":
    main()
