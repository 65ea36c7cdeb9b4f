"""Infer task `medlsam`: automatic multi-organ segmentation with the datastore's template bank."""

from __future__ import annotations

import time

from monailabel.interfaces.tasks.infer_v2 import InferType

from lib.infers.common import DynamicLabels, MedLSAMInferTask
from lib.infers.options import localize_config, localize_options, organs_option, prior_weight, request_mode
from lib.models import Models
from lib.template_source import TemplateSource
from lib.volumes import Volumes


def _modes(default: str) -> list[str]:
    """The pipeline's prompt modes, the server's default first (clients show the first as selected)."""
    from medlsam.segment.pipeline import MODES

    return [default] + [m for m in MODES if m != default]


class MedLSAMInfer(DynamicLabels, MedLSAMInferTask):
    def __init__(
        self, models: Models, templates: TemplateSource, volumes: Volumes, mode: str, weight: float | None = None
    ):
        self.models, self.templates, self.modes = models, templates, _modes(mode)
        self.prior_weight = weight  # None: the segmenter's (see SegmentOptions.prior_weight)
        super().__init__(
            volumes,
            InferType.SEGMENTATION,
            None,
            3,
            "MedLSAM: MedLAM and the templates localise every organ, SAM segments its slices from "
            "the organ prior's boxes",
            config={**localize_config(self.modes), "prior_weight": "" if weight is None else weight},
        )

    def run(self, request: dict, entry: dict):
        from medlsam.atlas.localize import Localizer
        from medlsam.segment.pipeline import MedLSAMPipeline, SegmentOptions

        options = SegmentOptions(
            mode=request_mode(request, self.modes[0], self.modes), prior_weight=prior_weight(request, self.prior_weight)
        )
        localize = localize_options(request, options.localizer_mode)
        organs = organs_option(request)
        tic = time.perf_counter()
        model, medlam_path, fingerprint = self.models.medlam()
        bank, info = self.templates.bank()
        segmenter = self.models.segmenter()
        timings = {"models_and_bank": round(time.perf_counter() - tic, 3)}
        pipeline = MedLSAMPipeline(Localizer(model, bank, localize), segmenter, options)
        result = pipeline.segment(entry["volume"], organs, embeddings=self.volumes.embeddings(entry), timings=timings)
        entry["auto_label"] = result.label  # the current segmentation the `edit` task corrects
        return result.label, {
            **result.to_json(),
            "label_names": self.labels,
            "templates": info.get("templates", []),
            "medlam": {"path": medlam_path.name, "fingerprint": fingerprint},
            "backend": segmenter.name,
            "adapted": segmenter.adaptation is not None,  # LiteMedSAM adapted to the templates (trainer lite_medsam)
        }
