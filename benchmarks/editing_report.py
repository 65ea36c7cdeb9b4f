"""The click-editing benchmark's report: per-row summaries, the .md / .json / .png files and the commands that
regenerate them (benchmarks/editing.py writes them; the accounts of what was tried are kept by hand in
benchmarks/notes/editing.md, not in the report)."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import numpy as np

from common import ORGANS, machine_line, outside_note, portable_path

CLICKS = (0, 1, 2, 3, 5, 10)
ROWS = {
    "edit": "editing the auto-segmentation",
    "scratch": "from scratch, organ-labelled clicks",
    "agnostic": "class-agnostic (no templates)",
}
METHODS = {"refiner": "click refiner network", "geodesic": "geodesic edit"}
NOTES = "benchmarks/notes/editing.md"
DATA_NOTE = "from the clone's root, data in `../shared/data`"
UNRECORDED = ": its command was not recorded"  # a loaded .json written before the runs recorded their command


def load_runs(paths: list[str]) -> tuple[list[dict], list[str]]:
    """The rows of earlier runs' .json files and the commands of the runs that computed them (a file written
    before the runs recorded their command is named instead)."""
    rows, runs = [], []
    for path in paths:
        stored = json.loads(Path(path).read_text())
        rows += stored["rows"]
        if stored.get("runs"):
            runs += stored["runs"]
        elif stored.get("command"):
            runs.append(stored["command"])
        else:
            runs.append(portable_path(path) + UNRECORDED)
    return rows, runs


def organ_means(rows: list[dict], key: tuple[str, str], n: int, field: str = "dice") -> dict[str, float]:
    """Mean over scans per organ of ``field`` after n clicks (HD95: over the non-empty predictions), for the rows
    of ``key`` (method, start)."""
    out = {}
    for organ in ORGANS:
        vals = [r[f"{field}_{n}"] for r in rows if _key(r) == key and r["organ"] == organ and f"{field}_{n}" in r]
        vals = [v for v in vals if v is not None]
        if vals:
            out[organ] = float(np.mean(vals))
    return out


def _key(row: dict) -> tuple[str, str]:
    return row.get("method", "geodesic"), row["row"]  # rows of runs before the refiner: the geodesic edit


def _label(key: tuple[str, str]) -> str:
    return f"{ROWS[key[1]]}, {METHODS[key[0]]}"


def summary(rows: list[dict], clicks: int) -> dict:
    result = {}
    keys = sorted({_key(r) for r in rows}, key=lambda k: (list(ROWS).index(k[1]), list(METHODS).index(k[0])))
    for key in keys:
        per_n = {}
        for n in CLICKS:
            if n > clicks:
                continue
            organs = organ_means(rows, key, n)
            per_n[n] = {
                "dice": float(np.mean(list(organs.values()))),
                "dice_std": float(np.std(list(organs.values()))),
                "hd95": float(np.mean(list(organ_means(rows, key, n, "hd95").values()))),
                "organs": organs,
            }
        later = [s for r in rows if _key(r) == key for s in r["seconds"][1:]]
        first = [r["seconds"][0] for r in rows if _key(r) == key and r["seconds"]]
        result[key] = {
            "per_clicks": per_n,
            "first_click_s": statistics.median(first) if first else None,
            "later_click_s": statistics.median(later) if later else None,
            "later_click_s_p90": float(np.percentile(later, 90)) if later else None,
            "later_click_s_max": max(later) if later else None,
        }
    return result


def _command_lines(command: str, runs: list[str]) -> list[str]:
    """The command that wrote the report; for a --load run, first the runs that computed the rows it loads."""
    if runs == [command]:
        return [f"- Command ({DATA_NOTE}): `{command}`{outside_note(command)}"]
    lines = [
        f"- Commands ({DATA_NOTE}), in order: the runs that computed the rows (each writes its rows' .json; they share "
        "the scans' starts kept in `--cache`, which `--cache-only` computes first when they run in parallel),"
    ]
    for run in runs:
        if run.endswith(UNRECORDED):
            lines.append(f"  - `{run.removesuffix(UNRECORDED)}`{UNRECORDED}")
        else:
            lines.append(f"  - `{run}`{outside_note(run)}")
    lines.append(f"  - then this report from their rows: `{command}`{outside_note(command)}")
    return lines


def _header(args, options, scans: int, counts: list[int], command: str, runs: list[str]) -> list[str]:
    lines = [
        "# Click editing: Dice against simulated clicks (OpenKBP)",
        "",
        f"- Split: {args.split}, {scans} scans, every contoured organ; templates: the 5 protocol templates "
        "(as the segmentation benchmark).",
        f"- Machine: {machine_line()}; load average at the end {os.getloadavg()[0]:.1f}.",
        f"- Click refiner: `{args.refiner_record}`.",
        f"- Geodesic edit options: `{options}`.",
        "- Start of `edit`: the template-prior auto-segmentation (`SegmentOptions(prior_weight=1)`, no SAM).",
        *_command_lines(command, runs),
        f"- What was tried, and the runs behind earlier figures: `{NOTES}`.",
        "",
        "Mean over scans per organ, then over the organs (± std over organs); HD95 in mm over non-empty masks.",
        "",
        "| start, method | " + " | ".join(f"Dice {n}" for n in counts) + " | " + f"HD95 0 / {counts[-1]} | "
        "s first click | s later click (median / 90th pct / max) |",
        "|---|" + "---|" * (len(counts) + 3),
    ]
    return lines


def _table(result: dict, counts: list[int]) -> list[str]:
    lines = []
    for key, res in result.items():
        pn = res["per_clicks"]
        later = (
            f"{res['later_click_s']:.2f} / {res['later_click_s_p90'] or 0:.2f} / {res['later_click_s_max']:.2f}"
            if res["later_click_s"] is not None
            else ""
        )
        lines.append(
            f"| {_label(key)} | "
            + " | ".join(f"{pn[n]['dice']:.3f} ± {pn[n]['dice_std']:.3f}" for n in counts)
            + f" | {_mm(pn[0]['hd95'])} / {_mm(pn[counts[-1]]['hd95'])} | {res['first_click_s'] or 0:.2f} | {later} |"
        )
    return lines


def _encoder_lines(result: dict, encoder_s: float | None) -> list[str]:
    if not encoder_s:
        return []
    lines = ["", f"One LiteMedSAM encoder call (one slice) on this machine: {encoder_s:.2f} s."]
    for key, res in result.items():
        if res["later_click_s"] is not None:
            lines.append(f"- {_label(key)}: a later click costs {res['later_click_s'] / encoder_s:.2f} encoder calls.")
    return lines


def _organ_tables(rows: list[dict], result: dict, counts: list[int]) -> list[str]:
    lines = []
    for key, res in result.items():
        lines += [
            "",
            f"## Per organ: {_label(key)}",
            "",
            "| organ | n | " + " | ".join(f"Dice {n}" for n in counts) + " |",
        ]
        lines.append("|---|---|" + "---|" * len(counts))
        for organ in ORGANS:
            n_scans = len({r["case"] for r in rows if _key(r) == key and r["organ"] == organ})
            if n_scans:
                lines.append(
                    f"| {organ} | {n_scans} | "
                    + " | ".join(f"{res['per_clicks'][n]['organs'].get(organ, float('nan')):.3f}" for n in counts)
                    + " |"
                )
    return lines


def _plot(path: Path, result: dict, counts: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, res in result.items():
        style = "-" if key[0] == "refiner" else ":"
        ax.plot(counts, [res["per_clicks"][n]["dice"] for n in counts], style, marker="o", label=_label(key))
    ax.axhline(0.75, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("clicks")
    ax.set_ylabel("mean Dice over organs")
    ax.set_xticks(counts)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(out: Path, args, options, rows: list[dict], result: dict, encoder_s: float | None) -> None:
    """OUT.md, .json and .png; ``args.command`` is this run's command, ``args.runs`` the commands of the runs that
    computed its rows (both stored in the .json, so that a later --load run names them)."""
    counts = [n for n in CLICKS if n <= args.max_clicks]
    scans = len({r["case"] for r in rows})
    lines = _header(args, options, scans, counts, args.command, args.runs)
    lines += _table(result, counts)
    lines += _encoder_lines(result, encoder_s)
    lines += _organ_tables(rows, result, counts)
    lines += ["", f"![Dice against clicks]({out.name}.png)", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    summary_json = {" / ".join(key): res for key, res in result.items()}
    stored = {"command": args.command, "runs": args.runs, "summary": summary_json, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(stored, indent=1))
    _plot(out.with_suffix(".png"), result, counts)
    print(f"wrote {out.with_suffix('.md')}")


def _mm(value: float) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:.1f}"
