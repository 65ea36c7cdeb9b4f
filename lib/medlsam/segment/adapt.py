"""Adaptation of the slice segmenter to the templates: fine-tune LiteMedSAM's mask decoder and prompt encoder on
the templates' organ slices, prompted the way inference prompts it.

1. ``training_slices`` (``medlsam.segment.adapt_data``): each template is localised with a bank of the *other*
   templates (leave one out), so its organ prior, the prior's slice boxes and the prior as mask prompt are what
   inference would hand SAM on an unseen scan (the priors calibrated by the cuts those held-out priors choose, as
   the bank's are: ``medlsam.atlas.calibration``). Every organ slice is encoded once by the frozen image encoder
   (optionally cached on disk).
2. ``adapt_segmenter``: the decoder learns, on those cached embeddings, to turn (prior box or jittered true box,
   prior as mask prompt) into the true mask (binary cross-entropy + soft Dice on the slice grid).
3. ``save_adapted``: the whole model's weights plus a record (backend, templates, organs, options), written
   atomically; ``build_segmenter(checkpoint=...)`` loads them with ``weights_only=True`` and the pipeline reads
   the record (e.g. whether to give the prior as mask prompt).

The encoder is never trained, so adapted and shipped segmenters share slice embeddings.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medlsam.errors import MedLSAMError, TemplateError
from medlsam.medlam.precision import use_bf16
from medlsam.segment.adapt_data import (
    ADAPTED_BACKENDS,
    AdaptOptions,
    TrainingSlice,
    slice_prompts,
    training_slices,
)
from medlsam.segment.sam.segmenter import SamFamilySegmenter
from medlsam.utils.atomic import torch_save_atomic

logger = logging.getLogger(__name__)


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
