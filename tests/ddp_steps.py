"""Worker of test_distributed: k optimisation steps on fixed global batches, each rank its slice of every
batch (torchrun), or one process with the whole batch (plain python). Rank 0 saves the weights to --out.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_steps.py --scans A B --out w.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from medlsam.medlam.network import MedLAMConfig
from medlsam.medlam.sampling import draw_batch, split_batch
from medlsam.medlam.training import Trainer, TrainOptions
from medlsam.utils.distributed import close_distributed, init_distributed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scans", nargs="+", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--patch", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    config = MedLAMConfig(base_channels=2, patch_size=(args.patch,) * 3)
    options = TrainOptions(batch_size=args.global_batch // ctx.world_size, mss_points=8, bf16=False)
    out = Path(args.out)
    trainer = Trainer(
        [Path(s) for s in args.scans], out.with_name(f"rank{ctx.rank}-medlam.pt"), config, options, dist=ctx
    )
    # plain SGD: AdamW turns rounding noise in gradients that are zero in exact arithmetic (conv biases before
    # InstanceNorm) into full +-lr steps, so its weights differ by ~lr between any two summation orders
    # float64: the two summation orders agree to ~1e-14, not float32's ~1e-4 (amplified by gradient clipping)
    trainer.model.double().to(memory_format=torch.channels_last_3d)
    trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.01)
    sampler = trainer.sampler
    if ctx.is_main:
        torch.save(trainer.model.state_dict(), out.with_name(out.stem + "-start.pt"))
    for step in range(args.steps):
        batch = draw_batch(
            sampler.arrays,
            sampler.bodies,
            np.arange(len(sampler.arrays)),
            args.global_batch,
            args.patch,
            4,
            8,
            np.random.default_rng(step),
            torch.Generator().manual_seed(step),
        )
        trainer.train_step(split_batch(batch, ctx.rank, ctx.world_size))
    if ctx.is_main:
        torch.save(trainer.model.state_dict(), out)
    close_distributed()


if __name__ == "__main__":
    main()
