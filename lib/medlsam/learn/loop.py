"""The learner's training loop: one process or torch.distributed ranks, on the ``device`` option's device,
resumable from a checkpoint in the cache folder (``medlsam.learn.checkpoint``).

- Distributed (torchrun, ``medlsam learn --nproc N``): DDP over the ranks (gloo on CPU, nccl on CUDA); each rank
  samples its own patches (``batch_size`` per rank); rank 0 alone scores held out, decides when to stop, writes
  the checkpoint; the learning rate and the stop are rank 0's, broadcast, so every rank takes the same steps.
- Randomness: each epoch's patches from (seed, epoch, rank), so a resumed run needs no RNG state.
- Precision: bfloat16 autocast only where the device runs it natively (``medlsam.learn.predict.autocast_for``).
- The time limit (``deadline``) counts from this (re)start; the step count continues from the checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from medlsam.learn.checkpoint import (
    RunState,
    checkpoint_path,
    fingerprint,
    load_checkpoint,
    save_checkpoint,
    sweep_orphan_temps,
)
from medlsam.learn.data import Example
from medlsam.learn.loss import masked_loss
from medlsam.learn.model import LearnedModel
from medlsam.learn.options import LearnOptions, resolve_device
from medlsam.learn.patches import sample_batch
from medlsam.learn.predict import autocast_for, grid_probabilities
from medlsam.utils.distributed import (
    DistContext,
    barrier,
    broadcast_floats,
    init_distributed,
    mean_over_ranks,
    rank_seed,
)
from medlsam.utils.metrics import dice

logger = logging.getLogger(__name__)

RESERVE_EVALS = 4  # training stops this many held-out checks' time before the deadline (N = 20 overshot by 3.5 min)


def _grid_dice(model: LearnedModel, examples: list[Example]) -> float:
    """Mean Dice over the known (scan, organ) pairs of ``examples`` on the model grid."""
    scores = []
    for ex in examples:
        probabilities = grid_probabilities(model, ex.inputs)
        scores += [dice(probabilities[o] >= 0.5, ex.target[o] > 0) for o in np.flatnonzero(ex.known)]
    return float(np.mean(scores)) if scores else float("nan")


def _agreed_resume(state: RunState | None, ctx: DistContext) -> bool:
    """Whether every rank loaded the same checkpoint epoch (always true in one process)."""
    epoch = float(state.epoch if state is not None else -1)
    mean = mean_over_ranks([epoch], ctx)[0]
    return state is not None and mean_over_ranks([float(mean == epoch)], ctx)[0] == 1.0


def _resume(
    path: Path | None, key: str, net: torch.nn.Module, optim: torch.optim.Optimizer, ctx: DistContext
) -> RunState:
    """The checkpoint's run state, loaded by every rank (all of them, or none: a fresh start)."""
    initial = {k: v.detach().clone() for k, v in net.state_dict().items()}
    state = load_checkpoint(path, key, net, optim)
    if _agreed_resume(state, ctx):
        return state
    if state is not None:  # another rank could not load it: all start afresh
        logger.warning("learn: the ranks did not load the same checkpoint; training from scratch")
        net.load_state_dict(initial)
        optim.state.clear()
    return RunState()


def _wrap(net: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """``net`` in DistributedDataParallel over the ranks (its construction gives every rank rank 0's weights)."""
    if not ctx.distributed:
        return net
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.device(ctx.device).index] if ctx.backend == "nccl" else None
    return DistributedDataParallel(net, device_ids=ids)


class _Schedule:
    """The learning rate's progress: the larger of the step fraction and the time fraction of this (re)start's
    budget, rank 0's value on every rank."""

    def __init__(self, opt: LearnOptions, deadline: float, ctx: DistContext):
        self.total, self.ctx = opt.max_epochs * opt.iterations_per_epoch, ctx
        self.start = time.monotonic()
        self.budget = max(deadline - self.start, 1e-6)

    def done(self, step: int) -> float:
        value = max(step / self.total, (time.monotonic() - self.start) / self.budget)
        return broadcast_floats([value], self.ctx)[0] if self.ctx.distributed else value


def _train_epoch(
    net: torch.nn.Module,
    optim: torch.optim.Optimizer,
    train: list[Example],
    opt: LearnOptions,
    ctx: DistContext,
    state: RunState,
    schedule: _Schedule,
) -> float:
    """One epoch of ``iterations_per_epoch`` steps on this rank's patches; the mean loss over all ranks."""
    epoch = state.epoch + 1
    rng = np.random.default_rng(rank_seed(opt.seed, epoch, ctx.rank))
    torch.manual_seed(rank_seed(opt.seed, epoch, ctx.rank, 1))
    device = torch.device(ctx.device)
    dtype = autocast_for(device)
    losses = []
    for _ in range(opt.iterations_per_epoch):
        done = schedule.done(state.step)
        for group in optim.param_groups:
            group["lr"] = opt.learning_rate * max(1.0 - done, 0.0) ** 0.9
        x, y, k = sample_batch(train, opt.patch, opt.batch_size, rng, opt.organ_patch_fraction, opt.augment)
        x, y, k = (t.to(device, non_blocking=True) for t in (x, y, k))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype is not None):
            logits = net(x)
        loss = masked_loss(logits.float(), y, k)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        losses.append(loss.detach().item())
        state.step += 1
    return mean_over_ranks([float(np.mean(losses))], ctx)[0]


def _check_held_out(
    model: LearnedModel, held: list[Example], state: RunState, last: bool, ctx: DistContext
) -> tuple[float | None, float]:
    """Rank 0 scores ``held`` when due (keeping the best state); every rank gets (score or None, seconds)."""
    opt, epoch = model.options, state.epoch
    score, seconds = math.nan, 0.0
    due = bool(held) and (epoch % opt.validate_every == 0 or last or epoch == 1)
    if due and ctx.is_main:
        tic = time.monotonic()
        score = _grid_dice(model, held)
        model.network.train()
        seconds = time.monotonic() - tic
        if score > state.best:
            state.best = score
            state.best_state = {k: v.detach().cpu().clone() for k, v in model.network.state_dict().items()}
    score, seconds = broadcast_floats([score, seconds], ctx)
    return (score if due else None), seconds


def _stop_now(epoch: int, opt: LearnOptions, deadline: float, eval_s: float, ctx: DistContext) -> bool:
    """Rank 0's decision: the last epoch, or the held-out checks and the final scoring would miss the deadline."""
    last = epoch == opt.max_epochs or time.monotonic() + RESERVE_EVALS * eval_s >= deadline
    return bool(broadcast_floats([float(last)], ctx)[0])


@torch.no_grad()
def _sync_from_main(net: torch.nn.Module, ctx: DistContext) -> None:
    """Rank 0's network state on every rank (the best state it kept)."""
    if ctx.distributed:
        import torch.distributed as dist

        for tensor in net.state_dict().values():
            dist.broadcast(tensor, src=0)


def _record(state: RunState, schedule: _Schedule, ctx: DistContext) -> dict:
    record = {
        "epochs": state.epoch,
        "iterations": state.step,
        "train_minutes": (time.monotonic() - schedule.start) / 60,
        "best_grid_dice": state.best if state.best_state is not None else None,
        "history": state.history,
        "resumed_from_epoch": state.resumed_from_epoch,
        "device": ctx.device,
    }
    if ctx.distributed:
        record["world_size"] = ctx.world_size
    return record


def train_network(
    model: LearnedModel,
    train: list[Example],
    held: list[Example],
    deadline: float,
    progress: Callable[[dict], None] | None = None,
    cache: str | Path | None = None,
    ctx: DistContext | None = None,
) -> dict:
    """Train ``model.network`` in place until max_epochs or ``deadline`` (time.monotonic); keep the state that
    scored best on ``held`` (the last state when nothing is held out). With ``cache``, a checkpoint there at each
    epoch's end, resumed by the same run (``medlsam.learn.trainer.learn`` removes it once the model is scored).
    ``ctx``: this process's place among torch.distributed ranks (default: joined here). Returns the training
    record."""
    opt = model.options
    ctx = ctx or init_distributed(resolve_device(opt.device))  # torchrun's process group, else one process
    net = model.network.to(ctx.device).train()
    optim = torch.optim.AdamW(net.parameters(), lr=opt.learning_rate, weight_decay=opt.weight_decay)
    path = checkpoint_path(cache)
    if ctx.is_main and path is not None:
        sweep_orphan_temps(path.parent)
    key = fingerprint(model.organs, opt.to_dict(), train, held)
    state = _resume(path, key, net, optim, ctx)
    wrapped, schedule, eval_s = _wrap(net, ctx), _Schedule(opt, deadline, ctx), 0.0
    logger.info(f"learn: training on {ctx.describe()}" + (f", from epoch {state.epoch}" if state.epoch else ""))
    while state.epoch < opt.max_epochs:
        loss = _train_epoch(wrapped, optim, train, opt, ctx, state, schedule)
        state.epoch += 1
        # the held-out checks, and the final scoring on the scans' own grids after the loop, must fit the deadline
        last = _stop_now(state.epoch, opt, deadline, eval_s, ctx)
        entry = {"epoch": state.epoch, "loss": loss, "minutes": (time.monotonic() - schedule.start) / 60}
        score, seconds = _check_held_out(model, held, state, last, ctx)
        if score is not None:
            entry["held_out_dice"], eval_s = score, seconds
        state.history.append(entry)
        if ctx.is_main:
            logger.info(f"learn: {entry}")
            if path is not None:  # also the last epoch's: a kill during the final scoring loses no training
                save_checkpoint(path, key, net, optim, state)
            if progress:  # after the checkpoint: a progress callback that stops the run loses no epoch
                progress(entry)
        barrier(ctx)
        if last:
            break
    if ctx.is_main and state.best_state is not None:
        net.load_state_dict(state.best_state)
    _sync_from_main(net, ctx)
    net.eval()
    return _record(state, schedule, ctx)
