"""Planar geometry of RT structure sets on a voxel grid: closed polygons -> voxels (even-odd, pixel centres) and
voxels -> closed polygons (marching squares), each the exact inverse of the other.

Coordinates here are fractional voxel indices (u, v) of one slice, voxel centres at integers (ITK's convention,
as CTVolume's affine). Filling: a voxel is inside when its centre is inside the polygons by the even-odd rule, so a
slice's contours are XORed (a contour inside another is a hole, one inside that an island); a centre exactly on an
edge counts by the usual half-open rule (inside on the low side). Outlines: the 0.5 iso-line of the slice mask
(marching squares on the mask padded with a border of zeros), whose vertices lie half-way between voxel centres,
so every centre is at least 0.35 voxel from an edge and re-filling gives back the mask exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLLINEAR_TOLERANCE = 1e-9  # voxels^2: cross products below this drop a vertex that adds nothing to the polygon


def fill_even_odd(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """The voxels of a (nu, nv) slice whose centres lie inside ``polygons`` (each (N, 2) in (u, v)), even-odd.

    A scanline fill along u: every integer u crosses the polygons' edges (half-open in u, so a vertex on the line
    is counted once), the crossings of a line are paired in order and the centres v with v0 <= v < v1 filled."""
    nu, nv = shape
    mask = np.zeros(shape, dtype=bool)
    starts, ends = [], []
    for polygon in polygons:
        p = np.asarray(polygon, dtype=np.float64)
        if len(p) < 3:
            continue
        starts.append(p)
        ends.append(np.roll(p, -1, axis=0))
    if not starts:
        return mask
    p0, p1 = np.concatenate(starts), np.concatenate(ends)
    moving = p0[:, 0] != p1[:, 0]
    p0, p1 = p0[moving], p1[moving]
    low, high = np.minimum(p0[:, 0], p1[:, 0]), np.maximum(p0[:, 0], p1[:, 0])
    first = np.maximum(np.ceil(low), 0).astype(np.int64)
    last = np.minimum(np.ceil(high) - 1, nu - 1).astype(np.int64)  # lines u with low <= u < high
    counts = np.maximum(last - first + 1, 0)
    if counts.sum() == 0:
        return mask
    edge = np.repeat(np.arange(len(p0)), counts)
    u = first[edge] + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
    a, b = p0[edge], p1[edge]
    v = a[:, 1] + (u - a[:, 0]) * (b[:, 1] - a[:, 1]) / (b[:, 0] - a[:, 0])
    order = np.lexsort((v, u))
    u, v = u[order], v[order]
    # every line is crossed an even number of times (closed polygons), so consecutive crossings pair up
    u_pair, v_in, v_out = u[0::2], v[0::2], v[1::2]
    start = np.clip(np.ceil(v_in), 0, nv).astype(np.int64)
    stop = np.clip(np.ceil(v_out), 0, nv).astype(np.int64)
    keep = stop > start
    change = np.zeros((nu, nv + 1), dtype=np.int32)
    np.add.at(change, (u_pair[keep], start[keep]), 1)
    np.add.at(change, (u_pair[keep], stop[keep]), -1)
    mask[:] = np.cumsum(change, axis=1)[:, :nv] > 0
    return mask


def _drop_collinear(points: np.ndarray) -> np.ndarray:
    """The polygon without the vertices that lie on the segment between their neighbours (same outline)."""
    before, after = np.roll(points, 1, axis=0), np.roll(points, -1, axis=0)
    d0, d1 = points - before, after - points
    cross = d0[:, 0] * d1[:, 1] - d0[:, 1] * d1[:, 0]
    turning = np.abs(cross) > COLLINEAR_TOLERANCE
    return points[turning] if turning.sum() >= 3 else points


def mask_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed polygons (each (N, 2) in (u, v) voxel indices, not repeating the first vertex) whose even-odd fill is
    exactly ``mask`` (2D): outer outlines and hole outlines alike, from marching squares at level 0.5."""
    from skimage.measure import find_contours

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return []
    nz_u, nz_v = np.nonzero(mask)
    u0, v0 = nz_u.min(), nz_v.min()
    crop = mask[u0 : nz_u.max() + 1, v0 : nz_v.max() + 1]
    padded = np.pad(crop.astype(np.float32), 1)
    polygons = []
    for contour in find_contours(padded, 0.5):
        points = contour[:-1] if np.allclose(contour[0], contour[-1]) else contour
        points = _drop_collinear(points)
        if len(points) >= 3:
            polygons.append(points + np.array([u0 - 1.0, v0 - 1.0]))
    return polygons


@dataclass
class RoiMask:
    """An ROI's voxels as a boolean block of the volume: ``mask`` starting at voxel ``offset`` (i, j, k)."""

    offset: tuple[int, int, int]
    mask: np.ndarray

    @property
    def voxels(self) -> int:
        return int(self.mask.sum())

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(o, o + s) for o, s in zip(self.offset, self.mask.shape))  # type: ignore[return-value]

    def full(self, shape: tuple[int, int, int]) -> np.ndarray:
        """The mask on the whole volume."""
        out = np.zeros(shape, dtype=bool)
        out[self.slices] = self.mask
        return out

    def paint(self, label: np.ndarray, value: int) -> None:
        """Set the ROI's voxels of ``label`` to ``value`` (overwriting what is there)."""
        block = label[self.slices]
        block[self.mask] = value


def rasterise_slices(contours: dict[int, list[np.ndarray]], shape: tuple[int, int, int]) -> RoiMask | None:
    """An ROI's voxels from its polygons per slice ({k: [(N, 2) (i, j) polygons]}, slices inside the volume),
    filled by even-odd on each slice; None when no voxel centre is inside."""
    if not contours:
        return None
    points = np.concatenate([p for polys in contours.values() for p in polys])
    low = np.maximum(np.floor(points.min(axis=0)).astype(int), 0)
    high = np.minimum(np.ceil(points.max(axis=0)).astype(int) + 1, shape[:2])
    if np.any(high <= low):
        return None
    k0, k1 = min(contours), max(contours) + 1
    block = np.zeros((high[0] - low[0], high[1] - low[1], k1 - k0), dtype=bool)
    for k, polygons in contours.items():
        block[:, :, k - k0] = fill_even_odd([p - low for p in polygons], block.shape[:2])
    if not block.any():
        return None
    return RoiMask((int(low[0]), int(low[1]), int(k0)), block)
