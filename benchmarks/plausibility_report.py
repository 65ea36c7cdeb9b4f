"""The plausibility benchmark's report: the decision's outcome per bank and data set, the cues of present and
absent organs, the failures, what `medlsam segment` draws (benchmarks/plausibility.py gathers the rows)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from common import RESULTS, command_line, machine_line, outside_note
from medlsam.atlas.localize import LocalizeOptions

TOP_MM = 150.0  # thorax_rt: the mandible's body and the larynx lie above this world z
CUE_NAMES = ["ncc", "body_width", "spread_mm", "intensity", "organ_ncc", "body", "body_depth"]
STATUSES = ("present", "absent", "partial", "unsure")
DATASETS = ["openkbp_train", "openkbp_validation", "openkbp_below_neck", "openkbp_head_only", "thorax_rt", "abdomen"]
BANKS = {"hn": "head-and-neck bank (5 OpenKBP templates)", "thorax": "thorax bank (thorax_rt, 1 template)"}


def outcome(row: dict) -> str:
    """kept / lost (present organs), refused / drawn (absent ones), wrong place (a present organ found elsewhere),
    or found / not found (unsure)."""
    refused = bool(row["decision"])
    if row["status"] == "present":
        if row.get("on_target") is False:
            return "refused off target" if refused else "drawn off target"
        return "lost" if refused else "kept"
    if row["status"] == "absent":
        return "refused" if refused else "drawn"
    return "not found" if refused else "found"  # unsure or partial


def outcome_table(rows: list[dict]) -> list[str]:
    lines = [
        "| bank | data set | scans | present kept | present lost | absent refused | absent drawn | found off target "
        "(drawn / refused) | partial or unsure: found / not found |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for bank in BANKS:
        for dataset in DATASETS:
            part = [r for r in rows if r["bank"] == bank and r["dataset"] == dataset]
            if not part:
                continue
            n = {
                k: sum(outcome(r) == k for r in part)
                for k in (
                    "kept",
                    "lost",
                    "refused",
                    "drawn",
                    "drawn off target",
                    "refused off target",
                    "found",
                    "not found",
                )
            }
            lines.append(
                f"| {bank} | {dataset} | {len({r['scan'] for r in part})} | {n['kept']} | {n['lost']} | {n['refused']} "
                f"| {n['drawn']} | {n['drawn off target']} / {n['refused off target']} "
                f"| {n['found']} / {n['not found']} |"
            )
    return lines


def cue_text(cues: dict | None) -> str:
    if not cues:
        return "not matched"
    return ", ".join(f"{k} {cues[k]:.2f}" if cues[k] is not None else f"{k} -" for k in CUE_NAMES)


def five(values: list[float]) -> str:
    if not values:
        return "-"
    q = np.percentile(values, [0, 5, 50, 95, 100])
    return " / ".join(f"{v:.3f}" for v in q) + f" ({len(values)})"


def cue_table(rows: list[dict]) -> list[str]:
    lines = [
        "Min / 5 % / median / 95 % / max (count) of each cue; present: found on target, every data set.",
        "",
        "| bank | cue | present | absent |",
        "|---|---|---|---|",
    ]
    for bank in BANKS:
        for cue in CUE_NAMES:

            def values(status, bank=bank, cue=cue):
                return [
                    r["cues"][cue]
                    for r in rows
                    if r["bank"] == bank
                    and r["status"] == status
                    and r.get("on_target") is not False
                    and r["cues"]
                    and r["cues"][cue] is not None
                ]

            present, absent = values("present"), values("absent")
            if present or absent:
                lines.append(f"| {bank} | {cue} | {five(present)} | {five(absent)} |")
    return lines


def failures(rows: list[dict], per_group: int = 6) -> list[str]:
    """One line per present organ lost, absent organ drawn or organ drawn off target (``per_group`` per bank, data
    set and kind, then a count)."""
    lines, shown = [], {}
    for r in rows:
        kind = outcome(r)
        if kind in ("lost", "drawn", "drawn off target"):
            group = (r["bank"], r["dataset"], kind)
            shown[group] = shown.get(group, 0) + 1
            if shown[group] > per_group:
                continue
            where = f" at {r['centre_mm']} mm" if "centre_mm" in r else ""
            why = f": {r['decision']}" if r["decision"] else ""
            lines.append(
                f"- {kind}: {r['bank']} {r['organ']} in {r['dataset']} {r['scan']}{where} ({cue_text(r['cues'])}){why}"
            )
    more = [f"{n - per_group} more {g[2]} ({g[0]} bank, {g[1]})" for g, n in shown.items() if n > per_group]
    return (lines or ["- none"]) + ([f"- and {', '.join(more)}"] if more else [])


def plot(rows: list[dict], options: LocalizeOptions, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cues = [c for c in CUE_NAMES if any(r["cues"] and r["cues"][c] is not None for r in rows)]
    fig, axes = plt.subplots(len(BANKS), len(cues), figsize=(3.2 * len(cues), 4.2 * len(BANKS)), squeeze=False)
    colours = {d: plt.cm.tab10(i) for i, d in enumerate(DATASETS)}
    rng = np.random.default_rng(0)
    for b, bank in enumerate(BANKS):
        for c, cue in enumerate(cues):
            ax = axes[b, c]
            for x, status in enumerate(STATUSES):
                for dataset in DATASETS:
                    values = [
                        r["cues"][cue]
                        for r in rows
                        if r["bank"] == bank
                        and r["status"] == status
                        and r["dataset"] == dataset
                        and r["cues"]
                        and r["cues"][cue] is not None
                        and r.get("on_target") is not False
                    ]
                    if values:
                        ax.scatter(
                            x + rng.uniform(-0.25, 0.25, len(values)),
                            values,
                            s=8,
                            color=colours[dataset],
                            label=dataset if (c == 0 and x == 0 or status == "absent") else None,
                            alpha=0.7,
                        )
            ax.set_xticks(range(len(STATUSES)), STATUSES)
            limit = {"ncc": options.min_match_score, "body_width": options.max_body_width}.get(cue)
            if limit is not None:
                ax.axhline(limit, color="grey", linestyle="--", linewidth=0.8)
            ax.set_title(f"{bank}: {cue}", fontsize=9)
        handles, labels = axes[b, 0].get_legend_handles_labels()
        seen = dict(zip(labels, handles))
        axes[b, -1].legend(seen.values(), seen.keys(), fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def write_report(rows: list[dict], drawn: list[dict], options: LocalizeOptions, agreement: dict, args, model_path):
    command = command_line("benchmarks/plausibility.py")
    rule = {k: getattr(options, k) for k in ("min_match_score", "plausibility", "max_body_width")}
    lines = [
        "# Organs that are not in the scan: plausibility of the template match (issue 30, part 4)",
        "",
        f"- Banks: {BANKS['hn']}; {BANKS['thorax']}. Data sets: see benchmarks/plausibility.py's docstring. "
        f"MedLAM `{Path(model_path).name}` (the shipped model unless MEDLSAM_MEDLAM is set); "
        f"machine: {machine_line()}.",
        f"- The decision (`LocalizeOptions`, `medlsam.atlas.plausibility.implausible`): {rule}.",
        f"- Command: `{command}`{outside_note(command)}",
        "",
        "## Outcome of the decision",
        "",
        "Present organs on OpenKBP count where contoured (kept: found; lost: refused); an organ found with its box "
        "centre outside the truth's box (2 voxels around) is 'found off target' (for thorax_rt's mandible, larynx and "
        f"parotids: centre below z {TOP_MM:.0f} mm). Absent: refused or drawn. Partial: the organ is there, not the "
        "anatomy around it that its templates hold (the thorax bank's cord and lung apices in a head-and-neck scan); "
        "unsure: not known for sure (an uncontoured organ, a parotid's lower pole).",
        "",
        *outcome_table(rows),
        "",
        "Failures (present organs lost, absent organs drawn, organs found off target):",
        "",
        *failures(rows),
        "",
        "## The cues",
        "",
        "The templates' agreement (median NCC of one template's neighbourhood matched in another's): "
        + ", ".join(f"{n} {a:.3f}" for n, a in agreement["hn"].items() if a is not None)
        + "; the thorax bank has one template (no agreement).",
        "",
        *cue_table(rows),
        "",
        "![cues of present, absent and unsure organs](plausibility.png)",
        "",
        "## What `medlsam segment` draws (default pipeline, default options)",
        "",
        "| scan | bank | organ | cc drawn | of which below thorax_rt's top | not found because |",
        "|---|---|---|---|---|---|",
    ]
    for d in drawn:
        below = f"{d['cc_below_top']:.1f}" if "cc_below_top" in d else ""
        lines.append(f"| {d['scan']} | {d['bank']} | {d['organ']} | {d['cc']:.1f} | {below} | {d['reason']} |")
    notes = RESULTS.parent / "notes" / "plausibility.md"
    if notes.is_file():
        lines += ["", notes.read_text()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(
        json.dumps({"rule": rule, "agreement": agreement, "rows": rows, "drawn": drawn}, indent=1)
    )
    plot(rows, options, args.out.with_suffix(".png"))
    print(args.out.with_suffix(".md").read_text())
