"""The server's front door, set up once the app is up (``protect``): what MONAI Label 0.8.5 leaves open.

- Host: a request whose ``Host`` header names neither this machine, a literal IP address, nor a host of
  ``--conf allowed_hosts`` is refused (400): a web page cannot reach the server through DNS rebinding.
- CORS: MONAI Label answers every origin with credentials allowed; here no origin is allowed unless named in
  ``--conf cors_origins`` (exact ``http(s)://host[:port]`` origins, never a wildcard), and never with credentials.
- ``/logs/`` (the whole log: paths, every request's parameters) is served only with ``--conf expose_logs true``.
- ``PUT /session/``: no archive is extracted (``uncompress=true`` is refused), file names are plain, and every
  uploaded image's header is checked (voxel budget, no file naming another file) before the session exists.
- Every inference is bounded in time (``--conf infer_timeout``) and stops when its client disconnects: the request
  runs inside ``medlsam.utils.cancel.bounded``, whose checks sit in the library's long loops.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import re
import socket
import threading
from typing import Callable, List

from fastapi import BackgroundTasks, Depends, File, HTTPException, UploadFile
from fastapi.routing import APIRoute
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC, User
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from lib.conf import conf_bool, conf_float
from lib.datastore import upload_extension, valid_name
from lib.server import routers
from medlsam.errors import MedLSAMError
from medlsam.utils import cancel

logger = logging.getLogger(__name__)

LOOPBACK = ("localhost", "localhost.localdomain", "ip6-localhost")
ORIGIN = re.compile(r"^https?://[A-Za-z0-9.-]+(:\d{1,5})?$|^https?://\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")
MAX_SESSION_FILES = 4096  # a DICOM series of that many slices
DEFAULT_INFER_TIMEOUT_S = 600.0


class GuardError(MedLSAMError):
    """A --conf value of the front door that cannot be used."""


def allowed_hosts(conf: dict) -> set[str] | None:
    """Host names accepted besides literal IPs: loopback, this machine's names, ``--conf allowed_hosts``; None when
    the configuration says ``*`` (any host, for a deployment behind its own proxy)."""
    names = {h.strip().lower() for h in str(conf.get("allowed_hosts", "")).split(",") if h.strip()}
    if "*" in names:
        return None
    for name in (socket.gethostname(), socket.getfqdn()):
        if name:
            names.add(name.lower())
    return names | set(LOOPBACK)


def host_allowed(host: str, names: set[str] | None) -> bool:
    """Whether a Host header (``name[:port]`` or ``[v6][:port]``) is one the server answers."""
    if names is None:
        return True
    host = host.strip().lower()
    name = host[1 : host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
    try:
        ipaddress.ip_address(name)
        return True  # a literal address cannot be rebound by a foreign DNS name
    except ValueError:
        return bool(name) and name in names


def cors_origins(conf: dict) -> List[str]:
    """The exact origins of ``--conf cors_origins`` (comma separated); GuardError on a wildcard or a non-origin."""
    origins = [o.strip().rstrip("/") for o in str(conf.get("cors_origins", "")).split(",") if o.strip()]
    bad = [o for o in origins if not ORIGIN.match(o)]
    if bad:
        raise GuardError(
            f"--conf cors_origins: {bad} are not origins; give exact origins such as http://ohif.example:3000 "
            "(a wildcard is never accepted)"
        )
    return origins


class RequestGuard:
    """ASGI middleware: the Host check for every request, a time bound and disconnect watch for inferences."""

    def __init__(self, app, hosts: set[str] | None, infer_timeout_s: float):
        self.app, self.hosts, self.infer_timeout_s = app, hosts, infer_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), "")
        if not host_allowed(host, self.hosts):
            return await _refuse(
                send,
                400,
                f"Host {host[:80]!r} is not served here; start the server with "
                "--conf allowed_hosts <name> to accept it",
            )
        if scope.get("method") != "POST" or not scope.get("path", "").startswith("/infer/"):
            return await self.app(scope, receive, send)
        gone = threading.Event()
        watcher: list[asyncio.Task] = []

        async def watch():  # after the body: the next message is http.disconnect when the client leaves
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        async def body():
            message = await receive()
            if message["type"] == "http.disconnect":
                gone.set()
            elif not message.get("more_body") and not watcher:
                watcher.append(asyncio.ensure_future(watch()))
            return message

        with cancel.bounded(self.infer_timeout_s, gone.is_set):
            try:
                await self.app(scope, body, send)
            finally:
                for task in watcher:
                    task.cancel()


async def _refuse(send, status: int, detail: str) -> None:
    payload = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def create_session(
    background_tasks: BackgroundTasks,
    uncompress: bool = False,
    expiry: int = 0,
    files: List[UploadFile] = File(...),
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
):
    """PUT /session/ without archive extraction: plain file names, at most MAX_SESSION_FILES, a checked image."""
    from monailabel.endpoints.session import create_session as monailabel_create_session
    from monailabel.interfaces.utils.app import app_instance

    from medlsam.io.image_header import check_header

    if uncompress:
        raise HTTPException(
            status_code=400,
            detail="uncompress: archives are not extracted by this server; upload the image file, or the files of "
            "one DICOM series, themselves",
        )
    if not 1 <= len(files) <= MAX_SESSION_FILES:
        raise HTTPException(status_code=400, detail=f"files: give 1 to {MAX_SESSION_FILES} files, not {len(files)}")
    for upload in files:
        name = os.path.basename(upload.filename or "")
        if not valid_name(name):
            raise HTTPException(status_code=400, detail=f"file name {name[:80]!r}: use a plain file name")
        if len(files) == 1:
            upload_extension(name, "session image")
    answer = monailabel_create_session(background_tasks, False, max(0, int(expiry)), files)
    sessions = app_instance().sessions()
    info = sessions.get_session(answer["session_id"], update_ts=False)
    try:
        if info is not None and os.path.isfile(info.image):
            check_header(info.image)
    except MedLSAMError as exc:
        sessions.remove_session(answer["session_id"])
        raise HTTPException(status_code=400, detail=f"session image refused: {exc}".replace(info.image, "upload"))
    return answer


def protect(app, conf: dict) -> None:
    """Put the front door on MONAI Label's FastAPI ``app``: guard middleware, CORS, /logs/, sessions."""
    from monailabel.endpoints.session import api_create_session

    hosts = allowed_hosts(conf)
    origins = cors_origins(conf)
    timeout = conf_float(conf, "infer_timeout", DEFAULT_INFER_TIMEOUT_S, 1.0)
    middleware = [m for m in app.user_middleware if getattr(m, "cls", None) is not CORSMiddleware]
    if origins:
        middleware.insert(
            0,
            Middleware(
                CORSMiddleware,
                allow_origins=origins,
                allow_credentials=False,
                allow_methods=["GET", "POST", "PUT", "DELETE"],
                allow_headers=["*"],
            ),
        )
    middleware.insert(0, Middleware(RequestGuard, hosts=hosts, infer_timeout_s=timeout))
    app.user_middleware = middleware
    expose_logs = conf_bool(conf, "expose_logs", False)
    for router in routers(app.router):
        routes = []
        for route in router.routes:
            path = getattr(route, "path", "")
            if not expose_logs and (path == "/logs" or path.startswith("/logs/")):
                continue
            if isinstance(route, APIRoute) and route.endpoint is api_create_session:
                route = _replaced(route, create_session)
            routes.append(route)
        router.routes[:] = routes
        getattr(router, "_mark_routes_changed", lambda: None)()
    app.middleware_stack = app.build_middleware_stack()  # the server is up: rebuild what requests go through
    app.openapi_schema = None
    logger.info(
        f"front door: hosts {'any' if hosts is None else 'this machine, IPs, ' + ', '.join(sorted(hosts))}; "
        f"CORS origins {origins or 'none'}; /logs/ {'on' if expose_logs else 'off'}; inferences bounded to "
        f"{timeout:g} s; sessions without archive extraction"
    )


def _replaced(route: APIRoute, endpoint: Callable) -> APIRoute:
    return APIRoute(route.path, endpoint, methods=list(route.methods), name=route.name, tags=route.tags)
