"""Click-editing benchmark: Dice against the number of simulated clicks, per organ, on OpenKBP.

    python benchmarks/editing.py [--split validation] [--cases N] [--threads 1] [--set reach_mm=10] [--rows ...]

Each scan's starting point is cached in --cache (default /tmp/medlsam-edit-cache; restartable): the 5 protocol
templates' bank, the template-prior auto-segmentation (``SegmentOptions(prior_weight=1)``: no SAM, Dice 0.550
against 0.548 for the SAM blend on the 33 validation scans) and each organ's prior. Rows:

- edit: clicks correct the auto-segmentation (``medlsam.interact.editing.edit_label``); the first click already at the
  largest error.
- scratch: no auto-segmentation; organ-labelled clicks, the first at the organ's centre on its middle slice; the
  organ starts from its template posterior alone (what the edit task does for an organ with no current label).
- agnostic: no template knowledge (no prior, no intensity model): the class-agnostic edit from the same clicks.

Clicks: ``medlsam.interact.click_simulator`` (each later click at the most interior voxel of the largest 3D error).
Dice and
HD95 after 0, 1, 2, 3, 5, 10 clicks; seconds per click (median) against one LiteMedSAM encoder call. Writes
benchmarks/results/editing.md, .png and .json (--out). The query's labels are read only to place the clicks and
score, as a simulated annotator would.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import ORGANS, RESULTS, OpenKBP, machine_line, template_bank  # noqa: E402
from medlsam.atlas.prior import FilePrior  # noqa: E402
from medlsam.interact.click_simulator import error_click, organ_centre_click
from medlsam.interact.editing import EditOptions, IntensityModel, OrganClicks, edit_label  # noqa: E402
from medlsam.io.volume import load_ct, read_volume  # noqa: E402
from medlsam.paths import SHIPPED_CLICK_REFINER  # noqa: E402
from medlsam.utils.metrics import cranio_caudal_axis, dice, hd95  # noqa: E402

CLICKS = (0, 1, 2, 3, 5, 10)
ROWS = {
    "edit": "editing the auto-segmentation",
    "scratch": "from scratch, organ-labelled clicks",
    "agnostic": "class-agnostic (no templates)",
}
METHODS = {"refiner": "click refiner network", "geodesic": "geodesic edit"}


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


def write_report(out: Path, args, options: EditOptions, rows: list[dict], result: dict, encoder_s: float | None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [n for n in CLICKS if n <= args.max_clicks]
    scans = len({r["case"] for r in rows})
    lines = [
        "# Click editing: Dice against simulated clicks (OpenKBP)",
        "",
        f"- Split: {args.split}, {scans} scans, every contoured organ; templates: the 5 protocol templates "
        "(as the segmentation benchmark).",
        f"- Machine: {machine_line()}; load average at the end {os.getloadavg()[0]:.1f}.",
        f"- Click refiner: `{args.refiner_record}`.",
        f"- Geodesic edit options: `{options}`.",
        "- Start of `edit`: the template-prior auto-segmentation (`SegmentOptions(prior_weight=1)`, no SAM).",
        f"- Command: `python benchmarks/editing.py {' '.join(sys.argv[1:])}`",
        "",
        "Mean over scans per organ, then over the organs (± std over organs); HD95 in mm over non-empty masks.",
        "",
        "| start, method | " + " | ".join(f"Dice {n}" for n in counts) + " | " + f"HD95 0 / {counts[-1]} | "
        "s first click | s later click (median / 90th pct / max) |",
        "|---|" + "---|" * (len(counts) + 3),
    ]
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
    if encoder_s:
        lines += ["", f"One LiteMedSAM encoder call (one slice) on this machine: {encoder_s:.2f} s."]
        for key, res in result.items():
            if res["later_click_s"] is not None:
                lines.append(
                    f"- {_label(key)}: a later click costs {res['later_click_s'] / encoder_s:.2f} encoder calls."
                )
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
    lines += ["", f"![Dice against clicks]({out.name}.png)", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    summary_json = {" / ".join(key): res for key, res in result.items()}
    out.with_suffix(".json").write_text(json.dumps({"summary": summary_json, "rows": rows}, indent=1))
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
    fig.savefig(out.with_suffix(".png"), dpi=90)
    plt.close(fig)
    print(f"wrote {out.with_suffix('.md')}")


def _refiner_record(path: str) -> dict:
    """The training record stored with the click refiner's weights (empty when there are none)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True).get("record", {})
    except (OSError, RuntimeError, AttributeError):
        return {}


def _mm(value: float) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:.1f}"


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
    parser.add_argument("--cache", default="/tmp/medlsam-edit-cache")
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
    if args.load:
        rows = [r for path in args.load.split(",") for r in json.loads(Path(path).read_text())["rows"]]
    else:
        rows = run(args, data, options)
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
