"""The `medlsam` model: automatic MedLSAM, MedLAM localisation, interactive SAM (2D and 3D), click editing, the
self-supervised MedLAM trainer and the LiteMedSAM adaptation to the templates (trainer lite_medsam). Each task gets
what it needs of the app's shared state: the model cache (lib/models.py), the template source (datastore -> bank,
lib/template_source.py), the volume cache with its slice embeddings and inference slots (lib/volumes.py)."""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Union

from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from lib.conf import conf_float, conf_int
from lib.infers import EditInfer, MedLAMInfer, MedLSAMInfer, SAM2DInfer, SAM3DInfer
from lib.models import Models
from lib.template_source import TemplateSource
from lib.trainers import LiteMedSAMTrainer, MedLAMTrainer
from lib.volumes import Volumes
from medlsam.errors import MedLSAMError

logger = logging.getLogger(__name__)


class MedLSAM(TaskConfig):
    def init(self, name: str, model_dir: str, conf: Dict[str, str], planner: Any, **kwargs):
        """``kwargs["datastore"]``: a callable giving the app's datastore (MONAI Label creates it after this)."""
        super().init(name, model_dir, conf, planner, **kwargs)
        from medlsam.segment.pipeline import MODES

        conf = conf or {}
        self.mode = conf.get("mode", "prior")
        if self.mode not in MODES:
            raise MedLSAMError(f"--conf mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        # --conf prior_weight: one blend for every request; absent, the segmenter decides (the prior alone with the
        # shipped LiteMedSAM, the adapted weights' per-organ choice once `lite_medsam` has trained)
        weight = conf.get("prior_weight")
        self.prior_weight = None if weight in (None, "") else conf_float(conf, "prior_weight", 1, 0, 1)
        self.models = Models(model_dir, conf)
        self.templates = TemplateSource(
            self.models,
            model_dir,
            kwargs["datastore"],
            max_templates=conf_int(conf, "templates", 5, 1),
            labels_path=conf.get("labels") or None,
        )
        self.volumes = Volumes(
            self.models,
            size=conf_int(conf, "embedding_cache", 2, 1),
            concurrency=conf_int(conf, "infer_concurrency", 2, 1),
        )
        self.path = [str(self.models.published_medlam), str(self.models.shipped_medlam)]

    def infer(self) -> Union[InferTask, Dict[str, InferTask]]:
        return {
            self.name: MedLSAMInfer(self.models, self.templates, self.volumes, self.mode, self.prior_weight),
            "medlam": MedLAMInfer(self.models, self.templates, self.volumes, self.mode),
            "sam": SAM2DInfer(self.volumes),
            "sam_3d": SAM3DInfer(self.volumes),
            "edit": EditInfer(self.models, self.templates, self.volumes),
        }

    def trainer(self) -> Optional[Union[TrainTask, Dict[str, TrainTask]]]:
        return {"medlam": MedLAMTrainer(self.models), "lite_medsam": LiteMedSAMTrainer(self.models, self.templates)}
