"""The `medlsam` model: automatic MedLSAM, MedLAM localisation, interactive SAM (2D and 3D), click editing, the
self-supervised MedLAM trainer, the LiteMedSAM adaptation to the templates (trainer lite_medsam) and the network learnt
from the final labels (trainer segmentation). Each task gets
what it needs of the app's shared state: the model cache (lib/models.py), the template source (datastore -> bank,
lib/template_source.py), the volume cache with its slice embeddings and inference slots (lib/volumes.py)."""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Union

from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from lib.conf import parse_conf
from lib.infers import EditInfer, MedLAMInfer, MedLSAMInfer, SAM2DInfer, SAM3DInfer
from lib.models import Models
from lib.option_spec import infer_options
from lib.template_source import TemplateSource
from lib.trainers import LiteMedSAMTrainer, MedLAMTrainer, SegmentationTrainer
from lib.volumes import Volumes

logger = logging.getLogger(__name__)


class MedLSAM(TaskConfig):
    def init(self, name: str, model_dir: str, conf: Dict[str, str], planner: Any, **kwargs):
        """``kwargs["datastore"]``: a callable giving the app's datastore (MONAI Label creates it after this)."""
        super().init(name, model_dir, conf, planner, **kwargs)
        conf = conf or {}
        options = parse_conf(conf)  # every --conf key checked once, naming a bad one (lib/option_spec.py)
        self.mode = options["mode"]
        # --conf prior_weight: one blend for every request; absent, the segmenter decides (the prior alone with the
        # shipped LiteMedSAM, the adapted weights' per-organ choice once `lite_medsam` has trained)
        self.prior_weight = options["prior_weight"]
        self.models = Models(model_dir, conf)
        self.templates = TemplateSource(
            self.models,
            model_dir,
            kwargs["datastore"],
            max_templates=options["templates"],
            labels_path=options["labels"],
        )
        self.volumes = Volumes(self.models, size=options["embedding_cache"], concurrency=options["infer_concurrency"])
        self.path = [str(self.models.published_medlam), str(self.models.shipped_medlam)]

    def infer(self) -> Union[InferTask, Dict[str, InferTask]]:
        tasks = {
            "medlsam": MedLSAMInfer(self.models, self.templates, self.volumes, self.mode, self.prior_weight),
            "medlam": MedLAMInfer(self.models, self.templates, self.volumes, self.mode),
            "sam": SAM2DInfer(self.volumes),
            "sam_3d": SAM3DInfer(self.volumes),
            "edit": EditInfer(self.models, self.templates, self.volumes),
        }
        for task, infer in tasks.items():
            infer.option_spec = infer_options(task)  # the request options each task reads (lib/option_spec.py)
        return {self.name if task == "medlsam" else task: infer for task, infer in tasks.items()}

    def trainer(self) -> Optional[Union[TrainTask, Dict[str, TrainTask]]]:
        return {
            "medlam": MedLAMTrainer(self.models),
            "lite_medsam": LiteMedSAMTrainer(self.models, self.templates),
            "segmentation": SegmentationTrainer(self.models, self.templates),
        }
