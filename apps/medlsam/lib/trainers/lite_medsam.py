"""Trainer `lite_medsam`: adapt LiteMedSAM's mask decoder and prompt encoder to the datastore's templates (their
final labels), as `medlsam adapt` does (``medlsam.segment.adapt``).

Started in the background whenever a final label is saved (main.py), or by POST /train/lite_medsam. It publishes
model/lite_medsam_adapted.pt atomically; the model cache (lib/models.py) loads it for the next request, and sets
a file that does not load aside (the shipped LiteMedSAM serves). Until the first adaptation, and with fewer than
two usable templates, the shipped LiteMedSAM serves.
"""

from __future__ import annotations

import logging
import time

import torch
from monailabel.interfaces.tasks.train import TrainTask

from lib.models import Models
from lib.option_spec import TRAIN_OPTIONS
from lib.options import train_config
from lib.template_source import TemplateSource
from lib.trainers.options import check_train_options
from medlsam.errors import MedLSAMError, TemplateError
from medlsam.segment.adapt_data import AdaptOptions

logger = logging.getLogger(__name__)

SPEC = TRAIN_OPTIONS["lite_medsam"]  # its options: lib/option_spec.py (defaults: AdaptOptions)


class LiteMedSAMTrainer(TrainTask):
    def __init__(self, models: Models, templates: TemplateSource):
        super().__init__(
            "Adapt LiteMedSAM's mask decoder to the datastore's templates (final labels), prompted with their "
            "leave-one-out priors; publishes model/lite_medsam_adapted.pt"
        )
        self.models, self.templates = models, templates
        self.running = False  # an adaptation runs in this process (run_sync)
        self._stats = None  # (file key, record) of the published weights
        self._config = train_config(SPEC)  # /info/: defaults, the devices present

    def config(self):
        return self._config

    def stats(self):
        """The published adaptation's record (read once per file version: /info/ asks on every call)."""
        adapted = self.models.published_segmenter
        if not adapted.is_file():
            return {}
        stat = adapted.stat()
        key = (stat.st_mtime_ns, stat.st_size)
        if self._stats is not None and self._stats[0] == key:
            return self._stats[1]
        try:
            raw = torch.load(adapted, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a bad file is set aside by the model cache
            return {}
        record = raw.get("adaptation", {}) if isinstance(raw, dict) else {}
        self._stats = (key, {k: v for k, v in record.items() if k != "options"})
        return self._stats[1]

    def validate(self, request: dict) -> dict:
        """The request's options, checked (unknown keys or out-of-range values: OptionError naming the key)."""
        return check_train_options(request, SPEC)

    def __call__(self, request, datastore):
        options = self.validate(request)
        if options["threads"] > 0:
            torch.set_num_threads(options["threads"])
        self.running = True
        try:
            return self.run_adaptation(options)
        finally:
            self.running = False

    def run_adaptation(self, options: dict) -> dict:
        """Adapt on the newest usable templates (as many as the bank uses) and publish; returns a summary."""
        from medlsam.segment.adapt import fit, save_adapted
        from medlsam.segment.adapt_data import training_slices
        from medlsam.segment.sam import build_segmenter

        tic = time.perf_counter()
        model, _, fingerprint = self.models.medlam()
        images, labels, banks, names = [], [], [], {}
        for item in self.templates.candidate_templates():
            if len(banks) >= self.templates.max_templates:
                break
            try:
                banks.append(self.templates.template_bank(item))
            except MedLSAMError as exc:
                logger.warning(f"adaptation skips template {item['id']}: {exc}")
                continue
            images.append(item["image"])
            labels.append(item["label"])
        names = {value: name for name, value in self.templates.label_names().items()}
        if len(banks) < 2:
            raise TemplateError(
                f"adaptation needs at least 2 usable templates (final labels), the datastore has {len(banks)}; "
                "the shipped LiteMedSAM keeps serving"
            )
        opt = AdaptOptions(steps=options["steps"], slice_step=options["slice_step"])
        segmenter = build_segmenter("lite_medsam", None, options["device"])
        slices = training_slices(
            model,
            images,
            labels,
            names,
            segmenter,
            opt,
            cache_dir=self.models.model_dir / "adapt_cache",
            banks=banks,
        )
        segmenter, record = fit(slices, opt, options["device"])
        record["medlam_fingerprint"] = fingerprint
        run, before = record, record["template_slice_dice_before"]
        save_adapted(segmenter, self.models.published_segmenter, record)
        summary = {
            "templates": len(banks),
            "slices": len(slices),
            "steps": run["steps"],
            "loss_first": run["loss_first"],
            "loss_last": run["loss_last"],
            "template_slice_dice_before": round(before, 4),
            "template_slice_dice_after": round(record["template_slice_dice_after"], 4),
            "total_time": round(time.perf_counter() - tic, 1),
            "prior_weights": record.get("prior_weights"),
            "published": self.models.published_segmenter.name,
        }
        logger.info(f"LiteMedSAM adaptation finished: {summary}")
        return summary
