"""Cooperative cancellation of long work: loops call ``check()``; a caller bounds what runs inside ``bounded``.

A server runs an inference in a worker thread, where nothing can stop it from outside: ``bounded(seconds,
stopped)`` sets a bound for the current context (a ContextVar, so only the request's own thread sees it) and every
``check()`` in the library's long loops (slice encoding, 3D propagation, edits per organ, localisation per organ)
raises Cancelled once the time is over or ``stopped()`` says the client has gone. Without a bound, ``check()`` does
nothing.
"""

from __future__ import annotations

import contextlib
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator

from medlsam.errors import MedLSAMError


class Cancelled(MedLSAMError):
    """The work ran past its time bound, or its requester stopped waiting."""


@dataclass(frozen=True)
class Bound:
    deadline: float  # time.monotonic() after which work stops
    seconds: float
    stopped: Callable[[], bool] | None = None

    def check(self) -> None:
        if self.stopped is not None and self.stopped():
            raise Cancelled("stopped: the client is no longer waiting for the answer")
        if time.monotonic() > self.deadline:
            raise Cancelled(f"stopped after its time bound of {self.seconds:g} s")


_current: ContextVar[Bound | None] = ContextVar("medlsam_bound", default=None)


def check() -> None:
    """Raise Cancelled when the current context's bound is over; nothing when there is no bound."""
    bound = _current.get()
    if bound is not None:
        bound.check()


@contextlib.contextmanager
def bounded(seconds: float, stopped: Callable[[], bool] | None = None) -> Iterator[Bound]:
    """Bound the work done inside to ``seconds`` (and to while ``stopped()`` is false)."""
    bound = Bound(time.monotonic() + float(seconds), float(seconds), stopped)
    token = _current.set(bound)
    try:
        yield bound
    finally:
        _current.reset(token)
