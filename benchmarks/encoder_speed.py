"""LiteMedSAM slice-encoder speed on this CPU: threads, channels-last, bfloat16 autocast, torch.compile and
batching, each checked against the fp32 eager masks (Dice of the masks decoded from the same boxes).

    python benchmarks/encoder_speed.py [--case openkbp_pt_201] [--slices 12] [--repeats 2]

The slices are the middle ones of the scan's organs (OpenKBP validation case); the boxes are the organs'
ground-truth slice boxes (used only to compare masks between encoder variants). Writes
benchmarks/results/encoder_speed.md and .png. Timings are medians over slices and repeats, all in one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, OpenKBP, machine_line  # noqa: E402
from medlsam.io.volume import load_ct, read_volume  # noqa: E402
from medlsam.segment.sam import build_segmenter  # noqa: E402
from medlsam.segment.sam.slices import SliceEmbeddings  # noqa: E402
from medlsam.utils.metrics import cranio_caudal_axis, dice  # noqa: E402

VARIANTS = [  # name, threads, build_segmenter options, slices per encoder call
    ("fp32 eager", 1, dict(channels_last=False), 1),
    ("fp32 eager", 2, dict(channels_last=False), 1),
    ("channels-last", 1, dict(channels_last=True), 1),
    ("channels-last", 2, dict(channels_last=True), 1),
    ("channels-last, batch 4", 2, dict(channels_last=True), 4),
    ("channels-last + bf16 autocast", 2, dict(channels_last=True, bf16=True), 1),
    ("channels-last + torch.compile", 2, dict(channels_last=True, compile=True), 1),
]


def slice_boxes(label: np.ndarray, axis: int, count: int) -> dict[int, np.ndarray]:
    """`count` slices spread over the labelled range, each with its organs' (x0, y0, x1, y1) boxes."""
    ks = np.flatnonzero(np.moveaxis(label, axis, 0).any(axis=(1, 2)))
    chosen = ks[np.linspace(0, len(ks) - 1, count).round().astype(int)]
    out = {}
    for k in dict.fromkeys(int(k) for k in chosen):
        sl = np.take(label, k, axis=axis)
        boxes = []
        for value in np.unique(sl[sl > 0]):
            rows, cols = np.nonzero(sl == value)
            boxes.append([cols.min(), rows.min(), cols.max(), rows.max()])
        out[k] = np.array(boxes, dtype=np.float64)
    return out


def run_variant(
    volume, boxes: dict[int, np.ndarray], threads: int, options: dict, batch: int, repeats: int
) -> tuple[float, float, dict[int, np.ndarray]]:
    """(median seconds per slice, first-call seconds, masks per slice) of one encoder variant."""
    torch.set_num_threads(threads)
    segmenter = build_segmenter("lite_medsam", **options)
    ks = sorted(boxes)
    times, first = [], None
    masks = {}
    for repeat in range(repeats + 1):
        embeddings = SliceEmbeddings(segmenter, volume)
        for start in range(0, len(ks), batch):
            group = ks[start : start + batch]
            tic = time.perf_counter()
            embeddings.prefetch(group, batch=batch)
            elapsed = (time.perf_counter() - tic) / len(group)
            if repeat == 0 and start == 0:
                first = elapsed * len(group)  # warm-up (and compilation): reported apart
            elif repeat > 0:
                times.append(elapsed)
        if repeat == repeats:
            masks = {k: embeddings.decode(k, boxes=boxes[k])[0] > 0.5 for k in ks}
    return statistics.median(times), float(first), masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--case", default="openkbp_pt_201")
    parser.add_argument("--slices", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "encoder_speed"))
    args = parser.parse_args()
    data = OpenKBP(args.data)
    volume = load_ct(data.image(args.case))
    label = read_volume(data.label(args.case)).array
    boxes = slice_boxes(label, cranio_caudal_axis(volume.affine), args.slices)
    rows, reference = [], None
    for name, threads, options, batch in VARIANTS:
        seconds, first, masks = run_variant(volume, boxes, threads, options, batch, args.repeats)
        if reference is None:
            reference = masks
        scores = [
            dice(masks[k][i], reference[k][i])
            for k in masks
            for i in range(len(masks[k]))
            if reference[k][i].any() or masks[k][i].any()
        ]
        rows.append(
            {
                "variant": name,
                "threads": threads,
                "seconds": seconds,
                "first": first,
                "dice_vs_fp32": float(np.mean(scores)),
                "min_dice": float(np.min(scores)),
            }
        )
        print(rows[-1], flush=True)
    base = {t: next(r["seconds"] for r in rows if r["variant"] == "fp32 eager" and r["threads"] == t) for t in (1, 2)}
    lines = [
        "# LiteMedSAM encoder speed on this CPU",
        "",
        f"Machine: {machine_line().rsplit(',', 1)[0]}; case {args.case}, {len(boxes)} slices, {args.repeats} "
        f"timed repeats after a warm-up pass (reported as first call). Masks: decoded from the same boxes "
        f"(the organs' slice boxes) and compared with fp32 eager at 1 thread; the pipeline keeps a variant only "
        f"if its mean Dice is at least 0.99.",
        "",
        "| variant | threads | s per slice (median) | speed-up vs fp32 eager, same threads | first call s | "
        "mask Dice vs fp32 (mean / min) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['threads']} | {r['seconds']:.3f} | {base[r['threads']] / r['seconds']:.2f}x | "
            f"{r['first']:.2f} | {r['dice_vs_fp32']:.4f} / {r['min_dice']:.4f} |"
        )
    lines += [
        "",
        f"Command: `python benchmarks/encoder_speed.py --case {args.case} --slices {args.slices} "
        f"--repeats {args.repeats}`",
        "",
        "![encoder speed](encoder_speed.png)",
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines))
    plot(rows, out.with_suffix(".png"))
    print("\n".join(lines))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    names = [f"{r['variant']}\n{r['threads']} thread(s)" for r in rows]
    bars = ax.barh(
        names,
        [r["seconds"] for r in rows],
        color=["tab:green" if r["dice_vs_fp32"] >= 0.99 else "tab:red" for r in rows],
    )
    for bar, r in zip(bars, rows):
        ax.text(
            bar.get_width(),
            bar.get_y() + bar.get_height() / 2,
            f" Dice {r['dice_vs_fp32']:.3f}",
            va="center",
            fontsize=8,
        )
    ax.invert_yaxis()
    ax.set_xlabel("seconds per slice (median); red: masks differ from fp32 (Dice < 0.99)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
