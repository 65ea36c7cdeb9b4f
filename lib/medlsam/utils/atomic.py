"""Atomic writes: a file appears whole at its path or not at all (a crash or an interrupt leaves no partial
file). One helper for every writer: labels, JSON, weights, banks, pictures, caches."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


def _suffix(path: Path) -> str:
    """The extension that tells writers the format (".nii.gz" kept whole)."""
    return ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary path beside ``path`` (same extension) to write to; renamed onto ``path`` when the
    block ends normally, removed when it raises. Not mkstemp: its files are private (0600), and labels, weights
    and reports must get normal permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{os.getpid()}-{uuid.uuid4().hex}{_suffix(path)}"  # unique across processes
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(data: object, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as handle:
        json.dump(data, handle, indent=2)


def torch_save_atomic(obj: object, path: str | os.PathLike) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
