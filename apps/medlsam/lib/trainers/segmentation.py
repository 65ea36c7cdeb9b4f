"""Trainer `segmentation`: a 3D network learnt from every final label of the datastore (``medlsam.learn``), with the
template prior of the other labels as input channels, beside the few-shot path.

Queued by main.py whenever `--conf learn_every` final labels were saved since the labels the model in use learnt
from, or by POST /train/segmentation. It holds part of the labels out, scores the network and the few-shot prior
there per organ, and publishes model/segmentation.pt atomically only when the mean held-out Dice of its per-organ
choice beats the model in use (`publish: always` forces it). The `medlsam` task then takes, for each organ, the
network or the few-shot prior, whichever scored better held out; a file that does not load is set aside and the
few-shot path serves (lib/models.py).
"""

from __future__ import annotations

import logging
import time

from monailabel.interfaces.tasks.train import TrainTask

from lib.models import Models
from lib.option_spec import TRAIN_OPTIONS
from lib.options import train_config
from lib.template_source import TemplateSource
from lib.trainers.options import check_train_options
from medlsam.errors import MedLSAMError, TemplateError

logger = logging.getLogger(__name__)

SPEC = TRAIN_OPTIONS["segmentation"]  # its options: lib/option_spec.py (defaults: medlsam.learn LearnOptions)
MIN_LABELS = 3  # two to learn from and one held out


def choice_score(model) -> float | None:
    """Mean over organs of the held-out Dice of the path the model chose per organ (None: nothing scored)."""
    scores = []
    for organ, path in model.choice.items():
        value = model.held_out.get(path, {}).get(organ)
        if value is not None:
            scores.append(float(value))
    return sum(scores) / len(scores) if scores else None


def beats_incumbent(model, current) -> tuple[bool, float | None, float | None]:
    """Whether ``model`` should replace ``current`` (the model in use, or None), and the two scores compared: both
    drafts on the held-out labels ``current`` never learnt from when there are any (``record["comparison"]``), else
    each model's own held-out choice score (different labels: the weaker comparison)."""
    if current is None:
        return True, choice_score(model), None
    comparison = model.record.get("comparison") or {}
    if comparison.get("scans") and comparison.get("new") is not None and comparison.get("incumbent") is not None:
        new, old = comparison["new"], comparison["incumbent"]
    else:
        new, old = choice_score(model), choice_score(current)
    return new is not None and (old is None or new > old), new, old


class SegmentationTrainer(TrainTask):
    def __init__(self, models: Models, templates: TemplateSource):
        super().__init__(
            "Learn a 3D segmentation network from the datastore's final labels (the template prior of the other "
            "labels as input); publishes model/segmentation.pt when its held-out Dice beats the model in use"
        )
        self.models, self.templates = models, templates
        self._config = train_config(SPEC)  # /info/: the defaults
        self._stats = None  # (model, summary) of the published model

    def config(self):
        return self._config

    def stats(self):
        """The published model's summary for /info/ (labels, organs, per-organ choice and held-out Dice)."""
        model = self.models.learned()
        if model is None:
            return {}
        if self._stats is None or self._stats[0] is not model:  # the model cache reloads it when its file changes
            self._stats = (model, summary(model))
        return self._stats[1]

    def validate(self, request: dict) -> dict:
        """The request's options, checked (unknown keys or out-of-range values: OptionError naming the key)."""
        return check_train_options(request, SPEC)

    def check_ready(self) -> None:
        """Enough final labels to learn from, checked when this trainer is asked for by name (a 409 at submission,
        not a failed training); asked with every trainer, it finishes at once saying why."""
        labelled = len(self.templates.candidate_templates())
        if labelled < MIN_LABELS:
            raise TemplateError(self._too_few(labelled))

    @staticmethod
    def _too_few(count: int) -> str:
        return (
            f"segmentation training needs at least {MIN_LABELS} final labels, the datastore has {count}; "
            "the few-shot path keeps serving"
        )

    def __call__(self, request, datastore):
        return self.run_learning(self.validate(request))

    def usable_templates(self) -> list:
        """(template, one-template bank) of every labelled image whose final label can serve (checked as the bank
        checks templates), newest first."""
        medlam = self.models.medlam()[0]
        builder = self.templates.builder(medlam)
        usable = []
        for item in self.templates.candidate_templates():
            template = self.templates.template(item)
            try:
                usable.append((template, builder.template_bank(template)))  # cached: the app's bank builds them too
            except MedLSAMError as exc:
                logger.warning(f"segmentation training skips {item['id']}: {exc}")
        return usable

    def run_learning(self, options: dict) -> dict:
        """Learn from every usable final label, compare with the model in use, publish when better."""
        from medlsam.learn.options import LearnOptions
        from medlsam.learn.trainer import learn

        tic = time.perf_counter()
        usable = self.usable_templates()
        templates = [template for template, _ in usable]
        if len(templates) < MIN_LABELS:
            logger.warning(f"segmentation training skipped: {self._too_few(len(templates))}")
            return {"skipped": self._too_few(len(templates)), "published": False}
        medlam, _, fingerprint = self.models.medlam()
        learn_options = LearnOptions(
            max_epochs=options["max_epochs"],
            time_limit_min=options["time_limit_min"],
            threads=options["threads"],
            device=options["device"] or self.models.device,
        )
        current = self.models.learned()
        seen = set(current.record.get("label_ids", [])) if current is not None else set()
        model = learn(
            [t.image for t in templates],
            [t.label for t in templates],
            [t.names for t in templates],
            learn_options,
            medlam=medlam,
            cache=self.models.model_dir / "learn_cache",
            incumbent=current,
            unseen=[i for i, t in enumerate(templates) if t.id not in seen],  # newest first: held out first
            banks=[bank for _, bank in usable],
        )
        model.record.update({"medlam_fingerprint": fingerprint, "label_ids": [t.id for t in templates]})
        better, new_score, old_score = beats_incumbent(model, current)
        if options["publish"] == "always" or better:
            model.save(self.models.published_learned)  # atomic: a reader sees the old file or the new one
        result = {
            **summary(model),
            "published": options["publish"] == "always" or better,
            "previous_held_out_dice": old_score,
            "total_time": round(time.perf_counter() - tic, 1),
        }
        logger.info(f"segmentation training finished: {result}")
        return result


def summary(model) -> dict:
    """What /info/ and a training's answer say about a learned model."""
    record = model.record
    return {
        "labels": len(record.get("labels", [])),
        "label_ids": record.get("label_ids", []),
        "organs": list(model.organs),
        "choice": dict(model.choice),
        "held_out_dice": {path: model.held_out.get(path, {}) for path in ("learned", "fewshot")},
        "held_out_choice_dice": choice_score(model),
        "compared_with_previous": record.get("comparison"),  # both drafts on the labels the previous never saw
        "resumed_from_epoch": record.get("resumed_from_epoch"),
        "epochs": record.get("epochs"),
        "minutes": record.get("total_minutes"),
    }
