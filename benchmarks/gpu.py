"""MedLSAM on a CUDA GPU: segmentation of a few OpenKBP validation scans and one MedLAM training epoch.

    python benchmarks/gpu.py --data ../shared/data            # writes benchmarks/results/gpu.md (+ gpu.json)

Segmentation (shipped MedLAM + LiteMedSAM, the protocol's 5 templates, default prior mode) runs in float32 and
with the SAM encoder under autocast (bfloat16 where the GPU supports it, else float16): per-stage latency,
peak GPU memory, and each organ's mask Dice against the float32 mask and against the clinicians' label.
Training: one epoch of the default MedLAM on train scans with DataLoader workers, float32 against autocast
(patches/s, peak memory), and the loader alone (patches/s it can feed). Without a GPU it says so and exits 0
without writing anything; `--cpu-dry-run` runs a tiny version of every stage on the CPU (a code check, no
report). Stages that fail are reported in the file, the others still run. Budget: well under 8 minutes.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, OpenKBP, command_line  # noqa: E402
from medlsam.atlas.bank_builder import build_bank  # noqa: E402
from medlsam.atlas.localize import Localizer  # noqa: E402
from medlsam.io.volume import load_ct, read_volume  # noqa: E402
from medlsam.medlam.network import MedLAMConfig, load_medlam  # noqa: E402
from medlsam.medlam.precision import autocast_dtype  # noqa: E402
from medlsam.medlam.training import Trainer, TrainOptions  # noqa: E402
from medlsam.paths import default_medlam_path  # noqa: E402
from medlsam.segment.pipeline import MedLSAMPipeline, SegmentOptions  # noqa: E402
from medlsam.segment.sam import build_segmenter  # noqa: E402
from medlsam.utils.metrics import dice  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_gb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def gpu_info(device: str) -> dict:
    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(
            {
                "gpu": props.name,
                "memory_gb": round(props.total_memory / 2**30, 1),
                "capability": f"{props.major}.{props.minor}",
                "bf16": torch.cuda.is_bf16_supported(),
                "autocast": str(autocast_dtype(None, device)).replace("torch.", ""),
            }
        )
    return info


def segmentation(data: OpenKBP, device: str, scans: int) -> dict:
    """Per scan and precision: stage latencies, peak memory, organ Dice (vs fp32 masks and vs truth)."""
    model = load_medlam(default_medlam_path(), device=device)
    templates = data.templates(5 if scans > 1 else 1)
    tic = time.perf_counter()
    bank = build_bank(model, [data.image(t) for t in templates], [data.label(t) for t in templates], data.names)
    sync(device)
    out = {"bank_s": round(time.perf_counter() - tic, 2), "templates": templates, "rows": []}
    segmenters = {"fp32": build_segmenter("lite_medsam", device=device, bf16=False)}
    if device.startswith("cuda"):  # the SAM encoder under autocast (the segmenter's bf16 flag: its autocast)
        segmenters["autocast"] = build_segmenter("lite_medsam", device=device, bf16=True)
    options = SegmentOptions(mode="prior")
    for case in data.split("validation")[:scans]:
        volume = load_ct(data.image(case["id"]))
        truth = read_volume(data.label(case["id"])).array
        masks = {}
        for name, segmenter in segmenters.items():
            pipeline = MedLSAMPipeline(Localizer(model, bank), segmenter, options)
            pipeline.segment(volume, ["Brainstem"])  # warm-up (cuDNN autotune, lazy init)
            reset_peak(device)
            sync(device)
            tic = time.perf_counter()
            result = pipeline.segment(volume)
            sync(device)
            total = time.perf_counter() - tic
            masks[name] = result
            row = {
                "case": case["id"],
                "precision": name,
                "total_s": round(total, 2),
                "stages_s": {k: round(v, 3) for k, v in result.timings_s.items()},
                "peak_gb": peak_gb(device),
                "encoder_calls": result.encoder_calls,
                "dice_truth": {},
                "dice_vs_fp32": {},
            }
            for organ, value in result.label_names.items():
                mask = result.label == value
                if organ in case["contoured"]:
                    row["dice_truth"][organ] = round(dice(mask, truth == data.values[organ]), 4)
                if name != "fp32":
                    row["dice_vs_fp32"][organ] = round(dice(mask, masks["fp32"].label == value), 4)
            out["rows"].append(row)
            print(f"segmentation {case['id']} {name}: {total:.2f} s, peak {row['peak_gb']} GB", flush=True)
    return out


def training(data: OpenKBP, device: str, scans: int, iterations: int, batch: int, workers: int) -> dict:
    """One epoch per precision; and the DataLoader alone, patches/s (3 patches per sample)."""
    images = [data.image(c["id"]) for c in data.split("train")[:scans]]
    cache = Path(tempfile.gettempdir()) / "medlsam-gpu-bench-cache"
    out = {"scans": len(images), "iterations": iterations, "batch_size": batch, "workers": workers, "rows": []}
    config = MedLAMConfig() if device.startswith("cuda") else MedLAMConfig(base_channels=2, patch_size=(32,) * 3)
    for name, bf16 in (("fp32", False), ("autocast", None)):
        if name == "autocast" and not device.startswith("cuda"):
            continue
        folder = Path(tempfile.mkdtemp())
        options = TrainOptions(
            epochs=1,
            iterations_per_epoch=iterations,
            batch_size=batch,
            device=device,
            workers=workers,
            bf16=bf16,
            validation_pairs=2,
        )
        trainer = Trainer(images, folder / "medlam.pt", config, options, cache_dir=cache)
        trainer.step()  # warm-up
        reset_peak(device)
        sync(device)
        tic = time.perf_counter()
        trainer.run()
        sync(device)
        seconds = time.perf_counter() - tic
        patches = iterations * batch * 3
        row = {
            "precision": name,
            "amp_dtype": str(trainer.amp_dtype).replace("torch.", ""),
            "epoch_s": round(seconds, 2),
            "patches_per_s": round(patches / seconds, 1),
            "peak_gb": peak_gb(device),
        }
        out["rows"].append(row)
        print(f"training {name}: {seconds:.1f} s per epoch, {row['patches_per_s']} patches/s", flush=True)
        loader = trainer.batches
    tic = time.perf_counter()
    count = sum(len(b["query"]) for b in loader.loader(workers)) * 3
    out["loader_patches_per_s"] = round(count / (time.perf_counter() - tic), 1)
    print(f"loader alone ({workers} workers): {out['loader_patches_per_s']} patches/s", flush=True)
    return out


def click_refiner(data: OpenKBP, device: str) -> dict:
    """The edit task's click refiner on one validation brainstem (moved 3 voxels, one foreground click at the
    organ's centre): median seconds per request on the CPU and on ``device``, and the Dice between their masks."""
    from medlsam.interact.refiner import build_click_refiner
    from medlsam.paths import SHIPPED_CLICK_REFINER

    case = data.split("validation")[0]["id"]
    volume = load_ct(data.image(case))
    truth = read_volume(data.label(case)).array == data.values["Brainstem"]
    mask = np.roll(truth, 3, axis=1)
    click = np.argwhere(truth)[len(np.argwhere(truth)) // 2][None]
    out = {"case": case, "rows": []}
    masks = {}
    for where in dict.fromkeys(["cpu", device]):
        refiner = build_click_refiner(SHIPPED_CLICK_REFINER, device=where)
        times = []
        for _ in range(6):  # the first is a warm-up
            sync(where)
            tic = time.perf_counter()
            region, edited = refiner.refine(volume.array, volume.spacing, 2, mask, click, np.zeros((0, 3), int))
            sync(where)
            times.append(time.perf_counter() - tic)
        masks[where] = edited
        out["rows"].append({"device": where, "median_s": round(float(np.median(times[1:])), 4)})
    out["dice_cpu_vs_device"] = round(dice(masks["cpu"], masks[device]), 4)
    return out


def stage(name: str, fn, report: dict) -> None:
    tic = time.perf_counter()
    try:
        report[name] = fn()
    except Exception as exc:  # noqa: BLE001 - report the failure, run the other stages
        traceback.print_exc()
        report[name] = {"error": f"{type(exc).__name__}: {exc}"}
    report[name]["wall_s"] = round(time.perf_counter() - tic, 1)


def markdown(report: dict) -> str:
    g = report["machine"]
    lines = [
        "# MedLSAM on a GPU",
        "",
        f"GPU: {g.get('gpu')} ({g.get('memory_gb')} GB, compute {g.get('capability')}, "
        f"bf16 {'yes' if g.get('bf16') else 'no'}: autocast {g.get('autocast')}); torch {g['torch']}, CUDA "
        f"{g['cuda']}; CPU {g['cpu']}. Written by `{report.get('command', 'python benchmarks/gpu.py')}` (from the "
        f"clone's root) in {report['total_s']:.0f} s.",
        "",
    ]
    seg = report.get("segmentation", {})
    lines += ["## Segmentation (shipped MedLAM + LiteMedSAM, prior mode, all organs)", ""]
    if "error" in seg:
        lines.append(f"Failed: `{seg['error']}`")
    else:
        lines += [
            f"Template bank of {len(seg['templates'])} templates built in {seg['bank_s']} s.",
            "",
            "| scan | precision | total s | stages (s) | peak GPU GB | encoder calls | mean Dice vs truth | "
            "min Dice vs fp32 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in seg["rows"]:
            stages = ", ".join(f"{k} {v:.2f}" for k, v in r["stages_s"].items())
            truth = np.mean(list(r["dice_truth"].values())) if r["dice_truth"] else float("nan")
            vs = min(r["dice_vs_fp32"].values()) if r["dice_vs_fp32"] else None
            lines.append(
                f"| {r['case']} | {r['precision']} | {r['total_s']:.2f} | {stages} | "
                f"{r['peak_gb'] if r['peak_gb'] is None else round(r['peak_gb'], 2)} | {r['encoder_calls']} | "
                f"{truth:.3f} | {'-' if vs is None else f'{vs:.4f}'} |"
            )
    tr = report.get("training", {})
    lines += ["", "## One MedLAM training epoch (default network, 64^3 patches)", ""]
    if "error" in tr:
        lines.append(f"Failed: `{tr['error']}`")
    else:
        lines += [
            f"{tr['scans']} train scans, {tr['iterations']} steps of {tr['batch_size']} samples (3 patches "
            f"each), {tr['workers']} DataLoader workers. The loader alone delivers "
            f"**{tr['loader_patches_per_s']} patches/s**.",
            "",
            "| precision | autocast dtype | epoch s | patches/s | peak GPU GB |",
            "|---|---|---|---|---|",
        ]
        for r in tr["rows"]:
            lines.append(
                f"| {r['precision']} | {r['amp_dtype']} | {r['epoch_s']} | {r['patches_per_s']} | "
                f"{r['peak_gb'] if r['peak_gb'] is None else round(r['peak_gb'], 2)} |"
            )
    cr = report.get("click_refiner", {})
    lines += ["", "## The edit task's click refiner (one request: crop, network with 4 flips, back to the file)", ""]
    if "error" in cr:
        lines.append(f"Failed: `{cr['error']}`")
    elif cr:
        agree = cr["dice_cpu_vs_device"]
        lines += [f"Scan {cr['case']}, brainstem; Dice between the CPU and device masks: {agree}.", ""]
        lines += ["| device | median s per request |", "|---|---|"]
        lines += [f"| {r['device']} | {r['median_s']} |" for r in cr["rows"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="the shared data folder (with openkbp/); default: medlsam.paths")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--scans", type=int, default=3, help="validation scans to segment")
    parser.add_argument("--train-scans", type=int, default=24)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--budget-s", type=float, default=420, help="the training stage shrinks to stay within it")
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny run of every stage on the CPU, no report")
    parser.add_argument("--out", default=str(RESULTS / "gpu.md"))
    args = parser.parse_args(argv)
    if args.cpu_dry_run:
        args.device, args.scans, args.train_scans, args.iterations, args.batch_size, args.workers = "cpu", 1, 2, 2, 1, 1
    elif not torch.cuda.is_available():
        print(
            f"benchmarks/gpu.py needs a CUDA GPU and none is visible here (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda or 'none'}); nothing measured, nothing written. Run it on a GPU machine."
        )
        return 0
    data = OpenKBP(Path(args.data) / "openkbp" if args.data else None)
    tic = time.perf_counter()
    report = {"machine": gpu_info(args.device), "args": vars(args), "command": command_line("benchmarks/gpu.py", argv)}
    stage("segmentation", lambda: segmentation(data, args.device, args.scans), report)
    stage("click_refiner", lambda: click_refiner(data, args.device), report)
    used = time.perf_counter() - tic
    if not args.cpu_dry_run and used > 0.5 * args.budget_s:  # stay within the budget: a shorter epoch
        scale = max(0.25, (args.budget_s - used) / args.budget_s)
        args.iterations, args.train_scans = max(4, int(args.iterations * scale)), max(4, int(args.train_scans * scale))
        print(f"{used:.0f} s used: training shortened to {args.iterations} steps on {args.train_scans} scans")
    stage(
        "training",
        lambda: training(data, args.device, args.train_scans, args.iterations, args.batch_size, args.workers),
        report,
    )
    report["total_s"] = time.perf_counter() - tic
    if args.cpu_dry_run:
        print(markdown(report))
        print("dry run on the CPU: nothing written")
        return 1 if any("error" in report[s] for s in ("segmentation", "training")) else 0
    out = Path(args.out)
    out.write_text(markdown(report))
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
