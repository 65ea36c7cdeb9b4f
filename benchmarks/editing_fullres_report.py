"""The report of benchmarks/editing_fullres.py: rows -> json, markdown tables and a plot."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from common import machine_line

CLICKS = (0, 1, 2, 3, 5, 10)
SIZES = (("< 10 cc", 0.0, 10.0), ("10-200 cc", 10.0, 200.0), ("> 200 cc", 200.0, float("inf")))
METHOD_NAMES = {
    "any": "class-agnostic clicks (new: intensity blobs + watershed, `medlsam.interact.click_structure`)",
    "sam_3d": "`sam_3d` (LiteMedSAM slice propagation)",
    "refiner": "click refiner network, no prior (the old class-agnostic `edit`)",
    "combo": "blobs, or a lean LiteMedSAM candidate (one decoder call per slice, slices encoded once per image) when "
    "the clicks lie in the encoder's HU window and the candidate holds every foreground click and no background one "
    "(`medlsam.interact.click_combo`); from the second click on, the previous answer corrected only around the new "
    "click unless the whole new answer agrees with it elsewhere (`medlsam.interact.click_update`)",
}


def dice_at(curve: list[dict], clicks: int) -> float | None:
    """Dice after ``clicks`` clicks (the last one reached when the simulator stopped early: nothing left to fix);
    None when the run did not go that far."""
    before = [c for c in curve if c["clicks"] <= clicks]
    if not before or (clicks == 0 and curve[0]["clicks"] != 0):
        return None
    if before[-1]["clicks"] < clicks and before[-1]["dice"] < 0.999:
        return None  # the run stopped at its --max-clicks, not because nothing was left to fix
    return before[-1]["dice"]


def _mean(values) -> str:
    values = [v for v in values if v is not None]
    return f"{np.mean(values):.3f}" if values else "n/a"


def _groups(rows: list[dict]) -> dict:
    out: dict = {}
    for row in rows:
        out.setdefault((row["method"], row["sequence"]), []).append(row)
    return out


def _falls(curve: list[dict]) -> bool:
    return any(b["dice"] < a["dice"] - 1e-4 for a, b in zip(curve, curve[1:]))


def _table(rows: list[dict], title: str) -> list[str]:
    head = " | ".join(f"Dice {c}" for c in CLICKS)
    lines = [f"| {title} | n | {head} | falls to 5 | falls |", "|---|---|" + "---|" * 8]
    for (method, sequence), group in sorted(_groups(rows).items()):
        cells = [_mean(dice_at(r["curve"], c) for r in group) for c in CLICKS]
        early = sum(_falls([c for c in r["curve"] if c["clicks"] <= 5]) for r in group)
        falls = sum(_falls(r["curve"]) for r in group)
        lines.append(f"| {method}, {sequence} | {len(group)} | " + " | ".join(cells) + f" | {early} | {falls} |")
    return lines


def _seconds(rows: list[dict]) -> list[str]:
    lines = [
        "| method, sequence | scan (shape) | requests | wall s median | 90th pct | max | CPU s median | 90th | max |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict = {}
    for row in rows:
        key = (f"{row['method']}, {row['sequence']}", f"{row['scan']} ({'x'.join(map(str, row['shape']))})")
        groups.setdefault(key, []).extend(row["curve"])
    for (method, scan), curve in sorted(groups.items()):
        cells = []
        for field in ("seconds", "cpu_seconds"):
            v = np.array([c[field] for c in curve if field in c])
            cells += [f"{np.median(v):.2f}", f"{np.percentile(v, 90):.2f}", f"{v.max():.2f}"] if len(v) else ["n/a"] * 3
        lines.append(f"| {method} | {scan} | {len(curve)} | " + " | ".join(cells) + " |")
    return lines


def _combo(rows: list[dict]) -> list[str]:
    """The combo rows' one-time encoding per scan and how often each candidate was chosen."""
    rows = [r for r in rows if r["method"] == "combo"]
    if not rows:
        return []
    lines = ["## combo: encoding once per image, and the choices", ""]
    for scan in sorted({r["scan"] for r in rows}):
        enc = next(r["encode"] for r in rows if r["scan"] == scan and "encode" in r)
        source = "read from the git-ignored disk cache" if enc["from_disk"] else "encoded"
        lines.append(f"- {scan}: {enc['slices']} slices {source} in {enc['seconds']} s before the first click.")
    counts: dict = {}
    for r in rows:
        for c in r["curve"]:
            counts[c.get("choice", "n/a")] = counts.get(c.get("choice", "n/a"), 0) + 1
    calls = [c.get("decoder_calls", 0) for r in rows for c in r["curve"]]
    lines += [
        "- Choices over all requests: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ".",
        f"- Decoder calls per request: median {np.median(calls):.0f}, 90th pct {np.percentile(calls, 90):.0f}, "
        f"max {max(calls)} (a (slice, box) decoded before is reused).",
        "",
    ]
    return lines


def _per_structure(rows: list[dict]) -> list[str]:
    lines = ["| scan | structure | cc | method, sequence | " + " | ".join(f"{c}" for c in CLICKS) + " |"]
    lines.append("|---|---|---|---|" + "---|" * len(CLICKS))
    for r in sorted(rows, key=lambda r: (r["scan"], r["structure"], r["method"], r["sequence"])):
        cells = [dice_at(r["curve"], c) for c in CLICKS]
        text = " | ".join("" if v is None else f"{v:.3f}" for v in cells)
        lines.append(f"| {r['scan']} | {r['structure']} | {r['cc']} | {r['method']}, {r['sequence']} | {text} |")
    return lines


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SIZES), figsize=(15, 4.5), sharey=True)
    for ax, (label, lo, hi) in zip(axes, SIZES):
        part = [r for r in rows if lo <= r["cc"] < hi]
        for (method, sequence), group in sorted(_groups(part).items()):
            ys = [
                np.mean([d for d in (dice_at(r["curve"], c) for r in group) if d is not None] or [np.nan])
                for c in CLICKS
            ]
            ax.plot(CLICKS, ys, "o-" if sequence == "clicks" else "s--", label=f"{method}, {sequence}")
        ax.set_title(f"{label} ({len({(r['scan'], r['structure']) for r in part})} structures)")
        ax.set_xlabel("clicks (0: box only)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean Dice")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, rows: list[dict], args) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows}, indent=1))
    md, png = out.with_suffix(".md"), out.with_suffix(".png")
    _plot(rows, png)
    load = os.getloadavg()
    lines = [
        "# Class-agnostic clicks on full-resolution scans (issue 30)",
        "",
        f"- Machine: {machine_line()}; load average at the end "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min; two other engineers' jobs share the CPU).",
        "- Scans: `dicom_rt/thorax_rt` (512x512x105, 1.27 x 1.27 x 4 mm, its RTSTRUCT) and `abdomen/abdomen_slab_ct`"
        " (3 mm, TotalSegmentator masks, every organ cut by the slab's ends); every structure of at least 1 cc.",
        "- Clicks: `medlsam.interact.click_simulator` (first at the centre of the middle slice, then the most "
        "interior voxel of the largest 3D error); sequence `box`: the structure's true 3D box first (0 clicks), "
        "then the error clicks. "
        "A curve that stops early (nothing left to click) keeps its last Dice.",
        "- Methods: " + "; ".join(f"`{k}`: {v}" for k, v in METHOD_NAMES.items()) + ".",
        *([] if args.report_only else [f"- Command: `python benchmarks/editing_fullres.py {' '.join(args.argv)}`"]),
        *([f"- {args.note}"] if args.note else []),
        "",
        "- What limits it, what was tried, what is next: [notes/editing_fullres.md](../notes/editing_fullres.md).",
        "",
        "## Mean Dice over all structures",
        "",
        *_table(rows, "method, sequence"),
        "",
        "`falls`: structures whose Dice fell at least once from one click to the next (`falls to 5`: within the "
        "first 5 clicks, comparable across rows run to 5 and to 10 clicks).",
        "",
    ]
    for scan in sorted({r["scan"] for r in rows}):
        lines += [f"## {scan} only", "", *_table([r for r in rows if r["scan"] == scan], "method, sequence"), ""]
    for label, lo, hi in SIZES:
        part = [r for r in rows if lo <= r["cc"] < hi]
        if part:
            lines += [f"## {label}", "", *_table(part, "method, sequence"), ""]
    lines += [
        "## Seconds per request (server work of one click)",
        "",
        "Wall seconds under the load above; CPU seconds: the benchmark process's own CPU time for the request (one "
        "thread: close to the wall time on an idle core; not recorded for the sam_3d and refiner rows).",
        "",
        *_seconds(rows),
        "",
    ]
    lines += _combo(rows)
    lines += [f"![curves]({png.name})", "", "## Per structure", "", *_per_structure(rows), ""]
    md.write_text("\n".join(lines))
