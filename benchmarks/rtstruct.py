"""RT Structure Sets in and out, checked by independent tools: round-trip Dice per organ (OpenKBP labels -> RTSTRUCT
-> labels on several scans; the real ARIA thorax set -> label -> RTSTRUCT -> label), our reader against plastimatch
per ROI (on the ARIA file and on what we write), dciodvfy's verdict on every file written, and the seconds to import
and export a 512 x 512 x 150 series.

    python benchmarks/rtstruct.py [--cases 33]

Needs dciodvfy and plastimatch (Debian dicom3tools, plastimatch: `bash scripts/system_deps.sh` as root). Writes
benchmarks/results/rtstruct.md, .json and .png.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import RESULTS, OpenKBP, machine_line
from medlsam.io.dicom import SeriesFields, export_ct_series
from medlsam.io.volume import CTVolume, read_volume
from medlsam.paths import data_dir
from medlsam.rt.check import dciodvfy, missing_tools, plastimatch_masks
from medlsam.rt.importer import import_series
from medlsam.rt.rtstruct import read_ct_series, read_rtstruct, roi_masks
from medlsam.rt.write import label_on_grid, write_rtstruct
from medlsam.utils.metrics import dice

ARIA = "20191031-215249_m.dcm"
COMMAND = "make setup && sudo bash scripts/system_deps.sh && .venv/bin/python benchmarks/rtstruct.py"


def verdict(path: Path) -> dict:
    found = dciodvfy(path)
    return {"errors": found["errors"], "warnings": found["warnings"]}


def reader_agreement(rs: Path, series) -> dict:
    """Dice of plastimatch (--xor-contours, and its default union of a slice's contours) against our reader."""
    ours = roi_masks(rs, series)
    xor = plastimatch_masks(rs, series.folder, True, reference=series.volume)
    union = plastimatch_masks(rs, series.folder, False, reference=series.volume)
    out = {}
    for name, mask in ours.values():
        full = mask.full(series.volume.shape) if mask is not None else np.zeros(series.volume.shape, bool)
        out[name] = {
            "voxels": int(full.sum()),
            "dice_xor": dice(full, xor[name]),
            "dice_union": dice(full, union[name]),
            "voxels_differing_xor": int((full != xor[name]).sum()),
        }
    return out


def openkbp_case(data: OpenKBP, case: str, tmp: Path) -> dict:
    folder = tmp / case
    export_ct_series(data.image(case), folder / "ct", SeriesFields(patient_id=case))
    series = read_ct_series(folder / "ct")
    label = label_on_grid(read_volume(data.label(case)), series.volume)
    tic = time.perf_counter()
    rs = write_rtstruct(label, data.names, series, folder / "rs.dcm")
    write_s = time.perf_counter() - tic
    tic = time.perf_counter()
    back = read_rtstruct(rs, series, organs=data.names)
    read_s = time.perf_counter() - tic
    organs = {}
    voxel_cc = float(np.prod(series.volume.spacing)) / 1000
    for value, name in data.names.items():
        if (label == value).any():
            organs[name] = {
                "dice": dice(back.label.array == value, label == value),
                "cc": (label == value).sum() * voxel_cc,
            }
    agreement = reader_agreement(rs, series)
    return {
        "case": case,
        "spacing_mm": [round(float(s), 3) for s in series.volume.spacing],
        "organs": organs,
        "plastimatch": agreement,
        "dciodvfy": verdict(rs),
        "write_s": write_s,
        "read_s": read_s,
    }


def thorax(folder: Path, tmp: Path) -> tuple[dict, dict]:
    series = read_ct_series(folder)
    first = read_rtstruct(folder / ARIA, series)
    rs = write_rtstruct(first.label, first.names, series, tmp / "thorax_rs.dcm", colors=first.colors)
    second = read_rtstruct(rs, series)
    round_trip = {
        name: dice(first.label.array == value, second.label.array == value) for value, name in first.names.items()
    }
    result = {
        "import": first.report(),
        "round_trip_dice": round_trip,
        "plastimatch_on_aria": reader_agreement(folder / ARIA, series),
        "plastimatch_on_ours": reader_agreement(rs, series),
        "dciodvfy_ours": verdict(rs),
        "dciodvfy_aria": verdict(folder / ARIA),
    }
    return result, {"series": series, "first": first, "rs": rs}


def resampled_series(series, label: np.ndarray, slices: int, tmp: Path):
    """The thorax CT and label resampled to ``slices`` slices (linear / nearest) and written as a DICOM series."""
    from scipy import ndimage

    from medlsam.io.volume import write_volume

    zoom = (1, 1, (slices - 1) / (series.volume.shape[2] - 1))
    ct = ndimage.zoom(series.volume.array.astype(np.float32), zoom, order=1, grid_mode=False)
    lab = ndimage.zoom(label, zoom, order=0, grid_mode=False)
    affine = series.volume.affine.copy()
    affine[:3, 2] /= zoom[2]
    volume = CTVolume(np.round(ct).astype(np.int16), affine, "thorax resampled")
    write_volume(volume.array, volume, tmp / "big.nii.gz")
    export_ct_series(tmp / "big.nii.gz", tmp / "big_ct")
    big = read_ct_series(tmp / "big_ct")
    return big, label_on_grid(CTVolume(lab, affine, "label"), big.volume)


def timings(state: dict, tmp: Path, slices: int = 150) -> dict:
    big, label = resampled_series(state["series"], state["first"].label.array, slices, tmp)
    names = state["first"].names
    tic = time.perf_counter()
    rs = write_rtstruct(label, names, tmp / "big_ct", tmp / "big_rs.dcm")
    export_s = time.perf_counter() - tic
    tic = time.perf_counter()
    back = read_rtstruct(rs, tmp / "big_ct")
    import_s = time.perf_counter() - tic
    tic = time.perf_counter()
    import_series(tmp / "big_ct", tmp / "big_import", rs)
    cli_s = time.perf_counter() - tic
    exact = bool(np.array_equal(back.label.array, label))
    return {
        "shape": list(big.volume.shape),
        "export_rtstruct_s": export_s,
        "import_rtstruct_s": import_s,
        "import_series_to_nifti_s": cli_s,
        "round_trip_exact": exact,
        "dciodvfy": verdict(rs),
    }


def picture(state: dict, path: Path) -> None:
    """One thorax slice: the ARIA contours (lines), our voxels and plastimatch's, and where they differ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medlsam.rt.rtstruct import load_rtstruct, roi_slices

    series, folder = state["series"], state["series"].folder
    ours = {name: m.full(series.volume.shape) for name, m in roi_masks(folder / ARIA, series).values()}
    xor = plastimatch_masks(folder / ARIA, folder, True, reference=series.volume)
    union = plastimatch_masks(folder / ARIA, folder, False, reference=series.volume)
    k = int(
        np.argmax([(union["LUNG_L"][:, :, z] != ours["LUNG_L"][:, :, z]).sum() for z in range(ours["LUNG_L"].shape[2])])
    )
    ct = series.volume.array[:, :, k].T
    fig, axes = plt.subplots(1, 2, figsize=(13, 6.5))
    for ax in axes:
        ax.imshow(ct, cmap="gray", vmin=-1000, vmax=400)
    dataset = load_rtstruct(folder / ARIA)
    from collections import Counter

    for roi in dataset.ROIContourSequence:
        for polygon in roi_slices(roi, series.volume, Counter()).get(k, []):
            closed = np.vstack([polygon, polygon[:1]])
            axes[0].plot(closed[:, 0], closed[:, 1], color=np.array(roi.ROIDisplayColor) / 255, lw=0.8)
    axes[0].set_title(f"slice {k}: ARIA contours (all ROIs)")
    lung, pm_xor, pm_union = ours["LUNG_L"][:, :, k].T, xor["LUNG_L"][:, :, k].T, union["LUNG_L"][:, :, k].T
    overlay = np.zeros(lung.shape + (4,))
    overlay[lung] = (0.2, 0.8, 0.2, 0.35)
    overlay[pm_union & ~lung] = (1, 0, 0, 0.9)
    overlay[pm_xor != lung] = (1, 0, 1, 1)
    axes[1].imshow(overlay)
    ys, xs = np.nonzero(lung | pm_union)
    axes[1].set_xlim(xs.min() - 10, xs.max() + 10)
    axes[1].set_ylim(ys.max() + 10, ys.min() - 10)
    axes[1].set_title(
        f"LUNG_L, slice {k}: our voxels (green); plastimatch's default union fills the hole contours\n"
        f"(red, {int((pm_union & ~lung).sum())} voxels); plastimatch --xor-contours differs from ours on "
        f"{int((pm_xor != lung).sum())} voxels (magenta)",
        fontsize=10,
    )
    for ax in axes:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _organ_rows(cases: list[dict]) -> list[str]:
    rows = ["| organ | scans | round-trip Dice min | mean | organ size cc (min-max) | plastimatch vs ours Dice min |"]
    rows.append("|---|---|---|---|---|---|")
    organs = sorted({o for c in cases for o in c["organs"]}, key=lambda o: OpenKBP().values.get(o, 99))
    for organ in organs:
        dices = [c["organs"][organ]["dice"] for c in cases if organ in c["organs"]]
        sizes = [c["organs"][organ]["cc"] for c in cases if organ in c["organs"]]
        theirs = [c["plastimatch"][organ]["dice_xor"] for c in cases if organ in c["plastimatch"]]
        rows.append(
            f"| {organ} | {len(dices)} | {min(dices):.4f} | {np.mean(dices):.4f} | {min(sizes):.1f}-{max(sizes):.1f} "
            f"| {min(theirs):.4f} |"
        )
    return rows


def _agreement_rows(agreement: dict) -> list[str]:
    rows = [
        "| ROI | voxels | Dice vs plastimatch --xor-contours | voxels differing | Dice vs plastimatch default (union) |"
    ]
    rows.append("|---|---|---|---|---|")
    for name, a in agreement.items():
        rows.append(
            f"| {name} | {a['voxels']} | {a['dice_xor']:.6f} | {a['voxels_differing_xor']} | {a['dice_union']:.6f} |"
        )
    return rows


def report(result: dict, path: Path) -> None:
    cases, th, big = result["openkbp"], result["thorax"], result["timing"]
    kbp_errors = sum(len(c["dciodvfy"]["errors"]) for c in cases)
    kbp_warnings = sorted({w for c in cases for w in c["dciodvfy"]["warnings"]})
    lines = [
        "# RT Structure Sets: round trips, an independent reader, the DICOM validator",
        "",
        f"Machine: {machine_line()}. {result['tools']}.",
        f"Regenerate from a fresh clone (with ../shared/data beside it): `{COMMAND}` ({result['total_s']:.0f} s here).",
        "",
        f"## OpenKBP labels -> RTSTRUCT -> labels ({len(cases)} validation scans, 2.7-5.4 mm pixels)",
        "",
        "Each scan written as a DICOM CT series by `medlsam dicom export`'s code, its label written as an RTSTRUCT on",
        "it (`medlsam.rt.write.write_rtstruct`) and read back (`medlsam.rt.rtstruct.read_rtstruct`); plastimatch",
        "rasterises the same RTSTRUCT on the same series.",
        "",
        *_organ_rows(cases),
        "",
        f"dciodvfy on the {len(cases)} RTSTRUCTs written: {kbp_errors} errors; warnings: "
        + ("; ".join(f"`{w}`" for w in kbp_warnings) or "none")
        + ".",
        "",
        "## The real ARIA thorax structure set (`dicom_rt/thorax_rt`, 512 x 512 x 105, 1.27 mm pixels, 4 mm slices)",
        "",
        "Imported organs: "
        + ", ".join(f"{n} ({th['import']['voxels'][n]} voxels)" for n in th["import"]["voxels"])
        + "; left out: "
        + ", ".join(f"{k} ({v.split(';')[0]})" for k, v in th["import"]["excluded"].items())
        + "; not imported: "
        + ", ".join(f"{k} ({v})" for k, v in th["import"]["dropped"].items())
        + ".",
        "",
        "RTSTRUCT -> label -> RTSTRUCT -> label, Dice per organ: "
        + ", ".join(f"{n} {d:.4f}" for n, d in th["round_trip_dice"].items())
        + ".",
        "",
        "Our reader against plastimatch on the ARIA file (every ROI on its own, no overlap rule):",
        "",
        *_agreement_rows(th["plastimatch_on_aria"]),
        "",
        "On the RTSTRUCT we write from that label:",
        "",
        *_agreement_rows(th["plastimatch_on_ours"]),
        "",
        f"dciodvfy on ours: {len(th['dciodvfy_ours']['errors'])} errors; warnings: "
        + ("; ".join(f"`{w}`" for w in th["dciodvfy_ours"]["warnings"]) or "none")
        + ". On the ARIA file itself "
        f"(for comparison): {len(th['dciodvfy_aria']['errors'])} errors (the anonymiser's hashes in dates and sex, "
        "missing type 2 attributes).",
        "",
        f"## Speed: a {' x '.join(map(str, big['shape']))} series (the thorax resampled to 150 slices)",
        "",
        "| step | seconds |",
        "|---|---|",
        "| export: label -> RTSTRUCT (`write_rtstruct` given the series folder: series read, contours, file) | "
        f"{big['export_rtstruct_s']:.2f} |",
        "| import: RTSTRUCT -> label (`read_rtstruct` given the series folder: series read, rasterised) | "
        f"{big['import_rtstruct_s']:.2f} |",
        "| `medlsam dicom import` (series + RTSTRUCT -> image.nii.gz, label.nii.gz) | "
        f"{big['import_series_to_nifti_s']:.2f} |",
        "",
        f"Round trip on it exact: {big['round_trip_exact']}; dciodvfy errors: {len(big['dciodvfy']['errors'])}.",
        "",
        *NOTES,
    ]
    path.write_text("\n".join(lines) + "\n")


NOTES = [
    "## Notes",
    "",
    "- Round trips are exact by construction: written outlines are the 0.5 iso-lines of each slice's mask (marching",
    "  squares, vertices half-way between voxel centres), so every voxel centre lies at least 0.35 voxel from an",
    "  edge, and reading fills the voxels whose centres are inside (even-odd). The issue's targets (Dice >= 0.97 on",
    "  1 mm scans, >= 0.90 on OpenKBP's 4 mm grids) are met with Dice 1.",
    "- plastimatch's default combines a slice's contours by union; DICOM planning systems (ARIA here) write holes as",
    "  separate inner contours, read by even-odd, so the comparison that matters is `--xor-contours`; the union column",
    "  shows what a reader that ignores holes gets (the ARIA lungs have vessel holes). With `--xor-contours` the",
    "  remaining differences on the ARIA file are single voxels whose centres lie on a contour edge (tie rules).",
    "- dciodvfy's remaining warnings come from the values copied from the CT (an anonymised name without `^` is the",
    "  'retired person name form'; a study date the anonymiser replaced by a hash is left empty, so dciodvfy notes it",
    "  would be needed for a DICOMDIR). Values invalid for their VR are never copied.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=33, help="OpenKBP validation scans (default: all 33)")
    args = parser.parse_args()
    why = missing_tools()
    if why:
        raise SystemExit(f"benchmarks/rtstruct.py: {why}: run `sudo bash scripts/system_deps.sh`")
    start = time.perf_counter()
    data = OpenKBP()
    import subprocess

    version = subprocess.run(["plastimatch", "--version"], capture_output=True, text=True).stdout.strip()
    result: dict = {"tools": f"{version}, dciodvfy (dicom3tools)"}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cases = [c["id"] for c in data.split("validation")][: args.cases]
        result["openkbp"] = []
        for case in cases:
            result["openkbp"].append(openkbp_case(data, case, tmp))
            print(f"{case}: " + ", ".join(f"{o} {v['dice']:.4f}" for o, v in result["openkbp"][-1]["organs"].items()))
        result["thorax"], state = thorax(data_dir() / "dicom_rt" / "thorax_rt", tmp)
        print("thorax round trip:", result["thorax"]["round_trip_dice"])
        result["timing"] = timings(state, tmp)
        print("timing:", result["timing"])
        picture(state, RESULTS / "rtstruct.png")
    result["total_s"] = time.perf_counter() - start
    (RESULTS / "rtstruct.json").write_text(json.dumps(result, indent=1, default=float))
    report(result, RESULTS / "rtstruct.md")
    print(f"wrote {RESULTS / 'rtstruct.md'} in {result['total_s']:.0f} s")


if __name__ == "__main__":
    main()
