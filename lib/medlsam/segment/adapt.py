"""Adaptation of the slice segmenter to the templates: fine-tune LiteMedSAM's mask decoder and prompt encoder on
the templates' organ slices, prompted the way inference prompts it.

1. ``training_slices``: each template is localised with a bank of the *other* templates (leave one out), so its
   organ prior, the prior's slice boxes and the prior as mask prompt are what inference would hand SAM on an
   unseen scan (the priors calibrated by the cuts those held-out priors choose, as the bank's are:
   ``medlsam.atlas.calibration``). Every organ slice is encoded once by the frozen image encoder (optionally cached on
   disk).
2. ``adapt_segmenter``: the decoder learns, on those cached embeddings, to turn (prior box or jittered true box,
   prior as mask prompt) into the true mask (binary cross-entropy + soft Dice on the slice grid).
3. ``save_adapted``: the whole model's weights plus a record (backend, templates, organs, options), written
   atomically; ``build_segmenter(checkpoint=...)`` loads them with ``weights_only=True`` and the pipeline reads
   the record (e.g. whether to give the prior as mask prompt).

The encoder is never trained, so adapted and shipped segmenters share slice embeddings.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medlsam.atlas.calibration import MAX_HELD_OUT, choose_cuts, cut_scores, held_out_locations
from medlsam.atlas.prior import calibrated
from medlsam.atlas.templates import build_bank, load_bank
from medlsam.errors import MedLSAMError, TemplateError
from medlsam.io.volume import CTVolume, load_ct, read_volume
from medlsam.medlam.precision import use_bf16
from medlsam.segment.prompts import prompts_for
from medlsam.segment.sam.segmenter import Embedding, SamFamilySegmenter
from medlsam.segment.sam.slices import DEFAULT_WINDOW, SliceEmbeddings
from medlsam.utils.atomic import torch_save_atomic
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


def _one_bank(medlam, volume: CTVolume, label: CTVolume, names: dict[int, str], folder: Path | None):
    """The template's own bank (its prior for the others), kept in ``folder`` when given (keyed by the label's
    content; rebuilt for another MedLAM model)."""
    digest = hashlib.sha1(np.ascontiguousarray(label.array).tobytes()).hexdigest()[:12]
    path = None if folder is None else folder / f"bank_{digest}.pt"
    if path is not None and path.is_file():
        try:
            return load_bank(path, medlam)
        except TemplateError:
            pass
    bank = build_bank(medlam, [volume], [label], names)
    if path is not None:
        bank.save(path)
    return bank


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
        banks = [_one_bank(medlam, v, lab, names, f) for v, lab, f in zip(volumes, label_volumes, folders)]
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
        organs = list(located)
        if not organs:
            continue
        axis = cranio_caudal_axis(volume.affine)
        embeddings = SliceEmbeddings(
            segmenter,
            volume,
            window=opt.window,
            axis=axis,
            cache_dir=folders[i],
        )
        prompts = {
            o: prompts_for(located[o], "prior", axis, volume.shape, True, opt.prior_box_threshold) for o in organs
        }
        truth = {o: label.array == values[i][o] for o in organs}
        truth_slices = {
            o: set(np.flatnonzero(np.moveaxis(truth[o], axis, 0).any(axis=(1, 2))).tolist()) for o in organs
        }
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
            f"adapt: template {i + 1}/{len(volumes)} {Path(str(volume.source)).name}: {len(ks)} slices, "
            f"{embeddings.encoder_calls} encoded"
        )
    examples = sum(1 for s in out for o in s.organs if o.truth_box is not None)
    if examples < MIN_ORGAN_SLICES:
        raise TemplateError(
            f"the templates are too small to adapt on: {examples} (organ, slice) examples with a true mask, "
            f"at least {MIN_ORGAN_SLICES} needed"
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


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy + soft Dice (per prompt, smoothed so an empty target asks for an empty mask)."""
    bce = F.binary_cross_entropy_with_logits(logits, targets)
    probs = torch.sigmoid(logits).flatten(1)
    flat = targets.flatten(1)
    dice = 1 - (2 * (probs * flat).sum(1) + 1) / (probs.sum(1) + flat.sum(1) + 1)
    return bce + dice.mean()


def _trainable(segmenter: SamFamilySegmenter) -> list[torch.nn.Parameter]:
    model = segmenter.model
    for p in model.image_encoder.parameters():
        p.requires_grad_(False)
    params = [*model.mask_decoder.parameters(), *model.prompt_encoder.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def slice_dice(segmenter: SamFamilySegmenter, slices: list[TrainingSlice], options: AdaptOptions) -> float:
    """Mean 2D Dice of the segmenter's masks (threshold 0.5) with inference's prompts over the slices' organs
    that have a true mask."""
    scores = []
    with torch.inference_mode():
        for entry in slices:
            boxes, masks, targets = slice_prompts(entry, options, None)
            if not len(boxes):
                continue
            logits, _ = segmenter.decode_logits(entry.embedding, boxes, mask_inputs=masks)
            pred = (logits > 0).cpu().numpy()
            for p, t in zip(pred, targets):
                if t.any():
                    scores.append(2 * (p & t).sum() / (p.sum() + t.sum()))
    return float(np.mean(scores)) if scores else float("nan")


CHECK_SLICES = 64  # training slices the record's before/after Dice is scored on (a check that the decoder learnt)


def check_slices(slices: list[TrainingSlice]) -> list[TrainingSlice]:
    """At most ``CHECK_SLICES`` of the training slices, evenly spaced: where the record's template slice Dice before
    and after adaptation is scored (all 260 slices of the five protocol templates took 51 s, about 25 steps)."""
    return slices[:: -(-len(slices) // CHECK_SLICES)] if slices else []


def adapt_segmenter(
    segmenter: SamFamilySegmenter, slices: list[TrainingSlice], options: AdaptOptions | None = None
) -> dict:
    """Fine-tune the segmenter's mask decoder and prompt encoder in place on the training slices; returns the
    record of the run (losses, time)."""
    opt = options or AdaptOptions()
    if segmenter.name not in ADAPTED_BACKENDS:
        raise MedLSAMError(f"adaptation is built for {', '.join(ADAPTED_BACKENDS)}, not {segmenter.name}")
    if not slices:
        raise TemplateError("no template slices to adapt on")
    rng = np.random.default_rng(opt.seed)
    torch.manual_seed(opt.seed)
    params = _trainable(segmenter)
    optimiser = torch.optim.AdamW(params, lr=opt.learning_rate, weight_decay=1e-4)
    bf16 = use_bf16(opt.bf16, segmenter.device)
    losses = []
    tic = time.perf_counter()
    try:
        for step in range(opt.steps):
            optimiser.zero_grad()
            total, count = 0.0, 0
            for idx in rng.choice(len(slices), size=min(opt.slices_per_step, len(slices)), replace=False):
                entry = slices[int(idx)]
                boxes, masks, targets = slice_prompts(entry, opt, rng)
                if not len(boxes):
                    continue
                if rng.random() < opt.mask_dropout:
                    masks = None
                with torch.autocast(segmenter.device.type, dtype=torch.bfloat16, enabled=bf16):
                    logits, _ = segmenter.decode_logits(entry.embedding, boxes, mask_inputs=masks)
                loss = _loss(logits.float(), torch.from_numpy(targets.astype(np.float32)).to(logits.device))
                loss.backward()
                total, count = total + float(loss.detach()), count + 1
            if count:
                for p in params:
                    if p.grad is not None:
                        p.grad /= count
                optimiser.step()
                losses.append(total / count)
            if step % 50 == 0 or step == opt.steps - 1:
                logger.info(f"adapt: step {step + 1}/{opt.steps}, loss {np.mean(losses[-50:]):.4f}")
            if opt.time_limit_s and time.perf_counter() - tic > opt.time_limit_s:
                logger.info(f"adapt: time limit reached after {step + 1} steps")
                break
    finally:
        for p in params:
            p.requires_grad_(False)
        segmenter.model.eval()
    return {
        "steps": len(losses),
        "loss_first": float(np.mean(losses[:20])) if losses else None,
        "loss_last": float(np.mean(losses[-20:])) if losses else None,
        "train_s": round(time.perf_counter() - tic, 1),
        "bf16": bf16,
    }


def save_adapted(segmenter: SamFamilySegmenter, path: str | Path, record: dict) -> None:
    """The adapted weights and their record, atomically (a killed run leaves the previous file untouched)."""
    state = {k: v.detach().cpu() for k, v in segmenter.model.state_dict().items()}
    torch_save_atomic({"model": state, "adaptation": {"backend": segmenter.name, **record}}, path)
    segmenter.adaptation = {"backend": segmenter.name, **record}


def blend_scores(
    segmenter: SamFamilySegmenter, slices: list[TrainingSlice], options: AdaptOptions, weights: tuple[float, ...]
) -> dict[str, dict[float, list[int]]]:
    """Per organ and prior weight w, [overlap, predicted, true] pixel sums over the slices of the blend
    (1 - w) SAM + w prior thresholded at 0.5 (SAM prompted as inference prompts it; where the prior has no box
    SAM is not run and the prior alone decides), for choosing each organ's weight."""
    sums: dict[str, dict[float, list[int]]] = {}
    with torch.inference_mode():
        for entry in slices:
            shape = entry.embedding.original_size
            prompted = [o for o in entry.organs if o.prior_box is not None]
            sam = {}
            if prompted:
                boxes = np.array([o.prior_box for o in prompted])
                zeros = np.zeros(shape, np.float32)  # an organ without a prior is prompted with its box alone
                masks = (
                    np.array([zeros if o.prior is None else o.prior for o in prompted]) if options.mask_prompt else None
                )
                logits, _ = segmenter.decode_logits(entry.embedding, boxes, mask_inputs=masks)
                sam = {id(o): p for o, p in zip(prompted, torch.sigmoid(logits).cpu().numpy())}
            for o in entry.organs:
                prior = o.prior if o.prior is not None else np.zeros(shape, np.float32)
                for w in weights:
                    prob = prior if id(o) not in sam else (1 - w) * sam[id(o)] + w * prior
                    pred = prob > 0.5
                    acc = sums.setdefault(o.organ, {}).setdefault(w, [0, 0, 0])
                    acc[0] += int((pred & o.target).sum())
                    acc[1] += int(pred.sum())
                    acc[2] += int(o.target.sum())
    return sums


def _dice(acc: list[int]) -> float:
    return 2 * acc[0] / max(acc[1] + acc[2], 1)


WEIGHT_CHOICES = (0.0, 0.25, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 1.0)
SAM_TOLERANCE = 0.01  # an organ's prior alone must beat the shared blend by more than this to drop SAM


def choose_prior_weights(held_out: dict[str, dict[float, list[int]]]) -> dict[str, float]:
    """Each organ's prior weight from the held-out templates' [overlap, predicted, true] sums per weight: one blend
    weight shared by the organs (the best mean Dice over them: a few held-out templates per organ are too few to
    choose per organ), except that an organ whose prior alone (w 1) beats that blend by more than SAM_TOLERANCE
    gets 1 (SAM is not run for it). Chosen on OpenKBP train scans that are not templates: per-organ choices
    followed the held-out folds' noise and dropped SAM where it pays (benchmarks/results/segmentation.md)."""
    if not held_out:
        return {}
    mean = {w: float(np.mean([_dice(per[w]) for per in held_out.values()])) for w in WEIGHT_CHOICES}
    blend = max(WEIGHT_CHOICES, key=lambda w: (round(mean[w], 6), w))  # ties: the larger weight (less SAM)
    return {
        organ: 1.0 if _dice(per[1.0]) > _dice(per[blend]) + SAM_TOLERANCE else blend for organ, per in held_out.items()
    }


def fit(
    slices: list[TrainingSlice],
    options: AdaptOptions | None = None,
    device: str = "cpu",
    base_checkpoint: str | None = None,
    choose_weights: bool = True,
) -> tuple[SamFamilySegmenter, dict]:
    """The adapted segmenter and its record. With ``choose_weights`` and 2+ templates, each organ's prior weight is
    chosen on held-out templates first (two folds of templates: adapt on one, score the blends on the other;
    ``choose_prior_weights``); then the decoder is adapted on all templates."""
    from medlsam.segment.sam import build_segmenter

    opt = options or AdaptOptions()
    sources = list(dict.fromkeys(e.source for e in slices))
    record: dict = {}
    if choose_weights and len(sources) >= 2:
        tic = time.perf_counter()
        folds = [set(sources[0::2]), set(sources[1::2])]
        totals: dict[str, dict[float, list[int]]] = {}
        fold_options = AdaptOptions(**{**asdict(opt), "steps": max(1, min(opt.fold_steps, opt.steps))})
        for held in folds:
            model = build_segmenter("lite_medsam", base_checkpoint, device=device)
            test = [e for e in slices if e.source in held]
            adapt_segmenter(model, [e for e in slices if e.source not in held], fold_options)
            logger.info(f"adapt: fold adapted at {time.perf_counter() - tic:.0f} s")
            for organ, per in blend_scores(model, test, opt, WEIGHT_CHOICES).items():
                for w, acc in per.items():
                    totals.setdefault(organ, {}).setdefault(w, [0, 0, 0])
                    totals[organ][w] = [a + b for a, b in zip(totals[organ][w], acc)]
        weights = choose_prior_weights(totals)
        record.update(
            prior_weights=weights,
            held_out_dice={o: {str(w): round(_dice(a), 4) for w, a in per.items()} for o, per in totals.items()},
            weights_s=round(time.perf_counter() - tic, 1),
        )
        logger.info(f"adapt: prior weights chosen on held-out templates: {weights}")
    segmenter = build_segmenter("lite_medsam", base_checkpoint, device=device)
    check = check_slices(slices)
    before = slice_dice(segmenter, check, opt)
    run = adapt_segmenter(segmenter, slices, opt)
    record.update(
        **run,
        templates=[Path(str(s)).name for s in sources],
        organs=sorted({o.organ for e in slices for o in e.organs}),
        slices=len(slices),
        template_slice_dice_before=before,
        template_slice_dice_after=slice_dice(segmenter, check, opt),
        mask_prompt=opt.mask_prompt,
        options={k: list(v) if isinstance(v, tuple) else v for k, v in asdict(opt).items()},
    )
    return segmenter, record


def adapt(
    medlam,
    images: list,
    labels: list,
    names: dict[int, str],
    out: str | Path,
    options: AdaptOptions | None = None,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    base_checkpoint: str | None = None,
    banks: list | None = None,
    choose_weights: bool = True,
) -> dict:
    """The whole adaptation: shipped LiteMedSAM (or ``base_checkpoint``) -> adapted weights at ``out`` (the
    templates' slices, each organ's prior weight chosen on held-out templates, the decoder adapted on all)."""
    from medlsam.segment.sam import build_segmenter

    opt = options or AdaptOptions()
    tic = time.perf_counter()
    encoder = build_segmenter("lite_medsam", base_checkpoint, device=device)
    slices = training_slices(medlam, images, labels, names, encoder, opt, cache_dir, banks)
    prepare_s = time.perf_counter() - tic
    segmenter, record = fit(slices, opt, device, base_checkpoint, choose_weights)
    record["prepare_s"] = round(prepare_s, 1)
    record["total_s"] = round(time.perf_counter() - tic, 1)
    save_adapted(segmenter, out, record)
    return record
