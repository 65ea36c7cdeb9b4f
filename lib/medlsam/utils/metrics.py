"""Scoring of organ boxes and masks (protocol: ../shared/docs/evaluation.md).

Boxes are pairs `(low, high)` of integer arrays with *inclusive* voxel indices in a scan's own voxel
grid, in the file's index order (i, j, k). Masks are boolean arrays in the same order; `spacing` is the
voxel size in mm along each of those axes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

Box = tuple[np.ndarray, np.ndarray]


def _as_box(box: Sequence) -> Box:
    low, high = box
    return np.asarray(low, dtype=np.int64), np.asarray(high, dtype=np.int64)


def label_box(mask: np.ndarray) -> Box | None:
    """The inclusive bounding box `(low, high)` of the true voxels of `mask`, or None when it is empty."""
    coords = np.nonzero(np.asarray(mask))
    if coords[0].size == 0:
        return None
    low = np.array([c.min() for c in coords], dtype=np.int64)
    high = np.array([c.max() for c in coords], dtype=np.int64)
    return low, high


def box_volume(box: Sequence) -> int:
    """Number of voxels in an inclusive box (0 when high < low along some axis)."""
    low, high = _as_box(box)
    return int(np.prod(np.clip(high - low + 1, 0, None)))


def box_iou(a: Sequence, b: Sequence) -> float:
    """Intersection over union of two inclusive voxel boxes (any number of dimensions)."""
    a_low, a_high = _as_box(a)
    b_low, b_high = _as_box(b)
    inter = box_volume((np.maximum(a_low, b_low), np.minimum(a_high, b_high)))
    union = box_volume(a) + box_volume(b) - inter
    return float(inter / union) if union > 0 else 0.0


def wall_distances(pred: Sequence, true: Sequence, spacing: Sequence[float], z_axis: int) -> dict[str, float]:
    """Distances in mm between corresponding faces of two boxes.

    A face's distance is |predicted index - true index| times the spacing of its axis. Returns `mean`
    (over the six faces), `z` (over the low and high faces along the cranio-caudal file axis `z_axis`)
    and `inplane` (over the four other faces).
    """
    p_low, p_high = _as_box(pred)
    t_low, t_high = _as_box(true)
    spacing = np.asarray(spacing, dtype=np.float64)
    if p_low.shape != (3,) or spacing.shape != (3,) or z_axis not in (0, 1, 2):
        raise ValueError("wall_distances needs 3D boxes, three spacings and z_axis in 0..2")
    low = np.abs(p_low - t_low) * spacing
    high = np.abs(p_high - t_high) * spacing
    inplane = [a for a in range(3) if a != z_axis]
    return {
        "mean": float(np.mean(np.concatenate([low, high]))),
        "z": float((low[z_axis] + high[z_axis]) / 2),
        "inplane": float(np.mean(np.concatenate([low[inplane], high[inplane]]))),
    }


def cranio_caudal_axis(affine: np.ndarray) -> int:
    """The file axis most aligned with world z (superior-inferior), from a 4x4 index -> LPS mm affine."""
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    directions = linear / np.linalg.norm(linear, axis=0, keepdims=True)  # unit direction of each file axis
    return int(np.argmax(np.abs(directions[2])))


def dice(pred_mask: np.ndarray, true_mask: np.ndarray) -> float:
    """Dice overlap 2|P and T| / (|P| + |T|); 1.0 when both masks are empty, 0.0 when only one is."""
    pred = np.asarray(pred_mask, dtype=bool)
    true = np.asarray(true_mask, dtype=bool)
    if pred.shape != true.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {true.shape}")
    total = int(pred.sum()) + int(true.sum())
    if total == 0:
        return 1.0
    return float(2.0 * np.logical_and(pred, true).sum() / total)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of the mask with a face-neighbour outside it (the array border counts as outside)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, iterations=1, border_value=0)


def hd95(pred_mask: np.ndarray, true_mask: np.ndarray, spacing: Sequence[float]) -> float | None:
    """95th percentile Hausdorff distance in mm between the surfaces of two masks.

    The distances from every predicted surface voxel to the true surface and from every true surface
    voxel to the predicted surface are pooled (as medpy's `hd95`). Returns None for an empty prediction
    (a miss, reported as missing); an empty true mask raises ValueError (nothing to score against).
    """
    pred = np.asarray(pred_mask, dtype=bool)
    true = np.asarray(true_mask, dtype=bool)
    if pred.shape != true.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {true.shape}")
    if not true.any():
        raise ValueError("hd95: the true mask is empty")
    if not pred.any():
        return None
    # Work on the joint bounding box plus one voxel: the same surfaces and distances, far less work.
    low, high = label_box(pred | true)
    low = np.maximum(low - 1, 0)
    high = np.minimum(high + 1, np.array(pred.shape) - 1)
    window = tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(low, high))
    pred_surface, true_surface = _surface(pred[window]), _surface(true[window])
    sampling = np.asarray(spacing, dtype=np.float64)
    to_true = ndimage.distance_transform_edt(~true_surface, sampling=sampling)[pred_surface]
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=sampling)[true_surface]
    return float(np.percentile(np.concatenate([to_true, to_pred]), 95))
