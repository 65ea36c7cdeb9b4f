"""Assembly of one label volume from per-slice organ probabilities (pure: no model, no I/O).

An organ's probability on a slice is SAM's mask (interpolated between encoded slices and kept to the slice's
box; the box's inscribed ellipse where SAM found nothing) blended with its template prior,
(1 - prior_weight) SAM + prior_weight prior, or the prior alone when SAM is not run; per voxel the most
probable organ wins if its probability is above the threshold.
"""

from __future__ import annotations

import numpy as np

from medlsam.segment.prompts import OrganPrompts
from medlsam.utils.geometry import largest_component


def _ellipse(shape: tuple[int, int], box: np.ndarray) -> np.ndarray:
    x0, y0, x1, y1 = box
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return (
        ((rows - (y0 + y1) / 2) / ((y1 - y0 + 1) / 2)) ** 2 + ((cols - (x0 + x1) / 2) / ((x1 - x0 + 1) / 2)) ** 2
    ) <= 1.0


def _box_mask(shape: tuple[int, int], box: np.ndarray, margin: int = 0) -> np.ndarray:
    """1 inside the (x0, y0, x1, y1) box widened by ``margin`` pixels, 0 elsewhere."""
    mask = np.zeros(shape, np.float32)
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    mask[max(0, y0 - margin) : y1 + margin + 1, max(0, x0 - margin) : x1 + margin + 1] = 1.0
    return mask


def interpolate_slices(known: dict[int, np.ndarray], k: int) -> np.ndarray:
    """Linear interpolation of slice probabilities between the nearest known slices around k (the nearest
    one when k is beyond them)."""
    below = [j for j in known if j < k]
    above = [j for j in known if j > k]
    if below and above:
        lo, hi = max(below), min(above)
        t = (k - lo) / (hi - lo)
        return (1.0 - t) * known[lo] + t * known[hi]
    return known[max(below)] if below else known[min(above)]


def slice_probability(
    p: OrganPrompts,
    k: int,
    sam: dict[int, np.ndarray],
    axis: int,
    shape: tuple[int, int],
    threshold: float,
    prior_weight: float,
    empty_fallback: bool,
) -> np.ndarray:
    """Organ probability on slice k: SAM's mask (interpolated between encoded slices, kept to the slice's
    box), with the empty-mask fallback, blended with the template prior; the prior alone when SAM is not
    run (prior_weight 1)."""
    box = p.boxes[k]
    if not sam:
        prior = p.prior.slice(axis, k, shape)
        return np.zeros(shape, np.float32) if prior is None else prior
    if k in sam:
        prob = sam[k]
    else:
        prob = interpolate_slices(sam, k) * _box_mask(shape, box, margin=2)
    if empty_fallback and not (prob > threshold).any():
        prob = np.maximum(prob, np.where(_ellipse(shape, box), threshold + 1e-3, 0.0)).astype(np.float32)
    if prior_weight > 0 and p.prior is not None:
        prior = p.prior.slice(axis, k, shape)
        if prior is not None:
            prob = (1.0 - prior_weight) * prob + prior_weight * prior
    return prob


def assemble(
    shape3d: tuple[int, int, int],
    axis: int,
    prompts: list[OrganPrompts],
    sam: dict[str, dict[int, np.ndarray]],
    threshold: float,
    prior_weight: float | dict[str, float],
    empty_fallback: bool,
    keep_largest_component: bool,
    dtype=np.uint8,
) -> tuple[np.ndarray, dict[str, int]]:
    """The label volume and each organ's voxel count, from the organs' prompts and SAM's slice probabilities
    (``sam[organ][k]``, empty when SAM was not run); ``prior_weight``: one for all organs or one per organ."""
    weights = prior_weight if isinstance(prior_weight, dict) else {p.name: prior_weight for p in prompts}
    label = np.zeros(shape3d, dtype=dtype)
    slice_shape = tuple(s for a, s in enumerate(shape3d) if a != axis)
    slices_view = np.moveaxis(label, axis, 0)  # a view: slices_view[k] is np.take(label, k, axis)
    for k in sorted({k for p in prompts for k in p.boxes}):
        here = [p for p in prompts if k in p.boxes]
        probs = np.stack(
            [
                slice_probability(p, k, sam[p.name], axis, slice_shape, threshold, weights[p.name], empty_fallback)
                for p in here
            ]
        )
        best = probs.argmax(axis=0)
        keep = probs.max(axis=0) > threshold
        values = np.array([p.value for p in here], dtype=label.dtype)
        slices_view[k] = np.where(keep, values[best], 0)
    voxels = {}
    for p in prompts:
        ks = sorted(p.boxes)
        region = [slice(None)] * 3
        region[axis] = slice(ks[0], ks[-1] + 1)
        region = tuple(region)
        mask = label[region] == p.value
        if keep_largest_component and mask.any():
            cleaned = largest_component(mask)
            label[region][mask & ~cleaned] = 0
            mask = cleaned
        voxels[p.name] = int(mask.sum())
    return label, voxels
