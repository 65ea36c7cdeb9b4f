"""Organs that are not in the scan: the plausibility cues of present and absent organs, and the decision's outcome.

Two template banks, each applied to scans that hold its organs and to scans that do not:

- the protocol's head-and-neck bank (the first 5 OpenKBP train scans with all seven organs) on OpenKBP scans that
  are not templates (train: tuning; validation: the check; an organ counts as present where it was contoured), on
  the real chest series ``dicom_rt/thorax_rt`` (its top, z > 150 mm, holds the mandible's body and the larynx: those
  may be found there and nowhere else, as the parotids' lower poles, unsure; the brainstem is absent; the cord and
  oesophagus are present), on the abdominal CT ``abdomen/abdomen_full_ct`` (liver dome to pelvis: every
  head-and-neck organ absent but the cord and oesophagus, unsure) and on OpenKBP validation scans cut to a part of
  the body: below the larynx, mandible and parotids, and above the mandible and parotids, 8 slices (20-24 mm) away
  from them (an organ whose contoured voxels all lie outside the cut is absent);
- a thorax bank (``medlsam templates build --rtstruct`` of ``thorax_rt``: Lung_R, Lung_L, Heart, SpinalCord, Liver;
  one template) on the same OpenKBP scans (heart and liver absent; the cord, and a lung where the scan holds at
  least 10 cc of it below the neck organs (air inside the body away from the midline), partial: the organ is there
  but not the thorax around it that its template holds; a lung under 1 cc absent) and on the abdominal CT (liver
  present, lung bases partial, heart absent).

Every organ is localised with the decision off (``LocalizeOptions(plausibility=False, min_match_score=-1)``), its
cues (``medlsam.atlas.plausibility.organ_cues``) recorded, and the decision
(``medlsam.atlas.plausibility.implausible`` with the
default options) applied to them; an organ whose MedLAM estimate falls outside the scan is refused before
matching, as in the localiser. Then ``medlsam segment``'s default pipeline (default options: the decision on) on
the scans without the head: the voxels it draws per organ. Writes benchmarks/results/plausibility.md, .json, .png.

    python benchmarks/plausibility.py [--train 30] [--validation 33] [--threads 1] [--cache DIR]

Per-scan cues are kept in --cache (default: medlsam-plausibility under the temporary folder) and reused.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ORGANS, RESULTS, OpenKBP, machine_line, template_bank  # noqa: E402
from medlsam.atlas.localize import LocalizeOptions, Localizer  # noqa: E402
from medlsam.atlas.plausibility import OrganCues, implausible, template_agreement  # noqa: E402
from medlsam.atlas.templates import build_bank, load_bank  # noqa: E402
from medlsam.io.grid import map_hu, to_localization_grid  # noqa: E402
from medlsam.io.volume import CTVolume, load_ct, read_volume  # noqa: E402
from medlsam.medlam.network import load_medlam  # noqa: E402
from medlsam.paths import data_dir, default_medlam_path  # noqa: E402
from medlsam.rt.importer import rtstruct_templates  # noqa: E402
from medlsam.segment.pipeline import MedLSAMPipeline  # noqa: E402
from medlsam.segment.sam import build_segmenter  # noqa: E402

NECK = ["Larynx", "Mandible", "RightParotid", "LeftParotid"]  # a cut below these leaves them out
HEAD = ["Mandible", "RightParotid", "LeftParotid"]  # a cut above these keeps the brain and skull
TOP_MM = 150.0  # thorax_rt: the mandible's body and the larynx lie above this world z
GAP = 8  # slices (20-24 mm) between a cut and the nearest voxel of the organs it leaves out
CUE_NAMES = ["ncc", "body_width", "spread_mm", "intensity", "organ_ncc", "body", "body_depth"]


def crop_z(volume: CTVolume, lo: int, hi: int) -> CTVolume:
    """volume[:, :, lo:hi] (OpenKBP's third axis) with the matching affine."""
    affine = volume.affine.copy()
    affine[:3, 3] = volume.index_to_world(np.array([0.0, 0.0, lo]))[0]
    return CTVolume(np.ascontiguousarray(volume.array[:, :, lo:hi]), affine, f"{volume.source}[{lo}:{hi}]")


def lungs(volume: CTVolume, below_z_mm: float | None = None) -> dict:
    """Lung volumes (cc, right and left) and cranio-caudal extent (mm): air (< -400 HU) inside the body (per 3 mm
    grid slice, holes filled) more than 20 mm from the body's midline, on slices below world z ``below_z_mm``,
    in components of at least 1 cc."""
    a = to_localization_grid(volume)
    grid, a = a, a.array
    body = a > float(map_hu(np.array(-500.0)))
    filled = np.stack([ndimage.binary_fill_holes(ndimage.binary_opening(s, iterations=2)) for s in body])
    air = filled & (a < float(map_hu(np.array(-400.0))))
    if below_z_mm is not None:
        z = grid.to_world(np.stack([np.arange(a.shape[0]), np.zeros(a.shape[0]), np.zeros(a.shape[0])], 1))[:, 2]
        air[z > below_z_mm] = False
    labels, n = ndimage.label(air)
    sizes = np.asarray(ndimage.sum(air, labels, range(1, n + 1))) * 27e-3
    air = np.isin(labels, 1 + np.flatnonzero(sizes >= 1.0))
    xs = np.nonzero(filled.any(axis=(0, 1)))[0]
    mid = (xs.min() + xs.max()) / 2 if len(xs) else a.shape[2] / 2
    x = np.arange(a.shape[2])
    right, left = air[:, :, x < mid - 20 / 3], air[:, :, x > mid + 20 / 3]
    zs = np.nonzero(right.any(axis=(1, 2)) | left.any(axis=(1, 2)))[0]
    return {
        "Lung_R": float(right.sum() * 27e-3),
        "Lung_L": float(left.sum() * 27e-3),
        "extent_mm": float((zs.max() - zs.min() + 1) * 3.0) if len(zs) else 0.0,
    }


def thorax_status(measured: dict) -> dict[str, str]:
    """Partial / absent / unsure of the thorax bank's organs in a head-and-neck scan from ``lungs``' measure: the
    cord and the lung apices are there, not the thorax around them that their template holds (partial)."""
    out = {"SpinalCord": "partial"}
    for organ in ("Lung_R", "Lung_L"):
        out[organ] = "partial" if measured[organ] >= 10 else "absent" if measured[organ] < 1 else "unsure"
    out["Heart"] = "absent" if measured["extent_mm"] < 70 else "unsure"  # it starts ~10 cm below the lung apex
    out["Liver"] = "absent" if measured["extent_mm"] < 150 else "unsure"
    return out


def locate(localizer: Localizer, volume: CTVolume) -> dict:
    """Per organ: found (False: refused before matching), the cues, the box (file voxels, world mm centre)."""
    tic = time.perf_counter()
    organs = localizer.localize(volume)["organs"]
    out: dict = {"_seconds": time.perf_counter() - tic}
    for name, loc in organs.items():
        row = {"found": loc.found, "reason": loc.reason, "cues": loc.cues.to_json() if loc.cues else None}
        if loc.box_voxel:
            row["box_voxel"] = loc.box_voxel
            row["centre_mm"] = np.mean(loc.box_mm, axis=0).round(1).tolist()
        out[name] = row
    return out


def on_target(box_voxel, truth: np.ndarray, margin: int = 2) -> bool:
    """Whether the box's centre lies in the truth's bounding box widened by ``margin`` voxels."""
    idx = np.argwhere(truth)
    lo, hi = idx.min(axis=0) - margin, idx.max(axis=0) + margin
    centre = np.mean(np.array(box_voxel), axis=0)
    return bool(np.all(centre >= lo) and np.all(centre <= hi))


class Gatherer:
    """Localises scans with the decision off and keeps the results per scan in ``cache``."""

    def __init__(self, model, banks: dict, cache: Path):
        options = LocalizeOptions(plausibility=False, min_match_score=-1.0)
        self.localizers = {key: Localizer(model, bank, options) for key, bank in banks.items()}
        self.cache, self.rows = cache, []

    def scan(self, dataset: str, scan: str, volume_fn, statuses_fn, check=None) -> None:
        """``statuses_fn(volume) -> {bank: {organ: status}}``; ``check(volume, located)`` adds per bank/organ
        fields (e.g. on_target)."""
        path = self.cache / f"{dataset}-{scan}.json"
        if path.is_file():
            located = json.loads(path.read_text())
        else:
            volume = volume_fn()
            statuses = statuses_fn(volume)
            located = {key: locate(self.localizers[key], volume) for key in statuses}
            located["_status"] = statuses
            located["_check"] = check(volume, located) if check else {}
            path.write_text(json.dumps(located))
        for key, status in located["_status"].items():
            for organ, row in located[key].items():
                if organ.startswith("_"):
                    continue
                extra = located["_check"].get(f"{key}/{organ}", {})
                self.rows.append(
                    {
                        "dataset": dataset,
                        "scan": scan,
                        "bank": key,
                        "organ": organ,
                        "status": status.get(organ, "unsure"),
                        **row,
                        **extra,
                    }
                )
        seconds = ", ".join(f"{k} {located[k]['_seconds']:.1f} s" for k in located["_status"])
        print(f"{dataset} {scan}: {seconds}", flush=True)


def gather_all(args, model, banks: dict, cache: Path, thorax_truth: dict) -> list[dict]:
    data = OpenKBP()
    g = Gatherer(model, banks, cache)
    templates = data.templates(5)
    cases = [("openkbp_train", c) for c in data.split("train") if c["id"] not in templates][: args.train]
    cases += [("openkbp_validation", c) for c in data.split("validation")][: args.validation]
    for dataset, case in cases:
        cid, contoured = case["id"], case["contoured"]

        def statuses(volume, cid=cid, contoured=contoured):
            label = read_volume(data.label(cid)).array
            zs = np.nonzero(np.isin(label, [data.values[o] for o in NECK if o in contoured]).any(axis=(0, 1)))[0]
            below = float(volume.index_to_world(np.array([0.0, 0.0, zs.max()]))[0, 2]) if len(zs) else None
            measured = lungs(volume, below)
            hn = {o: ("present" if o in contoured else "unsure") for o in ORGANS}
            return {"hn": hn, "thorax": thorax_status(measured), "_lungs": measured}

        def check(volume, located, cid=cid, contoured=contoured):
            label = read_volume(data.label(cid)).array
            out = {}
            for organ in contoured:
                row, truth = located["hn"].get(organ, {}), label == data.values[organ]
                if "box_voxel" in row and truth.any():
                    out[f"hn/{organ}"] = {"on_target": on_target(row["box_voxel"], truth)}
            return out

        def statuses_only(volume, fn=statuses):
            out = fn(volume)
            out.pop("_lungs")
            return out

        g.scan(dataset, cid, lambda cid=cid: load_ct(data.image(cid)), statuses_only, check)

    for case in data.split("validation")[: args.validation]:  # validation scans cut to a part of the body
        cid, contoured = case["id"], case["contoured"]
        label = read_volume(data.label(cid)).array
        zs = {o: np.nonzero((label == data.values[o]).any(axis=(0, 1)))[0] for o in contoured}
        zs = {o: z for o, z in zs.items() if len(z)}
        depth = label.shape[2]
        neck = [zs[o].max() for o in NECK if o in zs]
        if neck and depth - (max(neck) + GAP) >= 16:  # axis 2 runs superior to inferior
            lo = max(neck) + GAP
            status = {o: ("absent" if zs[o].max() < lo else "unsure") for o in zs}
            status.update({o: "present" for o in ("SpinalCord", "Esophagus") if o in zs and zs[o].max() - lo >= 16})
            g.scan(
                "openkbp_below_neck",
                cid,
                lambda cid=cid, lo=lo: crop_z(load_ct(data.image(cid)), lo, depth),
                lambda _v, s=status: {"hn": s},
            )
        body = np.nonzero((read_volume(data.image(cid)).array > -500).any(axis=(0, 1)))[0]
        head = [zs[o].min() for o in HEAD if o in zs]
        if head and min(head) - GAP - body.min() >= 16:
            hi = min(head) - GAP
            status = {o: ("absent" if zs[o].min() >= hi else "unsure") for o in zs}
            status.update({"Brainstem": "present"} if "Brainstem" in zs and hi - zs["Brainstem"].min() >= 10 else {})
            g.scan(
                "openkbp_head_only",
                cid,
                lambda cid=cid, hi=hi: crop_z(load_ct(data.image(cid)), 0, hi),
                lambda _v, s=status: {"hn": s},
            )

    root = data_dir()

    def thorax_rt_check(volume, located):
        out = {}
        for organ, row in located["hn"].items():
            if organ in ("Mandible", "Larynx", "RightParotid", "LeftParotid") and "centre_mm" in row:
                out[f"hn/{organ}"] = {"on_target": row["centre_mm"][2] > TOP_MM}
            if organ == "SpinalCord" and "box_voxel" in row:
                out[f"hn/{organ}"] = {"on_target": on_target(row["box_voxel"], thorax_truth["SpinalCord"])}
        return out

    hn = {o: "absent" for o in ORGANS}
    hn.update(Mandible="present", Larynx="present", SpinalCord="present", Esophagus="present")
    hn["RightParotid"] = hn["LeftParotid"] = "unsure"  # their lower poles may reach the top slice
    g.scan(
        "thorax_rt",
        "thorax_rt",
        lambda: read_volume(root / "dicom_rt" / "thorax_rt"),
        lambda _v: {"hn": hn},
        thorax_rt_check,
    )

    def abdomen_status(volume):
        hn = {o: "absent" for o in ORGANS}
        hn["SpinalCord"] = hn["Esophagus"] = "unsure"  # the conus and the gastro-oesophageal junction at the top
        # seen on the scan: the lung bases behind the liver dome in its top slices, no heart
        thorax = {
            "Liver": "present",
            "Lung_R": "partial",
            "Lung_L": "partial",
            "Heart": "absent",
            "SpinalCord": "unsure",
        }
        return {"hn": hn, "thorax": thorax}

    def abdomen_check(volume, located):  # the liver of the slab's label (the scan's top 30 slices)
        slab = read_volume(root / "abdomen" / "abdomen_slab_label.nii.gz").array == 5
        liver = np.zeros(volume.shape, bool)
        liver[:, :, volume.shape[2] - slab.shape[2] :] = slab
        row = located["thorax"]["Liver"]
        return {"thorax/Liver": {"on_target": on_target(row["box_voxel"], liver)}} if "box_voxel" in row else {}

    g.scan(
        "abdomen",
        "abdomen_full_ct",
        lambda: load_ct(root / "abdomen" / "abdomen_full_ct.nii.gz"),
        abdomen_status,
        abdomen_check,
    )
    return g.rows


def thorax_bank_and_truth(model, cache: Path):
    """The thorax bank of thorax_rt's structure set (cached) and that series' spinal cord mask."""
    images, labels, names, _ = rtstruct_templates([data_dir() / "dicom_rt" / "thorax_rt"])
    path = cache / "thorax_bank.pt"
    bank = load_bank(path, model) if path.is_file() else None
    if bank is None:
        bank = build_bank(model, images, labels, names)
        bank.save(path)
    value = next(v for v, n in names.items() if n == "SpinalCord")
    return bank, {"SpinalCord": labels[0].array == value}


def decide(row: dict, options: LocalizeOptions, agreement: dict) -> str:
    """The localiser's not-found reason for a gathered row under ``options`` ('' when found); ``agreement``: per
    bank and organ, ``template_agreement`` of its templates."""
    if not row["found"]:
        return row["reason"]  # refused before the decision (outside the scan)
    cues = OrganCues(**{**row["cues"], "agreement": agreement[row["bank"]][row["organ"]]})
    if cues.ncc < options.min_match_score:
        return f"template match {cues.ncc:.2f} below {options.min_match_score}"
    return (options.plausibility and implausible(cues, options)) or ""


def outcome(row: dict) -> str:
    """kept / lost (present organs), refused / drawn (absent ones), wrong place (a present organ found elsewhere),
    or found / not found (unsure)."""
    refused = bool(row["decision"])
    if row["status"] == "present":
        if row.get("on_target") is False:
            return "refused off target" if refused else "drawn off target"
        return "lost" if refused else "kept"
    if row["status"] == "absent":
        return "refused" if refused else "drawn"
    return "not found" if refused else "found"  # unsure or partial


STATUSES = ("present", "absent", "partial", "unsure")
DATASETS = ["openkbp_train", "openkbp_validation", "openkbp_below_neck", "openkbp_head_only", "thorax_rt", "abdomen"]
BANKS = {"hn": "head-and-neck bank (5 OpenKBP templates)", "thorax": "thorax bank (thorax_rt, 1 template)"}


def outcome_table(rows: list[dict]) -> list[str]:
    lines = [
        "| bank | data set | scans | present kept | present lost | absent refused | absent drawn | found off target "
        "(drawn / refused) | partial or unsure: found / not found |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for bank in BANKS:
        for dataset in DATASETS:
            part = [r for r in rows if r["bank"] == bank and r["dataset"] == dataset]
            if not part:
                continue
            n = {
                k: sum(outcome(r) == k for r in part)
                for k in (
                    "kept",
                    "lost",
                    "refused",
                    "drawn",
                    "drawn off target",
                    "refused off target",
                    "found",
                    "not found",
                )
            }
            lines.append(
                f"| {bank} | {dataset} | {len({r['scan'] for r in part})} | {n['kept']} | {n['lost']} | {n['refused']} "
                f"| {n['drawn']} | {n['drawn off target']} / {n['refused off target']} "
                f"| {n['found']} / {n['not found']} |"
            )
    return lines


def cue_text(cues: dict | None) -> str:
    if not cues:
        return "not matched"
    return ", ".join(f"{k} {cues[k]:.2f}" if cues[k] is not None else f"{k} -" for k in CUE_NAMES)


def five(values: list[float]) -> str:
    if not values:
        return "-"
    q = np.percentile(values, [0, 5, 50, 95, 100])
    return " / ".join(f"{v:.3f}" for v in q) + f" ({len(values)})"


def cue_table(rows: list[dict]) -> list[str]:
    lines = [
        "Min / 5 % / median / 95 % / max (count) of each cue; present: found on target, every data set.",
        "",
        "| bank | cue | present | absent |",
        "|---|---|---|---|",
    ]
    for bank in BANKS:
        for cue in CUE_NAMES:

            def values(status, bank=bank, cue=cue):
                return [
                    r["cues"][cue]
                    for r in rows
                    if r["bank"] == bank
                    and r["status"] == status
                    and r.get("on_target") is not False
                    and r["cues"]
                    and r["cues"][cue] is not None
                ]

            present, absent = values("present"), values("absent")
            if present or absent:
                lines.append(f"| {bank} | {cue} | {five(present)} | {five(absent)} |")
    return lines


def failures(rows: list[dict], per_group: int = 6) -> list[str]:
    """One line per present organ lost, absent organ drawn or organ drawn off target (``per_group`` per bank, data
    set and kind, then a count)."""
    lines, shown = [], {}
    for r in rows:
        kind = outcome(r)
        if kind in ("lost", "drawn", "drawn off target"):
            group = (r["bank"], r["dataset"], kind)
            shown[group] = shown.get(group, 0) + 1
            if shown[group] > per_group:
                continue
            where = f" at {r['centre_mm']} mm" if "centre_mm" in r else ""
            why = f": {r['decision']}" if r["decision"] else ""
            lines.append(
                f"- {kind}: {r['bank']} {r['organ']} in {r['dataset']} {r['scan']}{where} ({cue_text(r['cues'])}){why}"
            )
    more = [f"{n - per_group} more {g[2]} ({g[0]} bank, {g[1]})" for g, n in shown.items() if n > per_group]
    return (lines or ["- none"]) + ([f"- and {', '.join(more)}"] if more else [])


def drawn_voxels(model, banks: dict, thorax_truth: dict, validation: int) -> list[dict]:
    """``medlsam segment``'s default pipeline (default options) on scans without the head (the head-and-neck bank)
    and on OpenKBP scans (the thorax bank): cc drawn per organ, and for thorax_rt's mandible and larynx the cc
    drawn below its top (z <= TOP_MM)."""
    segmenter = build_segmenter("lite_medsam")
    root, data = data_dir(), OpenKBP()
    runs = [
        ("thorax_rt", "hn", lambda: read_volume(root / "dicom_rt" / "thorax_rt")),
        ("abdomen_full_ct", "hn", lambda: load_ct(root / "abdomen" / "abdomen_full_ct.nii.gz")),
    ]
    runs += [
        (c["id"], "thorax", lambda c=c: load_ct(data.image(c["id"]))) for c in data.split("validation")[:validation]
    ]
    out = []
    for scan, bank, volume_fn in runs:
        volume = volume_fn()
        tic = time.perf_counter()
        result = MedLSAMPipeline(Localizer(model, banks[bank]), segmenter).segment(volume)
        cc = float(np.prod(volume.spacing)) / 1000.0
        z = None
        if scan == "thorax_rt":
            k = np.arange(volume.shape[2])
            z = volume.index_to_world(np.stack([np.zeros_like(k), np.zeros_like(k), k], 1).astype(float))[:, 2]
        for name, box in result.boxes.items():
            mask = result.label == box["label"]
            row = {
                "scan": scan,
                "bank": bank,
                "organ": name,
                "cc": float(mask.sum() * cc),
                "reason": box.get("reason", ""),
            }
            if z is not None:
                row["cc_below_top"] = float(mask[:, :, z <= TOP_MM].sum() * cc)
            out.append(row)
        print(f"segment {scan} ({bank}): {time.perf_counter() - tic:.1f} s", flush=True)
    return out


def plot(rows: list[dict], options: LocalizeOptions, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cues = [c for c in CUE_NAMES if any(r["cues"] and r["cues"][c] is not None for r in rows)]
    fig, axes = plt.subplots(len(BANKS), len(cues), figsize=(3.2 * len(cues), 4.2 * len(BANKS)), squeeze=False)
    colours = {d: plt.cm.tab10(i) for i, d in enumerate(DATASETS)}
    rng = np.random.default_rng(0)
    for b, bank in enumerate(BANKS):
        for c, cue in enumerate(cues):
            ax = axes[b, c]
            for x, status in enumerate(STATUSES):
                for dataset in DATASETS:
                    values = [
                        r["cues"][cue]
                        for r in rows
                        if r["bank"] == bank
                        and r["status"] == status
                        and r["dataset"] == dataset
                        and r["cues"]
                        and r["cues"][cue] is not None
                        and r.get("on_target") is not False
                    ]
                    if values:
                        ax.scatter(
                            x + rng.uniform(-0.25, 0.25, len(values)),
                            values,
                            s=8,
                            color=colours[dataset],
                            label=dataset if (c == 0 and x == 0 or status == "absent") else None,
                            alpha=0.7,
                        )
            ax.set_xticks(range(len(STATUSES)), STATUSES)
            limit = {"ncc": options.min_match_score, "body_width": options.max_body_width}.get(cue)
            if limit is not None:
                ax.axhline(limit, color="grey", linestyle="--", linewidth=0.8)
            ax.set_title(f"{bank}: {cue}", fontsize=9)
        handles, labels = axes[b, 0].get_legend_handles_labels()
        seen = dict(zip(labels, handles))
        axes[b, -1].legend(seen.values(), seen.keys(), fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=30, help="OpenKBP train scans that are not templates (tuning)")
    parser.add_argument("--validation", type=int, default=33, help="OpenKBP validation scans")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "medlsam-plausibility")
    parser.add_argument("--gather-only", action="store_true", help="localise and keep the cues, no report")
    parser.add_argument("--out", type=Path, default=RESULTS / "plausibility", help="report path without suffix")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    model_path = default_medlam_path()
    model = load_medlam(model_path)
    data = OpenKBP()
    banks = {"hn": template_bank(data, model, data.templates(5), args.cache / "hn_bank.pt")}
    banks["thorax"], thorax_truth = thorax_bank_and_truth(model, args.cache)
    rows = gather_all(args, model, banks, args.cache, thorax_truth)
    (args.cache / "rows.json").write_text(json.dumps(rows))
    if args.gather_only:
        return
    options = LocalizeOptions()
    agreement = {
        key: {n: template_agreement(o.neighbourhoods) for n, o in b.organs.items()} for key, b in banks.items()
    }
    for row in rows:
        row["decision"] = decide(row, options, agreement)
    drawn = drawn_voxels(model, banks, thorax_truth, min(args.validation, 3))
    write_report(rows, drawn, options, agreement, args, model_path)


def write_report(rows: list[dict], drawn: list[dict], options: LocalizeOptions, agreement: dict, args, model_path):
    command = "python benchmarks/plausibility.py " + " ".join(sys.argv[1:])
    rule = {k: getattr(options, k) for k in ("min_match_score", "plausibility", "max_body_width")}
    lines = [
        "# Organs that are not in the scan: plausibility of the template match (issue 30, part 4)",
        "",
        f"- Banks: {BANKS['hn']}; {BANKS['thorax']}. Data sets: see benchmarks/plausibility.py's docstring. "
        f"MedLAM `{Path(model_path).name}`; machine: {machine_line()}.",
        f"- The decision (`LocalizeOptions`, `medlsam.atlas.plausibility.implausible`): {rule}.",
        f"- Command: `{command}`",
        "",
        "## Outcome of the decision",
        "",
        "Present organs on OpenKBP count where contoured (kept: found; lost: refused); an organ found with its box "
        "centre outside the truth's box (2 voxels around) is 'found off target' (for thorax_rt's mandible, larynx and "
        f"parotids: centre below z {TOP_MM:.0f} mm). Absent: refused or drawn. Partial: the organ is there, not the "
        "anatomy around it that its templates hold (the thorax bank's cord and lung apices in a head-and-neck scan); "
        "unsure: not known for sure (an uncontoured organ, a parotid's lower pole).",
        "",
        *outcome_table(rows),
        "",
        "Failures (present organs lost, absent organs drawn, organs found off target):",
        "",
        *failures(rows),
        "",
        "## The cues",
        "",
        "The templates' agreement (median NCC of one template's neighbourhood matched in another's): "
        + ", ".join(f"{n} {a:.3f}" for n, a in agreement["hn"].items() if a is not None)
        + "; the thorax bank has one template (no agreement).",
        "",
        *cue_table(rows),
        "",
        "![cues of present, absent and unsure organs](plausibility.png)",
        "",
        "## What `medlsam segment` draws (default pipeline, default options)",
        "",
        "| scan | bank | organ | cc drawn | of which below thorax_rt's top | not found because |",
        "|---|---|---|---|---|---|",
    ]
    for d in drawn:
        below = f"{d['cc_below_top']:.1f}" if "cc_below_top" in d else ""
        lines.append(f"| {d['scan']} | {d['bank']} | {d['organ']} | {d['cc']:.1f} | {below} | {d['reason']} |")
    notes = RESULTS.parent / "notes" / "plausibility.md"
    if notes.is_file():
        lines += ["", notes.read_text()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(
        json.dumps({"rule": rule, "agreement": agreement, "rows": rows, "drawn": drawn}, indent=1)
    )
    plot(rows, options, args.out.with_suffix(".png"))
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
