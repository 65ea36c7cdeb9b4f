"""Class-agnostic clicks on full-resolution scans (issue 30): Dice against simulated clicks for every structure of
at least 1 cc of the real chest series (``dicom_rt/thorax_rt``, its RTSTRUCT) and of the abdominal slab
(``abdomen/``, TotalSegmentator masks), for the class-agnostic method (``medlsam.interact.click_structure``),
the ``sam_3d`` propagation (LiteMedSAM), the click refiner network without a prior (the old class-agnostic
``edit`` path) and ``combo`` (blobs or a lean LiteMedSAM candidate chosen per request,
``medlsam.interact.click_combo``; the image's slices are encoded once before its first click, timed apart).

    python benchmarks/editing_fullres.py [--methods any,combo,sam_3d,refiner] [--max-clicks 10] [--threads 2]

Sequences: ``clicks`` (the first click at the structure's centre on its middle slice, then each click at the most
interior voxel of the largest 3D error: ``medlsam.interact.click_simulator``) and ``box`` (first the structure's 3D
box as the prompt, then the same error clicks). Each step is one request with every prompt so far, timed. Results go to
benchmarks/results/editing_fullres.json (one row per structure, method and sequence; ``--load`` merges earlier
json files) and the report (.md, .png) is written from all rows. The labels are read only to place the clicks and
score.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SAM_CACHE = HERE.parent / "runs" / "benchmarks" / "editing_fullres_sam"  # git-ignored: LiteMedSAM slice embeddings
sys.path.insert(0, str(HERE))

from common import RESULTS  # noqa: E402
from medlsam.interact.click_simulator import error_click, organ_centre_click  # noqa: E402
from medlsam.interact.click_update import CHANGE_ELSEWHERE  # noqa: E402
from medlsam.paths import data_dir  # noqa: E402
from medlsam.utils.metrics import cranio_caudal_axis, dice  # noqa: E402

CLICKS = (0, 1, 2, 3, 5, 10)
MIN_CC = 1.0


def load_scans(root: Path, thorax_slices: int = 0) -> list[dict]:
    """[{name, hu, spacing, axis, structures: {name: mask}}] of the full-resolution scans; ``thorax_slices``: the
    chest series resampled to that many slices instead (linear HU, nearest labels; for timing at a scan size)."""
    from medlsam.io.volume import load_ct, read_volume
    from medlsam.rt.rtstruct import read_ct_series, read_rtstruct

    scans = []
    folder = root / "dicom_rt" / "thorax_rt"
    series = read_ct_series(folder)
    rs = read_rtstruct(next(p for p in folder.glob("*.dcm") if not p.name.startswith("CT_")), series)
    volume, label, name = series.volume, rs.label.array, "thorax_rt"
    if thorax_slices:
        volume, label = _resliced(volume, label, thorax_slices)
        name = f"thorax_rt_{thorax_slices}_slices"
    scans.append(_scan(name, volume, label, rs.names))
    abdomen = root / "abdomen"
    readme = json.loads((abdomen / "README.json").read_text())
    names = {int(v): n for v, n in readme["labels"].items()}
    volume = load_ct(abdomen / "abdomen_slab_ct.nii.gz")
    scans.append(_scan("abdomen_slab", volume, read_volume(abdomen / "abdomen_slab_label.nii.gz").array, names))
    return scans


def _resliced(volume, label: np.ndarray, slices: int):
    """The volume and label resampled along file axis 2 to ``slices`` slices (same extent)."""
    from scipy import ndimage

    from medlsam.io.volume import CTVolume

    factor = slices / volume.shape[2]
    hu = ndimage.zoom(volume.array.astype(np.float32), (1, 1, factor), order=1)
    label = ndimage.zoom(label, (1, 1, factor), order=0)
    affine = volume.affine.copy()
    affine[:3, 2] /= factor
    return CTVolume(hu, affine, volume.source), label


def _scan(name: str, volume, label: np.ndarray, names: dict[int, str]) -> dict:
    spacing = np.asarray(volume.spacing, np.float64)
    structures = {}
    for value, organ in sorted(names.items()):
        mask = label == value
        if mask.sum() * np.prod(spacing) / 1000.0 >= MIN_CC:
            structures[organ] = mask
    hu = volume.array.astype(np.float32)
    return {
        "name": name,
        "volume": volume,
        "hu": hu,
        "spacing": spacing,
        "axis": cranio_caudal_axis(volume.affine),
        "structures": structures,
    }


def truth_box(mask: np.ndarray) -> list[list[int]]:
    idx = np.argwhere(mask)
    return [idx.min(axis=0).tolist(), idx.max(axis=0).tolist()]


def simulate(step, truth: np.ndarray, axis: int, use_box: bool, max_clicks: int) -> list[dict]:
    """Run ``step(fg, bg, box) -> full-shape mask`` after 0 (box only) or 1.. clicks; Dice and seconds each."""
    box = truth_box(truth) if use_box else None
    fg = [] if use_box else [organ_centre_click(truth, axis)]
    bg: list[list[int]] = []
    out = []
    clicks = 0 if use_box else 1
    while clicks <= max_clicks:
        tic, cpu = time.perf_counter(), time.process_time()
        pred = step(np.array(fg, int).reshape(-1, 3), np.array(bg, int).reshape(-1, 3), box)
        seconds, cpu = time.perf_counter() - tic, time.process_time() - cpu
        out.append({"clicks": clicks, "dice": round(dice(pred, truth), 4), "seconds": round(seconds, 3)})
        out[-1]["cpu_seconds"] = round(cpu, 3)  # this process's CPU time: what the request costs on an idle core
        out[-1].update(getattr(step, "info", {}))  # e.g. combo's choice
        nxt = error_click(pred, truth)
        if nxt is None:
            break
        (fg if nxt[1] else bg).append(nxt[0])
        clicks += 1
    return out


def any_step(scan: dict, name: str, cache):
    from medlsam.interact.click_any import check_box, check_prompts
    from medlsam.interact.click_structure import segment_structure

    def step(fg, bg, box):
        checked = check_prompts(name, fg, bg, check_box(box, scan["hu"].shape), scan["hu"], scan["axis"])
        region, mask = segment_structure(scan["hu"], scan["spacing"], checked, scan["axis"], cache=cache, name=name)
        out = np.zeros(scan["hu"].shape, bool)
        out[region] = mask
        return out

    return step


def combo_step(scan: dict, name: str, cache, change_elsewhere: float):
    from medlsam.interact.click_any import check_box, check_prompts
    from medlsam.interact.click_combo import segment_combo

    def step(fg, bg, box):
        checked = check_prompts(name, fg, bg, check_box(box, scan["hu"].shape), scan["hu"], scan["axis"])
        calls = cache.sam.decoder_calls
        region, mask, choice = segment_combo(
            scan["hu"],
            scan["spacing"],
            checked,
            scan["axis"],
            cache=cache,
            name=name,
            change_elsewhere=change_elsewhere,
        )
        step.info = {"choice": choice, "decoder_calls": cache.sam.decoder_calls - calls}
        out = np.zeros(scan["hu"].shape, bool)
        out[region] = mask
        return out

    return step


def combo_cache(scan: dict, sam_cache: Path | None):
    """The scan's ComboCache with every slice encoded (LiteMedSAM, cached on disk) and the seconds that took."""
    from medlsam.interact.click_combo import ComboCache
    from medlsam.interact.click_sam import SamCache
    from medlsam.interact.click_structure import AnyCache
    from medlsam.segment.sam import build_segmenter
    from medlsam.segment.sam.slices import SliceEmbeddings

    embeddings = SliceEmbeddings(build_segmenter("lite_medsam"), scan["volume"], axis=scan["axis"], cache_dir=sam_cache)
    sam = SamCache(embeddings)
    seconds = sam.encode(range(embeddings.num_slices))
    encode = {"seconds": round(seconds, 1), "slices": embeddings.num_slices, "from_disk": embeddings.disk_reads}
    return ComboCache(AnyCache(), sam), encode


def sam3d_step(scan: dict, embeddings):
    from medlsam.interact.interactive import parse_prompts
    from medlsam.interact.propagation import segment_volume

    def step(fg, bg, box):
        roi = None if box is None else [box[0][0], box[1][0], box[0][1], box[1][1], box[0][2], box[1][2]]
        prompts = parse_prompts(scan["hu"].shape, fg.tolist(), bg.tolist(), roi)
        return segment_volume(embeddings, prompts).mask

    return step


def refiner_step(scan: dict, name: str, refiner):
    from medlsam.interact.editing import OrganClicks, edit_label

    def step(fg, bg, box):
        base = np.zeros(scan["hu"].shape, np.uint8)
        label, _ = edit_label(
            base,
            scan["hu"],
            scan["spacing"],
            {name: 1},
            {name: OrganClicks(fg, bg)},
            axis=scan["axis"],
            refiner=refiner,
        )
        return label == 1

    return step


def run(args) -> list[dict]:
    rows = []
    for scan in load_scans(Path(args.data) if args.data else data_dir(), args.thorax_slices):
        shared = {
            "sam_cache": Path(args.sam_cache or SAM_CACHE) / scan["name"],
            "change_elsewhere": args.change_elsewhere,
        }
        for method in args.methods:
            for organ, truth in scan["structures"].items():
                if args.structures and organ not in args.structures:
                    continue
                for sequence in args.sequences:
                    if method == "refiner" and sequence == "box":
                        continue  # the refiner takes no box
                    step = make_step(method, scan, organ, shared)
                    curve = simulate(step, truth, scan["axis"], sequence == "box", args.max_clicks)
                    cc = float(truth.sum() * np.prod(scan["spacing"]) / 1000.0)
                    row = {
                        "scan": scan["name"],
                        "shape": list(scan["hu"].shape),
                        "structure": organ,
                        "cc": round(cc, 1),
                    }
                    if method == "combo":
                        row["encode"] = shared["encode"]  # once per image, before its first click
                    rows.append({**row, "method": method, "sequence": sequence, "curve": curve})
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def make_step(method: str, scan: dict, organ: str, shared: dict):
    if method == "any":
        from medlsam.interact.click_structure import AnyCache

        return any_step(scan, organ, shared.setdefault("any", AnyCache()))
    if method == "combo":
        if "combo" not in shared:
            shared["combo"], shared["encode"] = combo_cache(scan, shared["sam_cache"])
        return combo_step(scan, organ, shared["combo"], shared["change_elsewhere"])
    if method == "sam_3d":
        if "sam" not in shared:
            from medlsam.segment.sam import build_segmenter
            from medlsam.segment.sam.slices import SliceEmbeddings

            shared["sam"] = SliceEmbeddings(
                build_segmenter("lite_medsam"), scan["volume"], axis=scan["axis"], cache_dir=shared["sam_cache"]
            )
        return sam3d_step(scan, shared["sam"])
    if "refiner" not in shared:
        from medlsam.interact.refiner import build_click_refiner
        from medlsam.paths import SHIPPED_CLICK_REFINER

        shared["refiner"] = build_click_refiner(str(SHIPPED_CLICK_REFINER))
    return refiner_step(scan, organ, shared["refiner"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="any,combo,sam_3d,refiner", type=lambda s: s.split(","))
    parser.add_argument("--sequences", default="clicks,box", type=lambda s: s.split(","))
    parser.add_argument("--structures", default="", type=lambda s: [x for x in s.split(",") if x])
    parser.add_argument("--max-clicks", type=int, default=10)
    parser.add_argument(
        "--change-elsewhere", type=float, default=CHANGE_ELSEWHERE, help="combo: click_update.CHANGE_ELSEWHERE"
    )
    parser.add_argument("--thorax-slices", type=int, default=0, help="resample the chest series to N slices")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sam-cache", default="", help="LiteMedSAM embeddings folder (default runs/benchmarks/...)")
    parser.add_argument("--data", default="", help="the data folder (default: MEDLSAM_DATA or ../shared/data)")
    parser.add_argument("--out", default=str(RESULTS / "editing_fullres.json"))
    parser.add_argument(
        "--load",
        default="",
        type=lambda s: [x for x in s.split(",") if x],
        help="merge these rows (a later file's "
        "row replaces an earlier one of the same scan, structure, method and sequence)",
    )
    parser.add_argument("--report-only", action="store_true", help="only write the report from --load")
    parser.add_argument("--note", default="", help="a line for the report (how its rows were run)")
    args = parser.parse_args(argv)
    args.argv = [a for a in (sys.argv[1:] if argv is None else argv)]
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    rows = [] if args.report_only else run(args)
    for path in args.load:
        rows += json.loads(Path(path).read_text())["rows"]
    latest = {(r["scan"], r["structure"], r["method"], r["sequence"]): r for r in rows}  # a later row replaces
    rows = list(latest.values())
    from editing_fullres_report import write_report

    write_report(Path(args.out), rows, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
