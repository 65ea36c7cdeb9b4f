"""Dice + binary cross-entropy per organ, each organ's loss masked where the label does not know it: a label that
did not draw an organ teaches that organ nothing (it is never taught "absent")."""

from __future__ import annotations

import torch
import torch.nn.functional as F

SMOOTH = 1.0


def masked_loss(logits: torch.Tensor, target: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Mean over the (sample, organ) pairs with ``known`` true of soft Dice loss + BCE; 0 (with a gradient of 0)
    when no pair is known. logits, target: (B, O, z, y, x); known: (B, O) bool."""
    target = target.float()
    weight = known.float()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=(2, 3, 4))
    p = torch.sigmoid(logits)
    inter = (p * target).sum(dim=(2, 3, 4))
    soft_dice = (2 * inter + SMOOTH) / (p.sum(dim=(2, 3, 4)) + target.sum(dim=(2, 3, 4)) + SMOOTH)
    per_pair = (1.0 - soft_dice) + bce
    return (per_pair * weight).sum() / weight.sum().clamp(min=1.0)
