"""The segmentation learner's runs for real: `medlsam learn --nproc 2` (torchrun, gloo) writes one loadable model,
a run killed with SIGKILL resumes from its checkpoint, a corrupt or foreign checkpoint is ignored with a warning,
and the ``device`` option fails clearly. Three real OpenKBP scans cut small and a tiny network; the few-shot
preparation of the CLI runs is made once per module and copied to each run."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from app_support import tiny_case
from medlsam.cli import main
from medlsam.io.volume import load_ct, read_volume
from medlsam.learn.checkpoint import CHECKPOINT, fingerprint, sweep_orphan_temps
from medlsam.learn.data import Example
from medlsam.learn.model import load_learned
from medlsam.learn.options import LearnError, LearnOptions, resolve_device
from medlsam.learn.trainer import learn
from medlsam.utils.devices import cuda_count

TINY = {
    "patch": [16, 32, 32],
    "filters": 4,
    "max_epochs": 2,
    "iterations_per_epoch": 2,
    "batch_size": 1,
    "validate_every": 1,
    "held_out_fraction": 0.34,
    "threads": 1,
    "device": "cpu",
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def paths(data_dir: Path, tmp_path_factory) -> dict:
    """The CLI's arguments for three real OpenKBP scans cut small (``app_support.tiny_case``: 64 x 64 in-plane,
    every second slice; all seven organs kept): images, labels, a names file."""
    folder = tmp_path_factory.mktemp("scans")
    cases = [tiny_case(data_dir, n, list(range(1, 8)), folder) for n in (1, 2, 3)]
    names = folder / "names.json"
    names.write_text(json.dumps(json.loads((data_dir / "openkbp" / "dataset.json").read_text())["labels"]))
    return {"images": [str(i) for i, _ in cases], "labels": [str(la) for _, la in cases], "names": str(names)}


def _command(paths: dict, out: Path, cache: Path, options: Path, *more: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "medlsam.cli",
        "learn",
        "--images",
        *paths["images"],
        "--labels",
        *paths["labels"],
        "--names",
        paths["names"],
        "--out",
        str(out),
        "--cache",
        str(cache),
        "--options",
        str(options),
        *more,
    ]


def _options_file(folder: Path, **changes) -> Path:
    path = folder / "options.json"
    path.write_text(json.dumps({**TINY, **changes}))
    return path


@pytest.fixture(scope="module")
def fewshot_cache(paths: dict, tmp_path_factory) -> Path:
    """A cache folder holding the few-shot preparation (banks, priors) of the three scans, made once by a tiny
    `medlsam learn` run and copied to each run."""
    cache = tmp_path_factory.mktemp("fewshot")
    work = tmp_path_factory.mktemp("prepare")
    done = subprocess.run(
        _command(paths, work / "m.pt", cache, _options_file(work, max_epochs=1)),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return cache


def _copy_cache(source: Path, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for path in source.glob("*"):
        if path.name.startswith(("label", "prior-")):  # one-template banks (the bank builder's), priors
            shutil.copy(path, target / path.name)
    return target


def _process_children() -> dict[int, list[int]]:
    """Parent pid -> the living processes it started (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return children


def _children(pid: int) -> list[int]:
    return sorted(_process_children().get(pid, []))


def _descendants(pid: int) -> list[int]:
    """Every living process below ``pid``."""
    children = _process_children()
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


# -- distributed, killed, resumed -------------------------------------------------------------------------


@pytest.mark.slow
def test_two_gloo_processes_train_and_write_one_loadable_model(paths, fewshot_cache, tmp_path):
    """Rank 0 prepares the few-shot path (here one bank is missing from the cache) while rank 1 waits, then
    reads it; both train; rank 0 writes the model."""
    cache = _copy_cache(fewshot_cache, tmp_path / "cache")
    sorted(cache.glob("label*.pt"))[0].unlink()
    out = tmp_path / "model.pt"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*torchrun, *_command(paths, out, cache, _options_file(tmp_path))[1:]],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    text = done.stdout + done.stderr
    assert "rank 1 of world size 2" in text and "backend gloo" in text, text[-3000:]
    assert text.count("one-template bank of") == 1, text[-3000:]  # made by rank 0 alone
    model = load_learned(out)
    assert text.count("held-out Dice learned") == len(model.organs)  # rank 0 alone reports
    assert model.record["world_size"] == 2 and model.record["iterations"] == 4
    assert model.record["resumed_from_epoch"] is None and model.record["device"] == "cpu"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "model.pt", "options.json"]
    assert not (cache / CHECKPOINT).exists() and not list(cache.glob(".tmp-*"))


def _wait_for(path: Path, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, "training ended before it could be killed"
        if path.exists():
            return
        time.sleep(0.05)
    raise TimeoutError(f"no {path} after {timeout} s")


def _killed_launcher_run(paths: dict, fewshot_cache: Path, folder: Path, kill) -> tuple[list[str], Path, list[int]]:
    """A long `medlsam learn --nproc 2` run in ``folder`` (the few-shot cache copied in): wait for its first
    checkpoint, call ``kill(launcher)``, then wait up to 60 s for every process of its tree to end. Returns its
    command (without ``--nproc``), its cache folder and the processes still alive (every one is killed in the end)."""
    cache = _copy_cache(fewshot_cache, folder / "cache")
    command = _command(paths, folder / "m.pt", cache, _options_file(folder, max_epochs=1000))
    with open(folder / "run.log", "w") as log:
        launcher = subprocess.Popen([*command, "--nproc", "2"], env=ENV, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_for(cache / CHECKPOINT, launcher, timeout=300)
            tree = _descendants(launcher.pid)
            assert len(tree) >= 3  # torchrun and its two ranks
            kill(launcher)
            deadline = time.time() + 60
            while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in tree):
                time.sleep(0.5)
            return command, cache, [p for p in tree if Path(f"/proc/{p}").exists()]
        finally:
            for pid in [launcher.pid, *_descendants(launcher.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _kill_launcher(launcher: subprocess.Popen) -> None:
    launcher.send_signal(signal.SIGKILL)
    launcher.wait(timeout=30)


def _kill_a_rank(launcher: subprocess.Popen) -> None:
    (torchrun,) = _children(launcher.pid)
    ranks = [r for r in _children(torchrun) if b"medlsam.cli" in Path(f"/proc/{r}/cmdline").read_bytes()]
    assert len(ranks) == 2
    os.kill(ranks[-1], signal.SIGKILL)
    assert launcher.wait(timeout=120) != 0


@pytest.mark.slow
def test_a_killed_launcher_leaves_no_rank_behind_and_one_process_resumes(paths, fewshot_cache, tmp_path):
    command, cache, left = _killed_launcher_run(paths, fewshot_cache, tmp_path, _kill_launcher)
    assert not left, f"orphaned processes {left}"
    stopped = int(torch.load(cache / CHECKPOINT, weights_only=True)["epoch"])
    assert stopped >= 1
    # one process resumes what two ranks began (max_epochs does not define the run)
    again = subprocess.run(
        [*command, "--max-epochs", str(stopped + 1)], env=ENV, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    model = load_learned(tmp_path / "m.pt")
    assert model.record["resumed_from_epoch"] == stopped and model.record["epochs"] == stopped + 1
    assert "world_size" not in model.record and not (cache / CHECKPOINT).exists()


@pytest.mark.slow
def test_a_rank_that_dies_ends_the_others(paths, fewshot_cache, tmp_path):
    _, _, left = _killed_launcher_run(paths, fewshot_cache, tmp_path, _kill_a_rank)
    assert not left, f"a rank outlived the run: {left}"
    assert not (tmp_path / "m.pt").exists()


# -- checkpoints in one process ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scans(paths):
    vols = [load_ct(p) for p in paths["images"]]
    labs = [read_volume(p) for p in paths["labels"]]
    names = {int(k): v for k, v in json.loads(Path(paths["names"]).read_text()).items()}
    priors = [{} for _ in vols]  # no prior channels: no MedLAM needed
    return vols, labs, names, priors


def _learn(scans, cache: Path, progress=None, **changes):
    vols, labs, names, priors = scans
    options = LearnOptions.from_dict({**TINY, "prior_channels": False, **changes})
    return learn(vols, labs, names, options, cache=cache, progress=progress, priors=priors)


class Stop(Exception):
    pass


def test_a_stopped_run_resumes_from_its_last_epoch(scans, tmp_path):
    def stop_at_2(entry: dict) -> None:
        if entry["epoch"] == 2:
            raise Stop

    with pytest.raises(Stop):
        _learn(scans, tmp_path, stop_at_2, max_epochs=3)
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["epoch"] == 2
    model = _learn(scans, tmp_path, max_epochs=3, time_limit_min=30, device="auto")  # neither defines the run
    assert model.record["resumed_from_epoch"] == 2 and model.record["iterations"] == 6
    assert [h["epoch"] for h in model.record["history"]] == [1, 2, 3]
    assert not (tmp_path / CHECKPOINT).exists()


def test_a_corrupt_or_foreign_checkpoint_is_ignored_with_a_warning(scans, tmp_path, caplog):
    (tmp_path / CHECKPOINT).write_bytes(b"half a checkpoint")
    with caplog.at_level(logging.WARNING, logger="medlsam.learn.checkpoint"):
        model = _learn(scans, tmp_path)
    assert "does not load" in caplog.text and model.record["resumed_from_epoch"] is None
    assert model.record["iterations"] == 4 and not (tmp_path / CHECKPOINT).exists()

    def stop(entry: dict) -> None:
        raise Stop

    with pytest.raises(Stop):
        _learn(scans, tmp_path, stop, seed=1)  # another run's checkpoint
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medlsam.learn.checkpoint"):
        model = _learn(scans, tmp_path)
    assert "belongs to another run" in caplog.text and model.record["resumed_from_epoch"] is None


def test_the_fingerprint_keys_what_defines_the_run():
    def ex(value: float, source: str = "a") -> Example:
        return Example(
            np.full((2, 4, 4, 4), value, np.float32), np.zeros((1, 4, 4, 4), np.uint8), np.ones(1, bool), None, source
        )

    base = LearnOptions(filters=4).to_dict()
    key = fingerprint(["Liver"], base, [ex(0.0)], [ex(1.0, "b")])
    same = {**base, "max_epochs": 3, "time_limit_min": 1.0, "threads": 1, "device": "cpu"}
    assert fingerprint(["Liver"], same, [ex(0.0)], [ex(1.0, "b")]) == key
    assert fingerprint(["Liver"], {**base, "seed": 1}, [ex(0.0)], [ex(1.0, "b")]) != key
    assert fingerprint(["Liver"], base, [ex(0.5)], [ex(1.0, "b")]) != key  # another label's content
    assert fingerprint(["Liver"], base, [ex(1.0, "b")], [ex(0.0)]) != key  # other scans held out
    assert fingerprint(["Spleen"], base, [ex(0.0)], [ex(1.0, "b")]) != key
    prior = ex(0.0)
    prior.inputs[1] += 1e-3  # a prior computed now or read back from the cache (float16)
    assert fingerprint(["Liver"], base, [prior], [ex(1.0, "b")]) == key


# -- the device option -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("device, message", [("gpu", "auto, cpu, cuda or cuda:N"), ("cpu:1", "device")])
def test_a_malformed_device_fails_clearly(device, message):
    with pytest.raises(LearnError, match=message):
        LearnOptions.from_dict({"device": device})


@pytest.mark.skipif(cuda_count() > 0, reason="CUDA is present here")
def test_cuda_on_a_machine_without_it_fails_naming_it(tmp_path, capsys, openkbp_case):
    with pytest.raises(LearnError, match="device 'cuda'.*CUDA is not available"):
        LearnOptions.from_dict({"device": "cuda"})
    with pytest.raises(LearnError, match="cuda:1"):
        LearnOptions(device="cuda:1")
    assert LearnOptions().device == "auto" and LearnOptions(device="CPU").device == "cpu"
    image, label = openkbp_case
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"1": "Brainstem"}))
    common = ["learn", "--images", str(image), str(image), "--labels", str(label), str(label), "--names", str(names)]
    assert main([*common, "--out", str(tmp_path / "m.pt"), "--device", "cuda"]) == 2
    assert "device 'cuda'" in capsys.readouterr().err and not (tmp_path / "m.pt").exists()


def test_several_processes_need_a_cache(tmp_path, capsys, openkbp_case):
    image, label = openkbp_case
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"1": "Brainstem"}))
    args = ["learn", "--images", str(image), "--labels", str(label), "--names", str(names), "--out", "m.pt"]
    assert main([*args, "--nproc", "2"]) == 2
    assert "--cache" in capsys.readouterr().err


def test_bf16_only_where_native_never_float16(monkeypatch):
    from medlsam.learn import predict

    monkeypatch.setattr(predict, "autocast_dtype", lambda requested, device: torch.float16)
    assert predict.autocast_for("cuda") is None  # a GPU without bfloat16 trains in float32
    monkeypatch.setattr(predict, "autocast_dtype", lambda requested, device: torch.bfloat16)
    assert predict.autocast_for("cpu") == torch.bfloat16
    assert resolve_device("auto") == ("cuda" if cuda_count() else "cpu")


def test_temporary_files_of_dead_writers_are_swept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f".tmp-{int(dead.stdout)}-abc.pt"
    living = tmp_path / f".tmp-{os.getpid()}-def.pt"
    for path in (orphan, living):
        path.write_bytes(b"partial")
    sweep_orphan_temps(tmp_path)
    assert not orphan.exists() and living.exists()
