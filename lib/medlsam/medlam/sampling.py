"""Training batches for MedLAM: patch pairs, tracked augmentations and MSS points, drawn from scans on the
localisation grid. Batch t of an epoch depends only on (seed, epoch, rank, t), never on which process draws
it, so DataLoader workers (any number) give exactly the in-process batches."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medlsam.io.grid import GRID_SPACING_MM
from medlsam.medlam.augment import augment_crop
from medlsam.medlam.patches import cut_patch
from medlsam.utils.distributed import epoch_shard, rank_seed

BATCH_KEYS = ("query", "augmented", "second", "source", "offsets", "points")


def draw_batch(
    arrays: list[np.ndarray],
    bodies: list[np.ndarray],
    scans: np.ndarray,
    count: int,
    patch: int,
    margin: int,
    mss_points: int,
    rng: np.random.Generator,
    generator: torch.Generator,
) -> dict:
    """`count` samples, each from a scan of `scans`: a query patch, its augmented copy (from a crop with
    `margin` around it) with the source map, a second patch of the same scan, the two offsets (mm) and
    the MSS points. Tensors are stacked per key, sample first, so a batch splits along dim 0."""
    crop_size = patch + 2 * margin
    inner = slice(margin, margin + patch)  # not m:-m, which is empty for m = 0
    out: dict[str, list] = {key: [] for key in BATCH_KEYS}
    for _ in range(count):
        scan = int(scans[rng.integers(len(scans))])
        body = bodies[scan]
        c_q, c_s = body[rng.integers(len(body))], body[rng.integers(len(body))]
        crop = torch.from_numpy(cut_patch(arrays[scan], c_q, crop_size))[None]
        aug, source = augment_crop(crop, patch, generator)
        out["query"].append(crop[:, inner, inner, inner])
        out["second"].append(torch.from_numpy(cut_patch(arrays[scan], c_s, patch))[None])
        out["augmented"].append(aug)
        out["source"].append(source)
        centre_shift = source[:, patch // 2, patch // 2, patch // 2].numpy() - patch // 2
        out["offsets"].append(
            torch.tensor(
                np.array([(c_s - c_q) * GRID_SPACING_MM, (c_s - c_q - centre_shift) * GRID_SPACING_MM]),
                dtype=torch.float32,
            )
        )
        out["points"].append(torch.randint(4, patch - 4, (mss_points, 3), generator=generator))
    return {key: torch.stack(values) for key, values in out.items()}


def split_batch(batch: dict, part: int, parts: int) -> dict:
    """Samples [part * n, (part + 1) * n) of a batch of parts * n samples."""
    n = len(batch["query"]) // parts
    return {key: value[part * n : (part + 1) * n] for key, value in batch.items()}


class TrainingBatches(Dataset):
    """Batch t (0 <= t < iterations) of this rank's epoch; `set_epoch` before each epoch."""

    def __init__(
        self,
        arrays: list[np.ndarray],
        bodies: list[np.ndarray],
        patch: int,
        margin: int,
        batch_size: int,
        mss_points: int,
        iterations: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.arrays, self.bodies = arrays, bodies
        self.patch, self.margin, self.batch_size, self.mss_points = patch, margin, batch_size, mss_points
        self.iterations, self.seed, self.rank, self.world_size = iterations, seed, rank, world_size
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.scans = epoch_shard(len(self.arrays), self.seed, epoch, self.rank, self.world_size)

    def __len__(self) -> int:
        return self.iterations

    def __getitem__(self, t: int) -> dict:
        rng = np.random.default_rng(rank_seed(self.seed, self.epoch, self.rank, t, 1))
        generator = torch.Generator().manual_seed(rank_seed(self.seed, self.epoch, self.rank, t, 2))
        return draw_batch(
            self.arrays,
            self.bodies,
            self.scans,
            self.batch_size,
            self.patch,
            self.margin,
            self.mss_points,
            rng,
            generator,
        )

    def loader(self, workers: int = 0, start: int = 0, pin_memory: bool = False):
        """The epoch's batches from `start` on: in this process (workers 0) or from DataLoader workers."""
        if workers <= 0:
            return (self[t] for t in range(start, self.iterations))
        indices = list(range(start, self.iterations))
        subset = torch.utils.data.Subset(self, indices)
        return DataLoader(
            subset,
            batch_size=None,
            shuffle=False,
            num_workers=workers,
            pin_memory=pin_memory,
            prefetch_factor=4,
            persistent_workers=False,
        )
