"""torch.distributed for MedLAM training: process groups (gloo on CPU, nccl on CUDA), per-rank shards and
seeds, the torchrun launcher behind `medlsam train --nproc`, in-process-tree workers for the app, a training
lock, and children that die with their parent."""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from medlsam.errors import MedLSAMError
from medlsam.utils.devices import check_device

TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("MEDLSAM_DIST_TIMEOUT_MIN", "60")))  # rank 0 validates


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: rank among world_size processes, its local rank, backend and device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: not distributed
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        if not self.distributed:
            return f"single process, device {self.device}"
        return (
            f"distributed: rank {self.rank} of world size {self.world_size} (local rank {self.local_rank}), "
            f"backend {self.backend}, device {self.device}"
        )


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) outside it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return rank, world, int(os.environ.get("LOCAL_RANK", str(rank)))


def init_distributed(device: str = "cpu") -> DistContext:
    """Join the process group torchrun (or spawn_training) set up in the environment: gloo on CPU, nccl on
    CUDA, each CUDA rank on its local GPU. One process without WORLD_SIZE > 1."""
    device = check_device(device)
    _, world, local = env_world()
    if world <= 1:
        return DistContext(device=device)
    cuda = device.startswith("cuda")
    if cuda:
        if device == "cuda":
            device = f"cuda:{local % torch.cuda.device_count()}"
        torch.cuda.set_device(torch.device(device))
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=TIMEOUT)
    return DistContext(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, backend=backend, device=device
    )


def close_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_floats(values: list[float], ctx: DistContext) -> list[float]:
    """Rank 0's values on every rank (the others pass placeholders of the same length)."""
    if not ctx.distributed:
        return list(values)
    device = ctx.device if ctx.backend == "nccl" else "cpu"
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return tensor.cpu().tolist()


def mean_over_ranks(values: list[float], ctx: DistContext) -> list[float]:
    """Each value averaged over all ranks."""
    if not ctx.distributed or not values:
        return list(values)
    device = ctx.device if ctx.backend == "nccl" else "cpu"
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return (tensor / ctx.world_size).cpu().tolist()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


# ------------------------------------------------------------------------------------------- data and seeds


def epoch_shard(count: int, seed: int, epoch: int, rank: int, world: int) -> np.ndarray:
    """Rank's scans this epoch: a permutation of all scans from (seed, epoch), rank r takes r, r + W, ...
    Shards are disjoint and together cover every scan; with fewer scans than ranks, ranks share them."""
    order = np.random.default_rng([seed, epoch, 0x5CA7]).permutation(count)
    if count < world:
        return order[[rank % count]]
    return order[rank::world]


def rank_seed(seed: int, epoch: int, rank: int, *more: int) -> int:
    """A 63-bit seed for (seed, epoch, rank, ...): independent streams from one user seed."""
    state = np.random.SeedSequence([seed, epoch, rank, *more]).generate_state(2, np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


# ------------------------------------------------------------------------------------------- process tree


def die_with_parent() -> None:
    """End this process when its parent dies: prctl(PR_SET_PDEATHSIG, SIGTERM) on Linux, plus a thread
    that watches the parent pid (other systems, and a parent that died before the prctl)."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
                os._exit(143)
            time.sleep(1)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


class TrainingLock:
    """An exclusive lock file (flock, released by the kernel if the holder dies) beside a training's outputs:
    two trainings never write the same files. The holder's pid and command line are in the file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._handle = None

    def acquire(self) -> TrainingLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            handle = open(self.path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise MedLSAMError(
                    f"another training is running and writing these files ({self.path}: {holder}); "
                    "wait for it to end or stop it"
                ) from None
            try:  # the file may have been removed by a holder that just finished: lock the current one
                same = os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            handle.close()
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "command": " ".join(sys.argv[:3])}))
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            self.path.unlink(missing_ok=True)
            self._handle.close()  # closing releases the lock
            self._handle = None

    def __enter__(self) -> TrainingLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def strip_option(argv: list[str], name: str) -> list[str]:
    """argv without `name VALUE` / `name=VALUE`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Run `torchrun --standalone --nproc_per_node nproc -m medlsam.cli argv` as a child that dies with us;
    SIGTERM/SIGINT are passed on, so stopping this process stops every rank. Returns its exit status."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "medlsam.cli",
        *argv,
    ]
    print(f"launching {nproc} processes: {' '.join(cmd[1:])}", flush=True)
    linux = sys.platform.startswith("linux")
    child = subprocess.Popen(cmd, preexec_fn=_pdeathsig if linux else None)  # noqa: PLW1509 - prctl only

    def forward(signum, _frame):
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _pdeathsig() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)


# ------------------------------------------------------------------------------------------- in-tree workers


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_training(nproc: int, worker, payload: dict):
    """Run `worker(ctx, payload)` in `nproc` processes forming one gloo/nccl group, all children of this
    process (so that killing its tree stops them); each dies with this process. Returns rank 0's result."""
    import torch.multiprocessing as mp

    port = free_port()
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(
        _spawned, args=(nproc, port, worker, payload, queue), nprocs=nproc, join=True, start_method="spawn"
    )
    return queue.get()


def _spawned(rank: int, world: int, port: int, worker, payload: dict, queue) -> None:
    die_with_parent()
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    try:
        result = worker(payload)
    finally:
        close_distributed()
    if rank == 0:
        queue.put(result)
