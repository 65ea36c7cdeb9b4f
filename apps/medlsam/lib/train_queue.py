"""A bounded training queue, and a DELETE /train/ that empties it (issue 26, unbounded work).

How MONAI Label 0.8.5 queues: ``AsyncTask.run("train", ..., enqueue=True)`` (POST /train/<model>?enqueue=true,
POST /train/ for every trainer, and the app's ``async_training``, which main.py calls when a final label is saved)
calls ``run_background_task``, which appends the task (status SUBMITTED) to ``background_tasks["train"]`` and submits
``_task_func`` to one single-worker executor shared by all trainers; the worker runs the queued tasks one after the
other, each as a subprocess. Nothing bounds that queue, and ``DELETE /train/`` kills only the running subprocess: the
queued tasks start later, one by one.

``install()`` wraps both functions (idempotent):

* a submission (whatever its path) is refused with HTTP 429, before anything is queued, when ``MAX_WAITING`` tasks
  of the same trainer already wait, i.e. are SUBMITTED and not yet taken by the worker. The check and the append
  happen under one lock, so concurrent requests cannot overshoot;
* the worker skips a task no longer SUBMITTED when its turn comes (a task ``stop_all`` dropped), and marks a task
  whose start raised ERROR (else it would stay SUBMITTED, and hold a queue place, for ever).

``check_train_model`` / ``check_train_all`` check a POST /train request (lib.server.check_train: its options, then
room in the queue of each trainer it would queue) and ``api_stop`` replaces DELETE /train/: it drops every waiting
task of every trainer, stops the running one and says what it stopped and dropped. lib/server.py's ``install``
registers them (the endpoint through ``_offload``, so it runs in a worker thread).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from datetime import datetime
from typing import Any, Callable, Dict, List, Optional

from fastapi import Depends, HTTPException
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC, User

from lib.server import check_train

logger = logging.getLogger(__name__)

MAX_WAITING = 2  # tasks of one trainer that may wait behind the running training (more: HTTP 429)
STOP_WAIT_S = 10.0  # how long DELETE /train/ waits for a task the worker took to start its subprocess (then kills it)
DROPPED = "DROPPED"  # the status of a task DELETE /train/ removed from the queue (it never starts)

_lock = threading.RLock()  # a submission's count and append; the worker's take; DELETE's drop
_taken: set = set()  # ids of the tasks the worker took (starting or running)
_killed: set = set()  # ids of the tasks DELETE /train/ killed (STOPPED, whatever the worker wrote meanwhile)


def _now() -> str:
    return datetime.today().strftime("%Y-%m-%d %H:%M:%S")  # as MONAI Label writes start_ts / end_ts


def _model(task: dict) -> Optional[str]:
    request = task.get("request")
    return request.get("model") if isinstance(request, dict) else None


def waiting(model: Optional[str] = None) -> List[dict]:
    """The train tasks waiting for the worker (of ``model`` only, when given), oldest first."""
    from monailabel.utils.async_tasks.utils import tasks

    with _lock:
        return [
            task
            for task in tasks("train")
            if task.get("status") == "SUBMITTED"
            and task.get("id") not in _taken
            and (model is None or _model(task) == model)
        ]


def check_room(models: List[str]) -> None:
    """HTTP 429 naming the trainer and the limit when the queue of one of ``models`` is full."""
    for model in models:
        count = len(waiting(model))
        if count >= MAX_WAITING:
            raise HTTPException(
                status_code=429,
                detail=f"training queue of {model!r} is full: {count} waiting (at most {MAX_WAITING} per trainer); "
                "try again once one has started, or DELETE /train/ to stop the training and empty the queue",
            )


def check_train_model(kwargs: Dict[str, Any]) -> None:
    """POST /train/<model>: its options (400), then room in the trainer's queue (429)."""
    check_train(kwargs)
    if not kwargs.get("run_sync"):
        check_room([kwargs.get("model")])


def check_train_all(kwargs: Dict[str, Any]) -> None:
    """POST /train/ (queues every trainer): their options (400), then room in every queue (429), so that the
    request queues all of them or none."""
    from monailabel.interfaces.utils.app import app_instance

    check_train(kwargs)
    if not kwargs.get("run_sync"):
        check_room(list(app_instance()._trainers))


def _bounded_submit(original: Callable) -> Callable:
    @functools.wraps(original)
    def run_background_task(request, method, callback=None, debug=False):
        if method != "train":
            return original(request, method, callback, debug)
        with _lock:
            check_room([request.get("model")])
            return original(request, method, callback, debug)

    run_background_task.medlsam_train_queue = True
    return run_background_task


def _guarded_task(original: Callable) -> Callable:
    @functools.wraps(original)
    def _task_func(task, method, callback=None):
        if method != "train":
            return original(task, method, callback)
        with _lock:
            if task.get("status") != "SUBMITTED":  # dropped while it waited: it never starts
                logger.info(f"train task {task.get('id')} ({_model(task)}) was {task.get('status')}: not started")
                return None
            _taken.add(task.get("id"))
        try:
            return original(task, method, callback)
        except BaseException as exc:
            if task.get("status") in ("SUBMITTED", "RUNNING"):
                task["status"], task["end_ts"] = "ERROR", _now()
            logger.error(f"train task {task.get('id')} ({_model(task)}) could not run: {exc!r}")
            raise
        finally:
            with _lock:
                _taken.discard(task.get("id"))
                if task.get("id") in _killed:  # killed before the worker wrote RUNNING: not an ERROR
                    _killed.discard(task.get("id"))
                    task["status"] = "STOPPED"

    _task_func.medlsam_train_queue = True
    return _task_func


def install() -> Dict[Callable, Callable]:
    """Bound every train submission and let a dropped task never start (idempotent). Returns the endpoint that
    replaces MONAI Label's: {monailabel.endpoints.train.api_stop: api_stop}."""
    from monailabel.endpoints import train
    from monailabel.utils.async_tasks import task, utils

    with _lock:
        if not getattr(task.run_background_task, "medlsam_train_queue", False):
            task.run_background_task = _bounded_submit(task.run_background_task)  # AsyncTask.run's name for it
        if not getattr(utils._task_func, "medlsam_train_queue", False):
            utils._task_func = _guarded_task(utils._task_func)  # the executor looks it up at each submission
    logger.info(f"training queue: at most {MAX_WAITING} waiting per trainer; DELETE /train/ drops them")
    return {train.api_stop: api_stop}


def _summary(task: dict) -> dict:
    return {key: task.get(key) for key in ("id", "status", "start_ts", "end_ts")} | {"model": _model(task)}


def _kill(task_id: str) -> Optional[dict]:
    """Kill the subprocess of train task ``task_id`` and its process tree and mark the task STOPPED (as MONAI
    Label's stop_background_task, which raises on a process of the tree that ended meanwhile and then leaves the
    training running); None when it has no subprocess."""
    import psutil
    from monailabel.utils.async_tasks.utils import processes, tasks

    process = processes("train").get(task_id)
    if process is None:
        return None
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:  # it ended meanwhile
        children = []
    for child in children:
        try:
            child.kill()
        except psutil.Error:  # ended with its parent
            pass
    with _lock:
        _killed.add(task_id)
    process.kill()  # a no-op when it ended meanwhile
    processes("train").pop(task_id, None)
    logger.info(f"killed train task {task_id} (pid {process.pid}, {len(children)} child process(es))")
    task = next((t for t in tasks("train") if t.get("id") == task_id), None)
    if task is not None:
        task["status"], task["end_ts"] = "STOPPED", _now()
    return task


def stop_all() -> dict:
    """Drop every waiting train task (of every trainer) and stop the running one: {"stopped": [...], "dropped":
    [...], "detail": "..."}, each task as id, model, status, start_ts, end_ts."""
    from monailabel.utils.async_tasks.utils import processes, tasks

    with _lock:
        dropped = waiting()
        for task in dropped:
            task["status"], task["end_ts"] = DROPPED, _now()
        current = set(_taken)  # taken by the worker: running, or about to start its subprocess
    stopped = []
    deadline = time.monotonic() + STOP_WAIT_S
    while True:
        running = [task_id for task_id in list(processes("train")) if task_id in current]
        for task_id in running:
            task = _kill(task_id)
            if task is not None:
                stopped.append(task)
            current.discard(task_id)
        if running:
            continue
        with _lock:
            starting = [
                task for task in tasks("train") if task.get("id") in current & _taken and task["status"] == "SUBMITTED"
            ]
        if not starting or time.monotonic() > deadline:
            break
        time.sleep(0.05)  # the worker took it but has not started its subprocess yet

    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # as MONAI Label's stop()
    except Exception:  # noqa: BLE001
        pass

    names = ", ".join(f"{_model(t)} {t.get('id')}" for t in stopped) or "nothing was running"
    detail = f"stopped: {names}; dropped {len(dropped)} waiting training(s)"
    if dropped:
        detail += ": " + ", ".join(f"{_model(t)} {t.get('id')}" for t in dropped)
    logger.info(f"DELETE /train/: {detail}")
    return {"stopped": [_summary(t) for t in stopped], "dropped": [_summary(t) for t in dropped], "detail": detail}


async def api_stop(user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
    """DELETE /train/ (admin): stop the running training and drop every waiting one, of every trainer."""
    return stop_all()
