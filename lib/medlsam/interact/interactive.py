"""Interactive SAM segmentation from clicks and boxes, independent of MONAI Label.

Prompts are voxel indices in the file's own array order (i, j, k), the convention of MONAI Label's
clients: ``foreground`` / ``background`` clicks ``[[i, j, k], ...]`` and Slicer's ``roi``
``[i0, i1, j0, j1, k0, k1]`` (inclusive corners, in either order). A slice along ``axis`` is
``np.take(volume, k, axis)`` (see ``medlsam.segment.sam.slices``): its rows are the first remaining file axis and
its columns the second, so a voxel maps to SAM's pixel x = column index, y = row index.

* ``segment_slice``: the clicks and box on one slice -> that slice's mask (one decoder call on the
  slice's cached embedding, so a second click on the same slice costs only the decoder). LiteMedSAM and
  MedSAM were trained with boxes only: for them clicks are turned into boxes (see ``slice_mask``).
* ``medlsam.interact.propagation.segment_volume`` carries these slice masks to the neighbouring slices (3D).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medlsam.errors import MedLSAMError
from medlsam.utils.geometry import inplane_axes

MAX_CLICKS = 200  # clicks in one request, every organ and kind together: more is a script, not an annotator


class PromptError(MedLSAMError):
    """Clicks or a box that cannot be used: outside the image, zero-size box, no prompt at all."""


@dataclass
class Prompts:
    """Validated prompts in file voxel indices."""

    foreground: np.ndarray  # (N, 3) int
    background: np.ndarray  # (M, 3) int
    roi: np.ndarray | None = None  # (3, 2) inclusive low/high index per file axis


def check_click_count(count: int) -> None:
    """PromptError when a request carries more than MAX_CLICKS clicks."""
    if count > MAX_CLICKS:
        raise PromptError(f"{count} clicks in one request: at most {MAX_CLICKS} (every organ and kind together)")


def parse_points(value, name: str, shape: tuple[int, int, int]) -> np.ndarray:
    """[[i, j, k], ...] (or one [i, j, k]) inside an image of ``shape`` as an (N, 3) int array; PromptError naming
    ``name`` otherwise."""
    if value is None or (hasattr(value, "__len__") and len(value) == 0):
        return np.zeros((0, 3), dtype=int)
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise PromptError(f"{name} must be a list of [i, j, k] voxel indices, got {value!r}") from None
    if arr.ndim == 1 and arr.shape == (3,):
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 3 or not np.isfinite(arr).all():
        raise PromptError(f"{name} must be a list of [i, j, k] voxel indices, got {value!r}")
    idx = np.rint(arr).astype(int)
    outside = (idx < 0) | (idx >= np.array(shape))
    if outside.any():
        bad = idx[outside.any(axis=1)].tolist()
        raise PromptError(
            f"{name} click(s) {bad} outside the image (voxel indices must lie in "
            f"[0, {shape[0] - 1}] x [0, {shape[1] - 1}] x [0, {shape[2] - 1}])"
        )
    return idx


def parse_prompts(shape: tuple[int, int, int], foreground=None, background=None, roi=None) -> Prompts:
    """Check clicks and Slicer's roi against the image shape; raise PromptError with a clear message."""
    fg, bg = parse_points(foreground, "foreground", shape), parse_points(background, "background", shape)
    check_click_count(len(fg) + len(bg))
    both = sorted({tuple(p) for p in fg.tolist()} & {tuple(p) for p in bg.tolist()})
    if both:
        raise PromptError(f"voxel(s) {both[:10]} clicked both as foreground and as background")
    box = None
    if roi is not None and len(roi) > 0:
        try:
            r = np.asarray(roi, dtype=np.float64).reshape(3, 2)
        except (TypeError, ValueError):
            raise PromptError(f"roi must be [i0, i1, j0, j1, k0, k1], got {roi!r}") from None
        if not np.isfinite(r).all():
            raise PromptError(f"roi must be finite, got {roi!r}")
        r = np.sort(np.rint(r).astype(int), axis=1)
        lo, hi = np.maximum(r[:, 0], 0), np.minimum(r[:, 1], np.array(shape) - 1)
        if np.any(hi < lo):
            raise PromptError(f"roi {list(map(int, r.ravel()))} lies outside the image of shape {list(shape)}")
        box = np.stack([lo, hi], axis=1)
    if len(fg) == 0 and box is None:
        raise PromptError("no prompt: give at least one foreground click or a roi box")
    return Prompts(fg, bg, box)


def slice_prompt(prompts: Prompts, axis: int, k: int, roi_box: bool = True):
    """SAM points (P, 2) x, y with labels (P,) and box (4,) or None for the prompts lying on slice k."""
    rows, cols = inplane_axes(axis)
    pts, labels = [], []
    for arr, lab in ((prompts.foreground, 1), (prompts.background, 0)):
        for p in arr[arr[:, axis] == k]:
            pts.append((p[cols], p[rows]))
            labels.append(lab)
    box = None
    if roi_box and prompts.roi is not None and prompts.roi[axis, 0] <= k <= prompts.roi[axis, 1]:
        r = prompts.roi
        box = np.array([r[cols, 0], r[rows, 0], r[cols, 1], r[rows, 1]], dtype=np.float64)
    return np.array(pts, dtype=np.float64).reshape(-1, 2), np.array(labels, dtype=np.int64), box


def check_roi_size(prompts: Prompts, axis: int) -> None:
    if prompts.roi is None:
        return
    rows, cols = inplane_axes(axis)
    if prompts.roi[rows, 1] <= prompts.roi[rows, 0] or prompts.roi[cols, 1] <= prompts.roi[cols, 0]:
        raise PromptError(
            f"roi {prompts.roi.ravel().tolist()} has zero size in the slice plane: draw a box "
            "spanning at least two voxels along each in-plane axis"
        )


def uses_points(segmenter) -> bool:
    """SAM ViT-B/L/H were trained with point prompts; LiteMedSAM and MedSAM only with boxes (a click passed
    to them as a point gives nothing useful), so for those clicks become boxes (see ``slice_mask``)."""
    return str(getattr(segmenter, "name", "")).startswith("sam_")


def _decode(
    embeddings, k: int, points: np.ndarray, labels: np.ndarray, box: np.ndarray | None, threshold: float
) -> tuple[np.ndarray, float]:
    kwargs = {}
    if len(points):
        kwargs.update(points=points[None], point_labels=labels[None])
    if box is not None:
        kwargs["boxes"] = box[None]
    if not kwargs:
        raise PromptError(f"no prompt on slice {k}")
    # a lone click is ambiguous (part / whole / surroundings): keep SAM's best of three masks
    multimask = box is None and len(points) == 1
    probs, iou = embeddings.decode(k, multimask=multimask, **kwargs)
    return probs[0] > threshold, float(iou[0])


def box_around(points: np.ndarray, radius: float, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    return np.array(
        [
            max(0.0, points[:, 0].min() - radius),
            max(0.0, points[:, 1].min() - radius),
            min(w - 1.0, points[:, 0].max() + radius),
            min(h - 1.0, points[:, 1].max() + radius),
        ]
    )


def _exclude(box: np.ndarray, background: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """Move the box edge nearest to each background click just past it, unless that drops a foreground click."""
    box = box.copy()
    for x, y in background:
        if not (box[0] <= x <= box[2] and box[1] <= y <= box[3]):
            continue
        options = sorted(
            [(x - box[0], 0, x + 1), (box[2] - x, 2, x - 1), (y - box[1], 1, y + 1), (box[3] - y, 3, y - 1)]
        )
        for _, edge, value in options:
            trial = box.copy()
            trial[edge] = value
            coord = foreground[:, 0] if edge in (0, 2) else foreground[:, 1]
            keeps = len(foreground) == 0 or (np.all(coord >= trial[edge]) if edge < 2 else np.all(coord <= trial[edge]))
            if trial[2] >= trial[0] and trial[3] >= trial[1] and keeps:
                box = trial
                break
    return box


def select_components(mask: np.ndarray, foreground: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Keep the components under foreground clicks (all if none is hit), drop those under background ones."""
    if not mask.any():
        return mask
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    at = lambda pts: {int(labels[int(round(y)), int(round(x))]) for x, y in pts} - {0}  # noqa: E731
    keep = at(foreground) or set(range(1, n + 1))
    keep -= at(background) - at(foreground)
    return np.isin(labels, sorted(keep))


def _border_fraction(mask: np.ndarray, box: np.ndarray) -> float:
    """Fraction of the box's outline covered by the mask: a mask cut off by its box means the box is too small."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    edges = [mask[y0, x0 : x1 + 1], mask[y1, x0 : x1 + 1], mask[y0 : y1 + 1, x0], mask[y0 : y1 + 1, x1]]
    return float(np.mean(np.concatenate(edges))) if sum(e.size for e in edges) else 0.0


def best_seed_box(
    embeddings,
    k: int,
    foreground: np.ndarray,
    background: np.ndarray,
    threshold: float,
    max_border: float = 0.15,
    max_radius: float | None = None,
):
    """Boxes of several sizes around the foreground clicks, decoded in one batched call. Among the masks that
    hold a click and are not cut off by their box (a whole object fits in it) SAM's best-scored (predicted IoU)
    wins; failing any, the best predicted IoU minus penalties for a cut-off mask or a missed click."""
    boxes = np.stack(seed_boxes(foreground, background, embeddings.slice_shape, max_radius))
    probs, ious = embeddings.decode(k, boxes=boxes)
    scores = [
        seed_score(prob > threshold, float(iou), box, foreground, background, max_border)
        for prob, iou, box in zip(probs, ious, boxes)
    ]
    best = int(np.argmax(scores))
    return boxes[best], probs[best] > threshold, float(ious[best])


def seed_boxes(
    foreground: np.ndarray, background: np.ndarray, shape: tuple[int, int], max_radius: float | None = None
) -> list[np.ndarray]:
    """Boxes of six sizes (2 pixels to a third of the slice, or ``max_radius``) around the foreground clicks, each
    pushed off the background clicks."""
    top = max(4.0, max(shape) / 3 if max_radius is None else max_radius)
    radii = np.unique(np.round(np.geomspace(2, top, 6)))
    return [_exclude(box_around(foreground, r, shape), background, foreground) for r in radii]


def seed_score(
    mask: np.ndarray, iou: float, box: np.ndarray, foreground: np.ndarray, background: np.ndarray, max_border=0.15
) -> float:
    """How well a box's mask answers the clicks on its slice: a whole object under the click (and under no
    background click) ranks above any cut-off, missing or refused mask, then SAM's own score (predicted IoU)."""
    hit = any(mask[int(round(y)), int(round(x))] for x, y in foreground)
    refused = any(mask[int(round(y)), int(round(x))] for x, y in background)  # the user said "not this"
    border = _border_fraction(mask, box)
    whole = hit and not refused and border <= max_border
    return iou + (2.0 if whole else 0.0) - 0.5 * border - (0.0 if hit else 1.0) - (1.5 if refused else 0.0)


def slice_mask(
    embeddings,
    k: int,
    foreground: np.ndarray,
    background: np.ndarray,
    box: np.ndarray | None,
    threshold: float,
    rounds: int = 2,
) -> tuple[np.ndarray, float]:
    """One slice's mask from clicks (x, y) and/or a box. Point-trained SAMs get the clicks as points; for
    box-trained models a click becomes a box: boxes of several sizes around the foreground clicks (see
    ``best_seed_box``), the chosen one then refitted to its mask's box plus the clicks (``rounds`` - 1 more
    decoder calls at most); background clicks push the nearest box edge past them. Components under
    background clicks (and not under foreground ones) are removed."""
    shape = embeddings.slice_shape
    points = np.concatenate([foreground, background]).reshape(-1, 2)
    labels = np.array([1] * len(foreground) + [0] * len(background), dtype=np.int64)
    if uses_points(embeddings.segmenter) or (box is None and not len(foreground)):
        mask, iou = _decode(embeddings, k, points, labels, box, threshold)
    elif box is not None:
        mask, iou = _decode(
            embeddings, k, np.zeros((0, 2)), labels[:0], _exclude(box, background, foreground), threshold
        )
    else:
        memo = _click_memo(embeddings)
        previous = memo.get(k)
        known = {tuple(p) for p in previous[0]} if previous is not None else None
        if known is not None and known and known <= {tuple(p) for p in foreground}:
            # a later click on this slice: start from the box chosen before, grown to any new foreground
            # click and pushed off the background ones - one decoder call
            new = np.array([p for p in foreground if tuple(p) not in known]).reshape(-1, 2)
            current = (
                previous[1]
                if not len(new)
                else box_around(np.concatenate([new, previous[1].reshape(2, 2)]), 2.0 if len(new) else 0.0, shape)
            )
            current = _exclude(current, background, foreground)
            mask, iou = _decode(embeddings, k, np.zeros((0, 2)), labels[:0], current, threshold)
            rounds = 1
        else:
            current, mask, iou = best_seed_box(embeddings, k, foreground, background, threshold)
        for _ in range(rounds - 1):
            selected = select_components(mask, foreground, background)
            if not selected.any():
                break
            rows, cols = np.nonzero(selected)
            extent = np.concatenate([np.stack([cols, rows], axis=1), foreground])
            grown = _exclude(box_around(extent, 2.0, shape), background, foreground)
            if np.abs(grown - current).max() < 1.0:
                break
            current = grown
            mask, iou = _decode(embeddings, k, np.zeros((0, 2)), labels[:0], current, threshold)
        memo[k] = (foreground.copy(), current)
    if box is not None:
        mask = clip_to_box(mask, box)
    return select_components(mask, foreground, background), iou


def _click_memo(embeddings) -> dict:
    """Per slice, the foreground clicks and the box last chosen for them (kept with the slice embeddings, so
    per image): a later click on the slice refines that box with one decoder call."""
    memo = getattr(embeddings, "_medlsam_click_boxes", None)
    if memo is None:
        memo = {}
        try:
            embeddings._medlsam_click_boxes = memo
        except AttributeError:  # an object that takes no attributes: no memory, always the full search
            pass
    return memo


def segment_slice(embeddings, prompts: Prompts, k: int | None = None, threshold: float = 0.5) -> dict:
    """Mask of one slice from the prompts on it. ``k`` defaults to the slice of the last foreground click
    (else the roi's middle). Returns {"slice", "mask" (H, W) bool, "iou", "axis"}."""
    axis = embeddings.axis
    if k is None:
        k = seed_slice(prompts, axis)
    check_roi_size(prompts, axis)
    points, labels, box = slice_prompt(prompts, axis, int(k))
    if not (labels == 1).any() and box is None:
        raise PromptError(
            f"no foreground click or roi on slice {k} (axis {axis}): clicks on other slices are "
            "ignored by 2D segmentation"
        )
    mask, iou = slice_mask(embeddings, int(k), points[labels == 1], points[labels == 0], box, threshold)
    return {"slice": int(k), "axis": axis, "mask": mask, "iou": iou}


def seed_slice(prompts: Prompts, axis: int) -> int:
    if len(prompts.foreground):
        return int(prompts.foreground[-1, axis])
    return int(round((prompts.roi[axis, 0] + prompts.roi[axis, 1]) / 2))


def clip_to_box(mask: np.ndarray, box: np.ndarray) -> np.ndarray:
    x0, y0, x1, y1 = (int(v) for v in box)
    out = np.zeros_like(mask)
    out[y0 : y1 + 1, x0 : x1 + 1] = mask[y0 : y1 + 1, x0 : x1 + 1]
    return out


def slice_mask_to_volume(mask: np.ndarray, shape: tuple[int, int, int], axis: int, k: int) -> np.ndarray:
    """A slice mask placed in an empty volume of ``shape`` (file order)."""
    out = np.zeros(shape, dtype=bool)
    index = [slice(None)] * 3
    index[axis] = k
    out[tuple(index)] = mask
    return out
