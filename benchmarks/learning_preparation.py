"""The learner's few-shot preparation as labels accumulate: how many leave-one-out priors each training makes and
how long that takes, with the priors kept across trainings (``medlsam.learn.fewshot.held_out_priors``: a label's
prior serves while the labels it was made from are all still there and at least half of its others).

The saved labels are the first N OpenKBP train scans of benchmarks/learning.py's fixed shuffle; for each N of
--sizes in turn (as an app trains after new labels), the priors every label needs are prepared in one fresh cache
kept from size to size. Without the reuse each training would make all N (the last column).

    python benchmarks/learning_preparation.py [--sizes 10,12,16,20] [--threads 1]

One-template banks go to runs/learning/cache (shared with benchmarks/learning.py), the priors to a temporary folder.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, OpenKBP, command_line, machine_line  # noqa: E402
from learning import WORK, label_order  # noqa: E402
from medlsam.io.volume import load_ct, read_volume  # noqa: E402
from medlsam.learn import fewshot  # noqa: E402
from medlsam.medlam.network import load_medlam  # noqa: E402
from medlsam.paths import default_medlam_path  # noqa: E402
from medlsam.utils.atomic import write_json_atomic  # noqa: E402

OUT = RESULTS / "learning_preparation.md"


def run(sizes: list[int]) -> list[dict]:
    data, medlam = OpenKBP(), load_medlam(default_medlam_path())
    cases = label_order(data)[: max(sizes)]
    vols = [load_ct(data.image(c)) for c in cases]
    banks = fewshot.one_template_banks(
        medlam, vols, [read_volume(data.label(c)) for c in cases], data.names, WORK / "cache"
    )
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        cache = Path(folder)
        for n in sizes:
            before = set(cache.glob("prior-*.npz"))
            tic = time.perf_counter()
            fewshot.held_out_priors(medlam, banks[:n], vols[:n], None, cache)
            seconds = time.perf_counter() - tic
            made = len(set(cache.glob("prior-*.npz")) - before)
            rows.append({"labels": n, "made": made, "kept": n - made, "seconds": round(seconds, 1)})
            print(rows[-1], flush=True)
    per_prior = float(np.median([r["seconds"] / r["made"] for r in rows if r["made"]]))
    for r in rows:
        r["seconds_all_made"] = round(per_prior * r["labels"], 1)
    return rows


def report(rows: list[dict], meta: dict) -> str:
    lines = [
        "# The learner's few-shot preparation as labels accumulate",
        "",
        f"Regenerate from a fresh clone: `{meta['command']}`. Machine: {meta['machine']} (shared with another "
        "benchmark: seconds are upper bounds).",
        "Each row is one training after the labels grew to N (the first N of benchmarks/learning.py's fixed "
        "shuffle); priors are kept from row to row as the app's `model/learn_cache` keeps them. Last column: every "
        "label's prior made again (this run's median seconds per prior made, times N), as before the reuse.",
        "",
        "| labels N | priors made | kept | seconds | seconds, all made |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['labels']} | {r['made']} | {r['kept']} | {r['seconds']} | {r['seconds_all_made']} |" for r in rows]
    total, whole = sum(r["seconds"] for r in rows), sum(r["seconds_all_made"] for r in rows)
    lines += ["", f"All trainings: {total:.0f} s against {whole:.0f} s.", "", f"![preparation]({OUT.stem}.png)", ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    n = [r["labels"] for r in rows]
    ax.plot(n, [r["seconds"] for r in rows], "o-", label="priors kept across trainings")
    ax.plot(n, [r["seconds_all_made"] for r in rows], "s--", label="every prior made again")
    ax.set_xlabel("saved labels N (one training each)")
    ax.set_ylabel("few-shot preparation (s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,12,16,20")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    rows = run(sorted(int(s) for s in args.sizes.split(",")))
    meta = {"command": command_line("benchmarks/learning_preparation.py"), "machine": machine_line()}
    write_json_atomic({"meta": meta, "rows": rows}, OUT.with_suffix(".json"))
    OUT.write_text(report(rows, meta))
    plot(rows, OUT.with_suffix(".png"))
    print(f"written to {OUT}")


if __name__ == "__main__":
    main()
