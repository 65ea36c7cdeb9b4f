"""What LiteMedSAM's adaptation learns from (``medlsam.segment.adapt``): the templates' organ slices, each prompted
as inference would prompt it on an unseen scan (the prior of a bank of the *other* templates), with its
frozen-encoder embedding."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from medlsam.atlas.bank_builder import BankBuilder, Template
from medlsam.atlas.calibration import MAX_HELD_OUT, choose_cuts, cut_scores, held_out_locations
from medlsam.atlas.prior import calibrated
from medlsam.errors import TemplateError
from medlsam.io.volume import CTVolume, load_ct, read_volume
from medlsam.segment.prompts import prompts_for
from medlsam.segment.sam.segmenter import Embedding, SamFamilySegmenter
from medlsam.segment.sam.slices import DEFAULT_WINDOW, SliceEmbeddings
from medlsam.utils.metrics import cranio_caudal_axis

logger = logging.getLogger(__name__)

MIN_TEMPLATES = 2  # leave-one-out priors need another template
MIN_ORGAN_SLICES = 8  # fewer (organ, slice) examples in all: too small to adapt on
ADAPTED_BACKENDS = ("lite_medsam",)


@dataclass
class AdaptOptions:
    """Knobs of the adaptation (defaults: measured on OpenKBP train scans that are not templates)."""

    steps: int = 120  # optimiser steps
    fold_steps: int = 30  # steps of each of the two fold models that choose the prior weights
    slices_per_step: int = 4  # template slices per step (all their organs' prompts)
    learning_rate: float = 1e-4
    slice_step: int = 3  # encode every n-th organ slice of each template
    mask_prompt: bool = True  # the prior as SAM's mask prompt with the box (then inference does the same)
    mask_dropout: float = 0.2  # share of training steps without mask prompts (so boxes alone still work)
    truth_box_share: float = 0.3  # share of prompts with a jittered true box instead of the prior's box
    jitter: float = 0.15  # true box sides moved by up to this fraction of the box side (+1 px)
    prior_box_threshold: float = 0.5  # as SegmentOptions: the prior's box at this level
    window: tuple[float, float] = DEFAULT_WINDOW
    seed: int = 0
    time_limit_s: float = 0.0  # stop training after this many seconds (0: no limit)
    # bfloat16 autocast for the training steps (the loss and the weights stay float32): None where the hardware
    # runs it natively (medlsam.medlam.precision), True / False always / never. Scoring and inference stay float32.
    bf16: bool | None = None


@dataclass
class OrganSlice:
    """One organ on one template slice, in the encoder's display orientation."""

    organ: str
    target: np.ndarray  # (H, W) bool, the true mask
    truth_box: np.ndarray | None  # (4,) x0, y0, x1, y1 of the true mask, None if empty
    prior_box: np.ndarray | None  # (4,) the leave-one-out prior's box on this slice, None if it has none
    prior: np.ndarray | None  # (H, W) float32 leave-one-out prior probability


@dataclass
class TrainingSlice:
    source: str
    k: int
    embedding: Embedding  # float16 features, to keep hundreds of slices in memory
    organs: list[OrganSlice] = field(default_factory=list)


def _names_by_value(names: dict[int, str], bank) -> dict[str, int]:
    return {name: int(organ.value) for name, organ in bank.organs.items()}


def _stem(source) -> str:
    return Path(str(source)).name.split(".")[0]


def training_slices(
    medlam,
    images: list,
    labels: list,
    names: dict[int, str],
    segmenter: SamFamilySegmenter,
    options: AdaptOptions | None = None,
    cache_dir: str | Path | None = None,
    banks: list | None = None,
) -> list[TrainingSlice]:
    """The templates' organ slices with leave-one-out prior prompts and frozen-encoder embeddings. ``banks``: each
    template's own bank when the caller has them (the app caches them), else built here."""
    opt = options or AdaptOptions()
    if len(images) != len(labels):
        raise TemplateError(f"{len(images)} template images need as many labels, got {len(labels)}")
    if len(images) < MIN_TEMPLATES:
        raise TemplateError(
            f"adaptation needs at least {MIN_TEMPLATES} labelled templates (each one's prior comes from the "
            f"others), got {len(images)}"
        )
    volumes = [img if isinstance(img, CTVolume) else load_ct(img) for img in images]
    label_volumes = [lab if isinstance(lab, CTVolume) else read_volume(lab) for lab in labels]
    for volume, label in zip(volumes, label_volumes):
        if label.array.shape != volume.array.shape:
            raise TemplateError(
                f"template {volume.source}: label shape {label.array.shape} differs from the image's "
                f"{volume.array.shape}"
            )
    tic = time.perf_counter()
    folders = [None if cache_dir is None else Path(cache_dir) / _stem(v.source) for v in volumes]
    if banks is None:
        banks = [
            BankBuilder(medlam, folder).template_bank(Template(_stem(v.source), image, label, names))
            for image, label, v, folder in zip(images, labels, volumes, folders)
        ]
    elif len(banks) != len(volumes):
        raise TemplateError(f"{len(volumes)} templates but {len(banks)} banks")
    logger.info(f"adapt: {len(banks)} one-template banks in {time.perf_counter() - tic:.1f} s")
    held_out = [held_out_locations(medlam, banks, i, volume) for i, volume in enumerate(volumes)]
    values = [_names_by_value(names, bank) for bank in banks]
    scored = list(zip(held_out, label_volumes, values))[:MAX_HELD_OUT]  # the templates the bank's cuts come from
    cuts = choose_cuts([cut_scores(h, lab.array, v) for h, lab, v in scored])
    logger.info(f"adapt: {len(volumes)} templates localised with the others' banks; prior cuts {cuts}")
    out: list[TrainingSlice] = []
    for i, (volume, label) in enumerate(zip(volumes, label_volumes)):
        located = {  # the priors as inference gives them: calibrated by the cuts the bank would choose
            o: loc if loc.prior is None else replace(loc, prior=calibrated(loc.prior, cuts.get(o, 0.5)))
            for o, loc in held_out[i].items()
        }
        if located:
            out += _template_slices(volume, label, located, values[i], segmenter, opt, folders[i])
    examples = sum(1 for s in out for o in s.organs if o.truth_box is not None)
    if examples < MIN_ORGAN_SLICES:
        raise TemplateError(
            f"the templates are too small to adapt on: {examples} (organ, slice) examples with a true mask, "
            f"at least {MIN_ORGAN_SLICES} needed"
        )
    return out


def _template_slices(
    volume: CTVolume,
    label: CTVolume,
    located: dict,
    values: dict[str, int],
    segmenter: SamFamilySegmenter,
    opt: AdaptOptions,
    folder: Path | None,
) -> list[TrainingSlice]:
    """One template's training slices: every ``slice_step``-th slice with an organ (true or prompted), its
    embedding (float16) and each organ's target, boxes and prior there."""
    organs = list(located)
    out: list[TrainingSlice] = []
    axis = cranio_caudal_axis(volume.affine)
    embeddings = SliceEmbeddings(
        segmenter,
        volume,
        window=opt.window,
        axis=axis,
        cache_dir=folder,
    )
    prompts = {o: prompts_for(located[o], "prior", axis, volume.shape, True, opt.prior_box_threshold) for o in organs}
    truth = {o: label.array == values[o] for o in organs}
    truth_slices = {o: set(np.flatnonzero(np.moveaxis(truth[o], axis, 0).any(axis=(1, 2))).tolist()) for o in organs}
    ks = sorted({k for o in organs for k in truth_slices[o] | set(prompts[o].boxes)})
    ks = [k for k in ks if (k - ks[0]) % max(1, opt.slice_step) == 0] if ks else []
    shape = embeddings.slice_shape
    for k in ks:
        entry = TrainingSlice(str(volume.source), int(k), embeddings.get(k))
        embeddings.discard(k)
        entry.embedding = Embedding(
            entry.embedding.features.half(),
            entry.embedding.original_size,
            entry.embedding.input_size,
            entry.embedding.backend,
        )
        for o in organs:
            p = prompts[o]
            if k not in truth_slices[o] and k not in p.boxes:
                continue
            target = embeddings.to_display(np.take(truth[o], k, axis=axis))
            rows, cols = np.flatnonzero(target.any(axis=1)), np.flatnonzero(target.any(axis=0))
            truth_box = np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.float64) if rows.size else None
            prior_box = embeddings.boxes_to_display(p.boxes[k][None], shape)[0] if k in p.boxes else None
            prior = p.prior.slice(axis, k, shape) if p.prior is not None else None
            entry.organs.append(
                OrganSlice(o, target, truth_box, prior_box, None if prior is None else embeddings.to_display(prior))
            )
        if entry.organs:
            out.append(entry)
    logger.info(
        f"adapt: template {Path(str(volume.source)).name}: {len(ks)} slices, {embeddings.encoder_calls} encoded"
    )
    return out


def _jittered(box: np.ndarray, shape: tuple[int, int], jitter: float, rng: np.random.Generator) -> np.ndarray:
    size = np.array([box[2] - box[0] + 1, box[3] - box[1] + 1] * 2, dtype=np.float64)
    moved = box + rng.uniform(-1, 1, 4) * (jitter * size + 1.0)
    moved[[0, 2]] = np.clip(np.sort(moved[[0, 2]]), 0, shape[1] - 1)
    moved[[1, 3]] = np.clip(np.sort(moved[[1, 3]]), 0, shape[0] - 1)
    return moved


def slice_prompts(
    entry: TrainingSlice, options: AdaptOptions, rng: np.random.Generator | None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Boxes (N, 4), mask prompts (N, H, W) or None and targets (N, H, W) for one training slice. With ``rng``:
    training prompts (the prior's box, or a jittered true box for ``truth_box_share`` of them); without: the
    prompts inference would give (the prior's box where it has one)."""
    shape = entry.embedding.original_size
    boxes, masks, targets = [], [], []
    for o in entry.organs:
        use_truth = o.prior_box is None or (
            rng is not None and o.truth_box is not None and rng.random() < options.truth_box_share
        )
        if use_truth and o.truth_box is None:
            continue
        if use_truth:
            box = _jittered(o.truth_box, shape, options.jitter, rng) if rng is not None else o.truth_box
        else:
            box = o.prior_box
        boxes.append(box)
        masks.append(o.prior if o.prior is not None else np.zeros(shape, np.float32))
        targets.append(o.target)
    if not boxes:
        return np.zeros((0, 4)), None, np.zeros((0, *shape), bool)
    return np.array(boxes), (np.array(masks) if options.mask_prompt else None), np.array(targets)
