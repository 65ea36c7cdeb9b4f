"""Radiotherapy DICOM through the app on a real DICOMweb server (Orthanc): a real scanner series with its ARIA RT
Structure Set (references lost to anonymisation) is a template; another series of the patient is segmented with
``output=rtstruct``, stored back as a draft (``stow``), valid for DICOM's validator and read back as the label.

One Orthanc and one MONAI Label server for the module. Skipped with the reason when Orthanc or dciodvfy are not
installed (scripts/system_deps.sh), unless MEDLSAM_REQUIRE_DICOMWEB=1 (CI), where a skip is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from app_support import free_port, private_app, require, start_server, stop_server, wait_for_server
from medlsam.io.dicom import SeriesFields, export_ct_series, stow_files
from medlsam.io.volume import CTVolume, write_volume
from medlsam.rt.check import dciodvfy, missing_tools
from medlsam.rt.rtstruct import read_ct_series, read_rtstruct
from medlsam.utils.metrics import dice

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import orthanc  # noqa: E402

pytestmark = pytest.mark.slow  # real Orthanc + a real MONAI Label server building a bank from a 512 x 512 series

ARIA = "20191031-215249_m.dcm"
ORGANS = ("Lung_R", "Lung_L", "Heart", "SpinalCord", "Liver")
EVERY_2ND = (slice(0, None, 2), slice(0, None, 2), slice(10, 95, 2))  # the second series: 2.5 x 2.5 x 8 mm
SCREENSHOT = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "ohif_rtstruct.png"


@pytest.fixture(scope="module")
def stack(data_dir, tmp_path_factory):
    require(orthanc.missing() or missing_tools())
    tmp = tmp_path_factory.mktemp("dicomweb_rt")
    thorax_dir = data_dir / "dicom_rt" / "thorax_rt"
    port = free_port()
    orthanc.start(tmp / "orthanc", port)
    url = orthanc.dicomweb_url(port)
    server = None
    try:
        stow_files(sorted(thorax_dir.glob("*.dcm")), url)  # the scanner's series and the planning system's RTSTRUCT
        thorax = read_ct_series(thorax_dir)
        truth = read_rtstruct(thorax_dir / ARIA, thorax)
        affine = thorax.volume.affine.copy()
        affine[:3, 3] = thorax.volume.index_to_world(np.array([0, 0, 10]))[0]
        affine[:3, :3] *= 2.0
        second = CTVolume(np.ascontiguousarray(thorax.volume.array[EVERY_2ND]).astype(np.int16), affine)
        write_volume(second.array, second, tmp / "second.nii.gz")
        fields = SeriesFields(patient_id="THORAX2", series_description="thorax, every 2nd voxel")
        exported = export_ct_series(tmp / "second.nii.gz", tmp / "second", fields)
        stow_files(exported.files, url)
        app, api, log = private_app(tmp), free_port(), tmp / "server.log"
        os.environ["MONAI_LABEL_DICOMWEB_CACHE_PATH"] = str(tmp / "cache")
        conf = {"models": "medlsam", "prior_weight": 1, "adapt_on_save": "false", "threads": "1"}
        server = start_server(app, url, api, conf, log)
        wait_for_server(f"http://127.0.0.1:{api}", server, timeout=180, log=log)
        yield {
            "url": url,
            "api": f"http://127.0.0.1:{api}",
            "second": exported,
            "second_dir": tmp / "second",
            "truth": {n: truth.label.array[EVERY_2ND] == v for v, n in truth.names.items()},
            "tmp": tmp,
            "log": log,
        }
    finally:
        if server is not None:
            stop_server(server)
        os.environ.pop("MONAI_LABEL_DICOMWEB_CACHE_PATH", None)
        orthanc.stop(tmp / "orthanc")


def _series_uid(folder: Path) -> str:
    import pydicom

    first = next(iter(sorted(folder.glob("*.dcm"))))
    return str(pydicom.dcmread(first, stop_before_pixels=True).SeriesInstanceUID)


def test_a_structure_set_without_references_is_its_series_final_label(stack):
    """The ARIA structure set (no ReferencedFrameOfReferenceSequence) labels the only CT series of its study: the
    series is labelled, its ROIs are organs by their TG-263 names, the second series is not labelled."""
    deadline = time.time() + 300
    while time.time() < deadline:
        info = requests.get(f"{stack['api']}/info/", timeout=60).json()
        if info.get("template_bank", {}).get("state") in ("ready", "failed"):
            break
        time.sleep(2)
    bank = info["template_bank"]
    assert bank.get("state") == "ready" and len(bank.get("templates", [])) == 1, bank
    assert info["datastore"]["total"] == 2 and info["datastore"]["completed"] == 1, info["datastore"]
    assert _series_uid(stack["second_dir"]) not in bank["templates"]
    assert set(ORGANS) <= set(info["models"]["medlsam"]["labels"]), info["models"]["medlsam"]["labels"]


def test_output_rtstruct_is_valid_stored_as_a_draft_and_reads_back(stack):
    second = _series_uid(stack["second_dir"])
    response = requests.post(
        f"{stack['api']}/infer/medlsam",
        params={"image": second, "output": "rtstruct"},
        data={"params": json.dumps({"stow": True})},
        timeout=600,
    )
    assert response.status_code == 200, response.text
    rs = stack["tmp"] / "result_rs.dcm"
    rs.write_bytes(response.content)
    assert dciodvfy(rs)["errors"] == [], dciodvfy(rs)["output"]
    back = read_rtstruct(rs, stack["second_dir"])
    for organ in ORGANS:
        mask = back.label.array == next(v for v, n in back.names.items() if n == organ)
        assert dice(mask, stack["truth"][organ]) > 0.8, organ
    drafts = requests.get(f"{stack['url']}/series", params={"Modality": "RTSTRUCT"}, timeout=60).json()
    assert len(drafts) == 2  # the ARIA structure set and the stored draft
    time.sleep(6)  # the series lists are re-read after 5 s
    info = requests.get(f"{stack['api']}/info/", timeout=60).json()
    assert info["datastore"]["total"] == 2 and info["datastore"]["completed"] == 1, info["datastore"]  # no template


def _stored_draft(url: str, study_uid: str):
    """The one RTSTRUCT series of ``study_uid`` on the DICOMweb server, read back (its single instance)."""
    from dicomweb_client.api import DICOMwebClient

    series = requests.get(f"{url}/series", params={"StudyInstanceUID": study_uid, "Modality": "RTSTRUCT"}, timeout=60)
    found = series.json()
    assert len(found) == 1, found
    series_uid = found[0]["0020000E"]["Value"][0]
    instances = DICOMwebClient(url).retrieve_series(study_uid, series_uid)
    assert len(instances) == 1
    return instances[0]


def _rois(dataset) -> dict[str, dict]:
    """Per ROI name of an RT Structure Set: its number, colour, contours, points and the contours' z (mm)."""
    names = {int(roi.ROINumber): str(roi.ROIName) for roi in dataset.StructureSetROISequence}
    out = {}
    for item in dataset.ROIContourSequence:
        contours = list(item.get("ContourSequence", []))
        out[names[int(item.ReferencedROINumber)]] = {
            "number": int(item.ReferencedROINumber),
            "color": [int(c) for c in item.ROIDisplayColor],
            "contours": len(contours),
            "points": sum(int(c.NumberOfContourPoints) for c in contours),
            "z": [float(c.ContourData[2]) for c in contours],
        }
    return out


def test_ohif_shows_the_stored_rtstruct(stack):
    """Chromium opens the second series' study in the bundled OHIF (basic viewer) and loads the stored draft as a user
    does (double-click its thumbnail, Yes to "open this Segmentation?"). OHIF parses every ROI of the file (names,
    colours, every contour and point, all CLOSED_PLANAR), makes them the segments of a contour segmentation shown on
    the CT series the file references, lists the organs in its segmentation panel, and on the slice through the heart
    draws each organ's outlines: as many as the file has on that slice, in the segment's colour."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    require("" if chromium else "Chromium is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require("Playwright is not installed (pip install -r requirements.txt)")
    import pydicom
    from ohif_driver import show_rtstruct

    header = pydicom.dcmread(next(iter(sorted(stack["second_dir"].glob("*.dcm")))), stop_before_pixels=True)
    draft = _stored_draft(stack["url"], str(header.StudyInstanceUID))
    assert draft.SeriesDescription == "MedLSAM Label draft"
    rois = _rois(draft)
    assert set(ORGANS) <= set(rois), sorted(rois)
    tic = time.perf_counter()
    with sync_playwright() as p:
        shown = show_rtstruct(
            p, chromium, stack["api"], str(header.StudyInstanceUID), str(draft.SeriesInstanceUID), SCREENSHOT, "Heart"
        )
    seconds = time.perf_counter() - tic
    state, drawn = shown["state"], shown["drawn"]
    times = shown["seconds"]
    print(
        f"OHIF: study {times['study_loaded']:.1f} s, RTSTRUCT loaded {times['rtstruct_loaded']:.1f} s, on the heart's "
        f"slice {times['shown']:.1f} s; browser {seconds:.1f} s"
    )
    assert shown["errors"] == [], shown["errors"]
    # the display set: our draft, referencing the second series, which the viewport now shows
    assert state["displaySet"]["Modality"] == "RTSTRUCT" and state["displaySet"]["isLoaded"], state["displaySet"]
    assert state["referencedSeries"] == str(header.SeriesInstanceUID)
    assert state["viewportSeries"] == [str(header.SeriesInstanceUID)]
    # what OHIF parsed: every ROI of the file, all of its contours and points
    parsed = {roi["name"]: roi for roi in state["structureSet"]}
    assert set(parsed) == set(rois), sorted(parsed)
    for name, roi in rois.items():
        got = parsed[name]
        assert (got["number"], got["color"], got["contours"], got["points"]) == (
            roi["number"],
            roi["color"],
            roi["contours"],
            roi["points"],
        ), name
        assert got["types"] == ["CLOSED_PLANAR"], name
    # the contour segmentation OHIF made of it: the organs as segments, one contour annotation per file contour,
    # shown (visible, Contour) in the viewport; the segmentation panel lists them
    by_index = {int(k): v for k, v in state["segments"].items()}
    assert by_index == {roi["number"]: name for name, roi in rois.items()}, by_index
    assert {by_index[int(k)]: n for k, n in state["annotations"].items()} == {
        name: roi["contours"] for name, roi in rois.items()
    }
    assert [r["type"] for r in state["representations"] if r["visible"]] == ["Contour"], state["representations"]
    assert sorted(row[-1] for row in shown["panel"]) == sorted(rois), shown["panel"]
    # rendered: on the slice through the heart, each organ's outlines drawn, as many as the file has on that slice
    assert abs(drawn["z"] - shown["target"]["z"]) < 1e-3 and not drawn["loading"], drawn
    assert shown["overlay"].endswith(f"({shown['target']['index'] + 1}/{shown['target']['slices']})"), shown["overlay"]
    on_slice = {name: sum(abs(z - drawn["z"]) < 0.01 for z in roi["z"]) for name, roi in rois.items()}
    assert on_slice["Heart"] > 0 and sum(v > 0 for v in on_slice.values()) >= 4, on_slice
    for index, segment in drawn["segments"].items():
        name = by_index[int(index)]
        assert segment["annotations"] == segment["drawn"] == on_slice[name], (name, segment, on_slice)
        assert all(abs(z - drawn["z"]) < 0.01 for z in segment["zs"]), (name, segment)
    assert SCREENSHOT.is_file()


def test_output_rtstruct_needs_a_dicom_image_and_output_is_checked(stack):
    bogus = requests.post(
        f"{stack['api']}/infer/medlam", params={"image": _series_uid(stack["second_dir"]), "output": "pdf"}, timeout=60
    )
    assert bogus.status_code == 400 and "output" in bogus.json()["detail"], bogus.text


def test_a_structure_set_without_contours_is_skipped_with_its_reason(stack):
    """Another tool stores, as the newest label of the second series, a structure set whose ROIs have no contours:
    the bank skips it with the reason in /info/ and keeps serving with the thorax template."""
    import pydicom
    from pydicom.uid import generate_uid

    bad = pydicom.dcmread(stack["tmp"] / "result_rs.dcm")
    for roi in bad.ROIContourSequence:
        del roi.ContourSequence
    bad.SeriesInstanceUID, bad.SOPInstanceUID = generate_uid(), generate_uid()
    bad.file_meta.MediaStorageSOPInstanceUID = bad.SOPInstanceUID
    bad.SeriesDescription = "contours lost by another tool"
    bad.save_as(stack["tmp"] / "bad_rs.dcm")
    stow_files([stack["tmp"] / "bad_rs.dcm"], stack["url"])
    time.sleep(6)  # the series lists are re-read after 5 s
    second = _series_uid(stack["second_dir"])
    answer = requests.post(f"{stack['api']}/infer/medlam", params={"image": second}, timeout=600)
    assert answer.status_code == 200, answer.text[:300]
    bank = requests.get(f"{stack['api']}/info/", timeout=60).json()["template_bank"]
    assert bank["state"] == "ready" and len(bank["templates"]) == 1, bank
    assert "no contours" in bank["skipped"][second], bank
