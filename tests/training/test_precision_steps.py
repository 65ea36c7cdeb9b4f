"""Real training steps in each precision: the default picks bfloat16 only where the CPU runs it natively, and a CPU
without it (emulated) trains in float32 to the end."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from medlsam.io.volume import write_volume
from medlsam.medlam import precision
from medlsam.medlam.network import MedLAMConfig
from medlsam.medlam.training import Trainer, TrainOptions


@pytest.mark.slow
def test_the_default_training_step_runs_in_the_precision_the_machine_supports(tmp_path, make_ct):
    """The default 64^3 patch, one scan per step: the trainer autocasts to bfloat16 exactly where
    ``precision.use_bf16`` says this CPU runs it natively (its speed against float32: benchmarks/results/training.md),
    and its step gives a finite loss."""
    paths = []
    for n, centre in enumerate([(14.0, 20.0, 10.0), (24.0, 14.0, 18.0)]):
        ct, _ = make_ct(ball_centre=centre, ball_radius=5.0)
        write_volume(ct.array.astype(np.int16), ct, tmp_path / f"scan{n}.nii.gz")
        paths.append(tmp_path / f"scan{n}.nii.gz")
    options = dict(epochs=1, iterations_per_epoch=1, batch_size=1, mss_points=8, validation_pairs=2)
    trainer = Trainer(paths, tmp_path / "medlam.pt", MedLAMConfig(), TrainOptions(bf16=None, **options))
    loss = trainer.step()
    assert (trainer.amp_dtype is torch.bfloat16) is precision.use_bf16(None, "cpu"), trainer.precision
    assert loss and all(np.isfinite(v) for v in loss.values()), loss


@pytest.mark.slow
def test_training_on_a_cpu_without_native_bf16_picks_float32_and_finishes(tmp_path, make_ct):
    """Issue 14's AVX2 EPYC, emulated by limiting oneDNN to AVX2: `medlsam train` for one step used to sit at
    0 % for minutes under bfloat16; now it says float32 and finishes."""
    import subprocess
    import sys

    ct, _ = make_ct(ball_radius=5.0)
    write_volume(ct.array.astype(np.int16), ct, tmp_path / "scan.nii.gz")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "MEDLSAM_TEST_THREADS": "1"}
    tic = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "medlsam.cli",
            "train",
            "--images",
            str(tmp_path / "scan.nii.gz"),
            "--out",
            str(tmp_path / "medlam.pt"),
            "--epochs",
            "1",
            "--iterations-per-epoch",
            "1",
            "--batch-size",
            "1",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    elapsed = time.perf_counter() - tic
    assert done.returncode == 0, done.stderr[-2000:]
    assert "precision float32" in done.stderr and "oneDNN limited to AVX2" in done.stderr
    assert (tmp_path / "medlam.pt").is_file()
    print(f"one-step training under AVX2 emulation: {elapsed:.1f} s")
