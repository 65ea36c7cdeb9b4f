"""Issue 29, the loop closing by itself, on a real `monailabel start_server` (`--conf learn_every 2`): saving final
labels queues the `segmentation` trainer once enough labels are new (not before three labels), a save while it runs
does not queue it again, a second request waits in the queue instead of running beside it, and DELETE /train/ stops
it midway leaving no model file, no half-written file and no training process; the server keeps serving."""

from __future__ import annotations

import json
import shutil
import time

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

pytestmark = pytest.mark.slow  # a real MONAI Label server

requests = pytest.importorskip("requests")


@pytest.fixture(scope="module")
def server(tmp_path_factory, data_dir):
    from monailabel.datastore.local import LocalDatastore

    folder = tmp_path_factory.mktemp("learnq")
    src, studies = folder / "src", folder / "studies"
    studies.mkdir()
    cases = {
        "kbp1": tiny_case(data_dir, 1, [1], src),
        "kbp2": tiny_case(data_dir, 2, None, src),
        "kbp3": tiny_case(data_dir, 3, [1, 4], src),
        "kbp4": tiny_case(data_dir, 1, [1, 4], src, name="kbp4"),
    }
    for name, (image, _) in cases.items():
        shutil.copy(image, studies / f"{name}.nii.gz")
    store = LocalDatastore(str(studies), extensions=("*.nii.gz",), auto_reload=False)
    store.save_label("kbp1", str(cases["kbp1"][1]), "final", label_info([1]))
    app = private_app(folder)
    port, log = free_port(), folder / "server.log"
    conf = {"models": "medlsam", "threads": "1", "adapt_on_save": "false", "learn_every": "2"}
    process = start_server(app, studies, port, conf, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(url, process, log=log)
        yield {"url": url, "app": app, "log": log, "pid": process.pid, "cases": cases}
    finally:
        stop_server(process)


def _save(server, image: str) -> None:
    with open(server["cases"][image][1], "rb") as handle:
        response = requests.put(
            f"{server['url']}/datastore/label",
            params={"image": image, "tag": "final"},
            data={"params": json.dumps(label_info([1, 4]))},
            files={"label": (f"{image}.nii.gz", handle, "application/gzip")},
            timeout=120,
        )
    assert response.status_code == 200, response.text


def test_saved_labels_queue_the_segmentation_trainer_and_delete_stops_it(server):
    _save(server, "kbp3")  # two final labels: too few to learn from, nothing queued
    time.sleep(2)
    assert train_tasks(server) == [], train_tasks(server)
    _save(server, "kbp4")  # three final labels, all new: the trainer is queued by the save itself
    running = wait_running(server, 120)
    assert running["request"]["model"] == "segmentation", running
    _save(server, "kbp4")  # saved again while it runs: still three labels, nothing new to queue
    time.sleep(2)
    assert [t["request"]["model"] for t in train_tasks(server)] == ["segmentation"], train_tasks(server)
    second = requests.post(f"{server['url']}/train/segmentation", params={"enqueue": "true"}, json={}, timeout=60)
    assert second.status_code == 200, second.text  # waits behind the running one
    time.sleep(2)
    assert len(training_processes(server)) == 1
    assert {t["status"] for t in train_tasks(server)} == {"RUNNING", "SUBMITTED"}, train_tasks(server)

    stop = requests.delete(f"{server['url']}/train/", timeout=60)
    assert stop.status_code == 200, stop.text
    assert [t["id"] for t in stop.json()["stopped"]] == [running["id"]], stop.json()
    assert [t["id"] for t in stop.json()["dropped"]] == [second.json()["id"]], stop.json()
    time.sleep(3)
    assert training_processes(server) == []
    model_dir = server["app"] / "model"
    assert not (model_dir / "segmentation.pt").exists()
    assert not [p for p in model_dir.rglob(".tmp-*")], list(model_dir.rglob(".tmp-*"))
    info = requests.get(f"{server['url']}/info/", timeout=30)
    assert info.status_code == 200 and info.json()["train_stats"]["segmentation"] == {}, info.text
