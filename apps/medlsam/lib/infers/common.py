"""Shared behaviour of the app's infer tasks: input checks, clear HTTP errors, result writing."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
import uuid

import numpy as np
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask

from lib.conf import scrub_paths
from lib.option_spec import COMMON_INFER_OPTIONS, RESULT_DTYPES, RESULT_EXTENSIONS  # noqa: F401 - re-exported
from lib.options import Option, option, parse, read
from lib.template_source import NoTemplatesError, TemplateSource
from lib.volumes import Volumes
from medlsam.errors import CheckpointError, InvalidImageError, MedLSAMError, TemplateError
from medlsam.utils import cancel
from medlsam.utils.cancel import Cancelled

logger = logging.getLogger(__name__)


def http_error(exc: Exception) -> HTTPException:
    """A clear HTTP error for a failure the user can fix (the server keeps serving); no server path in it."""
    if isinstance(exc, HTTPException):
        return HTTPException(status_code=exc.status_code, detail=scrub_paths(str(exc.detail)))
    if isinstance(exc, Cancelled):
        status, detail = 503, f"inference {exc}"
    elif isinstance(exc, NoTemplatesError):
        status, detail = 409, str(exc)
    elif isinstance(exc, CheckpointError):
        status, detail = 503, f"model weights unavailable: {exc}"
    elif isinstance(exc, InvalidImageError):
        status, detail = 400, f"unusable image: {exc}"
    elif isinstance(exc, (TemplateError, MedLSAMError)):
        status, detail = 400, str(exc)
    else:
        status, detail = 500, f"internal error ({type(exc).__name__}); the server log has the details"
    return HTTPException(status_code=status, detail=scrub_paths(detail))


def output_dtype(requested: str, label: np.ndarray) -> str:
    """The requested result dtype, widened when the label's values do not fit it (never wrapped)."""
    if not label.size:
        return requested
    low, high = int(label.min()), int(label.max())
    for dtype in [requested] + [d for d in ("uint16", "int32") if d != requested]:
        info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
        if info is None or info.min <= low and high <= info.max:
            return dtype
    return "int32"


def flag(request: dict, key: str):
    """A boolean request option (true/false, 1/0, yes/no, on/off); None when absent; else OptionError naming it."""
    return read(Option(key, "bool", None, ""), request.get(key), "infer option")


def number(request: dict, key: str, default, cast=float, low=None, high=None):
    """A finite number option within [low, high] (default when absent); else OptionError naming it. The bounds are
    the spec's (lib/option_spec.py; tests/unit/test_options.py checks that the callers pass those)."""
    kind = "int" if cast is int else "float"
    return read(Option(key, kind, default, "", low, high), request.get(key), "infer option")


class MedLSAMInferTask(InferTask):
    """Base: subclasses implement ``run(request, entry) -> (label array in file order, result json)``."""

    option_spec = COMMON_INFER_OPTIONS  # the task's request options: lib/option_spec.py infer_options(<task>)

    def __init__(self, volumes: Volumes, type, labels, dimension: int, description: str, config=None):
        self.volumes = volumes
        super().__init__(type=type, labels=labels, dimension=dimension, description=description, config=config)

    def is_valid(self) -> bool:
        return True

    def image_path(self, request: dict) -> str:
        path = request.get("image")
        if not isinstance(path, str) or not path or not os.path.exists(path):
            raise HTTPException(
                status_code=404,
                detail=f"image {request.get('image_id', '')!r} not found in the "
                "datastore (GET /datastore/?output=all lists the image ids)",
            )
        return path

    def check_options(self, request: dict):
        """A task's own options, checked before any work (400 naming a bad one); the base task has none."""

    def check_request(self, request: dict) -> None:
        """Every option checked before any work: the task's options of the spec (``option_spec``, set by the model
        config; other keys are clicks and MONAI Label's fields), the number of clicks and the task's own checks;
        OptionError or 400 naming the bad one."""
        from medlsam.interact.interactive import check_click_count

        parse(self.option_spec, request, "infer option", allowed=None)
        check_click_count(count_clicks(request))
        self.check_options(request)

    def __call__(self, request: dict):
        name = request.get("model") or self.__class__.__name__
        image_id = request.get("image_id") or os.path.basename(str(request.get("image", "")))
        try:
            self.check_request(request)
        except (HTTPException, MedLSAMError) as exc:
            raise http_error(exc) from None
        with self.volumes.infer_slot():
            tic = time.perf_counter()
            try:
                path = self.image_path(request)
                entry = self.volumes.volume_entry(path)
                loaded = time.perf_counter()
                with waiting(entry["lock"]):  # one inference per image at a time: embeddings are shared
                    label, result = self.run(request, entry)
                inferred = time.perf_counter()
                out, dtype = self.write(label, entry["volume"], request)
            except Exception as exc:  # noqa: BLE001 - every failure becomes a clear HTTP error
                error = http_error(exc)
                if error.status_code >= 500 and not isinstance(exc, (HTTPException, MedLSAMError)):
                    logger.exception(f"{name} image={image_id} failed")
                else:
                    logger.warning(f"{name} image={image_id}: {error.status_code} {error.detail}")
                raise error from None
        done = time.perf_counter()
        result["latencies"] = {
            "pre": round(loaded - tic, 3),
            "infer": round(inferred - loaded, 3),
            "post": round(done - inferred, 3),
            "total": round(done - tic, 3),
        }
        result["result_dtype"] = dtype
        logger.info(
            f"{name} image={image_id} done in {done - tic:.1f} s ("
            + ", ".join(
                f"{k} {v:.1f}"
                for k, v in stages(loaded - tic, inferred - loaded, done - inferred, result.get("timings_s"))
            )
            + ")"
        )
        return out, result

    def run(self, request: dict, entry: dict) -> tuple[np.ndarray, dict]:
        raise NotImplementedError

    @staticmethod
    def write(label: np.ndarray, volume, request: dict) -> tuple[str, str]:
        """(result file, its dtype): the requested dtype, widened when the label's values need it."""
        from medlsam.io.volume import write_volume

        ext, dtype = result_options(request)
        dtype = output_dtype(dtype, label)
        path = os.path.join(tempfile.gettempdir(), f"medlsam-{uuid.uuid4().hex}{ext}")
        write_volume(label.astype(dtype), volume, path)
        return path, dtype


def result_options(request: dict) -> tuple[str, str]:
    """(result_extension, result_dtype) of the request; OptionError naming a bad one."""
    ext, dtype = (option(COMMON_INFER_OPTIONS, key) for key in ("result_extension", "result_dtype"))
    return read(ext, request.get(ext.name), "infer option"), read(dtype, request.get(dtype.name), "infer option")


def count_clicks(request: dict) -> int:
    """Clicks in a request, every form together: lists of [i, j, k] under ``foreground``, ``background`` or an
    organ's name (a malformed list counts by its length; the task's own parsing names what is wrong with it)."""
    total = 0
    for value in request.values():
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple)):
            total += len(value)
    return total


@contextlib.contextmanager
def waiting(lock):
    """Hold ``lock``, waiting for it in short steps that honour the request's bound (medlsam.utils.cancel)."""
    while not lock.acquire(timeout=0.25):
        cancel.check()
    try:
        yield
    finally:
        lock.release()


def stages(load: float, infer: float, write: float, timings: dict | None) -> list[tuple[str, float]]:
    """Seconds by stage for the request's log line, from the library's timings_s where it gives them."""
    timings = timings or {}
    known = [
        ("bank", timings.get("models_and_bank")),
        ("localize", timings.get("localize", timings.get("total"))),
        ("encode", timings.get("encode")),
        ("decode", timings.get("decode")),
    ]
    known = [(k, float(v)) for k, v in known if v is not None]
    rest = infer - sum(v for _, v in known)
    return [("load", load), *known, ("other" if known else "infer", max(rest, 0.0)), ("write", write)]


class DynamicLabels:
    """InferTask.labels that follows the datastore's organ names (the constructor's value is ignored)."""

    templates: TemplateSource

    @property
    def labels(self):
        try:
            return self.templates.label_names()
        except (MedLSAMError, HTTPException) as exc:  # bad labels file; DICOMweb server down (503)
            logger.warning(f"organ names unavailable: {getattr(exc, 'detail', exc)}")
            return {}

    @labels.setter
    def labels(self, value):
        pass
