"""Reduced precision only where the hardware runs it natively, decided once per process.

bfloat16 autocast is 1.6x faster for MedLAM training on a CPU with native bf16 instructions (AVX512-BF16 or
AMX), but on one without them (e.g. an AVX2 EPYC) oneDNN emulates it: one Conv3d took 8.9 s instead of 0.19 s.
So ``use_bf16(None, device)`` asks the hardware: on CUDA the GPU's own answer, on CPU the processor's flags,
and where those cannot be read a tiny timed probe. An explicit True or False from the user always wins.
"""

from __future__ import annotations

import functools
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # Linux /proc/cpuinfo names of native bfloat16 arithmetic


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


def bf16_probe_speedup(size: int = 24, repeats: int = 3) -> float:
    """fp32 time / bf16-autocast time of a small Conv3d forward and backward on this CPU (> 1: bf16 faster)."""
    conv = torch.nn.Conv3d(4, 8, 3, padding=1)
    x = torch.randn(1, 4, size, size, size)

    def best(bf16: bool) -> float:
        times = []
        for _ in range(repeats + 1):  # the first call warms up oneDNN
            tic = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = conv(x)
            out.float().sum().backward()
            times.append(time.perf_counter() - tic)
        return min(times[1:])

    return best(False) / max(best(True), 1e-9)


@functools.cache
def cpu_bf16_support() -> Bf16Support:
    """Whether this CPU runs bfloat16 natively: its flags, or a timed probe when they cannot be read."""
    flags = _x86_flags()
    where = f"{cpu_model()}, torch capability {cpu_capability()}"
    if flags is not None:
        native = sorted(set(BF16_CPU_FLAGS) & flags)
        if native:
            return Bf16Support(True, f"{where}: native bfloat16 ({', '.join(native)})")
        return Bf16Support(False, f"{where}: no native bfloat16 (no {' or '.join(BF16_CPU_FLAGS)} flag)")
    speedup = bf16_probe_speedup()
    return Bf16Support(speedup >= 1.0, f"{where}: CPU flags unknown; probe bf16 {speedup:.2f}x fp32 speed")


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


def describe(requested: bool | None, device: str | torch.device) -> str:
    """One log line: the precision chosen and why."""
    chosen = "bfloat16 autocast" if use_bf16(requested, device) else "float32"
    why = "chosen by the user" if requested is not None else bf16_support(device).reason
    return f"precision {chosen} on {torch.device(device)} ({why})"


def parse_precision(value: str | bool | None) -> bool | None:
    """``auto`` / ``fp32`` / ``bf16`` (also true/false) -> None / False / True; anything else is an error."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    choices = {"auto": None, "": None, "fp32": False, "float32": False, "false": False,
               "bf16": True, "bfloat16": True, "true": True}
    if text not in choices:
        raise ValueError(f"precision must be auto, fp32 or bf16, not {value!r}")
    return choices[text]
