"""The localisation grid: any CT brought to one canonical orientation at 3 mm, and exact maps back.

Canonical array axes are (z, y, x) = (superior->inferior, anterior->posterior, right->left), the
cranio-caudal axis first as in MedLAM's distance ratio [1500, 600, 600]. The grid is aligned with the
world axes, so oblique and permuted scans are handled by one resampling with an exact inverse.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medlsam.io.volume import CTVolume

GRID_SPACING_MM = 3.0
# Columns: the world LPS direction of canonical axes z (towards inferior), y (posterior), x (left).
CANONICAL_DIRECTIONS = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
HU_POINTS = (-1000.0, -200.0, 200.0, 1500.0)
MAPPED_POINTS = (0.0, 0.2, 0.8, 1.0)


def map_hu(hu: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Piecewise-linear HU map [-1000, -200, 200, 1500] -> [0, 0.2, 0.8, 1], clamped outside."""
    if isinstance(hu, torch.Tensor):
        out = torch.zeros_like(hu, dtype=torch.float32)
        for (h0, h1), (m0, m1) in zip(zip(HU_POINTS[:-1], HU_POINTS[1:]), zip(MAPPED_POINTS[:-1], MAPPED_POINTS[1:])):
            inside = (hu >= h0) & (hu < h1)
            out = torch.where(inside, m0 + (hu - h0) * (m1 - m0) / (h1 - h0), out)
        return torch.where(hu >= HU_POINTS[-1], torch.ones_like(out), out)
    return np.interp(hu, HU_POINTS, MAPPED_POINTS).astype(np.float32)


@dataclass
class LocalizationGrid:
    """A scan resampled to the canonical 3 mm grid, with the maps between grid, file and world."""

    array: np.ndarray  # (z, y, x) float32 in [0, 1] after the HU map
    affine: np.ndarray  # 4x4: world_lps = affine @ [z, y, x, 1]
    source: CTVolume

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    def to_world(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) grid coordinates -> (N, 3) world LPS mm."""
        points = np.atleast_2d(np.asarray(points, dtype=np.float64))
        return points @ self.affine[:3, :3].T + self.affine[:3, 3]

    def from_world(self, world: np.ndarray) -> np.ndarray:
        """(N, 3) world LPS mm -> (N, 3) fractional grid coordinates."""
        world = np.atleast_2d(np.asarray(world, dtype=np.float64))
        return (world - self.affine[:3, 3]) @ np.linalg.inv(self.affine[:3, :3]).T

    def to_file_index(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) grid coordinates -> (N, 3) fractional voxel indices of the original file."""
        return self.source.world_to_index(self.to_world(points))

    def from_file_index(self, index: np.ndarray) -> np.ndarray:
        """(N, 3) voxel indices of the original file -> (N, 3) fractional grid coordinates."""
        return self.from_world(self.source.index_to_world(index))

    def box_to_file(self, low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """An axis-aligned grid box (fractional corners) -> inclusive integer voxel box in the file.

        All 8 corners are mapped, so the result encloses the box for any orientation; it is clipped
        to the file's extent.
        """
        corners = np.array([[a[0], b[1], c[2]] for a in (low, high) for b in (low, high) for c in (low, high)])
        index = self.to_file_index(corners)
        shape = np.array(self.source.shape)
        lo = np.clip(np.round(index.min(axis=0)), 0, shape - 1).astype(int)
        hi = np.clip(np.round(index.max(axis=0)), 0, shape - 1).astype(int)
        return lo, hi

    def file_box_to_grid(self, low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """An inclusive voxel box of the file -> the enclosing fractional grid box."""
        corners = np.array([[a[0], b[1], c[2]] for a in (low, high) for b in (low, high) for c in (low, high)])
        points = self.from_file_index(corners)
        return points.min(axis=0), points.max(axis=0)


def canonical_affine(
    volume: CTVolume, spacing: float = GRID_SPACING_MM, index_box: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Affine and shape of the world-aligned grid at `spacing` mm that covers the whole volume.

    With `index_box` (inclusive source indices), only that part is covered, on the same lattice as the
    whole-volume grid, so the cropped grid's values are those of the whole grid."""
    n = np.array(volume.shape) - 1
    corners = np.array([[a, b, c] for a in (0, n[0]) for b in (0, n[1]) for c in (0, n[2])], dtype=np.float64)
    canonical = volume.index_to_world(corners) @ CANONICAL_DIRECTIONS  # coordinates along the canonical axes
    low, high = canonical.min(axis=0), canonical.max(axis=0)
    if index_box is not None:
        lo, hi = (np.asarray(b, dtype=np.float64) for b in index_box)
        box = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
        inside = volume.index_to_world(box) @ CANONICAL_DIRECTIONS
        low = low + np.floor((np.maximum(inside.min(axis=0), low) - low) / spacing + 1e-6) * spacing
        high = np.minimum(inside.max(axis=0), high)
    # ceil, not floor: the last grid voxel must reach the scan's far edge (outside samples count as air)
    shape = tuple(int(np.ceil((high[a] - low[a]) / spacing - 1e-6)) + 1 for a in range(3))
    affine = np.eye(4)
    affine[:3, :3] = CANONICAL_DIRECTIONS * spacing
    affine[:3, 3] = CANONICAL_DIRECTIONS @ low
    return affine, shape  # type: ignore[return-value]


def body_index_box(volume: CTVolume, margin_mm: float = 30.0) -> tuple[np.ndarray, np.ndarray] | None:
    """Inclusive source-index box of everything denser than air (-500 HU), widened by `margin_mm`."""
    dense = volume.array > -500
    extents = []
    for axis in range(3):
        hits = np.flatnonzero(dense.any(axis=tuple(a for a in range(3) if a != axis)))
        if len(hits) == 0:
            return None
        extents.append((hits[0], hits[-1]))
    margin = np.ceil(margin_mm / volume.spacing)
    lo = np.maximum(np.array([e[0] for e in extents]) - margin, 0)
    hi = np.minimum(np.array([e[1] for e in extents]) + margin, np.array(volume.shape) - 1)
    return lo, hi


def resample_to_grid(
    values: np.ndarray,
    volume: CTVolume,
    affine: np.ndarray,
    shape: tuple[int, int, int],
    fill: float,
    mode: str = "bilinear",
) -> np.ndarray:
    """Sample `values` (in the volume's voxel order) on the grid (affine, shape) with torch."""
    to_index = np.linalg.inv(volume.affine) @ affine  # grid index -> source index, homogeneous
    out_half = (np.array(shape, dtype=np.float64) - 1).clip(min=1) / 2
    in_half = (np.array(volume.shape, dtype=np.float64) - 1).clip(min=1) / 2
    from_normalised = np.diag([*out_half, 1.0])
    from_normalised[:3, 3] = out_half
    to_normalised = np.diag([*(1 / in_half), 1.0])
    to_normalised[:3, 3] = -1
    theta = to_normalised @ to_index @ from_normalised  # normalised grid -> normalised source, array order
    reverse = np.eye(4)[[2, 1, 0, 3]]  # grid_sample orders coordinates (x, y, z) = last axis first
    theta = torch.from_numpy((reverse @ theta @ reverse)[:3]).float()
    coords = F.affine_grid(theta[None], [1, 1, *shape], align_corners=True)
    source = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))[None, None] - fill
    sampled = F.grid_sample(source, coords, mode=mode, padding_mode="zeros", align_corners=True)
    return (sampled[0, 0] + fill).numpy()


def to_localization_grid(volume: CTVolume, spacing: float = GRID_SPACING_MM) -> LocalizationGrid:
    """Resample a CT (HU) to the canonical grid and apply the HU map; outside the scan counts as air."""
    affine, shape = canonical_affine(volume, spacing, body_index_box(volume))  # air far from the body: cropped
    hu = volume.array.astype(np.float32, copy=False)
    factors = spacing / volume.spacing
    if np.any(factors > 1.5):  # anti-alias before a strong down-sampling
        from scipy.ndimage import gaussian_filter

        hu = gaussian_filter(hu, sigma=np.where(factors > 1.5, 0.4 * factors, 0.0))
    sampled = resample_to_grid(hu, volume, affine, shape, fill=-1024.0)
    return LocalizationGrid(array=map_hu(sampled), affine=affine, source=volume)
