"""MedLAM training on this machine: one report, `benchmarks/results/training.md` (+ .png, .json), assembled
from sections that can be run on their own (each run replaces its own section and keeps the others).

    python benchmarks/training.py [--sections precision,...] [--steps 2]

Sections:
- precision: seconds per training step (the default 64^3 patch and network, one scan per step) in float32
  and under bfloat16 autocast, on this CPU as it is and with oneDNN limited by ONEDNN_MAX_CPU_ISA to
  AVX512_CORE (AVX-512 without bf16 instructions) and to AVX2 (like the 2-core EPYC of issue 14), and which
  precision `medlsam.medlam.precision` picks by default in each case.
- throughput: training patches/s with 1 process and with 2 torch.distributed (gloo) processes, and the patch
  loader alone with 0, 1 and 2 DataLoader workers against what a training step consumes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, command_line  # noqa: E402

REPORT = RESULTS / "training.md"
DATA = RESULTS / "training.json"

STEP_SCRIPT = textwrap.dedent("""
    import json, statistics, sys, tempfile, time
    from pathlib import Path
    import numpy as np, torch
    torch.set_num_threads(int(sys.argv[2]))
    from medlsam.medlam import precision
    from medlsam.medlam.network import MedLAMConfig
    from medlsam.medlam.training import Trainer, TrainOptions
    from medlsam.io.volume import CTVolume, write_volume
    steps = int(sys.argv[1])
    folder = Path(tempfile.mkdtemp())
    paths = []
    for n in range(2):  # two synthetic 200 x 200 x 160 mm CTs: body, and a bone ball in different places
        shape = (64, 64, 48)
        i, j, k = np.meshgrid(*(np.arange(s, dtype=np.float32) for s in shape), indexing="ij")
        hu = np.where(((i - 32) / 28) ** 2 + ((j - 32) / 26) ** 2 < 1, 40.0, -1000.0)
        hu[(i - 20 - 10 * n) ** 2 + (j - 30) ** 2 + (k - 20 - 8 * n) ** 2 < 36] = 1000.0
        write_volume(hu.astype(np.int16), CTVolume(hu, np.diag([3.2, 3.2, 3.3, 1.0]), "synthetic"),
                     folder / f"scan{n}.nii.gz")
        paths.append(folder / f"scan{n}.nii.gz")
    out = {"default": precision.describe(None, "cpu"), "default_bf16": precision.use_bf16(None, "cpu"),
           "capability": precision.cpu_capability()}
    for bf16 in (False, True):
        options = TrainOptions(epochs=1, iterations_per_epoch=1, batch_size=1, mss_points=20, bf16=bf16)
        trainer = Trainer(paths, folder / f"{bf16}" / "medlam.pt", MedLAMConfig(), options)
        trainer.step()  # warm-up
        times = []
        for _ in range(steps):
            tic = time.perf_counter()
            trainer.step()
            times.append(time.perf_counter() - tic)
        out["bf16_s" if bf16 else "fp32_s"] = statistics.median(times)
    print("RESULT " + json.dumps(out))
""")

CASES = [
    ("as it is", None),
    ("oneDNN limited to AVX512_CORE (no bf16 instructions)", "AVX512_CORE"),
    ("oneDNN limited to AVX2 (the CPU of issue 14)", "AVX2"),
]


def machine() -> dict:
    import torch

    from medlsam.medlam.precision import cpu_capability, cpu_model

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "capability": cpu_capability()}


def precision_section(steps: int, threads: int) -> dict:
    """Per case: median seconds per step in fp32 and bf16, and the default choice."""
    rows = []
    for name, isa in CASES:
        env = {**os.environ, **({"ONEDNN_MAX_CPU_ISA": isa} if isa else {})}
        if not isa:
            env.pop("ONEDNN_MAX_CPU_ISA", None)
        done = subprocess.run(
            [sys.executable, "-c", STEP_SCRIPT, str(steps), str(threads)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        result = json.loads(done.stdout.split("RESULT ", 1)[1])
        rows.append({"case": name, **result})
        print(f"{name}: fp32 {result['fp32_s']:.2f} s, bf16 {result['bf16_s']:.2f} s; {result['default']}", flush=True)
    lines = [
        "## Precision: float32 against bfloat16 autocast",
        "",
        f"One training step of the default MedLAM (width 6, 64^3 patch) on one scan (3 patches: query, "
        f"augmented query, second patch), median of {steps} steps after a warm-up, {threads} threads. "
        "The oneDNN limits emulate CPUs without native bfloat16 on this one (`ONEDNN_MAX_CPU_ISA`).",
        "",
        "| CPU | fp32 s/step | bf16 s/step | bf16 / fp32 | default picks | why |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        picked = "bf16" if row["default_bf16"] else "fp32"
        why = row["default"].split("(", 1)[1][:-1]  # the reason inside the outer parentheses
        lines.append(
            f"| {row['case']} | {row['fp32_s']:.2f} | {row['bf16_s']:.2f} | "
            f"{row['bf16_s'] / row['fp32_s']:.2f} | **{picked}** | {why} |"
        )
    return {"rows": rows, "markdown": "\n".join(lines)}


THROUGHPUT_SCRIPT = textwrap.dedent("""
    import json, os, sys, tempfile, time
    from pathlib import Path
    import numpy as np, torch
    from medlsam.utils.distributed import barrier, close_distributed, init_distributed
    from medlsam.medlam.network import MedLAMConfig
    from medlsam.medlam.training import Trainer, TrainOptions
    from medlsam.io.volume import CTVolume, write_volume
    steps, batch, threads = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(threads)
    ctx = init_distributed("cpu")
    folder = Path(tempfile.mkdtemp())
    paths = []
    for n in range(4):  # synthetic 200 x 200 x 160 mm CTs: a body and a bone ball in different places
        shape = (64, 64, 48)
        i, j, k = np.meshgrid(*(np.arange(s, dtype=np.float32) for s in shape), indexing="ij")
        hu = np.where(((i - 32) / 28) ** 2 + ((j - 32) / 26) ** 2 < 1, 40.0, -1000.0)
        hu[(i - 20 - 5 * n) ** 2 + (j - 30) ** 2 + (k - 16 - 5 * n) ** 2 < 36] = 1000.0
        write_volume(hu.astype(np.int16), CTVolume(hu, np.diag([3.2, 3.2, 3.3, 1.0]), "synthetic"),
                     folder / f"scan{n}.nii.gz")
        paths.append(folder / f"scan{n}.nii.gz")
    options = TrainOptions(epochs=1, iterations_per_epoch=steps + 1, batch_size=batch, mss_points=20)
    trainer = Trainer(paths, folder / "medlam.pt", MedLAMConfig(), options, cache_dir=folder / "cache", dist=ctx)
    trainer.step()  # warm-up
    barrier(ctx)
    tic = time.perf_counter()
    for _ in range(steps):
        trainer.step()
    barrier(ctx)
    seconds = time.perf_counter() - tic
    result = {"world": ctx.world_size, "threads": threads, "step_s": seconds / steps,
              "patches_per_s": 3 * batch * ctx.world_size * steps / seconds, "precision": trainer.precision}
    loader = {}
    if ctx.world_size == 1:  # the DataLoader alone: patches/s it can feed, with 0 (in-process), 1, 2 workers
        trainer.batches.iterations = 24
        for workers in (0, 1, 2):
            tic = time.perf_counter()
            count = 3 * sum(len(b["query"]) for b in trainer.batches.loader(workers))
            loader[workers] = count / (time.perf_counter() - tic)
    result["loader"] = loader
    if ctx.is_main:
        print("RESULT " + json.dumps(result))
    close_distributed()
""")


def throughput_section(steps: int, threads: int, batch: int = 2) -> dict:
    """Training patches/s with 1 process (all threads) and 2 gloo processes (threads split), and the patch
    loader alone with 0-2 DataLoader workers."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    load = os.getloadavg()[0]
    runs = []
    for world in (1, 2):
        per_rank = max(1, threads // world)
        cmd = (
            [sys.executable, "-c", THROUGHPUT_SCRIPT]
            if world == 1
            else [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={world}",
                "--no-python",
                sys.executable,
                "-c",
                THROUGHPUT_SCRIPT,
            ]
        )
        done = subprocess.run(
            [*cmd, str(steps), str(batch), str(per_rank)],
            env={**env, "OMP_NUM_THREADS": str(per_rank)},
            capture_output=True,
            text=True,
            check=True,
        )
        result = json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])
        runs.append(result)
        print(f"{world} process(es) x {per_rank} threads: {result['patches_per_s']:.1f} patches/s", flush=True)
    loader = runs[0]["loader"]
    step_rate = runs[0]["patches_per_s"]
    lines = [
        "## Throughput: processes and the patch loader",
        "",
        f"The default MedLAM (width 6, 64^3 patches), {batch} samples (x 3 patches) per process and step, "
        f"mean over {steps} steps after a warm-up, {threads} CPU threads in all; {runs[0]['precision']}. "
        f"Synthetic 64 x 64 x 48 CTs. 1-minute load average {load:.1f} on {os.cpu_count()} cores when the section "
        "started"
        + (
            ": the machine was shared with other jobs, so the ratios mean more than the absolute rates."
            if load > 0.5 * (os.cpu_count() or 1)
            else " (otherwise idle)."
        ),
        "",
        "| processes | threads each | s/step | patches/s (all ranks) |",
        "|---|---|---|---|",
    ]
    for r in runs:
        lines.append(f"| {r['world']} | {r['threads']} | {r['step_s']:.2f} | {r['patches_per_s']:.1f} |")
    lines += [
        "",
        "The loader alone (patch cutting + tracked augmentation, no network), against what one "
        f"training process consumes ({step_rate:.1f} patches/s):",
        "",
        "| DataLoader workers | patches/s | x training's consumption |",
        "|---|---|---|",
    ]
    for workers, rate in loader.items():
        lines.append(f"| {workers} | {rate:.0f} | {rate / step_rate:.0f}x |")
    return {"rows": runs, "markdown": "\n".join(lines)}


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data.get("precision", {}).get("rows", [])
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 3.2))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["fp32_s"] for r in rows], 0.4, label="float32")
    ax.bar([i + 0.2 for i in x], [r["bf16_s"] for r in rows], 0.4, label="bfloat16 autocast")
    for i, r in enumerate(rows):
        best = r["bf16_s"] if r["default_bf16"] else r["fp32_s"]
        ax.annotate("default", (i + (0.2 if r["default_bf16"] else -0.2), best), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), [r["case"].split(" (")[0] for r in rows], fontsize=8)
    ax.set_ylabel("seconds per training step")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(f"MedLAM training step, {data['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(data: dict, command: str, kept: list[str]) -> None:
    """``command``: this run's (portable); ``kept``: the sections it did not rerun (from training.json)."""
    m = data["machine"]
    earlier = f"; the {', '.join(kept)} section(s) kept from an earlier run (training.json)" if kept else ""
    head = [
        "# MedLAM training on this machine",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} (CPU capability {m['capability']}). "
        f"Written by `{command}` (from the clone's root){earlier}.",
        "",
        "![training](training.png)",
        "",
    ]
    body = [data[name]["markdown"] + "\n" for name in sorted(data) if name != "machine"]
    REPORT.write_text("\n".join(head + body))
    plot(data, REPORT.with_suffix(".png"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="precision")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    data = json.loads(DATA.read_text()) if DATA.is_file() else {}
    data["machine"] = machine()
    for name in args.sections.split(","):
        if name == "precision":
            data["precision"] = precision_section(args.steps, args.threads)
        elif name == "throughput":
            data["throughput"] = throughput_section(max(3, args.steps), args.threads)
        else:
            raise SystemExit(f"unknown section {name!r}")
    DATA.write_text(json.dumps(data, indent=2))
    run = args.sections.split(",")
    write_report(
        data, command_line("benchmarks/training.py", argv), [n for n in sorted(data) if n not in run + ["machine"]]
    )
    print(f"wrote {REPORT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
