"""The segmentation benchmark's report: per-row summaries, the .md / .json / .png files (benchmarks/segmentation.py
writes them; the account of what was tried is kept by hand in benchmarks/notes/segmentation.md, not in the report)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from common import ORGANS, RESULTS, machine_line, mean_std, outside_note

STAGES = ["load", "localize", "prompts", "encode", "decode", "assemble", "write"]
NOTES = "benchmarks/notes/segmentation.md"


def summarise(per_case: dict) -> dict:
    out = {"organs": {}}
    for organ in ORGANS:
        rows = [c["organs"][organ] for c in per_case.values() if organ in c["organs"]]
        if rows:
            out["organs"][organ] = {
                "n": len(rows),
                "missed": sum(r["missed"] for r in rows),
                "dice": [r["dice"] for r in rows],
                "hd95": [r["hd95"] for r in rows if r["hd95"] is not None],
            }
    means = [np.mean(o["dice"]) for o in out["organs"].values()]
    hds = [np.mean(o["hd95"]) for o in out["organs"].values() if o["hd95"]]
    out.update(
        dice=float(np.mean(means)),
        dice_std=float(np.std(means)),
        hd95=float(np.mean(hds)) if hds else None,
        missed=sum(o["missed"] for o in out["organs"].values()),
    )
    return out


def _header(setup: dict) -> list[str]:
    """The title and the run's description: scans, templates, model, options, machine, the command."""
    split, templates, pool = setup["split"], setup["templates"], setup["pool"]
    return [
        f"# Segmentation benchmark (OpenKBP {split} split)",
        "",
        f"- Scans: {setup['n_cases']} {split} cases"
        + (" that are not templates" if split == "train" else "")
        + f"; templates: {', '.join(templates)} (as the localisation benchmark)"
        + (f"; the pool rows' templates: {', '.join(pool)}" if pool else "")
        + "; only contoured organs are scored.",
        f"- MedLAM model: `{Path(setup['model_path']).name}`; segmenter: `{setup['backend']}`; options: "
        f"`{setup['options']}`; machine: {machine_line()}.",
        "- Dice: 3D on the scan's own grid, a missed organ (not found, empty mask) counts 0; HD95 in mm over the "
        "organs segmented (misses listed separately). Mean over scans per organ, then over organs (± std over organs).",
        f"- Command (from the clone's root, data in `../shared/data`; it regenerates this report): "
        f"`{setup['command']}`{outside_note(setup['command'])}",
        f"- What was tried and measured besides (written by hand, by session): `{NOTES}`.",
        "",
    ]


def _tables(summaries: dict) -> list[str]:
    """The rows' table and the first row's per-organ table."""
    lines = [
        "| prompts | mean Dice | mean HD95 mm | missed | " + " | ".join(ORGANS) + " |",
        "|---|---|---|---|" + "---|" * len(ORGANS),
    ]
    for row, s in summaries.items():
        cells = [f"{np.mean(s['organs'][o]['dice']):.3f}" if o in s["organs"] else "n/a" for o in ORGANS]
        hd = f"{s['hd95']:.1f}" if s["hd95"] is not None else "n/a"
        lines.append(
            f"| {row} | {s['dice']:.3f} ± {s['dice_std']:.3f} | {hd} | {s['missed']} | " + " | ".join(cells) + " |"
        )
    first = next(iter(summaries))
    lines += ["", f"## Per organ: {first}", "", "| organ | scans | Dice | HD95 mm | missed |", "|---|---|---|---|---|"]
    for organ in ORGANS:
        o = summaries[first]["organs"].get(organ)
        if o:
            lines.append(f"| {organ} | {o['n']} | {mean_std(o['dice'])} | {mean_std(o['hd95'])} | {o['missed']} |")
    return lines


def _timing(results: dict, first: str, median: dict, picture: str) -> list[str]:
    """The first row's time per stage and its encoder calls."""
    timings, calls = results["timings"], results["encoder_calls"]
    total = float(np.median([sum(t.get(s, 0.0) for s in STAGES) for t in timings.values()]))
    enc = float(np.median([c["encoder_calls"] for c in calls.values()]))
    ref = float(np.median([c["reference_encoder_calls"] for c in calls.values()]))
    return [
        "",
        f"## Time of one scan ({first}, median over scans, seconds)",
        "",
        "| " + " | ".join(STAGES) + " | total |",
        "|" + "---|" * (len(STAGES) + 1),
        "| " + " | ".join(f"{median[s]:.2f}" for s in STAGES) + f" | {total:.1f} |",
        "",
        ""
        if not results.get("embeddings_from_disk")
        else f"The timed row read {results['embeddings_from_disk']} "
        "slice embeddings from --embedding-cache: its encode time is not the encoder's.",
        f"Encoder calls per scan (median): {enc:.0f}, against {ref:.0f} for the reference approach "
        f"(one encoder call per organ per slice): {ref / max(enc, 1):.1f}x fewer.",
        "",
        f"![Dice per organ]({picture})",
        "",
    ]


def write_report(results: dict, summaries: dict, setup: dict, out: Path) -> None:
    """``setup``: model_path, templates, pool, n_cases, split, options, backend, command (portable)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    timings = results["timings"]
    median = {s: float(np.median([t.get(s, 0.0) for t in timings.values()])) for s in STAGES}
    first = next(iter(summaries))
    lines = _header(setup) + _tables(summaries) + _timing(results, first, median, out.with_suffix(".png").name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"summaries": summaries, "raw": results}, indent=1, default=float))
    plot(summaries, median, out.with_suffix(".png"))


def plot(summaries: dict, median: dict, path: Path) -> None:
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
    fig.savefig(path, dpi=90)
