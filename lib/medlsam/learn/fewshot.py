"""The few-shot path for the learner: the template prior of the *other* labels, as the app's bank would give it.

Each labelled scan becomes a one-template bank (``medlsam.atlas.templates``, cached on disk when asked); a labelled
scan's prior comes from the bank merged from the others (leave one out), a new scan's from the bank of them all.
Priors are kept uncalibrated (cut 0.5, the network's input); ``cuts`` chooses each organ's calibration from the
held-out priors exactly as ``medlsam.atlas.calibration.prior_cuts`` does; ``calibrated_dense`` applies it.

Cached priors are keyed by the content of the scan (its bytes) and of the templates' banks (a label saved again
gives new priors; a datastore copied or restored keeps them). A labelled scan's leave-one-out prior is reused, as
labels accumulate, while it was made from at least ``REUSE_SHARE`` of the current others and from nothing else
(``held_out_priors``): without it every training localises every label again against a bank that grew by a few
labels (at 80 labels, 30 minutes of this CPU).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from medlsam.atlas.bank_builder import BankBuilder, Template, content_key
from medlsam.atlas.calibration import MAX_HELD_OUT, choose_cuts
from medlsam.atlas.localize import LocalizeOptions, Localizer
from medlsam.atlas.prior import FilePrior, calibrated
from medlsam.atlas.templates import TemplateBank, merge_banks
from medlsam.io.volume import CTVolume
from medlsam.medlam.network import MedLAM
from medlsam.utils.atomic import atomic_path, write_json_atomic
from medlsam.utils.metrics import dice

logger = logging.getLogger(__name__)

Priors = dict[str, FilePrior | None]  # organ -> its prior on the scan's voxels (None: not found)
# a leave-one-out prior is reused while its templates are at least this share of the label's current others: the
# few-shot path from 40 templates scored 0.632 on validation, from 80 0.639 (benchmarks/results/learning.md)
REUSE_SHARE = 0.5


def _key(*parts: str) -> str:
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]


def _file_keys(sources: list[str]) -> list[str] | None:
    """The content key of each source file (None when one is not a file: nothing is cached)."""
    keys = []
    for source in sources:
        if not source or not Path(source).is_file():
            return None
        keys.append(content_key(source))
    return keys


def _as_template(index: int, image: CTVolume, label: CTVolume, names: dict[int, str]) -> Template:
    """A labelled scan as a bank builder's template: its files where it has them (their content keys the cache),
    else the volumes (never cached)."""
    on_disk = _file_keys([image.source, label.source]) is not None
    return Template(
        id=f"label{index}",
        image=image.source if on_disk else image,
        label=label.source if on_disk else label,
        names=dict(names),
    )


def one_template_banks(
    medlam: MedLAM,
    images: list[CTVolume],
    labels: list[CTVolume],
    names: dict[int, str] | list[dict[int, str]],
    cache: Path | None = None,
) -> list[TemplateBank]:
    """One uncalibrated bank per labelled scan (``names``: one mapping for all labels or one per label), built by
    ``medlsam.atlas.bank_builder.BankBuilder``: kept in ``cache`` and reused while the files, names and MedLAM are
    unchanged."""
    builder = BankBuilder(medlam, cache)
    per_label = names if isinstance(names, list) else [names] * len(images)
    banks = []
    for i, (image, label, names) in enumerate(zip(images, labels, per_label)):
        template, tic = _as_template(i, image, label, names), time.perf_counter()
        digest = builder.digest(template)
        cached = cache is not None and digest is not None and (cache / f"{template.id}-{digest}.pt").is_file()
        banks.append(builder.template_bank(template))
        if not cached:
            logger.info(f"one-template bank of {Path(image.source).name} in {time.perf_counter() - tic:.1f} s")
    return banks


def _save_priors(priors: Priors, path: Path) -> None:
    arrays = {}
    for name, prior in priors.items():
        if prior is not None:
            arrays[f"{name}|low"], arrays[f"{name}|high"] = prior.low, prior.high
            arrays[f"{name}|p"] = prior.probabilities.astype(np.float16)
    arrays["__organs__"] = np.array(list(priors), dtype=str)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)


def _load_priors(path: Path) -> Priors:
    with np.load(path) as data:
        out: Priors = {}
        for name in data["__organs__"].tolist():
            if f"{name}|p" in data:
                p = data[f"{name}|p"].astype(np.float32)
                out[name] = FilePrior(data[f"{name}|low"], data[f"{name}|high"], p)
            else:
                out[name] = None
        return out


def bank_digest(bank: TemplateBank) -> str:
    """What a bank's priors depend on: its MedLAM and, per organ, the templates' points and organ masks (a label
    saved again under the same file names changes it; the source file names do not)."""
    h = hashlib.sha1(bank.model_fingerprint.encode())
    for name in sorted(bank.organs):
        organ = bank.organs[name]
        h.update(f"{name}|{organ.value}|{organ.count}".encode())
        for tensor in (organ.latent, organ.offset, *(p.mask for p in organ.neighbourhoods)):
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def scan_priors(
    medlam: MedLAM,
    bank: TemplateBank,
    volume: CTVolume,
    options: LocalizeOptions | None = None,
    cache: Path | None = None,
    digest: str | None = None,
) -> Priors:
    """Every organ of ``bank`` localised in ``volume`` with its uncalibrated prior (None where not found); kept in
    ``cache`` by the scan's file and the bank's content (``digest``: that content's key when the caller has it)."""
    path = _prior_path(bank, volume, options, cache, digest)
    if path is not None and path.is_file():
        try:
            return _load_priors(path)
        except (OSError, ValueError, KeyError):
            pass
    with torch.no_grad():
        located = Localizer(medlam, bank, options).localize(volume, mode="wpl", prior=True)["organs"]
    priors = {name: (loc.prior if loc.found else None) for name, loc in located.items()}
    if path is not None:
        _save_priors(priors, path)
    return priors


def _prior_path(bank, volume: CTVolume, options, cache: Path | None, digest: str | None = None) -> Path | None:
    files = _file_keys([volume.source])
    if cache is None or files is None:
        return None
    return cache / f"prior-{_key(files[0], digest or bank_digest(bank), repr(options))}.npz"


def held_out_priors(
    medlam: MedLAM,
    banks: list[TemplateBank],
    volumes: list[CTVolume],
    options: LocalizeOptions | None = None,
    cache: Path | None = None,
    only: set[int] | None = None,
) -> list[Priors]:
    """Each labelled scan's priors from the bank of the *other* labels (empty with a single label, and for scans
    not in ``only`` when given). With ``cache``, a scan's earlier leave-one-out prior serves while its templates are
    all still among the others, are at least ``REUSE_SHARE`` of them and drew the same organs."""
    digests = [bank_digest(b) for b in banks]
    out = []
    for i, volume in enumerate(volumes):
        others = [b for j, b in enumerate(banks) if j != i]
        if not others or (only is not None and i not in only):
            out.append({})
            continue
        tic = time.perf_counter()
        kept = [d for j, d in enumerate(digests) if j != i]
        organs = sorted({name for b in others for name in b.organs})
        index = _reuse_index(volume, options, cache)
        reused = _reused_prior(index, kept, organs)
        if reused is not None:
            out.append(reused[0])
            logger.info(f"held-out prior {i + 1}/{len(volumes)} kept (made from {reused[1]} of the {len(kept)} others)")
            continue
        bank = merge_banks(others)
        digest = _key(bank.model_fingerprint, *sorted(kept))
        out.append(scan_priors(medlam, bank, volume, options, cache, digest))
        if index is not None:
            prior_file = _prior_path(bank, volume, options, cache, digest).name
            write_json_atomic({"templates": kept, "organs": organs, "prior": prior_file}, index)
        logger.info(f"held-out prior {i + 1}/{len(volumes)} in {time.perf_counter() - tic:.1f} s")
    return out


def _reuse_index(volume: CTVolume, options, cache: Path | None) -> Path | None:
    """Where a labelled scan's last leave-one-out prior is recorded (its templates, organs and prior file)."""
    files = _file_keys([volume.source])
    return None if cache is None or files is None else cache / f"loo-{_key(files[0], repr(options))}.json"


def _reused_prior(index: Path | None, templates: list[str], organs: list[str]) -> tuple[Priors, int] | None:
    """The recorded prior and how many templates made it, when it may serve for these templates and organs (see
    ``held_out_priors``), else None."""
    if index is None or not index.is_file():
        return None
    try:
        entry = json.loads(index.read_text())
        made_from = set(entry["templates"])
        if not made_from <= set(templates) or len(made_from) < REUSE_SHARE * len(templates):
            return None
        if entry["organs"] != organs:
            return None
        return _load_priors(index.parent / entry["prior"]), len(made_from)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def dense(priors: Priors, organs: list[str], shape: tuple[int, int, int]) -> np.ndarray:
    """(organs, *shape) float32 probabilities on the scan's voxels; zeros where an organ has no prior."""
    out = np.zeros((len(organs), *shape), np.float32)
    for o, name in enumerate(organs):
        prior = priors.get(name)
        if prior is not None:
            out[(o, *prior.region())] = prior.probabilities
    return out


def calibrated_dense(
    priors: Priors, organs: list[str], shape: tuple[int, int, int], cuts: dict[str, float]
) -> np.ndarray:
    """``dense`` with each organ's prior calibrated to its cut (the few-shot path's probabilities)."""
    return dense(
        {n: (None if p is None else calibrated(p, cuts.get(n, 0.5))) for n, p in priors.items()}, organs, shape
    )


def cuts(held_out: list[Priors], labels: list[np.ndarray], values: list[dict[str, int]]) -> dict[str, float]:
    """Each organ's prior cut from the held-out priors of the first ``MAX_HELD_OUT`` labels, as the bank's own
    calibration chooses it (``medlsam.atlas.calibration``); organs a label lacks are skipped there."""
    from medlsam.atlas.calibration import CUTS

    per_label = []
    for priors, label, vals in list(zip(held_out, labels, values))[:MAX_HELD_OUT]:
        scores = {}
        for name, prior in priors.items():
            if name not in vals:
                continue
            truth = label == vals[name]
            if not truth.any():
                continue
            p = dense({name: prior}, [name], label.shape)[0]
            scores[name] = [dice(p >= c, truth) for c in CUTS]
        per_label.append(scores)
    return choose_cuts(per_label)
