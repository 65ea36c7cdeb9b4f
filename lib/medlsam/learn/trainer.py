"""``learn``: a segmentation network trained on scans with final labels, scored held out against the few-shot path.

1. Labels are checked (names per label; an organ a label does not draw is unknown there, never "absent").
2. Part of the labels is held out (``held_out_fraction``, at least ``min_held_out`` from three labels on).
3. The few-shot path: one-template banks; each label's prior from the *other* labels (``medlsam.learn.fewshot``);
   the priors' cuts as the bank's calibration chooses them.
4. The network trains on the other labels (patches around organs, Dice + BCE masked per unknown organ), its
   held-out Dice checked every ``validate_every`` epochs; the best state is kept; ``time_limit_min`` bounds it all.
5. Held-out Dice per organ of both paths on the scans' own grids; each organ takes the better path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from medlsam.errors import MedLSAMError
from medlsam.io.labels import check_label_array
from medlsam.io.volume import CTVolume, load_ct, read_volume
from medlsam.learn import fewshot
from medlsam.learn.checkpoint import checkpoint_path, remove_checkpoint
from medlsam.learn.data import example
from medlsam.learn.loop import train_network
from medlsam.learn.model import LearnedModel
from medlsam.learn.network import build_network
from medlsam.learn.options import LearnError, LearnOptions, resolve_device
from medlsam.learn.predict import chosen_probabilities, learned_probabilities
from medlsam.utils.distributed import barrier, init_distributed
from medlsam.utils.metrics import dice

logger = logging.getLogger(__name__)

MIN_HELD_OUT_LABELS = 3  # fewer labels: nothing is held out (the few-shot path serves every organ)


def organ_list(names: list[dict[int, str]]) -> list[str]:
    """The organs of all labels, by their first label value; names differing only in case are an error."""
    pairs = sorted({(v, n) for per in names for v, n in per.items()})
    organs = list(dict.fromkeys(n for _, n in pairs))
    folded: dict[str, str] = {}
    for name in organs:
        other = folded.setdefault(name.strip().lower(), name)
        if other != name:
            raise LearnError(f"labels name one organ differently: {other!r} and {name!r}")
    return organs


def held_out_indices(count: int, options: LearnOptions, prefer: list[int] | None = None) -> list[int]:
    """The labels held out: those of ``prefer`` first (in its order: the labels the model in use never saw), the rest
    chosen by the seed; none with fewer than ``MIN_HELD_OUT_LABELS``."""
    if count < MIN_HELD_OUT_LABELS:
        return []
    held = max(options.min_held_out, int(round(options.held_out_fraction * count)))
    held = min(held, count - 1)
    first = [i for i in dict.fromkeys(prefer or []) if 0 <= i < count][:held]
    rest = [int(i) for i in np.random.default_rng(options.seed).permutation(count) if i not in first]
    return sorted(first + rest[: held - len(first)])


def _volumes(images: list, labels: list, names) -> tuple[list[CTVolume], list[CTVolume], list[dict[int, str]]]:
    if len(images) != len(labels):
        raise LearnError(f"{len(images)} images but {len(labels)} labels")
    if len(images) < 2:
        raise LearnError(f"learning needs at least 2 labelled scans, got {len(images)}")
    per_label = names if isinstance(names, list) else [names] * len(images)
    if len(per_label) != len(images):
        raise LearnError(f"{len(per_label)} organ-name sets for {len(images)} labels")
    per_label = [{int(k): str(v) for k, v in (n or {}).items()} for n in per_label]
    if any(not n for n in per_label):
        raise LearnError("every label needs its organ names (label value -> organ)")
    vols = [i if isinstance(i, CTVolume) else load_ct(i) for i in images]
    labs = [la if isinstance(la, CTVolume) else read_volume(la) for la in labels]
    for label in labs:
        try:
            check_label_array(label.array, require_organ=False)
        except MedLSAMError as exc:
            raise LearnError(f"label {label.source or '(in memory)'}: {exc}") from None
    return vols, labs, per_label


def score_held_out(
    model: LearnedModel,
    volumes: list[CTVolume],
    labels: list[CTVolume],
    values: list[dict[str, int]],
    priors: list[fewshot.Priors],
    cuts: dict[str, float],
    incumbent: LearnedModel | None = None,
) -> dict[str, dict[str, list[float | None]]]:
    """path -> organ -> Dice per held-out scan, on the scan's own grid (None where the scan does not draw the organ;
    a missed organ: 0). Paths: ``learned``, ``fewshot`` and, with an ``incumbent`` model, ``incumbent``: the draft it
    serves (its network where it chose it, the few-shot prior elsewhere)."""
    paths = ("learned", "fewshot", "incumbent") if incumbent is not None else ("learned", "fewshot")
    scores: dict[str, dict[str, list[float | None]]] = {path: {o: [] for o in model.organs} for path in paths}
    for volume, label, vals, prior in zip(volumes, labels, values, priors):
        drafts = {
            "learned": learned_probabilities(model, volume, prior),
            "fewshot": dict(zip(model.organs, fewshot.calibrated_dense(prior, model.organs, volume.shape, cuts))),
        }
        if incumbent is not None:
            drafts["incumbent"] = chosen_probabilities(incumbent, volume, prior, cuts, model.organs)[0]
        for name in model.organs:
            truth = label.array == vals[name] if name in vals else None
            drawn = truth is not None and truth.any()
            for path in paths:
                scores[path][name].append(dice(drafts[path][name] >= 0.5, truth) if drawn else None)
    return scores


def _mean_scores(scores: dict[str, list[float | None]], scans: list[int] | None = None) -> dict[str, float]:
    """organ -> mean Dice over the scans (indices into the held-out list; all when None) that draw it."""
    out = {}
    for organ, per_scan in scores.items():
        kept = [v for i, v in enumerate(per_scan) if v is not None and (scans is None or i in scans)]
        if kept:
            out[organ] = float(np.mean(kept))
    return out


def compare_with_incumbent(
    scores: dict[str, dict[str, list[float | None]]], choice: dict[str, str], unseen: list[int]
) -> dict:
    """The new model's draft (its per-organ choice) against the incumbent's, on the held-out scans the incumbent
    never learnt from (``unseen``: indices into the held-out list): organ -> Dice of each, and their means over the
    organs both were scored on."""
    new = {o: v for o, v in _mean_scores(scores["learned"], unseen).items() if choice.get(o) == "learned"}
    new.update({o: v for o, v in _mean_scores(scores["fewshot"], unseen).items() if choice.get(o) != "learned"})
    old = _mean_scores(scores["incumbent"], unseen)
    organs = sorted(set(new) & set(old))
    return {
        "scans": len(unseen),
        "organs": {o: {"new": new[o], "incumbent": old[o]} for o in organs},
        "new": float(np.mean([new[o] for o in organs])) if organs else None,
        "incumbent": float(np.mean([old[o] for o in organs])) if organs else None,
    }


def choose(organs: list[str], held_out: dict[str, dict[str, float | None]], margin: float) -> dict[str, str]:
    """Per organ, ``learned`` where its held-out Dice beats the few-shot path's by more than ``margin``, else
    ``fewshot`` (also where nothing was held out: the few-shot path is the one known to work)."""
    out = {}
    for name in organs:
        a, b = held_out["learned"].get(name), held_out["fewshot"].get(name)
        out[name] = "learned" if a is not None and b is not None and a > b + margin else "fewshot"
    return out


def _held_out_priors(
    vols, labs, per_label, held, options: LearnOptions, medlam, cache, banks=None
) -> list[fewshot.Priors]:
    """The few-shot priors each label needs: all of them with prior channels, else the held-out ones and those
    that choose the prior cuts. ``banks``: the labels' one-template banks when already built."""
    if medlam is None:
        from medlsam.medlam.network import load_medlam
        from medlsam.paths import default_medlam_path

        medlam = load_medlam(default_medlam_path())
    cache = Path(cache) if cache else None
    if banks is None:
        banks = fewshot.one_template_banks(medlam, vols, labs, per_label, cache)
    elif len(banks) != len(vols):
        raise LearnError(f"{len(banks)} template banks for {len(vols)} labels")
    needed = set(range(len(vols))) if options.prior_channels else set(held) | set(range(fewshot.MAX_HELD_OUT))
    return fewshot.held_out_priors(medlam, banks, vols, None, cache, only=needed)


def _prepared_priors(ctx, vols, labs, per_label, held, options, medlam, cache, banks) -> list[fewshot.Priors]:
    """``_held_out_priors``; under torchrun rank 0 prepares them into the cache while the other ranks wait, then
    read them there."""
    if not ctx.is_main:
        barrier(ctx)
    priors = _held_out_priors(vols, labs, per_label, held, options, medlam, cache, banks)
    if ctx.is_main and ctx.distributed:
        barrier(ctx)
    return priors


def learn(
    images: list,
    labels: list,
    names: dict[int, str] | list[dict[int, str]],
    options: LearnOptions | None = None,
    medlam=None,
    cache: str | Path | None = None,
    progress: Callable[[dict], None] | None = None,
    priors: list[fewshot.Priors] | None = None,
    incumbent: LearnedModel | None = None,
    unseen: list[int] | None = None,
    banks: list | None = None,
) -> LearnedModel:
    """Train on labelled scans (paths or CTVolumes; ``names`` one mapping for all or one per label) and score the
    network held out against the few-shot path; the returned model records both and the per-organ choice.
    ``priors``: each label's held-out priors when already known (else computed with ``medlam``).
    ``incumbent``: the model in use, and ``unseen`` the labels it never learnt from (newest first): they are held out
    first and both models' drafts are compared on them (``record["comparison"]``). ``banks``: each label's
    one-template bank when the caller built them (``medlsam.atlas.bank_builder``), else built here."""
    options = options or LearnOptions()
    torch.set_num_threads(options.threads)
    tic = time.monotonic()
    deadline = tic + options.time_limit_min * 60 if options.time_limit_min > 0 else float("inf")
    vols, labs, per_label = _volumes(images, labels, names)
    organs = organ_list(per_label)
    values = [{n: v for v, n in per.items()} for per in per_label]
    held = held_out_indices(len(vols), options, unseen)
    ctx = init_distributed(resolve_device(options.device))  # torchrun's process group, else one process
    if priors is None:
        priors = _prepared_priors(ctx, vols, labs, per_label, held, options, medlam, cache, banks)
    elif len(priors) != len(vols):
        raise LearnError(f"{len(priors)} prior sets for {len(vols)} labels")
    arrays = [la.array for la in labs]
    cuts = fewshot.cuts(priors, arrays, values)
    fewshot_min = (time.monotonic() - tic) / 60
    use = (lambda i: priors[i]) if options.prior_channels else (lambda i: None)
    examples = [example(vols[i], labs[i], per_label[i], organs, use(i), options.spacing) for i in range(len(vols))]
    train = [ex for i, ex in enumerate(examples) if i not in held]
    in_channels = examples[0].inputs.shape[0]
    model = LearnedModel(
        network=build_network(options, in_channels, len(organs)),
        options=options,
        organs=organs,
        in_channels=in_channels,
        held_out={"learned": {}, "fewshot": {}},
        choice={o: "fewshot" for o in organs},
        prior_cuts=cuts,
    )
    record = train_network(model, train, [examples[i] for i in held], deadline, progress, cache, ctx)
    if not ctx.is_main:  # torch.distributed: rank 0 alone scores, chooses and writes
        model.record = record
        return model
    scores = score_held_out(
        model,
        [vols[i] for i in held],
        [labs[i] for i in held],
        [values[i] for i in held],
        [priors[i] for i in held],
        cuts,
        incumbent,
    )
    model.held_out = {path: _mean_scores(scores[path]) for path in ("learned", "fewshot")}
    model.held_out["scans"] = {o: n for o, s in scores["learned"].items() if (n := sum(v is not None for v in s))}
    model.choice = choose(organs, model.held_out, options.choice_margin)
    if incumbent is not None:
        fresh = [n for n, i in enumerate(held) if i in set(unseen or [])]
        model.record["comparison"] = compare_with_incumbent(scores, model.choice, fresh)
    model.record = {
        **model.record,
        **record,
        "labels": [v.source for v in vols],
        "held_out_sources": [vols[i].source for i in held],
        "fewshot_minutes": fewshot_min,
        "total_minutes": (time.monotonic() - tic) / 60,
    }
    remove_checkpoint(checkpoint_path(cache))  # kept until here: a run killed while scoring resumes trained
    return model
