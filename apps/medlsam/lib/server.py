"""What MONAI Label 0.8.5's HTTP layer leaves to the app: its endpoints are ``async def`` functions that call the
blocking app (an inference of tens of seconds stops the event loop, so ``/info/`` and every other request wait,
even with MONAI_LABEL_INFER_CONCURRENCY, whose pool is awaited on the loop), and a ``params`` form field that is not
a JSON object fails with a bare 500.

``install(app)`` re-registers the heavy endpoints (infer, /info/ and the datastore listing, which may wait on a
DICOMweb server, datastore and model uploads, label/image info, training) as plain ``def`` endpoints, which FastAPI
runs in its worker threads, after checking their parameters (400 naming the parameter). The original handlers, with
their authentication dependencies, do the work unchanged; when one raises, the cleanups it queued (the removal of an
upload's temporary file) run at once.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from contextvars import ContextVar
from typing import Any, Callable, Dict, Optional

from fastapi import BackgroundTasks, HTTPException
from fastapi.routing import APIRoute

from lib.datastore import valid_name

logger = logging.getLogger(__name__)


def json_object(value: Any, key: str) -> Dict[str, Any]:
    """A form field holding a JSON object ("" or absent: {}); else 400 naming the field."""
    if value is None or value == "":
        return {}
    try:
        data = json.loads(value) if isinstance(value, (str, bytes)) else value
    except ValueError:
        raise HTTPException(status_code=400, detail=f"{key} must be a JSON object, got text that is not JSON") from None
    if not isinstance(data, dict):
        raise HTTPException(status_code=400, detail=f"{key} must be a JSON object, not a {type(data).__name__}")
    return data


UPLOADED_LABEL: ContextVar[bool] = ContextVar("medlsam_uploaded_label", default=False)
RTSTRUCT_OUTPUT: ContextVar[bool] = ContextVar("medlsam_rtstruct_output", default=False)
OUTPUTS = ("image", "json", "all", "dicom_seg", "rtstruct")  # MONAI Label's ResultType, and rtstruct


def check_infer(kwargs: Dict[str, Any]) -> None:
    """400 for bad parameters. The request's ``label`` text names a structure and travels as ``label_name``: no
    text a client sends is ever taken as a server path. Only an uploaded ``label`` file is a label file (MONAI Label
    puts its temporary path into the request; UPLOADED_LABEL tells the app it came from an upload)."""
    params = json_object(kwargs.get("params"), "params")
    if "label" in params or "label_file" in params:
        params = dict(params)
        params.pop("label_file", None)
        if "label" in params:
            params["label_name"] = params.pop("label")
        kwargs["params"] = json.dumps(params)
    UPLOADED_LABEL.set(kwargs.get("label") is not None)
    output = kwargs.get("output")
    if output is not None and output not in OUTPUTS:
        raise HTTPException(status_code=400, detail=f"output {str(output)[:40]!r}: use one of {list(OUTPUTS)}")
    RTSTRUCT_OUTPUT.set(output == "rtstruct")  # the app writes the structure set; MONAI Label sends it as a file
    if output is not None:
        from monailabel.endpoints.infer import ResultType

        kwargs["output"] = ResultType("image" if output == "rtstruct" else output)
    if kwargs.get("file") is not None:
        raise HTTPException(
            status_code=400,
            detail="file: infer takes the id of a datastore image (upload it with "
            "PUT /datastore/image) or a session_id, not an uploaded file",
        )
    session = kwargs.get("session_id")
    if session and not valid_name(session):
        raise HTTPException(status_code=404, detail=f"session {str(session)[:80]!r} not found")


def check_form(key: str) -> Callable[[Dict[str, Any]], None]:
    return lambda kwargs: json_object(kwargs.get(key), key) and None


def check_train(kwargs: Dict[str, Any]) -> None:
    """Train options checked by the trainer before a subprocess starts; run_sync only when nothing trains."""
    from monailabel.interfaces.utils.app import app_instance
    from monailabel.utils.async_tasks.utils import processes

    from medlsam.errors import MedLSAMError

    trainers = app_instance()._trainers
    model = kwargs.get("model")
    params = kwargs.get("params") or {}
    if not isinstance(params, dict):
        raise HTTPException(status_code=400, detail="params must be a JSON object")
    requests = {model: params} if model else {name: params.get(name) or {} for name in trainers}
    for name, options in requests.items():
        if name not in trainers:
            raise HTTPException(status_code=404, detail=f"no trainer {name!r}; available: {sorted(trainers)}")
        if not isinstance(options, dict):
            raise HTTPException(status_code=400, detail=f"params for {name} must be a JSON object")
        validate = getattr(trainers[name], "validate", None)
        if validate is not None:
            try:
                validate(options)
            except MedLSAMError as exc:
                raise HTTPException(status_code=400, detail=str(exc)) from None
        ready = getattr(trainers[name], "check_ready", None) if model else None
        if ready is not None:
            try:
                ready()
            except MedLSAMError as exc:
                raise HTTPException(status_code=409, detail=str(exc)) from None
    if kwargs.get("run_sync") and (processes("train") or any(getattr(t, "running", False) for t in trainers.values())):
        raise HTTPException(status_code=429, detail="a training is already running")


def _offload(endpoint: Callable, check: Optional[Callable[[Dict[str, Any]], None]]) -> Callable:
    """A sync endpoint (run in a worker thread) with the original's signature (infer's ``output`` as plain text,
    checked by ``check_infer``: it also takes rtstruct): check, then the original."""

    def run(**kwargs):
        if check is not None:
            check(kwargs)
        try:
            return asyncio.run(endpoint(**kwargs))  # the original only wraps blocking calls: no await inside
        except Exception:
            _run_cleanups(kwargs.get("background_tasks"))
            raise

    signature = inspect.signature(endpoint)  # FastAPI reads the parameters (and auth) from it
    run.__signature__ = signature.replace(
        parameters=[
            p.replace(annotation=Optional[str]) if p.name == "output" and check is check_infer else p
            for p in signature.parameters.values()
        ]
    )
    run.__name__, run.__doc__ = endpoint.__name__, endpoint.__doc__
    return run


def _run_cleanups(tasks: Optional[BackgroundTasks]) -> None:
    """Run the tasks an endpoint queued before it raised. MONAI Label queues the removal of an upload's temporary
    file as a background task, which Starlette runs only after a successful response: without this every refused
    upload (a 400 for a bad label, a 409 for an existing image) would stay in the temporary folder."""
    for task in list(tasks.tasks) if tasks is not None else []:
        if not task.is_async:
            try:
                task.func(*task.args, **task.kwargs)
            except Exception:  # a cleanup must not hide the refusal the client is owed
                logger.exception(f"cleanup {getattr(task.func, '__name__', task.func)} failed")


def install(app, conf: Optional[Dict[str, Any]] = None) -> int:
    """Re-register the heavy MONAI Label endpoints of ``app`` as checked worker-thread endpoints (idempotent), and
    put the front door on it (lib/guard.py: hosts, CORS, /logs/, sessions, inference time bounds)."""
    from monailabel.endpoints import datastore, infer, info, model, train

    from lib import train_queue
    from lib.guard import protect

    replace = train_queue.install()  # at most MAX_WAITING queued per trainer; DELETE /train/ also drops them
    targets = {
        infer.api_run_inference: check_infer,
        info.api_app_info: None,  # over DICOMweb these two read the server's series lists
        datastore.api_datastore: None,
        datastore.api_get_image_info: None,
        datastore.api_download_image: None,
        datastore.api_add_image: check_form("params"),
        datastore.api_save_label: check_form("params"),
        datastore.api_put_image_info: check_form("info"),
        datastore.api_put_label_info: check_form("info"),
        datastore.api_update_label_info: check_form("params"),
        datastore.api_remove_image: None,
        datastore.api_remove_label: None,
        model.api_update_model: None,  # refused by the app (403), after the upload was copied to a temporary file
        train.api_run: train_queue.check_train_all,
        train.api_run_model: train_queue.check_train_model,
        train.api_stop: None,  # replaced by train_queue.api_stop
    }
    replaced = 0
    for router in routers(app.router):
        for i, route in enumerate(router.routes):
            if isinstance(route, APIRoute) and route.endpoint in targets:
                router.routes[i] = APIRoute(
                    route.path,
                    _offload(replace.get(route.endpoint, route.endpoint), targets[route.endpoint]),
                    methods=list(route.methods),
                    name=route.name,
                    summary=route.summary,
                    tags=route.tags,
                    responses=route.responses,
                    deprecated=route.deprecated,
                    include_in_schema=route.include_in_schema,
                )
                replaced += 1
        getattr(router, "_mark_routes_changed", lambda: None)()  # FastAPI >= 0.160 caches included routes
    app.openapi_schema = None
    logger.info(f"{replaced} endpoints run off the event loop with parameter checks")
    protect(app, conf or {})
    return replaced


def routers(router, seen=None) -> list:
    """``router`` and every router included in it (FastAPI keeps included routers by reference since 0.160)."""
    seen = seen if seen is not None else set()
    if id(router) in seen:
        return []
    seen.add(id(router))
    found = [router]
    for route in router.routes:
        if hasattr(route, "original_router"):
            found += routers(route.original_router, seen)
    return found
