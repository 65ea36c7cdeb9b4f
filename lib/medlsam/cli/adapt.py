"""`medlsam adapt` (LiteMedSAM's decoder adapted to the templates) and `medlsam export` (slim MedLAM weights)."""

from __future__ import annotations

import argparse
from pathlib import Path

from medlsam.cli.common import load_model
from medlsam.errors import MedLSAMError


def _adapt(args: argparse.Namespace) -> None:
    from medlsam.medlam.precision import parse_precision
    from medlsam.segment.adapt import adapt
    from medlsam.segment.adapt_data import AdaptOptions
    from medlsam.utils.devices import check_device
    from medlsam.utils.names import read_names

    out = Path(args.out).expanduser()
    if not out.parent.is_dir():
        raise MedLSAMError(f"output folder {out.parent} does not exist")
    if len(args.labels) != len(args.images):
        raise MedLSAMError(f"{len(args.images)} images need as many --labels files, got {len(args.labels)}")
    names = read_names(args.names)  # a bad names file fails before any work
    options = AdaptOptions(
        **{k: getattr(args, k) for k in ("steps", "slice_step", "time_limit_s") if getattr(args, k) is not None},
        bf16=parse_precision(args.precision),
    )
    record = adapt(
        load_model(args.model),
        args.images,
        args.labels,
        names,
        out,
        options,
        device=check_device(args.device),
        cache_dir=args.cache,
    )
    print(
        f"adapted LiteMedSAM on {len(record['templates'])} templates ({record['slices']} slices, "
        f"{', '.join(record['organs'])}): {record['steps']} steps, loss {record['loss_first']:.3f} -> "
        f"{record['loss_last']:.3f}, template slice Dice {record['template_slice_dice_before']:.3f} -> "
        f"{record['template_slice_dice_after']:.3f}; {record['total_s']:.0f} s "
        f"({'bfloat16' if record['bf16'] else 'float32'} training steps)"
    )
    print(f"weights {out.resolve()} (use: medlsam segment --checkpoint {out})")


def _export(args: argparse.Namespace) -> None:
    from medlsam.medlam.network import load_medlam, model_fingerprint, save_medlam

    model = load_medlam(args.checkpoint)
    if args.half:  # the fingerprint must describe the weights as they will be loaded
        model = model.half().float()
    import torch

    source = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    provenance = {k: source[k] for k in ("epoch", "val_error_mm") if isinstance(source, dict) and k in source}
    save_medlam(model, args.out, half=args.half, fingerprint=model_fingerprint(model), **provenance)
    print(f"{args.out}: MedLAM {model.config.to_dict()}, fingerprint {model_fingerprint(model)}")


def add_parsers(commands) -> None:
    adapt = commands.add_parser(
        "adapt", help="adapt LiteMedSAM's decoder to labelled templates (weights for segment --checkpoint)"
    )
    adapt.add_argument("--images", nargs="+", required=True, help="template scans (at least 2)")
    adapt.add_argument("--labels", nargs="+", required=True, help="one label file per image")
    adapt.add_argument("--names", help='JSON {"1": "Brainstem", ...} (or a dataset.json with "labels")')
    adapt.add_argument("--model", help="MedLAM checkpoint for the templates' priors (default: the shipped model)")
    adapt.add_argument("--out", required=True, help="adapted weights file (written atomically)")
    adapt.add_argument("--steps", type=int, help="optimiser steps (default 120)")
    adapt.add_argument("--slice-step", dest="slice_step", type=int, help="use every n-th organ slice (default 3)")
    adapt.add_argument("--time-limit", dest="time_limit_s", type=float, help="stop training after this many s")
    adapt.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="training steps: auto (default) bfloat16 autocast only where the CPU/GPU runs it natively",
    )
    adapt.add_argument("--cache", help="folder to keep the templates' slice embeddings in (reused by later runs)")
    adapt.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    adapt.set_defaults(func=_adapt)

    export = commands.add_parser("export", help="write slim weights for shipping (optionally fp16)")
    export.add_argument("checkpoint")
    export.add_argument("--out", required=True)
    export.add_argument("--half", action="store_true")
    export.set_defaults(func=_export)
