"""The geodesic edit of one organ (``edit_organ``, the `edit` task's `geodesic` method).

A click is evidence about the organ's *position*, not its intensity: it updates the organ's spatial prior near
the click, and the organ's intensity model (the templates' histograms, ``medlsam.atlas.prior.intensity_histograms``)
turns the updated prior into a posterior, as the automatic segmentation does.

1. Base: the organ's current mask, graded by its template posterior (``FilePrior``) where there is one:
   inside the mask the probability is at least 0.5 + margin, outside at most 0.5 - margin, so no click means
   no change.
2. Each click spreads over a geodesic neighbourhood: distance along the image (mm, with a cost per HU of
   difference to the clicked voxel's intensity, so it stops at edges), influence exp(-(d / reach)^2).
   A foreground click raises the spatial prior towards 1, a background click lowers it towards 0; where both
   reach a voxel, the nearer click decides.
3. The edited prior times the intensity likelihood ratio gives the new probability; above 0.5 is organ. Clicked
   voxels are hard constraints (a foreground voxel is organ, a background voxel is not), and they accumulate:
   the caller sends every click so far and an earlier click is never undone by a later one.

Only a box around the organ and its clicks is computed (the rest of the scan is untouched); other organs keep
their voxels except at the clicked organ's own foreground clicks.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from medlsam.atlas.prior import FilePrior
from medlsam.interact.clicks import EditOptions, IntensityModel, OrganClicks

INFLUENCE_RANGE = 2.5  # reaches: a click's geodesic search stops there (influence exp(-6.25) < 0.002)


def _region(points: list[np.ndarray], shape: tuple[int, ...], pad: np.ndarray) -> tuple[slice, ...]:
    """The box holding ``points`` (N, 3) arrays widened by ``pad`` voxels per axis, clipped to ``shape``."""
    allp = np.concatenate([p.reshape(-1, 3) for p in points if len(p)])
    lo = np.maximum(allp.min(axis=0) - pad, 0)
    hi = np.minimum(allp.max(axis=0) + pad, np.array(shape) - 1)
    return tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi))


def geodesic_influence(
    hu: np.ndarray, spacing: np.ndarray, clicks: np.ndarray, options: EditOptions
) -> tuple[np.ndarray, np.ndarray]:
    """(influence, distance) of the nearest click at each voxel of ``hu`` (clicks in its indices): distance in mm
    along the image with an intensity cost, influence exp(-(d / reach)^2); both inf / 0 with no click."""
    from skimage.graph import MCP_Geometric

    distance = np.full(hu.shape, np.inf, np.float64)
    for click in clicks:
        costs = 1.0 + options.hu_cost * np.abs(hu - hu[tuple(click)]) / 100.0
        mcp = MCP_Geometric(costs, sampling=tuple(float(s) for s in spacing))
        found, _ = mcp.find_costs(  # beyond 2.5 reaches the influence is below 0.002: not searched
            [tuple(int(v) for v in click)], max_cumulative_cost=INFLUENCE_RANGE * options.reach_mm
        )
        found[found > INFLUENCE_RANGE * options.reach_mm] = np.inf
        distance = np.minimum(distance, found)
    return np.exp(-((distance / options.reach_mm) ** 2)), distance


def anchor_shift(
    spatial: np.ndarray, spacing: np.ndarray, clicks: OrganClicks, origin: np.ndarray, options
) -> np.ndarray:
    """The voxel shift t (3,) of the spatial prior (s_t(x) = s(x - t)) with the least violation of the clicks
    (foreground at >= anchor_level, background at <= 1 - anchor_level), the smallest in mm among equals."""
    reach = np.floor(options.shift_mm / spacing).astype(int)
    axes = [np.arange(-r, r + 1) for r in reach]
    shifts = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    length = np.sqrt((((shifts * spacing) / options.shift_mm) ** 2).sum(axis=1))
    shifts, length = shifts[length <= 1.0], length[length <= 1.0]
    violation = np.zeros(len(shifts))
    shape = np.array(spatial.shape)
    for points, sign in ((clicks.foreground, 1.0), (clicks.background, -1.0)):
        for click in points - origin:
            source = click[None] - shifts  # s_t(c) = s(c - t)
            inside = np.all((source >= 0) & (source < shape), axis=1)
            values = np.zeros(len(shifts), np.float32)
            values[inside] = spatial[tuple(source[inside].T)]
            if sign > 0:
                violation += np.maximum(options.anchor_level - values, 0.0)
            else:
                violation += np.maximum(values - (1.0 - options.anchor_level), 0.0)
    best = np.flatnonzero(violation <= violation.min() + 1e-6)
    return shifts[best[np.argmin(length[best])]]


def threshold_field(
    posterior: np.ndarray, spacing: np.ndarray, clicks: OrganClicks, origin: np.ndarray, options: EditOptions
) -> np.ndarray:
    """The organ's threshold at each voxel: 0.5 far from clicks, near a click the level that click asks for."""
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(posterior.shape, spacing)], indexing="ij", sparse=True)
    shift = np.zeros(posterior.shape, np.float32)
    weight = np.zeros(posterior.shape, np.float32)
    for points, sign in ((clicks.foreground, -1.0), (clicks.background, 1.0)):
        for click in points - origin:
            level = float(posterior[tuple(click)]) + sign * options.level_margin
            level = min(max(level, options.level_min), 1.0 - options.level_min)
            if (sign < 0 and level >= 0.5) or (sign > 0 and level <= 0.5):
                continue  # the click already agrees with the threshold
            d2 = sum((g - c * s) ** 2 for g, c, s in zip(grids, click, spacing))
            w = np.exp(-d2 / options.level_reach_mm**2).astype(np.float32)
            shift += w * (level - 0.5)
            weight += w
    return 0.5 + shift / np.maximum(weight, 1.0)


def depth_edit(
    edited: np.ndarray, base_mask: np.ndarray, spacing: np.ndarray, clicks: OrganClicks, origin, options: EditOptions
) -> np.ndarray:
    """``edited`` with the layers the clicks peel off (background) or add (foreground), measured from the base
    mask's boundary; where two clicks reach a voxel the nearer one decides."""
    inside = ndimage.distance_transform_edt(base_mask, sampling=spacing)
    outside = ndimage.distance_transform_edt(~base_mask, sampling=spacing)
    depth = np.where(base_mask, inside, -outside)  # mm, positive inside
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(edited.shape, spacing)], indexing="ij", sparse=True)
    nearest = np.full(edited.shape, np.inf)
    out = edited.copy()
    for points, foreground in ((clicks.foreground, True), (clicks.background, False)):
        for click in points - origin:
            distance = np.sqrt(sum((g - c * s) ** 2 for g, c, s in zip(grids, click, spacing)))
            level = depth[tuple(click)]
            if foreground:
                layer = (depth >= level - options.depth_margin_mm) & (depth <= 0)
            else:
                layer = (depth <= level + options.depth_margin_mm) & (depth > 0)
            take = layer & (distance <= options.depth_reach_mm) & (distance < nearest)
            out[take] = foreground
            nearest = np.where(take, distance, nearest)
    return out


def extent_edit(edited: np.ndarray, base_mask: np.ndarray, clicks: OrganClicks, origin, axis: int, options):
    """``edited`` with the organ ended at central background clicks and extended to foreground clicks on slices
    it does not reach (along ``axis``)."""
    out = np.moveaxis(edited.copy(), axis, 0)
    base = np.moveaxis(base_mask, axis, 0)
    present = np.flatnonzero(base.any(axis=(1, 2)))
    if len(present) == 0:
        return edited
    centre = present.mean()
    for click in clicks.background - origin:
        k, rc = int(click[axis]), tuple(int(v) for a, v in enumerate(click) if a != axis)
        plane = base[k]
        if not plane[rc]:
            continue
        depth = ndimage.distance_transform_edt(np.pad(plane, 1))[1:-1, 1:-1]
        if depth[rc] < options.extent_centrality * depth.max():
            continue
        if k >= centre:
            out[k:] = False
        else:
            out[: k + 1] = False
    for click in clicks.foreground - origin:
        k, rc = int(click[axis]), np.array([v for a, v in enumerate(click) if a != axis])
        if base[k].any():
            continue
        end = present[np.argmin(np.abs(present - k))]
        shape = base[end]
        centroid = np.argwhere(shape).mean(axis=0)
        step = 1 if k > end else -1
        for j in range(end + step, k + step, step):
            t = (j - end) / (k - end)
            offset = np.round((rc - centroid) * t).astype(int)
            out[j] |= ndimage.shift(shape, offset, order=0, mode="constant", cval=False)
    return np.moveaxis(out, 0, axis)


def edit_organ(
    hu: np.ndarray,
    spacing: np.ndarray,
    mask: np.ndarray,
    clicks: OrganClicks,
    prior: FilePrior | None = None,
    intensity: IntensityModel | None = None,
    options: EditOptions | None = None,
    axis: int = 2,
) -> tuple[tuple[slice, ...], np.ndarray]:
    """The organ's corrected mask on a box of the file: (region, mask in that region). ``hu``: the scan, ``mask``:
    the organ's current mask (file shape), ``prior``: its template posterior, ``intensity``: its intensity model.
    Outside the region the mask is unchanged."""
    options = options or EditOptions()
    spacing = np.asarray(spacing, np.float64)
    pad = np.ceil((2.0 * options.reach_mm + options.shift_mm) / spacing).astype(int) + 1
    points = [clicks.foreground, clicks.background]
    region = _region(points + [np.argwhere(mask)] if mask.any() else points, hu.shape, pad)
    origin = np.array([s.start for s in region])
    base_mask = mask[region]
    probability = base_mask.astype(np.float32)
    if prior is not None:  # the posterior on the region (0 outside its box)
        graded = np.zeros(base_mask.shape, np.float32)
        lo, hi = np.maximum(prior.low, origin), np.minimum(prior.high + 1, origin + base_mask.shape)
        if np.all(hi > lo):
            graded[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, origin))] = prior.probabilities[
                tuple(slice(a - p, b - p) for a, b, p in zip(lo, hi, prior.low))
            ]
        probability = graded
    high, low = 0.5 + options.margin, 0.5 - options.margin
    probability = np.where(base_mask, np.maximum(probability, high), np.minimum(probability, low))
    if not len(clicks):
        return region, base_mask.copy()
    base_posterior = probability

    local_hu = hu[region].astype(np.float32)
    if intensity is None and len(clicks.foreground):  # an organ the templates do not know
        intensity = IntensityModel.from_clicks(local_hu, clicks.foreground - origin)
    if intensity is not None:
        ratio = intensity.ratio(local_hu, options.intensity_power)
    else:
        ratio = np.ones(local_hu.shape, np.float32)
    spatial = probability / (probability + ratio * (1.0 - probability))  # invert posterior = s r / (s r + 1 - s)
    if options.shift_mm > 0:
        shift = anchor_shift(spatial, spacing, clicks, origin, options)
        if np.any(shift):
            spatial = ndimage.shift(spatial, shift, order=0, mode="constant", cval=0.0)
    smooth = (
        ndimage.gaussian_filter(local_hu, sigma=options.smooth_hu_mm / spacing) if options.smooth_hu_mm else local_hu
    )
    fg_influence, fg_distance = geodesic_influence(smooth, spacing, clicks.foreground - origin, options)
    bg_influence, bg_distance = geodesic_influence(smooth, spacing, clicks.background - origin, options)
    raised = spatial + (1.0 - spatial) * fg_influence
    lowered = spatial * (1.0 - bg_influence)
    nearer_fg = fg_distance <= bg_distance
    spatial = np.where(
        nearer_fg, lowered * (1.0 - fg_influence) + fg_influence, raised * (1.0 - bg_influence)
    )  # the nearer click is applied last
    posterior = spatial * ratio / (spatial * ratio + (1.0 - spatial) + 1e-12)
    threshold = 0.5
    if options.level_reach_mm > 0:
        threshold = threshold_field(base_posterior, spacing, clicks, origin, options)
    edited = posterior > threshold
    if options.depth_reach_mm > 0:
        edited = depth_edit(edited, base_mask, spacing, clicks, origin, options)
    if options.extent_centrality > 0:
        edited = extent_edit(edited, base_mask, clicks, origin, axis, options)
    edited[tuple((clicks.foreground - origin).T)] = True
    edited[tuple((clicks.background - origin).T)] = False
    return region, edited
