"""Issue 26 (unbounded work), the training side, probed as an outside client would on a real `monailabel
start_server`: a train option `device` this machine lacks is refused at submission (400 naming it), each trainer's
queue holds at most lib.train_queue.MAX_WAITING waiting trainings (one more: 429 naming the trainer and the limit,
also under concurrent requests), and DELETE /train/ stops the running training and drops every waiting one, which
never starts. One server for the module; the trainings it starts are killed within seconds.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from app_support import (
    free_port,
    label_info,
    private_app,
    start_server,
    stop_server,
    tiny_case,
    train_tasks,
    training_processes,
    wait_for_server,
    wait_running,
)
from medlsam.utils.devices import cuda_count

pytestmark = pytest.mark.slow  # a real MONAI Label server

requests = pytest.importorskip("requests")

MAX_WAITING = 2  # lib/train_queue.py (the app's lib is not importable here: checked against it below)
LONG = {"epochs": 1000, "iterations_per_epoch": 100000, "max_images": 1, "threads": 1, "init": "scratch"}
SHORT = {"epochs": 1, "iterations_per_epoch": 1, "batch_size": 1, "validation_pairs": 1, "max_images": 1}


@pytest.fixture(scope="module")
def server(tmp_path_factory, data_dir):
    from monailabel.datastore.local import LocalDatastore

    folder = tmp_path_factory.mktemp("queue")
    src, studies = folder / "src", folder / "studies"
    studies.mkdir()
    kbp1 = tiny_case(data_dir, 1, [1], src)
    kbp2 = tiny_case(data_dir, 2, None, src)
    shutil.copy(kbp1[0], studies / "kbp1.nii.gz")
    shutil.copy(kbp2[0], studies / "kbp2.nii.gz")
    store = LocalDatastore(str(studies), extensions=("*.nii.gz",), auto_reload=False)
    store.save_label("kbp1", str(kbp1[1]), "final", label_info([1]))
    app = private_app(folder)
    port, log = free_port(), folder / "server.log"
    conf = {"models": "medlsam", "threads": "1", "adapt_on_save": "false", "learn_every": "0"}
    process = start_server(app, studies, port, conf, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(url, process, log=log)
        yield {"url": url, "app": app, "log": log, "pid": process.pid}
    finally:
        stop_server(process)


def _train(server, model: str, options: dict | None = None, enqueue: bool = True, url: str | None = None):
    return requests.post(
        url or f"{server['url']}/train/{model}", params={"enqueue": str(enqueue).lower()}, json=options, timeout=60
    )


def _started(server) -> int:
    """Training subprocesses the server has started (MONAI Label logs each command)."""
    return sum("COMMAND::" in line and " -m train " in line for line in server["log"].read_text().splitlines())


def test_limit_is_the_apps(server):
    text = (server["app"] / "lib" / "train_queue.py").read_text()
    assert f"\nMAX_WAITING = {MAX_WAITING} " in text


def test_device_is_checked_at_submission(server):
    """cuda:99 (and cuda without CUDA, and gpus naming absent GPUs) are 400 naming the option; nothing starts."""
    bad = [("cuda:99", "CUDA")] + ([("cuda", "CUDA is not available")] if cuda_count() == 0 else [])
    for model in ("medlam", "lite_medsam"):
        for device, needle in bad:
            response = _train(server, model, {"device": device})
            assert response.status_code == 400, (model, device, response.text)
            detail = response.json()["detail"]
            assert "device" in detail and repr(device) in detail and needle in detail, detail
        response = _train(server, model, {"device": "gpu"})
        assert response.status_code == 400 and "device" in response.json()["detail"], response.text
        response = _train(server, model, {"device": "cpu", "gpus": "99"})
        assert response.status_code == 400 and "gpus" in response.json()["detail"], response.text
    response = _train(server, "", {"medlam": {"device": "cuda:99"}}, url=f"{server['url']}/train/")
    assert response.status_code == 400 and "cuda:99" in response.json()["detail"], response.text
    assert requests.get(f"{server['url']}/train/", timeout=30).status_code == 404  # nothing was queued
    assert _started(server) == 0


def test_queue_is_bounded_and_delete_drops_it(server):
    running = _train(server, "medlam", LONG)
    assert running.status_code == 200, running.text
    assert wait_running(server)["id"] == running.json()["id"]
    assert len(training_processes(server)) == 1

    queued = [_train(server, "medlam", SHORT) for _ in range(MAX_WAITING)]
    assert [r.status_code for r in queued] == [200] * MAX_WAITING, [r.text for r in queued]
    refused = _train(server, "medlam", SHORT)
    assert refused.status_code == 429, refused.text
    detail = refused.json()["detail"]
    assert "'medlam'" in detail and f"at most {MAX_WAITING}" in detail, detail
    # train-all would queue medlam too: refused as a whole, lite_medsam's queue left empty
    all_models = _train(server, "", {}, url=f"{server['url']}/train/")
    assert all_models.status_code == 429 and "'medlam'" in all_models.json()["detail"], all_models.text
    assert not [t for t in train_tasks(server) if t["request"]["model"] == "lite_medsam"]
    other = _train(server, "lite_medsam", {})  # each trainer has its own queue
    assert other.status_code == 200, other.text
    assert len(train_tasks(server)) == 2 + MAX_WAITING

    stop = requests.delete(f"{server['url']}/train/", timeout=60)
    assert stop.status_code == 200, stop.text
    answer = stop.json()
    waited = {r.json()["id"] for r in queued} | {other.json()["id"]}
    assert [t["id"] for t in answer["stopped"]] == [running.json()["id"]], answer
    assert {t["id"] for t in answer["dropped"]} == waited, answer
    assert {t["model"] for t in answer["dropped"]} == {"medlam", "lite_medsam"}
    assert "dropped 3" in answer["detail"], answer

    time.sleep(3)  # the worker is free: today it would start the next queued training now
    assert requests.get(f"{server['url']}/train/", params={"check_if_running": "true"}, timeout=30).status_code == 404
    status = {t["id"]: t["status"] for t in train_tasks(server)}
    assert status == {running.json()["id"]: "STOPPED", **{i: "DROPPED" for i in waited}}, status
    assert _started(server) == 1 and training_processes(server) == []
    stats = server["app"] / "model" / "train_stats.json"
    assert not stats.exists() or json.loads(stats.read_text()).get("status") != "done"
    assert not (server["app"] / "model" / "medlam.pt").exists()
    info = requests.get(f"{server['url']}/info/", timeout=30).json()
    assert info["train_stats"]["medlam"].get("status") in (None, "stopped"), info["train_stats"]

    empty = requests.delete(f"{server['url']}/train/", timeout=60)  # nothing left: says so
    assert empty.status_code == 200 and empty.json()["stopped"] == empty.json()["dropped"] == [], empty.text


def test_concurrent_enqueues_never_overshoot(server):
    running = _train(server, "medlam", LONG)
    assert running.status_code == 200, running.text
    wait_running(server)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: _train(server, "medlam", SHORT), range(8)))
    codes = sorted(r.status_code for r in answers)
    assert codes == [200] * MAX_WAITING + [429] * (8 - MAX_WAITING), [r.text for r in answers]
    answer = requests.delete(f"{server['url']}/train/", timeout=60).json()
    assert len(answer["stopped"]) == 1 and len(answer["dropped"]) == MAX_WAITING, answer
    time.sleep(2)
    assert requests.get(f"{server['url']}/train/", params={"check_if_running": "true"}, timeout=30).status_code == 404
    assert _started(server) == 2 and training_processes(server) == []


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
