"""Localise template organs in a query scan: coarse latent jump, optional re-jumps, MSS refinement,
template matching, and on request the organ prior.

Points live on the canonical 3 mm grid; everything handed over (boxes, slab boxes, the prior) is mapped to
the query file's own voxel indices here, once (boxes inclusive, also in world mm). The query's labels are
never read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from medlsam.atlas.plausibility import OrganCues, cached_agreement, implausible, organ_cues
from medlsam.atlas.prior import FilePrior, file_prior
from medlsam.atlas.templates import SLABS, WPL_ROLES, OrganTemplate, TemplateBank
from medlsam.io.grid import GRID_SPACING_MM, LocalizationGrid, to_localization_grid
from medlsam.io.volume import CTVolume
from medlsam.medlam.encoding import cluster_points, encode_latents, encode_patches, refine_points
from medlsam.medlam.losses import DISTANCE_RATIO_MM
from medlsam.medlam.matching import best_matches, match_organ
from medlsam.medlam.network import MedLAM
from medlsam.medlam.patches import BODY_THRESHOLD
from medlsam.utils import cancel

START_PATCHES = 8  # patches around the body centre that start the coarse jump


@dataclass
class LocalizeOptions:
    mode: str = "wpl"  # wpl: one box per organ; spl: also one in-plane box per z-slab (also per call)
    refine: bool = False  # multi-scale similarity refinement (measured: no gain once `match` is on)
    jumps: int = 1  # coarse latent jumps (1 = the reference's single jump)
    search_radius: int = 8  # refinement search, voxels of the 3 mm grid
    scales: int = 3  # feature scales used by refinement (1/4, 1/2, full): 2 skips the full-resolution decoder
    bf16: bool | None = False  # bfloat16 autocast for the network (boxes move: off; None = where native)
    start_patches: int = START_PATCHES  # patches around the body centre that start the coarse jump
    jump_reach: int = 8  # re-jumps share one patch among targets within this many voxels
    match: bool = True  # last stage: match the templates' organ neighbourhoods by intensity (NCC)
    match_radius: int = 14  # search of that stage, voxels of the 3 mm grid (42 mm)
    # The organ prior (fused template masks, for the segmentation stage; asked per call, `localize(prior=True)`,
    # since boxes do not need it): each template's neighbourhood is re-matched in slabs of this
    # many grid slices within prior_slab_radius voxels, so its mask bends with the organ (0: rigid). Mean Dice
    # of the fused masks alone, 33 validation scans: rigid 0.371, slabs of 4 / 6 / 8 within 2 voxels 0.404 /
    # 0.413 / 0.416 (benchmarks/notes/segmentation.md).
    prior_slab: int = 6
    prior_slab_radius: int = 2
    # Each template also places its mask warped by a similarity registration of its neighbourhood (the prior is
    # the mean of both placements). Prior alone, 10 OpenKBP train scans that are not templates: 0.631 without,
    # 0.670 with; about 10 s more per 7-organ scan (benchmarks/notes/segmentation.md).
    prior_registration: bool = True
    # With > 0 each placement weighs exp(prior_match_sharpness x the correlation of its template's intensities
    # with the query's over the organ and 9 mm around it); 0: the plain mean. Prior alone with 10: +0.015 on 25
    # OpenKBP train scans, but on the 33 validation scans +0.002, and the brainstem collapses on 5 of them
    # (0.585 -> 0.496), so it is off (benchmarks/notes/segmentation.md).
    prior_match_sharpness: float = 0.0
    # Atlas selection: each organ's prior from only this many of its templates, those whose neighbourhoods matched
    # the query best (NCC of the matching stage); 0: all of them. The organ box stays the median of all; with this
    # many templates or fewer nothing changes. Prior alone with 10 OpenKBP templates, 20 train scans that are not
    # templates: all 10 0.614, the best 7 0.619, 5 0.642, 4 0.638 (the protocol's first 5 alone 0.631), at half the
    # time of all 10 (only the chosen are registered); validation: benchmarks/results/segmentation_atlas.md.
    prior_atlases: int = 5
    # The prior weighs the template masks by the templates' intensity model (medlsam.atlas.prior.intensity_posterior);
    # 0: masks only.
    intensity_power: float = 2.0
    # Median NCC below which an organ is reported not found. Measured with the shipped model and 5 OpenKBP
    # templates: 0.41-0.87 on validation scans (min 0.41), 0.24-0.70 for head-and-neck organs placed in an
    # abdominal CT, so 0.3 removes only part of the absent organs (see benchmarks/results/localization.md).
    min_match_score: float = 0.3
    # Refuse a matched organ whose templates' anatomy is not there (medlsam.atlas.plausibility.implausible): the body
    # around it (width on its first, middle and last slice, the median of the three ratios) at least max_body_width
    # times as wide as its templates', and its match no better than its templates match each other (one template:
    # the body alone). Measured with the protocol's 5 templates (benchmarks/results/plausibility.md): present organs
    # of 30 train and 33 validation scans 0.14-1.71 (1.21 at most among those matching below the templates'
    # agreement; 1.71: a larynx at the shoulders matching 0.82 against 0.75), head-and-neck organs matched in the
    # chest series and the abdominal CT 2.03-2.44: the 9 above the NCC floor all refused (the mandible on the heart,
    # the larynx on the sternum, the parotids in the chest), no validation organ lost (231 of 231 found); with one
    # template (openkbp_pt_4) no validation organ lost to it either.
    # A narrower body never counts: a field of view cropped to the planning region (OpenKBP) narrows it too.
    # 0 or plausibility=False: off.
    plausibility: bool = True
    max_body_width: float = 1.6
    min_score: float = 0.2  # mean similarity below which an organ is reported not found
    margin_mm: float = 0.0  # box extension on every side


@dataclass
class OrganLocation:
    """One organ's result. Boxes are inclusive voxel indices in the input file's own array order."""

    name: str
    value: int
    found: bool
    box_voxel: list[list[int]] | None = None
    box_mm: list[list[float]] | None = None  # world LPS mm, min and max corners
    score: float = 0.0
    match_score: float | None = None  # median NCC of the templates' neighbourhoods, when matched
    reason: str = ""
    slabs: list[dict] = field(default_factory=list)  # SPL: per z-slab box_voxel
    prior: FilePrior | None = field(default=None, repr=False)  # when asked for and found: the organ prior
    cues: OrganCues | None = field(default=None, repr=False)  # when matched: medlsam.atlas.plausibility's cues

    def to_json(self) -> dict:
        out = {
            "found": self.found,
            "label": self.value,
            "box_voxel": self.box_voxel,
            "box_mm": self.box_mm,
            "score": round(self.score, 4),
        }
        if self.match_score is not None:
            out["match_score"] = round(self.match_score, 4)
        if self.reason:
            out["reason"] = self.reason
        if self.slabs:
            out["slabs"] = self.slabs
        return out


def _body_start_points(grid: LocalizationGrid, rng: np.random.Generator, count: int = START_PATCHES) -> np.ndarray:
    """`count` grid points spread around the centre of the body."""
    body = np.argwhere(grid.array > BODY_THRESHOLD)
    if len(body) == 0:
        body = np.argwhere(np.ones(grid.shape, dtype=bool))
    centre = (body.min(axis=0) + body.max(axis=0)) / 2
    spread = np.minimum((body.max(axis=0) - body.min(axis=0)) / 6, 8)
    offsets = rng.uniform(-1, 1, size=(count, 3)) * spread
    return np.round(centre + offsets).astype(int)


def _jump(latent_targets: np.ndarray, start_points: np.ndarray, start_latents: np.ndarray) -> np.ndarray:
    """Predicted grid positions of targets: mean over starts of start + r * tanh(p_target - p_start)."""
    ratio = np.array(DISTANCE_RATIO_MM) / GRID_SPACING_MM
    steps = ratio * np.tanh(latent_targets[:, None, :] - start_latents[None, :, :])  # (T, S, 3) voxels
    return (start_points[None, :, :] + steps).mean(axis=1)


class Localizer:
    """Localises the organs of a template bank in query scans with one MedLAM model."""

    def __init__(self, model: MedLAM, bank: TemplateBank, options: LocalizeOptions | None = None):
        self.model, self.bank = model.eval(), bank
        self.options = options or LocalizeOptions()
        if self.options.mode not in ("wpl", "spl"):
            raise ValueError(f"mode must be 'wpl' or 'spl', not {self.options.mode!r}")

    @staticmethod
    def _roles(organ: OrganTemplate, mode: str) -> list[int]:
        wanted = WPL_ROLES if mode == "wpl" else organ.roles
        return [i for i, r in enumerate(organ.roles) if r in wanted]

    @torch.no_grad()
    def localize(
        self,
        volume: CTVolume | LocalizationGrid,
        organs: list[str] | None = None,
        *,
        mode: str | None = None,
        prior: bool = False,
    ) -> dict:
        """Boxes of the chosen organs (all by default): {"organs": {name: OrganLocation}, "timings_s": ...}.
        ``mode`` overrides the options' box mode for this call; ``prior`` also builds each found organ's prior
        (needs template matching)."""
        mode = mode or self.options.mode
        if mode not in ("wpl", "spl"):
            raise ValueError(f"mode must be 'wpl' or 'spl', not {mode!r}")
        chosen = self.bank.select(organs)  # an unknown organ: TemplateError naming the bank's, before any work
        timings: dict[str, float] = {}
        tic = time.perf_counter()
        grid = volume if isinstance(volume, LocalizationGrid) else to_localization_grid(volume)
        timings["resample"] = time.perf_counter() - tic
        keys = [(name, i) for name, organ in chosen.items() for i in self._roles(organ, mode)]
        latents = np.array([chosen[n].latent[i].numpy() for n, i in keys])
        offsets = np.array([chosen[n].offset[i].numpy() for n, i in keys])

        tic = time.perf_counter()
        opts = self.options
        starts = _body_start_points(grid, np.random.default_rng(0), opts.start_patches)
        points = _jump(latents, starts, encode_latents(self.model, grid, starts, bf16=opts.bf16))
        for _ in range(opts.jumps - 1):  # re-encode near the targets and jump again
            clusters = cluster_points(np.round(points).astype(int), reach=opts.jump_reach)
            centres = np.array([c for c, _ in clusters])
            cluster_latents = encode_latents(self.model, grid, centres, bf16=opts.bf16)
            for (centre, members), latent in zip(clusters, cluster_latents):
                points[members] = _jump(latents[members], centre[None], latent[None])
        timings["coarse"] = time.perf_counter() - tic

        scores = np.ones(len(keys))
        tic = time.perf_counter()
        if opts.refine:
            rounded = np.round(points).astype(int)
            clusters = cluster_points(rounded, reach=16)
            patches = encode_patches(self.model, grid, [c for c, _ in clusters], scales=opts.scales, bf16=opts.bf16)
            for patch, (_, members) in zip(patches, clusters):
                kernels = [
                    torch.stack([chosen[keys[m][0]].kernels[s][keys[m][1]] for m in members])
                    for s in range(opts.scales)
                ]
                points[members], scores[members] = refine_points(patch, rounded[members], kernels, opts.search_radius)
        timings["refine"] = time.perf_counter() - tic
        points = points + offsets

        tic = time.perf_counter()
        results = {}
        for name, organ in chosen.items():
            cancel.check()
            rows = [k for k, (n, _) in enumerate(keys) if n == name]
            roles = [organ.roles[keys[k][1]] for k in rows]
            results[name] = self._organ_result(name, organ, grid, points[rows], scores[rows], roles, mode, prior)
        timings["match"] = time.perf_counter() - tic  # intensity matching (and box mapping)
        timings["total"] = sum(timings.values())
        return {"organs": results, "timings_s": {k: round(v, 3) for k, v in timings.items()}}

    def _organ_result(
        self,
        name: str,
        organ: OrganTemplate,
        grid: LocalizationGrid,
        points: np.ndarray,
        scores: np.ndarray,
        roles: list[str],
        mode: str,
        prior: bool,
    ) -> OrganLocation:
        wpl = np.array([points[roles.index(r)] for r in WPL_ROLES])
        score = float(scores[[roles.index(r) for r in WPL_ROLES]].mean()) if self.options.refine else 1.0
        result = OrganLocation(name=name, value=organ.value, found=True, score=score)
        corners = None
        low, high = wpl.min(axis=0), wpl.max(axis=0)
        shape = np.array(grid.source.shape)

        def outside(low: np.ndarray, high: np.ndarray) -> bool:
            centre_index = grid.to_file_index(((low + high) / 2)[None])[0]
            return bool(np.any(centre_index < -0.5) or np.any(centre_index > shape - 0.5))

        if outside(low, high):  # MedLAM's estimate, before matching can pull it inside
            result.found, result.reason = False, "box centre outside the scan's field of view"
        elif self.options.refine and score < self.options.min_score:
            result.found, result.reason = False, f"similarity {score:.2f} below {self.options.min_score}"
        elif self.options.match and organ.neighbourhoods:
            box, match_scores, corners = match_organ(
                grid.array, organ.neighbourhoods, (low + high) / 2, self.options.match_radius
            )
            result.match_score = float(np.median(match_scores))
            result.cues = organ_cues(grid.array, organ.neighbourhoods, corners, match_scores, box, organ.body_mm)
            points = points + ((box[0] + box[1]) - (low + high)) / 2  # slab points follow the organ
            low, high = box
            if outside(low, high):
                result.found, result.reason = False, "box centre outside the scan's field of view"
            elif result.match_score < self.options.min_match_score:
                result.found = False
                result.reason = f"template match {result.match_score:.2f} below {self.options.min_match_score}"
            elif self.options.plausibility:
                cues = result.cues
                if len(organ.neighbourhoods) > 1 and (cues.body_width or 0.0) >= self.options.max_body_width > 0:
                    cues.agreement = cached_agreement(organ.neighbourhoods)  # only where the body is too wide
                if reason := implausible(cues, self.options):
                    result.found, result.reason = False, reason
        margin = self.options.margin_mm / GRID_SPACING_MM
        low, high = low - margin, high + margin
        if not result.found:
            return result
        if prior and corners is not None:
            opts = self.options
            atlases = best_matches(match_scores, opts.prior_atlases)
            result.prior = file_prior(
                grid,
                [organ.neighbourhoods[i] for i in atlases],
                [corners[i] for i in atlases],
                opts.prior_slab,
                opts.prior_slab_radius,
                opts.intensity_power,
                opts.prior_registration,
                opts.prior_match_sharpness,
                organ.prior_cut,
            )
        lo, hi = grid.box_to_file(low, high)
        result.box_voxel = [lo.tolist(), hi.tolist()]
        world = grid.source.index_to_world(np.array([lo, hi]))
        result.box_mm = [world.min(axis=0).round(2).tolist(), world.max(axis=0).round(2).tolist()]
        if mode == "spl" and any(r.startswith("s") for r in roles):
            edges = np.linspace(low[0], high[0], SLABS + 1)
            for s in range(SLABS):
                slab = np.array(
                    [points[roles.index(f"s{s}{a}")] for a in ("y-", "y+", "x-", "x+") if f"s{s}{a}" in roles]
                )
                if len(slab) < 4:
                    continue
                s_low = np.array([edges[s], slab[:, 1].min() - margin, slab[:, 2].min() - margin])
                s_high = np.array([edges[s + 1], slab[:, 1].max() + margin, slab[:, 2].max() + margin])
                s_lo, s_hi = grid.box_to_file(s_low, s_high)
                result.slabs.append({"box_voxel": [s_lo.tolist(), s_hi.tolist()]})
        return result
