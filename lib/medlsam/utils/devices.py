"""Device strings a user may give (cpu, cuda, cuda:N): validation, the choices present, CUDA autocast."""

from __future__ import annotations

import re

import torch

from medlsam.errors import MedLSAMError

_DEVICE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


def cuda_count() -> int:
    try:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - a broken driver counts as no GPU
        return 0


def device_choices() -> list[str]:
    """The devices present: cpu first, then cuda and cuda:N for every visible GPU."""
    count = cuda_count()
    return ["cpu"] + (["cuda"] + [f"cuda:{i}" for i in range(count)] if count else [])


def check_device(name: str | torch.device | None) -> str:
    """The device string normalised ("CUDA" -> "cuda"); MedLSAMError if malformed or not present here."""
    text = str(name if name is not None else "cpu").strip().lower()
    match = _DEVICE.match(text)
    if not match:
        raise MedLSAMError(f"device must be cpu, cuda or cuda:N, not {name!r}")
    kind, index = match.group(1), match.group(2)
    if kind == "cpu":
        if index not in (None, "0"):
            raise MedLSAMError(f"device {name!r}: there is one cpu device (use cpu)")
        return "cpu"
    count = cuda_count()
    if count == 0:
        raise MedLSAMError(
            f"device {name!r} asked for, but CUDA is not available here (torch {torch.__version__}, "
            f"built with CUDA {torch.version.cuda or 'none'}); use device cpu"
        )
    if index is not None and int(index) >= count:
        raise MedLSAMError(f"device {name!r}: only {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})")
    return text
