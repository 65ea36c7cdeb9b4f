"""One `edit` request (issue 30): every structure with prompts edited by its own path, only the changed ones
recomputed.

* Bank organs (clicks only) keep their template-prior start and are corrected by the click refiner or the
  geodesic edit (``medlsam.interact.editing.edit_label``).
* Structures the bank does not know, and any structure given a box, are segmented class-agnostically from their
  clicks and box at the scan's own resolution (``medlsam.interact.click_structure``); the answer replaces the
  structure's voxels in the label (other structures keep theirs, except at its own foreground clicks).
* ``EditCache`` (one per image): clients send every click of every structure with each request; a structure whose
  prompts, and the label it was applied to, are those of its last request is not recomputed (its change to the
  label is replayed), and a class-agnostic structure's blobs are kept per click.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from medlsam.interact.click_any import AnyOptions, check_prompts
from medlsam.interact.click_combo import ComboCache, segment_combo
from medlsam.interact.click_structure import AnyCache, segment_structure
from medlsam.interact.editing import ClickError, OrganClicks, edit_label
from medlsam.interact.interactive import check_click_count
from medlsam.utils import cancel


@dataclass
class EditCache:
    """Per image: each structure's last key and its change to the label; counters (tests, reports)."""

    any: AnyCache = field(default_factory=AnyCache)
    combo: ComboCache | None = None  # blobs or SAM per request (its ``any`` is this cache's)
    edits: dict = field(default_factory=dict)
    computed: int = 0  # structures computed
    replayed: int = 0  # structures answered from the cache


def agnostic_path(method: str, device) -> str:
    """The class-agnostic path a request's ``agnostic`` method takes: ``auto`` is ``combo`` where LiteMedSAM runs on
    a GPU (its slices encode in milliseconds) and ``blobs`` on a CPU (2-3 s a slice on 2 cores, once per image)."""
    if method != "auto":
        return method
    return "combo" if str(device).startswith("cuda") else "blobs"


def _key(label_key: bytes, name: str, clicks: OrganClicks) -> bytes:
    digest = hashlib.blake2b(label_key, digest_size=16)
    for part in (name.encode(), clicks.foreground.tobytes(), b"|", clicks.background.tobytes()):
        digest.update(part)
    return digest.digest()


def _agnostic(out: np.ndarray, hu, spacing, value: int, name: str, clicks: OrganClicks, box, axis: int, cache, options):
    """Structure ``name`` (label ``value``) in ``out`` (in place) replaced by its class-agnostic segmentation."""
    prompts = check_prompts(name, clicks.foreground, clicks.background, box, hu, axis)
    if cache.combo is not None:
        region, mask, _ = segment_combo(hu, spacing, prompts, axis, options, cache.combo, name)
    else:
        region, mask = segment_structure(hu, spacing, prompts, axis, options, cache.any, name)
    out[out == value] = 0
    part = out[region]
    origin = np.array([s.start for s in region])
    clicked = np.zeros(mask.shape, bool)
    clicked[tuple((clicks.foreground - origin).T)] = True
    part[(mask & (part == 0)) | clicked] = value


def _replay(out: np.ndarray, index: np.ndarray, new_values: np.ndarray, value: int) -> int:
    """A bank organ's change (computed on the request's label) applied to ``out`` in place: it takes voxels that
    are free or its own and leaves only its own; returns the voxels changed."""
    flat = out.reshape(-1)
    current = flat[index]
    take = np.where(new_values == value, (current == 0) | (current == value), current == value)
    take &= current != new_values
    flat[index[take]] = new_values[take]
    return int(take.sum())


def edit_structures(
    label: np.ndarray,
    hu: np.ndarray,
    spacing,
    values: dict[str, int],
    clicks: dict[str, OrganClicks],
    agnostic: set[str],
    boxes: dict[str, np.ndarray] | None = None,
    cache: EditCache | None = None,
    axis: int = 2,
    any_options: AnyOptions | None = None,
    **bank_edit,
) -> tuple[np.ndarray, dict[str, int], list[str]]:
    """(the label with every prompted structure edited, voxels changed per structure, the structures computed
    rather than answered from the cache). ``agnostic``: the structures the bank does not know; ``boxes``: checked
    (3, 2) boxes per structure (``medlsam.interact.click_any.check_box``); ``bank_edit``: priors, intensities,
    options, refiner of ``edit_label`` (each bank organ is edited on the request's label, keyed by it)."""
    boxes = boxes or {}
    cache = cache if cache is not None else EditCache()
    if label.shape != hu.shape:
        raise ClickError(f"label of shape {list(label.shape)} for an image of shape {list(hu.shape)}")
    check_click_count(sum(len(c) for c in clicks.values()))
    names = list(dict.fromkeys([*clicks, *boxes]))
    unknown = [n for n in names if n not in values]
    if unknown:
        raise ClickError(f"prompts for unknown structure(s) {unknown}; known: {sorted(values)}")
    out = np.ascontiguousarray(label).copy()
    label_key = hashlib.blake2b(np.ascontiguousarray(label).tobytes(), digest_size=16).digest()
    changed, computed = {}, []
    for name in names:
        cancel.check()
        organ_clicks, box, value = clicks.get(name, OrganClicks()), boxes.get(name), values[name]
        if name in agnostic or box is not None:
            before, runs = out == value, cache.any.structure_runs
            _agnostic(out, hu, spacing, value, name, organ_clicks, box, axis, cache, any_options)
            changed[name] = int((before != (out == value)).sum())
            fresh = cache.any.structure_runs > runs
        elif len(organ_clicks):
            key = _key(label_key, name, organ_clicks)
            stored = cache.edits.get(name)
            fresh = stored is None or stored[0] != key
            if fresh:
                new, _ = edit_label(label, hu, spacing, values, {name: organ_clicks}, axis=axis, **bank_edit)
                index = np.flatnonzero(new.reshape(-1) != np.ascontiguousarray(label).reshape(-1))
                cache.edits[name] = stored = (key, index, new.reshape(-1)[index])
            changed[name] = _replay(out, stored[1], stored[2], value)
        else:
            continue
        if fresh:
            cache.computed += 1
            computed.append(name)
        else:
            cache.replayed += 1
    return out, changed, computed
