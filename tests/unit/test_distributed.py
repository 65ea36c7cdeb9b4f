"""torch.distributed MedLAM training on CPU (gloo): DDP equals one process with the combined batch, shards,
seeds, DataLoader workers, the training lock, devices, and a distributed run killed midway resumed alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medlsam.errors import MedLSAMError
from medlsam.medlam.network import MedLAMConfig
from medlsam.medlam.patches import body_voxels, cached_grid_array
from medlsam.medlam.sampling import TrainingBatches, split_batch
from medlsam.utils.devices import check_device, cuda_count, device_choices
from medlsam.utils.distributed import TrainingLock, epoch_shard, rank_seed, strip_option

TESTS = Path(__file__).resolve().parents[1]  # tests/, where ddp_steps.py lives
TINY = MedLAMConfig(base_channels=2, patch_size=(32, 32, 32))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture
def scans(phantom_scans) -> list[Path]:
    return phantom_scans


# -- shards, seeds, batches -----------------------------------------------------------------------------


@pytest.mark.parametrize("count,world", [(7, 2), (8, 4), (3, 3), (5, 1)])
def test_epoch_shards_are_disjoint_and_cover_every_scan(count, world):
    for epoch in range(3):
        shards = [epoch_shard(count, 11, epoch, rank, world) for rank in range(world)]
        joined = np.concatenate(shards)
        assert sorted(joined.tolist()) == list(range(count))  # disjoint and complete
    if count > world > 1:  # a new split every epoch
        first = epoch_shard(count, 11, 0, 0, world)
        assert any(not np.array_equal(first, epoch_shard(count, 11, e, 0, world)) for e in range(1, 5))


def test_rank_seeds_differ_by_rank_and_epoch_and_repeat():
    seeds = {rank_seed(2023, e, r) for e in range(3) for r in range(4)}
    assert len(seeds) == 12 and rank_seed(2023, 1, 2) == rank_seed(2023, 1, 2) < 2**63


def test_loader_workers_give_exactly_the_in_process_batches(scans, tmp_path):
    arrays = [cached_grid_array(p, tmp_path, mmap=True) for p in scans]
    bodies = [body_voxels(a.astype(np.float32)) for a in arrays]
    batches = TrainingBatches(arrays, bodies, 32, 4, 2, 8, iterations=4, seed=5, rank=1, world_size=2)
    batches.set_epoch(3)
    inline = list(batches.loader(0))
    workers = list(batches.loader(2))
    assert len(inline) == len(workers) == 4
    for a, b in zip(inline, workers):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(inline[0]["query"], inline[1]["query"])
    half = split_batch(inline[0], 1, 2)
    assert torch.equal(half["source"], inline[0]["source"][1:])


# -- DDP ------------------------------------------------------------------------------------------------


def test_training_lock_refuses_a_second_training(tmp_path):
    lock = TrainingLock(tmp_path / "medlam.lock").acquire()
    assert json.loads((tmp_path / "medlam.lock").read_text())["pid"] == os.getpid()
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from medlsam.utils.distributed import TrainingLock\n"
            "try:\n    TrainingLock(sys.argv[1]).acquire()\nexcept Exception as e:\n"
            "    print(e); sys.exit(3)",
            str(tmp_path / "medlam.lock"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 3 and "another training is running" in probe.stdout
    lock.release()
    assert not (tmp_path / "medlam.lock").exists()
    TrainingLock(tmp_path / "medlam.lock").acquire().release()


def test_trainer_holds_the_lock_while_it_runs(scans, tmp_path):
    from medlsam.medlam.training import Trainer, TrainOptions

    with TrainingLock(tmp_path / "medlam.lock"):
        trainer = Trainer(
            scans,
            tmp_path / "medlam.pt",
            TINY,
            TrainOptions(epochs=1, iterations_per_epoch=1, batch_size=1, mss_points=4),
        )
        with pytest.raises(MedLSAMError, match="another training is running"):
            trainer.run()
    assert not (tmp_path / "medlam.pt").exists()


def test_device_strings():
    assert check_device("cpu") == check_device("CPU ") == "cpu"
    for bad in ("gpu", "cuda:x", "cpu:1", ""):
        with pytest.raises(MedLSAMError, match="device"):
            check_device(bad)
    if cuda_count() == 0:
        assert device_choices() == ["cpu"]
        for name in ("cuda", "cuda:0"):
            with pytest.raises(MedLSAMError, match="CUDA is not available"):
                check_device(name)
    else:
        assert check_device("cuda:0") == "cuda:0" and f"cuda:{cuda_count() - 1}" in device_choices()
        with pytest.raises(MedLSAMError, match="visible"):
            check_device(f"cuda:{cuda_count()}")


def test_cli_refuses_cuda_without_a_gpu(scans, tmp_path, capsys):
    from medlsam.cli import main

    if cuda_count():
        pytest.skip("a GPU is present")
    assert main(["train", "--images", str(scans[0]), "--out", str(tmp_path / "m.pt"), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_strip_option():
    assert strip_option(["train", "--nproc", "2", "--out", "x"], "--nproc") == ["train", "--out", "x"]
    assert strip_option(["--nproc=4", "a"], "--nproc") == ["a"]
