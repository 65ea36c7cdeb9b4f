"""RT Structure Sets: OpenKBP labels -> RTSTRUCT -> labels and the real ARIA structure set -> label -> RTSTRUCT ->
label give back every organ voxel for voxel; DICOM's validator (dciodvfy) finds no error in what is written; an
independent reader (plastimatch) rasterises our files and the ARIA file as our reader does; ROI names map to TG-263
organs (synonyms, targets left out, unmapped reported); `medlsam dicom import`; bad structure sets get clear errors.

Why exact: written outlines run half-way between voxel centres (marching squares at 0.5), so every centre is at
least 0.35 voxel from an edge and re-rasterising (centre inside, even-odd) cannot differ. The real ARIA contours
are free polygons: there our reader and plastimatch (--xor-contours) differ by at most one voxel per ROI (a centre
lying on an edge, counted by each tool's tie rule); the tolerance, Dice >= 0.999, allows 8 voxels on the smallest
ROI (spinal cord, 8273 voxels). plastimatch's default (a slice's contours united) would fill ARIA's hole contours.
dciodvfy and plastimatch are Debian packages installed by scripts/system_deps.sh: the tests that need them skip
with the reason when absent, and fail instead under MEDLSAM_REQUIRE_DICOMWEB=1 (CI).
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pydicom
import pytest

from medlsam.cli import main
from medlsam.errors import MedLSAMError, TemplateError
from medlsam.io.dicom import SeriesFields, export_ct_series
from medlsam.io.volume import CTVolume, read_volume
from medlsam.rt.check import dciodvfy, missing_tools, plastimatch_masks
from medlsam.rt.roi_names import SynonymsError, load_synonyms, map_rois, standard_name
from medlsam.rt.rtstruct import read_ct_series, read_rtstruct, roi_masks
from medlsam.rt.write import label_on_grid, write_rtstruct
from medlsam.utils.metrics import dice
from medlsam.utils.names import read_names

KBP_CASES = (4, 13)  # train scans with all seven organs: 3.9 and 5.1 mm pixels
ARIA = "20191031-215249_m.dcm"
ARIA_ORGANS = {"Lung_R", "Lung_L", "Heart", "SpinalCord", "Liver"}
PLASTIMATCH_MIN_DICE = 0.999


def require_tools() -> None:
    """Skip with the reason, or fail when CI demands these tests (MEDLSAM_REQUIRE_DICOMWEB=1)."""
    why = missing_tools()
    if why:
        if os.environ.get("MEDLSAM_REQUIRE_DICOMWEB") == "1":
            pytest.fail(f"MEDLSAM_REQUIRE_DICOMWEB=1 but {why}: run scripts/system_deps.sh as root")
        pytest.skip(why)


@pytest.fixture(scope="module")
def names(data_dir):
    return read_names(data_dir / "openkbp" / "dataset.json")


def kbp_case(data_dir, tmp, names, case: int) -> dict:
    """An OpenKBP scan as a DICOM CT series written by the project's own exporter, its label and our RTSTRUCT."""
    image = data_dir / "openkbp" / "images" / f"openkbp_pt_{case}.nii.gz"
    export_ct_series(image, tmp / "ct", SeriesFields(patient_id=f"openkbp_pt_{case}", patient_name="KBP^Test"))
    series = read_ct_series(tmp / "ct")
    label = read_volume(data_dir / "openkbp" / "labels" / f"openkbp_pt_{case}.nii.gz")
    rs = write_rtstruct(label, names, series, tmp / "rs.dcm")
    return {"case": case, "series": series, "label": label, "rs": rs, "tmp": tmp}


@pytest.fixture(scope="module")
def kbp_all(data_dir, tmp_path_factory, names) -> list[dict]:
    return [kbp_case(data_dir, tmp_path_factory.mktemp(f"kbp{c}"), names, c) for c in KBP_CASES]


@pytest.fixture(scope="module")
def kbp(kbp_all) -> dict:
    return kbp_all[0]


@pytest.fixture(scope="module")
def thorax_dir(data_dir):
    folder = data_dir / "dicom_rt" / "thorax_rt"
    assert (folder / ARIA).is_file(), f"the real structure set is missing under {folder}"
    return folder


@pytest.fixture(scope="module")
def thorax(thorax_dir):
    return read_ct_series(thorax_dir)


@pytest.fixture(scope="module")
def thorax_import(thorax, thorax_dir):
    return read_rtstruct(thorax_dir / ARIA, thorax)


@pytest.fixture(scope="module")
def thorax_written(thorax, thorax_import, tmp_path_factory):
    out = tmp_path_factory.mktemp("thorax") / "rs.dcm"
    return write_rtstruct(thorax_import.label, thorax_import.names, thorax, out, colors=thorax_import.colors)


# ------------------------------------------------------------------------------------------------ round trips
def test_openkbp_label_rtstruct_label_is_exact(kbp_all, names):
    for kbp in kbp_all:
        expected = label_on_grid(kbp["label"], kbp["series"].volume)  # the NIfTI's k axis runs the other way
        result = read_rtstruct(kbp["rs"], kbp["series"], organs=names)
        present = {v: n for v, n in names.items() if (expected == v).any()}
        assert result.names == present and not result.unmapped and not result.warnings, kbp["case"]
        for value in present:
            assert dice(result.label.array == value, expected == value) == 1.0, (kbp["case"], names[value])
        np.testing.assert_array_equal(result.label.array, expected)


def test_written_rtstruct_references_and_modules(kbp, names):
    ds = pydicom.dcmread(kbp["rs"])
    series = kbp["series"]
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3" and ds.Modality == "RTSTRUCT"
    assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
    assert ds.StudyInstanceUID == series.study_uid and ds.SeriesInstanceUID != series.series_uid
    assert ds.SOPInstanceUID not in series.instance_uids
    assert ds.PatientID == series.header.PatientID and str(ds.PatientName) == "KBP^Test"
    frame = ds.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == series.frame_of_reference_uid
    study = frame.RTReferencedStudySequence[0]
    assert study.ReferencedSOPInstanceUID == series.study_uid
    referenced = study.RTReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == series.series_uid
    assert [i.ReferencedSOPInstanceUID for i in referenced.ContourImageSequence] == series.instance_uids
    roi_names = {int(r.ROINumber): r.ROIName for r in ds.StructureSetROISequence}
    assert roi_names == {v: n for v, n in names.items() if v in roi_names} and len(roi_names) >= 5
    assert {r.ROIGenerationAlgorithm for r in ds.StructureSetROISequence} == {"AUTOMATIC"}
    assert {o.RTROIInterpretedType for o in ds.RTROIObservationsSequence} == {"ORGAN"}
    z_of = {uid: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])
            for uid, f in zip(series.instance_uids, series.files)}  # fmt: skip
    for roi in ds.ROIContourSequence:
        assert len(roi.ROIDisplayColor) == 3
        for contour in roi.ContourSequence:
            points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
            assert contour.ContourGeometricType == "CLOSED_PLANAR" and len(points) == contour.NumberOfContourPoints
            assert not np.allclose(points[0], points[-1])  # closed by definition, the first point not repeated
            uid = contour.ContourImageSequence[0].ReferencedSOPInstanceUID
            assert np.allclose(points[:, 2], z_of[uid], atol=1e-4)  # on the plane of the instance it names


def test_holes_are_separate_contours(kbp, tmp_path):
    """A ring (a hole with an island inside) is written as three contours and read back by even-odd."""
    series = kbp["series"]
    label = np.zeros(series.volume.shape, np.uint8)
    i, j = np.meshgrid(*(np.arange(n) for n in label.shape[:2]), indexing="ij")
    r = np.hypot(i - 64, j - 60)
    label[:, :, 40][(r <= 20) & (r > 10)] = 1
    label[:, :, 40][r <= 4] = 1
    label[30:40, 30:40, 41:44] = 2
    write_rtstruct(label, {1: "Ring", 2: "Box"}, series, tmp_path / "ring.dcm")
    ds = pydicom.dcmread(tmp_path / "ring.dcm")
    assert len(ds.ROIContourSequence[0].ContourSequence) == 3
    back = roi_masks(tmp_path / "ring.dcm", series)
    np.testing.assert_array_equal(back[1][1].full(label.shape), label == 1)
    np.testing.assert_array_equal(back[2][1].full(label.shape), label == 2)


def test_thorax_import(thorax_import):
    result = thorax_import
    assert set(result.names.values()) == ARIA_ORGANS
    assert result.excluded.keys() == {"GTVp", "CTVp", "PTV4140"}
    lungs = next(d for d in result.rois if d.name == "LUNGS")
    assert lungs.status == "dropped" and "composite" in lungs.reason  # the union of LUNG_R and LUNG_L
    assert (
        result.unmapped == []
        and result.dropped.keys() == {"LUNGS"}
        and any("ReferencedFrameOfReferenceSequence" in w for w in result.warnings)
    )
    assert result.label.array.dtype == np.uint8 and result.label.shape == (512, 512, 105)
    assert 50 < result.voxels[3] * np.prod(result.label.spacing) / 1000 < 2000  # the heart, in cc


def test_thorax_placed_by_patient_coordinates(thorax, thorax_dir, thorax_import):
    """References stripped or stale and contours shuffled: the same label (slices found by z, not by UID/order)."""
    ds = pydicom.dcmread(thorax_dir / ARIA)
    for roi in ds.ROIContourSequence:
        roi.ContourSequence = pydicom.sequence.Sequence(list(roi.ContourSequence)[::-1])
        for n, contour in enumerate(roi.ContourSequence):
            if n % 2:
                del contour.ContourImageSequence
            else:
                contour.ContourImageSequence[0].ReferencedSOPInstanceUID = "1.2.3.4"
    result = read_rtstruct(ds, thorax)
    np.testing.assert_array_equal(result.label.array, thorax_import.label.array)
    assert any("stale" in w for w in result.warnings)


def test_thorax_rtstruct_label_rtstruct_label(thorax, thorax_import, thorax_written):
    back = read_rtstruct(thorax_written, thorax)
    assert back.names == thorax_import.names and back.colors == thorax_import.colors
    for value in thorax_import.names:
        assert dice(back.label.array == value, thorax_import.label.array == value) == 1.0


# --------------------------------------------------------------------------------- independent tools
def test_dciodvfy_no_errors(kbp_all, thorax_written):
    require_tools()
    for path in [kbp["rs"] for kbp in kbp_all] + [thorax_written]:
        verdict = dciodvfy(path)
        assert verdict["errors"] == [], verdict["output"]
        assert "RTStructureSet" in verdict["output"]


def test_plastimatch_agrees_on_ours(kbp_all, thorax, thorax_written):
    require_tools()
    for rs, series in [(kbp["rs"], kbp["series"]) for kbp in kbp_all] + [(thorax_written, thorax)]:
        theirs = plastimatch_masks(rs, series.folder, reference=series.volume)
        ours = roi_masks(rs, series)
        assert set(theirs) == {name for name, _ in ours.values()}
        for name, mask in ours.values():
            np.testing.assert_array_equal(theirs[name], mask.full(series.volume.shape), err_msg=name)


def test_plastimatch_agrees_on_aria(thorax, thorax_dir):
    require_tools()
    theirs = plastimatch_masks(thorax_dir / ARIA, thorax_dir, reference=thorax.volume)
    for name, mask in roi_masks(thorax_dir / ARIA, thorax).values():
        assert dice(theirs[name], mask.full(thorax.volume.shape)) >= PLASTIMATCH_MIN_DICE, name


# ------------------------------------------------------------------------------------------ ROI names
@pytest.mark.parametrize(
    "name,standard",
    [("Parotid (L)", "Parotid_L"), ("L Parotid", "Parotid_L"), ("Parotid_L", "Parotid_L"),
     ("PAROTID LT", "Parotid_L"), ("parotid  left", "Parotid_L"), ("RightParotid", "Parotid_R"),
     ("Brain Stem", "Brainstem"), ("BRAINSTEM", "Brainstem"), ("SPINALCORD", "SpinalCord"),
     ("Spinal Cord", "SpinalCord"), ("Cord", "SpinalCord"), ("spinal_cord", "SpinalCord"),
     ("LUNG_R", "Lung_R"), ("Mandible", "Bone_Mandible"), ("Foo", None)],
)  # fmt: skip
def test_standard_names(name, standard):
    assert standard_name(name) == standard


def test_targets_left_out_and_unmapped_reported(tmp_path):
    rois = [(1, "PTV70", ""), (2, "GTVp", "GTV"), (3, "Ring_PTV", ""), (4, "Cord_PRV5", ""), (5, "z_opt", ""),
            (6, "ITV", ""), (7, "Brain Stem", ""), (8, "Parotid (L)", "AVOIDANCE"), (9, "L Parotid", ""),
            (10, "Mystery", ""), (11, "Couch Surface", "SUPPORT"), (12, "BODY", "EXTERNAL")]  # fmt: skip
    decisions = {d.name: d for d in map_rois(rois)}
    assert {n for n, d in decisions.items() if d.status == "excluded"} == {
        "PTV70", "GTVp", "Ring_PTV", "Cord_PRV5", "z_opt", "ITV", "Couch Surface", "BODY"
    }  # fmt: skip
    assert decisions["Brain Stem"].organ == "Brainstem" and decisions["Parotid (L)"].organ == "Parotid_L"
    assert decisions["L Parotid"].status == "unmapped" and "duplicate" in decisions["L Parotid"].reason
    assert decisions["Mystery"].status == "unmapped"
    kept = {d.name: d for d in map_rois(rois, keep_targets=True)}
    assert kept["PTV70"].organ == "PTV70" and kept["Mystery"].status == "unmapped"
    bank = {d.name: d.organ for d in map_rois(rois, organs={3: "RightParotid", 4: "LeftParotid", 1: "Brainstem"})}
    assert bank["Parotid (L)"] == "LeftParotid" and bank["Brain Stem"] == "Brainstem"
    user = tmp_path / "synonyms.json"
    user.write_text(json.dumps({"Brainstem": ["Mystery"], "paired": {"Cochlea": ["Inner Ear"]}}))
    assert standard_name("Mystery", load_synonyms(user)) == "Brainstem"
    user.write_text(json.dumps({"organs": {"Cochlea_L": "Inner Ear Left"}}))
    assert standard_name("inner_ear_left", load_synonyms(user)) == "Cochlea_L"
    user.write_text("[1, 2]")
    with pytest.raises(SynonymsError, match="JSON object"):
        load_synonyms(user)


# ---------------------------------------------------------------------------------------------- the CLI
def test_cli_import(kbp, names, data_dir, tmp_path, capsys):
    series = kbp["series"]
    label = label_on_grid(kbp["label"], series.volume).copy()
    label[10:20, 10:20, 10:15], label[20:30, 10:20, 10:15] = 8, 9
    clinical = {1: "Brain Stem", 2: "Cord", 3: "Parotid (R)", 4: "PAROTID LT", 5: "Oesophagus", 6: "Larynx",
                7: "Mandible", 8: "PTV70", 9: "Thing_9"}  # fmt: skip
    rs = write_rtstruct(label, clinical, series, tmp_path / "rs.dcm")
    out = tmp_path / "imported"
    dataset_json = str(data_dir / "openkbp" / "dataset.json")
    assert main(["dicom", "import", str(series.folder), "--rtstruct", str(rs), "--out", str(out),
                 "--names", dataset_json]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "unmapped ROIs (1): 'Thing_9'" in printed and "left out  'PTV70'" in printed
    image, back = read_volume(out / "image.nii.gz"), read_volume(out / "label.nii.gz")
    assert np.allclose(image.affine, series.volume.affine) and np.allclose(back.affine, image.affine)
    expected = np.where(label > 7, 0, label)
    np.testing.assert_array_equal(back.array, expected)
    assert read_names(out / "names.json") == {v: names[v] for v in np.unique(expected) if v}
    report = json.loads((out / "import.json").read_text())
    assert report["unmapped"] == ["Thing_9"] and "PTV70" in report["excluded"]


def test_cli_import_thorax_folder(thorax_dir, tmp_path, capsys):
    """The structure set is found in the series folder; the CT keeps the scanner's geometry."""
    assert main(["dicom", "import", str(thorax_dir), "--out", str(tmp_path), "--format", "nrrd"]) == 0
    printed = capsys.readouterr().out
    assert "composite" in printed and "SpinalCord" in printed
    assert set(read_names(tmp_path / "names.json").values()) == ARIA_ORGANS


@pytest.mark.slow  # a template bank from a 512 x 512 x 105 scanner series (about 40 s), one segmentation
def test_cli_templates_from_a_real_structure_set_segment_another_series_as_rtstruct(
    thorax, thorax_dir, thorax_import, tmp_path, capsys
):
    """The real scanner series and its ARIA structure set become a template bank (`templates build --rtstruct`);
    another series of the patient (every 2nd voxel of 85 slices: 2.5 x 2.5 x 8 mm, a new grid, written as DICOM)
    is segmented with `segment --rtstruct`; the structure set written is valid for dciodvfy and reads back as the
    label, every organ near its clinical contour."""
    bank = tmp_path / "thorax_bank.pt"
    assert main(["templates", "build", "--images", str(thorax_dir), "--rtstruct", "--out", str(bank)]) == 0
    assert "Lung_R, Lung_L, Heart, SpinalCord, Liver" in capsys.readouterr().out
    sub = (slice(0, None, 2), slice(0, None, 2), slice(10, 95, 2))
    affine = thorax.volume.affine.copy()
    affine[:3, 3] = thorax.volume.index_to_world(np.array([0, 0, 10]))[0]
    affine[:3, :3] *= 2.0
    second = CTVolume(np.ascontiguousarray(thorax.volume.array[sub]).astype(np.int16), affine)
    from medlsam.io.volume import write_volume

    write_volume(second.array, second, tmp_path / "second.nii.gz")
    export_ct_series(tmp_path / "second.nii.gz", tmp_path / "second", SeriesFields(series_description="second"))
    out, rs = tmp_path / "second_label.nii.gz", tmp_path / "second_rs.dcm"
    args = ["segment", str(tmp_path / "second"), "--templates", str(bank), "--out", str(out), "--quiet"]
    assert main([*args, "--prior-weight", "1", "--rtstruct", str(rs)]) == 0
    label = read_volume(out).array
    back = read_rtstruct(rs, tmp_path / "second")
    truth = thorax_import.label.array[sub]
    for organ in ARIA_ORGANS:
        value = next(v for v, n in thorax_import.names.items() if n == organ)
        mine = label == value
        assert dice(back.label.array == next(v for v, n in back.names.items() if n == organ), mine) == 1.0, organ
        assert dice(mine, truth == value) > 0.8, organ
    if not missing_tools():
        assert dciodvfy(rs)["errors"] == [], dciodvfy(rs)


# --------------------------------------------------------------------------------------------- bad input
def test_bad_structure_sets(kbp, thorax, thorax_dir):
    series = kbp["series"]
    with pytest.raises(TemplateError, match="not an RT Structure Set"):
        read_rtstruct(series.files[0], series)
    with pytest.raises(TemplateError, match="not a DICOM file"):
        read_rtstruct(thorax_dir.parent / "README.md", series)
    with pytest.raises(TemplateError, match="frame of reference"):
        read_rtstruct(thorax_dir / ARIA, series)  # the thorax contours on another patient's CT
    ds = pydicom.dcmread(kbp["rs"])
    shifted = copy.deepcopy(ds)
    for roi in shifted.ROIContourSequence:
        for contour in roi.ContourSequence:
            points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3) + [0, 0, 1000]
            contour.ContourData = [f"{v:.4f}" for v in points.ravel()]
    with pytest.raises(TemplateError, match="no contour of its organs lies on the CT"):
        read_rtstruct(shifted, series)
    opened = copy.deepcopy(ds)
    for contour in opened.ROIContourSequence[0].ContourSequence:
        contour.ContourGeometricType = "OPEN_PLANAR"
    result = read_rtstruct(opened, series)
    assert any("open_planar contours" in w for w in result.warnings)
    assert result.rois[0].status == "dropped"
    empty = copy.deepcopy(ds)
    for roi in empty.ROIContourSequence:
        del roi.ContourSequence
    with pytest.raises(TemplateError, match="no contours"):
        read_rtstruct(empty, series)
    with pytest.raises(MedLSAMError, match="empty"):
        write_rtstruct(np.zeros(series.volume.shape, np.uint8), {}, series, kbp["tmp"] / "never.dcm")
    wrong = CTVolume(kbp["label"].array, kbp["label"].affine * np.diag([2, 1, 1, 1]), "wrong grid")
    with pytest.raises(MedLSAMError, match="not on the CT series' voxel grid"):
        write_rtstruct(wrong, {}, series, kbp["tmp"] / "never.dcm")
    assert not (kbp["tmp"] / "never.dcm").exists()


def test_three_hundred_rois_and_duplicated_names(kbp, tmp_path):
    """A structure set of 300 ROIs (a planning system's helpers, z_*) is read with every ROI accounted for: left out
    with the reason, or imported on request; two ROIs that map to one organ keep the first and report the second."""
    label = np.zeros(kbp["series"].volume.shape, np.uint16)
    for n in range(300):
        i, j = 4 + 6 * (n % 20), 4 + 6 * (n // 20)
        label[i : i + 3, j : j + 3, 2:5] = n + 1
    many = write_rtstruct(label, {n + 1: f"z_opt_{n}" for n in range(300)}, kbp["series"], tmp_path / "many.dcm")
    helpers = read_rtstruct(many, kbp["series"])
    assert not helpers.names and len(helpers.rois) == 300
    assert all(d.status == "excluded" and "helper" in d.reason for d in helpers.rois)
    kept = read_rtstruct(many, kbp["series"], keep_targets=True)
    assert len(kept.names) == 300 and min(kept.voxels.values()) == 27
    twice = copy.deepcopy(pydicom.dcmread(kbp["rs"]))
    twice.StructureSetROISequence[1].ROIName = twice.StructureSetROISequence[0].ROIName  # two ROIs, one name
    result = read_rtstruct(twice, kbp["series"])
    first, second = (int(r.ROINumber) for r in twice.StructureSetROISequence[:2])
    decisions = {d.number: d for d in result.rois}
    assert decisions[first].status == "mapped" and decisions[second].status != "mapped"
    assert "duplicate" in decisions[second].reason, decisions[second]
