"""Segmentation benchmark on the OpenKBP validation split (protocol: ../shared/docs/evaluation.md), or on train
scans that are not templates (``--split train``: for tuning, never reported as the result).

Per organ Dice and HD95 (a missed organ counts Dice 0 and is never dropped; its HD95 is reported missing)
for the rows of ROWS (segmentation_rows.py): the default pipeline (MedLAM + template matching, per-slice boxes
of the organ prior, SAM blended with the prior), the prior alone, SAM alone on the prior's boxes, MedLAM boxes
(WPL, SPL), and ground-truth prompts: the organ's 3D box on every slice (WPL) and each slice's own box. Also
the time of one scan split by stage and the encoder calls against the reference approach (one encoder call per
organ per slice). Writes benchmarks/results/segmentation.md, .json and .png (--out; the report module:
segmentation_report.py) with the command line that regenerates it from a fresh clone; the account of what was
tried is benchmarks/notes/segmentation.md (by hand, not copied into the report).

    python benchmarks/segmentation.py [--rows default,prior,wpl] [--cases N] [--first-case N] [--threads 1]
                                      [--split validation|train] [--adapt fp32|bf16|auto | --adapted WEIGHTS]
                                      [--bank BANK] [--set key=value] [--model CKPT] [--backend lite_medsam]

Nothing needs to exist beforehand but the data folder: the template banks are built from it on every run (--bank
keeps one between runs), and --adapt adapts LiteMedSAM to the templates first (runs/benchmarks/, git-ignored).

The rows of one scan share one slice-embedding cache; the timing split and the encoder calls are those of
the first row, which starts from an empty cache.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from segmentation_report import STAGES, summarise, write_report  # noqa: E402
from segmentation_rows import LOCALIZE, POOL_ROWS, ROWS, UNCALIBRATED  # noqa: E402

from common import ORGANS, REPO, RESULTS, RUNS, OpenKBP, command_line, template_bank  # noqa: E402
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

ADAPTED = RUNS / "segmentation" / "adapted.pt"  # --adapt writes the adapted weights here


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


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="MedLAM checkpoint (default: the shipped model)")
    parser.add_argument("--data", type=Path, help="openkbp folder (default: $MEDLSAM_DATA/openkbp)")
    parser.add_argument("--cases", type=int, default=0, help="only the first N cases of the split")
    parser.add_argument("--backend", default="lite_medsam")
    parser.add_argument("--checkpoint", help="segmenter weights (SAM/MedSAM backends)")
    parser.add_argument(
        "--bank",
        type=Path,
        help="template bank file: reused if it exists (same model), else saved there (default: built from the "
        "data folder on every run, kept nowhere)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a SegmentOptions field, e.g. --set empty_fallback=false --set zoom_below_mm=30",
    )
    parser.add_argument("--threads", type=int, default=2)
    adapted = parser.add_mutually_exclusive_group()
    adapted.add_argument(
        "--adapted", type=Path, help="LiteMedSAM weights from `medlsam adapt` on the templates (the adapted rows)"
    )
    adapted.add_argument(
        "--adapt",
        choices=("auto", "fp32", "bf16"),
        help="first adapt LiteMedSAM to the five templates (`medlsam adapt` with its defaults, training steps in "
        f"this precision; written to {ADAPTED.relative_to(REPO)}) and use it for the adapted rows",
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
    return parser


def adapt_to_templates(data: OpenKBP, model, templates: list[str], precision: str) -> Path:
    """LiteMedSAM adapted to the templates as `medlsam adapt` does by default (training steps in ``precision``),
    written to ADAPTED (overwritten on every run)."""
    from medlsam.medlam.precision import parse_precision
    from medlsam.segment.adapt import AdaptOptions, adapt

    ADAPTED.parent.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    images, labels = [data.image(t) for t in templates], [data.label(t) for t in templates]
    adapt(model, images, labels, data.names, ADAPTED, AdaptOptions(bf16=parse_precision(precision)))
    print(f"LiteMedSAM adapted to {len(templates)} templates in {time.perf_counter() - tic:.0f} s: {ADAPTED}")
    return ADAPTED


def segmenters_for(args, rows: list[str], adapted: Path | None, parser: argparse.ArgumentParser) -> dict:
    """The shipped segmenter, the adapted one (with weights) and the default rows' choice between them."""
    segmenters = {"shipped": build_segmenter(args.backend, args.checkpoint)}
    if adapted:
        segmenters["adapted"] = build_segmenter(args.backend, str(adapted))
    segmenters["default"] = segmenters["adapted" if adapted else "shipped"]
    missing = [r for r in rows if ROWS[r][3] not in segmenters]
    if missing:
        parser.error(f"rows {missing} need --adapted WEIGHTS or --adapt (medlsam adapt on the templates)")
    return segmenters


def banks_for(data: OpenKBP, model, rows: list[str], templates: list[str], pool: list[str], args) -> dict:
    """Each row's bank: the templates' (uncalibrated for UNCALIBRATED), the pool's for POOL_ROWS (calibrated with
    the row's localisation; with --bank kept beside it)."""
    bank = template_bank(data, model, templates, args.bank)
    banks = {key: uncalibrated(bank) if key in UNCALIBRATED else bank for key in rows}
    for key in POOL_ROWS & set(rows):
        localize = LocalizeOptions(**LOCALIZE[key])
        path = args.bank and args.bank.with_name(f"{args.bank.stem}-pool{args.pool}-atlases{localize.prior_atlases}.pt")
        banks[key] = template_bank(data, model, pool, path, localize)
    return banks


def main() -> None:
    options_parser = parser()
    args = options_parser.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        options_parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    if args.adapt and not any(ROWS[r][3] in ("adapted", "default") for r in rows):
        options_parser.error("--adapt: none of these rows uses the adapted segmenter")
    torch.set_num_threads(args.threads)
    data = OpenKBP(args.data)
    model_path = args.model or default_medlam_path()
    model = load_medlam(model_path)
    templates = data.templates(5)
    adapted = adapt_to_templates(data, model, templates, args.adapt) if args.adapt else args.adapted
    segmenters = segmenters_for(args, rows, adapted, options_parser)
    pool = data.templates(args.pool) if POOL_ROWS & set(rows) else []
    cases = [c for c in data.split(args.split) if c["id"] not in templates + pool]
    cases = cases[args.first_case :][: args.cases or None]
    options = SegmentOptions(**dict(_option(item) for item in args.set))
    banks = banks_for(data, model, rows, templates, pool, args)
    results = run(data, model, segmenters, cases, banks, options, rows, args.embedding_cache)
    summaries = {ROWS[key][0]: summarise(results[ROWS[key][0]]) for key in rows}
    setup = {
        "model_path": model_path,
        "templates": templates,
        "pool": pool,
        "n_cases": len(cases),
        "split": args.split,
        "options": options,
        "backend": args.backend,
        "command": command_line("benchmarks/segmentation.py"),
    }
    write_report(results, summaries, setup, args.out)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
