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
        learned = self.models.learned()  # the network the segmentation trainer published, if any
        key = (fingerprint, repr(options), repr(localize), repr(organs), segmenter.name)
        cached = entry.get("medlsam_result")  # a repeated request: the same image, bank, models and options
        models = (bank, segmenter, learned)  # the same objects: nothing was rebuilt or published meanwhile
        if cached is not None and cached[0] == key and all(a is b for a, b in zip(cached[1], models)):
            entry["auto_label"] = cached[2]
            answer = {**cached[3], "cached": True, "timings_s": timings}
            return cached[2].copy(), answer
        if learned is not None:  # the segmentation trainer published a network: the better path per organ
            label, answer = self.learned_path(entry, learned, (bank, segmenter), localize, options, organs, timings)
            answer["medlam"] = {"path": medlam_path.name, "fingerprint": fingerprint}
            entry["auto_label"] = label
            entry["medlsam_result"] = (key, models, label, answer)
            return label.copy(), {**answer, "cached": False}
        pipeline = MedLSAMPipeline(Localizer(model, bank, localize), segmenter, options)
        result = pipeline.segment(entry["volume"], organs, embeddings=self.volumes.embeddings(entry), timings=timings)
        entry["auto_label"] = result.label  # the current segmentation the `edit` task corrects
        weights = pipeline.organ_weights(list(result.label_names))
        answer = {
            **result.to_json(),
            "paths": {name: "fewshot_sam" if weights[name] < 1 else "fewshot" for name in result.label_names},
            "label_names": self.labels,
            "templates": info.get("templates", []),
            "medlam": {"path": medlam_path.name, "fingerprint": fingerprint},
            "backend": segmenter.name,
            "adapted": segmenter.adaptation is not None,  # LiteMedSAM adapted to the templates (trainer lite_medsam)
        }
        entry["medlsam_result"] = (key, models, result.label, answer)  # what a repeated request returns
        return result.label.copy(), {**answer, "cached": False}

    def learned_path(self, entry: dict, learned, models, localize, options, organs: list[str] | None, timings: dict):
        """(label, result JSON) of the per-organ choice: the learned network where it beat the few-shot prior on the
        held-out saved labels (recorded in its file), the calibrated template prior elsewhere and for organs the
        network does not know, blended with SAM where the segmenter's prior weight for the organ is below 1 (chosen
        on held-out templates by the lite_medsam trainer, or asked for). The network's prior channels come from the
        bank of every saved label."""
        from medlsam.atlas.localize import Localizer
        from medlsam.learn.predict import blend_sam, chosen_probabilities, to_label

        bank, segmenter = models
        tic = time.perf_counter()
        model = self.models.medlam()[0]
        every = self.templates.all_labels_bank()
        wanted = [o for o in (organs or list(bank.organs)) if o in every.organs]
        located = Localizer(model, every, localize).localize(entry["volume"], wanted, prior=True)["organs"]
        priors = {name: (loc.prior if loc.found else None) for name, loc in located.items()}
        localized = time.perf_counter()
        cuts = {**{name: organ.prior_cut for name, organ in bank.organs.items()}, **learned.prior_cuts}
        probabilities, used = chosen_probabilities(learned, entry["volume"], priors, cuts, wanted)
        values = {name: value for name, value in self.labels.items() if name in probabilities}
        timings.update({"localize": round(localized - tic, 3), "learned": round(time.perf_counter() - localized, 3)})
        tic = time.perf_counter()
        embeddings = self.volumes.embeddings(entry)  # lazy: a slice is encoded only when SAM needs it
        weights = blend_sam(
            segmenter, entry["volume"], priors, cuts, probabilities, used, values, options.prior_weight, embeddings
        )
        if weights:
            timings["sam"] = round(time.perf_counter() - tic, 3)
        label = to_label({name: probabilities[name] for name in values}, values)
        held_out = {name: learned.held_out.get(path, {}).get(name) for name, path in used.items()}
        adapted = (getattr(segmenter, "adaptation", None) or {}).get("held_out_dice", {})
        held_out.update({name: adapted.get(name, {}).get(str(w)) for name, w in weights.items()})
        return label, {
            "label_names": self.labels,
            "paths": used,
            "held_out_dice": held_out,
            "not_found": [name for name in wanted if not (label == values.get(name, -1)).any()],
            "boxes": {name: loc.to_json() for name, loc in located.items()},
            "timings_s": timings,
            "learned_model": {"labels": len(learned.record.get("labels", [])), "organs": learned.organs},
            "backend": segmenter.name,
            "adapted": segmenter.adaptation is not None,
        }
