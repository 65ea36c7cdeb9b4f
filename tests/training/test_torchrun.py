"""torch.distributed for real: two gloo processes reach the weights of one process with the combined batch, and a
torchrun run killed midway resumes as one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medlsam.medlam.network import MedLAMConfig

TESTS = Path(__file__).resolve().parents[1]  # tests/, where ddp_steps.py lives
TINY = MedLAMConfig(base_channels=2, patch_size=(32, 32, 32))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture
def scans(phantom_scans) -> list[Path]:
    return phantom_scans


# -- shards, seeds, batches -----------------------------------------------------------------------------


@pytest.mark.slow
def test_two_gloo_processes_reach_the_weights_of_one_process_with_the_combined_batch(scans, tmp_path):
    """2 steps of DDP (2 ranks x 1 sample) vs one process (2 samples), same global batches, float64."""
    common = [str(TESTS / "ddp_steps.py"), "--scans", *map(str, scans[:2]), "--steps", "2", "--global-batch", "2"]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            *common,
            "--out",
            str(tmp_path / "two.pt"),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, *common, "--out", str(tmp_path / "one.pt")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    a, b, start = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("one", "two", "one-start"))
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    differ = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert moved > 1e-4  # the steps did change the weights
    assert differ < 1e-9 * max(1.0, moved), (differ, moved)


def _wait_for_epoch(path: Path, epoch: int, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, "training ended before it could be interrupted"
        try:
            if json.loads(path.read_text())["epoch"] >= epoch:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.3)
    raise TimeoutError(f"no epoch {epoch} in {path} after {timeout} s")


@pytest.mark.slow
def test_distributed_run_killed_midway_resumes_as_one_process(scans, tmp_path):
    """`medlsam train --nproc 2` stopped by SIGTERM after epoch 2 leaves its checkpoint; one process resumes it
    (another world size) to the end, and the lock of the dead run does not block it."""
    out = tmp_path / "medlam.pt"
    common = [
        "-m",
        "medlsam.cli",
        "train",
        "--images",
        *map(str, scans),
        "--out",
        str(out),
        "--base-channels",
        "2",
        "--patch-size",
        "32",
        "--iterations-per-epoch",
        "2",
        "--batch-size",
        "1",
        "--seed",
        "3",
        "--cache",
        str(tmp_path / "cache"),
    ]
    log = open(tmp_path / "dist.log", "w")
    run = subprocess.Popen(
        [sys.executable, *common, "--epochs", "200", "--nproc", "2"], env=ENV, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        _wait_for_epoch(tmp_path / "train_stats.json", 2, run, timeout=180)
        run.send_signal(signal.SIGTERM)
        run.wait(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
        log.close()
    text = (tmp_path / "dist.log").read_text()
    assert "rank 1 of world size 2" in text and "backend gloo" in text, text[-2000:]
    state = torch.load(tmp_path / "medlam.state.pt", weights_only=True)
    stopped_at = int(state["epoch"])
    assert 2 <= stopped_at < 200
    assert not list(tmp_path.glob(".tmp-*")), "a partial checkpoint was left behind"
    resumed = subprocess.run(
        [sys.executable, *common, "--epochs", str(stopped_at + 1), "--resume", str(tmp_path / "medlam.state.pt")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "single process" in resumed.stdout
    stats = json.loads((tmp_path / "train_stats.json").read_text())
    assert stats["status"] == "finished" and stats["epoch"] == stopped_at + 1
    assert [r["epoch"] for r in stats["history"]] == list(range(1, stopped_at + 2))
    assert stats["history"][0]["world_size"] == 2 and "world_size" not in stats["history"][-1]


# -- lock, devices, launcher ------------------------------------------------------------------------------
