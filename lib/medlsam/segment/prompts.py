"""Box prompts of localised organs, slice by slice, in the file's own voxel order, and the slices to encode.

prior (default): on each slice, the box of the organ's prior (the matched templates' masks weighed by their
intensities, ``medlsam.atlas.prior``). WPL: the organ's box on every slice of its cranio-caudal range. SPL: on each
slice, the box of the localiser's z-slab holding that slice (``OrganLocation.slabs``). Boxes are inclusive
voxel indices; on a slice ``np.take(array, k, axis)`` the box's x is the column index, y the row index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medlsam.atlas.localize import OrganLocation
from medlsam.atlas.prior import FilePrior, prior_slice_boxes
from medlsam.utils.geometry import inplane_axes


@dataclass
class OrganPrompts:
    """One organ's prompts: slice index -> (x0, y0, x1, y1) box, and its prior on the file grid (when the
    localiser matched templates and the options use it)."""

    name: str
    value: int
    boxes: dict[int, np.ndarray]
    prior: FilePrior | None = None


def _slice_box(lo, hi, axis: int, shape: tuple[int, int]) -> np.ndarray:
    """Inclusive voxel box -> (x0, y0, x1, y1) on slices along ``axis`` (x = column, y = row), clipped."""
    r, c = inplane_axes(axis)
    box = np.array([lo[c], lo[r], hi[c], hi[r]], dtype=np.float64)
    box[[0, 2]] = np.clip(box[[0, 2]], 0, shape[1] - 1)
    box[[1, 3]] = np.clip(box[[1, 3]], 0, shape[0] - 1)
    return box


def organ_prompts(
    location: OrganLocation, axis: int, shape3d: tuple[int, int, int], mode: str
) -> dict[int, np.ndarray]:
    """Per slice index along ``axis``, the box prompt of one localised organ (WPL or SPL)."""
    if not location.found or not location.box_voxel:
        return {}
    lo, hi = (np.asarray(b) for b in location.box_voxel)
    slice_shape = tuple(s for a, s in enumerate(shape3d) if a != axis)
    k0, k1 = max(0, int(lo[axis])), min(shape3d[axis] - 1, int(hi[axis]))
    whole = _slice_box(lo, hi, axis, slice_shape)
    slabs = (
        [(np.asarray(s["box_voxel"][0]), np.asarray(s["box_voxel"][1])) for s in location.slabs]
        if mode == "spl"
        else []
    )
    if not slabs:
        return {k: whole for k in range(k0, k1 + 1)}
    ranges = [(int(a[axis]), int(b[axis])) for a, b in slabs]
    centres = np.array([(a + b) / 2 for a, b in ranges])
    k0 = max(0, min(k0, min(a for a, _ in ranges)))
    k1 = min(shape3d[axis] - 1, max(k1, max(b for _, b in ranges)))
    prompts = {}
    for k in range(k0, k1 + 1):
        covering = [i for i, (a, b) in enumerate(ranges) if a <= k <= b]
        candidates = covering or list(range(len(slabs)))
        best = min(candidates, key=lambda i: abs(centres[i] - k))  # boundary slices: the slab it is central in
        prompts[k] = _slice_box(*slabs[best], axis, slice_shape)
    return prompts


def encoded_slices(organ_slices: list[list[int]], step: int) -> list[int]:
    """The slices to encode: every ``step``-th slice of the organs' ranges (one lattice for all organs, so a
    slice serves every organ on it) plus, for an organ that no lattice slice reaches, its middle slice."""
    ks = sorted({k for organ in organ_slices for k in organ})
    if step <= 1 or not ks:
        return ks
    chosen = {k for k in ks if (k - ks[0]) % step == 0}
    for organ in organ_slices:
        if organ and not chosen.intersection(organ):
            chosen.add(organ[len(organ) // 2])
    for organ in organ_slices:  # an organ's first and last slices: within step // 2 of an encoded one
        for end in (organ[0], organ[-1]) if organ else ():
            if min(abs(end - k) for k in chosen if k in organ) > step // 2:
                chosen.add(end)
    return sorted(chosen)


def prompts_for(
    location: OrganLocation,
    mode: str,
    axis: int,
    shape3d: tuple[int, int, int],
    use_prior: bool,
    prior_box_threshold: float,
) -> OrganPrompts:
    """The organ's per-slice boxes for ``mode`` (prior, wpl or spl) and, with ``use_prior``, its prior; an
    organ without a prior is prompted with its WPL box (prior mode) on every slice."""
    prior = location.prior if use_prior and location.found else None
    if mode == "prior" and prior is not None:
        boxes = prior_slice_boxes(prior, axis, prior_box_threshold)
    else:
        boxes = organ_prompts(location, axis, shape3d, "spl" if mode == "spl" else "wpl")
    return OrganPrompts(location.name, int(location.value), boxes, prior)
