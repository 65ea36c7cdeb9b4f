"""`medlsam dicom export|import`: a scan as a CT series; a CT series and its RT Structure Set as image + label."""

from __future__ import annotations

import argparse

from medlsam.cli.common import require_dicom


def _dicom_export(args: argparse.Namespace) -> None:
    from medlsam.io.dicom import SeriesFields, export_ct_series, stow_files

    require_dicom()
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
    require_dicom()
    from medlsam.rt.importer import import_series
    from medlsam.rt.roi_names import load_synonyms
    from medlsam.utils.names import read_names

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


def add_parsers(commands) -> None:
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
