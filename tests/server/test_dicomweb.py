"""The app on a real DICOMweb server (Orthanc) as OHIF uses it, and OHIF itself in a real headless browser.

One Orthanc and one MONAI Label server for the module: two OpenKBP train scans are templates (one final label stored
as DICOM SEG by another tool, one saved through ``PUT /datastore/label`` as Slicer does), one validation scan is
segmented; bad series (MR, SEG, one slice, mixed orientations, unknown) and a stopped Orthanc get clear errors.
Skipped with the reason when Orthanc / Chromium / Playwright are not installed, unless MEDLSAM_REQUIRE_DICOMWEB=1
(set by .ci/run), where a skip is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
import SimpleITK as sitk

from app_support import NAMES, free_port, private_app, require, start_server, stop_server, wait_for_server
from medlsam.io.dicom import SeriesFields, export_ct_series, label_to_seg, stow_files
from medlsam.io.volume import CTVolume, read_volume, write_volume
from medlsam.utils.metrics import dice

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import orthanc  # noqa: E402

pytestmark = pytest.mark.slow  # real Orthanc + real MONAI Label server (+ a real browser)

TEMPLATE_SEG, TEMPLATE_API, QUERY = 4, 13, 201  # train, train (all 7 organs), validation
SLOW_TIMEOUT_S = 8  # --conf dicomweb_timeout of the test server
SCREENSHOT = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "ohif_autosegmentation.png"


def kbp(data_dir: Path, case: int) -> tuple[Path, Path]:
    return (
        data_dir / "openkbp" / "images" / f"openkbp_pt_{case}.nii.gz",
        data_dir / "openkbp" / "labels" / f"openkbp_pt_{case}.nii.gz",
    )


def on_grid(label_path: Path, reference: CTVolume) -> np.ndarray:
    """A label resampled (nearest, physical space) onto a reference volume's grid, in its file order."""
    ref = sitk.GetImageFromArray(np.zeros(reference.shape[::-1], np.uint8))
    spacing = reference.spacing
    ref.SetSpacing(spacing.tolist())
    ref.SetDirection((reference.affine[:3, :3] / spacing[None, :]).ravel().tolist())
    ref.SetOrigin(reference.affine[:3, 3].tolist())
    out = sitk.Resample(sitk.ReadImage(str(label_path)), ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0)


def export(image: Path, folder: Path, url: str, **fields) -> tuple:
    series = export_ct_series(image, folder, SeriesFields(**fields))
    stow_files(series.files, url)
    return series


@pytest.fixture(scope="module")
def stack(data_dir, tmp_path_factory):
    require(orthanc.missing())
    tmp = tmp_path_factory.mktemp("dicomweb")
    port = free_port()
    db = orthanc.start(tmp / "orthanc", port)
    url = orthanc.dicomweb_url(port)
    server = None
    try:
        ids = {}
        tic = time.perf_counter()
        for case in (TEMPLATE_SEG, TEMPLATE_API, QUERY):
            series = export(kbp(data_dir, case)[0], tmp / f"ct{case}", url, patient_id=f"KBP{case}")
            ids[case] = series
        seg = label_to_seg(kbp(data_dir, TEMPLATE_SEG)[1], ids[TEMPLATE_SEG].files, NAMES, tmp / "seg4.dcm")
        stow_files([seg], url)  # a final label stored by another tool
        upload_s = time.perf_counter() - tic
        app = private_app(tmp)
        api = free_port()
        log = tmp / "server.log"
        os.environ["MONAI_LABEL_DICOMWEB_CACHE_PATH"] = str(tmp / "cache")
        conf = {
            "models": "medlsam",
            "templates": 2,
            "prior_weight": 1,  # the template prior alone (SAM adds nothing measurable here): seconds, not minutes
            "dicomweb_timeout": SLOW_TIMEOUT_S,
            "adapt_on_save": "false",  # the saved labels would start a LiteMedSAM adaptation of minutes
            "threads": os.environ.get("MEDLSAM_TEST_THREADS", "1"),
        }
        tic = time.perf_counter()
        server = start_server(app, url, api, conf, log)
        wait_for_server(f"http://127.0.0.1:{api}", server, timeout=180, log=log)
        yield {
            "url": url,
            "api": f"http://127.0.0.1:{api}",
            "ids": ids,
            "tmp": tmp,
            "log": log,
            "orthanc": db,
            "port": port,
            "upload_s": upload_s,
            "start_s": time.perf_counter() - tic,
        }
    finally:
        if server is not None:
            stop_server(server)
        os.environ.pop("MONAI_LABEL_DICOMWEB_CACHE_PATH", None)
        orthanc.stop(tmp / "orthanc")


def wait_bank(api: str, templates: int, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        bank = requests.get(f"{api}/info/", timeout=30).json().get("template_bank", {})
        if bank.get("state") == "ready" and len(bank.get("templates", [])) == templates:
            return bank
        assert bank.get("state") != "failed", bank
        time.sleep(1)
    raise TimeoutError(f"template bank not ready with {templates} templates: {bank}")


def test_templates_from_dicom_seg(stack, data_dir):
    """The SEG stored by another tool is a template at start; a label saved through the API becomes a SEG on the
    server (organ names as segment labels) and the second template, without a restart."""
    api, ids = stack["api"], stack["ids"]
    bank = wait_bank(api, 1)
    assert bank["templates"] == [ids[TEMPLATE_SEG].series_uid]
    assert "template bank: building from 1 of 1" in stack["log"].read_text()
    # Slicer's save: the label on the grid of the image MONAI Label built from the series
    image_id = ids[TEMPLATE_API].series_uid
    grid = read_volume(stack["tmp"] / f"ct{TEMPLATE_API}")  # GDCM's order, as MONAI Label's NIfTI
    label = on_grid(kbp(data_dir, TEMPLATE_API)[1], grid)
    write_volume(label.astype(np.uint8), grid, stack["tmp"] / "api_label.nii.gz")
    info = [{"name": name, "idx": value} for value, name in NAMES.items()]
    with open(stack["tmp"] / "api_label.nii.gz", "rb") as handle:
        answer = requests.put(
            f"{api}/datastore/label",
            params={"image": image_id, "tag": "final"},
            files={"label": ("label.nii.gz", handle)},
            data={"params": json.dumps({"label_info": info})},
            timeout=120,
        )
    assert answer.status_code == 200, answer.text
    segs = requests.get(f"{stack['url']}/series", params={"Modality": "SEG"}, timeout=30).json()
    assert len(segs) == 2
    bank = wait_bank(api, 2)
    assert sorted(bank["templates"]) == sorted([image_id, ids[TEMPLATE_SEG].series_uid])
    assert sorted(bank["organs"]) == sorted(NAMES.values())


def test_autosegmentation_on_the_series_grid_with_dice(stack, data_dir):
    """OHIF's request: the NRRD lies on the grid and voxel order of the image MONAI Label built from the series,
    its values are /info/'s label indices, and it matches the ground truth (mean Dice >= 0.5)."""
    api, query = stack["api"], stack["ids"][QUERY].series_uid
    wait_bank(api, 2)
    params = {"result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False}
    tic = time.perf_counter()
    answer = requests.post(
        f"{api}/infer/medlsam",
        params={"image": query, "output": "image"},
        data={"params": json.dumps(params)},
        timeout=600,
    )
    first_s = time.perf_counter() - tic
    assert answer.status_code == 200, answer.text[:500]
    result = stack["tmp"] / "result.nrrd"
    result.write_bytes(answer.content)
    label = read_volume(result)
    nifti = read_volume(next((stack["tmp"] / "cache").rglob(f"{query}.nii.gz")))
    assert label.shape == nifti.shape and np.allclose(label.affine, nifti.affine, atol=1e-3)
    labels = requests.get(f"{api}/info/", timeout=30).json()["models"]["medlsam"]["labels"]
    assert set(np.unique(label.array)) - {0} <= set(labels.values())
    truth = on_grid(kbp(data_dir, QUERY)[1], label)
    contoured = json.loads((data_dir / "openkbp" / "dataset.json").read_text())
    case = next(c for c in contoured["cases"] if c["id"] == f"openkbp_pt_{QUERY}")
    scores = {
        name: dice(label.array == labels[name], truth == value)
        for value, name in NAMES.items()
        if name in case["contoured"] or value in case["contoured"]
    }
    print(f"Dice {scores}; first auto-segmentation {first_s:.1f} s")
    assert np.mean(list(scores.values())) >= 0.5, scores
    tic = time.perf_counter()
    again = requests.post(
        f"{api}/infer/medlsam", params={"image": query, "output": "image"}, data={"params": json.dumps(params)}
    )
    assert again.status_code == 200 and again.content == answer.content
    print(f"later auto-segmentation {time.perf_counter() - tic:.1f} s")
    # output=dicom_seg: the result as a DICOM SEG of the series (MONAI Label names segments from label_info by
    # position among the result's values: send them in value order)
    present = sorted(int(v) for v in np.unique(label.array) if v)
    names = {v: n for n, v in labels.items()}
    info = [{"name": names[v], "idx": v} for v in present]
    seg = requests.post(
        f"{api}/infer/medlsam",
        params={"image": query, "output": "dicom_seg"},
        data={"params": json.dumps({**params, "label_info": info})},
        timeout=600,
    )
    assert seg.status_code == 200, seg.text[:300]
    (stack["tmp"] / "result_seg.dcm").write_bytes(seg.content)
    dataset = pydicom.dcmread(stack["tmp"] / "result_seg.dcm")
    assert dataset.Modality == "SEG" and dataset.ReferencedSeriesSequence[0].SeriesInstanceUID == query
    assert [s.SegmentLabel for s in dataset.SegmentSequence] == [names[v] for v in present]


def test_series_that_are_not_a_ct_volume(stack, data_dir):
    api, url, tmp = stack["api"], stack["url"], stack["tmp"]

    def infer(series_id: str) -> requests.Response:
        return requests.post(f"{api}/infer/medlam", params={"image": series_id, "output": "json"}, timeout=120)

    assert infer("1.2.3.4.5.6.7.8.9").status_code == 404  # unknown series
    segs = requests.get(f"{url}/series", params={"Modality": "SEG"}, timeout=30).json()
    answer = infer(segs[0]["0020000E"]["Value"][0])
    assert answer.status_code == 400 and "SEG series, not CT" in answer.json()["detail"]
    mr = export_ct_series(kbp(data_dir, QUERY)[0], tmp / "mr")
    for f in mr.files:
        ds = pydicom.dcmread(f)
        ds.Modality, ds.SOPClassUID = "MR", "1.2.840.10008.5.1.4.1.1.4"
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.save_as(f)
    stow_files(mr.files, url)
    answer = infer(mr.series_uid)
    assert answer.status_code == 400 and "MR series, not CT" in answer.json()["detail"]
    one = export_ct_series(kbp(data_dir, QUERY)[0], tmp / "one")
    stow_files(one.files[:1], url)
    answer = infer(one.series_uid)
    assert answer.status_code == 400 and "1 image(s)" in answer.json()["detail"]
    mixed = export_ct_series(kbp(data_dir, QUERY)[0], tmp / "mixed")
    for f in mixed.files[::2]:
        ds = pydicom.dcmread(f)
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.save_as(f)
    stow_files(mixed.files, url)
    answer = infer(mixed.series_uid)
    assert answer.status_code == 400 and "orientations" in answer.json()["detail"]


def test_ohif_shows_the_result_in_a_real_browser(stack):
    """Chromium opens the study in the bundled OHIF, connects the MONAI Label panel, runs medlsam; the labelmap
    OHIF displays equals the server's result voxel for voxel and its segments carry the organ names."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    require("" if chromium else "Chromium is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require("Playwright is not installed (pip install -r requirements.txt)")
    from ohif_driver import run_ohif_autosegmentation

    api, query = stack["api"], stack["ids"][QUERY]
    wait_bank(api, 2)
    with sync_playwright() as p:
        shown = run_ohif_autosegmentation(p, chromium, api, query.study_uid, SCREENSHOT)
    print(
        f"OHIF: study loaded in {shown['seconds']['study_loaded']:.1f} s, auto-segmentation "
        f"{shown['seconds']['autosegmentation']:.1f} s (click to labelmap)"
    )
    params = {"result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False}
    answer = requests.post(
        f"{api}/infer/medlsam",
        params={"image": query.series_uid, "output": "image"},
        data={"params": json.dumps(params)},
    )
    assert answer.status_code == 200, answer.text[:300]
    (stack["tmp"] / "server.nrrd").write_bytes(answer.content)
    result = read_volume(stack["tmp"] / "server.nrrd")
    labels = requests.get(f"{api}/info/", timeout=30).json()["models"]["medlsam"]["labels"]
    assert set(labels) == set(shown["segments"].values()), shown["segments"]  # OHIF's segment list: the organs
    to_value = np.zeros(256, np.uint8)  # OHIF's segment index -> the server's label value, by organ name
    for index, name in shown["segments"].items():
        to_value[index] = labels[name]
    server = np.ascontiguousarray(result.array.transpose(2, 1, 0)).ravel()  # x fastest, as the NRRD's bytes
    assert shown["dimensions"] == list(result.shape) and shown["voxels"].size == server.size
    np.testing.assert_array_equal(to_value[shown["voxels"]], server)
    assert (server > 0).sum() > 1000  # organs were found and shown
    # where OHIF draws them: its volume's geometry is the result's (LPS)
    direction = np.asarray(shown["direction"]).reshape(3, 3)  # rows: the axes' directions
    np.testing.assert_allclose(np.asarray(shown["spacing"]), result.spacing, atol=1e-3)
    np.testing.assert_allclose(np.asarray(shown["origin"]), result.affine[:3, 3], atol=1e-2)
    np.testing.assert_allclose(direction.T, result.affine[:3, :3] / result.spacing[None, :], atol=1e-4)
    assert SCREENSHOT.is_file()


def test_bad_dicom_seg_never_poisons_the_bank(stack, data_dir):
    """A SEG off its image's voxel grid and an empty SEG, stored on the server by another tool as the newest labels:
    each is skipped with a log line naming it, and the bank keeps its two good templates."""
    api, url, tmp = stack["api"], stack["url"], stack["tmp"]
    good = sorted(wait_bank(api, 2)["templates"])
    image, label = kbp(data_dir, TEMPLATE_API)
    target = export(image, tmp / "offgrid_ct", url)  # the CT the bad SEG will claim to label
    shifted = read_volume(image)
    shifted.affine[:3, 3] += [1.3, 0.0, 0.0]  # a third of a voxel
    write_volume(shifted.array.astype(np.int16), shifted, tmp / "shifted.nii.gz")
    write_volume(read_volume(label).array, shifted, tmp / "shifted_label.nii.gz")
    other = export_ct_series(tmp / "shifted.nii.gz", tmp / "shifted_ct")
    seg = pydicom.dcmread(label_to_seg(tmp / "shifted_label.nii.gz", other.files, NAMES, tmp / "offgrid.dcm"))
    seg.ReferencedSeriesSequence[0].SeriesInstanceUID = target.series_uid
    seg.StudyInstanceUID, seg.FrameOfReferenceUID = target.study_uid, target.frame_of_reference_uid
    seg.save_as(tmp / "offgrid.dcm")
    empty_target = export(image, tmp / "empty_ct", url)
    empty = pydicom.dcmread(label_to_seg(label, empty_target.files, NAMES, tmp / "empty.dcm"))
    empty.PixelData = bytes(len(empty.PixelData))
    empty.save_as(tmp / "empty.dcm")
    stow_files([tmp / "offgrid.dcm", tmp / "empty.dcm"], url)
    time.sleep(6)  # the labelled list is re-read after 5 s
    answer = requests.post(f"{api}/infer/medlam", params={"image": stack["ids"][QUERY].series_uid}, timeout=300)
    assert answer.status_code == 200, answer.text[:300]
    bank = wait_bank(api, 2)
    assert sorted(bank["templates"]) == good
    assert "is empty" in bank["skipped"][empty_target.series_uid]
    log = stack["log"].read_text()
    assert f"final label of {target.series_uid} ignored" in log and "does not lie on its image's voxel grid" in log
    assert f"template {empty_target.series_uid} skipped" in log


def test_dicomweb_server_slow_is_503(stack):
    """Orthanc frozen (SIGSTOP: connections accepted, never answered) -> 503 saying it did not answer in time, after
    the configured timeout (and one retry), not a hung request; once it answers again, so does the app."""
    import signal

    api = stack["api"]
    os.kill(stack["orthanc"].pid, signal.SIGSTOP)
    try:  # the client's own timeout: a hung request would raise here
        answer = requests.post(f"{api}/infer/medlam", params={"image": "1.2.3.4.999", "output": "json"}, timeout=120)
    finally:
        os.kill(stack["orthanc"].pid, signal.SIGCONT)
    assert answer.status_code == 503, answer.text
    assert "did not answer in time" in answer.json()["detail"] and stack["url"] in answer.json()["detail"]
    assert requests.post(f"{api}/infer/medlam", params={"image": "1.2.3.4.999"}, timeout=60).status_code == 404


def test_dicomweb_server_down_is_503_and_the_app_keeps_serving(stack, data_dir):
    """Last: Orthanc stopped -> a request needing it is a 503 naming the DICOMweb server; /info/ still answers."""
    api = stack["api"]
    late = export_ct_series(kbp(data_dir, TEMPLATE_API)[0], stack["tmp"] / "late")
    stow_files(late.files, stack["url"])
    orthanc.stop(stack["tmp"] / "orthanc")
    answer = requests.post(f"{api}/infer/medlsam", params={"image": late.series_uid, "output": "json"}, timeout=60)
    assert answer.status_code == 503 and stack["url"] in answer.json()["detail"]
    assert requests.get(f"{api}/info/", timeout=30).status_code == 200
