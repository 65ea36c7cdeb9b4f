"""The model grid: a scan in the canonical orientation (``medlsam.io.grid``: z superior->inferior,
y anterior->posterior, x right->left) at the model's per-axis spacing, cropped to the body; and the exact maps to and
from the scan's own voxels, so any file orientation gives the network the same view."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medlsam.io.grid import CANONICAL_DIRECTIONS, body_index_box, map_hu, resample_to_grid
from medlsam.io.volume import CTVolume

BODY_MARGIN_MM = 20.0


@dataclass
class ModelGrid:
    """Where the model grid lies: voxel index (z, y, x) -> world LPS mm, and its shape."""

    affine: np.ndarray
    shape: tuple[int, int, int]

    def sample(self, values: np.ndarray, volume: CTVolume, fill: float, mode: str = "bilinear") -> np.ndarray:
        """``values`` (in ``volume``'s voxel order) sampled on this grid."""
        return resample_to_grid(values, volume, self.affine, self.shape, fill=fill, mode=mode)

    def to_file(self, values: np.ndarray, volume: CTVolume, fill: float = 0.0) -> np.ndarray:
        """Values on this grid sampled at ``volume``'s voxels (trilinear; ``fill`` outside the grid)."""
        here = CTVolume(array=values, affine=self.affine)
        return resample_to_grid(values, here, volume.affine, volume.shape, fill=fill)


def model_grid(volume: CTVolume, spacing: tuple[float, float, float]) -> ModelGrid:
    """The canonical grid at ``spacing`` (mm along z, y, x) covering the scan's body (everything denser than air,
    with ``BODY_MARGIN_MM``; the whole scan when no body is seen)."""
    spacing_v = np.asarray(spacing, dtype=np.float64)
    box = body_index_box(volume, BODY_MARGIN_MM)
    lo, hi = box if box is not None else (np.zeros(3), np.array(volume.shape) - 1.0)
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    canonical = volume.index_to_world(corners) @ CANONICAL_DIRECTIONS
    low, high = canonical.min(axis=0), canonical.max(axis=0)
    shape = tuple(int(np.ceil((high[a] - low[a]) / spacing_v[a] - 1e-6)) + 1 for a in range(3))
    affine = np.eye(4)
    affine[:3, :3] = CANONICAL_DIRECTIONS * spacing_v[None, :]
    affine[:3, 3] = CANONICAL_DIRECTIONS @ low
    return ModelGrid(affine=affine, shape=shape)  # type: ignore[arg-type]


def image_channel(volume: CTVolume, grid: ModelGrid) -> np.ndarray:
    """The CT on the model grid, HU mapped to [0, 1] as MedLAM sees it (``medlsam.io.grid.map_hu``)."""
    return map_hu(grid.sample(volume.array.astype(np.float32, copy=False), volume, fill=-1024.0))


def label_on_grid(label: CTVolume, grid: ModelGrid) -> np.ndarray:
    """A label volume's values on the model grid (nearest voxel)."""
    return np.rint(grid.sample(label.array.astype(np.float32), label, fill=0.0, mode="nearest")).astype(np.int32)
