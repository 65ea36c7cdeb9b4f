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

from medlsam.volume import CTVolume

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
class LocalisationGrid:
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


def canonical_affine(volume: CTVolume, spacing: float = GRID_SPACING_MM) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Affine and shape of the world-aligned grid at `spacing` mm that covers the whole volume."""
    n = np.array(volume.shape) - 1
    corners = np.array([[a, b, c] for a in (0, n[0]) for b in (0, n[1]) for c in (0, n[2])], dtype=np.float64)
    canonical = volume.index_to_world(corners) @ CANONICAL_DIRECTIONS  # coordinates along the canonical axes
    low, high = canonical.min(axis=0), canonical.max(axis=0)
    # ceil, not floor: the last grid voxel must reach the scan's far edge (outside samples count as air)
    shape = tuple(int(np.ceil((high[a] - low[a]) / spacing - 1e-6)) + 1 for a in range(3))
    affine = np.eye(4)
    affine[:3, :3] = CANONICAL_DIRECTIONS * spacing
    affine[:3, 3] = CANONICAL_DIRECTIONS @ low
    return affine, shape  # type: ignore[return-value]


def resample_to_grid(values: np.ndarray, volume: CTVolume, affine: np.ndarray, shape: tuple[int, int, int],
                     fill: float, mode: str = "bilinear") -> np.ndarray:
    """Sample `values` (in the volume's voxel order) on the grid (affine, shape) with torch."""
    zz, yy, xx = (torch.arange(s, dtype=torch.float64) for s in shape)
    grid_points = torch.stack(torch.meshgrid(zz, yy, xx, indexing="ij"), dim=-1).reshape(-1, 3)
    to_index = np.linalg.inv(volume.affine) @ affine
    index = grid_points @ torch.from_numpy(to_index[:3, :3].T) + torch.from_numpy(to_index[:3, 3])
    size = torch.tensor(volume.shape, dtype=torch.float64)
    normalised = (2 * index / (size - 1).clamp(min=1) - 1).flip(-1)  # grid_sample wants (x, y, z) = (k, j, i)
    source = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))[None, None] - fill
    sampled = F.grid_sample(source, normalised.float().reshape(1, *shape, 3), mode=mode, padding_mode="zeros",
                            align_corners=True)
    return (sampled[0, 0] + fill).numpy()


def to_localisation_grid(volume: CTVolume, spacing: float = GRID_SPACING_MM) -> LocalisationGrid:
    """Resample a CT (HU) to the canonical grid and apply the HU map; outside the scan counts as air."""
    affine, shape = canonical_affine(volume, spacing)
    hu = volume.array.astype(np.float32, copy=False)
    factors = spacing / volume.spacing
    if np.any(factors > 1.5):  # anti-alias before a strong down-sampling
        from scipy.ndimage import gaussian_filter

        hu = gaussian_filter(hu, sigma=np.where(factors > 1.5, 0.4 * factors, 0.0))
    sampled = resample_to_grid(hu, volume, affine, shape, fill=-1024.0)
    return LocalisationGrid(array=map_hu(sampled), affine=affine, source=volume)
