"""Shared behaviour of the app's infer tasks: input checks, clear HTTP errors, result writing."""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid

import numpy as np
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask

from medlsam.errors import CheckpointError, InvalidImageError, MedLSAMError, TemplateError

from lib.store import ModelStore, NoTemplatesError

logger = logging.getLogger(__name__)

RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".seg.nrrd")
RESULT_DTYPES = ("uint8", "uint16", "int16", "int32", "float32")


def http_error(exc: Exception) -> HTTPException:
    """A clear HTTP error for a failure the user can fix (the server keeps serving)."""
    if isinstance(exc, HTTPException):
        return exc
    if isinstance(exc, NoTemplatesError):
        return HTTPException(status_code=409, detail=str(exc))
    if isinstance(exc, CheckpointError):
        return HTTPException(status_code=503, detail=f"model weights unavailable: {exc}")
    if isinstance(exc, InvalidImageError):
        return HTTPException(status_code=400, detail=f"unusable image: {exc}")
    if isinstance(exc, TemplateError):
        return HTTPException(status_code=400, detail=str(exc))
    if isinstance(exc, MedLSAMError):
        return HTTPException(status_code=400, detail=str(exc))
    return HTTPException(status_code=500, detail=f"{type(exc).__name__}: {exc}")


class MedLSAMInferTask(InferTask):
    """Base: subclasses implement ``run(request, entry) -> (label array in file order, result json)``."""

    def __init__(self, store: ModelStore, type, labels, dimension: int, description: str, config=None):
        self.store = store
        super().__init__(type=type, labels=labels, dimension=dimension, description=description, config=config)

    def is_valid(self) -> bool:
        return True

    def image_path(self, request: dict) -> str:
        path = request.get("image")
        if not isinstance(path, str) or not path or not os.path.exists(path):
            raise HTTPException(status_code=404, detail=f"image {request.get('image_id', path)!r} not found in the "
                                                        "datastore (GET /datastore/?output=all lists the image ids)")
        return path

    def __call__(self, request: dict):
        tic = time.perf_counter()
        try:
            path = self.image_path(request)
            entry = self.store.volume_entry(path)
            loaded = time.perf_counter()
            with entry["lock"]:  # one inference per image at a time: embeddings are shared
                label, result = self.run(request, entry)
            inferred = time.perf_counter()
            out = self.write(label, entry["volume"], request)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a clear HTTP error
            error = http_error(exc)
            if error.status_code >= 500 and not isinstance(exc, (HTTPException, MedLSAMError)):
                logger.exception(f"{self.__class__.__name__} failed")
            else:
                logger.warning(f"{self.__class__.__name__}: {error.status_code} {error.detail}")
            raise error from None
        done = time.perf_counter()
        result["latencies"] = {"pre": round(loaded - tic, 3), "infer": round(inferred - loaded, 3),
                               "post": round(done - inferred, 3), "total": round(done - tic, 3)}
        return out, result

    def run(self, request: dict, entry: dict) -> tuple[np.ndarray, dict]:
        raise NotImplementedError

    @staticmethod
    def write(label: np.ndarray, volume, request: dict) -> str:
        from medlsam.volume import write_volume

        ext = request.get("result_extension") or ".nii.gz"
        if ext not in RESULT_EXTENSIONS:
            raise HTTPException(status_code=400, detail=f"result_extension {ext!r} not supported; use one of "
                                                        f"{list(RESULT_EXTENSIONS)}")
        dtype = request.get("result_dtype") or "uint8"
        if dtype not in RESULT_DTYPES:
            raise HTTPException(status_code=400, detail=f"result_dtype {dtype!r} not supported; use one of "
                                                        f"{list(RESULT_DTYPES)}")
        path = os.path.join(tempfile.gettempdir(), f"medlsam-{uuid.uuid4().hex}{ext}")
        write_volume(label.astype(dtype), volume, path)
        return path


def organs_option(request: dict) -> list[str] | None:
    """``organs`` as a list or a comma-separated string; None for all."""
    organs = request.get("organs")
    if organs is None or organs == "" or organs == []:
        return None
    if isinstance(organs, str):
        organs = [o.strip() for o in organs.split(",") if o.strip()]
    if not isinstance(organs, (list, tuple)) or not all(isinstance(o, str) for o in organs):
        raise HTTPException(status_code=400, detail=f"organs must be a list of organ names, got {organs!r}")
    return list(organs) or None


class DynamicLabels:
    """InferTask.labels that follows the datastore's organ names (the constructor's value is ignored)."""

    @property
    def labels(self):
        try:
            return self.store.label_names()
        except MedLSAMError as exc:
            logger.warning(f"organ names unavailable: {exc}")
            return {}

    @labels.setter
    def labels(self, value):
        pass
