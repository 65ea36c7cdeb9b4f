"""Reduced precision only where the hardware runs it natively, decided once per process.

bfloat16 autocast is 1.6x faster for MedLAM training on a CPU with native bf16 instructions (AVX512-BF16 or
AMX), but on one without them (e.g. an AVX2 EPYC) oneDNN emulates it: one Conv3d took 8.9 s instead of 0.19 s.
So ``use_bf16(None, device)`` asks the hardware: on CUDA the GPU's own answer, on CPU the processor's flags,
and where those cannot be read (or oneDNN is limited by ONEDNN_MAX_CPU_ISA) a tiny timed probe. An explicit
True or False from the user always wins.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # Linux /proc/cpuinfo names of native bfloat16 arithmetic
# The probe must show a clear win: with oneDNN limited to AVX512_CORE it measured bf16 1.14x faster while the
# training step was 1.24x slower (benchmarks/results/training.md); natively the step is 1.8x faster.
PROBE_MIN_SPEEDUP = 1.5


@dataclass(frozen=True)
class Bf16Support:
    native: bool
    reason: str  # one line for logs and reports


def cpu_model() -> str:
    """The processor's name (Linux /proc/cpuinfo, else platform.processor())."""
    for line in _cpuinfo().splitlines():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_capability() -> str:
    """torch's vector instruction level for this CPU (e.g. AVX2, AVX512; DEFAULT elsewhere)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001 - informative only
        return "unknown"


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _x86_flags() -> set[str] | None:
    """The x86 CPU's flags (Linux); None where they cannot be read (other systems, ARM)."""
    for line in _cpuinfo().splitlines():
        if line.lower().startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def bf16_probe_speedup(repeats: int = 2) -> float:
    """fp32 time / bf16-autocast time of a forward and backward pass of the default-width MedLAM on one 32^3
    patch (> 1: bf16 faster). A single convolution is no guide: on this CPU with oneDNN limited to AVX512_CORE
    one Conv3d ran 4.7x faster in bf16 while the training step did not; the network's own pass agreed with
    the step. Measured: 0.8 s with oneDNN limited to AVX512_CORE, 5.9 s limited to AVX2 (bf16 emulated)."""
    from medlsam.medlam.network import MedLAM, MedLAMConfig

    model = MedLAM(MedLAMConfig(patch_size=(32, 32, 32))).to(memory_format=torch.channels_last_3d)
    x = torch.randn(1, 1, 32, 32, 32).contiguous(memory_format=torch.channels_last_3d)

    def one_pass(bf16: bool) -> float:
        tic = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        (out["latent"].float().sum() + sum(f.float().mean() for f in out["features"])).backward()
        return time.perf_counter() - tic

    one_pass(False)  # warms oneDNN up
    fp32 = min(one_pass(False) for _ in range(repeats))
    first = one_pass(True)  # an emulated bf16 is many times slower even warm: no need to wait for more
    bf16 = first if first > 4 * fp32 else min(one_pass(True) for _ in range(repeats))
    return fp32 / max(bf16, 1e-9)


@functools.cache
def cpu_bf16_support() -> Bf16Support:
    """Whether this CPU runs bfloat16 natively: its flags, or a timed probe when they cannot be read."""
    flags = _x86_flags()
    where = f"{cpu_model()}, torch capability {cpu_capability()}"
    isa_limit = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL"
    if flags is not None:
        native = sorted(set(BF16_CPU_FLAGS) & flags)
        if not native:
            return Bf16Support(False, f"{where}: no native bfloat16 (no {' or '.join(BF16_CPU_FLAGS)} flag)")
        if isa_limit.upper() == "ALL":
            return Bf16Support(True, f"{where}: native bfloat16 ({', '.join(native)})")
        unsure = f"native bfloat16 ({', '.join(native)}) but oneDNN limited to {isa_limit}"
    else:
        unsure = "CPU flags unknown"
    speedup = bf16_probe_speedup()  # only where the flags cannot say
    return Bf16Support(speedup >= PROBE_MIN_SPEEDUP, f"{where}: {unsure}; probe bf16 {speedup:.2f}x fp32 speed")


def bf16_support(device: str | torch.device) -> Bf16Support:
    """Native bfloat16 on ``device`` (cpu, cuda, cuda:N); anything else: no."""
    device = torch.device(device)
    if device.type == "cpu":
        return cpu_bf16_support()
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return Bf16Support(False, "CUDA not available")
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported():
            return Bf16Support(True, f"{name}: native bfloat16")
        return Bf16Support(False, f"{name}: no native bfloat16")
    return Bf16Support(False, f"{device.type}: bfloat16 not used")


def use_bf16(requested: bool | None, device: str | torch.device) -> bool:
    """The user's explicit choice, else bfloat16 exactly where ``device`` runs it natively."""
    if requested is not None:
        return bool(requested)
    return bf16_support(device).native


def autocast_dtype(requested: bool | None, device: str | torch.device) -> torch.dtype | None:
    """The autocast dtype for ``device``: bfloat16 where chosen (``use_bf16``); on a GPU without bfloat16 float16
    (with loss scaling, the caller's job) unless the user said no; None for float32."""
    if use_bf16(requested, device):
        return torch.bfloat16
    if torch.device(device).type == "cuda" and requested is not False and torch.cuda.is_available():
        return torch.float16
    return None


def describe(requested: bool | None, device: str | torch.device) -> str:
    """One log line: the precision chosen and why."""
    dtype = autocast_dtype(requested, device)
    chosen = {torch.bfloat16: "bfloat16 autocast", torch.float16: "float16 autocast"}.get(dtype, "float32")
    why = "chosen by the user" if requested is not None else bf16_support(device).reason
    return f"precision {chosen} on {torch.device(device)} ({why})"


def parse_precision(value: str | bool | None) -> bool | None:
    """``auto`` / ``fp32`` / ``bf16`` (also true/false) -> None / False / True; anything else is an error."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    choices = {
        "auto": None,
        "": None,
        "fp32": False,
        "float32": False,
        "false": False,
        "bf16": True,
        "bfloat16": True,
        "true": True,
    }
    if text not in choices:
        raise ValueError(f"precision must be auto, fp32 or bf16, not {value!r}")
    return choices[text]
