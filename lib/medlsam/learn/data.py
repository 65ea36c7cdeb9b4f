"""Labelled scans brought to the model grid: image + prior channels, one mask per organ, and which organs the
label knows (a label without an organ's voxels did not draw it: it teaches that organ nothing)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medlsam.io.volume import CTVolume
from medlsam.learn.fewshot import Priors, dense
from medlsam.learn.grid import ModelGrid, image_channel, label_on_grid, model_grid
from medlsam.learn.options import LearnError


@dataclass
class Example:
    """One scan on the model grid."""

    inputs: np.ndarray  # (1 + organs with prior channels, z, y, x) float32: the mapped CT, then the priors
    target: np.ndarray  # (organs, z, y, x) uint8 (zeros where unknown)
    known: np.ndarray  # (organs,) bool: organs this label drew
    grid: ModelGrid
    source: str = ""


def organ_values(names: dict[int, str], organs: list[str], label: np.ndarray, source: str) -> dict[str, int]:
    """This label's value of each organ it names; voxels of an unnamed value are an error naming them."""
    present = {int(v) for v in np.unique(label)} - {0}
    unnamed = sorted(present - set(names))
    if unnamed:
        raise LearnError(f"{source}: label value(s) {unnamed} have no organ name (names: {names})")
    unknown = sorted(set(names.values()) - set(organs))
    if unknown:
        raise LearnError(f"{source}: organ(s) {unknown} are not among the model's organs {organs}")
    return {name: value for value, name in names.items()}


def prior_inputs(priors: Priors, organs: list[str], volume: CTVolume, grid: ModelGrid) -> np.ndarray:
    """The priors of ``organs`` (zeros where none) on the model grid, (organs, z, y, x)."""
    on_file = dense(priors, organs, volume.shape)
    return np.stack([grid.sample(p, volume, fill=0.0) for p in on_file]).astype(np.float32)


def scan_inputs(
    volume: CTVolume, priors: Priors | None, organs: list[str], spacing: tuple[float, float, float]
) -> tuple[np.ndarray, ModelGrid]:
    """The network's input for a scan: the mapped CT and (when ``priors`` is not None) one prior channel per organ."""
    grid = model_grid(volume, spacing)
    channels = [image_channel(volume, grid)[None]]
    if priors is not None:
        channels.append(prior_inputs(priors, organs, volume, grid))
    return np.concatenate(channels).astype(np.float32), grid


def example(
    volume: CTVolume,
    label: CTVolume,
    names: dict[int, str],
    organs: list[str],
    priors: Priors | None,
    spacing: tuple[float, float, float],
) -> Example:
    """A labelled scan on the model grid; organs without voxels in ``label`` are unknown, never absent."""
    if label.shape != volume.shape:
        raise LearnError(f"{label.source}: label shape {label.shape} differs from its image's {volume.shape}")
    values = organ_values(names, organs, label.array, label.source or "label")
    inputs, grid = scan_inputs(volume, priors, organs, spacing)
    on_grid = label_on_grid(label, grid)
    target = np.zeros((len(organs), *grid.shape), np.uint8)
    known = np.zeros(len(organs), bool)
    for o, name in enumerate(organs):
        if name in values and np.any(label.array == values[name]):
            target[o] = on_grid == values[name]
            known[o] = bool(target[o].any())
    return Example(inputs=inputs, target=target, known=known, grid=grid, source=volume.source)
