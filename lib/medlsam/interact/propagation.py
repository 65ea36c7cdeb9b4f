"""3D interactive segmentation: the prompts on the first clicked slice (the seed), then the mask carried slice
by slice in both directions, each slice prompted with the box of its neighbour's mask (for point-trained SAMs
also a foreground point at the neighbour mask's most interior pixel; plus any user clicks on that slice), until
the object ends: an empty mask, a predicted IoU below ``min_iou``, an area collapse or blow-up against the
neighbour, too little overlap with the neighbour, the roi's extent along the axis, or ``max_slices``.

Every slice with a foreground click anchors the result: one reached keeps the propagation going with its box
widened to its clicks (plus the object under a click SAM left out); one not reached is prompted with the box
of the nearest slice done, widened to its clicks, and carried both ways into the slices still empty. A
background click on the mask being carried ends that direction there; elsewhere it pushes the box off and
removes the component it falls in. So a later click changes only the slices from its own outward, and the
earlier clicks' result stays. Prompts and slices follow ``medlsam.interact.interactive``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from medlsam.interact.interactive import (
    Prompts,
    best_seed_box,
    box_around,
    check_roi_size,
    clip_to_box,
    seed_slice,
    segment_slice,
    select_components,
    slice_mask,
    slice_prompt,
    uses_points,
)
from medlsam.utils import cancel
from medlsam.utils.geometry import largest_component


def _interior_point(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) of the mask pixel farthest from its border: inside even for concave shapes."""
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    r, c = np.unravel_index(int(np.argmax(dist)), mask.shape)
    return float(c), float(r)


def mask_box(mask: np.ndarray, margin: float) -> np.ndarray:
    """The (x0, y0, x1, y1) box of a 2D mask grown by ``margin`` pixels, inside the slice."""
    rows, cols = np.nonzero(mask)
    h, w = mask.shape
    return np.array(
        [
            max(0.0, cols.min() - margin),
            max(0.0, rows.min() - margin),
            min(w - 1.0, cols.max() + margin),
            min(h - 1.0, rows.max() + margin),
        ]
    )


@dataclass
class PropagationOptions:
    threshold: float = 0.5  # mask probability threshold
    min_iou: float = 0.5  # stop when SAM's predicted IoU drops below this
    min_area_ratio: float = 0.2  # stop when the mask shrinks below this fraction of its neighbour's
    max_area_ratio: float = 3.0  # ... or grows beyond this multiple (leak into a neighbour structure)
    min_overlap: float = 0.1  # stop when IoU with the neighbour's mask falls below this
    box_margin: float = 2.0  # pixels added around the neighbour's mask box
    max_slices: int = 0  # per direction, 0 = no limit


@dataclass
class VolumeResult:
    mask: np.ndarray  # bool, file array order
    axis: int
    seed: int  # the first clicked slice
    anchors: list[int] = field(default_factory=list)  # clicked slices propagated from, in click order
    slices: list[int] = field(default_factory=list)  # slices holding mask, ascending
    stop_reasons: dict[str, str] = field(default_factory=dict)  # per direction: why propagation ended
    ious: dict[int, float] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "axis": self.axis,
            "seed_slice": self.seed,
            "anchor_slices": self.anchors,
            "slices": [min(self.slices), max(self.slices)] if self.slices else [],
            "voxels": int(self.mask.sum()),
            "stop": self.stop_reasons,
            "timings_s": {k: round(v, 3) for k, v in self.timings_s.items()},
        }


def _anchors(prompts: Prompts, axis: int) -> list[int]:
    """Slices with foreground clicks, in the order of their first click (else the roi's middle)."""
    if not len(prompts.foreground):
        return [seed_slice(prompts, axis)]
    return list(dict.fromkeys(int(k) for k in prompts.foreground[:, axis]))


def segment_volume(embeddings, prompts: Prompts, options: PropagationOptions | None = None) -> VolumeResult:
    """3D mask from clicks on one or more slices. The first clicked slice (the seed) is segmented from its
    prompts and carried to the neighbouring slices in both directions; a clicked slice reached on the way
    widens its box to its foreground clicks and keeps the propagation going; a clicked slice not reached
    becomes an anchor: prompted with the box of the nearest slice done, widened to its clicks, and carried
    both ways into the slices no earlier anchor filled. A background click lying on the mask being carried
    ends that direction there; elsewhere it pushes the box off and removes the component it falls in. So
    a later click changes only the slices from its own outward."""
    opts = options or PropagationOptions()
    tic = time.perf_counter()
    axis, n = embeddings.axis, embeddings.num_slices
    check_roi_size(prompts, axis)
    anchors = _anchors(prompts, axis)
    out = np.zeros(embeddings.volume.shape, dtype=bool)
    result = VolumeResult(out, axis, anchors[0], anchors=[])
    index = [slice(None)] * 3

    def put(k: int, mask: np.ndarray, iou: float) -> None:
        index[axis] = k
        out[tuple(index)] = mask
        result.ious[k] = iou

    lo_limit, hi_limit = 0, n - 1
    if prompts.roi is not None and prompts.roi[axis, 1] > prompts.roi[axis, 0]:
        lo_limit, hi_limit = int(prompts.roi[axis, 0]), int(prompts.roi[axis, 1])
    roi_box = slice_prompt(prompts, axis, anchors[0])[2] if prompts.roi is not None else None
    for a, seed in enumerate(anchors):
        if seed in result.ious:  # reached (and widened to its clicks) from an earlier anchor
            continue
        suffix = "" if a == 0 else f" from {seed}"
        mask = np.zeros(embeddings.slice_shape, dtype=bool)
        if result.ious:  # the nearest slice done gives the object's box, widened to this slice's clicks
            near = min(result.ious, key=lambda j: (abs(j - seed), j))
            mask, iou = _carry(embeddings, prompts, opts, seed, np.take(out, near, axis=axis), roi_box)
        if not mask.any():
            first = segment_slice(embeddings, prompts, seed, opts.threshold)
            mask, iou = first["mask"], first["iou"]
        if a == 0:
            result.timings_s["seed"] = time.perf_counter() - tic
        if not mask.any():
            result.stop_reasons["seed" + suffix] = "empty mask on the seed slice"
            continue
        put(seed, mask, iou)
        result.anchors.append(seed)
        for step, name in ((1, "up"), (-1, "down")):
            result.stop_reasons[name + suffix] = _propagate(
                embeddings, prompts, opts, seed, step, mask, (lo_limit, hi_limit), roi_box, result.ious, put
            )
    result.slices = sorted(result.ious)
    result.timings_s["total"] = time.perf_counter() - tic
    return result


def _user_clicks(prompts: Prompts, axis: int, k: int) -> tuple[bool, np.ndarray]:
    """Whether slice k holds a foreground click, and its background clicks (x, y)."""
    points, labels, _ = slice_prompt(prompts, axis, k, roi_box=False)
    return bool((labels == 1).any()), points[labels == 0]


def _carry(
    embeddings, prompts: Prompts, opts: PropagationOptions, k: int, prev: np.ndarray, roi_box: np.ndarray | None
) -> tuple[np.ndarray, float]:
    """Slice k's mask prompted with the box of ``prev`` (a nearby slice's mask), widened to the foreground
    clicks on slice k and pushed off its background clicks; the largest component unless k was clicked."""
    points, labels, _ = slice_prompt(prompts, embeddings.axis, k, roi_box=False)
    fg, bg = points[labels == 1], points[labels == 0]
    box = mask_box(prev, opts.box_margin)
    if len(fg):  # the box must also cover the user's clicks on this slice
        box = box_around(np.concatenate([fg, box.reshape(2, 2)]), 0.0, embeddings.slice_shape)
    if uses_points(embeddings.segmenter):
        fg = np.concatenate([[_interior_point(prev)], fg])
    mask, iou = slice_mask(embeddings, k, fg, bg, box, opts.threshold)
    missed = np.array([p for p in points[labels == 1] if not mask[int(p[1]), int(p[0])]]).reshape(-1, 2)
    if len(missed) and not uses_points(embeddings.segmenter):
        # SAM left a clicked pixel out of the box's mask: add the object under it, boxes up to the carried size
        _, extra, _ = best_seed_box(
            embeddings, k, missed, bg, opts.threshold, max_radius=max(box[2] - box[0], box[3] - box[1]) / 2
        )
        mask = mask | select_components(extra, missed, bg)
    if roi_box is not None:
        mask = clip_to_box(mask, roi_box)
    return (largest_component(mask, connectivity=1) if mask.any() and not (labels == 1).any() else mask), iou


def _propagate(
    embeddings,
    prompts: Prompts,
    opts: PropagationOptions,
    seed: int,
    step: int,
    prev: np.ndarray,
    limits: tuple[int, int],
    roi_box: np.ndarray | None,
    filled: dict,
    put,
) -> str:
    """Carry ``prev`` (the mask of slice ``seed``) slice by slice in direction ``step`` until the object ends
    or a slice in ``filled`` (done from another anchor) is reached; ``put(k, mask, iou)`` stores each
    slice. Returns why it stopped."""
    axis, (lo_limit, hi_limit), n = embeddings.axis, limits, embeddings.num_slices
    k, done = seed + step, 0
    while True:
        cancel.check()
        if k < lo_limit or k > hi_limit:
            return "end of image" if k < 0 or k >= n else "end of roi"
        if k in filled:
            return f"reached slice {k}, segmented from another click"
        if opts.max_slices and done >= opts.max_slices:
            return f"max_slices {opts.max_slices}"
        user_fg, bg = _user_clicks(prompts, axis, k)
        if not user_fg and any(prev[int(y), int(x)] for x, y in bg):  # "the object does not go on here"
            return "background click on the carried mask"
        mask, iou = _carry(embeddings, prompts, opts, k, prev, roi_box)
        area, prev_area = int(mask.sum()), int(prev.sum())
        overlap = (mask & prev).sum() / max(1, (mask | prev).sum())
        reason = ""
        if area == 0:
            reason = "empty mask" + (" (background click)" if len(bg) else "")
        elif not user_fg and iou < opts.min_iou:
            reason = f"predicted IoU {iou:.2f} < {opts.min_iou}"
        elif not user_fg and area < opts.min_area_ratio * prev_area:
            reason = f"area collapsed ({area} < {opts.min_area_ratio} x {prev_area} px)"
        elif not user_fg and area > opts.max_area_ratio * prev_area:
            reason = f"area blew up ({area} > {opts.max_area_ratio} x {prev_area} px)"
        elif not user_fg and overlap < opts.min_overlap:
            reason = f"overlap with the neighbour slice {overlap:.2f} < {opts.min_overlap}"
        if reason.startswith("area collapsed") and (mask & prev).sum() >= 0.5 * area:
            put(k, mask, iou)  # the object's tip, inside its neighbour: keep it, then stop
            return reason.replace("area collapsed", "object ends: area collapsed")
        if reason:
            return reason
        put(k, mask, iou)
        prev, k, done = mask, k + step, done + 1
