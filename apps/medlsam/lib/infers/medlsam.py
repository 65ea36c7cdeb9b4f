"""Infer task `medlsam`: automatic multi-organ segmentation with the datastore's template bank."""

from __future__ import annotations

from monailabel.interfaces.tasks.infer_v2 import InferType

from lib.infers.common import DynamicLabels, MedLSAMInferTask, organs_option
from lib.infers.medlam import localise, localize_config


class MedLSAMInfer(DynamicLabels, MedLSAMInferTask):
    def __init__(self, store):
        super().__init__(store, InferType.SEGMENTATION, None, 3,
                         "MedLSAM: MedLAM localises every template organ, SAM segments each slice of its box",
                         config=localize_config())

    def run(self, request: dict, entry: dict):
        from medlsam.pipeline import MedLSAMPipeline, SegmentOptions

        volume = entry["volume"]
        localizer, bank, info, timings = localise(self.store, request, volume)
        segmenter = self.store.segmenter()
        embeddings = self.store.embeddings(entry)
        pipeline = MedLSAMPipeline(localizer, segmenter, SegmentOptions(mode=localizer.options.mode))
        result = pipeline.segment(volume, organs=organs_option(request), embeddings=embeddings)
        report = result.to_json()
        _, medlam_path, fingerprint = self.store.medlam()
        report.update({
            "label_names": self.labels,
            "timings_s": {**timings, **{k: round(float(v), 3) for k, v in result.timings_s.items()}},
            "templates": info.get("templates", []),
            "medlam": {"path": str(medlam_path), "fingerprint": fingerprint},
            "backend": segmenter.name,
        })
        return result.label, report
