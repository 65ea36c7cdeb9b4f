"""Infer task `medlam`: localisation only. The organ boxes in the result JSON and a label volume of boxes."""

from __future__ import annotations

import time

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferType

from lib.infers.common import DynamicLabels, MedLSAMInferTask
from lib.infers.options import BOX_MODES, localize_config, localize_options, organs_option, request_mode
from lib.models import Models
from lib.template_source import TemplateSource
from lib.volumes import Volumes


class MedLAMInfer(DynamicLabels, MedLSAMInferTask):
    def __init__(self, models: Models, templates: TemplateSource, volumes: Volumes, mode: str):
        self.models, self.templates = models, templates
        self.default_mode = mode if mode in BOX_MODES else "wpl"
        super().__init__(
            volumes,
            InferType.SEGMENTATION,
            None,
            3,
            "MedLAM localisation only: one box per organ of the template bank (a quick check of the templates)",
            config=localize_config(BOX_MODES),
        )

    def run(self, request: dict, entry: dict):
        from medlsam.atlas.localize import Localizer

        volume = entry["volume"]
        options = localize_options(request, request_mode(request, self.default_mode, BOX_MODES))
        organs = organs_option(request)
        tic = time.perf_counter()
        model, medlam_path, fingerprint = self.models.medlam()
        bank, info = self.templates.bank()
        timings = {"models_and_bank": round(time.perf_counter() - tic, 3)}
        located = Localizer(model, bank, options).localize(volume, organs)  # unknown organ: 400 naming the bank's
        label = np.zeros(volume.shape, dtype=np.int32)
        found = {n: loc for n, loc in located["organs"].items() if loc.found}
        # paint large boxes first so that small organs stay visible
        for name, loc in sorted(
            found.items(), key=lambda kv: -np.prod(np.subtract(kv[1].box_voxel[1], kv[1].box_voxel[0]) + 1)
        ):
            (i0, j0, k0), (i1, j1, k1) = loc.box_voxel
            label[i0 : i1 + 1, j0 : j1 + 1, k0 : k1 + 1] = loc.value
        return label, {
            "label_names": self.labels,
            "boxes": {n: loc.to_json() for n, loc in located["organs"].items()},
            "not_found": [n for n, loc in located["organs"].items() if not loc.found],
            "timings_s": {**timings, **located["timings_s"]},
            "templates": info.get("templates", []),
            "medlam": {"path": medlam_path.name, "fingerprint": fingerprint},
        }
