"""Training patches: centred on a random known organ (``organ_patch_fraction`` of them) or anywhere in the body,
with light intensity augmentation of the CT channel (no flips: a left-right flip would swap paired organs)."""

from __future__ import annotations

import numpy as np
import torch

from medlsam.learn.data import Example

BODY_LEVEL = 0.1  # mapped CT above this is body (about -500 HU)


def _crop(array: np.ndarray, start: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """array[:, start : start + size], zero-padded where it leaves the array."""
    out = np.zeros((array.shape[0], *size), array.dtype)
    lo = np.maximum(start, 0)
    hi = np.minimum(start + np.array(size), array.shape[1:])
    if np.any(hi <= lo):
        return out
    src = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    dst = tuple(slice(int(a - s), int(b - s)) for a, b, s in zip(lo, hi, start))
    out[(slice(None), *dst)] = array[(slice(None), *src)]
    return out


def patch_centre(example: Example, rng: np.random.Generator, organ_fraction: float) -> np.ndarray:
    """A voxel of a random known organ (with probability ``organ_fraction``) or of the body."""
    known = np.flatnonzero(example.known)
    if len(known) and rng.random() < organ_fraction:
        voxels = np.argwhere(example.target[rng.choice(known)])
    else:
        voxels = np.argwhere(example.inputs[0] > BODY_LEVEL)
    if len(voxels) == 0:
        return np.array(example.inputs.shape[1:]) // 2
    return voxels[rng.integers(len(voxels))]


def augment_ct(patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Contrast, brightness and noise on the CT channel (channel 0) only: the priors stay as the localiser gave."""
    patch = patch.copy()
    ct = patch[0] * rng.uniform(0.9, 1.1) + rng.uniform(-0.05, 0.05)
    patch[0] = ct + rng.normal(0.0, rng.uniform(0.0, 0.02), ct.shape).astype(np.float32)
    return patch


def sample_batch(
    examples: list[Example],
    size: tuple[int, int, int],
    batch: int,
    rng: np.random.Generator,
    organ_fraction: float,
    augment: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, targets, known) of ``batch`` patches from random examples; jittered around their centres."""
    xs, ys, ks = [], [], []
    for _ in range(batch):
        ex = examples[rng.integers(len(examples))]
        centre = patch_centre(ex, rng, organ_fraction) + rng.integers(-8, 9, 3) * np.array([1, 1, 1])
        start = centre - np.array(size) // 2
        x = _crop(ex.inputs, start, size)
        xs.append(augment_ct(x, rng) if augment else x)
        ys.append(_crop(ex.target, start, size))
        ks.append(ex.known)
    return (
        torch.from_numpy(np.stack(xs)),
        torch.from_numpy(np.stack(ys)),
        torch.from_numpy(np.stack(ks)),
    )
