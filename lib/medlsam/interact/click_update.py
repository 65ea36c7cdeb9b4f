"""A later click corrects the answer where it points, and nowhere else unless the new answer agrees (issue 30).

Recomputing a structure from all of its prompts at every click lets one click move parts of the answer far from
where the annotator pointed (a SAM candidate that stops early, a choice that flips between paths): on the
full-resolution scans a second click took a liver from Dice 0.61 to 0.27. ``corrected`` keeps the previous answer
and applies to it, for each click added since, only the candidate's part under that click: a foreground click adds
the candidate's connected part that the previous answer missed there, a background click removes the previous
answer's connected part that the candidate dropped there. The whole candidate replaces the previous answer only
when it honours every prompt and changes, away from the new clicks, at most ``CHANGE_ELSEWHERE`` of the previous
answer's volume. A click's part stays near it, as the blob path's later clicks do (``AnyOptions.later_reach``):
within REACH times the previous answer's equivalent radius of it, and nearer to it than to any click of the other
kind (one background click never takes the structure away). A background click removes only about as much as it
lies deep in the answer (within DEPTH_REACH times its distance to the answer's outside): a click on a thin rim of
leak trims that rim, not the whole part a candidate dropped (one on the chest liver's edge took 320 cc of true
liver with it, Dice 0.91 -> 0.74). Candidates are tried in order for a click (the
chosen path's, then the other's); a click no candidate answers leaves the answer as it was but for its own voxel.
Nothing here knows an organ.
"""

from __future__ import annotations

import numpy as np

from medlsam.interact.click_any import AnyPrompts, _component_at
from medlsam.utils.geometry import enclosing, mask_extent, within

Region = tuple[slice, ...]
CHANGE_ELSEWHERE = 0.1  # the share of the previous volume the whole candidate may change away from the new clicks
REACH = 1.0  # a click changes the answer within this times the previous answer's equivalent radius of it
DEPTH_REACH = 2.0  # a background click: also within this times its depth in the answer (at least MIN_REACH_VOXELS)
MIN_REACH_VOXELS = 2.0  # the least reach, in the scan's largest voxel side


def added_clicks(before: AnyPrompts, after: AnyPrompts) -> tuple[np.ndarray, np.ndarray] | None:
    """(foreground, background) clicks ``after`` adds to ``before`` (each list extended at its end, the box the
    same); None when ``after`` is no such extension (a click undone or moved, a box changed)."""
    same_box = (before.box is None) == (after.box is None) and (
        before.box is None or np.array_equal(before.box, after.box)
    )
    if not same_box:
        return None
    added = []
    for old, new in ((before.foreground, after.foreground), (before.background, after.background)):
        old, new = np.asarray(old, int).reshape(-1, 3), np.asarray(new, int).reshape(-1, 3)
        if len(new) < len(old) or not np.array_equal(new[: len(old)], old):
            return None
        added.append(new[len(old) :])
    return added[0], added[1]


def trimmed(part: tuple[Region, np.ndarray]) -> tuple[Region, np.ndarray]:
    """(region, mask) cut to the mask's extent (an empty mask: one empty voxel at the region's start)."""
    region, mask = part
    if not mask.any():
        return tuple(slice(s.start, s.start + 1) for s in region), np.zeros((1, 1, 1), bool)
    inner = mask_extent(mask)
    return tuple(slice(s.start + i.start, s.start + i.stop) for s, i in zip(region, inner)), mask[inner]


def common_grid(parts: list[tuple[Region, np.ndarray]]) -> tuple[Region, list[np.ndarray]]:
    """The masks of ``parts`` (region, mask on it) on one region holding them all."""
    region = enclosing([r for r, _ in parts])
    masks = []
    for where, part in parts:
        mask = np.zeros(tuple(s.stop - s.start for s in region), bool)
        mask[within(where, region)] = part
        masks.append(mask)
    return region, masks


def points_inside(mask: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Per point (local indices), whether it lies in the mask (False outside its grid)."""
    points = np.asarray(points, int).reshape(-1, 3)
    ok = np.all((points >= 0) & (points < np.array(mask.shape)), axis=1)
    hit = np.zeros(len(points), bool)
    hit[ok] = mask[tuple(points[ok].T)]
    return hit


def depth(mask: np.ndarray, click: np.ndarray, spacing) -> float:
    """Distance in mm from ``click`` (local indices) to the nearest voxel not in ``mask`` (the grid's outside
    included): how deep the click lies in the answer."""
    spacing = np.asarray(spacing, np.float64)
    click = np.asarray(click, int)
    shape = np.array(mask.shape)
    edge = float(np.min(np.minimum(click + 1, shape - click) * spacing))  # the first voxel past the nearest face
    half = float(spacing.max())
    while True:  # a growing box around the click: it holds every voxel within half mm of it
        reach = np.ceil(half / spacing).astype(int)
        low, high = np.maximum(click - reach, 0), np.minimum(click + reach + 1, shape)
        outside = np.argwhere(~mask[tuple(slice(int(a), int(b)) for a, b in zip(low, high))])
        nearest = float(np.sqrt((((outside + low - click) * spacing) ** 2).sum(axis=1).min())) if len(outside) else edge
        if nearest <= half or half >= edge:
            return min(nearest, edge)
        half *= 2.0


def _near(part: np.ndarray, click: np.ndarray, others: np.ndarray, spacing, radius: float = np.inf) -> np.ndarray:
    """The component at ``click`` of the voxels of ``part`` within ``radius`` mm of it and nearer to it than to any
    of the ``others`` points (local indices)."""
    if not part.any():
        return part
    box = mask_extent(part)
    axes = [np.arange(s.start, s.stop, dtype=np.float32) * d for s, d in zip(box, spacing)]
    axes = [a.reshape([-1 if i == j else 1 for j in range(3)]) for i, a in enumerate(axes)]

    def squared(point: np.ndarray) -> np.ndarray:
        return sum((a - float(c) * d) ** 2 for a, c, d in zip(axes, point, spacing))

    own = squared(click)
    keep = part[box] & (own <= radius**2)
    for other in np.asarray(others, int).reshape(-1, 3):
        keep &= own < squared(other)
    out = np.zeros(part.shape, bool)
    out[box] = keep
    return _component_at(out, click[None])


def corrected(
    previous: tuple[Region, np.ndarray],
    candidates: list[tuple[Region, np.ndarray]],
    prompts: AnyPrompts,
    added: tuple[np.ndarray, np.ndarray],
    spacing,
    change_elsewhere: float = CHANGE_ELSEWHERE,
) -> tuple[Region, np.ndarray, str]:
    """(region, mask, how): the previous answer corrected under the ``added`` (foreground, background) clicks by
    the ``candidates`` (the first one whole when it agrees, see the module); ``how`` is "whole" or "local"."""
    parts = [trimmed(part) for part in (previous, *candidates)]  # a SAM candidate comes as whole slices
    clicks = np.asarray(prompts.foreground, int).reshape(-1, 3)
    if len(clicks):  # the foreground clicks' extent: each of them lies on the grid
        around = tuple(slice(int(a), int(b) + 1) for a, b in zip(clicks.min(axis=0), clicks.max(axis=0)))
        parts.append((around, np.zeros(tuple(s.stop - s.start for s in around), bool)))
    region, masks = common_grid(parts)
    before, options = masks[0], masks[1 : 1 + len(candidates)]
    origin = np.array([s.start for s in region])
    fg = np.asarray(prompts.foreground, int).reshape(-1, 3) - origin
    bg = np.asarray(prompts.background, int).reshape(-1, 3) - origin
    new_fg, new_bg = (np.asarray(points, int).reshape(-1, 3) - origin for points in added)
    spacing = np.asarray(spacing, np.float64)
    reach = REACH * (3.0 * float(before.sum()) * float(np.prod(spacing)) / (4.0 * np.pi)) ** (1.0 / 3.0)
    least = MIN_REACH_VOXELS * float(spacing.max())
    local = before.copy()
    for click in new_fg:
        for option in options:
            if not points_inside(local, click)[0] and points_inside(option, click)[0]:
                local |= _near(option & ~before, click, bg, spacing, reach)
    for click in new_bg:
        near = None  # within DEPTH_REACH times its depth in the answer as well as the reach (found once, if needed)
        for option in options:
            if points_inside(local, click)[0] and not points_inside(option, click)[0]:
                near = near or min(reach, max(least, DEPTH_REACH * depth(before, click, spacing)))
                local &= ~_near(before & ~option, click, fg, spacing, near)
    whole = options[0]
    elsewhere = int(((whole ^ before) & ~(local ^ before)).sum())
    holds = points_inside(whole, fg).all() and not points_inside(whole, bg).any()
    if holds and elsewhere <= change_elsewhere * before.sum():
        return region, whole, "whole"
    local[tuple(fg.T)] = True  # every foreground click lies on the grid
    on_grid = np.all((bg >= 0) & (bg < np.array(local.shape)), axis=1)
    local[tuple(bg[on_grid].T)] = False
    return region, local, "local"
