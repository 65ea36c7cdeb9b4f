"""The app's model cache: MedLAM (the published model when it loads, else the configured or shipped one; reloaded
when its file changes) and the SAM-family segmenter, both loaded on first use and shared by every task.

The shipped weights (MedLAM, click refiner) are the medlsam package's (``medlsam.paths``); the app's model/ folder
holds what the running app writes (published models, template banks).

Nothing heavy happens at construction: MONAI Label re-creates the app in every training subprocess.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import torch

from lib.conf import conf_bool, conf_int
from medlsam.errors import CheckpointError, MedLSAMError
from medlsam.paths import SHIPPED_CLICK_REFINER, SHIPPED_MEDLAM
from medlsam.utils.devices import check_device

logger = logging.getLogger(__name__)

BACKEND_DEFAULT = "lite_medsam"


class Models:
    """Lazily loaded, thread-safe MedLAM and segmenter of one app instance."""

    def __init__(self, model_dir: str | Path, conf: dict):
        conf = conf or {}
        self.model_dir = Path(model_dir)
        self.backend = conf.get("backend", BACKEND_DEFAULT)
        self.checkpoint = conf.get("checkpoint") or None
        self.medlam_conf = conf.get("medlam") or None
        self.device = check_device(conf.get("device", "cpu"))  # cpu, cuda, cuda:N: a clear error if absent
        self.compile = conf_bool(conf, "compile", False)  # torch.compile of the SAM encoder
        threads = conf_int(conf, "threads", 0, 0)
        if threads > 0:
            torch.set_num_threads(threads)
        self._lock = threading.RLock()
        self._medlam = None  # (key, path, model, fingerprint)
        self._segmenter = None
        self._click_refiner = None
        self._learned = None  # (file key, LearnedModel) of model/segmentation.pt
        self.edit_method = conf.get("edit_method", "refiner")
        if self.edit_method not in ("refiner", "geodesic"):
            raise ValueError(f"--conf edit_method must be refiner or geodesic, not {self.edit_method!r}")

    # ------------------------------------------------------------------ MedLAM
    @property
    def published_medlam(self) -> Path:
        return self.model_dir / "medlam.pt"

    @property
    def shipped_medlam(self) -> Path:
        return SHIPPED_MEDLAM

    def _medlam_candidates(self) -> list[Path]:
        return [self.published_medlam, Path(self.medlam_conf) if self.medlam_conf else self.shipped_medlam]

    def medlam_path(self) -> Path:
        """model/medlam.pt (published by training) if it loads, else --conf medlam, else the shipped model."""
        return self.medlam()[1]

    def medlam(self):
        """(model, path, fingerprint); reloaded when the checkpoint file changes. A published model that cannot
        be loaded is set aside (model/medlam.pt.rejected) and the next candidate serves."""
        from medlsam.medlam.network import load_medlam, model_fingerprint

        with self._lock:
            for path in self._medlam_candidates():
                if not path.is_file():
                    continue
                stat = path.stat()
                key = (str(path), stat.st_mtime_ns, stat.st_size)
                if self._medlam is not None and self._medlam[0] == key:
                    return self._medlam[2], self._medlam[1], self._medlam[3]
                tic = time.perf_counter()
                try:
                    model = load_medlam(path, device=self.device)
                except CheckpointError as exc:
                    if path != self.published_medlam:
                        raise
                    self._set_aside(path, exc)
                    continue
                self._medlam = (key, path, model, model_fingerprint(model))
                logger.info(
                    f"MedLAM loaded from {path.name} in {time.perf_counter() - tic:.2f} s "
                    f"(fingerprint {self._medlam[3]})"
                )
                return model, path, self._medlam[3]
        raise CheckpointError(
            f"no MedLAM weights: none of {[c.name for c in self._medlam_candidates()]} is usable. Pass --conf medlam "
            "<checkpoint> or train one with POST /train/medlam; the app never runs with random weights"
        )

    @staticmethod
    def _set_aside(path: Path, exc: Exception) -> None:
        aside = path.with_name(path.name + ".rejected")
        try:
            os.replace(path, aside)
        except OSError as error:
            logger.error(f"published model {path.name} cannot be loaded and cannot be set aside ({error}): {exc}")
            return
        logger.error(
            f"published model {path.name} cannot be loaded ({exc}); set aside as {aside.name}, "
            "the previous (shipped or configured) model serves instead"
        )

    # ------------------------------------------------------------------ learned segmentation
    @property
    def published_learned(self) -> Path:
        """The segmentation network the `segmentation` trainer published (``medlsam.learn``)."""
        return self.model_dir / "segmentation.pt"

    def learned(self):
        """The published learned segmentation model (reloaded when its file changes), or None before the first
        training; a file that does not load is set aside (model/segmentation.pt.rejected) and None serves: the
        few-shot path alone, as before any training."""
        from medlsam.learn.model import load_learned

        path = self.published_learned
        with self._lock:
            if not path.is_file():
                self._learned = None
                return None
            stat = path.stat()
            key = (stat.st_mtime_ns, stat.st_size)
            if self._learned is not None and self._learned[0] == key:
                return self._learned[1]
            try:
                model = load_learned(path)
                model.network.to(self.device)  # predict runs on the network's device
            except MedLSAMError as exc:
                self._set_aside(path, exc)
                self._learned = None
                return None
            self._learned = (key, model)
            logger.info(f"learned segmentation {path.name}: organs {model.organs}, choice {model.choice}")
            return model

    # ------------------------------------------------------------------ click refiner
    @property
    def shipped_click_refiner(self) -> Path:
        return SHIPPED_CLICK_REFINER

    def click_refiner(self):
        """The click refiner network of the ``edit`` task (``medlsam.interact.refiner``), the shipped weights, loaded
        once;
        None when the app runs without them (``--conf edit_method geodesic``, or the file is missing: logged)."""
        from medlsam.interact.refiner import build_click_refiner

        with self._lock:
            if self._click_refiner is None:
                if self.edit_method == "geodesic":
                    return None
                path = self.shipped_click_refiner
                if not path.is_file():
                    logger.warning(f"no click refiner weights at {path}: the edit task uses the geodesic edit")
                    self.edit_method = "geodesic"
                    return None
                self._click_refiner = build_click_refiner(path, device=self.device)
                logger.info(f"click refiner loaded from {path.name}")
            return self._click_refiner

    # ------------------------------------------------------------------ SAM
    @property
    def published_segmenter(self) -> Path:
        """LiteMedSAM adapted to the datastore's templates by the lite_medsam trainer (``medlsam.segment.adapt``)."""
        return self.model_dir / "lite_medsam_adapted.pt"

    def segmenter(self):
        """The SAM-family segmenter: with lite_medsam and no --conf checkpoint, the adapted weights published by
        the lite_medsam trainer when they load (reloaded when the file changes; a file that does not load is set
        aside and the shipped LiteMedSAM serves), else the configured or shipped weights. Never random weights."""
        from medlsam.segment.sam import build_segmenter

        with self._lock:
            if self.backend != BACKEND_DEFAULT and not self.checkpoint:
                raise CheckpointError(
                    f"backend {self.backend} needs its weights: start the server with --conf checkpoint "
                    f"<path to the {self.backend} checkpoint> (only lite_medsam has bundled weights)"
                )
            adapted = self.published_segmenter if self.backend == BACKEND_DEFAULT and not self.checkpoint else None
            key = (self.checkpoint, None)
            if adapted is not None and adapted.is_file():
                stat = adapted.stat()
                key = (str(adapted), stat.st_mtime_ns, stat.st_size)
            if self._segmenter is not None and self._segmenter[0] == key:
                return self._segmenter[1]
            tic = time.perf_counter()
            if key[1] is not None:
                try:
                    segmenter = build_segmenter(self.backend, str(adapted), self.device, compile=self.compile)
                    self._segmenter = (key, segmenter)
                    logger.info(
                        f"segmenter {self.backend} adapted ({adapted.name}) built in {time.perf_counter() - tic:.2f} s"
                    )
                    return segmenter
                except CheckpointError as exc:
                    self._set_aside(adapted, exc)
                    key = (self.checkpoint, None)
                    if self._segmenter is not None and self._segmenter[0] == key:
                        return self._segmenter[1]
            segmenter = build_segmenter(self.backend, self.checkpoint, self.device, compile=self.compile)
            self._segmenter = (key, segmenter)
            logger.info(f"segmenter {self.backend} built in {time.perf_counter() - tic:.2f} s")
            return segmenter
