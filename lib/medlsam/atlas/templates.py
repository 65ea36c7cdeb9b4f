"""Template banks: per organ, the latent points and feature kernels of its extreme points, averaged
over the template scans that contain it.

Each organ has 6 whole-organ extreme points (WPL) and, for SPL, 4 in-plane extreme points in each of
`SLABS` equal slabs along z. Points are defined on the canonical grid, so any scan orientation works.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medlsam.atlas.plausibility import body_profile
from medlsam.errors import TemplateError
from medlsam.io.grid import LocalizationGrid, resample_to_grid, to_localization_grid
from medlsam.io.volume import CTVolume, load_ct, read_volume
from medlsam.medlam.encoding import KERNEL_SIZES, cluster_points, encode_latents, encode_patches
from medlsam.medlam.matching import OrganPatch, cut_organ_patch
from medlsam.medlam.network import MedLAM, model_fingerprint
from medlsam.utils.atomic import torch_save_atomic

logger = logging.getLogger(__name__)

SLABS = 6
WPL_ROLES = ("z-", "z+", "y-", "y+", "x-", "x+")
SLAB_ROLES = tuple(f"s{s}{axis}" for s in range(SLABS) for axis in ("y-", "y+", "x-", "x+"))
BANK_VERSION = 3  # 2: organ neighbourhood intensities per template; 3: and the organ masks in them
KERNEL_REACH = 16  # a patch serves points within this many voxels of its centre


def extreme_points(coords: np.ndarray) -> dict[str, np.ndarray]:
    """Extreme points of an organ given its voxels' (N, 3) grid coordinates.

    Along each axis: the first/last grid slice holding the organ, and the in-plane middle of the organ's
    voxels on that slice. Slab points: the same in-plane extremes within each of SLABS equal z-slabs.
    """
    points: dict[str, np.ndarray] = {}
    for axis, name in enumerate("zyx"):
        for sign, pick in (("-", coords[:, axis].min()), ("+", coords[:, axis].max())):
            on_slice = coords[np.abs(coords[:, axis] - pick) < 1.0]
            point = (on_slice.min(axis=0) + on_slice.max(axis=0)) / 2
            point[axis] = pick
            points[f"{name}{sign}"] = point
    z0, z1 = coords[:, 0].min(), coords[:, 0].max()
    edges = np.linspace(z0, z1, SLABS + 1)
    for s in range(SLABS):
        inside = coords[(coords[:, 0] >= edges[s] - 1e-6) & (coords[:, 0] <= edges[s + 1] + 1e-6)]
        if len(inside) == 0:  # a gap in the organ: use the nearest voxels
            inside = coords[
                np.abs(coords[:, 0] - (edges[s] + edges[s + 1]) / 2)
                <= np.abs(coords[:, 0] - (edges[s] + edges[s + 1]) / 2).min() + 1e-6
            ]
        middle_z = (edges[s] + edges[s + 1]) / 2
        for axis, name in ((1, "y"), (2, "x")):
            for sign, pick in (("-", inside[:, axis].min()), ("+", inside[:, axis].max())):
                on_slice = inside[np.abs(inside[:, axis] - pick) < 1.0]
                point = (on_slice.min(axis=0) + on_slice.max(axis=0)) / 2
                point[axis], point[0] = pick, middle_z
                points[f"s{s}{name}{sign}"] = point
    return points


def organ_grid_coords(label: CTVolume, value: int, grid: LocalizationGrid) -> np.ndarray:
    """Grid coordinates of the voxel centres of one organ of a label volume."""
    index = np.argwhere(label.array == value)
    return grid.from_file_index(index)


@dataclass
class OrganTemplate:
    """Averaged template of one organ: per point role, the latent point and feature kernels."""

    value: int
    roles: list[str]
    latent: torch.Tensor  # (P, 3), of patches centred on the rounded points
    offset: torch.Tensor  # (P, 3), mean sub-voxel remainder: point = rounded centre + offset
    kernels: list[torch.Tensor]  # per scale (P, C, k, k, k)
    count: int  # templates averaged
    size_mm: list[float] = field(default_factory=list)  # mean box extent along (z, y, x)
    neighbourhoods: list[OrganPatch] = field(default_factory=list)  # per template: intensities around the organ
    prior_cut: float = 0.5  # where its prior is cut, chosen on the templates held out (medlsam.atlas.calibration)
    # per template: the body's (depth, width) in mm on the organ's first, middle and last slice
    # (medlsam.atlas.plausibility.body_profile); empty in banks saved before it (the localiser then skips that cue)
    body_mm: list[list[list[float]]] = field(default_factory=list)


@dataclass
class TemplateBank:
    organs: dict[str, OrganTemplate]
    model_fingerprint: str
    sources: list[str]

    def to_dict(self) -> dict:
        return {
            "version": BANK_VERSION,
            "model_fingerprint": self.model_fingerprint,
            "sources": self.sources,
            "organs": {
                name: {
                    "value": o.value,
                    "roles": o.roles,
                    "latent": o.latent,
                    "offset": o.offset,
                    "kernels": o.kernels,
                    "count": o.count,
                    "size_mm": o.size_mm,
                    "neighbourhoods": [p.intensities for p in o.neighbourhoods],
                    "neighbourhood_boxes": [p.box for p in o.neighbourhoods],
                    "neighbourhood_masks": [p.mask for p in o.neighbourhoods],
                    "prior_cut": o.prior_cut,
                    "body_mm": o.body_mm,
                }
                for name, o in self.organs.items()
            },
        }

    def save(self, path: str | os.PathLike) -> None:
        torch_save_atomic(self.to_dict(), path)

    @property
    def labels(self) -> dict[str, int]:
        return {name: o.value for name, o in self.organs.items()}

    def summary(self) -> dict:
        """What the bank holds, for people: version, MedLAM fingerprint, source scans, organs."""
        return {
            "version": BANK_VERSION,
            "model_fingerprint": self.model_fingerprint,
            "sources": list(self.sources),
            "organs": {
                name: {"value": o.value, "templates": o.count, "size_mm": o.size_mm, "prior_cut": o.prior_cut}
                for name, o in sorted(self.organs.items(), key=lambda kv: kv[1].value)
            },
        }

    def select(self, names: list[str] | None) -> dict[str, OrganTemplate]:
        """The chosen organs (all when None); an unknown name raises TemplateError listing the known ones."""
        if not names:
            return dict(self.organs)
        unknown = [n for n in names if n not in self.organs]
        if unknown:
            raise TemplateError(f"organ(s) {unknown} not in the template bank; it has {sorted(self.organs)}")
        return {n: self.organs[n] for n in names}


def load_bank(path: str | os.PathLike, model: MedLAM | None = None) -> TemplateBank:
    """Load a bank; with `model`, refuse a bank that another model made."""
    path = Path(path)
    if not path.is_file():
        raise TemplateError(f"template bank not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise TemplateError(f"{path}: not a readable template bank ({type(exc).__name__})") from None
    if not isinstance(data, dict) or "organs" not in data:
        raise TemplateError(f"{path}: not a template bank")
    if data.get("version") != BANK_VERSION:
        raise TemplateError(
            f"{path}: template bank version {data.get('version')}, this medlsam reads version "
            f"{BANK_VERSION}; rebuild it with `medlsam templates build`"
        )
    bank = TemplateBank(
        organs={
            name: OrganTemplate(
                value=int(o["value"]),
                roles=list(o["roles"]),
                latent=o["latent"],
                offset=o["offset"],
                kernels=list(o["kernels"]),
                count=int(o["count"]),
                size_mm=list(o["size_mm"]),
                neighbourhoods=[
                    OrganPatch(t, b, m)
                    for t, b, m in zip(o["neighbourhoods"], o["neighbourhood_boxes"], o["neighbourhood_masks"])
                ],
                prior_cut=float(o.get("prior_cut", 0.5)),  # banks saved before the calibration: uncalibrated
                body_mm=[[[float(v) for v in level] for level in b] for b in o.get("body_mm", [])],
            )
            for name, o in data["organs"].items()
        },
        model_fingerprint=data["model_fingerprint"],
        sources=list(data["sources"]),
    )
    bad = {name: o.prior_cut for name, o in bank.organs.items() if not 0.0 < o.prior_cut < 1.0}
    if bad:
        raise TemplateError(f"{path}: prior cut outside (0, 1) for {bad}; rebuild it with `medlsam templates build`")
    if model is not None and model_fingerprint(model) != bank.model_fingerprint:
        raise TemplateError(
            f"{path}: template bank was built with another MedLAM model (fingerprint {bank.model_fingerprint}, "
            f"current model {model_fingerprint(model)}); rebuild it with `medlsam templates build`"
        )
    return bank


def _template_points(
    label: CTVolume | None, points_json: dict | None, grid: LocalizationGrid, names: dict[int, str]
) -> dict[str, dict[str, np.ndarray]]:
    """Per organ name, the role -> grid point map of one template."""
    organs: dict[str, dict[str, np.ndarray]] = {}
    if label is not None:
        if label.shape != grid.source.shape:
            raise TemplateError(f"label {label.source} has shape {label.shape}, image has {grid.source.shape}")
        values = [int(v) for v in np.unique(label.array) if v != 0]
        if not values:
            raise TemplateError(f"template label {label.source} is empty (no organ voxels)")
        for value in values:
            organs[names.get(value, f"label_{value}")] = extreme_points(organ_grid_coords(label, value, grid))
    for name, entry in (points_json or {}).items():
        points = np.asarray(entry["points"] if isinstance(entry, dict) else entry, dtype=np.float64)
        if points.shape != (6, 3):
            raise TemplateError(
                f"organ {name!r}: expected six extreme points [[i, j, k], ...], got shape {points.shape}"
            )
        coords = grid.from_file_index(points)
        organs[name] = {
            role: coords[np.argmin(coords[:, a]) if sign == "-" else np.argmax(coords[:, a])]
            for role, a, sign in ((r, "zyx".index(r[0]), r[1]) for r in WPL_ROLES)
        }
    return organs


def _organ_masks(label: CTVolume | None, grid: LocalizationGrid, names: dict[int, str]) -> dict[str, np.ndarray]:
    """Per organ of a template label, its mask on the grid (the organ's share of each grid voxel)."""
    if label is None:
        return {}
    values = [int(v) for v in np.unique(label.array) if v != 0]
    return {
        names.get(v, f"label_{v}"): resample_to_grid(
            (label.array == v).astype(np.float32), label, grid.affine, grid.shape, fill=0.0
        )
        for v in values
    }


def _encode_template(model: MedLAM, grid: LocalizationGrid, organs: dict[str, dict[str, np.ndarray]]) -> dict:
    """Latent points and kernels of every point of one template."""
    keys = [(name, role) for name, roles in organs.items() for role in roles]
    points = np.array([organs[n][r] for n, r in keys])
    centres = np.round(points).astype(int)
    latents = encode_latents(model, grid, centres)
    kernels: dict[tuple[str, str], list[torch.Tensor]] = {}
    clusters = cluster_points(centres, KERNEL_REACH)
    patches = encode_patches(model, grid, [c for c, _ in clusters])
    for patch, (_, members) in zip(patches, clusters):
        for i in members:
            kernels[keys[i]] = [patch.kernel(points[i], s) for s in range(len(KERNEL_SIZES))]
    # the latent belongs to the rounded centre: shift it to the exact point by the sub-voxel remainder
    return {key: (latents[i], points[i] - centres[i], kernels[key]) for i, key in enumerate(keys)}


def template_bank(model: MedLAM, image, label, names: dict[int, str], pts: dict | None = None) -> TemplateBank:
    """The bank of one template scan (its organs' points, kernels and neighbourhood) from its label (``names``:
    value -> organ) and/or six extreme points per organ (``pts``); banks of several templates are merged by
    ``merge_banks``, built and calibrated by ``medlsam.atlas.bank_builder``."""
    volume = image if isinstance(image, CTVolume) else load_ct(image)
    label_volume = label if isinstance(label, CTVolume) or label is None else read_volume(label)
    grid = to_localization_grid(volume)
    organs = _template_points(label_volume, pts, grid, names)
    masks = _organ_masks(label_volume, grid, names)
    encoded = _encode_template(model, grid, organs)
    out = {}
    for number, (name, roles) in enumerate(organs.items(), 1):
        value = next((v for v, n in names.items() if n == name), None)
        if value is None and isinstance(pts, dict) and isinstance(pts.get(name), dict):
            value = pts[name].get("value")
        if value is None:
            value = int(name.split("_")[-1]) if name.startswith("label_") else len(names) + number
        coords = np.array(list(roles.values()))
        wpl = np.array([roles[r] for r in WPL_ROLES])
        neighbourhood = cut_organ_patch(
            grid, wpl.min(axis=0), wpl.max(axis=0), None if name in (pts or {}) else masks.get(name)
        )
        ordered = [r for r in WPL_ROLES + SLAB_ROLES if r in roles]
        out[name] = OrganTemplate(
            value=int(value),
            roles=ordered,
            latent=torch.tensor(np.array([encoded[(name, r)][0] for r in ordered]), dtype=torch.float32),
            # float64 until merged: the mean of several templates' sub-voxel offsets is taken at full precision
            offset=torch.tensor(np.array([encoded[(name, r)][1] for r in ordered]), dtype=torch.float64),
            kernels=[torch.stack([encoded[(name, r)][2][s] for r in ordered]) for s in range(len(KERNEL_SIZES))],
            count=1,
            size_mm=((coords.max(axis=0) - coords.min(axis=0)) * 3.0).tolist(),
            neighbourhoods=[neighbourhood],
            body_mm=[body_profile(grid.array, wpl.min(axis=0), wpl.max(axis=0)).tolist()],
        )
    return TemplateBank(organs=out, model_fingerprint=model_fingerprint(model), sources=[volume.source])


def merge_banks(banks: list[TemplateBank], names: dict[str, int] | None = None) -> TemplateBank:
    """One bank from several (of the same MedLAM): per organ and point role, the mean of the latent points,
    offsets and kernels over the templates that have that role (each bank weighing by its template count);
    the templates' neighbourhoods pooled; the mean extent. ``names`` (organ -> value) renumbers organs.
    The one rule for every bank (``medlsam.atlas.bank_builder``)."""
    if len({b.model_fingerprint for b in banks}) > 1:
        raise TemplateError("template banks of different MedLAM models cannot be merged")
    organs = {}
    for name in dict.fromkeys(n for b in banks for n in b.organs):
        parts = [b.organs[name] for b in banks if name in b.organs]
        roles = [r for r in WPL_ROLES + SLAB_ROLES if any(r in p.roles for p in parts)]
        if not all(r in roles for r in WPL_ROLES):
            raise TemplateError(f"organ {name!r}: its templates lack some of the six extreme points")
        latent, offset, kernels = [], [], []
        for role in roles:
            having = [(p, p.roles.index(role)) for p in parts if role in p.roles]
            n = sum(p.count for p, _ in having)
            latent.append(sum(p.latent[i].double().numpy() * p.count for p, i in having) / n)
            offset.append(sum(p.offset[i].double().numpy() * p.count for p, i in having) / n)
            sums = None
            for p, i in having:
                add = [k[i] * p.count for k in p.kernels]  # exact for count 1
                sums = add if sums is None else [a + b for a, b in zip(sums, add)]
            kernels.append([k / n for k in sums])
        count = sum(p.count for p in parts)
        size = sum(np.array(p.size_mm, dtype=np.float64) * p.count for p in parts) / count
        organs[name] = OrganTemplate(
            value=int((names or {}).get(name, parts[0].value)),
            roles=roles,
            latent=torch.tensor(np.array(latent), dtype=torch.float32),
            offset=torch.tensor(np.array(offset), dtype=torch.float32),
            kernels=[torch.stack([k[s] for k in kernels]) for s in range(len(parts[0].kernels))],
            count=count,
            size_mm=size.round(1).tolist(),
            neighbourhoods=[n for p in parts for n in p.neighbourhoods],
            body_mm=[b for p in parts for b in p.body_mm],
        )
    return TemplateBank(
        organs=organs, model_fingerprint=banks[0].model_fingerprint, sources=[s for b in banks for s in b.sources]
    )
