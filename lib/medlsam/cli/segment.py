"""`medlsam segment`: localise and segment the bank's organs in a scan (or a batch of scans)."""

from __future__ import annotations

import argparse
from pathlib import Path

from medlsam.cli.common import load_model
from medlsam.errors import MedLSAMError


def run(args: argparse.Namespace) -> int | None:
    import time

    from medlsam.atlas.localize import Localizer
    from medlsam.atlas.templates import load_bank
    from medlsam.io.volume import load_ct, read_volume
    from medlsam.segment.batch import is_batch, run_batch
    from medlsam.segment.outputs import check_output_path, check_png_path, write_segmentation
    from medlsam.segment.pipeline import MedLSAMPipeline, SegmentOptions
    from medlsam.segment.qc import qc_montage
    from medlsam.segment.sam import build_segmenter
    from medlsam.utils.devices import check_device

    args.device = check_device(args.device)
    if getattr(args, "learned", None):  # medlsam.learn: the learnt network + the template prior, per organ
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
    model = load_model(args.model)
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
        from medlsam.rt.write import write_rtstruct

        found = {v: n for n, v in result.label_names.items() if n not in result.not_found}
        print(f"RTSTRUCT {write_rtstruct(result.label, found, args.image, args.rtstruct).resolve()}")
    if args.qc:
        qc = qc_montage(volume, result.label, result.label_names, args.qc, reference=reference)
        print(f"QC      {qc.resolve()}")


def add_parsers(commands) -> None:
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
    segment.set_defaults(func=run)
    from medlsam.learn.cli import add_segment_arguments

    add_segment_arguments(segment)
