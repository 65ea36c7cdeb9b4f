"""Inference: the learnt network's per-organ probabilities on a scan's own voxels (sliding window on the model grid,
sampled back), and the per-organ choice between them and the few-shot prior."""

from __future__ import annotations

import numpy as np
import torch

from medlsam.io.volume import CTVolume
from medlsam.learn.data import scan_inputs
from medlsam.learn.fewshot import Priors, calibrated_dense
from medlsam.learn.model import LearnedModel
from medlsam.medlam.precision import autocast_dtype

OVERLAP = 0.25


def autocast_for(device: str | torch.device) -> torch.dtype | None:
    """bfloat16 where ``device`` runs it natively (``medlsam.medlam.precision``), else None (float32): the
    project's rule, so never float16, even on a GPU without bfloat16."""
    dtype = autocast_dtype(None, device)
    return dtype if dtype == torch.bfloat16 else None


@torch.no_grad()
def grid_probabilities(model: LearnedModel, inputs: np.ndarray) -> np.ndarray:
    """(organs, z, y, x) sigmoid probabilities of the network on model-grid ``inputs`` (sliding window), computed
    on the network's device."""
    from monai.inferers import sliding_window_inference

    network = model.network.eval()
    device = next(network.parameters()).device
    dtype = autocast_for(device)
    x = torch.from_numpy(np.ascontiguousarray(inputs))[None].to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype is not None):
        logits = sliding_window_inference(
            x, model.options.patch, sw_batch_size=1, predictor=network, overlap=OVERLAP, mode="gaussian"
        )
    return torch.sigmoid(logits.float())[0].cpu().numpy()


def learned_probabilities(model: LearnedModel, volume: CTVolume, priors: Priors | None) -> dict[str, np.ndarray]:
    """Organ -> probabilities on ``volume``'s voxels from the network; ``priors`` (uncalibrated, from the bank of
    the saved labels) feed the prior channels of a model that has them."""
    use = priors if model.options.prior_channels else None
    if model.options.prior_channels and priors is None:
        use = {}
    inputs, grid = scan_inputs(volume, use, model.organs, model.options.spacing)
    probabilities = grid_probabilities(model, inputs)
    return {name: grid.to_file(p, volume) for name, p in zip(model.organs, probabilities)}


def chosen_probabilities(
    model: LearnedModel | None,
    volume: CTVolume,
    priors: Priors,
    cuts: dict[str, float],
    organs: list[str] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Organ -> probabilities with the per-organ choice applied: the learnt network where it beat the few-shot
    prior held out (and for organs the templates lack), the calibrated prior elsewhere and for every organ the model
    does not know; and organ -> the path used."""
    organs = organs or list(dict.fromkeys([*priors, *(model.organs if model else [])]))
    fewshot = dict(zip(organs, calibrated_dense(priors, organs, volume.shape, cuts)))
    known = model.organs if model else []
    wanted = [o for o in known if o in organs and (model.choice.get(o) == "learned" or o not in priors)]
    learned = learned_probabilities(model, volume, priors) if wanted else {}
    out, used = {}, {}
    for name in organs:
        if name in wanted:
            out[name], used[name] = learned[name], "learned"
        else:
            out[name], used[name] = fewshot[name], "fewshot"
    return out, used


def blend_sam(
    segmenter,
    volume: CTVolume,
    priors: Priors,
    cuts: dict[str, float],
    probabilities: dict[str, np.ndarray],
    used: dict[str, str],
    values: dict[str, int],
    prior_weight: float | None = None,
    embeddings=None,
) -> dict[str, float]:
    """The few-shot path's SAM blend, in place: each organ ``used`` serves with the few-shot prior gets SAM on the
    calibrated prior's slice boxes blended with it (``probabilities``; ``used`` says ``fewshot_sam``) where its prior
    weight is below 1 (SAM is worth its seconds: chosen on held-out templates by ``medlsam adapt``, or asked for with
    ``prior_weight``); none with the shipped LiteMedSAM, whose blend does not pay. Returns those organs' weights."""
    from medlsam.atlas.localize import OrganLocation
    from medlsam.atlas.prior import calibrated
    from medlsam.segment.pipeline import MedLSAMPipeline, SegmentOptions

    if segmenter is None:
        return {}
    pipeline = MedLSAMPipeline(None, segmenter, SegmentOptions(mode="prior", prior_weight=prior_weight))
    fewshot = [n for n, path in used.items() if path == "fewshot" and priors.get(n) is not None and n in values]
    weights = {n: w for n, w in pipeline.organ_weights(fewshot).items() if w < 1.0}
    if weights:
        located = {n: OrganLocation(n, values[n], True, prior=calibrated(priors[n], cuts.get(n, 0.5))) for n in weights}
        probabilities.update(pipeline.organ_probabilities(volume, located, embeddings))
        used.update(dict.fromkeys(weights, "fewshot_sam"))
    return weights


def to_label(probabilities: dict[str, np.ndarray], values: dict[str, int], threshold: float = 0.5) -> np.ndarray:
    """One label volume: each voxel the organ of highest probability among those above ``threshold``."""
    names = list(probabilities)
    stack = np.stack([probabilities[n] for n in names])
    best = stack.argmax(axis=0)
    keep = stack.max(axis=0) >= threshold
    lut = np.array([values[n] for n in names])
    dtype = np.uint16 if max(values.values(), default=0) > 255 else np.uint8
    return np.where(keep, lut[best], 0).astype(dtype)
