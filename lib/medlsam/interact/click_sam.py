"""A SAM candidate for a clicked structure, cheap per click (issue 30): LiteMedSAM slice propagation with one
decoder call per slice and nothing encoded twice for one image.

``SamCache`` (one per image) holds the image's ``SliceEmbeddings`` (each slice encoded once, in memory and, with a
``cache_dir``, on disk) and a memo of decoder calls by (slice, box): a later click re-decodes only the slices whose
box changed. ``sam_candidate`` walks a guide's slice extent (the class-agnostic blob answer,
``medlsam.interact.click_structure``) plus a margin: a seed slice (clicked, not reached from another) takes the
user's box when one was drawn, else the best of the guide's box there and boxes around its clicks (``_seed_mask``),
every other slice the box of its neighbour's mask widened to its foreground clicks; background clicks push the box
edge off them and remove the component under them. A direction stops like ``sam_3d``
(``medlsam.interact.propagation``): an empty mask, a low predicted IoU, an area collapse or blow-up, too little
overlap with the neighbour, or the guide's extent; a background click ends it only where nothing is left on its
slice once the box is pushed off it and its component removed (``sam_3d`` stops at any background click on the
carried mask: a single click on an in-plane leak cut the spleen from 0.95 to 0.61). Where SAM lost the object (not
at its end or a background click), the guide's slices beyond are counted (``SamCache.filled``: the choice of
``medlsam.interact.click_combo`` uses it) and, with ``SamOptions.fill``, taken. Prompts are file voxel indices;
slice pixels are x = column, y = row of ``np.take(volume, k, axis)``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from medlsam.interact.interactive import _exclude, box_around, seed_boxes, seed_score, select_components
from medlsam.interact.propagation import mask_box
from medlsam.utils.geometry import inplane_axes, largest_component

Region = tuple[slice, ...]


@dataclass(frozen=True)
class SamOptions:
    """Tunables of the SAM candidate (those of ``propagation.PropagationOptions``, same defaults)."""

    threshold: float = 0.5  # mask probability threshold
    min_iou: float = 0.5  # a slice without clicks whose predicted IoU is below this ends the direction
    min_area_ratio: float = 0.2  # ... or whose area is below this fraction of its neighbour's
    max_area_ratio: float = 3.0  # ... or above this multiple (a leak)
    min_overlap: float = 0.1  # ... or whose IoU with its neighbour's mask is below this
    box_margin: float = 2.0  # pixels added around the neighbour's mask box
    margin_slices: int = 2  # slices visited beyond the guide's extent on each side
    patch: bool = True  # a clicked slice whose mask misses a foreground click takes the guide's part under it
    fill: bool = False  # where SAM lost the object (low IoU, collapse, leak, empty) the guide's slices go on


@dataclass
class SamCache:
    """Per image: its slice embeddings and a memo of decoded (slice, box) masks; counters for tests and reports."""

    embeddings: object  # medlsam.segment.sam.slices.SliceEmbeddings
    threshold: float = 0.5
    max_decodes: int = 4000  # memo entries (bit-packed masks: 32 kB each on a 512 x 512 slice)
    decodes: OrderedDict = field(default_factory=OrderedDict)
    stops: list = field(default_factory=list)  # the last candidate's (slice, direction, why it ended)
    filled: int = 0  # the last candidate's guide slices beyond where SAM lost the object (taken with ``fill``)
    carried: int = 0  # ... and its slices from SAM
    decoder_calls: int = 0
    decode_hits: int = 0
    encode_seconds: float = 0.0  # time spent encoding slices (or reading them from cache_dir)

    def encode(self, ks) -> float:
        """Encode the slices of ``ks`` not encoded yet (each once per image); returns the seconds it took."""
        tic = time.perf_counter()
        self.embeddings.prefetch(sorted({int(k) for k in ks}))
        seconds = time.perf_counter() - tic
        self.encode_seconds += seconds
        return seconds

    def decode(self, k: int, box: np.ndarray) -> tuple[np.ndarray, float]:
        """(mask, predicted IoU) of slice k prompted with ``box`` (x0, y0, x1, y1, rounded to pixels)."""
        box = np.round(np.asarray(box, np.float64)).astype(int)
        key = (int(k), tuple(box.tolist()))
        stored = self.decodes.get(key)
        if stored is not None:
            self.decode_hits += 1
            self.decodes.move_to_end(key)
            bits, iou = stored
            shape = self.embeddings.slice_shape
            return np.unpackbits(bits, count=shape[0] * shape[1]).reshape(shape).astype(bool), iou
        probs, ious = self.embeddings.decode(int(k), boxes=box[None].astype(np.float64))
        mask, iou = probs[0] > self.threshold, float(ious[0])
        self.decoder_calls += 1
        self.decodes[key] = (np.packbits(mask.ravel()), iou)
        while len(self.decodes) > self.max_decodes:
            self.decodes.popitem(last=False)
        return mask, iou


def _on_slice(points: np.ndarray, axis: int, k: int) -> np.ndarray:
    """(P, 2) x (column), y (row) slice pixels of the voxel ``points`` on slice k."""
    rows, cols = inplane_axes(axis)
    here = points[points[:, axis] == k]
    return np.stack([here[:, cols], here[:, rows]], axis=1).astype(np.float64).reshape(-1, 2)


def _seed_mask(
    cache: SamCache, k: int, guide: np.ndarray | None, fg: np.ndarray, bg: np.ndarray, drawn: np.ndarray | None = None
) -> np.ndarray:
    """The seed slice's mask. With a ``drawn`` box (x0, y0, x1, y1: the user's box in this slice's plane) the mask
    SAM gives for it, as MedSAM is prompted, when it holds the clicks; otherwise, of the guide's box on it (widened to
    its foreground clicks) and boxes of six sizes around the clicks (as ``interactive.best_seed_box``), each pushed
    off the background clicks, the one whose mask answers the clicks best (``interactive.seed_score``: a whole
    object under the clicks, then SAM's predicted IoU). A guide that leaked gives a box too large; the click boxes
    then find the object under the click."""
    shape = cache.embeddings.slice_shape
    if drawn is not None:
        mask, _ = cache.decode(k, _exclude(drawn, bg, fg))
        if all(mask[int(y), int(x)] for x, y in fg):
            return mask
    boxes = seed_boxes(fg, bg, shape)
    if guide is not None and guide.any():
        guided = box_around(np.concatenate([fg, mask_box(guide, 0.0).reshape(2, 2)]), 0.0, shape)
        boxes.insert(0, _exclude(guided, bg, fg))
    best, best_score = np.zeros(shape, bool), -np.inf
    for box in boxes:
        mask, iou = cache.decode(k, box)
        score = seed_score(mask, iou, box, fg, bg)
        if score > best_score:
            best, best_score = mask, score
    return best


def _stop(mask: np.ndarray, prev: np.ndarray, iou: float, clicked: bool, options: SamOptions) -> str:
    """Why the carried mask ends at this slice ('' when it goes on); a slice with foreground clicks only ends on an
    empty mask."""
    area, prev_area = int(mask.sum()), int(prev.sum())
    if area == 0:
        return "empty mask"
    if clicked:
        return ""
    overlap = (mask & prev).sum() / max(1, (mask | prev).sum())
    if iou < options.min_iou:
        return "low predicted IoU"
    if area < options.min_area_ratio * prev_area:
        return "area collapsed" if (mask & prev).sum() < 0.5 * area else "tip"
    if area > options.max_area_ratio * prev_area:
        return "area blew up"
    if overlap < options.min_overlap:
        return "no overlap"
    return ""


def _carry(cache: SamCache, k: int, prev: np.ndarray, fg: np.ndarray, bg: np.ndarray, options: SamOptions):
    """Slice k's (mask, IoU) from the box of its neighbour's mask ``prev``, widened to the slice's foreground
    clicks and pushed off its background clicks; components under background clicks only are removed, and without
    foreground clicks only the largest component is kept."""
    box = mask_box(prev, options.box_margin)
    if len(fg):
        box = box_around(np.concatenate([fg, box.reshape(2, 2)]), 0.0, prev.shape)
    mask, iou = cache.decode(k, _exclude(box, bg, fg))
    mask = select_components(mask, fg, bg)
    if mask.any() and not len(fg):
        mask = largest_component(mask, connectivity=1)
    return mask, iou


LOST = ("low predicted IoU", "area collapsed", "area blew up", "no overlap", "empty mask")  # not the object's end


def _fill(out: dict, seed: int, step: int, limits: tuple[int, int], guide, apply: bool) -> int:
    """How many of the guide's slices lie beyond the last slice SAM carried from ``seed`` in direction ``step`` (up
    to another slice done or the limits); with ``apply`` they are put into ``out``."""
    k = seed
    while k + step in out:
        k += step
    k, filled = k + step, 0
    while limits[0] <= k <= limits[1] and k not in out:
        part = guide(k)
        if part is None or not part.any():
            break
        if apply:
            out[k] = part
        k, filled = k + step, filled + 1
    return filled


def _walk(cache, out: dict, seed: int, step: int, limits: tuple[int, int], clicks, patch, options: SamOptions) -> str:
    """Carry slice ``seed``'s mask in direction ``step`` into ``out`` (slice -> mask) until it ends."""
    prev, k = out[seed], seed + step
    while limits[0] <= k <= limits[1]:
        if k in out:
            return "reached a slice done from another click"
        fg, bg = clicks(k)
        mask, iou = _carry(cache, k, prev, fg, bg, options)
        mask = patch(k, mask, fg)
        if len(bg) and not mask.any():  # the box pushed off the background clicks holds nothing: the object ends
            return "background click on the carried mask"
        reason = _stop(mask, prev, iou, bool(len(fg)), options)
        if reason == "tip":  # the object's tip, inside its neighbour: kept, then the end
            out[k] = mask
        if reason:
            return reason
        out[k], prev, k = mask, mask, k + step
    return "end of the guide's extent"


def sam_candidate(
    cache: SamCache,
    foreground: np.ndarray,
    background: np.ndarray,
    guide: tuple[Region, np.ndarray],
    axis: int,
    box: np.ndarray | None = None,
    options: SamOptions | None = None,
) -> tuple[Region, np.ndarray]:
    """(region, mask on it) of SAM's answer to the clicks (file indices): the slices of the guide's extent along
    ``axis`` plus margin_slices (within ``box`` when given), whole slices in the plane. The first clicked slice is
    the seed (with a box and no click, the box's middle slice); a clicked slice the propagation did not reach starts
    again from its own clicks. The slices needed are encoded first (once per image)."""
    options = options or SamOptions()
    fg_all, bg_all = np.asarray(foreground, int).reshape(-1, 3), np.asarray(background, int).reshape(-1, 3)
    region, mask = guide
    n = cache.embeddings.num_slices
    along = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) + region[axis].start
    seeds = [int(k) for k in dict.fromkeys(fg_all[:, axis])]
    if not seeds:  # a box alone: its middle slice
        seeds = [int(round((box[axis, 0] + box[axis, 1]) / 2))]
    low = min(int(along.min()) if len(along) else n, min(seeds)) - options.margin_slices
    high = max(int(along.max()) if len(along) else 0, max(seeds)) + options.margin_slices
    low, high = max(0, low), min(n - 1, high)
    if box is not None:
        low, high = max(low, int(box[axis, 0])), min(high, int(box[axis, 1]))
    cache.encode(range(low, high + 1))
    shape = cache.embeddings.slice_shape
    full_guide = _guide_slices(region, mask, axis, shape)

    def clicks(k: int) -> tuple[np.ndarray, np.ndarray]:
        return _on_slice(fg_all, axis, k), _on_slice(bg_all, axis, k)

    def patch(k: int, mask: np.ndarray, fg: np.ndarray) -> np.ndarray:
        missed = [p for p in fg if not mask[int(p[1]), int(p[0])]]
        guide_k = full_guide(k) if missed and options.patch else None
        return mask if guide_k is None else mask | select_components(guide_k, np.array(missed), np.zeros((0, 2)))

    out: dict[int, np.ndarray] = {}
    cache.stops, filled = [], 0
    for seed in seeds:
        if seed in out or not low <= seed <= high:
            continue
        fg, bg = clicks(seed)
        seed_mask = _seed_mask(cache, seed, full_guide(seed), fg, bg, None if box is None else _in_plane(box, axis))
        seed_mask = patch(seed, select_components(seed_mask, fg, bg), fg)
        if not seed_mask.any():
            continue
        out[seed] = seed_mask
        for step in (1, -1):
            why = _walk(cache, out, seed, step, (low, high), clicks, patch, options)
            cache.stops.append((seed, step, why))
            if why in LOST:
                filled += _fill(out, seed, step, (low, high), full_guide, options.fill)
    cache.filled, cache.carried = filled, len(out) - (filled if options.fill else 0)
    return _assemble(out, axis, shape, low, high, box)


def _in_plane(box: np.ndarray, axis: int) -> np.ndarray:
    """A (3, 2) voxel box as the slices' (x0, y0, x1, y1) box: x along the slice's columns, y along its rows."""
    rows, cols = inplane_axes(axis)
    return np.array([box[cols, 0], box[rows, 0], box[cols, 1], box[rows, 1]], np.float64)


def _guide_slices(region: Region, mask: np.ndarray, axis: int, shape: tuple[int, int]):
    """k -> the guide's mask on whole slice k (None outside its extent)."""
    rows, cols = inplane_axes(axis)

    def at(k: int) -> np.ndarray | None:
        if not region[axis].start <= k < region[axis].stop:
            return None
        out = np.zeros(shape, bool)
        out[region[rows], region[cols]] = np.take(mask, k - region[axis].start, axis=axis)
        return out

    return at


def _assemble(out: dict, axis: int, shape, low: int, high: int, box: np.ndarray | None) -> tuple[Region, np.ndarray]:
    """The slices' masks as (region, mask): slices low..high along ``axis``, clipped to ``box``."""
    rows, cols = inplane_axes(axis)
    full = [0, 0, 0]
    full[rows], full[cols], full[axis] = shape[0], shape[1], high - low + 1
    mask = np.zeros(tuple(full), bool)
    index: list = [slice(None)] * 3
    for k, part in out.items():
        index[axis] = k - low
        mask[tuple(index)] = part
    region = [slice(0, full[0]), slice(0, full[1]), slice(0, full[2])]
    region[axis] = slice(low, high + 1)
    if box is not None:
        inside = np.zeros(mask.shape, bool)
        inside[tuple(slice(int(lo) - r.start, int(hi) + 1 - r.start) for (lo, hi), r in zip(box, region))] = True
        mask &= inside
    return tuple(region), mask
