"""Each organ's prior cut, chosen on the templates themselves by leaving one template out.

The prior (``medlsam.atlas.prior``) is the mean of the templates' placed masks weighed by their intensity model; cut at
0.5 it over- or under-fills some organs systematically (a thin bone like the mandible is over-filled by its bright
neighbours, an air-filled larynx under-filled). Every template is also an annotated example: ``prior_cuts``
localises each template with a bank of the *others*, scores the Dice of its held-out prior cut at each of ``CUTS``
and keeps, per organ, the cut nearest 0.5 among those within ``TOLERANCE`` of the best mean (few templates make the
best cut noisy, so 0.5 wins ties). ``medlsam.atlas.prior.calibrated`` then maps the organ's cut to 0.5, so the whole
segmentation stage (prior boxes, blend, mask prompt) sees a prior whose 0.5 is the templates' best cut. Measured on
OpenKBP train scans that are not templates: benchmarks/notes/segmentation.md.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from medlsam.atlas.localize import Localizer
from medlsam.atlas.templates import TemplateBank, merge_banks
from medlsam.errors import TemplateError
from medlsam.io.volume import CTVolume, load_ct, read_volume
from medlsam.utils.metrics import dice

logger = logging.getLogger(__name__)

CUTS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
TOLERANCE = 0.01  # mean held-out Dice within this of the best counts as a tie
MIN_TEMPLATES = 3  # fewer: each held-out prior would come from a single template, unlike the bank's own
MAX_HELD_OUT = 8  # templates held out in turn (the first ones): enough to choose a cut, bounded in time


def choose_cut(scores: list[list[float]]) -> float:
    """The cut for one organ from its held-out Dice per template and cut (rows: templates, columns: ``CUTS``)."""
    mean = np.asarray(scores, dtype=np.float64).mean(axis=0)
    good = [cut for cut, score in zip(CUTS, mean) if score >= mean.max() - TOLERANCE]
    return float(min(good, key=lambda cut: (abs(cut - 0.5), cut)))


def cut_scores(located: dict, label: np.ndarray, values: dict[str, int]) -> dict[str, list[float]]:
    """Per organ of ``located`` (name -> OrganLocation) with voxels in ``label``, the Dice of its prior (none: not
    found) cut at each of ``CUTS``."""
    scores = {}
    for name, location in located.items():
        truth = label == values[name]
        if not truth.any():
            continue
        probabilities = np.zeros(truth.shape, np.float32)
        if location.prior is not None:
            probabilities[location.prior.region()] = location.prior.probabilities
        scores[name] = [dice(probabilities >= cut, truth) for cut in CUTS]
    return scores


def choose_cuts(per_template: list[dict[str, list[float]]]) -> dict[str, float]:
    """Per organ scored on at least two held-out templates (``cut_scores`` of each), its chosen cut; {} with fewer
    than ``MIN_TEMPLATES`` templates."""
    if len(per_template) < MIN_TEMPLATES:
        return {}
    rows: dict[str, list[list[float]]] = {}
    for scores in per_template:
        for name, row in scores.items():
            rows.setdefault(name, []).append(row)
    return {name: choose_cut(r) for name, r in rows.items() if len(r) >= 2}


def held_out_locations(medlam, banks: list[TemplateBank], i: int, volume: CTVolume, options=None) -> dict:
    """Template ``i``'s organs (name -> OrganLocation, with its prior), localised with a bank merged from the
    other templates' one-template ``banks`` (and the localiser's ``options``): what an unseen scan would get."""
    others = merge_banks([b for j, b in enumerate(banks) if j != i])
    organs = [name for name in banks[i].organs if name in others.organs]
    if not organs:
        return {}
    located = Localizer(medlam, others, options).localize(volume, organs, mode="wpl", prior=True)["organs"]
    return {name: located[name] for name in organs}


def prior_cuts(
    medlam,
    banks: list[TemplateBank],
    images: list,
    labels: list,
    cancel: threading.Event | None = None,
    options=None,
) -> dict[str, float]:
    """Per organ held out on at least two templates, its chosen cut (the first ``MAX_HELD_OUT`` templates held out
    in turn, localised with the ``LocalizeOptions`` that will serve, the defaults when None); {} with fewer than
    ``MIN_TEMPLATES``."""
    if len(banks) != len(images) or len(banks) != len(labels):
        raise TemplateError(f"{len(banks)} template banks, {len(images)} images and {len(labels)} labels differ")
    if len(banks) < MIN_TEMPLATES:
        return {}
    tic = time.perf_counter()
    per_template = []
    for i in range(min(len(banks), MAX_HELD_OUT)):
        if cancel is not None and cancel.is_set():
            raise CalibrationCancelled()
        volume = images[i] if isinstance(images[i], CTVolume) else load_ct(images[i])
        label = labels[i] if isinstance(labels[i], CTVolume) else read_volume(labels[i])
        values = {name: organ.value for name, organ in banks[i].organs.items()}
        per_template.append(cut_scores(held_out_locations(medlam, banks, i, volume, options), label.array, values))
    cuts = choose_cuts(per_template)
    logger.info(f"prior cuts {cuts} from {len(per_template)} held-out templates in {time.perf_counter() - tic:.1f} s")
    return cuts


def with_cuts(bank: TemplateBank, cuts: dict[str, float]) -> TemplateBank:
    """``bank`` with each named organ's prior cut set (the others keep theirs)."""
    for name, cut in cuts.items():
        if name in bank.organs:
            bank.organs[name].prior_cut = float(cut)
    return bank


class CalibrationCancelled(TemplateError):
    """The calibration stopped between templates because its caller cancelled it."""
