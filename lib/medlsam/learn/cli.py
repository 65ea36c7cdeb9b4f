"""``medlsam learn`` (train the segmentation network on labelled scans) and ``medlsam segment --learned MODEL``
(the per-organ choice of the learnt network and the template prior).
Hooked into ``medlsam.cli`` (its parser and ``medlsam.cli.segment``)."""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

from medlsam.errors import MedLSAMError


def add_parsers(commands) -> None:
    """The ``learn`` subcommand on ``commands`` (argparse sub-parsers)."""
    learn = commands.add_parser("learn", help="train a segmentation network on scans with final labels")
    learn.add_argument("--images", nargs="+", required=True, help="labelled scans")
    learn.add_argument("--labels", nargs="+", required=True, help="their final labels, in the same order")
    learn.add_argument("--names", help="organ names file (label value -> organ) for every label")
    learn.add_argument("--out", required=True, help="the model file to write (.pt)")
    learn.add_argument("--max-epochs", type=int, help="at most this many epochs")
    learn.add_argument("--time-limit-min", type=float, help="stop after this many minutes, keeping the best so far")
    learn.add_argument("--options", help="JSON file of further learner options (medlsam.learn.options)")
    learn.add_argument("--cache", help="folder for one-template banks and priors (reused by later runs)")
    learn.add_argument("--model", help="MedLAM checkpoint of the few-shot path (default: the shipped model)")
    learn.add_argument("--device", help="auto (default: cuda when available), cpu, cuda or cuda:N")
    learn.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="processes on this machine (DDP; needs --cache): launches torchrun "
        "(for several machines run `torchrun --nnodes M ... -m medlsam.cli learn ...` yourself)",
    )
    learn.set_defaults(func=run)


def add_segment_arguments(segment: argparse.ArgumentParser) -> None:
    """``--learned`` on the ``segment`` subcommand (``--model`` there is MedLAM's checkpoint)."""
    segment.add_argument(
        "--learned",
        help="a model of `medlsam learn`: each organ from the learnt network or the template prior, as it chose (the "
        "prior blended with SAM where --prior-weight or adapted --checkpoint weights are below 1)",
    )


def _options(args: argparse.Namespace):
    from medlsam.learn.options import LearnError, LearnOptions

    data = {}
    if args.options:
        try:
            data = json.loads(Path(args.options).read_text())
        except (OSError, ValueError) as exc:
            raise LearnError(f"--options {args.options}: not a readable JSON file ({exc})") from None
    if args.max_epochs is not None:
        data["max_epochs"] = args.max_epochs
    if args.time_limit_min is not None:
        data["time_limit_min"] = args.time_limit_min
    if getattr(args, "device", None) is not None:
        data["device"] = args.device
    return LearnOptions.from_dict(data)


def run(args: argparse.Namespace) -> int:
    """``medlsam learn``: train (one process, or torchrun ranks), print the held-out Dice and the choice, write the
    model atomically (rank 0)."""
    from medlsam.learn.options import resolve_device
    from medlsam.utils.distributed import env_world, launch_torchrun, strip_option

    options = _options(args)  # bad options fail before any work
    if args.nproc < 1:
        raise MedLSAMError(f"--nproc must be at least 1, not {args.nproc}")
    distributed = args.nproc > 1 or env_world()[1] > 1
    if distributed and not args.cache:
        raise MedLSAMError("several processes need --cache: rank 0 prepares the few-shot priors there for the others")
    names = _checked_names(args)
    if args.nproc > 1 and env_world()[1] == 1:  # launch torchrun, which runs this command in every rank
        return launch_torchrun(args.nproc, strip_option(args.argv, "--nproc"))
    return _train(args, options, names, resolve_device(options.device))


def _checked_names(args: argparse.Namespace) -> dict[int, str]:
    from medlsam.utils.names import read_names

    names = read_names(args.names)
    if not names:
        raise MedLSAMError("--names is needed: the organ names of the labels (label value -> organ)")
    if not str(args.out).endswith(".pt"):
        raise MedLSAMError(f"--out {args.out}: the model file must end in .pt")
    return names


def _train(args: argparse.Namespace, options, names: dict[int, str], device: str) -> int:
    """This process's part: join the ranks (if any), train, and on rank 0 write the model and print the choice."""
    from medlsam.learn.trainer import learn
    from medlsam.medlam.network import load_medlam
    from medlsam.paths import default_medlam_path
    from medlsam.utils.distributed import close_distributed, die_with_parent, env_world, init_distributed

    if env_world()[1] > 1:
        die_with_parent()  # a torchrun agent that dies takes its ranks with it
    main_thread = threading.current_thread() is threading.main_thread()
    # torchrun stops the ranks with SIGTERM: end as on Ctrl-C (temporary files removed)
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        ctx = init_distributed(device)
        print(f"medlsam learn: {ctx.describe()}", flush=True)
        medlam = load_medlam(args.model or default_medlam_path())
        model = learn(args.images, args.labels, names, options, medlam=medlam, cache=args.cache)
        if ctx.is_main:
            model.save(args.out)
    finally:
        close_distributed()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    if not ctx.is_main:
        return 0
    for organ in model.organs:
        a, b = model.held_out["learned"].get(organ), model.held_out["fewshot"].get(organ)
        fmt = lambda v: "  n/a" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"{organ:16s} held-out Dice learned {fmt(a)}  few-shot {fmt(b)}  -> {model.choice[organ]}")
    resumed = model.record.get("resumed_from_epoch")
    print(f"resumed from epoch {resumed}" if resumed else "trained from scratch")
    print(f"model {Path(args.out).resolve()} ({model.record['total_minutes']:.1f} min)")
    return 0


def _interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def segment(args: argparse.Namespace) -> None:
    """``medlsam segment SCAN --templates BANK --learned MODEL --out LABEL``: one scan."""
    from medlsam.atlas.templates import load_bank
    from medlsam.io.volume import load_ct
    from medlsam.learn.fewshot import scan_priors
    from medlsam.learn.model import load_learned
    from medlsam.learn.predict import blend_sam, chosen_probabilities, to_label
    from medlsam.medlam.network import load_medlam
    from medlsam.paths import default_medlam_path
    from medlsam.segment.outputs import write_segmentation
    from medlsam.segment.pipeline import SegmentationResult
    from medlsam.segment.sam import build_segmenter

    if len(args.images) != 1 or args.rtstruct or args.qc:
        raise MedLSAMError("--learned segments one scan (no batch, --rtstruct or --qc yet)")
    model = load_learned(args.learned)
    medlam = load_medlam(args.model or default_medlam_path())
    bank = load_bank(args.templates, medlam)
    cuts = {name: organ.prior_cut for name, organ in bank.organs.items()}
    raw = replace(bank, organs={n: replace(o, prior_cut=0.5) for n, o in bank.organs.items()})
    tic = time.perf_counter()
    volume = load_ct(args.images[0])
    priors = scan_priors(medlam, raw, volume)
    localize_s = time.perf_counter() - tic
    probabilities, used = chosen_probabilities(model, volume, priors, cuts)
    values = {**{o: i + 1 for i, o in enumerate(model.organs)}, **bank.labels}
    # SAM blends in only with adapted weights (their per-organ weights) or a --prior-weight below 1: the shipped
    # LiteMedSAM's blend does not pay, so it is not even loaded
    if args.checkpoint or (args.prior_weight is not None and args.prior_weight < 1):
        segmenter = build_segmenter(args.backend, args.checkpoint, device=args.device)
        blend_sam(segmenter, volume, priors, cuts, probabilities, used, values, args.prior_weight)
    label = to_label(probabilities, values)
    voxels = {n: int((label == values[n]).sum()) for n in probabilities}
    result = SegmentationResult(
        label=label,
        label_names={n: values[n] for n in probabilities},
        boxes={n: {"path": used[n], "voxels": voxels[n]} for n in probabilities},
        not_found=[n for n in probabilities if voxels[n] == 0],
        timings_s={"localize": localize_s, "total": time.perf_counter() - tic},
    )
    write_segmentation(result, volume, args.out)
    for name in probabilities:
        print(f"{name:16s} label {values[name]:3d}  {voxels[name]} voxels ({used[name]})")
    print(f"label   {Path(args.out).expanduser().resolve()}")
