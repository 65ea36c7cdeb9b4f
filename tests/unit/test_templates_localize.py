"""Template banks and localisation on a synthetic CT phantom with a small fixed-seed MedLAM."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medlsam.atlas.bank_builder import build_bank
from medlsam.atlas.localize import LocalizeOptions, Localizer
from medlsam.atlas.prior import placed_masks
from medlsam.atlas.templates import (
    WPL_ROLES,
    extreme_points,
    load_bank,
    organ_grid_coords,
)
from medlsam.cli import main as cli_main
from medlsam.errors import TemplateError
from medlsam.io.grid import resample_to_grid, to_localization_grid
from medlsam.io.volume import CTVolume, write_volume
from medlsam.medlam.matching import best_matches, cut_organ_patch, match_organ, match_patch
from medlsam.medlam.network import MedLAM, MedLAMConfig, save_medlam
from medlsam.utils.metrics import dice

NAMES = {1: "Ball", 2: "Bar", 3: "Blob"}


def phantom(shift: int = 0) -> tuple[CTVolume, CTVolume]:
    """A 64 x 56 x 40 CT (3 mm) with a body, a bony ball, a vertical bar and a fatty blob, and its label."""
    shape = (64, 56, 40)
    i, j, k = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    hu = np.full(shape, -1000.0, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    body = ((i - 32) / 28) ** 2 + ((j - 28) / 22) ** 2 < 1
    hu[body] = 40.0
    ball = (i - 20 - shift) ** 2 + (j - 30) ** 2 + (k - 12) ** 2 < 36
    bar = (np.abs(i - 40 - shift) < 3) & (np.abs(j - 24) < 3) & (k > 5) & (k < 35)
    blob = ((i - 30 - shift) / 6) ** 2 + ((j - 18) / 4) ** 2 + ((k - 26) / 5) ** 2 < 1
    hu[ball], hu[bar], hu[blob] = 800.0, 300.0, -100.0
    label[ball], label[bar], label[blob] = 1, 2, 3
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    return CTVolume(hu, affine, "phantom.nii.gz"), CTVolume(label, affine, "phantom_label.nii.gz")


@pytest.fixture(scope="module")
def model() -> MedLAM:
    torch.manual_seed(0)
    return MedLAM(MedLAMConfig(base_channels=2, patch_size=(32, 32, 32))).eval()


@pytest.fixture(scope="module")
def bank(model):
    images, labels = zip(phantom(0), phantom(2))
    return build_bank(model, list(images), list(labels), NAMES)


def test_extreme_points_of_a_box():
    coords = np.array([[z, y, x] for z in range(2, 6) for y in range(10, 13) for x in range(4, 9)], float)
    points = extreme_points(coords)
    assert np.allclose(points["z-"], [2, 11, 6]) and np.allclose(points["z+"], [5, 11, 6])
    assert np.allclose(points["y-"], [3.5, 10, 6]) and np.allclose(points["x+"], [3.5, 11, 8])
    assert sum(r.startswith("s") for r in points) == 24


def test_bank_holds_every_organ_with_counts(bank):
    assert set(bank.organs) == set(NAMES.values())
    assert bank.labels == {"Ball": 1, "Bar": 2, "Blob": 3}
    for organ in bank.organs.values():
        assert organ.count == 2
        assert organ.latent.shape == (len(organ.roles), 3)
        assert [k.shape[-1] for k in organ.kernels] == [3, 5, 5]


def test_organ_missing_from_one_template_is_averaged_over_the_others(model):
    (image_a, label_a), (image_b, label_b) = phantom(0), phantom(2)
    label_b = CTVolume(np.where(label_b.array == 3, 0, label_b.array).astype(np.uint8), label_b.affine)
    bank = build_bank(model, [image_a, image_b], [label_a, label_b], NAMES)
    assert bank.organs["Blob"].count == 1 and bank.organs["Ball"].count == 2
    alone = build_bank(model, [image_a], [label_a], NAMES)
    assert torch.allclose(bank.organs["Blob"].latent, alone.organs["Blob"].latent, atol=1e-5)


def test_organ_absent_from_all_templates_is_named(model):
    image, label = phantom()
    no_blob = CTVolume(np.where(label.array == 3, 0, label.array).astype(np.uint8), label.affine)
    with pytest.raises(TemplateError, match="Blob"):
        build_bank(model, [image], [no_blob], NAMES)


def test_empty_template_label_is_refused(model):
    image, label = phantom()
    with pytest.raises(TemplateError, match="empty"):
        build_bank(model, [image], [CTVolume(np.zeros_like(label.array), label.affine, "empty.nii.gz")], NAMES)


def test_extreme_points_json_gives_the_label_bank(model):
    image, label = phantom()
    from_label = build_bank(model, [image], [label], {1: "Ball"} | {2: "Bar", 3: "Blob"})
    index = np.argwhere(label.array == 2)
    pts = [index[np.argmin(index[:, a])] if s == 0 else index[np.argmax(index[:, a])] for a in range(3) for s in (0, 1)]
    from_points = build_bank(model, [image], None, {}, [{"Bar": {"value": 2, "points": [p.tolist() for p in pts]}}])
    assert from_points.organs["Bar"].roles == list(WPL_ROLES) and from_points.organs["Bar"].value == 2
    # same organ extent, up to the in-plane choice of the extreme voxel on the first/last slice
    wpl = [from_label.organs["Bar"].roles.index(r) for r in WPL_ROLES]
    assert torch.allclose(from_points.organs["Bar"].latent, from_label.organs["Bar"].latent[wpl], atol=0.2)
    with pytest.raises(TemplateError, match="six extreme points"):
        build_bank(model, [image], None, {}, [{"Bar": {"points": [[1, 2, 3]]}}])


def test_bank_round_trip_and_model_fingerprint(bank, model, tmp_path):
    path = tmp_path / "bank.pt"
    bank.save(path)
    loaded = load_bank(path, model)
    assert torch.equal(loaded.organs["Bar"].latent, bank.organs["Bar"].latent)
    assert len(loaded.organs["Bar"].neighbourhoods) == 2
    for a, b in zip(loaded.organs["Bar"].neighbourhoods, bank.organs["Bar"].neighbourhoods):
        assert torch.equal(a.intensities, b.intensities) and torch.equal(a.box, b.box)
    other = MedLAM(MedLAMConfig(base_channels=2, patch_size=(32, 32, 32)))
    with pytest.raises(TemplateError, match="another MedLAM model"):
        load_bank(path, other)
    with pytest.raises(TemplateError, match="not found"):
        load_bank(tmp_path / "missing.pt")
    data = torch.load(path, weights_only=True)
    data["organs"]["Bar"]["prior_cut"] = float("nan")  # a damaged or hand-edited bank
    torch.save(data, tmp_path / "bad_cut.pt")
    with pytest.raises(TemplateError, match="prior cut outside"):
        load_bank(tmp_path / "bad_cut.pt")
    del data["organs"]["Bar"]["prior_cut"]  # a bank saved before the calibration: uncalibrated
    torch.save(data, tmp_path / "old.pt")
    assert load_bank(tmp_path / "old.pt").organs["Bar"].prior_cut == 0.5


def test_unknown_organ_is_refused(bank, model):
    with pytest.raises(TemplateError, match="Kidney"):
        Localizer(model, bank).localize(phantom()[0], ["Kidney"])


@pytest.mark.parametrize("mode", ["wpl", "spl"])
def test_boxes_are_the_same_in_world_for_a_permuted_flipped_copy(bank, model, mode):
    image, _ = phantom(1)
    # the same scan stored with axes permuted (k, i, j) and the first stored axis flipped
    array = np.transpose(image.array, (2, 0, 1))[::-1].copy()
    affine = np.zeros((4, 4))
    affine[3, 3] = 1
    affine[:3, 0] = -3.0 * np.array([0, 0, 1])  # stored axis 0 = original k, reversed
    affine[:3, 1] = 3.0 * np.array([1, 0, 0])
    affine[:3, 2] = 3.0 * np.array([0, 1, 0])
    affine[:3, 3] = image.index_to_world([[0, 0, array.shape[0] - 1]])[0]
    copy = CTVolume(array, affine, "copy")
    options = LocalizeOptions(mode=mode, min_score=-1.0, min_match_score=-1.0)
    first = Localizer(model, bank, options).localize(image)["organs"]
    second = Localizer(model, bank, options).localize(copy)["organs"]
    assert mode == "spl" or any(first[name].found for name in NAMES.values())
    for name in NAMES.values():
        # the world-aligned grids coincide, so the matches do; boxes agree in world mm within a voxel
        assert first[name].match_score == pytest.approx(second[name].match_score, abs=1e-4), name
        assert first[name].found == second[name].found
        if first[name].found:
            assert np.allclose(first[name].box_mm, second[name].box_mm, atol=3.0 + 1e-6), name
            assert mode == "wpl" or len(first[name].slabs) == len(second[name].slabs) > 0


def test_organ_outside_the_field_of_view_is_not_found(bank, model):
    image, _ = phantom()
    # keep only the upper (k < 10) part: the bar and blob centres lie outside (48 mm needed along every axis)
    cropped = CTVolume(
        image.array[:, :, 20:],
        image.affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 20], [0, 0, 0, 1]], float),
        "cropped",
    )
    result = Localizer(model, bank, LocalizeOptions(min_score=-1.0, min_match_score=-1.0)).localize(cropped)["organs"]
    assert not result["Ball"].found and "field of view" in result["Ball"].reason
    assert result["Ball"].box_voxel is None


def test_cli_templates_and_localize(bank, model, tmp_path, capsys):
    image, label = phantom()
    write_volume(image.array, image, tmp_path / "ct.nii.gz")
    write_volume(label.array, image, tmp_path / "label.nii.gz")
    (tmp_path / "names.json").write_text(json.dumps({str(k): v for k, v in NAMES.items()}))
    save_medlam(model, tmp_path / "medlam.pt")
    assert (
        cli_main(
            [
                "templates",
                "build",
                "--images",
                str(tmp_path / "ct.nii.gz"),
                "--labels",
                str(tmp_path / "label.nii.gz"),
                "--names",
                str(tmp_path / "names.json"),
                "--model",
                str(tmp_path / "medlam.pt"),
                "--out",
                str(tmp_path / "bank.pt"),
            ]
        )
        == 0
    )
    assert (
        cli_main(
            [
                "localize",
                str(tmp_path / "ct.nii.gz"),
                "--templates",
                str(tmp_path / "bank.pt"),
                "--model",
                str(tmp_path / "medlam.pt"),
                "--out",
                str(tmp_path / "boxes.json"),
            ]
        )
        == 0
    )
    boxes = json.loads((tmp_path / "boxes.json").read_text())["organs"]
    assert set(boxes) == set(NAMES.values())
    for entry in boxes.values():
        assert set(entry) >= {"found", "box_voxel", "box_mm", "score"}
        if entry["found"]:
            lo, hi = np.array(entry["box_voxel"])
            assert np.all(lo <= hi) and np.all(lo >= 0) and np.all(hi < np.array(image.shape))
    # a bad request fails with a message and writes nothing
    assert (
        cli_main(
            [
                "localize",
                str(tmp_path / "ct.nii.gz"),
                "--templates",
                str(tmp_path / "bank.pt"),
                "--model",
                str(tmp_path / "medlam.pt"),
                "--organs",
                "Kidney",
                "--out",
                str(tmp_path / "bad.json"),
            ]
        )
        == 2
    )
    assert "Kidney" in capsys.readouterr().err and not (tmp_path / "bad.json").exists()
    assert not list(tmp_path.glob(".tmp-*"))


def test_localization_validator_scores_wall_distance(model, tmp_path):
    from medlsam.atlas.validation import LocalizationValidator

    paths = {}
    for shift in (0, 2):
        image, label = phantom(shift)
        write_volume(image.array, image, tmp_path / f"ct{shift}.nii.gz")
        write_volume(label.array, image, tmp_path / f"label{shift}.nii.gz")
        paths[shift] = (tmp_path / f"ct{shift}.nii.gz", tmp_path / f"label{shift}.nii.gz")
    validator = LocalizationValidator([paths[0][0]], [paths[0][1]], [paths[2][0]], [paths[2][1]], NAMES)
    error = validator(model)
    # found organs score their wall distance (14.3 mm here); a missed one would count MISSED_MM (50 mm)
    assert 0.0 < error < 0.5 * LocalizationValidator.MISSED_MM


def test_refinement_finds_a_point_from_its_own_features(model):
    from medlsam.io.grid import to_localization_grid
    from medlsam.medlam.encoding import KERNEL_SIZES, encode_patches, refine_points

    grid = to_localization_grid(phantom()[0])
    centre = np.array(grid.shape) // 2
    patch = encode_patches(model, grid, [centre])[0]
    target = centre + np.array([2, -1, 1])
    kernels = [patch.kernel(target, s)[None] for s in range(len(KERNEL_SIZES))]
    found, score = refine_points(patch, (target + np.array([-2, 2, 0]))[None], kernels, radius=4)
    assert np.array_equal(found[0], target)
    # mean cosine of unit features with themselves: 1 at full resolution, a little less at the coarse scales,
    # whose maps are interpolated between cell centres (dividing by channels as well would give ~0.1)
    assert 0.8 < score[0] <= 1.0 + 1e-5


@pytest.mark.parametrize("radius", [3, 10])
def test_intensity_matching_recovers_a_known_shift(radius):
    image = phantom(0)[0]
    shifted = np.full_like(image.array, -1000.0)
    shifted[3:] = image.array[:-3]  # the whole body 3 voxels further along the first axis
    template_grid = to_localization_grid(image)
    query_grid = to_localization_grid(CTVolume(shifted, image.affine, "shifted"))
    ball = organ_grid_coords(phantom(0)[1], 1, template_grid)
    low, high = ball.min(axis=0), ball.max(axis=0)
    mask = resample_to_grid(
        (phantom(0)[1].array == 1).astype(np.float32), image, template_grid.affine, template_grid.shape, fill=0.0
    )
    patch = cut_organ_patch(template_grid, low, high, mask)
    shift = (
        template_grid.from_file_index(np.array([[3.0, 0, 0]]))[0] - template_grid.from_file_index(np.zeros((1, 3)))[0]
    )
    start = (low + high) / 2 + shift + np.array([0.0, 2.0, -radius])  # a first guess off by up to the radius
    box, score, corner = match_patch(query_grid.array, patch, start, radius)
    assert np.allclose(box, np.stack([low, high]) + shift, atol=1.01), (box, low + shift)
    assert score > 0.9
    median_box, scores, corners = match_organ(query_grid.array, [patch, patch], start, radius)
    assert np.allclose(median_box, box) and all(np.array_equal(c, corner) for c in corners)
    assert scores == [score, score]
    prior = placed_masks(query_grid.array, [patch, patch], corners, slab_thickness=3)
    # the fused prior is the template's organ mask moved with the body: it covers the query's ball
    truth = np.zeros(query_grid.shape, bool)
    truth[tuple(np.round(ball + shift).astype(int).T)] = True
    placed = np.zeros(query_grid.shape, np.float32)
    lo = np.maximum(prior.origin, 0)
    hi = np.minimum(prior.origin + np.array(prior.probabilities.shape), query_grid.shape)
    src = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, prior.origin))
    placed[tuple(slice(a, b) for a, b in zip(lo, hi))] = prior.probabilities[src]
    assert dice(placed >= 0.5, truth) > 0.8


def test_atlas_selection_keeps_the_best_matches_best_first():
    scores = [0.2, 0.9, 0.5, 0.7]
    assert best_matches(scores, 2) == [1, 3]
    assert best_matches(scores, 0) == best_matches(scores, 4) == best_matches(scores, 9) == [0, 1, 2, 3]


def test_a_template_bank_is_cached_by_content_so_a_copied_datastore_keeps_it(model, tmp_path):
    """The bank builder's cache is keyed by the files' bytes: the same template copied to another folder (a
    datastore restored or moved, new modification times) is served from the cache; a label saved again with other
    content is built anew."""
    import shutil

    from medlsam.atlas.bank_builder import BankBuilder, Template, content_key

    ct, label = phantom(0)
    first = tmp_path / "first"
    first.mkdir()
    write_volume(ct.array, ct, first / "ct.nii.gz")
    write_volume(label.array, label, first / "label.nii.gz")
    cache = tmp_path / "cache"
    builder = BankBuilder(model, cache)
    builder.template_bank(Template("t", str(first / "ct.nii.gz"), str(first / "label.nii.gz"), NAMES))
    built = sorted(cache.glob("t-*.pt"))
    assert len(built) == 1
    moved = shutil.copytree(first, tmp_path / "moved", copy_function=shutil.copy)  # new paths, new mtimes
    assert content_key(moved / "ct.nii.gz") == content_key(first / "ct.nii.gz")
    template = Template("t", str(moved / "ct.nii.gz"), str(moved / "label.nii.gz"), NAMES)
    assert builder.digest(template) == built[0].stem.split("-", 1)[1]  # served from the cache file
    relabelled = np.where(label.array == 3, 0, label.array).astype(np.uint8)
    write_volume(relabelled, label, moved / "label.nii.gz")
    assert builder.digest(template) != built[0].stem.split("-", 1)[1]
    assert set(builder.template_bank(template).organs) == {"Ball", "Bar"}
