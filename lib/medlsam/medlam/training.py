"""Self-supervised MedLAM training on unlabeled CT: relative distance regression + multi-scale similarity."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from medlsam.errors import MedLSAMError
from medlsam.io.grid import GRID_SPACING_MM
from medlsam.medlam.losses import mss_loss, predicted_offset_mm, rdr_loss
from medlsam.medlam.network import MedLAM, MedLAMConfig, save_medlam
from medlsam.medlam.patches import body_voxels, cached_grid_array, cut_patch
from medlsam.medlam.precision import autocast_dtype, describe
from medlsam.medlam.sampling import TrainingBatches
from medlsam.utils.atomic import torch_save_atomic, write_json_atomic
from medlsam.utils.distributed import (
    DistContext,
    TrainingLock,
    barrier,
    broadcast_floats,
    init_distributed,
    mean_over_ranks,
    rank_seed,
)

logger = logging.getLogger(__name__)


@dataclass
class TrainOptions:
    epochs: int = 40
    iterations_per_epoch: int = 100
    batch_size: int = 3  # scans per iteration; each gives a query, a second patch and an augmented query
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    mss_points: int = 20
    mss_weight: float = 1.0
    crop_margin: int = 8  # the augmented crop is patch + 2 * margin
    seed: int = 2023
    device: str = "cpu"
    bf16: bool | None = None  # bfloat16 autocast: None = where the device runs it natively (medlsam.medlam.precision)
    validation_pairs: int = 8  # per validation scan
    time_limit_s: float = 0.0  # stop cleanly after this many seconds (0: no limit)
    workers: int = 0  # DataLoader processes drawing and augmenting patches (0: in the training process)


class PatchSampler:
    """Draws training patches from scans held in memory on the localisation grid."""

    def __init__(self, arrays: list[np.ndarray], patch: int, margin: int, rng: np.random.Generator):
        self.arrays = arrays
        self.bodies = [body_voxels(a.astype(np.float32), seed=i) for i, a in enumerate(arrays)]
        self.patch, self.margin, self.rng = patch, margin, rng

    def centre(self, scan: int) -> np.ndarray:
        body = self.bodies[scan]
        return body[self.rng.integers(len(body))]

    def crop(self, scan: int, centre: np.ndarray, size: int) -> torch.Tensor:
        return torch.from_numpy(cut_patch(self.arrays[scan], centre, size))


def rdr_validation_error(model: MedLAM, sampler: PatchSampler, pairs: int, device: str) -> float:
    """Mean Euclidean error (mm) of predicted offsets between fixed random patch pairs."""
    errors = []
    patch = sampler.patch
    with torch.no_grad():
        for scan in range(len(sampler.arrays)):
            rng = np.random.default_rng(scan)
            body = sampler.bodies[scan]
            centres = body[rng.integers(len(body), size=2 * pairs)]
            patches = torch.stack([sampler.crop(scan, c, patch) for c in centres])[:, None].to(device)
            latent = model.latent(patches).float().cpu()
            truth = torch.from_numpy((centres[pairs:] - centres[:pairs]) * GRID_SPACING_MM).float()
            predicted = predicted_offset_mm(latent[:pairs], latent[pairs:])
            errors.append((predicted - truth).norm(dim=1))
    return float(torch.cat(errors).mean())


class Trainer:
    """Runs epochs of RDR + MSS, validates, checkpoints atomically, resumes, writes MONAI Label stats."""

    def __init__(
        self,
        train_images: list[Path],
        out: Path,
        config: MedLAMConfig,
        options: TrainOptions,
        val_images: list[Path] | None = None,
        cache_dir: Path | None = None,
        stats_path: Path | None = None,
        validator: Callable[[MedLAM], float] | None = None,
        dist: DistContext | None = None,
    ):
        """`dist`: this process's place in a torch.distributed run (medlsam.utils.distributed.init_distributed);
        `options.batch_size` is per process, and rank 0 alone validates and writes files."""
        if not train_images:
            raise MedLSAMError("no training images given")
        self.out, self.options, self.config = Path(out), options, config
        self.state_path = self.out.with_name(self.out.stem + ".state.pt")
        self.stats_path = stats_path or self.out.with_name("train_stats.json")
        self.validator = validator
        random.seed(options.seed)
        np.random.seed(options.seed)
        torch.manual_seed(options.seed)
        self.dist = dist or DistContext(device=options.device)

        def load(paths):
            bar = tqdm(paths, desc="preparing scans", leave=False, disable=not self.dist.is_main)
            return [cached_grid_array(p, cache_dir, mmap=True) for p in bar]

        rng = np.random.default_rng(options.seed)
        patch = config.patch_size[0]
        self.sampler = PatchSampler(load(train_images), patch, options.crop_margin, rng)
        self.val_sampler = PatchSampler(load(val_images), patch, 0, rng) if val_images else None
        self.batches = TrainingBatches(
            self.sampler.arrays,
            self.sampler.bodies,
            patch,
            options.crop_margin,
            options.batch_size,
            options.mss_points,
            options.iterations_per_epoch,
            options.seed,
            self.dist.rank,
            self.dist.world_size,
        )
        self.iteration = 0  # within the epoch
        self._ddp: DistributedDataParallel | None = None
        self.model = MedLAM(config).to(options.device).to(memory_format=torch.channels_last_3d)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=options.learning_rate, weight_decay=options.weight_decay
        )
        self.generator = torch.Generator().manual_seed(options.seed)
        self.amp_dtype = autocast_dtype(options.bf16, options.device)  # None: float32
        self.precision = describe(options.bf16, options.device)
        # oneDNN's bfloat16 Conv3d weight gradient is garbage (huge, even inf, and different run to run) when
        # the input depth is 2: the bottleneck of patches under 64 voxels. On CPU, autocast only from 64 up.
        if self.amp_dtype is not None and torch.device(options.device).type == "cpu" and min(config.patch_size) < 64:
            self.amp_dtype = None
            self.precision += "; float32 used: bfloat16 gradients are unsound under 64-voxel patches"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        logger.info(self.precision)
        self.epoch, self.best_metric, self.elapsed, self.history = 0, math.inf, 0.0, []

    # -- checkpointing -------------------------------------------------------------------------------
    def save_state(self) -> None:
        torch_save_atomic(
            {
                "config": self.config.to_dict(),
                "state_dict": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "epoch": self.epoch,
                "best_metric": self.best_metric,
                "elapsed": self.elapsed,
                "history": json.dumps(self.history),
                "options": json.dumps(asdict(self.options)),
                **({"scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {}),
            },
            self.state_path,
        )  # no RNG state: every epoch's randomness derives from (seed, epoch, rank), any world size

    def resume(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if MedLAMConfig.from_dict(state["config"]) != self.config:
            raise MedLSAMError(f"{path}: trained with {state['config']}, not the requested {self.config.to_dict()}")
        self.model.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.best_metric, self.elapsed = (
            int(state["epoch"]),
            float(state["best_metric"]),
            float(state["elapsed"]),
        )
        self.history = json.loads(state["history"])
        if self.scaler.is_enabled() and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def write_stats(self, status: str) -> None:
        write_json_atomic(
            {
                "epoch": self.epoch,
                "total_epochs": self.options.epochs,
                "total_time": round(self.elapsed, 1),
                "best_metric": None if math.isinf(self.best_metric) else round(self.best_metric, 3),
                "best_metric_name": "validation error (mm, lower is better)",
                "status": status,
                "history": self.history,
            },
            self.stats_path,
        )

    # -- one optimisation step -----------------------------------------------------------------------
    def _learning_rate(self) -> float:
        progress = self.epoch / max(1, self.options.epochs)
        return self.options.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))

    def step(self) -> dict[str, float]:
        """One optimisation step on this rank's next batch of the epoch."""
        batch = self.batches[self.iteration % len(self.batches)]
        self.iteration += 1
        return self.train_step(batch)

    def _network(self) -> torch.nn.Module:
        """The model, wrapped in DistributedDataParallel when there are several processes."""
        if not self.dist.distributed:
            return self.model
        if self._ddp is None:
            ids = [torch.device(self.options.device).index] if self.dist.backend == "nccl" else None
            # the reference config's segmentation head takes no part in the losses
            self._ddp = DistributedDataParallel(
                self.model, device_ids=ids, find_unused_parameters=self.config.num_classes > 0
            )
        return self._ddp

    def _autocast(self):
        """Mixed precision as chosen (float16 on CUDA comes with loss scaling), else nothing."""
        device = torch.device(self.options.device).type
        return torch.autocast(device, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None)

    def train_step(self, batch: dict) -> dict[str, float]:
        """Forward, backward and update on one batch (medlsam.medlam.sampling.draw_batch). Every loss is a mean
        over samples, so DDP's averaged gradients make this the step of one process with all ranks' samples."""
        opts, device = self.options, self.options.device
        batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
        n = len(batch["query"])
        dtype = next(self.model.parameters()).dtype  # float32; float64 in the DDP equivalence test
        images = torch.cat([batch["query"], batch["augmented"], batch["second"]]).to(dtype)
        with self._autocast():
            out = self._network()(images.contiguous(memory_format=torch.channels_last_3d))
        latent = out["latent"].float()
        offsets = batch["offsets"]
        loss_rdr = 0.5 * (
            rdr_loss(latent[:n], latent[2 * n :], offsets[:, 0])
            + rdr_loss(latent[n : 2 * n], latent[2 * n :], offsets[:, 1])
        )
        mss = [
            mss_loss(
                [f[i] for f in out["features"]],
                [f[n + i] for f in out["features"]],
                batch["source"][i],
                batch["points"][i],
                GRID_SPACING_MM,
            )
            for i in range(n)
        ]
        loss_mss = torch.stack(mss).mean()
        loss = loss_rdr + opts.mss_weight * loss_mss
        # zero, but keeps every decoder scale in the graph when MSS skips one (DDP expects every gradient)
        loss = loss + 0.0 * sum(f.float().mean() for f in out["features"])
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 5.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        rdr_mm = (predicted_offset_mm(latent[:n].detach(), latent[2 * n :].detach()) - offsets[:, 0]).norm(dim=1)
        return {
            "loss": float(loss.detach()),
            "rdr": float(loss_rdr.detach()),
            "mss": float(loss_mss.detach()),
            "rdr_mm": float(rdr_mm.mean()),
        }

    # -- the loop ------------------------------------------------------------------------------------
    def validate(self) -> float:
        self.model.eval()
        try:
            if self.validator is not None:
                return float(self.validator(self.model))
            sampler = self.val_sampler or self.sampler
            return rdr_validation_error(self.model, sampler, self.options.validation_pairs, self.options.device)
        finally:
            self.model.train()

    def run(self) -> dict:
        """Train to options.epochs (or the time limit). Rank 0 holds the lock beside `out` for the whole run."""
        lock = TrainingLock(self.out.with_name(self.out.stem + ".lock")) if self.dist.is_main else None
        if lock is not None:
            lock.acquire()
        try:
            return self._run()
        finally:
            if lock is not None:
                lock.release()

    def _run(self) -> dict:
        opts, ctx = self.options, self.dist
        started = time.time() - self.elapsed
        self.model.train()
        if ctx.is_main:
            self.write_stats("running")
        tqdm.write(
            f"MedLAM training, {ctx.describe()}: {len(self.batches.scans)} of {len(self.sampler.arrays)} "
            f"scans per epoch on this rank, {opts.batch_size} samples per step "
            f"({opts.batch_size * ctx.world_size} over all ranks), {opts.workers} loader workers"
        )
        while self.epoch < opts.epochs:
            for group in self.optimizer.param_groups:
                group["lr"] = self._learning_rate()
            self.batches.set_epoch(self.epoch)
            torch.manual_seed(rank_seed(opts.seed, self.epoch, ctx.rank))  # dropout
            self.iteration = 0
            sums: dict[str, float] = {}
            loader = self.batches.loader(opts.workers, pin_memory=opts.device.startswith("cuda"))
            bar = tqdm(
                loader,
                total=opts.iterations_per_epoch,
                desc=f"epoch {self.epoch + 1}/{opts.epochs}",
                leave=False,
                disable=not ctx.is_main,
            )
            for batch in bar:
                for key, value in self.train_step(batch).items():
                    sums[key] = sums.get(key, 0.0) + value
                self.iteration += 1
                bar.set_postfix(
                    loss=f"{sums['loss'] / self.iteration:.3f}", rdr_mm=f"{sums['rdr_mm'] / self.iteration:.1f}"
                )
            self.epoch += 1
            means = dict(zip(sums, mean_over_ranks([v / opts.iterations_per_epoch for v in sums.values()], ctx)))
            metric, stop = 0.0, 0.0
            if ctx.is_main:  # the others wait in the broadcast
                metric = self.validate()
                self.elapsed = time.time() - started
                stop = float(bool(opts.time_limit_s and self.elapsed >= opts.time_limit_s))
            metric, stop, self.elapsed = broadcast_floats([metric, stop, self.elapsed], ctx)
            record = {
                "epoch": self.epoch,
                "time_s": round(self.elapsed, 1),
                "val_error_mm": round(metric, 2),
                **{k: round(v, 4) for k, v in means.items()},
            }
            if ctx.distributed:
                record["world_size"] = ctx.world_size
            self.history.append(record)
            if ctx.is_main:
                tqdm.write(json.dumps(record))
            if metric < self.best_metric:
                self.best_metric = metric
                if ctx.is_main:
                    save_medlam(self.model, self.out, epoch=self.epoch, val_error_mm=metric)
            if ctx.is_main:
                self.save_state()
                self.write_stats("running")
            barrier(ctx)
            if stop:
                break
        if ctx.is_main:
            self.write_stats("finished" if self.epoch >= opts.epochs else "stopped")
        return {"epoch": self.epoch, "best_metric": self.best_metric, "total_time": self.elapsed}


def train_job(job: dict) -> dict:
    """One process's part of a training described by `job` (plain data, so that spawned ranks get it):
    images, out, config and options dicts, cache_dir, stats_path, init_weights (start from these weights),
    baseline (rank 0 validates them first: publish only below that error), threads. Joins the process group
    when the environment describes one. Returns the Trainer's result with "baseline"."""
    from medlsam.medlam.network import load_medlam

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    ctx = init_distributed(job["options"].get("device", "cpu"))
    options = TrainOptions(**{**job["options"], "device": ctx.device})
    trainer = Trainer(
        [Path(p) for p in job["images"]],
        Path(job["out"]),
        MedLAMConfig.from_dict(job["config"]),
        options,
        cache_dir=Path(job["cache_dir"]) if job.get("cache_dir") else None,
        stats_path=Path(job["stats_path"]) if job.get("stats_path") else None,
        dist=ctx,
    )
    if job.get("init_weights"):
        trainer.model.load_state_dict(load_medlam(job["init_weights"]).state_dict())
    baseline = None
    if job.get("baseline") and job.get("init_weights"):
        baseline = broadcast_floats([trainer.validate() if ctx.is_main else 0.0], ctx)[0]
        trainer.best_metric = baseline
    result = trainer.run()
    return {**result, "baseline": baseline}
