"""MedLSAM Label: a MONAI Label app for CT organ segmentation from a few labelled templates.

    monailabel start_server --app apps/medlsam --studies <datastore> --conf models medlsam

--conf keys (all optional): backend (lite_medsam | sam_vit_b|l|h | medsam_vit_b), checkpoint (SAM/MedSAM
weights), medlam (MedLAM checkpoint), mode (prior | wpl | spl), templates (max templates, 5), device (cpu),
labels (organ-names JSON), threads (torch threads, 0 = default), embedding_cache (images kept, 2), compile
(torch.compile the SAM encoder, false).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Dict

_REPO_LIB = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "lib")
try:  # the medlsam package is installed with the repository (pip install -e .); else use the checkout
    import medlsam  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.append(_REPO_LIB)

import lib.configs
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.utils.others.class_utils import get_class_names

logger = logging.getLogger(__name__)


class MedLSAMApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.model_dir = os.path.join(app_dir, "model")
        os.makedirs(self.model_dir, exist_ok=True)
        configs = {c.split(".")[-2].lower(): c for c in get_class_names(lib.configs, "TaskConfig")}
        models = [m.strip() for m in (conf or {}).get("models", "medlsam").split(",") if m.strip()]
        unknown = [m for m in models if m not in configs and m != "all"]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; available: {sorted(configs)}")
        if "all" in models:
            models = sorted(configs)
        self.models: Dict[str, TaskConfig] = {}
        for name in models:
            config = get_class_of(configs[name])()
            config.init(name, self.model_dir, conf or {}, None, app_dir=app_dir)
            self.models[name] = config
        logger.info(f"+++ Using models: {list(self.models)}")
        super().__init__(app_dir=app_dir, studies=studies, conf=conf or {}, name="MedLSAM Label",
                         description="CT organ segmentation from a few templates: MedLAM localisation + SAM, "
                                     "interactive SAM clicks, self-supervised MedLAM training",
                         version="0.1.0")

    def _stores(self):
        return [getattr(c, "store", None) for c in self.models.values() if getattr(c, "store", None)]

    def init_infers(self) -> Dict[str, InferTask]:
        for store in self._stores():
            store.datastore = self.datastore()
        infers: Dict[str, InferTask] = {}
        for config in self.models.values():
            tasks = config.infer()
            infers.update(tasks if isinstance(tasks, dict) else {config.name: tasks})
        return infers

    def init_trainers(self) -> Dict[str, TrainTask]:
        trainers: Dict[str, TrainTask] = {}
        for name, config in self.models.items():
            task = config.trainer()
            if task is not None:
                trainers["medlam" if name == "medlsam" else name] = task
        return trainers

    def init_strategies(self):
        from monailabel.tasks.activelearning.first import First
        from monailabel.tasks.activelearning.random import Random

        return {"random": Random(), "first": First()}

    def infer(self, request, datastore=None):
        from fastapi import HTTPException

        image = request.get("image")
        if isinstance(image, str) and not os.path.exists(image):
            store = datastore or self.datastore()
            if not store.get_image_uri(image):
                raise HTTPException(status_code=404, detail=f"image {image!r} not found in the datastore "
                                                            "(GET /datastore/?output=all lists the image ids)")
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(status_code=404, detail=f"no model {model!r}; available: {sorted(self._infers)}")
        return super().infer(request, datastore)

    def on_save_label(self, image_id, label_id):
        """A final label is a new template: rebuild the bank now, in the background."""
        result = super().on_save_label(image_id, label_id)
        for store in self._stores():
            store.rebuild_bank_in_background()
        return result


def get_class_of(qualified: str):
    module, _, name = qualified.rpartition(".")
    import importlib

    return getattr(importlib.import_module(module), name)
