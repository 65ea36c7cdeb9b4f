"""The MedLSAM pipeline with the real LiteMedSAM weights on a real CT: slice embedding cache, prompt geometry,
label assembly, atomic outputs, bad input and the `medlsam segment` command end to end.

The scan is the abdomen test slab with every 5th slice kept (6 slices of 15 mm, 122 x 101): few slices, so
few encoder passes (about 2.5 s of CPU each), and still over the localiser's 48 mm minimum extent."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import right_anterior_marker

from medlsam.atlas.localize import Localizer, OrganLocation
from medlsam.cli import main as cli_main
from medlsam.errors import MedLSAMError, TemplateError
from medlsam.io.volume import CTVolume, read_volume, write_volume
from medlsam.segment.assemble import interpolate_slices
from medlsam.segment.outputs import check_output_path, write_segmentation
from medlsam.segment.pipeline import MedLSAMPipeline, SegmentOptions
from medlsam.segment.prompts import encoded_slices, organ_prompts
from medlsam.segment.sam import build_segmenter
from medlsam.segment.sam.slices import SliceEmbeddings

STEP = 5


@pytest.fixture(scope="module")
def abdomen(data_dir):
    folder = data_dir / "abdomen"
    ct, label = read_volume(folder / "abdomen_slab_ct.nii.gz"), read_volume(folder / "abdomen_slab_label.nii.gz")
    names = {int(k): v for k, v in json.loads((folder / "README.json").read_text())["labels"].items()}
    affine = ct.affine.copy()
    affine[:3, 2] *= STEP
    ct = CTVolume(np.ascontiguousarray(ct.array[:, :, ::STEP], dtype=np.float32), affine, "abdomen_thin.nii.gz")
    label = CTVolume(np.ascontiguousarray(label.array[:, :, ::STEP]).astype(np.uint8), affine.copy(), "label")
    return ct, label, names


@pytest.fixture(scope="module")
def files(abdomen, tmp_path_factory):
    """The thinned scan on disk and a template bank built from it with the shipped MedLAM."""
    from medlsam.atlas.bank_builder import build_bank
    from medlsam.medlam.network import load_medlam
    from medlsam.paths import default_medlam_path

    ct, label, names = abdomen
    folder = tmp_path_factory.mktemp("pipeline")
    write_volume(ct.array, ct, folder / "ct.nii.gz")
    model = load_medlam(default_medlam_path())
    keep = {v: n for v, n in names.items() if n in ("liver", "stomach", "spleen")}
    masked = CTVolume(np.where(np.isin(label.array, list(keep)), label.array, 0).astype(np.uint8), label.affine)
    bank = build_bank(model, [ct], [masked], keep)
    bank.save(folder / "bank.pt")
    return folder, model, bank


@pytest.fixture(scope="module")
def segmenter():
    return build_segmenter("lite_medsam")


def location(name: str, value: int, mask: np.ndarray | None, per_slice: bool = False) -> OrganLocation:
    """A found organ with the mask's box (and, per_slice, one slab per axial slice with that slice's box)."""
    if mask is None or not mask.any():
        return OrganLocation(name, value, found=False, reason="test: not found")
    idx = np.argwhere(mask)
    loc = OrganLocation(name, value, found=True, box_voxel=[idx.min(0).tolist(), idx.max(0).tolist()], score=1.0)
    if per_slice:
        for k in np.unique(idx[:, 2]):
            on = idx[idx[:, 2] == k]
            loc.slabs.append({"box_voxel": [on.min(0).tolist(), on.max(0).tolist()]})
    return loc


def test_prompts_follow_the_slice_axes_for_any_axis_order(abdomen):
    """x = column, y = row of np.take(array, k, axis), whichever file axis is cranio-caudal."""
    ct, label, _ = abdomen
    mask = label.array == 5
    for order in [(0, 1, 2), (2, 0, 1), (1, 2, 0)]:
        arr, lab = ct.array.transpose(order), mask.transpose(order)
        affine = np.eye(4)
        affine[:3, :3], affine[:3, 3] = ct.affine[:3, :3][:, list(order)], ct.affine[:3, 3]
        volume = CTVolume(arr, affine)
        emb = SliceEmbeddings(None, volume)
        assert emb.axis == order.index(2)
        prompts = organ_prompts(location("liver", 5, lab), emb.axis, volume.shape, "wpl")
        k = sorted(prompts)[2]
        sl = np.take(lab, k, axis=emb.axis)
        rows, cols = np.nonzero(np.take(lab, sorted(prompts)[0], axis=emb.axis) | sl)
        x0, y0, x1, y1 = prompts[k]
        assert x0 <= cols.min() and x1 >= cols.max() and y0 <= rows.min() and y1 >= rows.max()
        assert x1 <= sl.shape[1] - 1 and y1 <= sl.shape[0] - 1
        # the encoder sees the radiological view: rows and columns swapped when the file stores them the other way
        assert emb.slice_image(k).shape == (*(sl.shape[::-1] if emb.transpose else sl.shape), 3)


def test_spl_prompts_use_the_slab_of_each_slice():
    loc = OrganLocation(
        "o",
        1,
        True,
        box_voxel=[[0, 0, 2], [30, 40, 9]],
        slabs=[{"box_voxel": [[5, 6, 2], [10, 12, 5]]}, {"box_voxel": [[20, 22, 5], [25, 30, 9]]}],
    )
    prompts = organ_prompts(loc, 2, (64, 64, 20), "spl")
    assert sorted(prompts) == list(range(2, 10))
    assert prompts[3].tolist() == [6, 5, 12, 10] and prompts[8].tolist() == [22, 20, 30, 25]
    assert prompts[5].tolist() in ([6, 5, 12, 10], [22, 20, 30, 25])  # boundary slice: one of the two slabs
    assert organ_prompts(loc, 2, (64, 64, 20), "wpl")[5].tolist() == [0, 0, 40, 30]


def test_pipeline_encodes_each_slice_once_and_assembles_the_label(abdomen, files, segmenter):
    ct, label, names = abdomen
    _, model, bank = files
    values = {n: v for v, n in names.items()}
    region = np.zeros(label.shape, bool)
    region[:, :, 2:4] = True  # two slices: liver and stomach share both
    locations = {n: location(n, values[n], (label.array == values[n]) & region, True) for n in ("liver", "stomach")}
    locations["spleen"] = location("spleen", values["spleen"], None)
    pipeline = MedLSAMPipeline(Localizer(model, bank), segmenter, SegmentOptions(mode="spl"))  # each slice's own box
    embeddings = SliceEmbeddings(segmenter, ct)
    result = pipeline.segment_locations(ct, locations, embeddings=embeddings)
    assert result.encoder_calls == 2 == embeddings.encoder_calls  # two distinct slices, both organs decoded together
    assert result.reference_encoder_calls == 4  # one per organ per slice
    assert result.label.shape == ct.shape and result.label.dtype == np.uint8
    assert result.not_found == ["spleen"] and result.label_names == {n: values[n] for n in locations}
    assert set(np.unique(result.label)) <= {0, values["liver"], values["stomach"]}
    assert not result.label[:, :, [0, 1, 4, 5]].any()
    liver, truth = result.label == values["liver"], (label.array == values["liver"]) & region
    assert (
        2 * (liver & truth).sum() / (liver.sum() + truth.sum()) > 0.75
    )  # 0.85 measured (soft-tissue window; the slab bottom)
    assert result.boxes["liver"]["voxels"] == int(liver.sum()) and result.boxes["spleen"]["found"] is False
    again = pipeline.segment_locations(ct, locations, embeddings=embeddings)  # cached: no encoder call
    assert again.encoder_calls == 0 and np.array_equal(again.label, result.label)
    doc = result.to_json()
    assert set(doc) == {"labels", "boxes", "not_found", "timings_s", "encoder_calls", "reference_encoder_calls"}
    assert {"encode", "decode", "assemble"} <= set(doc["timings_s"])


def test_prior_mode_prompts_each_slice_with_the_template_prior_and_blends_sam(abdomen, files, segmenter):
    """The template is the scan itself, so the matched prior is the organ: the prior alone reproduces the
    label without any encoder call, and the blend with SAM (every 2nd slice encoded) stays close to it."""
    ct, label, names = abdomen
    _, model, bank = files
    values = {n: v for v, n in names.items()}
    truth = label.array == values["liver"]

    def liver_dice(result) -> float:
        liver = result.label == values["liver"]
        return 2 * (liver & truth).sum() / (liver.sum() + truth.sum())

    plain = Localizer(model, bank)  # boxes only: the prior is computed only when the pipeline asks for it
    assert plain.localize(ct, ["liver"])["organs"]["liver"].prior is None
    prior = plain.localize(ct, ["liver"], prior=True)["organs"]["liver"].prior  # in the file's own frame
    assert prior.probabilities.shape == tuple(prior.high - prior.low + 1)
    assert np.all(prior.low >= 0) and np.all(prior.high < np.array(ct.shape))
    region = prior.region()
    assert (
        2 * ((prior.probabilities > 0.5) & truth[region]).sum() / ((prior.probabilities > 0.5).sum() + truth.sum())
        > 0.9
    )
    alone = MedLSAMPipeline(plain, segmenter, SegmentOptions(mode="prior", prior_weight=1.0))
    result = alone.segment(ct, ["liver", "stomach"])
    assert result.encoder_calls == 0 and result.timings_s["encode"] == 0.0
    assert liver_dice(result) > 0.9
    blended = MedLSAMPipeline(
        Localizer(model, bank),
        segmenter,
        SegmentOptions(mode="prior", prior_weight=0.7, slice_spacing_mm=2 * ct.spacing[2]),
    )
    embeddings = SliceEmbeddings(segmenter, ct)
    result = blended.segment(ct, ["liver"], embeddings=embeddings)
    slices = np.flatnonzero(truth.any(axis=(0, 1)))
    assert 0 < result.encoder_calls < len(slices)  # every 2nd slice of the liver's range (and its ends)
    assert liver_dice(result) > 0.85
    # each organ's blended probability before the organs compete: with one organ, exactly the label's voxels
    located = blended.localizer.localize(ct, ["liver"], prior=True)["organs"]
    calls = embeddings.encoder_calls
    probabilities = blended.organ_probabilities(ct, located, embeddings)
    assert embeddings.encoder_calls == calls  # the slices SAM needs were encoded above: none again
    assert np.array_equal(probabilities["liver"] > 0.5, result.label == values["liver"])
    # the learned path's few-shot organs: SAM blends in only where the prior weight is below 1
    from medlsam.learn.predict import blend_sam

    priors = {"liver": located["liver"].prior, "stomach": None}

    def blended(used: dict, *args) -> tuple[dict, dict, dict]:
        probs, served = {}, dict(used)
        return blend_sam(segmenter, ct, priors, {}, probs, served, values, *args), probs, served

    used = {"liver": "fewshot", "stomach": "fewshot"}
    assert blended(used) == ({}, {}, used)  # shipped weights: the prior alone
    assert blended({**used, "liver": "learned"}, 0.7) == ({}, {}, {**used, "liver": "learned"})
    weights, blend, served = blended(used, 0.7, embeddings)
    assert weights == {"liver": 0.7} and set(blend) == {"liver"}  # the stomach has no prior here: not served
    assert served == {"liver": "fewshot_sam", "stomach": "fewshot"}
    here = blend["liver"] > 0.5
    assert 2 * (here & truth).sum() / (here.sum() + truth.sum()) > 0.85
    # without template matching there is no prior: the organ's box on every slice, SAM alone
    from medlsam.atlas.localize import LocalizeOptions

    no_prior = MedLSAMPipeline(
        Localizer(model, bank, LocalizeOptions(match=False)), segmenter, SegmentOptions(mode="prior", prior_weight=1.0)
    )
    result = no_prior.segment(ct, ["liver"], embeddings=embeddings)
    assert result.reference_encoder_calls > 0 and result.boxes["liver"]["voxels"] > 0


def test_write_segmentation_keeps_geometry_and_is_atomic(abdomen, tmp_path, monkeypatch):
    ct, label, _ = abdomen
    from medlsam.segment.pipeline import SegmentationResult

    result = SegmentationResult(label.array.copy(), {"liver": 5}, {"liver": {"found": True}}, [], {"decode": 1.0}, 3, 6)
    for name in ("seg.nii.gz", "seg.nrrd"):
        write_segmentation(result, ct, tmp_path / name)
        back = read_volume(tmp_path / name)
        assert np.array_equal(back.array, label.array) and np.allclose(back.affine, ct.affine, atol=1e-4)
        doc = json.loads((tmp_path / (name + ".json")).read_text())
        assert doc["labels"] == {"liver": 5} and doc["encoder_calls"] == 3 and "write" in doc["timings_s"]
    before = sorted(p.name for p in tmp_path.iterdir())

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("medlsam.segment.outputs.json.dump", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_segmentation(result, ct, tmp_path / "other.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing half-written, no temporary left


def test_bad_output_paths_fail_early(tmp_path):
    for bad, message in [
        (tmp_path / "seg.png", "NIfTI or NRRD"),
        (tmp_path / "missing" / "seg.nii.gz", "does not exist"),
        (tmp_path, "NIfTI or NRRD"),
    ]:
        with pytest.raises(MedLSAMError, match=message):
            check_output_path(bad)
    (tmp_path / "file").write_text("")
    with pytest.raises(MedLSAMError, match="does not exist"):
        check_output_path(tmp_path / "file" / "seg.nii.gz")
    (tmp_path / "dir.nii.gz").mkdir()
    with pytest.raises(MedLSAMError, match="is a folder"):
        check_output_path(tmp_path / "dir.nii.gz")


def test_unknown_organ_and_backend_fail_before_any_work(abdomen, files, segmenter, capsys):
    ct, _, _ = abdomen
    folder, model, bank = files
    pipeline = MedLSAMPipeline(Localizer(model, bank), segmenter, SegmentOptions(mode="spl"))
    with pytest.raises(TemplateError, match="not in the template bank"):
        pipeline.segment(ct, ["liver", "brain"])
    out = folder / "bad.nii.gz"
    base = ["segment", str(folder / "ct.nii.gz"), "--templates", str(folder / "bank.pt"), "--out", str(out)]
    assert cli_main(base + ["--organs", "brain"]) == 2
    assert "not in the template bank" in capsys.readouterr().err
    assert cli_main(base + ["--backend", "sam_vit_x"]) == 2
    assert "unknown segmentation backend" in capsys.readouterr().err
    assert cli_main(base + ["--prior-weight", "1.5"]) == 2  # checked before the bank is opened
    assert "prior_weight must be in [0, 1]" in capsys.readouterr().err
    for bad, needle in (
        (dict(mode="boxes"), "mode must be one of"),
        (dict(slice_spacing_mm=-1), "slice_spacing_mm"),
        (dict(prior_weight=-0.1), "prior_weight"),
        (dict(threshold=1.5), "threshold"),
    ):
        with pytest.raises(MedLSAMError, match=needle):
            SegmentOptions(**bad)
    # the output path is checked first: a missing bank is not even opened
    assert cli_main(["segment", "x.nii.gz", "--templates", "nope.pt", "--out", str(folder / "no" / "s.nii.gz")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists() and not list(folder.glob(".tmp-*"))


def test_cli_interrupt_leaves_no_output(files, monkeypatch, capsys):
    folder, _, _ = files

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("medlsam.segment.pipeline.MedLSAMPipeline.segment", interrupted)
    out = folder / "interrupted.nii.gz"
    assert (
        cli_main(
            ["segment", str(folder / "ct.nii.gz"), "--templates", str(folder / "bank.pt"), "--out", str(out), "--quiet"]
        )
        == 130
    )
    assert "interrupted" in capsys.readouterr().err
    assert not out.exists() and not (folder / "interrupted.nii.gz.json").exists()


def test_cli_segment_end_to_end(abdomen, files, capsys):
    ct, _, names = abdomen
    folder, _, _ = files
    out, qc = folder / "seg.nrrd", folder / "qc.png"
    assert (
        cli_main(
            [
                "segment",
                str(folder / "ct.nii.gz"),
                "--templates",
                str(folder / "bank.pt"),
                "--out",
                str(out),
                "--organs",
                "liver,stomach",
                "--qc",
                str(qc),
                "--mode",
                "wpl",
            ]
        )
        == 0
    )
    label = read_volume(out)
    assert label.shape == ct.shape and np.allclose(label.affine, ct.affine, atol=1e-4)
    doc = json.loads((folder / "seg.nrrd.json").read_text())
    values = {n: v for v, n in names.items()}
    assert doc["labels"] == {"liver": values["liver"], "stomach": values["stomach"]}
    assert set(doc["boxes"]) == {"liver", "stomach"}
    assert {"load", "localize", "encode", "decode", "assemble", "write"} <= set(doc["timings_s"])
    slices = {
        k for b in doc["boxes"].values() if b["found"] for k in range(b["box_voxel"][0][2], b["box_voxel"][1][2] + 1)
    }
    assert doc["encoder_calls"] == len(slices) <= doc["reference_encoder_calls"]
    assert set(np.unique(label.array)) <= {0, *doc["labels"].values()}
    for name, box in doc["boxes"].items():
        assert box["voxels"] == int((label.array == doc["labels"][name]).sum())
    assert qc.stat().st_size > 1000
    assert "encoder calls" in capsys.readouterr().out


class _BoxFillingSegmenter:
    """Fake segmenter: remembers the encoded image; a box prompt's mask is the box, in the image it saw."""

    name = "fake"

    def encode_batch(self, images):
        return [np.asarray(image) for image in images]

    def decode(self, embedding, boxes=None, points=None, point_labels=None, multimask=False):
        masks = np.zeros((len(boxes), *embedding.shape[:2]), np.float32)
        for n, (x0, y0, x1, y1) in enumerate(np.round(boxes).astype(int)):
            masks[n, y0 : y1 + 1, x0 : x1 + 1] = 1.0
        return masks, np.ones(len(boxes), np.float32)


@pytest.mark.parametrize("x_axis", [0, 1])
@pytest.mark.parametrize("signs", [(1, 1), (-1, 1), (1, -1), (-1, -1)])
def test_slices_are_shown_to_the_encoder_in_radiological_orientation(x_axis, signs):
    volume = right_anterior_marker(x_axis, signs)
    shape = volume.shape
    emb = SliceEmbeddings(_BoxFillingSegmenter(), volume, axis=2)
    image = emb.slice_image(2)
    assert image[0, 0].max() == image.max() > image[5, 5].max()
    # a box prompt in slice pixels comes back as the same box, whatever the orientation, with or without a crop
    box = np.array([[3, 5, 10, 8]], float)  # x0 (column), y0 (row), x1, y1
    expected = np.zeros(shape[:2], bool)
    expected[5:9, 3:11] = True
    masks, _ = emb.decode(2, boxes=box)
    assert masks.shape == (1, *shape[:2]) and np.array_equal(masks[0] > 0.5, expected)
    masks, _ = emb.decode(2, (2, 1, 20, 25), boxes=box)  # the box is relative to the crop
    assert masks.shape == (1, 18, 24) and np.array_equal(masks[0] > 0.5, expected[:18, :24])


def test_encoded_slices_cover_every_organ_with_a_shared_lattice():
    organs = [list(range(10, 30)), list(range(21, 23)), list(range(40, 47))]
    assert encoded_slices(organs, 1) == sorted(set(range(10, 30)) | {21, 22} | set(range(40, 47)))
    chosen = encoded_slices(organs, 3)
    assert len(chosen) < 20
    for organ in organs:
        inside = [k for k in chosen if k in organ]
        assert inside, organ  # the short organ 21..22, between lattice slices, gets one of its own
        for end in (organ[0], organ[-1]):  # no organ end is more than step // 2 slices from an encoded slice
            assert min(abs(end - k) for k in inside) <= 1
    assert set(range(10, 30, 3)) <= set(chosen)  # one lattice: slices shared by the organs


def test_interpolation_between_encoded_slices():
    known = {2: np.zeros((3, 3), np.float32), 6: np.ones((3, 3), np.float32)}
    assert np.allclose(interpolate_slices(known, 3), 0.25)
    assert np.allclose(interpolate_slices(known, 5), 0.75)
    assert np.allclose(interpolate_slices(known, 0), 0.0) and np.allclose(interpolate_slices(known, 9), 1.0)
