"""Box and mask metrics on hand-made boxes and shapes (no real data)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from medlsam.utils.metrics import box_iou, cranio_caudal_axis, dice, hd95, label_box, wall_distances


def box(low, high):
    return np.array(low), np.array(high)


# -- boxes ---------------------------------------------------------------------------------------------


def test_label_box_is_inclusive_and_none_when_empty():
    mask = np.zeros((10, 8, 6), dtype=bool)
    mask[2:5, 3, 1:6] = True
    mask[7, 6, 0] = True
    low, high = label_box(mask)
    assert low.tolist() == [2, 3, 0] and high.tolist() == [7, 6, 5]
    assert label_box(np.zeros((4, 4, 4), dtype=bool)) is None


def test_iou_identical_disjoint_and_adjacent():
    a = box([1, 2, 3], [4, 6, 8])
    assert box_iou(a, a) == 1.0
    assert box_iou(a, box([10, 10, 10], [12, 12, 12])) == 0.0
    assert box_iou(a, box([5, 2, 3], [7, 6, 8])) == 0.0  # touching faces share no voxel
    single = box([3, 3, 3], [3, 3, 3])
    assert box_iou(single, single) == 1.0  # one voxel has volume 1, not 0


def test_iou_partial_overlap_counts_inclusive_voxels():
    # 2x2x2 boxes sharing one layer of 4 voxels: 4 / (8 + 8 - 4)
    assert box_iou(box([0, 0, 0], [1, 1, 1]), box([1, 0, 0], [2, 1, 1])) == pytest.approx(1 / 3)
    # 4^3 and 3^3 boxes sharing a single corner voxel: 1 / (64 + 27 - 1)
    assert box_iou(box([0, 0, 0], [3, 3, 3]), box([3, 3, 3], [5, 5, 5])) == pytest.approx(1 / 90)
    # a box inside another: its volume over the outer one
    assert box_iou(box([0, 0, 0], [9, 9, 9]), box([2, 2, 2], [6, 6, 6])) == pytest.approx(125 / 1000)
    a, b = box([0, 1, 2], [5, 7, 4]), box([3, 0, 1], [8, 4, 9])
    assert box_iou(a, b) == box_iou(b, a)


def test_wall_distances_with_anisotropic_spacing_and_z_axis():
    pred, true = box([1, 2, 3], [5, 6, 7]), box([0, 2, 5], [5, 8, 7])
    spacing = (2.0, 3.0, 4.0)
    # face differences in mm: low (1*2, 0, 2*4) = (2, 0, 8), high (0, 2*3, 0) = (0, 6, 0)
    d = wall_distances(pred, true, spacing, z_axis=2)
    assert d["mean"] == pytest.approx(16 / 6)
    assert d["z"] == pytest.approx((8 + 0) / 2)
    assert d["inplane"] == pytest.approx((2 + 0 + 0 + 6) / 4)
    d0 = wall_distances(pred, true, spacing, z_axis=0)
    assert d0["mean"] == pytest.approx(16 / 6)
    assert d0["z"] == pytest.approx((2 + 0) / 2)
    assert d0["inplane"] == pytest.approx((0 + 8 + 6 + 0) / 4)
    assert wall_distances(true, pred, spacing, 1) == wall_distances(pred, true, spacing, 1)
    assert wall_distances(pred, pred, spacing, 2) == {"mean": 0.0, "z": 0.0, "inplane": 0.0}


def test_cranio_caudal_axis():
    lps = np.diag([3.9, 3.9, -2.5, 1.0])  # OpenKBP files: axis 2 runs superior to inferior
    assert cranio_caudal_axis(lps) == 2
    permuted = np.eye(4)
    permuted[:3, :3] = [[0, 4.0, 0], [0, 0, 4.0], [-2.5, 0, 0]]  # file axis 0 along world z
    assert cranio_caudal_axis(permuted) == 0
    # Oblique: rotated 40 degrees about x, with a large spacing on axis 1. Axis 2 is closer to z
    # (cos 40 > sin 40) although axis 1's unnormalised column has the larger z component.
    c, s = math.cos(math.radians(40)), math.sin(math.radians(40))
    rotation = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    oblique = np.eye(4)
    oblique[:3, :3] = rotation * np.array([1.0, 5.0, 0.5])[None, :]
    assert cranio_caudal_axis(oblique) == 2


# -- masks ---------------------------------------------------------------------------------------------


def test_dice_simple_shapes():
    a = np.zeros((10, 10, 10), dtype=bool)
    b = np.zeros_like(a)
    a[0:4, 0:4, 0:4] = True  # 64 voxels
    b[2:6, 0:4, 0:4] = True  # 64 voxels, 32 shared
    assert dice(a, a) == 1.0
    assert dice(a, b) == pytest.approx(2 * 32 / 128)
    c = np.zeros_like(a)
    c[8:, 8:, 8:] = True
    assert dice(a, c) == 0.0
    assert dice(np.zeros_like(a), a) == 0.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0


def brute_hd95(pred: np.ndarray, true: np.ndarray, spacing) -> float:
    """Reference: surface voxels (a face-neighbour outside the mask or the array) and all-pairs distances."""

    def surface(mask):
        padded = np.pad(mask, 1)
        inside = np.ones_like(mask)
        for axis in range(3):
            for shift in (-1, 1):
                inside &= np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(mask & ~inside) * np.asarray(spacing)

    p, t = surface(pred), surface(true)
    d = cdist(p, t)
    return float(np.percentile(np.concatenate([d.min(axis=1), d.min(axis=0)]), 95))


def test_hd95_single_voxels_and_identical_masks():
    a = np.zeros((8, 8, 8), dtype=bool)
    b = np.zeros_like(a)
    a[2, 2, 2] = True
    b[2, 2, 5] = True
    assert hd95(a, b, (1.0, 1.0, 3.0)) == pytest.approx(9.0)
    assert hd95(b, a, (2.0, 2.0, 0.5)) == pytest.approx(1.5)
    cube = np.zeros((12, 12, 12), dtype=bool)
    cube[3:9, 2:10, 4:7] = True
    assert hd95(cube, cube, (1.0, 2.0, 3.0)) == 0.0


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.9, 3.9, 2.5), (0.8, 2.0, 5.0)])
def test_hd95_matches_brute_force(spacing):
    i, j, k = np.meshgrid(*(np.arange(n) for n in (20, 18, 16)), indexing="ij")
    true = ((i - 9) / 6.0) ** 2 + ((j - 8) / 5.0) ** 2 + ((k - 7) / 4.0) ** 2 <= 1  # an ellipsoid
    pred = np.zeros_like(true)
    pred[5:15, 4:11, 3:13] = True  # a box overlapping it
    pred[0:3, 0:18, 0:2] = True  # and a slab touching the array border (border voxels are surface)
    assert hd95(pred, true, spacing) == pytest.approx(brute_hd95(pred, true, spacing))
    assert hd95(true, pred, spacing) == pytest.approx(brute_hd95(pred, true, spacing))


def test_hd95_none_for_empty_prediction_and_error_for_empty_truth():
    true = np.zeros((6, 6, 6), dtype=bool)
    true[1:3, 1:3, 1:3] = True
    assert hd95(np.zeros_like(true), true, (1.0, 1.0, 1.0)) is None
    with pytest.raises(ValueError):
        hd95(true, np.zeros_like(true), (1.0, 1.0, 1.0))
