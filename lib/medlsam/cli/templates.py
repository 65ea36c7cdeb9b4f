"""`medlsam templates build|show` and `medlsam localize`: template banks and organ localisation."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medlsam.cli.common import load_model
from medlsam.errors import MedLSAMError


def _templates_show(args: argparse.Namespace) -> None:
    from medlsam.atlas.templates import load_bank
    from medlsam.medlam.network import model_fingerprint
    from medlsam.paths import default_medlam_path

    summary = load_bank(args.bank).summary()
    model_path = args.model or default_medlam_path()
    matches = summary["model_fingerprint"] == model_fingerprint(load_model(args.model))
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
    from medlsam.atlas.bank_builder import build_bank
    from medlsam.utils.names import read_names

    labels = args.labels or [None] * len(args.images)
    points = [json.loads(Path(p).read_text()) for p in args.points] if args.points else [None] * len(args.images)
    if len(labels) != len(args.images) or len(points) != len(args.images):
        raise MedLSAMError(f"{len(args.images)} images need as many --labels or --points files")
    names = read_names(args.names)  # a bad names file fails before any work
    images = args.images
    if args.rtstruct is not None:  # DICOM series folders whose structure sets are the labels
        if args.labels or args.points:
            raise MedLSAMError("--rtstruct gives the labels: leave out --labels and --points")
        from medlsam.rt.importer import rtstruct_templates
        from medlsam.rt.roi_names import load_synonyms

        synonyms = load_synonyms(args.synonyms) if args.synonyms else None
        images, labels, names, lines = rtstruct_templates(
            args.images, args.rtstruct, names=names or None, synonyms=synonyms
        )
        print("\n".join(lines))
    bank = build_bank(load_model(args.model), images, labels, names, points)
    bank.save(args.out)
    summary = ", ".join(f"{n} ({o.count})" for n, o in bank.organs.items())
    print(f"template bank {args.out}: {summary}")


def _localize(args: argparse.Namespace) -> None:
    from medlsam.atlas.localize import LocalizeOptions, Localizer
    from medlsam.atlas.templates import load_bank
    from medlsam.io.volume import load_ct
    from medlsam.utils.atomic import write_json_atomic

    out = Path(args.out)
    if not out.parent.exists():
        raise MedLSAMError(f"output folder {out.parent} does not exist")
    model = load_model(args.model)
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


def add_parsers(commands) -> None:
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
