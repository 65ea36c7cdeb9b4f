"""Infer task `medlam`: localisation only. The organ boxes in the result JSON and a label volume of boxes."""

from __future__ import annotations

import time

import numpy as np
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferType

from lib.infers.common import DynamicLabels, MedLSAMInferTask, flag, organs_option

LOCALIZE_SWITCHES = ("refine", "match")  # boolean LocalizeOptions a request may switch


BOX_MODES = ["wpl", "spl"]  # the localiser's: one box per organ, or also one per z-slab


def request_mode(request: dict, default: str, choices: list[str]) -> str:
    """The request's `mode` (a client echoing the config's choice list sends that list: its first entry)."""
    mode = request.get("mode") or default
    if isinstance(mode, (list, tuple)):
        mode = mode[0] if mode else default
    if mode not in choices:
        raise HTTPException(status_code=400, detail=f"mode must be one of {', '.join(choices)}, not {mode!r}")
    return mode


def localise(store, request: dict, mode: str):
    """(Localizer, bank, bank info, timings) for the request and a box mode; unknown organs are refused."""
    from medlsam.localize import Localizer, LocalizeOptions

    tic = time.perf_counter()
    model, _, _ = store.medlam()
    bank, info = store.bank()
    bank.select(organs_option(request))  # unknown organ -> TemplateError naming the bank's organs
    timings = {"models_and_bank": round(time.perf_counter() - tic, 3)}
    options = LocalizeOptions(mode=mode)  # the library's measured defaults, unless the request says otherwise
    for key in LOCALIZE_SWITCHES:
        value = flag(request, key)
        if value is not None and hasattr(options, key):
            setattr(options, key, value)
    return Localizer(model, bank, options), bank, info, timings


def localize_config(modes: list[str]) -> dict:
    from medlsam.localize import LocalizeOptions

    defaults = LocalizeOptions()
    return {"mode": modes, "organs": "",
            **{key: getattr(defaults, key) for key in LOCALIZE_SWITCHES if hasattr(defaults, key)}}


class MedLAMInfer(DynamicLabels, MedLSAMInferTask):
    def __init__(self, store):
        super().__init__(store, InferType.SEGMENTATION, None, 3,
                         "MedLAM localisation only: one box per organ of the template bank (a quick check of the "
                         "templates)", config=localize_config(BOX_MODES))

    def run(self, request: dict, entry: dict):
        volume = entry["volume"]
        mode = request_mode(request, self.store.mode if self.store.mode in BOX_MODES else "wpl", BOX_MODES)
        localizer, bank, info, timings = localise(self.store, request, mode)
        organs = organs_option(request)
        located = localizer.localize(volume, organs)
        label = np.zeros(volume.shape, dtype=np.int32)
        found = {n: loc for n, loc in located["organs"].items() if loc.found}
        # paint large boxes first so that small organs stay visible
        for name, loc in sorted(found.items(), key=lambda kv: -np.prod(np.subtract(kv[1].box_voxel[1],
                                                                                    kv[1].box_voxel[0]) + 1)):
            (i0, j0, k0), (i1, j1, k1) = loc.box_voxel
            label[i0:i1 + 1, j0:j1 + 1, k0:k1 + 1] = loc.value
        medlam_model, medlam_path, fingerprint = self.store.medlam()
        return label, {
            "label_names": self.labels,
            "boxes": {n: loc.to_json() for n, loc in located["organs"].items()},
            "not_found": [n for n, loc in located["organs"].items() if not loc.found],
            "timings_s": {**timings, **located["timings_s"]},
            "templates": info.get("templates", []),
            "medlam": {"path": medlam_path.name, "fingerprint": fingerprint},
        }
