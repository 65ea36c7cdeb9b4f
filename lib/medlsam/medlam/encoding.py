"""Encoding points of a scan with MedLAM: latent points, and feature kernels read from shared patches.

Nearby points share one patch (greedy clustering), so the network runs a handful of times per scan
rather than once per point. The patch centre lies within `reach` voxels of every point it serves.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medlsam.io.grid import LocalizationGrid
from medlsam.medlam.network import MedLAM
from medlsam.medlam.patches import cut_patch
from medlsam.medlam.precision import use_bf16

KERNEL_SIZES = (3, 5, 5)  # feature kernel per scale (1/4, 1/2, full): 36, 30 and 15 mm
STRIDES = (4, 2, 1)


def cluster_points(points: np.ndarray, reach: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Group (N, 3) grid points into patches: [(centre, indices)], every point within `reach` of its centre."""
    remaining = list(np.argsort(points[:, 0], kind="stable"))
    clusters = []
    while remaining:
        first = points[remaining[0]]
        members = [
            i
            for i in remaining
            if 0 <= points[i, 0] - first[0] <= 2 * reach and np.all(np.abs(points[i, 1:] - first[1:]) <= reach)
        ]
        chosen = points[members]
        centre = np.round((chosen.min(axis=0) + chosen.max(axis=0)) / 2).astype(int)
        clusters.append((centre, np.array(members)))
        remaining = [i for i in remaining if i not in set(members)]
    return clusters


def precision(model: MedLAM, bf16: bool | None) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on the model's device when asked (None: where it is native; inference only), else
    nothing."""
    device = next(model.parameters()).device
    enabled = use_bf16(bf16, device)
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


@torch.no_grad()
def encode_latents(
    model: MedLAM, grid: LocalizationGrid, centres: np.ndarray, batch: int = 8, bf16: bool | None = False
) -> np.ndarray:
    """(N, 3) latent points of the patches centred at (N, 3) integer grid positions."""
    size = model.config.patch_size
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(centres), batch):
        patches = np.stack([cut_patch(grid.array, c, size) for c in centres[start : start + batch]])
        with precision(model, bf16):
            bottom = model.bottleneck(torch.from_numpy(patches)[:, None].to(device))
        # the latent head stays in float32: bf16's 8-bit mantissa would move jumps of ~1 m by several mm
        out.append(model.latent_head(bottom.float()).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 3), np.float32)


@dataclass
class PatchFeatures:
    """Multi-scale feature maps of one patch and where the patch sits in the grid."""

    origin: np.ndarray  # grid position of the patch's voxel (0, 0, 0)
    maps: list[torch.Tensor]  # per scale (C, n, n, n)

    def kernel(self, point: np.ndarray, scale: int) -> torch.Tensor:
        """(C, k, k, k) features around a grid point at one scale (zero outside the patch)."""
        return self.window(point, scale, KERNEL_SIZES[scale] // 2)

    def window(self, point: np.ndarray, scale: int, half: int) -> torch.Tensor:
        """(C, 2h+1, 2h+1, 2h+1) features of the cells around a grid point at one scale."""
        fmap = self.maps[scale]
        cell = np.round((np.asarray(point) - self.origin + 0.5) / STRIDES[scale] - 0.5).astype(int)
        lo = cell - half
        size = 2 * half + 1
        out = fmap.new_zeros((fmap.shape[0], size, size, size))
        src_lo = np.maximum(lo, 0)
        src_hi = np.minimum(lo + size, fmap.shape[1:])
        if np.any(src_hi <= src_lo):
            return out
        d = src_lo - lo
        e = d + (src_hi - src_lo)
        out[:, d[0] : e[0], d[1] : e[1], d[2] : e[2]] = fmap[
            :, src_lo[0] : src_hi[0], src_lo[1] : src_hi[1], src_lo[2] : src_hi[2]
        ]
        return out

    def cell_of(self, point: np.ndarray, scale: int) -> np.ndarray:
        return np.round((np.asarray(point) - self.origin + 0.5) / STRIDES[scale] - 0.5).astype(int)


@torch.no_grad()
def encode_patches(
    model: MedLAM,
    grid: LocalizationGrid,
    centres: list[np.ndarray],
    batch: int = 4,
    scales: int = 3,
    bf16: bool | None = False,
) -> list[PatchFeatures]:
    """Feature maps (the first `scales` of 1/4, 1/2, full) of patches centred at the given grid positions."""
    size = np.array(model.config.patch_size)
    device = next(model.parameters()).device
    results = []
    for start in range(0, len(centres), batch):
        chunk = centres[start : start + batch]
        patches = torch.from_numpy(np.stack([cut_patch(grid.array, c, size) for c in chunk]))[:, None]
        with precision(model, bf16):
            features = model.features(patches.to(device), scales)
        for i, centre in enumerate(chunk):
            results.append(
                PatchFeatures(origin=np.asarray(centre) - size // 2, maps=[f[i].float().cpu() for f in features])
            )
    return results


def _similarity_at(
    patch: PatchFeatures, points: np.ndarray, kernel: torch.Tensor, scale: int, positions: torch.Tensor
) -> torch.Tensor:
    """Mean cosine similarity of each point's kernel at (P, n, n, n, 3) grid positions near the point.

    The similarity is computed on the scale's cells around each point by one grouped convolution and
    read at the positions by trilinear interpolation.
    """
    stride, half = STRIDES[scale], kernel.shape[-1] // 2
    spread = float((positions - torch.from_numpy(points).float()[:, None, None, None]).abs().max())
    reach = int(np.ceil(spread / stride)) + 1
    windows = torch.stack([patch.window(p, scale, reach + half) for p in points])  # (P, C, W, W, W)
    count = len(points)
    similarity = F.conv3d(windows.reshape(1, -1, *windows.shape[2:]), kernel, groups=count)[0]
    similarity = similarity / kernel[0, 0].numel()  # (P, O, O, O): mean cosine over the kernel voxels
    first_cell = torch.from_numpy(np.stack([patch.cell_of(p, scale) for p in points]) - reach).float()
    cells = (positions - torch.from_numpy(patch.origin).float() + 0.5) / stride - 0.5
    rel = cells - first_cell[:, None, None, None, :]
    normalised = (2 * rel / max(similarity.shape[-1] - 1, 1) - 1).flip(-1)
    return F.grid_sample(similarity[:, None], normalised, mode="bilinear", padding_mode="border", align_corners=True)[
        :, 0
    ]


def _cube(centres: np.ndarray, radius: int) -> torch.Tensor:
    """(P, n, n, n, 3) integer positions within `radius` of each centre."""
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    cube = torch.stack(torch.meshgrid(offsets, offsets, offsets, indexing="ij"), dim=-1)
    return torch.from_numpy(centres).float()[:, None, None, None] + cube[None]


def refine_points(
    patch: PatchFeatures, points: np.ndarray, kernels: list[torch.Tensor], radius: int, fine_radius: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Move (P, 3) grid points to the best match of their template kernels (per scale (P, C, k, k, k)).

    Coarse to fine: the 1/4 and 1/2 scales are summed over a cube of `radius` voxels; the full-resolution
    scale, when given, is added within `fine_radius` of that optimum. Returns the new points and their mean
    similarity over the scales used.
    """
    points = np.round(np.asarray(points)).astype(int)
    rows = torch.arange(len(points))

    def best(positions: torch.Tensor, total: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        flat = total.reshape(len(points), -1).argmax(dim=1)
        return positions.reshape(len(points), -1, 3)[rows, flat].round().int().numpy(), total.reshape(len(points), -1)[
            rows, flat
        ]

    coarse_scales = min(2, len(kernels))
    positions = _cube(points, radius)
    total = sum(_similarity_at(patch, points, kernels[s], s, positions) for s in range(coarse_scales))
    found, score = best(positions, total)
    if len(kernels) > coarse_scales:
        positions = _cube(found, fine_radius)
        total = sum(_similarity_at(patch, found, kernels[s], s, positions) for s in range(len(kernels)))
        found, score = best(positions, total)
    return found, score.numpy() / len(kernels)
