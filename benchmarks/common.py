"""Shared benchmark helpers: the OpenKBP split, the fixed templates, report writing (the command line that
regenerates a report from a fresh clone)."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from medlsam.atlas.bank_builder import build_bank
from medlsam.atlas.templates import TemplateBank, load_bank
from medlsam.errors import TemplateError
from medlsam.paths import data_dir

ORGANS = ["Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx", "Mandible"]
RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parent.parent
RUNS = REPO / "runs" / "benchmarks"  # git-ignored: what a benchmark keeps between its runs
OUTSIDE = "<outside the clone>"  # how command_line names a path that a fresh clone does not have


def case_number(case_id: str) -> int:
    return int(case_id.rsplit("_", 1)[-1])


class OpenKBP:
    """The OpenKBP cases of dataset.json with image/label paths."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else data_dir() / "openkbp"
        meta = json.loads((self.root / "dataset.json").read_text())
        self.names = {int(k): v for k, v in meta["labels"].items()}
        self.values = {v: k for k, v in self.names.items()}
        self.cases = sorted(meta["cases"], key=lambda c: case_number(c["id"]))

    def image(self, case_id: str) -> Path:
        return self.root / "images" / f"{case_id}.nii.gz"

    def label(self, case_id: str) -> Path:
        return self.root / "labels" / f"{case_id}.nii.gz"

    def split(self, name: str) -> list[dict]:
        return [c for c in self.cases if c["split"] == name]

    def templates(self, count: int = 5) -> list[str]:
        """The protocol's templates: the first train cases, by case number, with all seven organs."""
        full = [c["id"] for c in self.split("train") if set(ORGANS) <= set(c["contoured"])]
        return full[:count]


def machine_line() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )


def mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def template_bank(
    data: "OpenKBP", model, templates: list[str], path: Path | None, localize_options=None
) -> TemplateBank:
    """The bank of these templates, calibrated with ``localize_options`` (the defaults when None); with `path`,
    reused from there when the same model made it from them."""
    if path is not None and path.is_file():
        try:
            bank = load_bank(path, model)
            if [Path(s).name for s in bank.sources] == [Path(data.image(t)).name for t in templates]:
                return bank
        except TemplateError:
            pass
    tic = time.perf_counter()
    images, labels = [data.image(c) for c in templates], [data.label(c) for c in templates]
    bank = build_bank(model, images, labels, data.names, localize_options=localize_options)
    print(f"bank of {len(templates)} templates built in {time.perf_counter() - tic:.1f} s", flush=True)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        bank.save(path)
    return bank


def portable_path(text: str) -> str:
    """A path as a fresh clone names it: relative to the clone's root inside it, ``../shared/data/...`` (or
    ``$MEDLSAM_DATA/...`` when the data lies elsewhere) inside the data folder, else ``<outside the clone>/NAME``."""
    path = Path(text).expanduser().resolve()
    data = data_dir().resolve()
    if path.is_relative_to(REPO):
        return path.relative_to(REPO).as_posix() or "."
    if path.is_relative_to(data):
        base = "../shared/data" if data == (REPO.parent / "shared" / "data").resolve() else "$MEDLSAM_DATA"
        inside = path.relative_to(data).as_posix()
        return base if inside == "." else f"{base}/{inside}"
    return f"{OUTSIDE}/{path.name}"


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", "~", "./", "../")) or os.sep in text or Path(text).exists()


def command_line(script: str, argv: list[str] | None = None) -> str:
    """``python SCRIPT ARGS`` as run (``argv``: default sys.argv[1:]) with machine-independent paths
    (``portable_path``); run from the clone's root it regenerates the report (unless it names a path outside it)."""
    words = []
    for word in sys.argv[1:] if argv is None else argv:
        if word.startswith("-"):
            option, equals, value = word.partition("=")
            if equals and _looks_like_path(value):
                word = f"{option}={portable_path(value)}"
        elif _looks_like_path(word):
            word = portable_path(word)
        words.append(shlex.quote(word))
    return " ".join(["python", script, *words])


def outside_note(command: str) -> str:
    """A sentence for a report whose command names a path outside the clone (else '')."""
    if OUTSIDE not in command:
        return ""
    return f" ({OUTSIDE}: a path of the machine it ran on; from a fresh clone, make or name one of your own)"
