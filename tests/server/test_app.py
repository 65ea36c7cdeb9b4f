"""The MONAI Label app, in process (FastAPI TestClient, as MONAI Label's own tests) and as a real server.

Tiny inputs keep it fast on a CPU: OpenKBP scans cropped to 64 x 64 in-plane and every second slice, one
template organ (Brainstem), SAM organ restrictions, 1-iteration training. All models are the real ones
(shipped MedLAM, bundled LiteMedSAM weights); the app is a private copy, so apps/medlsam/model is untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from app_support import TINY_TRAIN, app_datastore, app_images, app_modules, label_info, private_app, tiny_case
from medlsam.errors import MedLSAMError
from medlsam.io.volume import read_volume

pytestmark = pytest.mark.slow  # a real MONAI Label server

THREADS = os.environ.get("MEDLSAM_TEST_THREADS", "1")


def _multipart(response) -> tuple[dict, bytes]:
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    params, image = None, None
    for part in MultipartDecoder(response.content, response.headers["content-type"]).parts:
        disposition = part.headers[b"Content-Disposition"].decode()
        if 'name="params"' in disposition:
            params = json.loads(part.content)
        elif 'name="image"' in disposition:
            image = part.content
    return params, image


def _read_label(content: bytes, suffix: str, folder: Path) -> np.ndarray:
    path = folder / f"result-{time.monotonic_ns()}{suffix}"
    path.write_bytes(content)
    return read_volume(path).array


# ===================================================================== in process


@pytest.fixture(scope="module")
def env(tmp_path_factory, data_dir):
    folder = tmp_path_factory.mktemp("app")
    images = app_images(data_dir, folder)
    studies = app_datastore(folder, images, ["kbp1"])
    app_dir = private_app(folder)
    return {"folder": folder, "images": images, "studies": studies, "app": app_dir, "data_dir": data_dir}


@pytest.fixture(scope="module")
def client(env):
    from monailabel.config import settings

    conf = {
        "models": "medlsam",
        "threads": THREADS,
        "adapt_on_save": "false",
        "learn_every": "0",
    }  # adaptation: run_sync below
    settings.MONAI_LABEL_APP_DIR = str(env["app"])
    settings.MONAI_LABEL_STUDIES = str(env["studies"])
    settings.MONAI_LABEL_APP_CONF = conf
    settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD = False
    os.environ.update(
        {
            "MONAI_LABEL_APP_DIR": str(env["app"]),
            "MONAI_LABEL_STUDIES": str(env["studies"]),
            "MONAI_LABEL_APP_CONF": json.dumps(conf),
        }
    )
    from fastapi.testclient import TestClient
    from monailabel.app import app

    with app_modules(env["app"]), TestClient(app, base_url="http://localhost") as test_client:
        yield test_client  # the server answers its own names only


def infer(client, model: str, image: str, params: dict | None = None, output: str | None = "json"):
    query = f"/infer/{model}?image={image}" + (f"&output={output}" if output else "")
    return client.post(query, data={"params": json.dumps(params or {})})


def save_final(client, image: str, label: Path) -> None:
    """PUT ``label`` as ``image``'s final label (Brainstem and LeftParotid), as Slicer saves one."""
    with open(label, "rb") as handle:
        response = client.put(
            f"/datastore/label?image={image}&tag=final",
            data={"params": json.dumps(label_info([1, 4]))},
            files={"label": (f"{image}.nii.gz", handle, "application/gzip")},
        )
    assert response.status_code == 200, response.text


def test_info_lists_the_four_tasks_and_the_trainer(client):
    info = client.get("/info/").json()
    models = info["models"]
    assert models["medlsam"]["type"] == "segmentation" and models["medlsam"]["dimension"] == 3
    assert models["medlsam"]["labels"] == {"Brainstem": 1} == models["medlam"]["labels"]
    assert models["sam"]["type"] == "deepgrow" and models["sam"]["dimension"] == 2
    assert models["sam_3d"]["type"] == "deepgrow" and models["sam_3d"]["dimension"] == 3
    assert {"epochs", "iterations_per_epoch", "batch_size", "learning_rate", "device"} <= set(
        info["trainers"]["medlam"]["config"]
    )
    assert info["labels"] == ["Brainstem"]


def test_medlam_returns_boxes_and_a_box_label(client, env):
    response = infer(client, "medlam", "kbp2", output=None)  # Slicer: multipart
    assert response.status_code == 200, response.text
    params, image = _multipart(response)
    assert params["boxes"]["Brainstem"]["found"], params
    assert params["label_names"] == {"Brainstem": 1}
    assert params["medlam"]["path"].endswith("pretrained_medlam.pt")
    label = _read_label(image, ".nii.gz", env["folder"])
    (i0, j0, k0), (i1, j1, k1) = params["boxes"]["Brainstem"]["box_voxel"]
    assert label.shape == (64, 64, 24) and set(np.unique(label)) == {0, 1}
    assert (label[i0 : i1 + 1, j0 : j1 + 1, k0 : k1 + 1] == 1).all() and (label == 1).sum() == (
        (i1 - i0 + 1) * (j1 - j0 + 1) * (k1 - k0 + 1)
    )
    bank = json.loads((env["app"] / "model" / "templates.json").read_text())
    assert bank["templates"] == ["kbp1"] and (env["app"] / "model" / "templates.pt").is_file()
    # a client echoing the config's choice list, and the coarse-only quick check
    quick = infer(client, "medlam", "kbp2", {"mode": ["wpl", "spl"], "refine": "false", "match": "false"})
    assert quick.status_code == 200 and quick.json()["boxes"]["Brainstem"]["found"], quick.text


def test_medlsam_multipart_and_ohif_image(client, env):
    info_labels = client.get("/info/").json()["models"]["medlsam"]["labels"]
    response = infer(client, "medlsam", "kbp1", {"result_extension": ".nrrd", "result_dtype": "uint8"}, output=None)
    assert response.status_code == 200, response.text
    params, image = _multipart(response)
    assert params["label_names"] == info_labels
    assert set(params["boxes"]) == {"Brainstem"} and "not_found" in params and params["latencies"]["total"] > 0
    label = _read_label(image, ".nrrd", env["folder"])
    assert label.dtype == np.uint8 and label.shape == (64, 64, 24) and (label == 1).sum() > 0
    # OHIF: output=image, same request; the slices are already encoded, so only the decoder runs
    ohif = infer(client, "medlsam", "kbp1", {"result_extension": ".nrrd", "result_dtype": "uint8"}, output="image")
    assert ohif.status_code == 200 and ohif.headers["content-type"].startswith("application/")
    assert np.array_equal(_read_label(ohif.content, ".nrrd", env["folder"]), label)
    prior_only = infer(client, "medlsam", "kbp2", {"prior_weight": 1})  # the template prior alone: no SAM
    assert prior_only.status_code == 200 and prior_only.json()["encoder_calls"] == 0, prior_only.text
    assert prior_only.json()["boxes"]["Brainstem"]["voxels"] > 0 and prior_only.json()["cached"] is False
    # a repeated request (same image, bank, models, options) returns the kept result: no localisation, no SAM
    again = infer(client, "medlsam", "kbp2", {"prior_weight": 1})
    assert again.status_code == 200 and again.json()["cached"] is True, again.text
    assert again.json()["boxes"] == prior_only.json()["boxes"] and "localize" not in again.json()["timings_s"]
    unknown = infer(client, "medlsam", "kbp1", {"organs": ["Liver"]})
    assert unknown.status_code == 400 and "Liver" in unknown.json()["detail"]


def test_sam_second_click_costs_only_the_decoder(client, env):
    seed = [32, 34, 8]  # near the brainstem of the tiny kbp2
    first = infer(client, "sam", "kbp2", {"foreground": [seed], "label": "Brainstem"}, output=None)
    assert first.status_code == 200, first.text
    params, image = _multipart(first)
    assert params["label_names"] == {"Brainstem": 1} and params["slice"] == 8 and params["axis"] == 2
    label = _read_label(image, ".nii.gz", env["folder"])
    assert label.shape == (64, 64, 24) and not label[:, :, [k for k in range(24) if k != 8]].any()
    second = infer(client, "sam", "kbp2", {"foreground": [seed], "background": [[20, 20, 8]]})
    assert second.status_code == 200 and second.json()["encoder_calls"] == 0, second.text  # decoder only
    roi = infer(client, "sam", "kbp2", {"roi": [26, 38, 28, 40, 8, 8]})
    assert roi.status_code == 200 and roi.json()["encoder_calls"] == 0


def test_sam_3d_propagates_from_the_clicked_slice(client):
    response = infer(client, "sam_3d", "kbp2", {"foreground": [[32, 34, 8]], "max_slices": 2})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["seed_slice"] == 8 and result["axis"] == 2 and set(result["stop"]) <= {"up", "down", "seed"}
    # the mask left the clicked slice, in at most max_slices steps each way
    assert result["slices"] and result["slices"][1] > result["slices"][0], result
    assert result["slices"][0] >= 6 and result["slices"][1] <= 10 and result["slices"][0] <= 8 <= result["slices"][1]


@pytest.mark.parametrize(
    "model,image,params,status,needle",
    [
        ("medlsam", "missing_image", {}, 404, "not found"),
        ("medlam", "notct", {}, 400, "Hounsfield"),
        ("medlam", "flat2d", {}, 400, "2D"),
        ("sam", "kbp2", {"foreground": [[70, 1, 1]]}, 400, "outside the image"),
        ("sam", "kbp2", {"roi": [30, 30, 20, 40, 8, 8]}, 400, "zero size"),
        ("sam", "kbp2", {"background": [[3, 3, 3]]}, 400, "foreground"),
        ("sam_3d", "kbp2", {}, 400, "no prompt"),
        ("medlam", "kbp2", {"organs": "Brainstem,Heart"}, 400, "Heart"),
        ("medlam", "kbp2", {"mode": "prior"}, 400, "mode"),
        ("medlsam", "kbp1", {"prior_weight": "2"}, 400, "prior_weight"),
        ("medlsam", "kbp1", {"mode": "boxes"}, 400, "mode"),
        ("nosuchmodel", "kbp2", {}, 404, "available"),
    ],
)
def test_bad_input_gives_clear_http_errors(client, model, image, params, status, needle):
    response = infer(client, model, image, params)
    assert response.status_code == status, response.text
    assert needle in response.json()["detail"]
    assert client.get("/info/").status_code == 200  # still serving


def test_missing_sam_weights_and_no_templates_are_clear_errors(env, tmp_path):
    from fastapi import HTTPException

    with app_modules(env["app"]):
        from monailabel.datastore.local import LocalDatastore

        from lib.configs.medlsam import MedLSAM
        from lib.infers.common import http_error
        from lib.models import Models
        from lib.template_source import NoTemplatesError, TemplateSource

        models = Models(env["app"] / "model", {"backend": "sam_vit_b"})
        with pytest.raises(Exception) as caught:
            models.segmenter()
        error = http_error(caught.value)
        assert isinstance(error, HTTPException) and error.status_code == 503 and "checkpoint" in error.detail
        empty = tmp_path / "studies"
        empty.mkdir()
        shutil.copy(env["images"]["kbp2"][0], empty / "kbp2.nii.gz")
        datastore = LocalDatastore(str(empty), extensions=("*.nii.gz",), auto_reload=False)
        templates = TemplateSource(Models(env["app"] / "model", {}), env["app"] / "model", lambda: datastore, 5)
        with pytest.raises(NoTemplatesError, match="save a final label"):
            templates.bank()
        assert http_error(NoTemplatesError("x")).status_code == 409
        for key, value, needle in (
            ("mode", "boxes", "mode"),
            ("compile", "maybe", "compile"),
            ("templates", "0", "templates"),
        ):
            with pytest.raises(MedLSAMError, match=needle):
                MedLSAM().init("medlsam", str(env["app"] / "model"), {key: value}, None, datastore=lambda: None)


def test_saving_a_label_rebuilds_the_bank(client, env):
    save_final(client, "kbp3", env["images"]["kbp3"][1])
    assert client.get("/info/").json()["models"]["medlsam"]["labels"] == {"Brainstem": 1, "LeftParotid": 4}
    result = infer(client, "medlam", "kbp2").json()
    assert result["templates"] == ["kbp1", "kbp3"], result
    assert set(result["boxes"]) == {"Brainstem", "LeftParotid"}
    assert result["label_names"] == {"Brainstem": 1, "LeftParotid": 4}


def test_sync_training_publishes_a_model_that_is_used(client, env):
    model_dir = env["app"] / "model"
    before = infer(client, "medlam", "kbp2").json()["medlam"]
    response = client.post("/train/medlam?run_sync=True", json=TINY_TRAIN)
    assert response.status_code == 200, response.text
    assert (model_dir / "medlam.pt").is_file()
    stats = json.loads((model_dir / "train_stats.json").read_text())
    assert {"epoch", "total_epochs", "total_time", "best_metric"} <= set(stats) and stats["epoch"] == 1
    assert client.get("/info/").json()["train_stats"]["medlam"]["epoch"] == 1
    after = infer(client, "medlam", "kbp2").json()
    assert after["medlam"]["path"] == "medlam.pt"  # a file name: no server path in results
    assert after["medlam"]["fingerprint"] != before["fingerprint"]
    bank = json.loads((model_dir / "templates.json").read_text())
    assert bank["medlam_fingerprint"] == after["medlam"]["fingerprint"]  # the bank was rebuilt


def test_lite_medsam_adaptation_publishes_weights_the_next_request_uses(client, env):
    """Trainer lite_medsam on the two templates (kbp1, kbp3): adapted weights published atomically and used by the
    next medlsam request; a published file that does not load is set aside and the shipped LiteMedSAM serves."""
    model_dir = env["app"] / "model"
    assert infer(client, "medlsam", "kbp2").json()["adapted"] is False
    response = client.post("/train/lite_medsam?run_sync=True", json={"steps": 3, "slice_step": 1, "threads": 1})
    assert response.status_code == 200, response.text
    assert (model_dir / "lite_medsam_adapted.pt").is_file()
    assert not [p for p in model_dir.iterdir() if p.name.startswith(".tmp-")]
    assert client.get("/info/").json()["train_stats"]["lite_medsam"]["steps"] == 3
    assert infer(client, "medlsam", "kbp2").json()["adapted"] is True
    bad = client.post("/train/lite_medsam?run_sync=True", json={"steps": 0})
    assert bad.status_code != 200 and "steps" in bad.text
    (model_dir / "lite_medsam_adapted.pt").write_bytes(b"not a checkpoint")
    assert infer(client, "medlsam", "kbp2").json()["adapted"] is False
    assert (model_dir / "lite_medsam_adapted.pt.rejected").is_file()


def test_segmentation_training_learns_from_the_saved_labels_and_serves_its_choice(client, env):
    """Trainer segmentation on the three saved labels (kbp1, kbp3, kbp4): a model published atomically and shown in
    /info/; the next medlsam answer names the path that served each organ and its held-out Dice; bad options are
    refused; a published file that does not load is set aside and the few-shot path serves again."""
    model_dir = env["app"] / "model"
    before = infer(client, "medlsam", "kbp2", {"prior_weight": 1}).json()
    assert set(before["paths"].values()) == {"fewshot"}, before["paths"]
    too_few = client.post("/train/segmentation?run_sync=True", json={"max_epochs": 1})
    assert too_few.status_code == 409 and "at least 3 final labels" in too_few.text, too_few.text
    for image in ("kbp3", "kbp4"):  # with kbp1: three final labels
        save_final(client, image, env["images"][image][1])
    bad = client.post("/train/segmentation?run_sync=True", json={"max_epochs": 0})
    assert bad.status_code != 200 and "max_epochs" in bad.text, bad.text
    options = {"max_epochs": 1, "time_limit_min": 2, "threads": int(THREADS), "publish": "always"}
    response = client.post("/train/segmentation?run_sync=True", json=options)
    assert response.status_code == 200, response.text
    assert (model_dir / "segmentation.pt").is_file()
    assert not [p for p in model_dir.iterdir() if p.name.startswith(".tmp-")]
    stats = client.get("/info/").json()["train_stats"]["segmentation"]
    assert stats["labels"] == 3 and {"Brainstem", "LeftParotid"} <= set(stats["organs"]), stats
    result = infer(client, "medlsam", "kbp2", {"prior_weight": 1}).json()
    assert result["cached"] is False and set(result["paths"]) == {"Brainstem", "LeftParotid"}, result
    assert set(result["paths"].values()) <= {"learned", "fewshot"}
    assert set(result["held_out_dice"]) == set(result["paths"])
    assert result["learned_model"]["labels"] == 3
    # a fourth label (kbp2's) the model in use never saw: held out, and both drafts compared on it before publishing
    _, kbp2_label = tiny_case(env["data_dir"], 2, [1, 4], env["folder"] / "kbp2-label")
    save_final(client, "kbp2", kbp2_label)
    published = (model_dir / "segmentation.pt").read_bytes()
    again = client.post("/train/segmentation?run_sync=True", json={**options, "publish": "if_better"})
    assert again.status_code == 200, again.text
    compared = again.json()["compared_with_previous"]
    assert compared["scans"] == 1 and compared["organs"], compared
    better = compared["new"] > compared["incumbent"]
    assert again.json()["published"] == better and again.json()["previous_held_out_dice"] == compared["incumbent"]
    assert ((model_dir / "segmentation.pt").read_bytes() == published) != better
    # a model that chose the few-shot path everywhere: SAM blends in where the prior weight is below 1, not elsewhere
    from medlsam.learn.model import load_learned

    fewshot = load_learned(model_dir / "segmentation.pt")
    fewshot.choice = {organ: "fewshot" for organ in fewshot.organs}
    fewshot.save(model_dir / "segmentation.pt")
    alone = infer(client, "medlsam", "kbp2", {"prior_weight": 1}).json()
    assert set(alone["paths"].values()) == {"fewshot"} and "sam" not in alone["timings_s"], alone
    blended = infer(client, "medlsam", "kbp2", {"prior_weight": 0.5}).json()
    found = [organ for organ, box in blended["boxes"].items() if box["found"]]
    assert found and all(blended["paths"][organ] == "fewshot_sam" for organ in found), blended
    assert blended["timings_s"]["sam"] > 0 and blended["backend"] == "lite_medsam"
    (model_dir / "segmentation.pt").write_bytes(b"not a model")
    after = infer(client, "medlsam", "kbp2", {"prior_weight": 1}).json()
    assert set(after["paths"].values()) == {"fewshot"} and (model_dir / "segmentation.pt.rejected").is_file()
