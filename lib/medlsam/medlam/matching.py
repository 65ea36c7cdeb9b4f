"""Intensity matching of template organ neighbourhoods: the last localisation stage.

MedLAM's jump and feature refinement put an organ within a few centimetres. Each template then
contributes the intensities of its organ's neighbourhood on the 3 mm grid (the organ box plus a margin
of context); normalised cross-correlation finds where that neighbourhood sits in the query within
`radius` voxels of MedLAM's estimate, coarse (6 mm) to fine (3 mm). The organ box is the per-face median
of the templates' matched boxes, so one template matched in the wrong place does not move it.

Each neighbourhood also carries the template's organ mask (fraction of the voxel inside the organ), which
``medlsam.atlas.prior`` places where the neighbourhood matched (``match_slabs`` lets it bend with the organ).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medlsam.io.grid import LocalizationGrid

CONTEXT_VOXELS = 8  # margin of context around the organ box kept in a template patch (24 mm)


@dataclass
class OrganPatch:
    """One template's neighbourhood of one organ: grid intensities and where the organ box sits in it."""

    intensities: torch.Tensor  # (d, h, w) float16, HU mapped as on the grid
    box: torch.Tensor  # (2, 3) organ box (min and max voxel centres) in the patch's coordinates
    mask: torch.Tensor  # (d, h, w) float16 in [0, 1]: the organ's share of each grid voxel


def box_mask(shape: tuple[int, int, int], low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """1 inside the box of voxel centres [low, high] (grid coordinates, rounded), 0 elsewhere."""
    mask = np.zeros(shape, np.float32)
    lo = np.clip(np.round(low).astype(int), 0, np.array(shape) - 1)
    hi = np.clip(np.round(high).astype(int), 0, np.array(shape) - 1)
    mask[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1] = 1.0
    return mask


def cut_organ_patch(
    grid: LocalizationGrid,
    low: np.ndarray,
    high: np.ndarray,
    mask: np.ndarray | None = None,
    context: int = CONTEXT_VOXELS,
) -> OrganPatch:
    """The grid neighbourhood of a box (grid coordinates) with `context` voxels around it, clipped to the grid.
    `mask`: the organ on the whole grid (from a label); without one (extreme points) the box is the mask."""
    start = np.maximum(np.floor(low).astype(int) - context, 0)
    stop = np.minimum(np.ceil(high).astype(int) + context + 1, grid.shape)
    region = tuple(slice(a, b) for a, b in zip(start, stop))
    crop = grid.array[region]
    box = np.stack([np.asarray(low) - start, np.asarray(high) - start])
    organ = box_mask(crop.shape, box[0], box[1]) if mask is None else np.clip(mask[region], 0.0, 1.0)
    return OrganPatch(
        torch.from_numpy(np.ascontiguousarray(crop)).half(),
        torch.tensor(box, dtype=torch.float32),
        torch.from_numpy(np.ascontiguousarray(organ, dtype=np.float32)).half(),
    )


def _region(array: np.ndarray, corner: np.ndarray, size: np.ndarray) -> torch.Tensor:
    """``window_region`` as a (1, 1, ...) float tensor."""
    return torch.from_numpy(window_region(array, corner, size))[None, None]


def window_region(array: np.ndarray, corner: np.ndarray, size: np.ndarray) -> np.ndarray:
    """array[corner : corner + size] with zeros (air) outside, float32."""
    lo, hi = corner, corner + size
    src_lo, src_hi = np.maximum(lo, 0), np.minimum(hi, array.shape)
    out = np.zeros(size, np.float32)
    if np.all(src_hi > src_lo):
        d = src_lo - lo
        out[
            d[0] : d[0] + src_hi[0] - src_lo[0],
            d[1] : d[1] + src_hi[1] - src_lo[1],
            d[2] : d[2] + src_hi[2] - src_lo[2],
        ] = array[src_lo[0] : src_hi[0], src_lo[1] : src_hi[1], src_lo[2] : src_hi[2]]
    return out


def _window_sums(volume: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Sums of a (D, H, W) volume over every window of `size` (valid positions), from an integral volume."""
    total = F.pad(volume.double(), (1, 0, 1, 0, 1, 0)).cumsum(0).cumsum(1).cumsum(2)
    d, h, w = size
    return (
        total[d:, h:, w:]
        - total[:-d, h:, w:]
        - total[d:, :-h, w:]
        - total[d:, h:, :-w]
        + total[:-d, :-h, w:]
        + total[:-d, h:, :-w]
        + total[d:, :-h, :-w]
        - total[:-d, :-h, :-w]
    ).float()


def _ncc(region: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """Normalised cross-correlation of a (1, 1, D, H, W) region with a (d, h, w) template at every shift."""
    t = template - template.mean()
    t = t / t.norm().clamp(min=1e-6)
    n = t.numel()
    numerator = F.conv3d(region, t[None, None])[0, 0]
    sums = _window_sums(region[0, 0], tuple(t.shape))
    squares = _window_sums(region[0, 0] ** 2, tuple(t.shape))
    std = (squares - sums * sums / n).clamp(min=0).sqrt().clamp(min=1e-3)
    return numerator / std


def match_patch(
    array: np.ndarray, patch: OrganPatch, centre: np.ndarray, radius: int
) -> tuple[np.ndarray, float, np.ndarray]:
    """Where the patch's organ box lands in `array` (grid) when its centre starts at `centre` and the patch
    moves by up to `radius` voxels: (2, 3) box, the NCC of the best position and the patch's corner there."""
    template = patch.intensities.float()
    size = np.array(template.shape)
    box = patch.box.numpy()
    start = np.round(np.asarray(centre) - (box[0] + box[1]) / 2).astype(int)  # patch corner before the search
    if radius >= 4 and np.all(size >= 4):  # coarse: 6 mm cells over the whole radius
        half = radius // 2 + 1
        region = _region(array, start - 2 * half, size + 4 * half)
        scores = _ncc(F.avg_pool3d(region, 2), F.avg_pool3d(template[None, None], 2)[0, 0])
        best = np.array(np.unravel_index(int(scores.argmax()), scores.shape))
        start = start - 2 * half + 2 * best
        fine = 2
    else:
        fine = radius
    region = _region(array, start - fine, size + 2 * fine)
    scores = _ncc(region, template)
    best = np.array(np.unravel_index(int(scores.argmax()), scores.shape))
    corner = start - fine + best
    return box + corner, float(scores.max()), corner


def match_slabs(
    array: np.ndarray, patch: OrganPatch, corner: np.ndarray, thickness: int, radius: int
) -> list[tuple[int, np.ndarray]]:
    """Piecewise-rigid refinement of a matched patch: each slab of ``thickness`` slices (along the first,
    cranio-caudal grid axis) is matched again within ``radius`` voxels of where the whole patch matched.
    Returns (first slice of the slab in the patch, the slab's corner in the grid) per slab; slabs too thin
    or too flat in intensity to be matched stay where the whole patch is."""
    template = patch.intensities.float()
    slabs = []
    for z0 in range(0, template.shape[0], thickness):
        part = template[z0 : z0 + thickness]
        start = np.asarray(corner) + np.array([z0, 0, 0])
        if part.shape[0] < 2 or float(part.std()) < 1e-3 or radius < 1:
            slabs.append((z0, start))
            continue
        region = _region(array, start - radius, np.array(part.shape) + 2 * radius)
        scores = _ncc(region, part)
        best = np.array(np.unravel_index(int(scores.argmax()), scores.shape))
        slabs.append((z0, start - radius + best))
    return slabs


def match_organ(
    array: np.ndarray, patches: list[OrganPatch], centre: np.ndarray, radius: int
) -> tuple[np.ndarray, list[float], list[np.ndarray]]:
    """Median over templates of the matched organ boxes (2, 3), and each patch's NCC and corner there."""
    matches = [match_patch(array, p, centre, radius) for p in patches]
    boxes = np.stack([b for b, _, _ in matches])
    return np.median(boxes, axis=0), [s for _, s, _ in matches], [c for _, _, c in matches]


def best_matches(scores: list[float], count: int) -> list[int]:
    """Indices of the ``count`` best scores, best first (all of them, in order, when ``count`` is 0 or covers
    them all): atlas selection, the templates whose neighbourhoods match the query best."""
    if count <= 0 or count >= len(scores):
        return list(range(len(scores)))
    return [int(i) for i in np.argsort(-np.asarray(scores), kind="stable")[:count]]
