"""The app's volume cache: loaded CTs with their SAM slice embeddings (LRU over images), and the inference slots
that bound how many inferences run at once."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import OrderedDict

from lib.models import Models
from medlsam.utils import cancel

MAX_WAITING = 16  # inference requests waiting for a slot; more are refused (429)
SLOT_TIMEOUT_S = 600


class Volumes:
    """Thread-safe LRU of ``size`` loaded volumes and their slice embeddings; ``concurrency`` inference slots."""

    def __init__(self, models: Models, size: int, concurrency: int):
        self.models, self.cache_size, self.infer_concurrency = models, size, concurrency
        self._lock = threading.RLock()
        self._volumes: OrderedDict = OrderedDict()
        self._slots = threading.BoundedSemaphore(concurrency)
        self._waiting = 0

    # ------------------------------------------------------------------ inference slots
    @contextlib.contextmanager
    def infer_slot(self):
        """At most ``infer_concurrency`` inferences run at once (each in a server worker thread, never on the event
        loop); up to MAX_WAITING more wait, beyond that a request is refused with 429."""
        from fastapi import HTTPException

        with self._lock:
            if self._waiting >= MAX_WAITING:
                raise HTTPException(
                    status_code=429, detail=f"server busy: {self._waiting} inferences waiting; try again shortly"
                )
            self._waiting += 1
        try:
            acquired, deadline = False, time.monotonic() + SLOT_TIMEOUT_S
            while not acquired and time.monotonic() < deadline:
                try:
                    cancel.check()  # a request whose client left, or whose time is over, stops waiting
                except cancel.Cancelled as exc:
                    raise HTTPException(status_code=503, detail=f"inference {exc}") from None
                acquired = self._slots.acquire(timeout=0.25)
        finally:
            with self._lock:
                self._waiting -= 1
        if not acquired:
            raise HTTPException(status_code=503, detail=f"server busy: no inference slot within {SLOT_TIMEOUT_S} s")
        try:
            yield
        finally:
            self._slots.release()

    # ------------------------------------------------------------------ volumes and embeddings
    def volume_entry(self, path: str) -> dict:
        """The loaded CT of ``path`` and its slice embeddings per axis (LRU over images)."""
        from medlsam.io.volume import load_ct

        stat = os.stat(path)
        key = (os.path.realpath(path), stat.st_mtime_ns, stat.st_size)
        with self._lock:
            entry = self._volumes.get(key)
            if entry is not None:
                self._volumes.move_to_end(key)
                return entry
        volume = load_ct(path)
        with self._lock:
            entry = self._volumes.setdefault(key, {"volume": volume, "embeddings": {}, "lock": threading.Lock()})
            self._volumes.move_to_end(key)
            while len(self._volumes) > self.cache_size:
                self._volumes.popitem(last=False)
            return entry

    def embeddings(self, entry: dict, axis: int | None = None):
        """The SliceEmbeddings of a cached volume along ``axis`` (default: cranio-caudal)."""
        from medlsam.errors import MedLSAMError
        from medlsam.segment.sam.slices import SliceEmbeddings
        from medlsam.utils.metrics import cranio_caudal_axis

        volume = entry["volume"]
        axis = cranio_caudal_axis(volume.affine) if axis is None else int(axis)
        segmenter = self.models.segmenter()
        with self._lock:
            key = (segmenter.name, axis)
            embeddings = entry["embeddings"].get(key)
            if embeddings is None:
                embeddings = entry["embeddings"][key] = SliceEmbeddings(segmenter, volume, axis=axis)
            elif embeddings.segmenter is not segmenter:  # adapted weights published: same encoder, new decoder
                try:
                    embeddings = entry["embeddings"][key] = embeddings.with_segmenter(segmenter)
                except MedLSAMError:
                    embeddings = entry["embeddings"][key] = SliceEmbeddings(segmenter, volume, axis=axis)
            return embeddings
