"""Coordinate-tracked augmentation for the multi-scale similarity (MSS) task.

An augmented patch is sampled from a larger crop through a random affine + smooth elastic map; the map
itself is returned, so each augmented voxel knows where it came from in the un-augmented patch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_rotation(generator: torch.Generator, max_degrees: float) -> torch.Tensor:
    """A 3x3 rotation: three successive rotations about the axes, each up to `max_degrees`."""
    angles = (torch.rand(3, generator=generator) * 2 - 1) * math.radians(max_degrees)
    rotation = torch.eye(3)
    for axis, angle in enumerate(angles.tolist()):
        c, s = math.cos(angle), math.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        r = torch.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rotation = r @ rotation
    return rotation


def augment_crop(
    crop: torch.Tensor,
    patch: int,
    generator: torch.Generator,
    max_degrees: float = 15.0,
    max_scale: float = 0.1,
    elastic_voxels: float = 1.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp the centre of `crop` (C, S, S, S) into a (C, patch, patch, patch) augmented patch.

    Returns the patch and `source` (3, patch, patch, patch): for every augmented voxel, its position in the
    coordinates of the un-augmented patch (the crop's central `patch`^3 cube). Intensities are remapped
    monotonically (gamma, contrast) and noised.
    """
    size = crop.shape[-1]
    offset = (size - patch) / 2
    centred = torch.arange(patch, dtype=torch.float32) - (patch - 1) / 2
    grid = torch.stack(torch.meshgrid(centred, centred, centred, indexing="ij"), dim=0)  # (3, P, P, P)
    scale = 1 + (torch.rand(3, generator=generator) * 2 - 1) * max_scale
    matrix = random_rotation(generator, max_degrees) * scale[None, :]
    source = torch.einsum("ij,jxyz->ixyz", matrix, grid)
    coarse = (torch.rand(1, 3, 4, 4, 4, generator=generator) * 2 - 1) * elastic_voxels
    source = source + F.interpolate(coarse, size=(patch,) * 3, mode="trilinear", align_corners=True)[0]
    source = source + (size - 1) / 2  # crop coordinates
    normalised = (2 * source / (size - 1) - 1).permute(1, 2, 3, 0).flip(-1)[None]
    warped = F.grid_sample(crop[None], normalised, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    gamma = math.exp((torch.rand(1, generator=generator).item() * 2 - 1) * math.log(1.5))
    contrast = 1 + (torch.rand(1, generator=generator).item() * 2 - 1) * 0.1
    warped = (warped.clamp(0, 1) ** gamma) * contrast
    warped = warped + torch.randn(warped.shape, generator=generator) * 0.02
    return warped, source - offset
