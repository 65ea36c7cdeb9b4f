"""Self-supervised MedLAM training on unlabeled CT: relative distance regression + multi-scale similarity."""

from __future__ import annotations

import json
import math
import os
import random
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from medlsam.augment import augment_crop
from medlsam.errors import MedLSAMError
from medlsam.grid import GRID_SPACING_MM
from medlsam.losses import predicted_offset_mm, mss_loss, rdr_loss
from medlsam.network import MedLAM, MedLAMConfig, atomic_torch_save, save_medlam
from medlsam.patches import body_voxels, cached_grid_array, cut_patch


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
    bf16: bool = True  # bfloat16 autocast on CPU: 1.6x faster here
    validation_pairs: int = 8  # per validation scan
    time_limit_s: float = 0.0  # stop cleanly after this many seconds (0: no limit)


def write_json_atomic(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{uuid.uuid4().hex}.json"  # not mkstemp: its files are private (0600)
    try:
        with open(tmp, "w") as handle:
            json.dump(data, handle, indent=2)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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

    def __init__(self, train_images: list[Path], out: Path, config: MedLAMConfig, options: TrainOptions,
                 val_images: list[Path] | None = None, cache_dir: Path | None = None,
                 stats_path: Path | None = None,
                 validator: Callable[[MedLAM], float] | None = None):
        if not train_images:
            raise MedLSAMError("no training images given")
        self.out, self.options, self.config = Path(out), options, config
        self.state_path = self.out.with_name(self.out.stem + ".state.pt")
        self.stats_path = stats_path or self.out.with_name("train_stats.json")
        self.validator = validator
        random.seed(options.seed)
        np.random.seed(options.seed)
        torch.manual_seed(options.seed)
        load = lambda paths: [cached_grid_array(p, cache_dir) for p in tqdm(paths, desc="preparing scans", leave=False)]  # noqa: E731
        rng = np.random.default_rng(options.seed)
        patch = config.patch_size[0]
        self.sampler = PatchSampler(load(train_images), patch, options.crop_margin, rng)
        self.val_sampler = PatchSampler(load(val_images), patch, 0, rng) if val_images else None
        self.model = MedLAM(config).to(options.device).to(memory_format=torch.channels_last_3d)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=options.learning_rate,
                                           weight_decay=options.weight_decay)
        self.generator = torch.Generator().manual_seed(options.seed)
        # oneDNN's bfloat16 Conv3d weight gradient is garbage (huge, even inf, and different run to run) when
        # the input depth is 2: the bottleneck of patches under 64 voxels. Autocast only from 64 up.
        self.autocast = options.bf16 and options.device == "cpu" and min(config.patch_size) >= 64
        self.epoch, self.best_metric, self.elapsed, self.history = 0, math.inf, 0.0, []

    # -- checkpointing -------------------------------------------------------------------------------
    def save_state(self) -> None:
        atomic_torch_save({
            "config": self.config.to_dict(), "state_dict": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "epoch": self.epoch, "best_metric": self.best_metric,
            "elapsed": self.elapsed, "history": json.dumps(self.history), "options": json.dumps(asdict(self.options)),
            "torch_rng": torch.get_rng_state(), "generator": self.generator.get_state(),
            "numpy_rng": json.dumps(self.sampler.rng.bit_generator.state),
        }, self.state_path)

    def resume(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if MedLAMConfig.from_dict(state["config"]) != self.config:
            raise MedLSAMError(f"{path}: trained with {state['config']}, not the requested {self.config.to_dict()}")
        self.model.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.best_metric, self.elapsed = int(state["epoch"]), float(state["best_metric"]), float(state["elapsed"])
        self.history = json.loads(state["history"])
        torch.set_rng_state(state["torch_rng"])
        self.generator.set_state(state["generator"])
        self.sampler.rng.bit_generator.state = json.loads(state["numpy_rng"])

    def write_stats(self, status: str) -> None:
        write_json_atomic({
            "epoch": self.epoch, "total_epochs": self.options.epochs, "total_time": round(self.elapsed, 1),
            "best_metric": None if math.isinf(self.best_metric) else round(self.best_metric, 3),
            "best_metric_name": "validation error (mm, lower is better)", "status": status,
            "history": self.history,
        }, self.stats_path)

    # -- one optimisation step -----------------------------------------------------------------------
    def _learning_rate(self) -> float:
        progress = self.epoch / max(1, self.options.epochs)
        return self.options.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))

    def step(self) -> dict[str, float]:
        opts, sampler, patch = self.options, self.sampler, self.sampler.patch
        crop_size = patch + 2 * opts.crop_margin
        queries, seconds, augmented, sources, offsets = [], [], [], [], []
        for _ in range(opts.batch_size):
            scan = int(sampler.rng.integers(len(sampler.arrays)))
            c_q, c_s = sampler.centre(scan), sampler.centre(scan)
            crop = sampler.crop(scan, c_q, crop_size)[None]
            aug, source = augment_crop(crop, patch, self.generator)
            inner = slice(opts.crop_margin, opts.crop_margin + patch)  # not m:-m, which is empty for m = 0
            queries.append(crop[:, inner, inner, inner])
            seconds.append(sampler.crop(scan, c_s, patch)[None])
            augmented.append(aug)
            sources.append(source)
            centre_shift = source[:, patch // 2, patch // 2, patch // 2].numpy() - patch // 2
            offsets.append([(c_s - c_q) * GRID_SPACING_MM, (c_s - c_q - centre_shift) * GRID_SPACING_MM])
        batch = torch.stack(queries + augmented + seconds).to(opts.device).to(memory_format=torch.channels_last_3d)
        n = opts.batch_size
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            out = self.model(batch)
        latent = out["latent"].float()
        offsets_t = torch.tensor(np.array(offsets), dtype=torch.float32, device=opts.device)
        loss_rdr = 0.5 * (rdr_loss(latent[:n], latent[2 * n:], offsets_t[:, 0])
                          + rdr_loss(latent[n:2 * n], latent[2 * n:], offsets_t[:, 1]))
        mss = []
        for i in range(n):
            points = torch.randint(4, patch - 4, (opts.mss_points, 3), generator=self.generator)
            mss.append(mss_loss([f[i] for f in out["features"]], [f[n + i] for f in out["features"]],
                                sources[i].to(opts.device), points.to(opts.device), GRID_SPACING_MM))
        loss_mss = torch.stack(mss).mean()
        loss = loss_rdr + opts.mss_weight * loss_mss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 5.0)
        self.optimizer.step()
        rdr_mm = float((predicted_offset_mm(latent[:n].detach(), latent[2 * n:].detach()) - offsets_t[:, 0]).norm(dim=1).mean())
        return {"loss": float(loss.detach()), "rdr": float(loss_rdr.detach()), "mss": float(loss_mss.detach()),
                "rdr_mm": rdr_mm}

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
        opts = self.options
        started = time.time() - self.elapsed
        self.model.train()
        self.write_stats("running")
        while self.epoch < opts.epochs:
            for group in self.optimizer.param_groups:
                group["lr"] = self._learning_rate()
            sums: dict[str, float] = {}
            bar = tqdm(range(opts.iterations_per_epoch), desc=f"epoch {self.epoch + 1}/{opts.epochs}", leave=False)
            for _ in bar:
                for key, value in self.step().items():
                    sums[key] = sums.get(key, 0.0) + value
                bar.set_postfix(loss=f"{sums['loss'] / (bar.n + 1):.3f}", rdr_mm=f"{sums['rdr_mm'] / (bar.n + 1):.1f}")
            self.epoch += 1
            metric = self.validate()
            self.elapsed = time.time() - started
            record = {"epoch": self.epoch, "time_s": round(self.elapsed, 1), "val_error_mm": round(metric, 2),
                      **{k: round(v / opts.iterations_per_epoch, 4) for k, v in sums.items()}}
            self.history.append(record)
            tqdm.write(json.dumps(record))
            if metric < self.best_metric:
                self.best_metric = metric
                save_medlam(self.model, self.out, epoch=self.epoch, val_error_mm=metric)
            self.save_state()
            self.write_stats("running")
            if opts.time_limit_s and self.elapsed >= opts.time_limit_s:
                break
        self.write_stats("finished" if self.epoch >= opts.epochs else "stopped")
        return {"epoch": self.epoch, "best_metric": self.best_metric, "total_time": self.elapsed}
