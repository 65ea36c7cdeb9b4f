"""Batch segmentation: `medlsam segment DIR_OR_FILES... --templates BANK --out OUT_DIR`.

One label and its JSON per scan in OUT_DIR, named after the scan; scans whose outputs are complete are
skipped, so an interrupted run restarts where it stopped. Scans are sharded over torchrun ranks (RANK,
WORLD_SIZE) or `--workers N` child processes, always from the full sorted list (a rank's share never depends
on what the others finished). A scan that fails is reported and the others go on; the exit status says
whether any failed.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from medlsam.errors import MedLSAMError
from medlsam.io.volume import IMAGE_SUFFIXES
from medlsam.utils.distributed import env_world, strip_option

LABEL_SUFFIX = ".nii.gz"


def scan_name(path: Path) -> str:
    """The scan's name without its image suffix (a DICOM folder: the folder's name)."""
    name = path.name
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_batch(images: list[str], out: str) -> bool:
    """Batch mode unless one scan file goes to a label file (today's `segment scan --out label.nii.gz`)."""
    from medlsam.medlam.patches import list_images

    if len(images) != 1:
        return True
    if list_images(images[0]) != [Path(images[0])]:
        return True  # a folder of scans
    label = out.lower().endswith((".nii.gz", ".nii", ".nrrd"))
    return not label or Path(out).is_dir()


def batch_plan(images: list[str], out_dir: Path) -> list[tuple[Path, Path]]:
    """(scan, label path) for every scan, sorted by name; MedLSAMError if two scans share a name."""
    from medlsam.medlam.patches import list_images

    scans = sorted(list_images(images), key=lambda p: (scan_name(p), str(p)))
    if not scans:
        raise MedLSAMError(f"no scan found in {' '.join(images)}")
    names: dict[str, Path] = {}
    for scan in scans:
        name = scan_name(scan)
        if name in names:
            raise MedLSAMError(f"two scans would write the same output {name}{LABEL_SUFFIX}: {names[name]} and {scan}")
        names[name] = scan
    return [(scan, out_dir / f"{scan_name(scan)}{LABEL_SUFFIX}") for scan in scans]


def is_complete(label: Path) -> bool:
    return label.is_file() and (label.parent / (label.name + ".json")).is_file()


def run_batch(args: argparse.Namespace, argv: list[str]) -> int:
    """Segment every scan of args.images into args.out (a folder, created if missing)."""
    out_dir = Path(args.out).expanduser()
    if args.qc or getattr(args, "qc_reference", None):
        raise MedLSAMError("--qc works for one scan; in batch mode look at the labels and their JSON")
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = batch_plan(args.images, out_dir)
    if args.workers and args.workers > 1 and env_world()[1] == 1:
        return _run_workers(args.workers, plan, argv)
    rank, world, _ = env_world()
    mine = plan[rank::world]
    todo = [(scan, label) for scan, label in mine if not is_complete(label)]
    who = f"rank {rank}/{world}: " if world > 1 else ""
    print(
        f"{who}{len(mine)} scans, {len(mine) - len(todo)} already complete, {len(todo)} to segment -> {out_dir}",
        flush=True,
    )
    failed: dict[str, str] = {}
    if todo:
        segment_one = _segmenter(args)
        for i, (scan, label) in enumerate(todo, 1):
            tic = time.perf_counter()
            try:
                segment_one(scan, label)
                print(
                    f"{who}[{i}/{len(todo)}] {scan.name} -> {label.name} ({time.perf_counter() - tic:.1f} s)",
                    flush=True,
                )
            except MedLSAMError as exc:
                failed[str(scan)] = str(exc)
            except Exception as exc:  # noqa: BLE001 - one bad scan must not stop the others
                failed[str(scan)] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc(file=sys.stderr)
            if str(scan) in failed:
                print(f"{who}[{i}/{len(todo)}] {scan.name} FAILED: {failed[str(scan)]}", file=sys.stderr, flush=True)
    written = len(todo) - len(failed)
    print(
        f"{who}summary: {len(mine)} scans, {written} written, {len(mine) - len(todo)} already complete, "
        f"{len(failed)} failed",
        flush=True,
    )
    for scan, reason in failed.items():
        print(f"  failed {scan}: {reason}", file=sys.stderr)
    return 1 if failed else 0


def _segmenter(args: argparse.Namespace):
    """A function (scan, label path) -> None with MedLAM, the bank and the segmenter loaded once."""
    from medlsam.atlas.localize import Localizer
    from medlsam.atlas.templates import load_bank
    from medlsam.io.volume import load_ct
    from medlsam.medlam.network import load_medlam
    from medlsam.paths import default_medlam_path
    from medlsam.segment.outputs import write_segmentation
    from medlsam.segment.pipeline import MedLSAMPipeline, SegmentOptions
    from medlsam.segment.sam import build_segmenter

    weight = {} if args.prior_weight is None else {"prior_weight": args.prior_weight}
    options = SegmentOptions(mode=args.mode, **weight)
    organs = [o.strip() for o in args.organs.split(",") if o.strip()] if args.organs else None
    model = load_medlam(args.model or default_medlam_path())
    bank = load_bank(args.templates, model)
    bank.select(organs)
    device = args.device
    if device == "cuda" and env_world()[1] > 1:  # one GPU per rank / worker, by its local rank
        from medlsam.utils.devices import cuda_count

        device = f"cuda:{env_world()[2] % cuda_count()}"
    model = model.to(device)
    segmenter = build_segmenter(args.backend, args.checkpoint, device=device)
    pipeline = MedLSAMPipeline(Localizer(model, bank), segmenter, options)

    def segment_one(scan: Path, label: Path) -> None:
        tic = time.perf_counter()
        volume = load_ct(scan)
        load_s = time.perf_counter() - tic
        result = pipeline.segment(volume, organs, progress=False, timings={"load": load_s})
        write_segmentation(result, volume, label)  # label and JSON renamed into place together

    return segment_one


def _run_workers(workers: int, plan: list[tuple[Path, Path]], argv: list[str]) -> int:
    """`workers` child processes of this command, each one shard (RANK/WORLD_SIZE), dying with this one."""
    from medlsam.utils.distributed import _pdeathsig

    threads = max(1, (os.cpu_count() or 1) // workers)
    cmd = [sys.executable, "-m", "medlsam.cli", *strip_option(argv, "--workers")]
    children = []
    for rank in range(workers):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(workers),
            "LOCAL_RANK": str(rank),
            "OMP_NUM_THREADS": str(threads),
        }
        children.append(subprocess.Popen(cmd, env=env, preexec_fn=_pdeathsig))  # noqa: PLW1509

    def forward(signum, _frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        codes = [child.wait() for child in children]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    missing = [scan for scan, label in plan if not is_complete(label)]
    print(
        f"all workers: {len(plan)} scans, {len(plan) - len(missing)} complete, {len(missing)} failed or missing",
        flush=True,
    )
    for scan in missing:
        print(f"  not segmented: {scan}", file=sys.stderr)
    if any(code < 0 or code in (130, 143) for code in codes):
        return 130
    return 1 if missing or any(codes) else 0
