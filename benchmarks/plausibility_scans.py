"""The plausibility benchmark's scans and what is known of each organ in them (present, absent, partial, unsure):
OpenKBP whole and cut, the real chest series, the abdominal CT; each localised with the decision off and its rows
kept per scan (benchmarks/plausibility.py decides and reports)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from plausibility_report import TOP_MM
from scipy import ndimage

from common import ORGANS, OpenKBP
from medlsam.atlas.localize import LocalizeOptions, Localizer
from medlsam.io.grid import map_hu, to_localization_grid
from medlsam.io.volume import CTVolume, load_ct, read_volume
from medlsam.paths import data_dir

NECK = ["Larynx", "Mandible", "RightParotid", "LeftParotid"]  # a cut below these leaves them out
HEAD = ["Mandible", "RightParotid", "LeftParotid"]  # a cut above these keeps the brain and skull
GAP = 8  # slices (20-24 mm) between a cut and the nearest voxel of the organs it leaves out


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


def gather_openkbp(g: Gatherer, data: OpenKBP, args) -> None:
    """OpenKBP scans that are not templates (train: tuning; validation: the check), whole: an organ is present
    where contoured; the thorax bank's organs by ``lungs``' measure."""
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


def gather_cut(g: Gatherer, data: OpenKBP, validation: int) -> None:
    """OpenKBP validation scans cut to a part of the body: below the neck organs, and above the head organs."""
    for case in data.split("validation")[:validation]:
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


def gather_thorax_rt(g: Gatherer, thorax_truth: dict) -> None:
    """The real chest series: its top holds the mandible's body and the larynx; the cord and oesophagus present."""

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
        lambda: read_volume(data_dir() / "dicom_rt" / "thorax_rt"),
        lambda _v: {"hn": hn},
        thorax_rt_check,
    )


def gather_abdomen(g: Gatherer) -> None:
    """The abdominal CT: every head-and-neck organ absent but the cord and oesophagus (unsure); the liver present."""
    root = data_dir()

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


def gather_all(args, model, banks: dict, cache: Path, thorax_truth: dict) -> list[dict]:
    """Every scan of every data set, localised with the decision off (cached per scan): one row per bank, scan
    and organ."""
    data = OpenKBP()
    g = Gatherer(model, banks, cache)
    gather_openkbp(g, data, args)
    gather_cut(g, data, args.validation)
    gather_thorax_rt(g, thorax_truth)
    gather_abdomen(g)
    return g.rows
