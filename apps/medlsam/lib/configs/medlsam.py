"""The `medlsam` model: automatic MedLSAM, MedLAM localisation, interactive SAM (2D and 3D), and the
self-supervised MedLAM trainer. All share one ModelStore (lazy models, template bank, embedding cache)."""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Union

from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from lib.infers import MedLAMInfer, MedLSAMInfer, SAM2DInfer, SAM3DInfer
from lib.store import ModelStore
from lib.trainers import MedLAMTrainer

logger = logging.getLogger(__name__)


class MedLSAM(TaskConfig):
    def init(self, name: str, model_dir: str, conf: Dict[str, str], planner: Any, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        self.store = ModelStore(kwargs.get("app_dir", ""), model_dir, conf)
        self.path = [str(self.store.published_medlam), str(self.store.shipped_medlam)]

    def infer(self) -> Union[InferTask, Dict[str, InferTask]]:
        return {
            self.name: MedLSAMInfer(self.store),
            "medlam": MedLAMInfer(self.store),
            "sam": SAM2DInfer(self.store),
            "sam_3d": SAM3DInfer(self.store),
        }

    def trainer(self) -> Optional[TrainTask]:
        return MedLAMTrainer(self.store)
