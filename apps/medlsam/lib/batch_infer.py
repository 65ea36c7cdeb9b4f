"""POST /batch/infer/<model>: MONAI Label's batch inference over the datastore, on the devices this server has."""

from __future__ import annotations

import sys
from pathlib import Path

from monailabel.interfaces.tasks.batch_infer import BatchInferTask

from medlsam.utils.devices import cuda_count


class MedLSAMBatchInfer(BatchInferTask):
    """MONAI Label's task with a device that exists: its defaults ask for cuda on every GPU (device "cuda",
    multi_gpu true), and with no GPU it divides by zero. Without CUDA every image runs on cpu. In MONAI Label's
    batch subprocess it also ends when the server does."""

    def __call__(self, request, datastore, infer):
        if Path(sys.argv[0] if sys.argv else "").as_posix().endswith("monailabel/interfaces/utils/app.py"):
            from medlsam.utils.distributed import die_with_parent

            die_with_parent()
        request = dict(request)
        if cuda_count() == 0:
            request.update({"device": "cpu", "multi_gpu": False})
        return super().__call__(request, datastore, infer)
