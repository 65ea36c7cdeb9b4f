"""The learner's options: defaults chosen by measurement (benchmarks/results/learning.md), every value checked."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields

from medlsam.errors import MedLSAMError

DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class LearnError(MedLSAMError):
    """Bad options, labels or model files of the segmentation learner."""


@dataclass
class LearnOptions:
    spacing: tuple[float, float, float] = (3.0, 4.0, 4.0)  # model grid, mm along z, y, x (canonical)
    patch: tuple[int, int, int] = (48, 64, 64)  # training patch, model-grid voxels (z, y, x)
    network: str = "dynunet"  # dynunet | segresnet
    filters: int = 16  # channels of the first level (doubling, at most 8x)
    prior_channels: bool = True  # the few-shot prior of the other labels as input channels
    # learn a correction of the prior's logit (the model starts as the prior): with the plain network, 100 steps
    # (10 min on the shared 2-core CPU) gave validation Dice 0.09-0.17 where the prior gave 0.31-0.61 (N = 3)
    prior_residual: bool = True
    max_epochs: int = 200
    iterations_per_epoch: int = 25
    batch_size: int = 2
    learning_rate: float = 3e-3
    weight_decay: float = 1e-5
    organ_patch_fraction: float = 0.67  # patches centred on a random known organ (the rest anywhere in the body)
    augment: bool = True
    held_out_fraction: float = 0.2  # labels held out to score the model against the few-shot path
    min_held_out: int = 1  # at least this many held out (when at least 3 labels)
    choice_margin: float = 0.0  # the learned model is chosen for an organ when it beats the few-shot path by more
    time_limit_min: float = 25.0  # training stops after this (the best model so far is kept); 0: no limit
    validate_every: int = 4  # epochs between held-out scores while training
    seed: int = 0
    threads: int = 2
    device: str = "auto"  # auto (cuda when available, else cpu), cpu, cuda or cuda:N; where it trains, not the model

    def __post_init__(self) -> None:
        self.spacing = tuple(float(v) for v in self.spacing)  # type: ignore[assignment]
        self.patch = tuple(int(v) for v in self.patch)  # type: ignore[assignment]
        _check(
            len(self.spacing) == 3 and all(0.5 <= s <= 10 for s in self.spacing), "spacing", "3 values in [0.5, 10] mm"
        )
        _check(
            len(self.patch) == 3 and all(16 <= p <= 256 and p % 16 == 0 for p in self.patch),
            "patch",
            "3 multiples of 16 in [16, 256]",
        )
        _check(self.network in ("dynunet", "segresnet"), "network", "dynunet or segresnet")
        _check(4 <= self.filters <= 64, "filters", "in [4, 64]")
        _check(1 <= self.max_epochs <= 100000, "max_epochs", "in [1, 100000]")
        _check(1 <= self.iterations_per_epoch <= 100000, "iterations_per_epoch", "in [1, 100000]")
        _check(1 <= self.batch_size <= 64, "batch_size", "in [1, 64]")
        _check(0 < self.learning_rate <= 1, "learning_rate", "in (0, 1]")
        _check(0 <= self.weight_decay <= 1, "weight_decay", "in [0, 1]")
        _check(0 <= self.organ_patch_fraction <= 1, "organ_patch_fraction", "in [0, 1]")
        _check(0 <= self.held_out_fraction < 1, "held_out_fraction", "in [0, 1)")
        _check(0 <= self.min_held_out <= 100, "min_held_out", "in [0, 100]")
        _check(0 <= self.choice_margin <= 1, "choice_margin", "in [0, 1]")
        _check(
            math.isfinite(self.time_limit_min) and 0 <= self.time_limit_min <= 10000,
            "time_limit_min",
            "in [0, 10000] minutes",
        )
        _check(1 <= self.validate_every <= 100000, "validate_every", "in [1, 100000]")
        _check(1 <= self.threads <= 256, "threads", "in [1, 256]")
        self.device = str(self.device).strip().lower()
        _check(bool(DEVICE.match(self.device)), "device", "auto, cpu, cuda or cuda:N")
        resolve_device(self.device)  # present here (a model file's options are read with device auto)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["spacing"], out["patch"] = list(self.spacing), list(self.patch)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> LearnOptions:
        """Options from a dict; an unknown key is an error naming it and the known ones."""
        if not isinstance(data, dict):
            raise LearnError(f"learner options must be a mapping, not {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LearnError(f"unknown learner option(s) {unknown}; known: {sorted(known)}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise LearnError(f"bad learner options: {exc}") from None


def _check(ok: bool, name: str, rule: str) -> None:
    if not ok:
        raise LearnError(f"learner option {name} must be {rule}")


def resolve_device(name: str) -> str:
    """The torch device of the ``device`` option: auto -> cuda when available, else cpu; LearnError naming a device
    that is malformed or not present here."""
    from medlsam.utils.devices import check_device, cuda_count

    text = str(name).strip().lower()
    if text == "auto":
        return "cuda" if cuda_count() else "cpu"
    try:
        return check_device(text)
    except MedLSAMError as exc:
        raise LearnError(f"learner option device {name!r}: {exc}") from None
