"""A class-agnostic structure from all of its prompts (issue 30): the union of the blobs under its foreground
clicks (``medlsam.interact.click_any.grow_blob``; the box's blob when it has only a box), split along its narrowest
necks against the background clicks that fall inside it (one marker watershed on its distance map), the foreground side
kept, the box bounding it.

``AnyCache`` (one per image) makes a click cheap: each click's blob is grown once and kept, and a structure whose
prompts did not change since the last request is answered from the cache without any work (Slicer and OHIF send
every click of every structure with each request).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from medlsam.interact.click_any import (
    AnyOptions,
    AnyPrompts,
    _block_mean,
    _component_at,
    _upsample,
    box_fit,
    box_seeds,
    grow_blob,
)
from medlsam.utils.geometry import enclosing, within

Region = tuple[slice, ...]


@dataclass
class AnyCache:
    """Per image: blobs by (click, box), each structure's last prompts and answer; counters for tests and reports."""

    max_blobs: int = 256
    blobs: OrderedDict = field(default_factory=OrderedDict)
    structures: dict = field(default_factory=dict)
    blob_runs: int = 0  # blobs grown
    structure_runs: int = 0  # structures computed
    structure_hits: int = 0  # structures answered from the cache

    def seed(self, hu, spacing, box: np.ndarray, axis: int, options: AnyOptions) -> np.ndarray:
        """The click a box alone stands for, once per box: of the candidates (``click_any.box_seeds``) the one whose
        blob answers the box best (``click_any.box_fit``)."""
        key = ("seed", box.tobytes(), options)
        if key not in self.blobs:
            seeds = box_seeds(hu, spacing, box, axis, options)
            fits = [box_fit(*self.blob(hu, spacing, at, box, axis, options), box) for at in seeds]
            self.blobs[key] = seeds[int(np.argmax(fits))]
        return self.blobs[key]

    def blob(self, hu, spacing, at, box, axis: int, options: AnyOptions) -> tuple[Region, np.ndarray]:
        key = (tuple(int(v) for v in at), None if box is None else box.tobytes(), options)
        if key not in self.blobs:
            self.blobs[key] = grow_blob(hu, spacing, at, box, axis, options)
            self.blob_runs += 1
            while len(self.blobs) > self.max_blobs:
                self.blobs.popitem(last=False)
        self.blobs.move_to_end(key)
        return self.blobs[key]


def _prompt_key(prompts: AnyPrompts, options: AnyOptions) -> tuple:
    box = None if prompts.box is None else prompts.box.tobytes()
    return (np.asarray(prompts.foreground, int).tobytes(), np.asarray(prompts.background, int).tobytes(), box, options)


def _union(parts: list[tuple[Region, np.ndarray]]) -> tuple[Region, np.ndarray]:
    region = enclosing([r for r, _ in parts])
    mask = np.zeros(tuple(s.stop - s.start for s in region), bool)
    for where, part in parts:
        mask[within(where, region)] |= part
    return region, mask


def _bounded(blobs: list, clicks: np.ndarray, spacing, options: AnyOptions) -> list[tuple[Region, np.ndarray]]:
    """A later click's blob is kept within the ball of later_reach times the earlier blobs' equivalent radius
    around its click (a click near the edge whose band leaked): a correction stays local."""
    spacing = np.asarray(spacing, np.float64)
    out, volume = [], 0.0
    for (region, blob), click in zip(blobs, clicks):
        size = float(blob.sum()) * float(np.prod(spacing))
        radius = options.later_reach * (3.0 * volume / (4.0 * np.pi)) ** (1.0 / 3.0)
        if out and size > (4.0 / 3.0) * np.pi * radius**3:
            grids = np.ogrid[tuple(slice(s.start, s.stop) for s in region)]
            near = sum(((g - c) * d) ** 2 for g, c, d in zip(grids, click, spacing)) <= radius**2
            blob = _component_at(blob & near, (click - np.array([s.start for s in region]))[None])
            size = float(blob.sum()) * float(np.prod(spacing))
        out.append((region, blob))
        volume += size
    return out


def split_background(
    mask: np.ndarray, fg: np.ndarray, bg: np.ndarray, spacing, budget: int, hu: np.ndarray | None = None, margin=20.0
) -> np.ndarray:
    """``mask`` without the parts on the background clicks' side of its narrowest necks: a marker watershed of the
    distance map from the foreground clicks (1) and the background clicks inside the mask (2), limited to the voxels
    nearer to a background click than to any foreground click (one click never takes the structure away) and, with
    ``hu`` (the mask's crop), to those whose smoothed HU is not nearer (by ``margin``) to the foreground clicks' than
    to the nearest background click's. Masks above ``budget`` voxels are split on blocks of the slice plane (the
    finest axes) and the result repeated back."""
    from skimage.segmentation import watershed

    inside = bg[mask[tuple(bg.T)]] if len(bg) else bg
    if not len(inside) or not len(fg):
        return mask
    spacing = np.asarray(spacing, np.float64)
    factor = max(1, int(np.ceil(np.sqrt(mask.size / budget))))
    step = np.where(spacing <= np.sort(spacing)[1], factor, 1)
    small = _block_mean(mask, step) > 0.5 if factor > 1 else mask
    limit = np.array(small.shape) - 1
    fg_at, bg_at = np.minimum(fg // step, limit), np.minimum(inside // step, limit)
    markers = np.zeros(small.shape, np.int32)
    markers[tuple(bg_at.T)] = 2
    markers[tuple(fg_at.T)] = 1  # a block holding both kinds stays with the foreground
    depth = ndimage.distance_transform_edt(small, sampling=spacing * step)
    regions = watershed(-depth, markers, mask=small | (markers > 0))
    # never past halfway: a voxel nearer to a foreground click than to every background click stays
    near_fg = ndimage.distance_transform_edt(markers != 1, sampling=spacing * step)
    near_bg, nearest = ndimage.distance_transform_edt(markers != 2, sampling=spacing * step, return_indices=True)
    removed = (regions == 2) & (near_bg < near_fg)
    if hu is not None:  # ... and a voxel that looks like the foreground, not like the background click, stays
        smooth = ndimage.gaussian_filter(_block_mean(hu, step), sigma=1.5 / (spacing * step))
        smooth = np.pad(smooth, [(0, n - m) for n, m in zip(small.shape, smooth.shape)], mode="edge")
        like_fg = float(np.median(smooth[tuple(fg_at.T)]))
        like_bg = smooth[tuple(nearest)]
        removed &= ~(np.abs(smooth - like_fg) + margin < np.abs(smooth - like_bg))
    return mask & ~_upsample(removed, step, mask.shape)


def segment_structure(
    hu: np.ndarray,
    spacing,
    prompts: AnyPrompts,
    axis: int = 2,
    options: AnyOptions | None = None,
    cache: AnyCache | None = None,
    name: str = "",
) -> tuple[Region, np.ndarray]:
    """(region, mask on it) of the structure the prompts point at (file indices, checked by
    ``medlsam.interact.click_any.check_prompts``). With a ``cache``, a structure ``name`` whose prompts are those of
    its last call is answered from it."""
    options = options or AnyOptions()
    cache = cache if cache is not None else AnyCache()
    key = _prompt_key(prompts, options)
    stored = cache.structures.get(name)
    if stored is not None and stored[0] == key:
        cache.structure_hits += 1
        return stored[1], stored[2].copy()
    fg = np.asarray(prompts.foreground, int).reshape(-1, 3)
    bg = np.asarray(prompts.background, int).reshape(-1, 3)
    if prompts.box is not None:  # a box stands for a click at its centre, kept under the later clicks
        fg = np.concatenate([cache.seed(hu, spacing, prompts.box, axis, options)[None], fg])
    region, mask = _union(
        _bounded([cache.blob(hu, spacing, at, prompts.box, axis, options) for at in fg], fg, spacing, options)
    )
    origin = np.array([s.start for s in region])
    local_bg = bg - origin
    local_bg = local_bg[np.all((local_bg >= 0) & (local_bg < np.array(mask.shape)), axis=1)]
    mask = split_background(mask, fg - origin, local_bg, spacing, options.grid_voxels, hu[region])
    mask = _component_at(mask, fg - origin)
    mask[tuple((fg - origin).T)] = True
    mask[tuple(local_bg.T)] = False
    cache.structure_runs += 1
    cache.structures[name] = (key, region, mask.copy())
    return region, mask
