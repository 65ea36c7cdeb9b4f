"""The learnt model file: weights, options, organ names, held-out Dice per organ per path and the per-organ choice.
Written atomically (``medlsam.utils.atomic``); read with ``weights_only=True``; anything else fails with a clear
error."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medlsam.learn.network import build_network
from medlsam.learn.options import LearnError, LearnOptions
from medlsam.utils.atomic import torch_save_atomic

FORMAT = "medlsam-learned-segmentation"
VERSION = 1
PATHS = ("learned", "fewshot")


@dataclass
class LearnedModel:
    """A trained network and what the trainer measured about it."""

    network: torch.nn.Module
    options: LearnOptions
    organs: list[str]
    in_channels: int
    held_out: dict[str, dict[str, float | None]]  # path -> organ -> mean held-out Dice (None: not scored)
    choice: dict[str, str]  # organ -> "learned" | "fewshot"
    prior_cuts: dict[str, float] = field(default_factory=dict)
    record: dict = field(default_factory=dict)  # training facts: labels, held-out sources, epochs, minutes

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "state_dict": {k: v.detach().cpu().float() for k, v in self.network.state_dict().items()},
            "options": self.options.to_dict(),
            "organs": list(self.organs),
            "in_channels": int(self.in_channels),
            "held_out": self.held_out,
            "choice": dict(self.choice),
            "prior_cuts": dict(self.prior_cuts),
            "record": self.record,
        }

    def save(self, path: str | os.PathLike) -> None:
        torch_save_atomic(self.to_dict(), path)


def load_learned(path: str | os.PathLike) -> LearnedModel:
    """A model file written by ``LearnedModel.save``; a missing, unreadable or foreign file raises LearnError."""
    path = Path(path)
    if not path.is_file():
        raise LearnError(f"learned segmentation model not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise LearnError(f"{path}: not a readable model file ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise LearnError(f"{path}: not a learned segmentation model (written by `medlsam learn`)")
    if data.get("version") != VERSION:
        raise LearnError(f"{path}: model file version {data.get('version')}, this medlsam reads version {VERSION}")
    try:
        options = LearnOptions.from_dict({**data["options"], "device": "auto"})  # it loads anywhere
        organs = [str(o) for o in data["organs"]]
        network = build_network(options, int(data["in_channels"]), len(organs))
        network.load_state_dict(data["state_dict"])
        choice = {str(k): str(v) for k, v in data["choice"].items()}
    except (KeyError, RuntimeError, TypeError) as exc:
        raise LearnError(f"{path}: damaged model file ({type(exc).__name__}: {str(exc)[:200]})") from None
    if set(choice) - set(organs) or set(choice.values()) - set(PATHS):
        raise LearnError(f"{path}: damaged model file (choice {choice} for organs {organs})")
    return LearnedModel(
        network=network.eval(),
        options=options,
        organs=organs,
        in_channels=int(data["in_channels"]),
        held_out=data.get("held_out", {}),
        choice=choice,
        prior_cuts={str(k): float(v) for k, v in data.get("prior_cuts", {}).items()},
        record=data.get("record", {}),
    )
