"""Click editing (medlsam.interact.editing) on a real OpenKBP scan: a foreground click adds the organ around it, a
background click removes it, clicks accumulate, other organs keep their voxels, bad clicks are refused.

The starting segmentation is the scan's own brainstem moved by 3 voxels (a realistic localisation error), its
prior that mask blurred, and the intensity model the templates' way (histograms of a second scan's brainstem
and its neighbourhood); the clicks are placed by the benchmark's simulator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from medlsam.atlas.prior import FilePrior
from medlsam.interact.click_simulator import error_click
from medlsam.interact.editing import ClickError, EditOptions, IntensityModel, OrganClicks, edit_label
from medlsam.io.grid import map_hu
from medlsam.io.volume import load_ct, read_volume
from medlsam.medlam.matching import OrganPatch
from medlsam.utils.metrics import dice

BRAINSTEM, MANDIBLE = 1, 7


def _patch(data_dir: Path, case: int, value: int) -> OrganPatch:
    """A template's organ neighbourhood (mapped HU and mask) as the bank stores it, from another real scan."""
    hu = load_ct(data_dir / "openkbp" / "images" / f"openkbp_pt_{case}.nii.gz").array
    mask = read_volume(data_dir / "openkbp" / "labels" / f"openkbp_pt_{case}.nii.gz").array == value
    lo, hi = np.argwhere(mask).min(axis=0) - 6, np.argwhere(mask).max(axis=0) + 7
    region = tuple(slice(max(a, 0), b) for a, b in zip(lo, hi))
    box = torch.tensor(np.array([[0.0] * 3, [float(s.stop - s.start - 1) for s in region]]))
    return OrganPatch(
        torch.from_numpy(map_hu(hu[region].astype(np.float32))).half(), box, torch.from_numpy(mask[region]).half()
    )


@pytest.fixture(scope="module")
def scene(data_dir: Path) -> dict:
    volume = load_ct(data_dir / "openkbp" / "images" / "openkbp_pt_1.nii.gz")
    truth = read_volume(data_dir / "openkbp" / "labels" / "openkbp_pt_1.nii.gz").array
    organ = truth == BRAINSTEM
    moved = np.roll(organ, 3, axis=1)  # 3 voxels (~12 mm) off in one in-plane direction
    label = np.where(truth == MANDIBLE, MANDIBLE, 0).astype(np.uint8)
    label[moved & (label == 0)] = BRAINSTEM
    soft = ndimage.gaussian_filter(moved.astype(np.float32), 1.0)
    lo, hi = np.argwhere(soft > 0.01).min(axis=0), np.argwhere(soft > 0.01).max(axis=0)
    prior = FilePrior(lo, hi, soft[tuple(slice(a, b + 1) for a, b in zip(lo, hi))])
    intensity = IntensityModel.from_patches([_patch(data_dir, 2, BRAINSTEM)])
    return {
        "hu": volume.array.astype(np.float32),
        "spacing": np.asarray(volume.spacing),
        "truth": organ,
        "label": label,
        "values": {"Brainstem": BRAINSTEM, "Mandible": MANDIBLE},
        "priors": {"Brainstem": prior},
        "intensities": {"Brainstem": intensity},
    }


def _edit(scene: dict, clicks: dict[str, OrganClicks], label: np.ndarray | None = None):
    return edit_label(
        scene["label"] if label is None else label,
        scene["hu"],
        scene["spacing"],
        scene["values"],
        clicks,
        scene["priors"],
        scene["intensities"],
        EditOptions(),
    )


def test_a_foreground_click_adds_the_missed_organ_around_it_and_nothing_far_away(scene):
    before = scene["label"] == BRAINSTEM
    click, missed = error_click(before, scene["truth"])
    assert missed  # the largest error of a shifted organ is the part it missed
    out, changed = _edit(scene, {"Brainstem": OrganClicks(foreground=[click])})
    after = out == BRAINSTEM
    assert after[tuple(click)] and changed["Brainstem"] > 0
    assert dice(after, scene["truth"]) > dice(before, scene["truth"]) + 0.02
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(after.shape, scene["spacing"])], indexing="ij")
    distance = np.sqrt(sum((g - c * s) ** 2 for g, c, s in zip(grids, click, scene["spacing"])))
    far = distance > 3 * EditOptions().reach_mm  # beyond 3 reaches of the click nothing changes
    assert np.array_equal(after[far], before[far])


def test_a_background_click_removes_the_organ_around_it(scene):
    before = scene["label"] == BRAINSTEM
    spurious = before & ~scene["truth"]
    inner = ndimage.distance_transform_edt(np.pad(spurious, 1))[1:-1, 1:-1, 1:-1]
    click = [int(v) for v in np.unravel_index(int(np.argmax(inner)), inner.shape)]
    out, changed = _edit(scene, {"Brainstem": OrganClicks(background=[click])})
    after = out == BRAINSTEM
    assert not after[tuple(click)] and changed["Brainstem"] > 0
    assert after.sum() < before.sum() and not (after & ~before).any()  # removes, adds nothing
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(after.shape, scene["spacing"])], indexing="ij")
    distance = np.sqrt(sum((g - c * s) ** 2 for g, c, s in zip(grids, click, scene["spacing"])))
    far = distance > 3 * EditOptions().reach_mm
    assert np.array_equal(after[far], before[far])


def test_clicks_accumulate_converge_and_leave_other_organs_alone(scene):
    """Five simulated clicks, each request carrying all clicks so far: every click stays honoured, Dice rises,
    and the mandible keeps every voxel."""
    organ = OrganClicks()
    scores = [dice(scene["label"] == BRAINSTEM, scene["truth"])]
    out = scene["label"]
    for _ in range(5):
        click, missed = error_click(out == BRAINSTEM, scene["truth"])
        fg, bg = (organ.foreground, organ.background)
        organ = OrganClicks(np.vstack([fg, [click]]), bg) if missed else OrganClicks(fg, np.vstack([bg, [click]]))
        out, _ = _edit(scene, {"Brainstem": organ})
        assert all(out[tuple(c)] == BRAINSTEM for c in organ.foreground)
        assert all(out[tuple(c)] != BRAINSTEM for c in organ.background)
        assert np.array_equal(out == MANDIBLE, scene["label"] == MANDIBLE)
        scores.append(dice(out == BRAINSTEM, scene["truth"]))
    assert scores[-1] > scores[0] + 0.1, scores


def test_a_foreground_click_on_another_organ_takes_only_that_voxel(scene):
    mandible = np.argwhere(scene["label"] == MANDIBLE)
    click = mandible[len(mandible) // 2]
    out, _ = _edit(scene, {"Brainstem": OrganClicks(foreground=[click])})
    assert out[tuple(click)] == BRAINSTEM
    lost = (scene["label"] == MANDIBLE) & (out != MANDIBLE)
    assert lost.sum() == 1


@pytest.mark.parametrize(
    "clicks,label_shape,message",
    [
        ({"Brainstem": OrganClicks()}, None, "no clicks"),
        ({"Brainstem": OrganClicks(foreground=[[500, 1, 1]])}, None, "outside the image"),
        ({"Brainstem": OrganClicks(foreground=[[5, 6, 7]], background=[[5, 6, 7]])}, None, "both as foreground"),
        ({"Tumour": OrganClicks(foreground=[[5, 6, 7]])}, None, "unknown organ"),
        ({"Brainstem": OrganClicks(foreground=[[5, 6, 7]])}, (10, 10, 10), "label of shape"),
    ],
)
def test_bad_clicks_are_refused_naming_the_problem(scene, clicks, label_shape, message):
    label = None if label_shape is None else np.zeros(label_shape, np.uint8)
    kept = scene["label"].copy()
    with pytest.raises(ClickError, match=message):
        _edit(scene, clicks, label)
    assert np.array_equal(scene["label"], kept)


def test_an_organ_the_templates_do_not_know_grows_from_its_clicks_over_similar_intensities(scene):
    """No prior, no intensity model (class-agnostic): a foreground click in the mandible from an empty label
    marks bone-like voxels around it, not the soft tissue beside it."""
    truth = scene["label"] == MANDIBLE
    inner = ndimage.distance_transform_edt(np.pad(truth, 1))[1:-1, 1:-1, 1:-1]
    click = np.unravel_index(int(np.argmax(inner)), inner.shape)
    empty = np.zeros_like(scene["label"])
    out, changed = edit_label(
        empty, scene["hu"], scene["spacing"], {"Bone": 9}, {"Bone": OrganClicks(foreground=[click])}
    )
    grown = out == 9
    assert grown[click] and changed["Bone"] == grown.sum() > 10
    assert (grown & truth).sum() > 0.5 * grown.sum()  # mostly the clicked bone
    assert np.median(scene["hu"][grown]) > 150  # bone, not the soft tissue around it
