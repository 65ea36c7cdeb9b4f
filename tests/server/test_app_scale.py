"""Issue 13 through a real server: batch inference over the datastore, and the training process tree
(workers in the trainer's own tree: DELETE /train/ stops them all, and killing the server leaves no orphan)."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from app_support import free_port, label_info, private_app, start_server, stop_server, tiny_case, wait_for_server

pytestmark = pytest.mark.slow  # a real MONAI Label server

psutil = pytest.importorskip("psutil")
requests = pytest.importorskip("requests")
THREADS = os.environ.get("MEDLSAM_TEST_THREADS", "1")
LONG_TRAIN = {
    "epochs": 1000,
    "iterations_per_epoch": 100000,
    "batch_size": 1,
    "validation_pairs": 1,
    "max_images": 2,
    "threads": 1,
    "init": "scratch",
    "base_channels": 2,
    "publish": "always",
    "processes": 2,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory, data_dir):
    import shutil

    from monailabel.datastore.local import LocalDatastore

    folder = tmp_path_factory.mktemp("scale")
    src = folder / "src"
    cases = {
        "kbp1": tiny_case(data_dir, 1, [1], src),
        "kbp2": tiny_case(data_dir, 2, None, src),
        "kbp3": tiny_case(data_dir, 3, None, src),
    }
    studies = folder / "studies"
    studies.mkdir()
    for name, (image, _) in cases.items():
        shutil.copy(image, studies / f"{name}.nii.gz")
    LocalDatastore(str(studies), extensions=("*.nii.gz",), auto_reload=False).save_label(
        "kbp1", str(cases["kbp1"][1]), "final", label_info([1])
    )
    app = private_app(folder)
    port = free_port()
    log = folder / "server.log"
    process = start_server(app, studies, port, {"models": "medlsam", "threads": THREADS, "adapt_on_save": "false"}, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(url, process, log=log)
        yield {"url": url, "process": process, "app": app, "studies": studies, "log": log}
    finally:
        stop_server(process)


def _poll(url: str, timeout: float) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = requests.get(url).json()
        if status.get("status") not in ("SUBMITTED", "RUNNING"):
            return status
        time.sleep(1)
    raise TimeoutError(f"{url} still running after {timeout} s")


@pytest.mark.slow
def test_batch_infer_labels_every_datastore_image(server):
    """POST /batch/infer/medlsam (MONAI Label's defaults: device cuda, multi_gpu) works on a CPU server."""
    url = server["url"]
    started = requests.post(f"{url}/batch/infer/medlsam?images=unlabeled", json={"max_workers": 1})
    assert started.status_code == 200, started.text
    status = _poll(f"{url}/batch/infer", 300)
    assert status["status"] == "DONE", (status, server["log"].read_text()[-3000:])
    listing = requests.get(f"{url}/datastore/?output=all").json()
    for image in ("kbp2", "kbp3"):  # the images without a final label
        assert "original" in listing["objects"][image]["labels"], listing["objects"][image]
    assert "original" not in listing["objects"]["kbp1"]["labels"]


@pytest.mark.slow
def test_three_templates_choose_each_organs_prior_cut(server, data_dir, tmp_path):
    """Two more templates saved through the API: the bank holds each of the three out in turn to choose the
    brainstem's prior cut (medlsam.atlas.calibration), reports it in templates.json and keeps it for that template
    set."""
    from medlsam.atlas.calibration import CUTS

    url = server["url"]
    for case in (2, 3):
        image, label = tiny_case(data_dir, case, [1], tmp_path, f"cut{case}")
        added = requests.put(
            f"{url}/datastore/image", params={"image": f"cut{case}"}, files={"file": (image.name, image.read_bytes())}
        )
        assert added.status_code == 200, added.text
        saved = requests.put(
            f"{url}/datastore/label",
            params={"image": f"cut{case}", "tag": "final"},
            data={"params": json.dumps(label_info([1]))},
            files={"label": (label.name, label.read_bytes())},
        )
        assert saved.status_code == 200, saved.text
    result = requests.post(
        f"{url}/infer/medlam", params={"image": "kbp2", "output": "json"}, data={"params": "{}"}, timeout=300
    )
    assert result.status_code == 200 and result.json()["templates"] == ["cut2", "cut3", "kbp1"], result.text
    organs = json.loads((server["app"] / "model" / "templates.json").read_text())["organs"]
    assert organs["Brainstem"]["templates"] == 3 and organs["Brainstem"]["prior_cut"] in CUTS, organs
    kept = list((server["app"] / "model" / "templates").glob("prior-cuts-*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text()) == {"Brainstem": organs["Brainstem"]["prior_cut"]}
    assert requests.get(f"{url}/info/").json()["template_bank"]["state"] == "ready"


def _tree(pid: int) -> list:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _cmdline(process) -> str:
    """The command line, or "" for a process that ended meanwhile (a zombie not yet reaped has none)."""
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def _trainers(server) -> list:
    return [p for p in _tree(server["process"].pid) if "monailabel.interfaces.utils.app" in _cmdline(p)]


def _wait_for_training(server, timeout: float = 150) -> list:
    """Until the lock of a running training exists and the trainer has its two worker processes."""
    lock = server["app"] / "model" / "medlam.lock"
    deadline = time.time() + timeout
    while time.time() < deadline:
        trainers = _trainers(server)
        if trainers and lock.is_file():
            workers = [c for c in _tree(trainers[0].pid) if "multiprocessing" in _cmdline(c)]
            if len(workers) >= 2:
                return [trainers[0], *_tree(trainers[0].pid)]
        time.sleep(1)
    raise TimeoutError(f"no running training after {timeout} s: {server['log'].read_text()[-3000:]}")


def _gone(processes: list, timeout: float) -> list:
    deadline = time.time() + timeout
    alive = processes
    while time.time() < deadline:
        alive = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return []
        time.sleep(0.5)
    return alive


@pytest.mark.slow
def test_training_workers_are_owned_stopped_and_never_orphaned(server):
    url, model_dir = server["url"], server["app"] / "model"
    # two processes (gloo) in the trainer's tree; DELETE /train/ stops every one of them
    assert requests.post(f"{url}/train/medlam", json=LONG_TRAIN).status_code == 200
    tree = _wait_for_training(server)
    assert json.loads((model_dir / "medlam.lock").read_text())["pid"] in [p.pid for p in tree]
    assert requests.delete(f"{url}/train/").status_code == 200
    assert not _gone(tree, 30), "DELETE /train/ left training processes running"
    # again, then the server dies without a word (SIGKILL): the training and its workers end with it
    assert requests.post(f"{url}/train/medlam", json=LONG_TRAIN).status_code == 200
    tree = _wait_for_training(server)
    os.kill(server["process"].pid, signal.SIGKILL)
    alive = _gone(tree, 30)
    for process in alive:  # clean up before failing
        process.kill()
    assert not alive, f"orphans after the server died: {[p.cmdline() for p in alive]}"


def test_conf_device_cuda_without_a_gpu_is_a_clear_error():
    """--conf device cuda on a machine without CUDA: the app refuses to start, saying why."""
    import subprocess
    import sys

    from app_support import APP_SOURCE
    from medlsam.utils.devices import cuda_count

    if cuda_count():
        pytest.skip("a GPU is present")
    code = (
        "from lib.models import Models\nfor d in ('cpu', 'CPU', 'cuda', 'cuda:1', 'gpu'):\n"
        "    try:\n        print(d, 'ok', Models('model', {'device': d}).device)\n"
        "    except Exception as e:\n        print(d, type(e).__name__, e)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=APP_SOURCE, capture_output=True, text=True, timeout=120, check=True
    )
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert lines["cpu"] == lines["CPU"] == "ok cpu"
    assert lines["cuda"].startswith("MedLSAMError") and "CUDA is not available" in lines["cuda"]
    assert "CUDA is not available" in lines["cuda:1"] and "cpu, cuda or cuda:N" in lines["gpu"]
