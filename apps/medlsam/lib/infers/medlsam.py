"""Infer task `medlsam`: automatic multi-organ segmentation with the datastore's template bank."""

from __future__ import annotations

from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferType

from lib.infers.common import DynamicLabels, MedLSAMInferTask, organs_option
from lib.infers.medlam import localise, localize_config, request_mode


def _modes(default: str) -> list[str]:
    """The pipeline's prompt modes, the server's default first (clients show the first as selected)."""
    from medlsam.pipeline import MODES

    return [default] + [m for m in MODES if m != default]


def _prior_weight(request: dict) -> float:
    """The request's `prior_weight` (0: SAM alone, 1: the template prior alone), else the library default."""
    from medlsam.pipeline import SegmentOptions

    value = request.get("prior_weight")
    if value in (None, ""):
        return SegmentOptions().prior_weight
    try:
        weight = float(value)
    except (TypeError, ValueError):
        weight = float("nan")
    if not 0.0 <= weight <= 1.0:
        raise HTTPException(status_code=400, detail=f"prior_weight must be a number in [0, 1], not {value!r}")
    return weight


class MedLSAMInfer(DynamicLabels, MedLSAMInferTask):
    def __init__(self, store):
        from medlsam.pipeline import SegmentOptions

        super().__init__(store, InferType.SEGMENTATION, None, 3,
                         "MedLSAM: MedLAM and the templates localise every organ, SAM segments its slices from "
                         "the organ prior's boxes", config={**localize_config(_modes(store.mode)),
                                                            "prior_weight": SegmentOptions().prior_weight})

    def run(self, request: dict, entry: dict):
        from medlsam.pipeline import MedLSAMPipeline, SegmentOptions

        volume = entry["volume"]
        options = SegmentOptions(mode=request_mode(request, self.store.mode, _modes(self.store.mode)),
                                 prior_weight=_prior_weight(request))
        localizer, bank, info, timings = localise(self.store, request, options.localizer_mode)
        segmenter = self.store.segmenter()
        embeddings = self.store.embeddings(entry)
        pipeline = MedLSAMPipeline(localizer, segmenter, options)
        result = pipeline.segment(volume, organs=organs_option(request), embeddings=embeddings)
        report = result.to_json()
        _, medlam_path, fingerprint = self.store.medlam()
        report.update({
            "label_names": self.labels,
            "timings_s": {**timings, **{k: round(float(v), 3) for k, v in result.timings_s.items()}},
            "templates": info.get("templates", []),
            "medlam": {"path": medlam_path.name, "fingerprint": fingerprint},
            "backend": segmenter.name,
        })
        return result.label, report
