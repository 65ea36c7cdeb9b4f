"""Scans on the localisation grid, cached on disk, and patch cutting with zero padding."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from medlsam.io.grid import to_localization_grid
from medlsam.io.volume import is_image_path, load_ct
from medlsam.utils.atomic import atomic_path

BODY_THRESHOLD = 0.125  # mapped value of -500 HU: voxels above are body (or table)


def list_images(sources: str | os.PathLike | list) -> list[Path]:
    """Image paths from a folder, a text file with one path per line, or a list of either."""
    if isinstance(sources, (list, tuple)):
        return [p for s in sources for p in list_images(s)]
    path = Path(sources)
    if path.is_file() and path.suffix == ".txt":
        lines = [line.strip() for line in path.read_text().splitlines()]
        return [Path(line) if Path(line).is_absolute() else path.parent / line for line in lines if line]
    if path.is_dir() and not any(path.glob("*.dcm")):
        return sorted(p for p in path.iterdir() if p.is_file() and is_image_path(p))
    return [path]


def cached_grid_array(path: Path, cache_dir: Path | None, mmap: bool = False) -> np.ndarray:
    """The scan's localisation-grid array (float16), read from `cache_dir` when present; with `mmap` a cached
    array is memory-mapped read-only (processes and DataLoader workers share the page cache)."""
    if cache_dir is None:
        return to_localization_grid(load_ct(path)).array.astype(np.float16)
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    cached = cache_dir / f"{path.name.split('.')[0]}-{key}.npy"
    if cached.exists():
        return np.load(cached, mmap_mode="r" if mmap else None)
    array = to_localization_grid(load_ct(path)).array.astype(np.float16)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(cached) as tmp:  # unique temporary names: several ranks may cache at once
        np.save(tmp, array)
    return array


def cut_patch(array: np.ndarray | torch.Tensor, centre: np.ndarray, size: int | tuple[int, int, int]) -> np.ndarray:
    """The patch of `size` whose centre voxel is `centre` (rounded); outside the array is zero (air)."""
    size = np.broadcast_to(np.asarray(size), (3,))
    start = np.round(np.asarray(centre, dtype=np.float64)).astype(int) - size // 2
    out = np.zeros(tuple(size), dtype=np.float32)
    src_lo = np.maximum(start, 0)
    src_hi = np.minimum(start + size, array.shape)
    if np.any(src_hi <= src_lo):
        return out
    dst_lo = src_lo - start
    dst_hi = dst_lo + (src_hi - src_lo)
    region = array[src_lo[0] : src_hi[0], src_lo[1] : src_hi[1], src_lo[2] : src_hi[2]]
    out[dst_lo[0] : dst_hi[0], dst_lo[1] : dst_hi[1], dst_lo[2] : dst_hi[2]] = np.asarray(region, dtype=np.float32)
    return out


def body_voxels(array: np.ndarray, max_points: int = 20000, seed: int = 0) -> np.ndarray:
    """Up to `max_points` (N, 3) indices of body voxels, for sampling patch centres."""
    points = np.argwhere(array > BODY_THRESHOLD)
    if len(points) == 0:
        points = np.argwhere(np.ones(array.shape, dtype=bool))
    if len(points) > max_points:
        points = points[np.random.default_rng(seed).choice(len(points), max_points, replace=False)]
    return points
