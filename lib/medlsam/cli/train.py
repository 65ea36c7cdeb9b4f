"""`medlsam train`: self-supervised MedLAM training (one process, or torchrun ranks)."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from medlsam.errors import MedLSAMError


def run(args: argparse.Namespace) -> int:
    from medlsam.medlam.network import CONFIGS, MedLAMConfig
    from medlsam.medlam.patches import list_images
    from medlsam.medlam.precision import parse_precision
    from medlsam.medlam.training import Trainer, TrainOptions
    from medlsam.utils.distributed import close_distributed, env_world, init_distributed, launch_torchrun, strip_option

    if args.nproc > 1 and env_world()[1] == 1:  # launch torchrun, which runs this command in every rank
        return launch_torchrun(args.nproc, strip_option(args.argv, "--nproc"))
    base = CONFIGS[args.config]
    patch = (args.patch_size,) * 3 if args.patch_size else base.patch_size
    config = MedLAMConfig(
        base_channels=args.base_channels or base.base_channels,
        patch_size=patch,
        num_classes=base.num_classes,
        dropout=base.dropout,
    )
    options = TrainOptions(
        **{f.name: getattr(args, f.name) for f in fields(TrainOptions) if getattr(args, f.name, None) is not None},
        bf16=parse_precision(args.precision),
    )
    validator = None
    if args.val_templates:
        from medlsam.atlas.validation import LocalizationValidator
        from medlsam.utils.names import read_names

        if not (args.val_template_labels and args.val_images and args.val_labels):
            raise MedLSAMError("--val-templates needs --val-template-labels, --val-images and --val-labels")
        validator = LocalizationValidator(
            list_images(args.val_templates),
            list_images(args.val_template_labels),
            list_images(args.val_images),
            list_images(args.val_labels),
            read_names(args.names),
        )
    ctx = init_distributed(options.device)  # one process, or this rank of a torchrun group
    options.device = ctx.device
    print(f"medlsam train: {ctx.describe()}", flush=True)
    try:
        trainer = Trainer(
            list_images(args.images),
            Path(args.out),
            config,
            options,
            val_images=list_images(args.val_images) if args.val_images else None,
            cache_dir=Path(args.cache) if args.cache else None,
            stats_path=Path(args.stats) if args.stats else None,
            validator=validator,
            dist=ctx,
        )
        if args.resume:
            trainer.resume(Path(args.resume))
        result = trainer.run()
    finally:
        close_distributed()
    if ctx.is_main:
        print(
            f"trained {result['epoch']} epochs in {result['total_time']:.0f} s; best validation error "
            f"{result['best_metric']:.2f} mm; weights: {args.out}"
        )
    return 0


def add_parsers(commands) -> None:
    train = commands.add_parser("train", help="self-supervised MedLAM training on unlabeled CT scans")
    train.add_argument("--images", nargs="+", required=True, help="image files, folders or .txt lists")
    train.add_argument("--out", required=True, help="where the best weights go (e.g. medlam.pt)")
    train.add_argument("--val-images", nargs="+", help="validation scans (RDR error in mm unless templates are given)")
    train.add_argument("--val-labels", nargs="+", help="labels of --val-images: validate by localisation")
    train.add_argument("--val-templates", nargs="+", help="labelled template scans for localisation validation")
    train.add_argument("--val-template-labels", nargs="+", help="their labels")
    train.add_argument("--names", help='organ names JSON {"1": "Brainstem", ...} for the validation templates')
    train.add_argument("--resume", help="a .state.pt file written by an earlier run")
    train.add_argument("--cache", help="folder to cache scans resampled to the 3 mm grid")
    train.add_argument("--stats", help="train_stats.json path (default: beside --out)")
    train.add_argument("--config", default="default", choices=["default", "reference"])
    train.add_argument("--base-channels", type=int)
    train.add_argument("--epochs", type=int)
    train.add_argument("--iterations-per-epoch", dest="iterations_per_epoch", type=int)
    train.add_argument("--batch-size", dest="batch_size", type=int)
    train.add_argument("--learning-rate", dest="learning_rate", type=float)
    train.add_argument("--seed", type=int)
    train.add_argument("--device", help="cpu (default), cuda or cuda:N")
    train.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="processes on this machine: launches torchrun "
        "(for several machines run `torchrun --nnodes M ... -m medlsam.cli train ...` yourself)",
    )
    train.add_argument("--workers", type=int, help="DataLoader processes sampling patches (default 0: in-process)")
    train.add_argument("--patch-size", dest="patch_size", type=int, help="cubic patch side (multiple of 16)")
    train.add_argument("--time-limit", dest="time_limit_s", type=float, help="stop after this many seconds")
    train.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="auto (default): bfloat16 autocast only where the CPU/GPU runs it natively",
    )
    train.set_defaults(func=run)
