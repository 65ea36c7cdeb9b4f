"""Is a matched organ really there? Cues of the template matching, and the decision that says not found.

Template matching (``medlsam.medlam.matching``) always finds *a* best place for each template's neighbourhood within its
search radius, also in a scan that does not hold the organ (a head-and-neck bank on a chest CT put the mandible on
the contrast-filled heart). ``organ_cues`` measures, from what matching already computed, how much the query looks
like the templates there:

- ``ncc``: the median NCC of the templates' neighbourhoods at their matches (the organ's ``match_score``);
- ``spread_mm``: how far the templates' matched organ centres lie from the organ box's centre (median over
  templates, mm): where the organ is there, every template finds the same place; where it is not, each template
  finds its own look-alike (None with one template);
- ``intensity``: overlap (sum of the minima, 0..1) of the query's intensity histogram inside the placed template
  organ masks with the templates' own organ histogram (``medlsam.atlas.prior.intensity_histograms``): bone where the
  templates have bone, fat where they have fat;
- ``organ_ncc``: the correlation of template and query intensities over the organ and 9 mm around it only
  (``medlsam.atlas.prior.placement_match``, median over templates);
- ``body``: Dice of the body (above -500 HU) of the templates' neighbourhoods and of the query there, median over
  templates: the organ's position relative to the skin and the air;
- ``body_width`` and ``body_depth``: the body's width (and depth) around the organ against its templates' (the
  median of ``OrganTemplate.body_mm``), on the organ box's first, middle and last slice (``body_profile``), the
  median of the three ratios (``body_widths``): 1 for the same body, about 2 for a head-and-neck organ placed in a
  chest or an abdomen (a cord or larynx whose box reaches the shoulders keeps the neck on its other slices);
- ``agreement``: how well the organ's templates match each other (``template_agreement``), the NCC a query that
  holds the organ can be expected to reach (computed only where the body is too wide).

``implausible`` turns them into the not-found reason (naming the cue and its value), or None. The rule and its
measured figures: ``medlsam.atlas.localize.LocalizeOptions`` and benchmarks/results/plausibility.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medlsam.atlas.prior import HISTOGRAM_BINS, intensity_histograms, placement_match
from medlsam.io.grid import GRID_SPACING_MM
from medlsam.medlam.matching import OrganPatch, window_region
from medlsam.medlam.patches import BODY_THRESHOLD


@dataclass
class OrganCues:
    """The plausibility cues of one matched organ (see the module's docstring)."""

    ncc: float
    spread_mm: float | None
    intensity: float
    organ_ncc: float
    body: float
    body_depth: float | None
    body_width: float | None
    body_widths: list[float] | None  # the width ratio on the organ's first, middle and last slice
    templates: int
    agreement: float | None = None  # the templates' NCC among themselves (``template_agreement``), when needed

    def to_json(self) -> dict:
        def rounded(v):
            return None if v is None else [round(float(x), 4) for x in v] if isinstance(v, list) else round(float(v), 4)

        return {k: rounded(v) for k, v in self.__dict__.items()}


def body_size(array: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """The body's (depth, width) in mm on the grid slice of ``centre`` (grid coordinates): the bounding box of the
    largest connected part of the body (above -500 HU) whose box holds the centre (an arm or the table beside it
    left out), or of the largest part when none does; 0 outside the grid or on an empty slice."""
    z = int(np.clip(np.round(centre[0]), 0, array.shape[0] - 1))
    parts, count = ndimage.label(array[z] > BODY_THRESHOLD)
    if count == 0:
        return np.zeros(2)
    boxes = ndimage.find_objects(parts)
    sizes = np.bincount(parts.ravel())[1:]
    y, x = centre[1], centre[2]
    holding = [i for i, b in enumerate(boxes) if b[0].start <= y < b[0].stop and b[1].start <= x < b[1].stop]
    best = max(holding or range(count), key=lambda i: sizes[i])
    return np.array([boxes[best][0].stop - boxes[best][0].start, boxes[best][1].stop - boxes[best][1].start]) * (
        GRID_SPACING_MM
    )


def body_profile(array: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """``body_size`` (3, 2) on the first, middle and last grid slice of an organ box (grid coordinates), at the
    box's in-plane centre: the body all along the organ (a long organ such as the cord crosses the shoulders)."""
    low, high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    centre = (low + high) / 2
    return np.stack([body_size(array, np.array([z, centre[1], centre[2]])) for z in (low[0], centre[0], high[0])])


def _bins(values: np.ndarray) -> np.ndarray:
    return np.clip((values * HISTOGRAM_BINS).astype(int), 0, HISTOGRAM_BINS - 1).ravel()


def organ_cues(
    array: np.ndarray,
    patches: list[OrganPatch],
    corners: list[np.ndarray],
    scores: list[float],
    box: np.ndarray,
    body_mm: list | None = None,
) -> OrganCues:
    """The cues of an organ whose template ``patches`` matched the query grid ``array`` at ``corners`` with NCC
    ``scores``, the organ box ``box`` (``medlsam.medlam.matching.match_organ``); ``body_mm``: the templates' body sizes
    at the organ (``OrganTemplate.body_mm``)."""
    centres, organ_ncc, body = [], [], []
    query_hist = np.zeros(HISTOGRAM_BINS)
    for patch, corner in zip(patches, corners):
        corner = np.asarray(corner, dtype=int)
        mask, intensities = patch.mask.float().numpy(), patch.intensities.float().numpy()
        patch_box = patch.box.numpy()
        centres.append(corner + (patch_box[0] + patch_box[1]) / 2)
        query = window_region(array, corner, np.array(mask.shape))
        query_hist += np.bincount(_bins(query), weights=mask.ravel(), minlength=HISTOGRAM_BINS)
        organ_ncc.append(placement_match(array, [(mask, intensities, corner)]))
        a, b = intensities > BODY_THRESHOLD, query > BODY_THRESHOLD
        body.append(2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0))
    organ_hist, _ = intensity_histograms(patches)
    query_hist = query_hist / max(query_hist.sum(), 1e-9)
    centres = np.array(centres)
    spread = None
    if len(centres) > 1:
        spread = float(np.median(np.linalg.norm(centres - np.median(centres, axis=0), axis=1)) * GRID_SPACING_MM)
    ratio, widths = [None, None], None
    if body_mm:
        template = np.median(np.asarray(body_mm, dtype=np.float64).reshape(len(body_mm), -1, 2), axis=0)
        query = body_profile(array, box[0], box[1])[: len(template)]
        levels = np.maximum(query, 1.0) / np.maximum(template, 1.0)
        ratio = np.median(levels, axis=0).tolist()
        widths = levels[:, 1].tolist()
    return OrganCues(
        ncc=float(np.median(scores)),
        spread_mm=spread,
        intensity=float(np.minimum(query_hist, organ_hist).sum()),
        organ_ncc=float(np.median(organ_ncc)),
        body=float(np.median(body)),
        body_depth=ratio[0],
        body_width=ratio[1],
        body_widths=widths,
        templates=len(patches),
    )


def template_agreement(patches: list[OrganPatch], radius: int = 2) -> float | None:
    """How well an organ's templates match each other: the median over ordered pairs of the NCC of one template's
    neighbourhood matched (within ``radius`` voxels) inside another's, organ centre on organ centre; the NCC a
    query that holds the organ can be expected to reach. None with fewer than two templates."""
    from medlsam.medlam.matching import match_patch

    if len(patches) < 2:
        return None
    scores = []
    for i, patch in enumerate(patches):
        for j, other in enumerate(patches):
            if i != j:
                box = other.box.numpy()
                scores.append(match_patch(other.intensities.float().numpy(), patch, (box[0] + box[1]) / 2, radius)[1])
    return float(np.median(scores))


_AGREEMENT: dict[int, tuple[list, float | None]] = {}  # id of a bank organ's patch list -> (that list, agreement)


def cached_agreement(patches: list[OrganPatch]) -> float | None:
    """``template_agreement`` of a bank organ's patches, computed once per bank organ (a few hundred kept)."""
    hit = _AGREEMENT.get(id(patches))
    if hit is None or hit[0] is not patches:
        if len(_AGREEMENT) >= 256:
            _AGREEMENT.pop(next(iter(_AGREEMENT)))
        hit = _AGREEMENT[id(patches)] = (patches, template_agreement(patches))
    return hit[1]


def implausible(cues: OrganCues, options) -> str | None:
    """The not-found reason of a matched organ with these cues under ``options`` (``LocalizeOptions``), or None.

    The organ sits in a body ``options.max_body_width`` times or more as wide as its templates' at the organ (a
    head-and-neck organ in a chest or an abdomen) and its match is no better than its templates match each other
    (``cues.agreement``; an organ with one template has no such reference: the body decides alone). A narrower
    body does not count: a field of view cropped to the planning region (OpenKBP) narrows the body around organs
    that are there."""
    width, limit = cues.body_width, options.max_body_width
    if width is None or limit <= 0 or width < limit:
        return None
    if cues.templates <= 1:
        return f"body {width:.1f}x as wide as the template's at the organ (limit {limit}; one template)"
    if cues.agreement is not None and cues.ncc < cues.agreement:
        return (
            f"body {width:.1f}x as wide as the templates' at the organ (limit {limit}) and template match "
            f"{cues.ncc:.2f} below the templates' agreement {cues.agreement:.2f}"
        )
    return None
