"""Trainer `medlam`: self-supervised MedLAM training (RDR + MSS) on every datastore image, labelled or not.

Runs in MONAI Label's training subprocess (POST /train/medlam). By default it continues from the model in
use and publishes model/medlam.pt (atomically) only when the validation error beats that model's; the
running server then loads it and rebuilds the template bank on the next inference, without a restart.

Several processes (MONAI Label's `multi_gpu` / `gpus` on CUDA, `processes` on CPU) train with
torch.distributed as children of that subprocess, so DELETE /train/ (which kills its process tree) stops them
all; the subprocess and its workers end when their parent dies (the server stopped or killed), and a lock
beside model/medlam.pt keeps two trainings from writing the same files.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from monailabel.interfaces.tasks.train import TrainTask

from lib.models import Models
from lib.option_spec import TRAIN_OPTIONS
from lib.options import train_config
from lib.trainers.options import check_train_options
from medlsam.errors import MedLSAMError
from medlsam.utils.devices import cuda_count

logger = logging.getLogger(__name__)

SPEC = TRAIN_OPTIONS["medlam"]  # its options: lib/option_spec.py


class MedLAMTrainer(TrainTask):
    def __init__(self, models: Models):
        super().__init__(
            "Self-supervised MedLAM training (relative distance + multi-scale similarity) on all "
            "datastore images; publishes model/medlam.pt when the validation error improves"
        )
        self.models = models
        self.running = False  # a training runs in this process (run_sync)
        self._config = train_config(SPEC)  # /info/: defaults, choices, the devices present

    def config(self):
        return self._config

    @property
    def stats_path(self) -> Path:
        return self.models.model_dir / "train_stats.json"

    def stats(self):
        """train_stats.json; a "running" left by a run that was killed (DELETE /train/) reads "stopped"."""
        try:
            stats = json.loads(self.stats_path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}
        if isinstance(stats, dict) and stats.get("status") == "running" and not self._training_alive():
            stats["status"] = "stopped"
            self._write_stats(stats)
        return stats

    def _training_alive(self) -> bool:
        from monailabel.utils.async_tasks.utils import processes

        return self.running or bool(processes("train"))

    def _write_stats(self, stats: dict) -> None:
        from medlsam.utils.atomic import write_json_atomic

        try:
            write_json_atomic(stats, self.stats_path)
        except OSError as exc:
            logger.warning(f"cannot update {self.stats_path.name}: {exc}")

    def validate(self, request: dict) -> dict:
        """The request's train options, checked: unknown keys and out-of-range values raise OptionError naming
        the key (the server answers 400 before any training starts)."""
        return check_train_options(request, SPEC)

    def __call__(self, request, datastore):
        """Validated options, then training; train_stats.json always ends done, stopped or failed."""
        self.validate(request)
        if _in_monailabel_subprocess():
            from medlsam.utils.distributed import die_with_parent

            die_with_parent()  # never outlive the server: no orphan training at full CPU
        self.running = True
        try:
            summary = self.run_training(request, datastore)
        except BaseException as exc:
            stopped = isinstance(exc, KeyboardInterrupt)
            self._finish("stopped" if stopped else "failed", None if stopped else f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self.running = False
        self._finish("done", None)
        return summary

    def _finish(self, status: str, error) -> None:
        try:
            stats = json.loads(self.stats_path.read_text())
        except (OSError, json.JSONDecodeError):
            stats = {}
        if not isinstance(stats, dict):
            stats = {}
        if status == "done" and stats.get("status") == "stopped":
            status = "stopped"  # the library stopped early (time limit)
        stats.update({"status": status, **({"error": error} if error else {})})
        if error:
            stats.setdefault("epoch", 0)
        self._write_stats(stats)

    def run_training(self, request, datastore):
        from medlsam.medlam.network import MedLAMConfig, load_medlam
        from medlsam.medlam.patches import cached_grid_array
        from medlsam.medlam.training import TrainOptions, train_job
        from medlsam.utils.distributed import spawn_training

        opt = self.validate(request)
        threads = opt["threads"]
        if threads > 0:
            torch.set_num_threads(threads)
        init, publish = opt["init"], opt["publish"]
        cache = Path(tempfile.gettempdir()) / "medlsam-app-grid-cache"
        images = []
        for image_id in sorted(datastore.list_images()):
            path = Path(datastore.get_image_uri(image_id))
            try:
                cached_grid_array(path, cache)  # checks it is a usable CT (and caches its 3 mm grid)
                images.append(path)
            except MedLSAMError as exc:
                logger.warning(f"training skips {image_id}: {exc}")
        max_images = opt["max_images"]
        if max_images > 0:
            images = images[:max_images]
        if not images:
            raise MedLSAMError("no usable CT image in the datastore to train on")
        device = opt["device"]
        options = TrainOptions(
            epochs=opt["epochs"],
            iterations_per_epoch=opt["iterations_per_epoch"],
            batch_size=opt["batch_size"],
            learning_rate=opt["learning_rate"],
            device=device,
            validation_pairs=opt["validation_pairs"],
            workers=opt["workers"],
        )
        world = self.world_size(opt, device)
        current = None
        if init == "current":
            current = load_medlam(self.models.medlam_path())
            config = current.config
        else:
            config = MedLAMConfig(base_channels=opt["base_channels"])
        out = self.models.published_medlam
        tic = time.time()
        job = {
            "images": [str(p) for p in images],
            "out": str(out),
            "config": config.to_dict(),
            "options": asdict(options),
            "cache_dir": str(cache),
            "stats_path": str(self.stats_path),
            "init_weights": str(self.models.medlam_path()) if current is not None else None,
            "baseline": publish == "if_better" and current is not None,
            "threads": threads,
        }
        logger.info(f"MedLAM training on {len(images)} images, {world} process(es): {options}")
        if world > 1:  # children of this process: DELETE /train/ kills them with it
            result = spawn_training(world, train_job, job)
        else:
            result = train_job(job)
        baseline = result["baseline"]
        published = out.is_file() and out.stat().st_mtime >= tic
        summary = {
            "images": len(images),
            "epochs": result["epoch"],
            "total_time": round(time.time() - tic, 1),
            "best_metric": None if math.isinf(result["best_metric"]) else round(result["best_metric"], 3),
            "baseline_metric": None if baseline is None else round(baseline, 3),
            "published": str(out) if published else None,
            "processes": world,
        }
        logger.info(f"MedLAM training finished: {summary}")
        return summary

    def world_size(self, options: dict, device: str) -> int:
        """Processes to train with (``options``: the checked train options): on cuda with multi_gpu, one per GPU
        of `gpus` (as MONAI Label's BasicTrainTask); on cpu, `processes`."""
        if device.startswith("cuda"):
            gpus = str(options.get("gpus") or "all")
            count = cuda_count() if gpus == "all" else len([g for g in gpus.split(",") if g.strip()])
            multi = options["multi_gpu"]
            return max(1, min(count, cuda_count())) if multi and device == "cuda" else 1
        return options["processes"]


def _in_monailabel_subprocess() -> bool:
    """True in `python -m monailabel.interfaces.utils.app -m train` (not in a server running run_sync)."""
    return Path(sys.argv[0] if sys.argv else "").as_posix().endswith("monailabel/interfaces/utils/app.py")
