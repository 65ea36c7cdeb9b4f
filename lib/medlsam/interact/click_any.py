"""Class-agnostic 3D segmentation of anything clicked, at the scan's own resolution (issue 30).

No network and no template: the clicked structure's intensity (robust statistics around each foreground click, on a
slightly smoothed image) gives a band of HU; the voxels in that band connected to a click, after an opening scaled
to the structure's own thickness at the click (so a 5 mm nerve keeps its shape and a liver is cut off from the
heart at the thin bridges), form the structure; holes are filled. Background clicks inside it split it along its
narrowest necks (``medlsam.interact.click_structure``). A box bounds everything and stands for a click at its
centre.

Work is done on a crop around the prompts, widened to the image's edge on each side the structure reaches,
never on the whole scan. A click on the air outside the body (the air its slice's border reaches) is refused.
Prompts are file voxel indices ``(i, j, k)`` like ``medlsam.interact.interactive``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medlsam.interact.interactive import PromptError, check_click_count
from medlsam.utils.geometry import mask_extent

BODY_HU = -400.0  # above this: tissue; the body is its largest component, holes (lungs, bowel gas) filled


@dataclass(frozen=True)
class AnyOptions:
    """Tunables of the class-agnostic segmentation (mm and HU)."""

    smooth_mm: float = 1.5  # Gaussian smoothing of the crop before the intensity band
    sample_mm: float = 3.0  # radius around a click whose voxels give its intensity statistics
    band_sigmas: float = 2.0  # band half-width in robust standard deviations ...
    band_min_hu: float = 25.0  # ... at least this
    band_max_hu: float = 200.0  # ... at most this
    air_band_hu: float = 300.0  # a click on air (below BODY_HU): the band reaches this far above its HU
    open_fraction: float = 0.5  # opening radius: this fraction of the structure's thickness (radius) at the click
    open_max_mm: float = 6.0
    split_fraction: float = 0.3  # blobs: maxima of the distance map this fraction of its peak above their saddle
    split_min_mm: float = 2.0
    later_reach: float = 0.5  # a later click's blob: within this times the structure's equivalent radius so far
    margin_mm: float = 80.0  # first crop: the prompts' box plus this
    grid_voxels: int = 2_000_000  # a larger crop is worked on in blocks of the slice plane
    max_crop_voxels: int = 40_000_000  # the crop stops growing here


@dataclass
class AnyPrompts:
    """Checked prompts of one structure in file voxel indices."""

    foreground: np.ndarray  # (N, 3) int
    background: np.ndarray  # (M, 3) int
    box: np.ndarray | None = None  # (3, 2) inclusive low / high per file axis


def check_box(box, shape: tuple[int, ...]) -> np.ndarray | None:
    """[[i0, j0, k0], [i1, j1, k1]] (inclusive corners, either order) -> (3, 2) low/high; PromptError for a box
    that is malformed, lies outside the image or has zero size along an axis of more than one slice."""
    if box is None or (hasattr(box, "__len__") and len(box) == 0):
        return None
    try:
        corners = np.asarray(box, dtype=np.float64)
    except (TypeError, ValueError):
        raise PromptError(f"box must be [[i0, j0, k0], [i1, j1, k1]] voxel indices, got {box!r}") from None
    if corners.shape != (2, 3) or not np.isfinite(corners).all():
        raise PromptError(f"box must be [[i0, j0, k0], [i1, j1, k1]] voxel indices, got {box!r}")
    low, high = np.sort(np.rint(corners).astype(int), axis=0)
    size = np.array(shape)
    if np.any(low < 0) or np.any(high >= size):
        raise PromptError(
            f"box {[low.tolist(), high.tolist()]} reaches outside the image of shape {list(shape)} "
            f"(voxel indices must lie in [0, {shape[0] - 1}] x [0, {shape[1] - 1}] x [0, {shape[2] - 1}])"
        )
    flat = [a for a in range(3) if high[a] == low[a]]
    if len(flat) > 1:
        raise PromptError(
            f"box {[low.tolist(), high.tolist()]} has zero size along axes {flat}: draw a box spanning at least "
            "two voxels in the slice plane"
        )
    return np.stack([low, high], axis=1)


def check_prompts(
    name: str, foreground: np.ndarray, background: np.ndarray, box: np.ndarray | None, hu: np.ndarray, axis: int = 2
) -> AnyPrompts:
    """PromptError naming ``name`` unless the prompts can start a structure: at least one foreground click or a
    box, no foreground click outside the box or on the air outside the body, no voxel both kinds."""
    check_click_count(len(foreground) + len(background))
    for kind, points in (("foreground", foreground), ("background", background)):
        outside = np.any((points < 0) | (points >= np.array(hu.shape)), axis=1)
        if outside.any():
            raise PromptError(
                f"{name}: {kind} click(s) {points[outside].tolist()[:10]} outside the image of shape {list(hu.shape)}"
            )
    if not len(foreground) and box is None:
        raise PromptError(f"{name}: no foreground click and no box: give at least one of them")
    both = {tuple(p) for p in foreground.tolist()} & {tuple(p) for p in background.tolist()}
    if both:
        raise PromptError(f"{name}: voxel(s) {sorted(both)[:10]} clicked both as foreground and as background")
    if box is not None and len(foreground):
        outside = np.any((foreground < box[:, 0]) | (foreground > box[:, 1]), axis=1)
        if outside.any():
            raise PromptError(
                f"{name}: foreground click(s) {foreground[outside].tolist()} lie outside its box "
                f"{box[:, 0].tolist()}..{box[:, 1].tolist()}: the box and the clicks contradict each other"
            )
    if len(foreground):
        air = outside_body(hu, foreground, axis)
        if air.any():
            raise PromptError(f"{name}: foreground click(s) {foreground[air].tolist()} lie on the air outside the body")
    return AnyPrompts(foreground, background, box)


def outside_body(hu: np.ndarray, points: np.ndarray, axis: int = 2) -> np.ndarray:
    """(N,) bool: whether each voxel lies on the air outside the body, i.e. below BODY_HU and connected within its
    slice to the slice's border (the lungs' and bowel's air is enclosed by tissue)."""
    out = np.zeros(len(points), bool)
    for n, point in enumerate(np.asarray(points, int).reshape(-1, 3)):
        if hu[tuple(point)] > BODY_HU:
            continue
        plane = np.take(hu, point[axis], axis=axis) <= BODY_HU
        labels, _ = ndimage.label(plane)
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        rc = tuple(v for a, v in enumerate(point) if a != axis)
        out[n] = labels[rc] in set(border.tolist()) - {0}
    return out


def _crop(points: np.ndarray, box: np.ndarray | None, margin: np.ndarray, shape) -> tuple[slice, ...]:
    """The prompts' box (the user's box itself when given) widened by ``margin`` voxels ((3, 2): below and above
    per axis), inside the image."""
    if box is not None:
        low, high = box[:, 0] - margin[:, 0], box[:, 1] + margin[:, 1]
    else:
        low, high = points.min(axis=0) - margin[:, 0], points.max(axis=0) + margin[:, 1]
    low, high = np.maximum(low, 0), np.minimum(high + 1, np.array(shape))
    return tuple(slice(int(a), int(b)) for a, b in zip(low, high))


def _band(smooth: np.ndarray, raw: np.ndarray, at: np.ndarray, spacing: np.ndarray, options: AnyOptions):
    """(low, high) HU of the structure under one click: median of the smoothed image within sample_mm, half-width
    band_sigmas robust (MAD) standard deviations of the raw image there, kept within [band_min, band_max]."""
    reach = np.maximum(np.round(options.sample_mm / spacing).astype(int), 0)
    window = tuple(slice(max(0, c - r), c + r + 1) for c, r in zip(at, reach))
    centre = float(np.median(smooth[window]))
    values = raw[window].astype(np.float64)
    sigma = 1.4826 * float(np.median(np.abs(values - np.median(values))))
    if centre < BODY_HU:  # air (a lung, an airway, bowel gas): everything darker, up to the tissue around it
        return -np.inf, min(centre + options.air_band_hu, BODY_HU)
    half = min(max(options.band_sigmas * sigma, options.band_min_hu), options.band_max_hu)
    return centre - half, centre + half


def _open(mask: np.ndarray, radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    """Morphological opening by a ball of ``radius_mm`` (anisotropic spacing), via distance maps."""
    if radius_mm <= 0 or not mask.any():
        return mask
    core = ndimage.distance_transform_edt(mask, sampling=spacing) > radius_mm
    if not core.any():
        return mask
    return mask & (ndimage.distance_transform_edt(~core, sampling=spacing) <= radius_mm + 1e-6)


def _component_at(mask: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The components of ``mask`` holding any of ``points``."""
    labels, _ = ndimage.label(mask)
    hit = np.unique(labels[tuple(points.T)]) if len(points) else np.zeros(0, int)
    hit = hit[hit > 0]
    return np.isin(labels, hit) if len(hit) else np.zeros(mask.shape, bool)


def _grow_one(
    candidate: np.ndarray, at: np.ndarray, spacing: np.ndarray, options: AnyOptions, air: bool = False
) -> np.ndarray:
    """The structure under one click: its component of the band (worked on in that component's box), see
    ``_shape_blob``."""
    part = _component_at(candidate, at[None])
    if not part.any():
        return part
    box = mask_extent(part)
    out = np.zeros(part.shape, bool)
    out[box] = _shape_blob(part[box], at - np.array([s.start for s in box]), spacing, options, air)
    return out


def _shape_blob(part: np.ndarray, at: np.ndarray, spacing: np.ndarray, options: AnyOptions, air: bool) -> np.ndarray:
    """The component ``part`` opened at a fraction of its thickness at the click, then cut into blobs at its necks
    (watershed of the distance map from maxima deeper than their surroundings by split_fraction of the thickness at
    the click), and the blob under the click."""
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    depth = ndimage.distance_transform_edt(np.pad(part, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    thickness = float(depth[tuple(at)])
    radius = min(options.open_fraction * thickness, options.open_max_mm)
    opened = _open(part, radius, spacing)
    kept = _component_at(opened, at[None])
    if not kept.any() or options.split_fraction <= 0:
        return kept if kept.any() else part
    depth = ndimage.distance_transform_edt(np.pad(kept, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    thickness = float(depth[tuple(at)])
    if air:  # in a lung the click may sit beside a vessel: the deepest voxel within 2 x its depth + 10 mm counts
        reach = np.ceil((2.0 * thickness + 10.0) / spacing).astype(int)
        thickness = float(depth[tuple(slice(max(0, c - r), c + r + 1) for c, r in zip(at, reach))].max())
    height = max(options.split_min_mm, options.split_fraction * thickness)
    peaks, _ = ndimage.label(h_maxima(depth.astype(np.float32), height))
    if peaks.max() <= 1:
        return kept
    blobs = watershed(-depth, peaks, mask=kept)
    return blobs == blobs[tuple(at)]


def _fill(mask: np.ndarray, axis: int) -> np.ndarray:
    """Holes filled in 3D and in every slice along ``axis`` (vessels inside a lung, a cyst inside a liver)."""
    mask = ndimage.binary_fill_holes(mask)
    out = np.moveaxis(mask, axis, 0)
    for k in np.flatnonzero(out.any(axis=(1, 2))):
        out[k] = ndimage.binary_fill_holes(out[k])
    return np.moveaxis(out, 0, axis)


def _seeds_from_box(smooth: np.ndarray, box_local: np.ndarray, quantiles=(0.5, 0.25, 0.75)) -> list[np.ndarray]:
    """Clicks a box alone may stand for: for each intensity quantile of the box's central third, its voxel nearest
    to the centre with about that intensity (the structure a box is drawn around fills its centre)."""
    third = tuple(
        slice(int(lo + (hi - lo) // 3), int(hi - (hi - lo) // 3) + 1)
        for lo, hi in zip(box_local[:, 0], box_local[:, 1])
    )
    centre_part = smooth[third]
    grid = np.indices(centre_part.shape).reshape(3, -1).T
    middle = (np.array(centre_part.shape) - 1) / 2.0
    off_centre = np.linalg.norm((grid - middle) / (middle + 1), axis=1)
    seeds = []
    for q in quantiles:
        target = float(np.quantile(centre_part, q))
        best = grid[int(np.argmin(np.abs(centre_part.ravel() - target) / 10.0 + off_centre))]
        seeds.append(best + np.array([s.start for s in third]))
    return seeds


def grow_crop(
    hu: np.ndarray, spacing: np.ndarray, at: np.ndarray, box: np.ndarray | None, axis: int, options: AnyOptions
) -> np.ndarray:
    """The blob under one click ``at`` on the crop ``hu`` (indices of the crop; the box bounds it): bool, crop
    shape."""
    raw = hu.astype(np.float32, copy=False)
    smooth = ndimage.gaussian_filter(raw, sigma=options.smooth_mm / spacing) if options.smooth_mm else raw
    inside_box = None
    if box is not None:
        inside_box = np.zeros(raw.shape, bool)
        inside_box[tuple(slice(int(lo), int(hi) + 1) for lo, hi in box)] = True
    low, high = _band(smooth, raw, at, spacing, options)
    candidate = (smooth >= low) & (smooth <= high)
    if inside_box is not None:
        candidate &= inside_box
    mask = _fill(_grow_one(candidate, at, spacing, options, air=low == -np.inf), axis)
    if inside_box is not None:
        mask &= inside_box
    mask[tuple(at)] = True
    return mask


def _edges_touched(mask: np.ndarray, region: tuple[slice, ...], shape) -> np.ndarray:
    """(3, 2) bool: whether the mask reaches the crop's low / high side along each axis where that side is not the
    image's."""
    out = np.zeros((3, 2), bool)
    for a, s in enumerate(region):
        out[a, 0] = s.start > 0 and bool(np.take(mask, 0, axis=a).any())
        out[a, 1] = s.stop < shape[a] and bool(np.take(mask, mask.shape[a] - 1, axis=a).any())
    return out


def _steps(region: tuple[slice, ...], axis: int, budget: int) -> np.ndarray:
    """Per file axis the sampling step of the working grid: 1 along ``axis``, in the slice plane the smallest
    integer keeping the crop within ``budget`` voxels (1 for any crop that fits: small structures stay at the
    scan's resolution)."""
    size = int(np.prod([s.stop - s.start for s in region]))
    step = max(1, int(np.ceil(np.sqrt(size / budget))))
    return np.array([1 if a == axis else step for a in range(3)])


def _block_mean(image: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Mean over blocks of ``step`` voxels (the last partial block of each axis dropped)."""
    if np.all(step == 1):
        return image.astype(np.float32)
    whole = tuple(slice(0, (n // s) * s) for n, s in zip(image.shape, step))
    part = image[whole].astype(np.float32)
    shape = [v for n, s in zip(part.shape, step) for v in (n // s, s)]
    return part.reshape(shape).mean(axis=(1, 3, 5))


def _upsample(mask: np.ndarray, step: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A working-grid mask back on the crop's voxels (blocks repeated, edges extended)."""
    if np.all(step == 1):
        return mask
    out = mask
    for a, s in enumerate(step):
        out = np.repeat(out, s, axis=a)
    pad = [(0, max(0, n - o)) for n, o in zip(shape, out.shape)]
    return np.pad(out, pad, mode="edge")[tuple(slice(0, n) for n in shape)]


def box_seeds(
    hu: np.ndarray, spacing, box: np.ndarray, axis: int = 2, options: AnyOptions | None = None
) -> list[np.ndarray]:
    """The clicks a box alone may stand for (file indices): see ``_seeds_from_box``, on the box's working grid."""
    options = options or AnyOptions()
    region = tuple(slice(int(lo), int(hi) + 1) for lo, hi in box)
    step = _steps(region, axis, options.grid_voxels)
    small = _block_mean(hu[region], step)
    spacing = np.asarray(spacing, np.float64) * step
    smooth = ndimage.gaussian_filter(small, sigma=options.smooth_mm / spacing) if options.smooth_mm else small
    local = np.stack([np.zeros(3, int), np.array(small.shape) - 1], axis=1)
    return [np.minimum(box[:, 0] + seed * step, box[:, 1]) for seed in _seeds_from_box(smooth, local)]


def box_fit(region: tuple[slice, ...], blob: np.ndarray, box: np.ndarray) -> float:
    """How well a blob answers its box: the share of the box its own box spans, less how far it fills more than
    3/4 of the box (a band that took everything in the box)."""
    if not blob.any():
        return -1.0
    idx = np.argwhere(blob) + np.array([s.start for s in region])
    span = np.prod(idx.max(axis=0) - idx.min(axis=0) + 1) / np.prod(box[:, 1] - box[:, 0] + 1)
    fill = blob.sum() / np.prod(box[:, 1] - box[:, 0] + 1)
    return float(span - 2.0 * max(0.0, fill - 0.75))


def grow_blob(
    hu: np.ndarray, spacing, at: np.ndarray, box: np.ndarray | None, axis: int = 2, options: AnyOptions | None = None
) -> tuple[tuple[slice, ...], np.ndarray]:
    """(region, mask on it) of the blob under the click ``at`` (file indices), inside ``box`` if given. The crop
    starts at the click (or the box) plus margin_mm and, once, reaches the image's edge on each side the blob
    reaches (up to max_crop_voxels); a box is the crop. A crop above grid_voxels is worked on in blocks of the slice
    plane and the mask repeated back."""
    options = options or AnyOptions()
    spacing = np.asarray(spacing, np.float64)
    points = np.asarray(at, int)[None]
    margin = np.repeat(np.ceil(options.margin_mm / spacing).astype(int)[:, None], 2, axis=1)
    if box is not None:
        margin = np.zeros((3, 2), int)
    while True:
        region = _crop(points, box, margin, hu.shape)
        origin = np.array([s.start for s in region])
        step = _steps(region, axis, options.grid_voxels)
        small = _block_mean(hu[region], step)
        limit = np.array(small.shape) - 1
        local_at = np.minimum((np.asarray(at, int) - origin) // step, limit)
        local_box = None if box is None else np.minimum((box - origin[:, None]) // step[:, None], limit[:, None])
        mask = grow_crop(small, spacing * step, local_at, local_box, axis, options)
        size = int(np.prod([s.stop - s.start for s in region]))
        touched = _edges_touched(mask, region, hu.shape)
        if box is not None or not touched.any() or size >= options.max_crop_voxels:
            mask = _upsample(mask, step, tuple(s.stop - s.start for s in region))
            mask[tuple(np.asarray(at, int) - origin)] = True
            return region, mask
        margin = np.where(touched, np.max(hu.shape), margin)  # grow to the image's edge on each side it reaches
