"""The app through a real `monailabel start_server`, as Slicer's and OHIF's clients use it: no template (a clear error),
a saved label, Slicer's and OHIF's response styles, a bad request, background MedLAM training polled to completion
and the published model used without a restart."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from app_support import (
    TINY_TRAIN,
    app_datastore,
    app_images,
    free_port,
    label_info,
    private_app,
    start_server,
    stop_server,
    wait_for_server,
)
from medlsam.io.volume import read_volume

pytestmark = pytest.mark.slow  # a real MONAI Label server

THREADS = os.environ.get("MEDLSAM_TEST_THREADS", "1")


def test_real_server_slicer_ohif_and_background_training(tmp_path, data_dir):
    import requests
    from monailabel.client import MONAILabelClient
    from monailabel.client.client import MONAILabelClientException

    images = app_images(data_dir, tmp_path)
    studies = app_datastore(tmp_path, {k: images[k] for k in ("kbp1", "kbp2")}, [])  # no template yet
    app_dir = private_app(tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    server = start_server(app_dir, studies, port, {"models": "medlsam", "threads": THREADS}, log)
    try:
        wait_for_server(url, server, log=log)
        client = MONAILabelClient(url, tmpdir=str(tmp_path))
        # no template: a clear error, and the server keeps serving
        with pytest.raises(MONAILabelClientException) as error:
            client.infer("medlsam", "kbp2", {})
        assert "save a final label" in str(error.value.msg)
        # Slicer's "submit label": multipart with label_info; the bank is rebuilt for the next inference
        client.save_label("kbp1", str(images["kbp1"][1]), tag="final", params=label_info([1]))
        # Slicer: multipart, .nrrd, uint8
        result_file, params = client.infer(
            "medlsam", "kbp2", {"result_extension": ".nrrd", "result_dtype": "uint8", "organs": ["Brainstem"]}
        )
        assert params["label_names"] == client.info()["models"]["medlsam"]["labels"] == {"Brainstem": 1}
        label = read_volume(result_file).array
        assert label.shape == (64, 64, 24) and label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1}
        # OHIF: output=image
        ohif = requests.post(
            f"{url}/infer/medlsam?image=kbp2&output=image",
            data={"params": json.dumps({"result_extension": ".nrrd", "result_dtype": "uint8"})},
        )
        assert ohif.status_code == 200 and len(ohif.content) > 100
        # bad input over HTTP, then still serving
        bad = requests.post(f"{url}/infer/sam?image=kbp2", data={"params": json.dumps({"foreground": [[99, 0, 0]]})})
        assert bad.status_code == 400 and "outside the image" in bad.json()["detail"]
        # background training through /train/, polled to completion as the clients do
        started = requests.post(f"{url}/train/medlam", json=TINY_TRAIN)
        assert started.status_code == 200, started.text
        deadline = time.time() + 1200  # a generous ceiling: the trainer's state decides, not a time budget
        while time.time() < deadline:
            status = requests.get(f"{url}/train/").json()
            if status["status"] not in ("SUBMITTED", "RUNNING"):
                break
            time.sleep(2)
        assert status["status"] == "DONE", status
        assert (app_dir / "model" / "medlam.pt").is_file()
        assert client.info()["train_stats"]["medlam"]["epoch"] == 1
        # the next inference uses the published model and a rebuilt bank, without a restart
        _, boxes = client.infer("medlam", "kbp2", {})
        assert boxes["medlam"]["path"] == "medlam.pt"
        assert (
            json.loads((app_dir / "model" / "templates.json").read_text())["medlam_fingerprint"]
            == boxes["medlam"]["fingerprint"]
        )
    finally:
        stop_server(server)
    assert server.poll() is not None
