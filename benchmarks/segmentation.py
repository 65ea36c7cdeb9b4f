"""Segmentation benchmark on the OpenKBP validation split (protocol: ../shared/docs/evaluation.md), or on train
scans that are not templates (``--split train``: for tuning, never reported as the result).

Per organ Dice and HD95 (a missed organ counts Dice 0 and is never dropped; its HD95 is reported missing)
for the rows of ROWS: the default pipeline (MedLAM + template matching, per-slice boxes of the organ prior,
SAM blended with the prior), the prior alone, SAM alone on the prior's boxes, MedLAM boxes (WPL, SPL), and
ground-truth prompts: the organ's 3D box on every slice (WPL) and each slice's own box. Also the time of one
scan split by stage and the encoder calls against the reference approach (one encoder call per organ per
slice). Writes benchmarks/results/segmentation.md, .json and .png (--out), and appends
benchmarks/notes/segmentation.md (the measured account of what was tried).

    python benchmarks/segmentation.py [--rows default,prior,wpl] [--cases N] [--first-case N] [--threads 1]
                                      [--split validation|train]
                                      [--bank BANK] [--set key=value] [--model CKPT] [--backend lite_medsam]

The rows of one scan share one slice-embedding cache; the timing split and the encoder calls are those of
the first row, which starts from an empty cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ORGANS, RESULTS, OpenKBP, machine_line, mean_std, template_bank  # noqa: E402
from medlsam.atlas.localize import LocalizeOptions, Localizer, OrganLocation  # noqa: E402
from medlsam.atlas.templates import TemplateBank  # noqa: E402
from medlsam.io.volume import load_ct, read_volume  # noqa: E402
from medlsam.medlam.network import load_medlam  # noqa: E402
from medlsam.paths import default_medlam_path  # noqa: E402
from medlsam.segment.outputs import write_segmentation  # noqa: E402
from medlsam.segment.pipeline import MedLSAMPipeline, SegmentOptions  # noqa: E402
from medlsam.segment.sam import build_segmenter  # noqa: E402
from medlsam.segment.sam.slices import SliceEmbeddings  # noqa: E402
from medlsam.utils.metrics import cranio_caudal_axis, dice, hd95, label_box  # noqa: E402

POOL_ATLASES = 5  # the prior_atlas row: each organ's prior from this many of the --pool templates
# key -> (row name, prompts: MedLAM's localisation or ground truth, SegmentOptions fields over the defaults,
# segmenter: the shipped LiteMedSAM or the one adapted to the templates, --adapted WEIGHTS)
ROWS = {
    "default": ("MedLSAM default (adapted weights with --adapted, else shipped)", "medlam", {}, "default"),
    "prior": ("template prior alone (no SAM)", "medlam", {"prior_weight": 1.0}, "shipped"),
    "prior_weighted": (
        "template prior alone, placements weighed by their match (sharpness 10)",
        "medlam",
        {"prior_weight": 1.0},
        "shipped",
    ),
    "prior_uncalibrated": (
        "template prior alone, uncalibrated (every organ cut at 0.5)",
        "medlam",
        {"prior_weight": 1.0},
        "shipped",
    ),
    "default_uncalibrated": ("MedLSAM default, uncalibrated prior", "medlam", {}, "default"),
    "prior_atlas": (
        f"template prior alone, atlas selection: the {POOL_ATLASES} best-matching pool templates per organ",
        "medlam",
        {"prior_weight": 1.0},
        "shipped",
    ),
    "prior_pool": ("template prior alone, every pool template", "medlam", {"prior_weight": 1.0}, "shipped"),
    "prior_slabs": (
        "template prior alone, slab matching only (no registration)",
        "medlam",
        {"prior_weight": 1.0},
        "shipped",
    ),
    "shipped": ("shipped LiteMedSAM + prior (w 0.8)", "medlam", {"prior_weight": 0.8}, "shipped"),
    "samprior": ("SAM on prior boxes, no blend", "medlam", {"prior_weight": 0.0}, "shipped"),
    "maskprompt": (
        "shipped LiteMedSAM, box + prior mask prompt, + prior (w 0.8)",
        "medlam",
        {"prior_weight": 0.8, "mask_prompt": True},
        "shipped",
    ),
    "adapted": (
        "adapted LiteMedSAM, box + prior mask prompt, + prior (w 0.5)",
        "medlam",
        {"prior_weight": 0.5},
        "adapted",
    ),
    "adapted_sam": (
        "adapted LiteMedSAM, box + prior mask prompt, no blend",
        "medlam",
        {"prior_weight": 0.0},
        "adapted",
    ),
    "adapted_box": (
        "adapted LiteMedSAM, box only, + prior (w 0.5)",
        "medlam",
        {"prior_weight": 0.5, "mask_prompt": False},
        "adapted",
    ),
    "wpl": ("MedLAM boxes, WPL", "medlam", {"mode": "wpl", "prior_weight": 0.0, "slice_spacing_mm": 0.0}, "shipped"),
    "spl": ("MedLAM boxes, SPL", "medlam", {"mode": "spl", "prior_weight": 0.0, "slice_spacing_mm": 0.0}, "shipped"),
    "gt3d": (
        "ground-truth 3D box (WPL)",
        "truth3d",
        {"mode": "wpl", "prior_weight": 0.0, "slice_spacing_mm": 0.0},
        "shipped",
    ),
    "gtslice": (
        "shipped LiteMedSAM, ground-truth box of every slice",
        "truthslice",
        {"mode": "spl", "prior_weight": 0.0, "slice_spacing_mm": 0.0, "mask_prompt": False},
        "shipped",
    ),
    "gtslice_adapted": (
        "adapted LiteMedSAM, ground-truth box of every slice",
        "truthslice",
        {"mode": "spl", "prior_weight": 0.0, "slice_spacing_mm": 0.0, "mask_prompt": False},
        "adapted",
    ),
}
# rows whose localisation differs from the default (LocalizeOptions fields over the defaults)
LOCALIZE = {
    "prior_weighted": {"prior_match_sharpness": 10.0},
    "prior_slabs": {"prior_registration": False},
    "prior_atlas": {"prior_atlases": POOL_ATLASES},
    "prior_pool": {"prior_atlases": 0},
}
# rows whose bank holds the --pool templates (the protocol's 5 among them), calibrated with the row's localisation
POOL_ROWS = {"prior_atlas", "prior_pool"}
# rows whose bank has every organ's prior cut at 0.5 (as before medlsam.atlas.calibration)
UNCALIBRATED = {"prior_uncalibrated", "default_uncalibrated"}
STAGES = ["load", "localize", "prompts", "encode", "decode", "assemble", "write"]


def uncalibrated(bank: TemplateBank) -> TemplateBank:
    """A copy of ``bank`` whose organs' priors are all cut at 0.5."""
    organs = {name: replace(organ, prior_cut=0.5) for name, organ in bank.organs.items()}
    return TemplateBank(organs, bank.model_fingerprint, bank.sources)


def truth_locations(
    label: np.ndarray, contoured: list[str], values: dict[str, int], axis: int, per_slice: bool
) -> dict[str, OrganLocation]:
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
        rows[organ] = {
            "dice": dice(mask, truth),
            "hd95": hd95(mask, truth, spacing) if mask.any() else None,
            "missed": not mask.any(),
        }
    return rows


def run(
    data: OpenKBP,
    model,
    segmenters: dict,
    cases: list[dict],
    banks: dict[str, TemplateBank],
    options: SegmentOptions,
    rows: list[str],
    embedding_cache: Path | None = None,
) -> dict:
    """Every chosen row on every case. The first row's scan starts from an empty slice-embedding cache: its
    timing split and encoder calls are reported; later rows reuse the cached slices (the adapted segmenter's
    encoder is the shipped one). ``embedding_cache``: keep each scan's slice embeddings on disk there too."""
    pipelines = {}
    for key in rows:
        opts = SegmentOptions(**{**options.__dict__, **ROWS[key][2]})
        localizer = Localizer(model, banks[key], LocalizeOptions(**LOCALIZE.get(key, {})))
        pipelines[key] = MedLSAMPipeline(localizer, segmenters[ROWS[key][3]], opts)
    names = [ROWS[key][0] for key in rows]
    results: dict = {name: {} for name in names}
    results["timings"], results["encoder_calls"] = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for case in cases:
            cid = case["id"]
            tic = time.perf_counter()
            volume = load_ct(data.image(cid))
            load_s = time.perf_counter() - tic
            label = read_volume(data.label(cid)).array  # scoring only
            axis = cranio_caudal_axis(volume.affine)
            shared = SliceEmbeddings(
                segmenters["shipped"],
                volume,
                window=options.window,
                cache_dir=None if embedding_cache is None else embedding_cache / cid,
            )
            line, located = [], {}
            for i, key in enumerate(rows):
                pipeline, prompts = pipelines[key], ROWS[key][1]
                embeddings = shared.with_segmenter(pipeline.segmenter)
                if prompts == "medlam":  # rows with the same localisation share it (it is deterministic)
                    opts = pipeline.options
                    how = (opts.localizer_mode, opts.uses_prior, str(LOCALIZE.get(key)), id(banks[key]))
                    tic = time.perf_counter()
                    if how not in located:
                        located[how] = pipeline.localizer.localize(
                            volume, mode=opts.localizer_mode, prior=opts.uses_prior
                        )["organs"]
                    localize_s = time.perf_counter() - tic
                    out = pipeline.segment_locations(
                        volume, located[how], embeddings=embeddings, timings={"localize": localize_s}
                    )
                else:
                    out = pipeline.segment_locations(
                        volume,
                        truth_locations(label, case["contoured"], data.values, axis, prompts == "truthslice"),
                        embeddings=embeddings,
                    )
                if i == 0:
                    if embeddings.disk_reads:  # the row's own counter (a twin of `shared` for the adapted one)
                        results["embeddings_from_disk"] = results.get("embeddings_from_disk", 0) + embeddings.disk_reads
                    write_segmentation(out, volume, Path(scratch) / "label.nii.gz")
                    results["timings"][cid] = {"load": load_s, **out.timings_s}
                    results["encoder_calls"][cid] = {
                        "encoder_calls": out.encoder_calls,
                        "reference_encoder_calls": out.reference_encoder_calls,
                    }
                    first = out
                organs = score(out.label, label, case["contoured"], data.values, volume.spacing)
                results[ROWS[key][0]][cid] = {"organs": organs, "encoder_calls": out.encoder_calls}
                line.append(f"{key} {np.mean([o['dice'] for o in organs.values()]):.3f}")
            total = sum(results["timings"][cid][s] for s in STAGES if s in results["timings"][cid])
            print(
                f"{cid}: mean Dice {', '.join(line)}; {rows[0]} scan {total:.1f} s, {first.encoder_calls} encoder "
                f"calls (reference {first.reference_encoder_calls})",
                flush=True,
            )
    return results


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


def write_report(
    results: dict,
    summaries: dict,
    model_path: Path,
    templates: list[str],
    pool: list[str],
    n_cases: int,
    split: str,
    options: SegmentOptions,
    backend: str,
    command: str,
    out: Path,
) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    timings = results["timings"]
    median = {s: float(np.median([t.get(s, 0.0) for t in timings.values()])) for s in STAGES}
    total = float(np.median([sum(t.get(s, 0.0) for s in STAGES) for t in timings.values()]))
    calls = results["encoder_calls"]
    enc = float(np.median([c["encoder_calls"] for c in calls.values()]))
    ref = float(np.median([c["reference_encoder_calls"] for c in calls.values()]))
    lines = [
        f"# Segmentation benchmark (OpenKBP {split} split)",
        "",
        f"- Scans: {n_cases} {split} cases"
        + (" that are not templates" if split == "train" else "")
        + f"; templates: {', '.join(templates)} (as the localisation benchmark)"
        + (f"; the pool rows' templates: {', '.join(pool)}" if pool else "")
        + "; only contoured organs are scored.",
        f"- MedLAM model: `{model_path}`; segmenter: `{backend}`; options: `{options}`; machine: {machine_line()}.",
        "- Dice: 3D on the scan's own grid, a missed organ (not found, empty mask) counts 0; HD95 in mm over the "
        "organs segmented (misses listed separately). Mean over scans per organ, then over organs (± std over organs).",
        f"- Command: `{command}`",
        "",
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
    lines += [
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
        "![Dice per organ](segmentation.png)",
        "",
    ]
    notes = RESULTS.parent / "notes" / "segmentation.md"
    if notes.is_file() and out.resolve() == RESULTS / "segmentation":  # the account of what was tried
        lines += ["", notes.read_text()]
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


def _option(item: str) -> tuple[str, object]:
    key, _, value = item.partition("=")
    default = SegmentOptions.__dataclass_fields__[key].default
    if default is None:  # optional fields: a switch or a number
        words = {"true": True, "on": True, "yes": True, "false": False, "off": False, "no": False}
        return key, words[value.lower()] if value.lower() in words else float(value)
    if isinstance(default, bool):
        return key, value.lower() in ("1", "true", "yes", "on")
    if isinstance(default, tuple):
        return key, tuple(float(v) for v in value.split(","))
    return key, type(default)(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="MedLAM checkpoint (default: the shipped model)")
    parser.add_argument("--data", type=Path, help="openkbp folder (default: $MEDLSAM_DATA/openkbp)")
    parser.add_argument("--cases", type=int, default=0, help="only the first N cases of the split")
    parser.add_argument("--backend", default="lite_medsam")
    parser.add_argument("--checkpoint", help="segmenter weights (SAM/MedSAM backends)")
    parser.add_argument(
        "--bank", type=Path, help="template bank file: reused if it exists (same model), else saved there"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a SegmentOptions field, e.g. --set empty_fallback=false --set zoom_below_mm=30",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--adapted", type=Path, help="LiteMedSAM weights from `medlsam adapt` on the templates (the adapted rows)"
    )
    parser.add_argument(
        "--embedding-cache",
        type=Path,
        help="keep each scan's slice embeddings (float16) in DIR/<case>/ and reuse them: later runs decode only",
    )
    parser.add_argument(
        "--rows", default=",".join(ROWS), help=f"comma-separated rows, the first timed: {', '.join(ROWS)}"
    )
    parser.add_argument("--first-case", type=int, default=0, help="skip the first N cases of the split")
    parser.add_argument(
        "--split",
        choices=("validation", "train"),
        default="validation",
        help="validation (the reported figures) or train scans that are not templates (tuning)",
    )
    parser.add_argument(
        "--pool",
        type=int,
        default=10,
        help="templates of the prior_atlas / prior_pool rows: the first N train scans with all seven organs",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "segmentation", help="report path without suffix")
    args = parser.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    torch.set_num_threads(args.threads)
    data = OpenKBP(args.data)
    model_path = args.model or default_medlam_path()
    model = load_medlam(model_path)
    segmenters = {"shipped": build_segmenter(args.backend, args.checkpoint)}
    if args.adapted:
        segmenters["adapted"] = build_segmenter(args.backend, str(args.adapted))
    segmenters["default"] = segmenters["adapted" if args.adapted else "shipped"]
    missing = [r for r in rows if ROWS[r][3] not in segmenters]
    if missing:
        parser.error(f"rows {missing} need --adapted WEIGHTS (medlsam adapt on the templates)")
    templates = data.templates(5)
    pool = data.templates(args.pool) if POOL_ROWS & set(rows) else []
    cases = [c for c in data.split(args.split) if c["id"] not in templates + pool]
    cases = cases[args.first_case :][: args.cases or None]
    options = SegmentOptions(**dict(_option(item) for item in args.set))
    bank = template_bank(data, model, templates, args.bank)
    banks = {key: uncalibrated(bank) if key in UNCALIBRATED else bank for key in rows}
    for key in POOL_ROWS & set(rows):
        localize = LocalizeOptions(**LOCALIZE[key])
        path = args.bank and args.bank.with_name(f"{args.bank.stem}-pool{args.pool}-atlases{localize.prior_atlases}.pt")
        banks[key] = template_bank(data, model, pool, path, localize)
    results = run(data, model, segmenters, cases, banks, options, rows, args.embedding_cache)
    summaries = {ROWS[key][0]: summarise(results[ROWS[key][0]]) for key in rows}
    command = "python benchmarks/segmentation.py " + " ".join(sys.argv[1:])
    write_report(
        results,
        summaries,
        Path(model_path),
        templates,
        pool,
        len(cases),
        args.split,
        options,
        args.backend,
        command,
        args.out,
    )
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
