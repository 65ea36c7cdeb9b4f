"""The `edit` task (deepedit) through a real MONAI Label server: Slicer's DeepEdit click form and the
foreground/background + label form correct the last auto-segmentation, and bad clicks are clear 400s that leave
the server serving and the saved labels untouched.

Tiny real inputs (OpenKBP scans cropped to 64 x 64 in-plane, every second slice; one template organ, the
brainstem), the real models (shipped MedLAM), a private copy of the app."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from app_support import free_port, label_info, private_app, start_server, stop_server, tiny_case, wait_for_server
from medlsam.io.volume import read_volume, write_volume

pytestmark = pytest.mark.slow  # a real MONAI Label server

THREADS = os.environ.get("MEDLSAM_TEST_THREADS", "1")


def _post(url: str, model: str, image: str, params: dict, files: dict | None = None):
    import requests

    return requests.post(
        f"{url}/infer/{model}?image={image}&output=json", data={"params": json.dumps(params)}, files=files, timeout=600
    )


def _label(url: str, image: str, params: dict, folder) -> tuple[np.ndarray, dict]:
    """The label and params of a Slicer-style (multipart) request."""
    import requests
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    response = requests.post(f"{url}/infer/edit?image={image}", data={"params": json.dumps(params)}, timeout=600)
    assert response.status_code == 200, response.text
    result, content = None, None
    for part in MultipartDecoder(response.content, response.headers["content-type"]).parts:
        if b'name="params"' in part.headers[b"Content-Disposition"]:
            result = json.loads(part.content)
        else:
            content = part.content
    path = folder / f"edit-{len(list(folder.iterdir()))}.nii.gz"
    path.write_bytes(content)
    return read_volume(path).array, result


@pytest.fixture(scope="module")
def server(tmp_path_factory, data_dir):
    """A real server on a datastore with one template (kbp1's brainstem) and kbp2 auto-segmented once."""
    from monailabel.datastore.local import LocalDatastore

    tmp_path = tmp_path_factory.mktemp("edit")
    src = tmp_path / "src"
    kbp1, kbp2 = tiny_case(data_dir, 1, [1], src), tiny_case(data_dir, 2, [1], src)
    studies = tmp_path / "studies"
    studies.mkdir()
    for name, (image, _) in {"kbp1": kbp1, "kbp2": kbp2}.items():
        (studies / f"{name}.nii.gz").write_bytes(image.read_bytes())
    store = LocalDatastore(str(studies), extensions=("*.nii.gz",), auto_reload=False)
    store.save_label("kbp1", str(kbp1[1]), "final", label_info([1]))
    saved = studies / "labels" / "final" / "kbp1.nii.gz"
    app_dir = private_app(tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    conf = {
        "models": "medlsam",
        "threads": THREADS,
        "adapt_on_save": "false",
        "learn_every": "0",
    }  # no background adaptation
    process = start_server(app_dir, studies, port, conf, log)
    folder = tmp_path / "results"
    folder.mkdir()
    try:
        wait_for_server(url, process, log=log)
        auto = _post(url, "medlsam", "kbp2", {"prior_weight": 1})  # the auto-segmentation the edit starts from
        assert auto.status_code == 200, auto.text
        truth = read_volume(kbp2[1]).array == 1
        yield {
            "url": url,
            "folder": folder,
            "truth": truth,
            "missed": np.argwhere(truth)[len(np.argwhere(truth)) // 2],  # a brainstem voxel
            "image": kbp2[0],
            "saved": saved,
            "saved_bytes": saved.read_bytes(),
            "tmp": tmp_path,
        }
    finally:
        stop_server(process)


def test_info_describes_edit_as_deepedit(server):
    import requests

    info = requests.get(f"{server['url']}/info/", timeout=60).json()["models"]["edit"]
    assert info["type"] == "deepedit" and info["dimension"] == 3 and info["labels"] == {"Brainstem": 1}


def test_slicer_deepedit_clicks_correct_the_auto_segmentation(server):
    """A missed brainstem voxel and a spurious one, then a background click inside the brainstem."""
    url, folder, truth, missed = server["url"], server["folder"], server["truth"], server["missed"]
    far = [2, 2, 2]
    label, result = _label(url, "kbp2", {"Brainstem": [missed.tolist()], "background": [far]}, folder)
    assert result["start"] == "auto" and result["label_names"] == {"Brainstem": 1}
    assert result["method"] == "refiner"  # the shipped click refiner network
    assert label.shape == truth.shape and label[tuple(missed)] == 1 and label[tuple(far)] == 0
    inside = np.argwhere(label == 1)
    inside = inside[np.argmax(np.abs(inside - missed).sum(axis=1))]
    again, _ = _label(url, "kbp2", {"Brainstem": [missed.tolist()], "background": [inside.tolist()]}, folder)
    assert again[tuple(missed)] == 1 and again[tuple(inside)] == 0  # that voxel leaves it, the first stays


def test_the_foreground_background_form_and_the_geodesic_method(server):
    url, missed = server["url"], server["missed"].tolist()
    same = _post(url, "edit", "kbp2", {"foreground": [missed], "background": [[2, 2, 2]], "label": "Brainstem"})
    assert same.status_code == 200, same.text
    geodesic = _post(url, "edit", "kbp2", {"Brainstem": [missed], "method": "geodesic"})
    assert geodesic.status_code == 200 and geodesic.json()["method"] == "geodesic", geodesic.text


def test_a_label_sent_with_the_request_is_the_start(server):
    """Here an empty one: the brainstem starts from its prior."""
    empty = server["tmp"] / "empty.nii.gz"
    write_volume(np.zeros(server["truth"].shape, np.uint8), read_volume(server["image"]), empty)
    with open(empty, "rb") as f:
        sent = _post(server["url"], "edit", "kbp2", {"Brainstem": [server["missed"].tolist()]}, files={"label": f})
    assert sent.status_code == 200 and sent.json()["start"] == "request", sent.text


def test_a_structure_the_bank_does_not_know_from_a_box(server):
    """Class-agnostic, at the scan's resolution: the mask stays inside the box; the same prompts again are
    replayed, not recomputed."""
    truth = server["truth"]
    low, high = np.argwhere(truth).min(axis=0), np.argwhere(truth).max(axis=0)
    boxed = {"label_names": {"Stem": 5}, "label": "Stem", "box": [low.tolist(), high.tolist()]}
    label, result = _label(server["url"], "kbp2", boxed, server["folder"])
    assert result["computed"] == ["Stem"] and (label == 5).any(), result
    assert result["agnostic"] == {"Stem": "blobs"}, result  # `auto` on a CPU server
    outside = np.ones(truth.shape, bool)
    outside[tuple(slice(a, b + 1) for a, b in zip(low, high))] = False
    assert not (outside & (label == 5)).any()
    _, result = _label(server["url"], "kbp2", boxed, server["folder"])
    assert result["computed"] == [], result


def test_agnostic_combo_names_its_choice_and_refuses_unknown_methods(server):
    """`agnostic: combo` (blobs or a LiteMedSAM candidate per request): the answer names the path that served the
    structure, the clicked voxel is in it; the same prompts again are replayed; an unknown method is a 400."""
    click = server["missed"].tolist()
    request = {"label_names": {"Stem": 5}, "Stem": [click], "agnostic": "combo"}
    label, result = _label(server["url"], "kbp2", request, server["folder"])
    assert result["computed"] == ["Stem"] and label[tuple(click)] == 5, result
    assert result["agnostic"]["Stem"] in ("sam", "blobs: hu", "blobs: lost", "blobs: prompts"), result
    _, again = _label(server["url"], "kbp2", request, server["folder"])
    assert again["computed"] == [], again
    # a later click on another slice: the answer corrected around it (", local") or the new one whole
    slices = [int(k) for k in np.flatnonzero(server["truth"].any(axis=(0, 1))) if k != click[2]]
    k = slices[len(slices) // 2]
    inside = np.argwhere(server["truth"][:, :, k])
    other = inside[len(inside) // 2].tolist() + [k]
    later, result = _label(server["url"], "kbp2", {**request, "Stem": [click, other]}, server["folder"])
    assert result["computed"] == ["Stem"] and later[tuple(click)] == 5 and later[tuple(other)] == 5, result
    assert result["agnostic"]["Stem"].removesuffix(", local") in ("sam", "blobs: hu", "blobs: lost", "blobs: prompts")
    bad = _post(server["url"], "edit", "kbp2", {**request, "agnostic": "magic"})
    assert bad.status_code == 400 and "agnostic" in bad.json()["detail"], bad.text


def test_bad_clicks_are_400_and_leave_the_server_and_the_saved_label(server):
    import requests

    url = server["url"]
    wrong = server["tmp"] / "wrong.nii.gz"
    nib = pytest.importorskip("nibabel")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), str(wrong))
    bad = [
        ({"Liver": [[10, 10, 10]]}, None, "Liver"),
        ({"Brainstem": [[70, 1, 1]]}, None, "outside the image"),
        ({"Brainstem": [[10, 10, 10]], "background": [[10, 10, 10]]}, None, "both as foreground and"),
        ({}, None, "no clicks"),
        ({"foreground": [[10, 10, 10]], "label": "Heart"}, None, "Heart"),
        ({"Brainstem": [[10, 10, 10]]}, wrong, "shape"),
        ({"Brainstem": [[10, 10, 10]], "method": "magic"}, None, "method must be refiner or geodesic"),
        ({"label_names": {"Nerve": 1}, "Nerve": [[10, 10, 10]]}, None, "value of the bank organ 'Brainstem'"),
        ({"label_names": {"Nerve": 9}, "label": "Nerve", "box": [[5, 5, 5], [5, 5, 5]]}, None, "zero size"),
        ({"label_names": {"Nerve": 9}, "label": "Nerve", "box": [[5, 5, 5], [99, 9, 9]]}, None, "outside"),
    ]
    for params, upload, needle in bad:
        if upload is None:
            response = _post(url, "edit", "kbp2", params)
        else:
            with open(upload, "rb") as f:
                response = _post(url, "edit", "kbp2", params, files={"label": f})
        assert response.status_code == 400, (params, response.text)
        assert needle in response.json()["detail"], response.text
    assert requests.get(f"{url}/info/", timeout=60).status_code == 200  # still serving
    assert server["saved"].read_bytes() == server["saved_bytes"]  # the saved label untouched
