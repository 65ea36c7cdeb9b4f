"""Localisation benchmark on the OpenKBP validation split (protocol: ../shared/docs/evaluation.md).

Per organ: 3D box IoU (a missed organ counts 0) and wall distance (mean, z faces, in-plane faces) for
MedLAM configurations (WPL/SPL, coarse only / refined, 1-3 jumps, 1/3/5 templates) and for multi-atlas
registration of the same templates. Writes benchmarks/results/localization.md and .png.

    python benchmarks/localization.py [--model CKPT] [--cases N] [--skip-registration]
    python benchmarks/localization.py --registration-only   # registration rows alone, saved for later runs

Registration does not depend on the MedLAM model, so its per-scan results are kept in
results/localization_registration.json and reused by later runs over the same scans.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ORGANS, RESULTS, OpenKBP, command_line, machine_line, mean_std, outside_note, template_bank  # noqa: E402
from medlsam.atlas.localize import LocalizeOptions, Localizer  # noqa: E402
from medlsam.io.grid import to_localization_grid  # noqa: E402
from medlsam.io.volume import load_ct, read_volume  # noqa: E402
from medlsam.medlam.network import load_medlam  # noqa: E402
from medlsam.paths import default_medlam_path  # noqa: E402
from medlsam.utils.metrics import box_iou, cranio_caudal_axis, label_box, wall_distances  # noqa: E402
from registration_baseline import register_and_fuse  # noqa: E402

DEFAULT = "MedLAM jump + template matching (default)"
CONFIGS = {  # name -> (templates, LocalizeOptions)
    DEFAULT: (5, LocalizeOptions()),
    "coarse only, 1 jump (reference coarse)": (5, LocalizeOptions(match=False)),
    "coarse only, 2 jumps": (5, LocalizeOptions(jumps=2, match=False)),
    "MSS refined, 1 jump (reference MedLAM)": (5, LocalizeOptions(refine=True, match=False)),
    "MSS refined + template matching": (5, LocalizeOptions(refine=True)),
    "SPL (default + slab boxes)": (5, LocalizeOptions(mode="spl")),
    "1 template": (1, LocalizeOptions()),
    "3 templates": (3, LocalizeOptions()),
}


def slice_box_iou(label: np.ndarray, z_axis: int, boxes: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean 2D IoU over the organ's slices between the true slice box and the prompt box of that slice."""
    scores = []
    in_plane = [a for a in range(3) if a != z_axis]
    for k in np.unique(np.nonzero(label)[z_axis]):
        mask = np.take(label, k, axis=z_axis)
        rows, cols = np.nonzero(mask)
        true = (np.array([rows.min(), cols.min()]), np.array([rows.max(), cols.max()]))
        best = 0.0
        for lo, hi in boxes:
            if lo[z_axis] <= k <= hi[z_axis]:
                p = (np.array(lo)[in_plane], np.array(hi)[in_plane])
                inter = np.clip(np.minimum(p[1], true[1]) - np.maximum(p[0], true[0]) + 1, 0, None).prod()
                union = (p[1] - p[0] + 1).prod() + (true[1] - true[0] + 1).prod() - inter
                best = max(best, inter / union)
        scores.append(best)
    return float(np.mean(scores)) if scores else 0.0


def score_boxes(boxes: dict[str, tuple | None], slabs: dict[str, list], label, contoured, names, z_axis, spacing):
    rows = {}
    for organ in ORGANS:
        if organ not in contoured:
            continue
        mask = label.array == names[organ]
        truth = label_box(mask)
        if truth is None:
            continue
        box = boxes.get(organ)
        row = {"iou": 0.0, "found": box is not None}
        if box is not None:
            row["iou"] = box_iou(box, truth)
            row.update({f"wd_{k}": v for k, v in wall_distances(box, truth, spacing, z_axis).items()})
            prompt_boxes = slabs.get(organ) or [box]
            row["slice_iou"] = slice_box_iou(mask, z_axis, prompt_boxes)
        else:
            row["slice_iou"] = 0.0
        rows[organ] = row
    return rows


def run_medlam(data: OpenKBP, model, cases: list[dict], templates: list[str], bank_folder: Path | None) -> dict:
    banks = {
        count: template_bank(data, model, templates[:count], bank_folder / f"bank_{count}.pt" if bank_folder else None)
        for count in sorted({c for c, _ in CONFIGS.values()})
    }
    results = {name: {} for name in CONFIGS}
    for case in cases:
        volume = load_ct(data.image(case["id"]))
        label = read_volume(data.label(case["id"]))
        z_axis, spacing = cranio_caudal_axis(volume.affine), volume.spacing
        for name, (count, options) in CONFIGS.items():
            tic = time.perf_counter()
            grid = to_localization_grid(volume)  # timed: part of localising a new scan
            grid_seconds = time.perf_counter() - tic
            out = Localizer(model, banks[count], options).localize(grid)
            seconds = time.perf_counter() - tic
            out["timings_s"]["resample"] = round(grid_seconds, 3)
            boxes = {
                n: (np.array(o.box_voxel[0]), np.array(o.box_voxel[1])) if o.found else None
                for n, o in out["organs"].items()
            }
            slabs = {
                n: [(np.array(s["box_voxel"][0]), np.array(s["box_voxel"][1])) for s in o.slabs]
                for n, o in out["organs"].items()
                if o.slabs
            }
            rows = score_boxes(boxes, slabs, label, case["contoured"], data.values, z_axis, spacing)
            scores = {n: o.score for n, o in out["organs"].items()}
            results[name][case["id"]] = {
                "organs": rows,
                "seconds": seconds,
                "scores": scores,
                "timings": out["timings_s"],
            }
        main = results[DEFAULT][case["id"]]
        print(
            f"{case['id']}: mean IoU {np.mean([r['iou'] for r in main['organs'].values()]):.3f} "
            f"in {main['seconds']:.2f} s",
            flush=True,
        )
    return results


REGISTRATION_CACHE = RESULTS / "localization_registration.json"


def run_registration(data: OpenKBP, cases: list[dict], templates: list[str]) -> dict:
    """Per-scan registration results; scans already in REGISTRATION_CACHE (same templates) are reused."""
    cache = json.loads(REGISTRATION_CACHE.read_text()) if REGISTRATION_CACHE.exists() else {}
    if cache.get("templates") != templates:
        cache = {"templates": templates, "cases": {}}
    results = {}
    for case in cases:
        if case["id"] in cache["cases"]:
            results[case["id"]] = cache["cases"][case["id"]]
            continue
        volume = load_ct(data.image(case["id"]))
        label = read_volume(data.label(case["id"]))
        _, fused_boxes, seconds = register_and_fuse(
            data.image(case["id"]),
            [data.image(t) for t in templates],
            [data.label(t) for t in templates],
            list(data.names),
        )
        boxes = {data.names[v]: b for v, b in fused_boxes.items()}
        rows = score_boxes(
            boxes, {}, label, case["contoured"], data.values, cranio_caudal_axis(volume.affine), volume.spacing
        )
        results[case["id"]] = cache["cases"][case["id"]] = {"organs": rows, "seconds": seconds}
        RESULTS.mkdir(parents=True, exist_ok=True)
        REGISTRATION_CACHE.write_text(json.dumps(cache, indent=1, default=float))
        print(
            f"registration {case['id']}: mean IoU {np.mean([r['iou'] for r in rows.values()]):.3f} in {seconds:.1f} s",
            flush=True,
        )
    return results


def summarise(per_case: dict) -> dict:
    """Per organ mean over scans, then the mean over organs."""
    out = {"organs": {}}
    for organ in ORGANS:
        rows = [c["organs"][organ] for c in per_case.values() if organ in c["organs"]]
        if not rows:
            continue
        found = [r for r in rows if r["found"]]
        out["organs"][organ] = {
            "n": len(rows),
            "missed": len(rows) - len(found),
            "iou": [r["iou"] for r in rows],
            "slice_iou": [r["slice_iou"] for r in rows],
            **{k: [r[k] for r in found] for k in ("wd_mean", "wd_z", "wd_inplane")},
        }
    organs = out["organs"].values()
    for key in ("iou", "slice_iou", "wd_mean", "wd_z", "wd_inplane"):
        out[key] = float(np.mean([np.mean(o[key]) for o in organs if o[key]]))
        out[key + "_std"] = float(np.std([np.mean(o[key]) for o in organs if o[key]]))
    out["seconds_median"] = float(np.median([c["seconds"] for c in per_case.values()]))
    out["missed"] = sum(o["missed"] for o in organs)
    return out


def write_report(summaries: dict, model_path: Path, templates: list[str], cases: int, raw: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    command = command_line("benchmarks/localization.py")
    lines = [
        "# Localisation benchmark (OpenKBP validation split)",
        "",
        f"- Scans: {cases} validation cases; templates: {', '.join(templates)} (the first five train cases, "
        "by case number, with all seven organs); only contoured organs are scored.",
        f"- MedLAM model: `{Path(model_path).name}`; machine: {machine_line()}.",
        "- Box IoU: 3D, inclusive voxel indices in each scan's own grid; a missed organ counts 0. Wall distance:"
        " mean |face difference| in mm over found organs (z = the two cranio-caudal faces). Slice IoU: mean 2D"
        " IoU, over the organ's slices, of the prompt box (WPL: the organ box, SPL: the slab box) with the"
        " slice's true box. Mean over scans per organ, then over organs (± std over organs).",
        f"- Command (from the clone's root, data in `../shared/data`): `{command}`{outside_note(command)}",
        "",
        "| configuration | box IoU | slice IoU | wall mm | z faces mm | in-plane mm | missed | s/scan (median) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summaries.items():
        lines.append(
            f"| {name} | {s['iou']:.3f} ± {s['iou_std']:.3f} | {s['slice_iou']:.3f} | {s['wd_mean']:.1f} | "
            f"{s['wd_z']:.1f} | {s['wd_inplane']:.1f} | {s['missed']} | {s['seconds_median']:.2f} |"
        )
    default = raw["medlam"].get(DEFAULT, {})
    if default:
        stages = ("resample", "coarse", "refine", "match")
        medians = {k: np.median([c["timings"].get(k, 0.0) for c in default.values()]) for k in stages}
        lines += [
            "",
            "Default configuration, median seconds per stage: "
            + ", ".join(f"{k} {v:.2f}" for k, v in medians.items())
            + ".",
        ]
    lines += [
        "",
        "## Per organ (default configuration and registration)",
        "",
        "| organ | "
        + " | ".join(
            f"{n} IoU | {n} wall mm"
            for n in summaries
            if n in (DEFAULT, "registration (SimpleITK affine + B-spline, majority vote)")
        )
        + " |",
        "|---|"
        + "---|---|"
        * sum(n in (DEFAULT, "registration (SimpleITK affine + B-spline, majority vote)") for n in summaries),
    ]
    for organ in ORGANS:
        cells = []
        for name, s in summaries.items():
            if name not in (DEFAULT, "registration (SimpleITK affine + B-spline, majority vote)"):
                continue
            o = s["organs"].get(organ)
            cells += [mean_std(o["iou"]), mean_std(o["wd_mean"])] if o else ["n/a", "n/a"]
        lines.append(f"| {organ} | " + " | ".join(cells) + " |")
    lines += ["", "![per-organ IoU](localization.png)", ""]
    notes = Path(__file__).resolve().parent / "notes" / "localization.md"  # the hand-written analysis
    if notes.exists():
        lines += [notes.read_text()]
    (RESULTS / "localization.md").write_text("\n".join(lines))
    (RESULTS / "localization.json").write_text(json.dumps(raw, indent=1, default=float))
    plot(summaries)


def plot(summaries: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summaries)
    fig, axes = plt.subplots(1, 2, figsize=(15, 5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        organs = summaries[name]["organs"]
        values = [np.mean(organs[o]["iou"]) if o in organs else 0 for o in ORGANS]
        axes[0].bar(np.arange(len(ORGANS)) + i * width, values, width, label=name)
    axes[0].set_xticks(np.arange(len(ORGANS)) + 0.4, ORGANS, rotation=30)
    axes[0].set_ylabel("3D box IoU (missed = 0)")
    axes[0].legend(fontsize=7)
    axes[1].barh(names, [summaries[n]["seconds_median"] for n in names])
    axes[1].set_xlabel("seconds per scan (median)")
    fig.tight_layout()
    fig.savefig(RESULTS / "localization.png", dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="MedLAM checkpoint (default: the shipped model)")
    parser.add_argument("--data", type=Path, help="openkbp folder (default: $MEDLSAM_DATA/openkbp)")
    parser.add_argument("--cases", type=int, default=0, help="only the first N validation cases")
    parser.add_argument("--skip-registration", action="store_true")
    parser.add_argument("--registration-only", action="store_true", help="run (and cache) registration only")
    parser.add_argument("--banks", type=Path, help="folder keeping the template banks (bank_N.pt) between runs")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    data = OpenKBP(args.data)
    if args.registration_only:
        run_registration(data, data.split("validation")[: args.cases or None], data.templates(5))
        return
    model_path = args.model or default_medlam_path()
    model = load_medlam(model_path)
    cases = data.split("validation")[: args.cases or None]
    templates = data.templates(5)
    raw = {"medlam": run_medlam(data, model, cases, templates, args.banks)}
    summaries = {name: summarise(per_case) for name, per_case in raw["medlam"].items()}
    if not args.skip_registration:
        raw["registration"] = run_registration(data, cases, templates)
        summaries["registration (SimpleITK affine + B-spline, majority vote)"] = summarise(raw["registration"])
    write_report(summaries, Path(model_path), templates, len(cases), raw)
    print((RESULTS / "localization.md").read_text())


if __name__ == "__main__":
    main()
