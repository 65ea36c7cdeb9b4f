"""Click-editing benchmark: Dice against the number of simulated clicks, per organ, on OpenKBP.

    python benchmarks/editing.py [--split validation] [--cases N] [--threads 1] [--set reach_mm=10] [--rows ...]

Each scan's starting point is cached in --cache (default runs/benchmarks/editing/, git-ignored; restartable;
--cache-only computes only the starts, so that runs of single rows can then go in parallel): the 5 protocol
templates' bank, the template-prior auto-segmentation (``SegmentOptions(prior_weight=1)``: no SAM, Dice 0.550
against 0.548 for the SAM blend on the 33 validation scans) and each organ's prior. Rows:

- edit: clicks correct the auto-segmentation (``medlsam.interact.editing.edit_label``); the first click already at the
  largest error.
- scratch: no auto-segmentation; organ-labelled clicks, the first at the organ's centre on its middle slice; the
  organ starts from its template posterior alone (what the edit task does for an organ with no current label).
- agnostic: no template knowledge (no prior, no intensity model): the class-agnostic edit from the same clicks.

Clicks: ``medlsam.interact.click_simulator`` (each later click at the most interior voxel of the largest 3D error).
Dice and HD95 after 0, 1, 2, 3, 5, 10 clicks; seconds per click (median) against one LiteMedSAM encoder call.
Writes benchmarks/results/editing.md, .png and .json (--out; the .json keeps the rows and the command that computed
them; report: benchmarks/editing_report.py). --load A.json,B.json reports the rows of earlier runs together and
states their commands, then its own: the report's recipe from a fresh clone. The query's labels are read only to
place the clicks and score, as a simulated annotator would.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from editing_report import CLICKS, ROWS, load_runs, summary, write_report  # noqa: E402

from common import ORGANS, RESULTS, RUNS, OpenKBP, command_line, template_bank  # noqa: E402
from medlsam.atlas.prior import FilePrior  # noqa: E402
from medlsam.interact.click_simulator import error_click, organ_centre_click  # noqa: E402
from medlsam.interact.editing import EditOptions, IntensityModel, OrganClicks, edit_label  # noqa: E402
from medlsam.io.volume import load_ct, read_volume  # noqa: E402
from medlsam.paths import SHIPPED_CLICK_REFINER  # noqa: E402
from medlsam.utils.metrics import cranio_caudal_axis, dice, hd95  # noqa: E402


def cached_start(data: OpenKBP, case_id: str, cache: Path, localizer, bank) -> dict:
    """The scan's auto-segmentation (template prior, no SAM) and organ priors, computed once and cached."""
    path = cache / f"{case_id}.npz"
    if not path.exists():
        from medlsam.segment.pipeline import MedLSAMPipeline, SegmentOptions
        from medlsam.utils.atomic import atomic_path

        volume = load_ct(data.image(case_id))
        tic = time.perf_counter()
        located = localizer.localize(volume, None, mode="wpl", prior=True)["organs"]
        result = MedLSAMPipeline(localizer, None, SegmentOptions(prior_weight=1.0)).segment_locations(volume, located)
        arrays = {"label": result.label, "seconds": np.array(time.perf_counter() - tic)}
        for name, loc in located.items():
            if loc.prior is not None:
                arrays[f"{name}__low"], arrays[f"{name}__high"] = loc.prior.low, loc.prior.high
                arrays[f"{name}__p"] = loc.prior.probabilities
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **arrays)
    stored = np.load(path)
    priors = {
        name: FilePrior(stored[f"{name}__low"], stored[f"{name}__high"], stored[f"{name}__p"])
        for name in bank.organs
        if f"{name}__p" in stored
    }
    return {"label": stored["label"], "priors": priors}


def simulate(
    hu,
    spacing,
    truth,
    start,
    value,
    prior,
    intensity,
    options,
    clicks: int,
    first_at_centre: bool,
    axis: int,
    refiner=None,
) -> dict:
    """Dice/HD95 after each click count in CLICKS (up to ``clicks``) and the seconds of each edit."""
    label = start.copy()
    organ = OrganClicks()
    scores, seconds = {}, []
    for n in range(clicks + 1):
        pred = label == value
        if n in CLICKS:
            scores[n] = (dice(pred, truth), hd95(pred, truth, spacing))
        if n == clicks:
            break
        if n == 0 and first_at_centre:
            click, missed = organ_centre_click(truth, axis), True
        else:
            nxt = error_click(pred, truth)
            if nxt is None:  # perfect: the later counts keep this score
                for m in CLICKS:
                    if n < m <= clicks:
                        scores[m] = scores.get(n, (1.0, 0.0))
                break
            click, missed = nxt
        if missed:
            organ = OrganClicks(np.vstack([organ.foreground, [click]]), organ.background)
        else:
            organ = OrganClicks(organ.foreground, np.vstack([organ.background, [click]]))
        tic = time.perf_counter()
        label, _ = edit_label(
            start,
            hu,
            spacing,
            {"organ": value},
            {"organ": organ},
            {"organ": prior},
            {"organ": intensity},
            options,
            axis,
            refiner,
        )
        seconds.append(time.perf_counter() - tic)
    return {"scores": scores, "seconds": seconds}


def run(args, data: OpenKBP, options: EditOptions) -> list[dict]:
    from medlsam.atlas.localize import Localizer
    from medlsam.medlam.network import load_medlam
    from medlsam.paths import default_medlam_path

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    model = load_medlam(default_medlam_path())
    templates = data.templates(5)
    bank = template_bank(data, model, templates, cache / "bank5.pt")
    localizer = Localizer(model, bank)
    refiner = None
    if args.method == "refiner":
        from medlsam.interact.refiner import build_click_refiner

        refiner = build_click_refiner(args.refiner)
    cases = [c for c in data.split(args.split) if c["id"] not in templates][args.first_case :][: args.cases or None]
    rows = []
    for case in cases:
        start = cached_start(data, case["id"], cache, localizer, bank)
        if args.cache_only:
            continue
        volume = load_ct(data.image(case["id"]))
        hu, spacing = volume.array.astype(np.float32), np.asarray(volume.spacing, np.float64)
        truth_label = read_volume(data.label(case["id"])).array
        axis = cranio_caudal_axis(volume.affine)
        for organ in ORGANS:
            if organ not in case["contoured"] or organ not in args.organs:
                continue
            value = data.values[organ]
            truth = truth_label == value
            if not truth.any():
                continue
            prior = start["priors"].get(organ)
            intensity = IntensityModel.from_patches(bank.organs[organ].neighbourhoods)
            for row in args.rows:
                if row == "edit":
                    base, p, im, centre = start["label"], prior, intensity, False
                elif row == "scratch":
                    base = np.zeros_like(start["label"])
                    if prior is not None:
                        base[prior.region()] = np.where(prior.probabilities > 0.5, value, 0)
                    p, im, centre = prior, intensity, True
                else:
                    base, p, im, centre = np.zeros_like(start["label"]), None, None, True
                out = simulate(hu, spacing, truth, base, value, p, im, options, args.max_clicks, centre, axis, refiner)
                rows.append(
                    {
                        "case": case["id"],
                        "organ": organ,
                        "row": row,
                        "method": args.method,
                        **{f"dice_{n}": round(s[0], 4) for n, s in out["scores"].items()},
                        **{f"hd95_{n}": None if s[1] is None else round(s[1], 2) for n, s in out["scores"].items()},
                        "seconds": [round(s, 3) for s in out["seconds"]],
                    }
                )
                print(
                    f"{case['id']} {organ} {row}: "
                    + " ".join(f"{n}:{s[0]:.3f}" for n, s in sorted(out["scores"].items())),
                    flush=True,
                )
    return rows


def encoder_seconds(threads: int) -> float:
    """Median seconds of one LiteMedSAM encoder call on a 128 x 128 CT slice (3 calls)."""
    from medlsam.segment.sam import build_segmenter
    from medlsam.segment.sam.slices import SliceEmbeddings

    volume = load_ct(OpenKBP().image(OpenKBP().split("validation")[0]["id"]))
    embeddings = SliceEmbeddings(build_segmenter("lite_medsam"), volume)
    times = []
    for k in (60, 61, 62):
        tic = time.perf_counter()
        embeddings.get(k)
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def _refiner_record(path: str) -> dict:
    """The training record stored with the click refiner's weights (empty when there are none)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True).get("record", {})
    except (OSError, RuntimeError, AttributeError):
        return {}


def _option(item: str) -> tuple[str, float]:
    key, _, value = item.partition("=")
    if key not in EditOptions.__dataclass_fields__:
        raise SystemExit(f"unknown EditOptions field {key!r}")
    return key, float(value)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", default="validation", choices=("train", "validation"))
    parser.add_argument("--cases", type=int, default=0, help="only the first N scans (templates excluded)")
    parser.add_argument("--first-case", type=int, default=0)
    parser.add_argument("--organs", default=",".join(ORGANS))
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--max-clicks", type=int, default=10)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an EditOptions field")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--method",
        default="refiner",
        choices=("refiner", "geodesic"),
        help="the click refiner network or the geodesic edit",
    )
    parser.add_argument("--refiner", default=str(SHIPPED_CLICK_REFINER), help="the click refiner's weights")
    parser.add_argument("--cache", default=str(RUNS / "editing"), help="the scans' starts (and the bank), kept")
    parser.add_argument("--encoder", action="store_true", help="also time one LiteMedSAM encoder call")
    parser.add_argument("--out", type=Path, default=RESULTS / "editing")
    parser.add_argument("--load", default="", help="comma-separated .json of earlier runs: report their rows")
    parser.add_argument("--cache-only", action="store_true", help="only compute the scans' cached starts")
    args = parser.parse_args(argv)
    args.organs = [o.strip() for o in args.organs.split(",") if o.strip()]
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    torch.set_num_threads(args.threads)
    options = EditOptions(**dict(_option(s) for s in args.set))
    data = OpenKBP()
    args.command = command_line("benchmarks/editing.py", argv)
    if args.load:
        rows, args.runs = load_runs([path for path in args.load.split(",") if path])
    else:
        rows, args.runs = run(args, data, options), [args.command]
    if args.cache_only:
        return 0
    result = summary(rows, args.max_clicks)
    args.refiner_record = _refiner_record(args.refiner)
    for key, res in result.items():
        print(key, " ".join(f"{n}:{v['dice']:.3f}" for n, v in res["per_clicks"].items()), res["later_click_s"])
    write_report(args.out, args, options, rows, result, encoder_seconds(args.threads) if args.encoder else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
