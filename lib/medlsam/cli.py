"""The `medlsam` command: train MedLAM, build template banks, localise and segment organs."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields
from pathlib import Path

from medlsam.errors import MedLSAMError


def _train(args: argparse.Namespace) -> int:
    from medlsam.distributed import close_distributed, env_world, init_distributed, launch_torchrun, strip_option
    from medlsam.network import CONFIGS, MedLAMConfig
    from medlsam.patches import list_images
    from medlsam.precision import parse_precision
    from medlsam.training import Trainer, TrainOptions

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
        from medlsam.names import read_names
        from medlsam.validation import LocalizationValidator

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


def _model(path: str | None):
    from medlsam.network import load_medlam
    from medlsam.paths import default_medlam_path

    return load_medlam(path or default_medlam_path())


def _templates_show(args: argparse.Namespace) -> None:
    from medlsam.network import model_fingerprint
    from medlsam.paths import default_medlam_path
    from medlsam.templates import load_bank

    summary = load_bank(args.bank).summary()
    model_path = args.model or default_medlam_path()
    matches = summary["model_fingerprint"] == model_fingerprint(_model(args.model))
    if args.json:
        print(json.dumps({**summary, "medlam": str(model_path), "matches_medlam": matches}, indent=2))
        return
    print(f"template bank {args.bank} (version {summary['version']})")
    verdict = f"matches {model_path}" if matches else f"does NOT match {model_path}: rebuild the bank for it"
    print(f"  MedLAM fingerprint {summary['model_fingerprint']}: {verdict}")
    print(f"  source scans ({len(summary['sources'])}): " + ", ".join(Path(s).name for s in summary["sources"]))
    print(f"  organs ({len(summary['organs'])}):")
    print(f"    {'value':>5s}  {'organ':16s} {'templates':>9s}  {'prior cut':>9s}  mean extent (mm, z x y x x)")
    for name, organ in summary["organs"].items():
        size = " x ".join(f"{v:.0f}" for v in organ["size_mm"])
        print(f"    {organ['value']:5d}  {name:16s} {organ['templates']:9d}  {organ['prior_cut']:9.1f}  {size}")


def _templates_build(args: argparse.Namespace) -> None:
    from medlsam.names import read_names
    from medlsam.templates import build_bank

    labels = args.labels or [None] * len(args.images)
    points = [json.loads(Path(p).read_text()) for p in args.points] if args.points else [None] * len(args.images)
    if len(labels) != len(args.images) or len(points) != len(args.images):
        raise MedLSAMError(f"{len(args.images)} images need as many --labels or --points files")
    names = read_names(args.names)  # a bad names file fails before any work
    images = args.images
    if args.rtstruct is not None:  # DICOM series folders whose structure sets are the labels
        if args.labels or args.points:
            raise MedLSAMError("--rtstruct gives the labels: leave out --labels and --points")
        from medlsam.roi_names import load_synonyms
        from medlsam.rtstruct_import import rtstruct_templates

        synonyms = load_synonyms(args.synonyms) if args.synonyms else None
        images, labels, names, lines = rtstruct_templates(
            args.images, args.rtstruct, names=names or None, synonyms=synonyms
        )
        print("\n".join(lines))
    bank = build_bank(_model(args.model), images, labels, names, points)
    bank.save(args.out)
    summary = ", ".join(f"{n} ({o.count})" for n, o in bank.organs.items())
    print(f"template bank {args.out}: {summary}")


def _localize(args: argparse.Namespace) -> None:
    from medlsam.atomic import write_json_atomic
    from medlsam.localize import LocalizeOptions, Localizer
    from medlsam.templates import load_bank
    from medlsam.volume import load_ct

    out = Path(args.out)
    if not out.parent.exists():
        raise MedLSAMError(f"output folder {out.parent} does not exist")
    model = _model(args.model)
    bank = load_bank(args.templates, model)
    options = LocalizeOptions(
        mode=args.mode, refine=args.refine, match=not args.no_match, jumps=args.jumps, margin_mm=args.margin_mm
    )
    result = Localizer(model, bank, options).localize(
        load_ct(args.image), args.organs.split(",") if args.organs else None
    )
    report = {name: loc.to_json() for name, loc in result["organs"].items()}
    write_json_atomic({"image": str(args.image), "organs": report, "timings_s": result["timings_s"]}, out)
    for name, loc in report.items():
        print(f"{name:16s} {'found' if loc['found'] else 'NOT FOUND'} {loc['box_voxel'] or loc.get('reason', '')}")


def _segment(args: argparse.Namespace) -> int | None:
    import time

    from medlsam.batch import is_batch, run_batch
    from medlsam.devices import check_device
    from medlsam.localize import Localizer
    from medlsam.outputs import check_output_path, check_png_path, write_segmentation
    from medlsam.pipeline import MedLSAMPipeline, SegmentOptions
    from medlsam.qc import qc_montage
    from medlsam.sam import build_segmenter
    from medlsam.templates import load_bank
    from medlsam.volume import load_ct, read_volume

    args.device = check_device(args.device)
    if getattr(args, "learned", None):  # medlsam.learn: the learnt network + the template prior
        from medlsam.learn.cli import segment

        return segment(args)
    if is_batch(args.images, args.out):
        if args.rtstruct:
            raise MedLSAMError("--rtstruct writes one structure set: give one DICOM series folder, not a batch")
        return run_batch(args, args.argv)
    args.image = args.images[0]
    check_output_path(args.out)  # fail before any work
    if args.rtstruct and not Path(args.image).is_dir():
        raise MedLSAMError(
            f"--rtstruct needs a DICOM series folder as the scan (the structure set references its "
            f"instances), not {args.image}"
        )
    if args.rtstruct and not Path(args.rtstruct).expanduser().resolve().parent.is_dir():
        raise MedLSAMError(f"--rtstruct: the folder of {args.rtstruct} does not exist")
    weight = {} if args.prior_weight is None else {"prior_weight": args.prior_weight}
    options = SegmentOptions(mode=args.mode, **weight)
    if args.qc:
        check_png_path(args.qc)
    if args.qc_reference and not args.qc:
        raise MedLSAMError("--qc-reference needs --qc PICTURE.png")
    reference = read_volume(args.qc_reference).array if args.qc_reference else None
    organs = [o.strip() for o in args.organs.split(",") if o.strip()] if args.organs else None
    model = _model(args.model)
    bank = load_bank(args.templates, model)
    bank.select(organs)  # an organ not in the bank fails here
    segmenter = build_segmenter(args.backend, args.checkpoint, device=args.device)
    tic = time.perf_counter()
    volume = load_ct(args.image)
    load_s = time.perf_counter() - tic
    pipeline = MedLSAMPipeline(Localizer(model, bank), segmenter, options)
    result = pipeline.segment(volume, organs, progress=not args.quiet, timings={"load": load_s})
    write_segmentation(result, volume, args.out)
    for name, value in result.label_names.items():
        box = result.boxes[name]
        state = f"{box['voxels']} voxels" if name not in result.not_found else f"NOT FOUND ({box.get('reason', '')})"
        print(f"{name:16s} label {value:3d}  {state}")
    timings = ", ".join(f"{k} {v:.1f} s" for k, v in result.timings_s.items())
    print(f"{timings}; {result.encoder_calls} encoder calls (reference approach: {result.reference_encoder_calls})")
    print(f"label   {Path(args.out).expanduser().resolve()}\nresult  {Path(args.out).expanduser().resolve()}.json")
    if args.rtstruct:
        from medlsam.rtstruct_write import write_rtstruct

        found = {v: n for n, v in result.label_names.items() if n not in result.not_found}
        print(f"RTSTRUCT {write_rtstruct(result.label, found, args.image, args.rtstruct).resolve()}")
    if args.qc:
        qc = qc_montage(volume, result.label, result.label_names, args.qc, reference=reference)
        print(f"QC      {qc.resolve()}")


def _adapt(args: argparse.Namespace) -> None:
    from medlsam.adapt import AdaptOptions, adapt
    from medlsam.devices import check_device
    from medlsam.names import read_names
    from medlsam.precision import parse_precision

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
        _model(args.model),
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
    from medlsam.network import load_medlam, model_fingerprint, save_medlam

    model = load_medlam(args.checkpoint)
    if args.half:  # the fingerprint must describe the weights as they will be loaded
        model = model.half().float()
    import torch

    source = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    provenance = {k: source[k] for k in ("epoch", "val_error_mm") if isinstance(source, dict) and k in source}
    save_medlam(model, args.out, half=args.half, fingerprint=model_fingerprint(model), **provenance)
    print(f"{args.out}: MedLAM {model.config.to_dict()}, fingerprint {model_fingerprint(model)}")


def _dicom_export(args: argparse.Namespace) -> None:
    from medlsam.dicom import SeriesFields, export_ct_series, stow_files

    try:
        import pydicom  # noqa: F401
    except ImportError:
        raise MedLSAMError("medlsam dicom needs the dicom extra: pip install 'medlsam[dicom]'") from None
    fields = SeriesFields(
        patient_id=args.patient_id,
        patient_name=args.patient_name,
        study_description=args.study_description,
        series_description=args.series_description,
        study_uid=args.study_uid or "",
        series_number=args.series_number,
    )
    series = export_ct_series(args.image, args.out, fields)
    print(
        f"{series.folder}: {len(series.files)} CT slices, study {series.study_uid}, series {series.series_uid} "
        f"(HU = pixel x {series.rescale_slope:g} + {series.rescale_intercept:g})"
    )
    if args.stow:
        print(f"stored {stow_files(series.files, args.stow)} instances on {args.stow} (STOW-RS)")


def _dicom_import(args: argparse.Namespace) -> None:
    try:
        import pydicom  # noqa: F401
    except ImportError:
        raise MedLSAMError("medlsam dicom needs the dicom extra: pip install 'medlsam[dicom]'") from None
    from medlsam.names import read_names
    from medlsam.roi_names import load_synonyms
    from medlsam.rtstruct_import import import_series

    done = import_series(
        args.series,
        args.out,
        args.rtstruct,
        synonyms=load_synonyms(args.synonyms),  # a bad synonyms or names file fails before any work
        keep_targets=args.keep_targets,
        organs=read_names(args.names) if args.names else None,
        ignore_frame_of_reference=args.ignore_frame_of_reference,
        fmt=args.format,
    )
    print("\n".join(done.lines))


def build_parser() -> argparse.ArgumentParser:
    from medlsam.learn import cli as learn_cli

    parser = argparse.ArgumentParser(prog="medlsam", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

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
    train.set_defaults(func=_train)

    templates = commands.add_parser("templates", help="template banks").add_subparsers(dest="action", required=True)
    build = templates.add_parser("build", help="build a template bank from labelled scans or extreme points")
    build.add_argument("--images", nargs="+", required=True)
    build.add_argument("--labels", nargs="+", help="one label file per image")
    build.add_argument(
        "--points", nargs="+", help='one JSON per image: {"Organ": {"value": 1, "points": [[i,j,k] x6]}}'
    )
    build.add_argument("--names", help='JSON {"1": "Brainstem", ...} (or a dataset.json with "labels")')
    build.add_argument(
        "--rtstruct",
        nargs="*",
        help="--images are DICOM series folders labelled by RT Structure Sets: one RS file per folder, or none to "
        "take the only one in each folder (ROI names mapped by TG-263 and synonyms; --names maps onto a bank's)",
    )
    build.add_argument("--synonyms", help="a synonyms JSON extending the built-in ROI name map (with --rtstruct)")
    build.add_argument("--model", help="MedLAM checkpoint (default: the shipped model)")
    build.add_argument("--out", required=True)
    build.set_defaults(func=_templates_build)
    show = templates.add_parser("show", help="what a template bank holds: organs, templates per organ, sources, MedLAM")
    show.add_argument("bank")
    show.add_argument("--model", help="MedLAM checkpoint to check the bank against (default: the shipped model)")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=_templates_show)

    localize = commands.add_parser("localize", help="localise the bank's organs in a scan")
    localize.add_argument("image")
    localize.add_argument("--templates", required=True, help="template bank file")
    localize.add_argument("--model", help="MedLAM checkpoint (default: the shipped model)")
    localize.add_argument("--mode", choices=["wpl", "spl"], default="wpl")
    localize.add_argument("--organs", help="comma-separated organ names (default: all)")
    localize.add_argument("--jumps", type=int, default=1, help="coarse latent jumps (1 = reference)")
    localize.add_argument("--refine", action="store_true", help="add MedLAM's multi-scale similarity refinement")
    localize.add_argument("--no-match", action="store_true", help="skip the template intensity matching")
    localize.add_argument("--margin-mm", type=float, default=0.0, help="extend boxes on every side")
    localize.add_argument("--out", required=True, help="boxes JSON")
    localize.set_defaults(func=_localize)

    segment = commands.add_parser("segment", help="localise and segment the bank's organs in a scan")
    segment.add_argument("images", nargs="+", metavar="IMAGE", help="a scan, or several scans / folders (batch)")
    segment.add_argument("--templates", required=True, help="template bank file")
    segment.add_argument(
        "--out",
        required=True,
        help="label file (.nii.gz, .nii or .nrrd); LABEL.json beside it. "
        "Batch (a folder or several scans): a folder getting NAME.nii.gz + NAME.nii.gz.json per scan",
    )
    segment.add_argument(
        "--workers",
        type=int,
        default=1,
        help="batch: processes sharing the scans (torchrun ranks share them too, by RANK / WORLD_SIZE)",
    )
    segment.add_argument("--model", help="MedLAM checkpoint (default: the shipped model)")
    segment.add_argument(
        "--backend", default="lite_medsam", help="segmenter: lite_medsam (default), sam_vit_b|l|h, medsam_vit_b"
    )
    segment.add_argument("--checkpoint", help="segmenter weights (required for SAM/MedSAM backends)")
    segment.add_argument(
        "--mode",
        choices=["prior", "wpl", "spl"],
        default="prior",
        help="prompts: prior (per-slice boxes of the matched templates), wpl (one box), spl (slabs)",
    )
    segment.add_argument(
        "--prior-weight",
        type=float,
        help="weight of the template prior against SAM's masks (1: the prior alone, no SAM; 0: SAM alone; default: "
        "the prior alone with the shipped LiteMedSAM, the weights recorded by `medlsam adapt` with adapted ones)",
    )
    segment.add_argument("--organs", help="comma-separated organ names (default: all of the bank)")
    segment.add_argument("--qc", help="write a QC picture (PNG): each organ's middle axial slice, cropped, outlined")
    segment.add_argument(
        "--qc-reference",
        help="a reference label on the scan's grid (same values as the bank's "
        "organs) shown beside each organ in the QC picture, with the Dice",
    )
    segment.add_argument(
        "--rtstruct",
        help="also write the result as a DICOM RT Structure Set (OUT.dcm) referencing the scan, a DICOM series folder",
    )
    segment.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    segment.add_argument("--quiet", action="store_true", help="no progress bar")
    segment.set_defaults(func=_segment)
    learn_cli.add_segment_arguments(segment)
    learn_cli.add_parser(commands)

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

    dicom = commands.add_parser("dicom", help="DICOM: export a scan as a CT series, import a series").add_subparsers(
        dest="action", required=True
    )
    dicom_export = dicom.add_parser(
        "export", help="write a NIfTI/NRRD scan as a DICOM CT series (one file per slice), optionally STOW-RS it"
    )
    dicom_export.add_argument("image", help="a 3D CT scan (.nii.gz, .nii, .nrrd, .mha)")
    dicom_export.add_argument("--out", required=True, help="new folder for the series")
    dicom_export.add_argument("--patient-id", default="ANONYMOUS")
    dicom_export.add_argument("--patient-name", default="Anonymous")
    dicom_export.add_argument("--study-description", default="")
    dicom_export.add_argument("--series-description", default="CT")
    dicom_export.add_argument("--series-number", type=int, default=1)
    dicom_export.add_argument("--study-uid", help="add the series to this study (default: a new study)")
    dicom_export.add_argument("--stow", metavar="URL", help="also store it on this DICOMweb server (STOW-RS)")
    dicom_export.set_defaults(func=_dicom_export)
    dicom_import = dicom.add_parser(
        "import",
        help="a DICOM CT series folder (+ its RT Structure Set) -> image and label (NIfTI/NRRD) with organ names",
    )
    dicom_import.add_argument("series", metavar="SERIES_DIR", help="folder of the CT series (the largest series)")
    dicom_import.add_argument(
        "--rtstruct", metavar="RS.dcm", help="the RT Structure Set (default: the only one in SERIES_DIR, if any)"
    )
    dicom_import.add_argument("--out", required=True, help="folder for image.*, label.*, names.json, import.json")
    dicom_import.add_argument(
        "--synonyms", help='JSON {"TG-263 name": ["other name", ...]} extending the built-in ROI name synonyms'
    )
    dicom_import.add_argument(
        "--names", help='map onto these organs and values (JSON {"1": "Brainstem", ...}, e.g. a bank\'s names)'
    )
    dicom_import.add_argument(
        "--keep-targets", action="store_true", help="also import targets (GTV/CTV/PTV/ITV), PRVs, rings, helpers"
    )
    dicom_import.add_argument(
        "--ignore-frame-of-reference",
        action="store_true",
        help="place the contours by patient coordinates even when the structure set names another frame of reference",
    )
    dicom_import.add_argument("--format", choices=["nii.gz", "nii", "nrrd"], default="nii.gz")
    dicom_import.set_defaults(func=_dicom_import)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the launchers (torchrun, --workers)
    logging.basicConfig(level=logging.INFO, format="medlsam: %(message)s")
    try:
        code = args.func(args)
    except MedLSAMError as exc:
        print(f"medlsam: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medlsam: interrupted (outputs are written atomically: no partial file is left)", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
