"""Click editing of a multi-organ label: foreground / background clicks per organ correct that organ only, with the
click refiner network (``medlsam.interact.refiner``) or the geodesic edit (``medlsam.interact.geodesic``). Only a
box around the organ and its clicks is computed; other organs keep their voxels except at the clicked organ's own
foreground clicks; clicked voxels are hard constraints."""

from __future__ import annotations

import numpy as np

from medlsam.atlas.prior import FilePrior
from medlsam.interact.clicks import ClickError, EditOptions, IntensityModel, OrganClicks
from medlsam.interact.geodesic import edit_organ
from medlsam.interact.interactive import check_click_count
from medlsam.interact.refiner import ClickRefiner
from medlsam.utils import cancel

__all__ = ["ClickError", "EditOptions", "IntensityModel", "OrganClicks", "check_clicks", "edit_label", "edit_organ"]


def check_clicks(clicks: dict[str, OrganClicks], shape: tuple[int, int, int]) -> None:
    """ClickError unless every click lies in the image, no voxel is both foreground and background of one organ,
    and there is at least one click."""
    if not any(len(c) for c in clicks.values()):
        raise ClickError("no clicks: give at least one foreground or background click")
    check_click_count(sum(len(c) for c in clicks.values()))
    for name, c in clicks.items():
        for kind, points in (("foreground", c.foreground), ("background", c.background)):
            outside = np.any((points < 0) | (points >= np.array(shape)), axis=1)
            if outside.any():
                raise ClickError(
                    f"{name} {kind} click(s) {points[outside].tolist()} outside the image (voxel indices must lie in "
                    f"[0, {shape[0] - 1}] x [0, {shape[1] - 1}] x [0, {shape[2] - 1}])"
                )
        both = {tuple(p) for p in c.foreground.tolist()} & {tuple(p) for p in c.background.tolist()}
        if both:
            raise ClickError(f"{name}: voxel(s) {sorted(both)} clicked both as foreground and as background")


def _holding(
    region: tuple[slice, ...], edited: np.ndarray, mask: np.ndarray, points: list[np.ndarray]
) -> tuple[tuple[slice, ...], np.ndarray]:
    """(region, edited) widened to hold ``points`` (file voxels), the current ``mask`` where it was not edited."""
    lo = np.min([[s.start for s in region]] + [p.min(axis=0) for p in points if len(p)], axis=0)
    hi = np.max([[s.stop for s in region]] + [p.max(axis=0) + 1 for p in points if len(p)], axis=0)
    wide = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    if wide == tuple(region):
        return region, edited
    out = mask[wide].copy()
    out[tuple(slice(s.start - a, s.stop - a) for s, a in zip(region, lo))] = edited
    return wide, out


def edit_label(
    label: np.ndarray,
    hu: np.ndarray,
    spacing: np.ndarray,
    values: dict[str, int],
    clicks: dict[str, OrganClicks],
    priors: dict[str, FilePrior | None] | None = None,
    intensities: dict[str, IntensityModel | None] | None = None,
    options: EditOptions | None = None,
    axis: int = 2,
    refiner: ClickRefiner | None = None,
) -> tuple[np.ndarray, dict[str, int]]:
    """The label with each clicked organ corrected (a copy), and per organ the number of voxels changed.
    ``values``: organ -> label value; organs without clicks are untouched. With a ``refiner`` the click refiner
    network corrects each organ (``medlsam.interact.refiner``), otherwise the geodesic edit (``edit_organ``)."""
    if label.shape != hu.shape:
        raise ClickError(f"label of shape {list(label.shape)} for an image of shape {list(hu.shape)}")
    check_clicks(clicks, hu.shape)
    unknown = [n for n in clicks if n not in values]
    if unknown:
        raise ClickError(f"clicks for unknown organ(s) {unknown}; known: {sorted(values)}")
    out = label.copy()
    changed = {}
    for name, organ_clicks in clicks.items():
        if not len(organ_clicks):
            continue
        cancel.check()
        value = values[name]
        prior = (priors or {}).get(name)
        current = out == value
        if refiner is not None:
            region, edited = refiner.refine(
                hu, spacing, axis, current, organ_clicks.foreground, organ_clicks.background, prior
            )
            region, edited = _holding(region, edited, current, [organ_clicks.foreground, organ_clicks.background])
            origin = np.array([s.start for s in region])
            edited[tuple((organ_clicks.foreground - origin).T)] = True  # clicked voxels are hard constraints
            edited[tuple((organ_clicks.background - origin).T)] = False
        else:
            region, edited = edit_organ(
                hu, spacing, current, organ_clicks, prior, (intensities or {}).get(name), options, axis
            )
        part = out[region]
        before = part == value
        removed = before & ~edited
        added = edited & ~before & (part == 0)  # other organs keep their voxels ...
        fg = organ_clicks.foreground - np.array([s.start for s in region])
        clicked = np.zeros(edited.shape, bool)
        clicked[tuple(fg.T)] = True
        added |= clicked & (part != value)  # ... except at this organ's own foreground clicks
        part[removed] = 0
        part[added] = value
        changed[name] = int(removed.sum() + added.sum())
    return out, changed
