"""Precision chosen by what the hardware runs natively: the choice on this machine, the user's word winning,
the probe where CPU flags are unknown, and a training step that is not slower than float32."""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
import pytest
import torch

from medlsam.io.volume import write_volume
from medlsam.medlam import precision
from medlsam.medlam.network import MedLAMConfig
from medlsam.medlam.training import Trainer, TrainOptions


def test_the_choice_on_this_machine_follows_its_cpu_flags():
    """The CPU's flags decide, unless oneDNN is limited below them (ONEDNN_MAX_CPU_ISA, as when this suite runs
    emulating a CPU without bf16): then the probe does."""
    support = precision.cpu_bf16_support()
    flags = next(
        (set(line.split(":", 1)[1].split()) for line in open("/proc/cpuinfo") if line.startswith("flags")), set()
    )
    native = bool({"avx512_bf16", "amx_bf16"} & flags)
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL"
    if native and limit.upper() != "ALL":
        assert f"oneDNN limited to {limit}" in support.reason and "probe" in support.reason
        native = support.native
    assert support.native is native
    assert precision.use_bf16(None, "cpu") is native
    line = precision.describe(None, "cpu")
    assert ("bfloat16 autocast" if native else "float32") in line
    assert precision.cpu_capability() in line and precision.cpu_model() in line
    print(line)


def test_an_explicit_choice_wins():
    assert precision.use_bf16(True, "cpu") is True
    assert precision.use_bf16(False, "cpu") is False
    assert "chosen by the user" in precision.describe(False, "cpu")
    assert [precision.parse_precision(v) for v in ("auto", "fp32", "bf16", None)] == [None, False, True, None]
    with pytest.raises(ValueError, match="auto, fp32 or bf16"):
        precision.parse_precision("half")


def test_without_cpu_flags_a_timed_probe_decides(monkeypatch):
    monkeypatch.setattr(precision, "_cpuinfo", lambda: "")
    precision.cpu_bf16_support.cache_clear()
    try:
        support = precision.cpu_bf16_support()
        assert "probe" in support.reason
        speedup = float(support.reason.split("probe bf16 ")[1].split("x")[0])
        assert support.native == (speedup >= precision.PROBE_MIN_SPEEDUP)
    finally:
        precision.cpu_bf16_support.cache_clear()


def test_cuda_without_a_gpu_is_not_bf16():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: its own answer is used")
    assert precision.use_bf16(None, "cuda") is False


@pytest.mark.slow
def test_the_default_training_step_is_not_slower_than_float32(tmp_path, make_ct):
    """The default 64^3 patch, one scan per step: the step the default precision picks takes at most
    float32's time (with 25 % slack for a busy machine)."""
    paths = []
    for n, centre in enumerate([(14.0, 20.0, 10.0), (24.0, 14.0, 18.0)]):
        ct, _ = make_ct(ball_centre=centre, ball_radius=5.0)
        write_volume(ct.array.astype(np.int16), ct, tmp_path / f"scan{n}.nii.gz")
        paths.append(tmp_path / f"scan{n}.nii.gz")
    config = MedLAMConfig()  # the default: 64^3 patches
    options = dict(epochs=1, iterations_per_epoch=1, batch_size=1, mss_points=8, validation_pairs=2)

    def median_step(bf16: bool | None) -> tuple[float, Trainer]:
        trainer = Trainer(paths, tmp_path / f"{bf16}" / "medlam.pt", config, TrainOptions(bf16=bf16, **options))
        trainer.step()  # warm-up
        times = []
        for _ in range(3):
            tic = time.perf_counter()
            trainer.step()
            times.append(time.perf_counter() - tic)
        return statistics.median(times), trainer

    default_s, trainer = median_step(None)
    fp32_s, _ = median_step(False)
    assert (trainer.amp_dtype is torch.bfloat16) is precision.use_bf16(None, "cpu")
    print(f"{trainer.precision}: {default_s:.2f} s per step, float32 {fp32_s:.2f} s")
    assert default_s <= 1.25 * fp32_s


@pytest.mark.slow
def test_training_on_a_cpu_without_native_bf16_picks_float32_and_finishes(tmp_path, make_ct):
    """Issue 14's AVX2 EPYC, emulated by limiting oneDNN to AVX2: `medlsam train` for one step used to sit at
    0 % for minutes under bfloat16; now it says float32 and finishes."""
    import os
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
