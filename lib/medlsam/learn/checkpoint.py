"""The learner's training checkpoint: what a killed training needs to continue, in the learner's cache folder.

One file (``CHECKPOINT``) written atomically at the end of each epoch, holding the fingerprint of what defines the
run (the training and held-out data, the organs, the options that shape training) beside the network, optimizer,
epoch, step, best held-out score and state, and history. No RNG state is needed: each epoch's randomness derives
from (seed, epoch, rank) (``medlsam.learn.loop``). A checkpoint that does not load or belongs to another run is
ignored with a warning and nothing of it is kept (never half-loaded weights).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medlsam.learn.data import Example
from medlsam.utils.atomic import torch_save_atomic

logger = logging.getLogger(__name__)

CHECKPOINT = "learn-checkpoint.pt"
FORMAT = "medlsam-learn-checkpoint"
VERSION = 1
# options that bound or place a run but do not change what one step does: a run resumes across them
NOT_DEFINING = ("time_limit_min", "max_epochs", "threads", "device")


@dataclass
class RunState:
    """Where a training stands between epochs."""

    epoch: int = 0  # epochs done
    step: int = 0  # optimisation steps done
    best: float = -1.0  # best held-out grid Dice so far (-1: none)
    best_state: dict[str, torch.Tensor] | None = None  # the network state that scored it (on the CPU)
    history: list[dict] = field(default_factory=list)
    resumed_from_epoch: int | None = None  # the checkpoint's epoch this run started from (None: from scratch)


def checkpoint_path(cache: str | os.PathLike | None) -> Path | None:
    """The checkpoint file in the learner's cache folder; None without a cache (no checkpoint)."""
    return Path(cache) / CHECKPOINT if cache else None


def fingerprint(organs: list[str], options: dict, train: list[Example], held: list[Example]) -> str:
    """A digest of what defines a run: organs, the options that shape training, and every training and held-out
    example (source, CT on the model grid, targets, known organs, channel count), in order. Not the prior channels:
    they follow from the labels, and a prior computed now and the same prior read back from the cache (float16)
    differ in their last bits."""
    digest = hashlib.blake2b(digest_size=16)
    shaping = {k: v for k, v in options.items() if k not in NOT_DEFINING}
    digest.update(json.dumps({"organs": organs, "options": shaping}, sort_keys=True).encode())
    for tag, examples in (("train", train), ("held", held)):
        for ex in examples:
            digest.update(f"{tag}|{ex.source}|{ex.inputs.shape[0]}".encode())
            for array in (ex.inputs[0], ex.target, ex.known):
                digest.update(f"{array.dtype}{array.shape}".encode())
                digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def _cpu(value):
    """``value`` with every tensor copied to the CPU (a checkpoint loads anywhere)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu(v) for v in value)
    return value


def save_checkpoint(
    path: Path, key: str, network: torch.nn.Module, optimizer: torch.optim.Optimizer, state: RunState
) -> None:
    """Write the checkpoint atomically (a kill leaves the previous one or this one, whole)."""
    torch_save_atomic(
        {
            "format": FORMAT,
            "version": VERSION,
            "fingerprint": key,
            "network": _cpu(network.state_dict()),
            "optimizer": _cpu(optimizer.state_dict()),
            "epoch": state.epoch,
            "step": state.step,
            "best": state.best,
            "best_state": state.best_state,
            "history": json.dumps(state.history),
        },
        path,
    )


def load_checkpoint(
    path: Path | None, key: str, network: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> RunState | None:
    """The run state of the checkpoint at ``path`` with its network and optimizer states loaded; None (with a
    warning, ``network`` and ``optimizer`` unchanged) when there is none, it does not load or it is another run's."""
    if path is None or not path.is_file():
        return None
    before_net, before_opt = copy.deepcopy(network.state_dict()), copy.deepcopy(optimizer.state_dict())
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ValueError("not a learner checkpoint of this version")
        if data["fingerprint"] != key:
            logger.warning(f"learn: ignoring the checkpoint {path}: it belongs to another run (other labels/options)")
            return None
        network.load_state_dict(data["network"])
        optimizer.load_state_dict(data["optimizer"])
        best_state = data["best_state"]
        if best_state is not None and set(best_state) != set(data["network"]):
            raise ValueError("its best state does not fit the network")
        state = RunState(
            epoch=int(data["epoch"]),
            step=int(data["step"]),
            best=float(data["best"]),
            best_state=best_state,
            history=list(json.loads(data["history"])),
            resumed_from_epoch=int(data["epoch"]),
        )
    except Exception as exc:  # noqa: BLE001 - any failure: train from scratch, never half-loaded weights
        network.load_state_dict(before_net)
        optimizer.load_state_dict(before_opt)
        logger.warning(f"learn: ignoring the checkpoint {path}: it does not load ({type(exc).__name__}: {exc})")
        return None
    logger.info(f"learn: resuming from epoch {state.epoch} of {path}")
    return state


def remove_checkpoint(path: Path | None) -> None:
    if path is not None:
        path.unlink(missing_ok=True)


def sweep_orphan_temps(folder: Path | None) -> None:
    """Remove the temporary files (``medlsam.utils.atomic``) of writers that died (killed mid-write) from
    ``folder``; a living process's files are left alone."""
    if folder is None or not folder.is_dir():
        return
    for tmp in folder.glob(".tmp-*"):
        pid = tmp.name.split("-")[1]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
