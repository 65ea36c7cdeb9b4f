"""The click simulator shared by the interactive benchmarks, the tests and the click refiner's training: the first
click at the organ's centre on its middle slice, each later click at the most interior voxel of the largest 3D error
(foreground where missed, background where spurious)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def organ_centre_click(mask: np.ndarray, axis: int) -> list[int]:
    """The most interior voxel of the organ on its middle slice along ``axis``."""
    ks = np.nonzero(np.moveaxis(mask, axis, 0).any(axis=(1, 2)))[0]
    k = int(ks[len(ks) // 2])
    plane = np.take(mask, k, axis=axis)
    dist = ndimage.distance_transform_edt(np.pad(plane, 1))[1:-1, 1:-1]
    r, c = np.unravel_index(int(np.argmax(dist)), plane.shape)
    click = [0, 0, 0]
    rest = [a for a in range(3) if a != axis]
    click[axis], click[rest[0]], click[rest[1]] = k, int(r), int(c)
    return click


def error_click(pred: np.ndarray, truth: np.ndarray) -> tuple[list[int], bool] | None:
    """The most interior voxel of the largest 3D error component, and whether it is a missed (foreground) one."""
    either = np.argwhere(pred | truth)
    if len(either) == 0:
        return None
    low = np.maximum(either.min(axis=0) - 1, 0)  # the errors' box: the same components, far fewer voxels
    box = tuple(slice(int(a), int(b) + 2) for a, b in zip(low, either.max(axis=0)))
    offset = low
    pred, truth = pred[box], truth[box]
    best = None
    for missed, error in ((True, truth & ~pred), (False, pred & ~truth)):
        labels, n = ndimage.label(error)
        if n == 0:
            continue
        sizes = ndimage.sum(error, labels, range(1, n + 1))
        i = int(np.argmax(sizes))
        if best is None or sizes[i] > best[0]:
            best = (sizes[i], labels == i + 1, missed)
    if best is None:
        return None
    dist = ndimage.distance_transform_edt(np.pad(best[1], 1))[1:-1, 1:-1, 1:-1]
    at = np.unravel_index(int(np.argmax(dist)), best[1].shape)
    return [int(v + o) for v, o in zip(at, offset)], best[2]
