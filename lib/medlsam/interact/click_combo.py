"""Blobs or SAM, chosen per structure and request without ground truth (issue 30).

Every request computes the class-agnostic blob answer (``medlsam.interact.click_structure``). SAM's candidate
(``medlsam.interact.click_sam``, guided by that answer's extent) is computed only when the foreground clicks lie
mostly on what the SAM encoder sees: the median HU within SAMPLE_MM of at least half of them inside the encoder's
intensity window (air, lung, bone and dense contrast are saturated there, so they stay with the blobs). The
candidate is then kept when it honours every prompt of the structure (all its foreground clicks inside, all its
background clicks outside, inside its box) and SAM itself carried the object over at least as many slices as the
blob answer goes on beyond where SAM lost it (a low predicted IoU, a collapse, a leak, an empty mask); otherwise the
blob answer is kept. From the second request of a structure on, when its prompts extend the previous ones, the
previous answer is corrected only under the added clicks unless the new answer agrees with it elsewhere
(``medlsam.interact.click_update``): a choice that flips or a SAM walk that stops early no longer moves the answer
away from where the annotator clicked.
Nothing in the rule knows an organ.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from medlsam.interact.click_any import AnyOptions, AnyPrompts
from medlsam.interact.click_sam import SamCache, SamOptions, sam_candidate
from medlsam.interact.click_structure import AnyCache, Region, _prompt_key, segment_structure
from medlsam.interact.click_update import CHANGE_ELSEWHERE, added_clicks, corrected, points_inside

SAMPLE_MM = 3.0  # radius around a click whose median HU decides whether SAM sees it


@dataclass
class ComboCache:
    """Per image: the blob cache, the SAM cache (None: blobs only) and the last choice per structure."""

    any: AnyCache = field(default_factory=AnyCache)
    sam: SamCache | None = None
    choices: dict = field(default_factory=dict)  # name -> "sam", "blobs: hu", "blobs: prompts" or "blobs: lost"
    # (", local" added where only the added clicks' parts were taken)
    structures: dict = field(default_factory=dict)  # name -> (prompt key, prompts, region, mask, choice)


def sam_sees(hu: np.ndarray, spacing, points: np.ndarray, window: tuple[float, float]) -> bool:
    """Whether at least half of the clicks' neighbourhoods (median HU within SAMPLE_MM) lie inside the encoder's
    window: the structure is mostly what SAM sees (a later click on gas inside a stomach does not turn it to air)."""
    spacing = np.asarray(spacing, np.float64)
    reach = np.maximum(np.round(SAMPLE_MM / spacing).astype(int), 0)
    seen = []
    for point in np.asarray(points, int).reshape(-1, 3):
        around = hu[tuple(slice(max(0, c - r), c + r + 1) for c, r in zip(point, reach))]
        seen.append(window[0] <= float(np.median(around)) <= window[1])
    return bool(seen) and 2 * sum(seen) >= len(seen)


def honours(region: Region, mask: np.ndarray, fg: np.ndarray, bg: np.ndarray) -> bool:
    """Whether the mask holds every foreground click and no background click (file indices)."""
    if not mask.any():
        return False
    origin = np.array([s.start for s in region])
    inside = [points_inside(mask, np.asarray(p, int).reshape(-1, 3) - origin) for p in (fg, bg)]
    return bool(inside[0].all() and not inside[1].any())


def segment_combo(
    hu: np.ndarray,
    spacing,
    prompts: AnyPrompts,
    axis: int = 2,
    options: AnyOptions | None = None,
    cache: ComboCache | None = None,
    name: str = "",
    sam_options: SamOptions | None = None,
    change_elsewhere: float = CHANGE_ELSEWHERE,
) -> tuple[Region, np.ndarray, str]:
    """(region, mask on it, the choice) for the structure the prompts point at (see the module's rule). A structure
    whose prompts are those of its last call is answered from the cache."""
    options = options or AnyOptions()
    cache = cache if cache is not None else ComboCache()
    key = _prompt_key(prompts, options)
    stored = cache.structures.get(name)
    if stored is not None and stored[0] == key:
        return stored[2], stored[3].copy(), stored[4]
    blobs = segment_structure(hu, spacing, prompts, axis, options, cache.any, name)
    fg = np.asarray(prompts.foreground, int).reshape(-1, 3)
    bg = np.asarray(prompts.background, int).reshape(-1, 3)
    seen = fg  # where SAM would look: a box's seed click (its guess of the structure) stands for the box
    if prompts.box is not None:
        seen = np.concatenate([cache.any.seed(hu, spacing, prompts.box, axis, options)[None], fg])
    candidates, choice = [blobs], "blobs: hu"
    if cache.sam is not None and sam_sees(hu, spacing, seen, cache.sam.embeddings.window):
        sam = sam_candidate(cache.sam, fg, bg, blobs, axis, prompts.box, sam_options)  # SAM takes the box itself
        if not honours(*sam, fg, bg):
            candidates, choice = [blobs, sam], "blobs: prompts"
        elif cache.sam.filled > cache.sam.carried:
            candidates, choice = [blobs, sam], "blobs: lost"
        else:
            candidates, choice = [sam, blobs], "sam"
    region, blob = candidates[0]
    added = None if stored is None else added_clicks(stored[1], prompts)
    if added is not None:  # a later click: the previous answer corrected where it points
        region, blob, how = corrected((stored[2], stored[3]), candidates, prompts, added, spacing, change_elsewhere)
        choice += ", local" if how == "local" else ""
    cache.choices[name] = choice
    cache.structures[name] = (key, prompts, region, blob.copy(), choice)
    return region, blob, choice
