"""Small geometry helpers shared by the pipeline, the prior, the interactive tools and the QC picture."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def inplane_axes(axis: int) -> tuple[int, int]:
    """The file axes of the rows and the columns of a slice ``np.take(array, k, axis)``."""
    rows, cols = (a for a in range(3) if a != axis)
    return rows, cols


def mask_extent(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box holding every True voxel of a non-empty mask, as slices (from projections: no index
    array of every voxel)."""
    out = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        out.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(out)


def enclosing(regions: list[tuple[slice, ...]]) -> tuple[slice, ...]:
    """The smallest region (slices) holding every one of ``regions``."""
    low = np.min([[s.start for s in r] for r in regions], axis=0)
    high = np.max([[s.stop for s in r] for r in regions], axis=0)
    return tuple(slice(int(a), int(b)) for a, b in zip(low, high))


def within(inner: tuple[slice, ...], outer: tuple[slice, ...]) -> tuple[slice, ...]:
    """``inner`` as slices of an array covering ``outer``."""
    return tuple(slice(s.start - o.start, s.stop - o.start) for s, o in zip(inner, outer))


def largest_component(mask: np.ndarray, connectivity: int | None = None) -> np.ndarray:
    """The largest connected component of a boolean mask (the mask itself when it has at most one).
    ``connectivity``: 1 for face neighbours only, up to ``mask.ndim`` (the default) for all neighbours."""
    structure = ndimage.generate_binary_structure(mask.ndim, connectivity or mask.ndim)
    labels, count = ndimage.label(mask, structure=structure)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)
