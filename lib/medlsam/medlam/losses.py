"""The two self-supervised MedLAM losses: relative distance regression and multi-scale similarity."""

from __future__ import annotations

import torch
import torch.nn.functional as F

DISTANCE_RATIO_MM = (1500.0, 600.0, 600.0)  # r, (z, y, x) of the localisation grid
MSS_RADII_MM = (12.0, 6.0, 3.0)  # positives at 1/4, 1/2 and full resolution
MSS_TEMPERATURE = 1.0 / 15.0
RDR_SCALE_MM = 100.0  # RDR loss 1.0 = 100 mm RMS error, comparable in size to the MSS loss


def predicted_offset_mm(latent_from: torch.Tensor, latent_to: torch.Tensor) -> torch.Tensor:
    """Physical offset (mm, grid axes) from one patch centre to another: r * tanh(p_to - p_from)."""
    ratio = torch.tensor(DISTANCE_RATIO_MM, dtype=latent_to.dtype, device=latent_to.device)
    return ratio * torch.tanh(latent_to - latent_from)


def rdr_loss(latent_from: torch.Tensor, latent_to: torch.Tensor, offset_mm: torch.Tensor) -> torch.Tensor:
    """MSE between predicted and true offsets in units of RDR_SCALE_MM (a loss in mm^2 would swamp MSS)."""
    return F.mse_loss(predicted_offset_mm(latent_from, latent_to) / RDR_SCALE_MM, offset_mm / RDR_SCALE_MM)


def mss_loss(
    features: list[torch.Tensor],
    augmented: list[torch.Tensor],
    source: torch.Tensor,
    points: torch.Tensor,
    spacing_mm: float,
) -> torch.Tensor:
    """Multi-scale similarity loss for one (patch, augmented patch) pair.

    features, augmented: per scale (C, n, n, n) L2-normalised maps (1/4, 1/2, full resolution).
    source: (3, P, P, P) position of each augmented voxel in the un-augmented patch (voxels).
    points: (N, 3) integer voxel positions in the un-augmented patch.
    """
    patch = source.shape[-1]
    losses = []
    for feat, aug, radius in zip(features, augmented, MSS_RADII_MM):
        stride = patch // feat.shape[-1]
        cells = torch.div(points, stride, rounding_mode="floor")
        centres = (cells.float() + 0.5) * stride - 0.5
        query = feat[:, cells[:, 0], cells[:, 1], cells[:, 2]].T.float()  # (N, C)
        positions = F.avg_pool3d(source[None], stride)[0].reshape(3, -1).T if stride > 1 else source.reshape(3, -1).T
        distance = torch.cdist(centres, positions) * spacing_mm  # (N, M)
        logits = query @ aug.reshape(aug.shape[0], -1).float() / MSS_TEMPERATURE
        positive = distance <= radius
        usable = positive | (distance > 2 * radius)
        keep = positive.any(dim=1)
        if not keep.any():
            continue
        logits = logits[keep].masked_fill(~usable[keep], float("-inf"))
        log_all = torch.logsumexp(logits, dim=1)
        log_pos = torch.logsumexp(logits.masked_fill(~positive[keep], float("-inf")), dim=1)
        losses.append((log_all - log_pos).mean())
    if not losses:
        return source.new_zeros(())
    return torch.stack(losses).mean()
