"""Precision chosen by what the hardware runs natively: the choice on this machine, the user's word winning,
the probe where CPU flags are unknown (real training steps in each precision: tests/training)."""

from __future__ import annotations

import os

import pytest
import torch

from medlsam.medlam import precision


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
