"""Issue 15, probed as an outside client would: a real `monailabel start_server` on a private app copy.

Every attack is refused with the right 4xx; afterwards no file appeared outside the datastore, the app's
weights are byte-identical, /info/ answers 200 and the good template still serves. One server, shared with
test_security_round_two.py (tests/server/conftest.py).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from security_support import (
    infer,
    put_label,
    temporary_files,
    unchanged,
)

from app_support import app_modules, label_info, private_app, tiny_case
from medlsam.io.volume import read_volume, write_volume

pytestmark = pytest.mark.slow  # a real MONAI Label server

requests = pytest.importorskip("requests")


@pytest.fixture(scope="module")
def server(security_server):
    return security_server


def test_info_and_templates_survive_junk_labels_saved_before(server):
    """Five newer junk final labels (one with idx "abc") neither break /info/ nor crowd out the good template."""
    info = requests.get(f"{server['url']}/info/", timeout=30).json()
    assert info["models"]["medlsam"]["labels"]["Brainstem"] == 1
    assert info["train_stats"]["medlam"]["status"] == "stopped"  # a "running" left by a killed run
    result = infer(server, "medlam", "kbp2")
    assert result.status_code == 200, result.text
    assert result.json()["templates"] == ["kbp1"] and result.json()["boxes"]["Brainstem"]["found"]
    assert "/" not in result.json()["medlam"]["path"] and str(server["folder"]) not in result.text  # no server path
    unchanged(server)


def test_infer_reads_only_datastore_images(server):
    outside_ct = str(server["files"]["kbp2"][0])  # a real CT, outside the datastore
    answers = []
    for image in (outside_ct, "/etc/passwd", "/etc/nonexistent", "../studies/kbp2", "kbp2/../kbp2"):
        response = infer(server, "sam", image, {"foreground": [[32, 34, 8]]})
        assert response.status_code == 404, (image, response.text)
        answers.append(response.json()["detail"].replace(image, "<id>"))
        via_params = infer(server, "sam", "kbp2", {"image": image, "foreground": [[32, 34, 8]]})
        assert via_params.status_code == 404, (image, via_params.text)
    assert len(set(answers)) == 1  # existing and missing files answer alike
    upload = requests.post(
        f"{server['url']}/infer/sam",
        data={"params": "{}"},
        files={"file": ("x.nii.gz", Path(outside_ct).read_bytes())},
        timeout=60,
    )
    assert upload.status_code == 400 and "file" in upload.json()["detail"]
    unchanged(server)


def test_uploads_cannot_leave_the_datastore(server):
    url, app, ct = server["url"], server["app"], server["files"]["kbp2"][0].read_bytes()
    temporary = temporary_files(server)
    escaped = requests.put(
        f"{url}/datastore/", params={"image": "../escaped_img"}, files={"file": ("x.nii.gz", ct)}, timeout=60
    )
    assert escaped.status_code == 400 and "image id" in escaped.json()["detail"], escaped.text
    script = requests.put(f"{url}/datastore/image", params={"image": "evil"}, files={"file": ("evil.sh", b"#!")})
    assert script.status_code == 400, script.text
    not_ct = requests.put(f"{url}/datastore/image", params={"image": "notct"}, files={"file": ("n.nii.gz", b"x")})
    assert not_ct.status_code == 400 and "/tmp" not in not_ct.text and "/" not in not_ct.json()["detail"], not_ct.text
    existing = requests.put(f"{url}/datastore/image", params={"image": "kbp1"}, files={"file": ("k.nii.gz", ct)})
    assert existing.status_code == 409, existing.text  # a template's image is not silently replaced
    for tag in (str(server["folder"] / "outside"), str(app / "model"), "../../outside", "final/../../x"):
        response = put_label(server, "kbp2", server["files"]["kbp1"][1], label_info([1]), tag=tag, name="medlam.pt")
        assert response.status_code == 400 and "tag" in response.json()["detail"], (tag, response.text)
    weights = requests.put(f"{url}/model/medlsam", files={"file": ("medlam.pt", b"junk")}, timeout=30)
    assert weights.status_code == 403, weights.text
    assert not list((server["folder"] / "outside").iterdir()) and not (app / "model" / "medlam.pt").exists()
    assert temporary_files(server) == temporary  # each refused upload's temporary copy is removed
    unchanged(server)


def test_bad_labels_are_refused_and_nothing_is_written(server):
    junk, good = server["files"]["junk"], server["files"]["kbp3"][1]
    temporary = temporary_files(server)
    cases = [  # (image, label file, label_info, what the refusal names); junk/* are on kbp2's (= lat's) grid
        ("kbp3", good, {"label_info": [{"name": "Brainstem", "idx": "abc"}]}, "idx"),
        ("kbp3", good, {"label_info": [{"name": "Brainstem", "idx": 1}, {"name": "Brainstem", "idx": 2}]}, "twice"),
        ("kbp3", good, {"label_info": [{"name": "", "idx": 1}]}, "name"),
        ("kbp3", good, {"label_info": [{"name": "Liver", "idx": 5}]}, "no entry in label_info"),
        ("kbp3", server["files"]["kbp3"][0], label_info([1]), "values"),  # the CT itself (negative HU)
        ("kbp3", junk / "zeros.nii.gz", label_info([1]), "grid"),  # another image's grid
        ("lat", junk / "zeros.nii.gz", label_info([1]), "empty"),
        ("lat", junk / "ones.nii.gz", label_info([1]), "cover"),
        ("lat", junk / "ct.nii.gz", label_info([1]), "distinct values"),
        ("lat", junk / "small.nii.gz", label_info([1]), "shape"),
        ("lat", junk / "text.nii.gz", label_info([1]), "cannot be read"),
    ]
    for image, file, info, needle in cases:
        response = put_label(server, image, file, info)
        assert response.status_code == 400 and needle in response.json()["detail"], (file.name, info, response.text)
    assert not list(server["studies"].glob("labels/final/kbp3*")) and not list(
        server["studies"].glob("labels/final/lat*")
    )
    unknown = put_label(server, "nosuch", good, label_info([1]))
    assert unknown.status_code == 404, unknown.text
    relabel = requests.put(
        f"{server['url']}/datastore/label/info",
        params={"label": "kbp1", "tag": "final"},
        data={"info": json.dumps({"label_info": [{"name": "X", "idx": "abc"}]})},
        timeout=30,
    )
    assert relabel.status_code == 400, relabel.text
    assert temporary_files(server) == temporary  # no refused label left a temporary copy behind
    planted = infer(server, "medlam", "kbp2", {"save_label": True, "label_tag": "final"})
    assert planted.status_code == 400 and "label_tag" in planted.json()["detail"], planted.text
    assert not list(server["studies"].glob("labels/final/kbp2*"))
    served = infer(server, "medlam", "kbp2")
    assert served.status_code == 200 and served.json()["templates"] == ["kbp1"], served.text
    unchanged(server)


@pytest.mark.parametrize(
    "model,params,needle",
    [
        ("sam_3d", {"foreground": [[32, 34, 8]], "min_iou": "NaN"}, "min_iou"),
        ("sam_3d", {"foreground": [[32, 34, 8]], "max_slices": -5}, "max_slices"),
        ("medlam", {"refine": "maybe"}, "refine"),
        ("sam", {"foreground": [[32, 34, 8], [30, 30, 9]]}, "one slice"),
        ("medlam", {"result_dtype": "complex64"}, "result_dtype"),
    ],
)
def test_bad_infer_parameters_are_400(server, model, params, needle):
    response = infer(server, model, "kbp2", params)
    assert response.status_code == 400 and needle in response.json()["detail"], response.text


def test_bad_requests_are_400_naming_the_parameter(server):
    url = server["url"]
    for raw, needle in (("not json", "params"), ("[1, 2]", "params")):
        response = requests.post(f"{url}/infer/sam", params={"image": "kbp2"}, data={"params": raw}, timeout=30)
        assert response.status_code == 400 and needle in response.json()["detail"], response.text
        label = requests.put(
            f"{url}/datastore/label",
            params={"image": "kbp3"},
            data={"params": raw},
            files={"label": ("l.nii.gz", b"x")},
            timeout=30,
        )
        assert label.status_code == 400 and needle in label.json()["detail"], label.text
    assert requests.delete(f"{url}/datastore/", params={"id": "nosuch"}, timeout=30).status_code == 404
    assert requests.delete(f"{url}/datastore/label", params={"id": "kbp2", "tag": "final"}).status_code == 404
    for options, needle in (
        ({"epochs": -1}, "epochs"),
        ({"epochs": 10**9}, "epochs"),
        ({"epochs": "abc"}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"epoch": 2}, "accepted"),
    ):
        response = requests.post(f"{url}/train/medlam", json=options, timeout=30)
        assert response.status_code == 400 and needle in response.json()["detail"], (options, response.text)
    assert requests.post(f"{url}/train/nosuch", json={}, timeout=30).status_code == 404
    assert requests.get(f"{url}/train/", timeout=30).status_code == 404  # nothing was started
    unchanged(server)


def test_info_answers_while_medlsam_runs(server):
    """/info/ keeps answering while an inference of a fresh image runs (several answers during it: a server
    blocked by the inference would answer once, after it)."""
    result = {}

    def run():
        tic = time.perf_counter()
        result["response"] = infer(server, "medlsam", "lat", {"prior_weight": 0})
        result["seconds"] = time.perf_counter() - tic

    worker = threading.Thread(target=run)
    worker.start()
    time.sleep(0.5)
    answered = 0
    while worker.is_alive():
        assert requests.get(f"{server['url']}/info/", timeout=60).status_code == 200
        answered += worker.is_alive()  # answered while the inference still ran
        time.sleep(0.2)
    worker.join()
    assert result["response"].status_code == 200, result["response"].text
    assert str(server["folder"]) not in result["response"].text
    assert answered >= 3, f"/info/ answered {answered} times during the inference ({result['seconds']:.1f} s)"
    log = server["log"].read_text()
    assert "medlsam image=lat done in" in log and "encode" in log


def test_label_values_beyond_uint8_are_not_wrapped(server):
    label = read_volume(server["files"]["kbp3"][1])
    jaw = server["folder"] / "src" / "jaw.nii.gz"
    write_volume(np.where(label.array == 1, 300, 0).astype(np.uint16), label, jaw)
    saved = put_label(server, "kbp3", jaw, {"label_info": [{"name": "Jaw", "idx": 300}]})
    assert saved.status_code == 200, saved.text
    response = requests.post(
        f"{server['url']}/infer/medlam",
        params={"image": "kbp2", "output": "image"},
        data={"params": json.dumps({"result_dtype": "uint8", "organs": ["Jaw"]})},
        timeout=300,
    )
    assert response.status_code == 200, response.text
    path = server["folder"] / "jaw_result.nii.gz"
    path.write_bytes(response.content)
    values = set(np.unique(read_volume(path).array).tolist())
    path.unlink()
    assert values == {0, 300}, values


def test_a_bad_published_model_is_set_aside(server):
    model = server["app"] / "model"
    from medlsam.paths import SHIPPED_MEDLAM

    shipped = SHIPPED_MEDLAM.read_bytes()
    (model / "medlam.pt").write_bytes(shipped[: len(shipped) // 2])  # a truncated publication
    response = infer(server, "medlam", "kbp2")
    assert response.status_code == 200, response.text
    assert response.json()["medlam"]["path"] == "pretrained_medlam.pt"
    assert not (model / "medlam.pt").exists() and (model / "medlam.pt.rejected").is_file()
    assert "set aside as medlam.pt.rejected" in server["log"].read_text()


def test_a_failed_training_ends_failed(server, tmp_path):
    """Training that fails writes status "failed" with the error (in process: no subprocess needed)."""
    from monailabel.datastore.local import LocalDatastore

    with app_modules(server["app"]):
        from lib.models import Models
        from lib.trainers.medlam import MedLAMTrainer

        trainer = MedLAMTrainer(Models(tmp_path, {}))
        empty = LocalDatastore(str(tmp_path / "empty"), extensions=("*.nii.gz",), auto_reload=False)
        with pytest.raises(Exception, match="no usable CT"):
            trainer({"epochs": 1}, empty)
        stats = json.loads((tmp_path / "train_stats.json").read_text())
        assert stats["status"] == "failed" and "no usable CT" in stats["error"]


class _FakeDatastore:
    """get_labeled_images & co. over a dict {id: ts}; every id has a final label (files from `files`)."""

    def __init__(self, files: tuple[Path, Path], stamps: dict[str, int]):
        self.files, self.stamps = files, stamps

    def get_labeled_images(self):
        return list(self.stamps)

    def get_label_uri(self, image_id, tag):
        return str(self.files[1])

    def get_image_uri(self, image_id):
        return str(self.files[0])

    def get_label_info(self, image_id, tag):
        return {"label_info": [{"name": "Brainstem", "idx": 1}], "ts": self.stamps[image_id]}


def test_a_bank_build_for_outdated_labels_is_cancelled(tmp_path, data_dir, monkeypatch):
    """A build whose templates changed stops at the next template, and /info/'s names never wait for it."""
    app = private_app(tmp_path)
    files = tiny_case(data_dir, 1, [1], tmp_path / "src")
    with app_modules(app):
        from lib.models import Models
        from lib.template_source import NoTemplatesError, TemplateSource
        from medlsam.atlas.bank_builder import BankBuilder
        from medlsam.errors import TemplateError

        datastore = _FakeDatastore(files, {"a": 3, "b": 2, "c": 1})
        store = TemplateSource(Models(app / "model", {}), app / "model", lambda: datastore, 5)
        calls = []

        def slow_template(builder, template):
            calls.append(template.id)
            time.sleep(1.0)
            raise TemplateError(f"{template.id}: not usable")

        monkeypatch.setattr(BankBuilder, "template_bank", slow_template)
        first = {}
        worker = threading.Thread(target=lambda: first.setdefault("error", _raises(store.bank)))
        worker.start()
        time.sleep(0.3)
        datastore.stamps = {"d": 4}  # the labels changed: the running build is outdated
        assert store.label_names() == {"Brainstem": 1}
        assert worker.is_alive()  # the names came while the outdated build still ran: they never wait for it
        with pytest.raises(NoTemplatesError):
            store.bank()
        worker.join(timeout=10)
        assert isinstance(first["error"], NoTemplatesError)
        assert calls[0] == "a" and "b" not in calls and "c" not in calls, calls  # stopped after its first template


def _raises(function):
    try:
        function()
    except Exception as exc:  # noqa: BLE001
        return exc
    return None
