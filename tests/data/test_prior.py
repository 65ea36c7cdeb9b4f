"""Organ priors on the file grid (any orientation), their per-slice boxes, and the templates' intensity
model."""

from __future__ import annotations

import numpy as np
import pytest

from medlsam.atlas.prior import OrganPrior, prior_on_file, prior_slice_boxes
from medlsam.io.grid import resample_to_grid, to_localization_grid
from medlsam.io.volume import CTVolume
from medlsam.utils.metrics import dice


def _reoriented(volume: CTVolume, order: tuple[int, int, int], flip: int | None) -> CTVolume:
    """The same scan stored with permuted (and one flipped) file axes; the world geometry is unchanged."""
    array, affine = volume.array.transpose(order), np.eye(4)
    affine[:3, :3], affine[:3, 3] = volume.affine[:3, :3][:, list(order)], volume.affine[:3, 3]
    if flip is not None:
        array = np.flip(array, axis=flip)
        affine[:3, 3] = affine[:3, 3] + affine[:3, flip] * (array.shape[flip] - 1)
        affine[:3, flip] *= -1
    return CTVolume(np.ascontiguousarray(array), affine, volume.source)


@pytest.mark.parametrize("order,flip", [((0, 1, 2), None), ((2, 0, 1), 1), ((1, 2, 0), 0)])
def test_a_grid_prior_lands_on_the_organ_in_the_file_for_any_orientation(make_ct, order, flip):
    ct, label = make_ct(shape=(48, 44, 36), ball_centre=(20.0, 22.0, 16.0), ball_radius=7.0)
    ct, label = _reoriented(ct, order, flip), _reoriented(label, order, flip)
    grid = to_localization_grid(ct)
    on_grid = resample_to_grid(label.array.astype(np.float32), label, grid.affine, grid.shape, fill=0.0)
    prior = prior_on_file(OrganPrior(origin=np.zeros(3, int), probabilities=on_grid), grid)
    placed = np.zeros(ct.shape, bool)
    placed[prior.region()] = prior.probabilities >= 0.5
    assert dice(placed, label.array > 0) > 0.9

    # the per-slice boxes are the label's own slice boxes (within a voxel), on every axis
    for axis in range(3):
        boxes = prior_slice_boxes(prior, axis)
        truth_slices = np.flatnonzero((label.array > 0).any(axis=tuple(a for a in range(3) if a != axis)))
        assert abs(min(boxes) - truth_slices[0]) <= 1 and abs(max(boxes) - truth_slices[-1]) <= 1
        k = int(truth_slices[len(truth_slices) // 2])
        on_slice = np.argwhere(np.take(label.array > 0, k, axis=axis))
        expected = [on_slice[:, 1].min(), on_slice[:, 0].min(), on_slice[:, 1].max(), on_slice[:, 0].max()]
        assert np.abs(boxes[k] - expected).max() <= 1.0, (axis, boxes[k], expected)
        full = prior.slice(axis, k, tuple(s for a, s in enumerate(ct.shape) if a != axis))
        assert dice(full >= 0.5, np.take(label.array > 0, k, axis=axis)) > 0.85


def test_a_prior_outside_the_scan_gives_nothing(make_ct):
    ct, _ = make_ct()
    grid = to_localization_grid(ct)
    far = OrganPrior(origin=np.array([500, 500, 500]), probabilities=np.ones((4, 4, 4), np.float32))
    assert prior_on_file(far, grid) is None
    assert prior_on_file(OrganPrior(np.zeros(3, int), np.zeros((4, 4, 4), np.float32)), grid) is None


def test_the_intensity_model_keeps_the_organs_intensities_and_drops_the_rest():
    """Templates whose organ is bright (bone-like) in a dark neighbourhood: where the spatial prior is
    undecided, bright voxels become likely and dark ones unlikely; a certain 0 stays 0."""
    import torch

    from medlsam.atlas.prior import intensity_posterior
    from medlsam.medlam.matching import OrganPatch

    rng = np.random.default_rng(0)
    intensities = np.full((10, 10, 10), 0.45, np.float32) + rng.normal(0, 0.01, (10, 10, 10)).astype(np.float32)
    mask = np.zeros((10, 10, 10), np.float32)
    mask[3:7, 3:7, 3:7] = 1.0
    intensities[mask > 0] = 0.85
    patch = OrganPatch(
        torch.from_numpy(intensities).half(), torch.tensor([[3.0] * 3, [6.0] * 3]), torch.from_numpy(mask).half()
    )
    query = np.full((12, 12, 12), 0.45, np.float32)
    query[:6] = 0.85  # the upper half of the query is bright
    prior = OrganPrior(origin=np.array([1, 1, 1]), probabilities=np.full((10, 10, 10), 0.5, np.float32))
    prior.probabilities[:, :, :2] = 0.0
    post = intensity_posterior(prior, query, [patch]).probabilities
    bright, dark = post[:5, :, 2:], post[6:, :, 2:]  # query rows 1..5 are bright, 7..10 dark
    assert bright.min() > 0.9 and dark.max() < 0.1
    assert post[:, :, :2].max() == 0.0


def _on_grid(shape: tuple[int, ...], values: np.ndarray, corner: np.ndarray) -> np.ndarray:
    """``values`` pasted on a zero grid of ``shape`` with its first voxel at ``corner`` (clipped to the grid)."""
    out = np.zeros(shape, np.float32)
    lo, hi = np.maximum(corner, 0), np.minimum(np.asarray(corner) + values.shape, shape)
    out[tuple(slice(a, b) for a, b in zip(lo, hi))] = values[
        tuple(slice(a - c, b - c) for a, b, c in zip(lo, hi, corner))
    ]
    return out


def test_registration_follows_an_organ_that_is_larger_and_tilted_in_the_query(openkbp_case):
    """A real CT (OpenKBP) and its left parotid; the query is the same scan scaled by 1.25 and turned by 12 degrees
    about the organ: translation alone (where the neighbourhood matched) misses part of the organ, the similarity
    registration brings the template's mask onto it."""
    from scipy import ndimage

    from medlsam.atlas.registration import register_neighbourhood
    from medlsam.io.volume import load_ct, read_volume
    from medlsam.medlam.matching import cut_organ_patch

    image, label = openkbp_case
    volume = load_ct(image)
    grid = to_localization_grid(volume)
    organ = read_volume(label).array == 4  # LeftParotid
    mask = resample_to_grid(organ.astype(np.float32), volume, grid.affine, grid.shape, fill=0.0)
    inside = np.argwhere(mask > 0.5)
    low, high = inside.min(axis=0).astype(float), inside.max(axis=0).astype(float)
    patch = cut_organ_patch(grid, low, high, mask)
    corner = np.maximum(np.floor(low).astype(int) - 8, 0)  # where the patch was cut: its matched place

    angle = np.deg2rad(12.0)
    turn = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    query_to_template = turn / 1.25  # the query is the template scaled by 1.25 and turned, about the organ
    centre = (low + high) / 2
    offset = centre - query_to_template @ centre

    def to_query(array: np.ndarray) -> np.ndarray:
        return ndimage.affine_transform(array, query_to_template, offset, order=1, cval=float(array.min()))

    query, truth = to_query(grid.array), to_query(mask) > 0.5
    placed = _on_grid(grid.shape, patch.mask.float().numpy(), corner) > 0.5  # where it matched, unmoved
    assert dice(placed, truth) < 0.75

    warped, _, at = register_neighbourhood(query, patch, corner)
    registered = _on_grid(grid.shape, warped, at) > 0.5
    assert dice(registered, truth) > dice(placed, truth) + 0.1


def test_registration_declines_a_neighbourhood_without_contrast():
    """A flat neighbourhood (all soft tissue) has nothing to register: None, and the prior keeps the matched
    placement alone."""
    import torch

    from medlsam.atlas.prior import placed_masks
    from medlsam.atlas.registration import register_neighbourhood
    from medlsam.medlam.matching import OrganPatch

    flat = torch.full((10, 12, 12), 0.5).half()
    organ = torch.zeros((10, 12, 12)).half()
    organ[3:7, 4:8, 4:8] = 1
    patch = OrganPatch(flat, torch.tensor([[3.0, 4, 4], [6, 7, 7]]), organ)
    array = np.full((30, 30, 30), 0.5, np.float32)
    assert register_neighbourhood(array, patch, np.array([5, 5, 5])) is None
    prior = placed_masks(array, [patch], [np.array([5, 5, 5])], register=True)
    assert np.array_equal(prior.origin, [5, 5, 5]) and prior.probabilities.max() == 1.0


def test_the_placement_that_matches_the_query_weighs_more(openkbp_case):
    """A real CT (OpenKBP) and its brainstem: one template placement where the neighbourhood sits, one misplaced by
    4 voxels (12 mm). The plain mean splits the organ between them; weighed by how well each placement's
    intensities match the query, the prior follows the right one."""
    from medlsam.atlas.prior import placed_masks, placement_match, slab_pieces
    from medlsam.io.volume import load_ct, read_volume
    from medlsam.medlam.matching import cut_organ_patch

    image, label = openkbp_case
    volume = load_ct(image)
    grid = to_localization_grid(volume)
    mask = resample_to_grid(
        (read_volume(label).array == 1).astype(np.float32), volume, grid.affine, grid.shape, fill=0.0
    )
    inside = np.argwhere(mask > 0.5)
    low, high = inside.min(axis=0).astype(float), inside.max(axis=0).astype(float)
    patch = cut_organ_patch(grid, low, high, mask)
    right = np.maximum(np.floor(low).astype(int) - 8, 0)
    wrong = right + np.array([0, 4, 0])
    good, bad = (placement_match(grid.array, slab_pieces(patch, [(0, c)])) for c in (right, wrong))
    assert good > 0.95 and bad < good - 0.1, (good, bad)

    def placed_dice(sharpness: float) -> float:
        prior = placed_masks(grid.array, [patch, patch], [right, wrong], match_sharpness=sharpness)
        return dice(_on_grid(grid.shape, prior.probabilities, prior.origin) > 0.5, mask > 0.5)

    weighed, plain = placed_dice(10.0), placed_dice(0.0)
    assert weighed > 0.85 and weighed > plain + 0.1, (weighed, plain)


@pytest.mark.slow
def test_atlas_selection_keeps_the_templates_that_match_the_query(data_dir):
    """Three real templates of the brainstem, one of them the query scan itself: chosen by how well their
    neighbourhoods match (``prior_atlases=1``), the prior is the query's own brainstem; the plain mean of all three
    is not."""
    from medlsam.atlas.bank_builder import build_bank
    from medlsam.atlas.localize import LocalizeOptions, Localizer
    from medlsam.io.volume import load_ct, read_volume
    from medlsam.medlam.network import load_medlam
    from medlsam.paths import default_medlam_path

    kbp = data_dir / "openkbp"
    cases = ("openkbp_pt_1", "openkbp_pt_4", "openkbp_pt_13")  # the query first
    images = [load_ct(kbp / "images" / f"{c}.nii.gz") for c in cases]
    labels = []
    for c in cases:
        label = read_volume(kbp / "labels" / f"{c}.nii.gz")
        labels.append(CTVolume((label.array == 1).astype(np.uint8), label.affine, label.source))
    model = load_medlam(default_medlam_path())
    bank = build_bank(model, images, labels, {1: "Brainstem"}, calibrate=False)

    def prior_dice(atlases: int) -> float:
        options = LocalizeOptions(prior_atlases=atlases, intensity_power=0.0)  # the placed masks alone
        organ = Localizer(model, bank, options).localize(images[0], prior=True)["organs"]["Brainstem"]
        placed = np.zeros(images[0].shape, bool)
        placed[organ.prior.region()] = organ.prior.probabilities >= 0.5
        return dice(placed, labels[0].array == 1)

    selected, plain = prior_dice(1), prior_dice(0)
    assert selected > 0.9 and selected > plain + 0.15, (selected, plain)
