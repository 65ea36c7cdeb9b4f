"""Organs that are not in the scan are not drawn (issue 30, part 4): the plausibility cues and the decision.

On real data: a head-and-neck bank of one OpenKBP template localises nothing of the head in the real chest series
(dicom_rt/thorax_rt), whose top holds the lower mandible and the larynx (found there or not at all), while OpenKBP
validation scans keep their organs. The measured account: benchmarks/results/plausibility.md."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medlsam.atlas.localize import LocalizeOptions, Localizer
from medlsam.atlas.plausibility import OrganCues, body_size, implausible
from medlsam.atlas.templates import TemplateBank, load_bank

TEMPLATES = ("openkbp_pt_4",)  # the first protocol template: one, so that the test stays under a minute
TOP_MM = 150.0  # thorax_rt: the mandible's body and the larynx lie above this world z
HEAD = ("Brainstem", "RightParotid", "LeftParotid", "Mandible", "Larynx")


def cues(**values) -> OrganCues:
    base = dict(ncc=0.6, spread_mm=5.0, intensity=0.7, organ_ncc=0.6, body=0.9, body_depth=1.1, body_width=1.1)
    base.update(body_widths=None)
    base.update(templates=5, agreement=0.75)
    return OrganCues(**{**base, **values})


def test_body_size_takes_the_part_of_the_body_that_holds_the_organ():
    array = np.zeros((3, 60, 80), np.float32)
    array[1, 10:50, 20:60] = 0.5  # a trunk 40 x 40 voxels
    array[1, 20:30, 65:75] = 0.5  # an arm beside it
    assert body_size(array, np.array([1.0, 30.0, 40.0])).tolist() == [120.0, 120.0]
    assert body_size(array, np.array([1.0, 25.0, 70.0])).tolist() == [30.0, 30.0]  # the arm itself
    assert body_size(array, np.array([1.0, 5.0, 5.0])).tolist() == [120.0, 120.0]  # outside: the largest part
    assert body_size(array, np.array([0.0, 30.0, 40.0])).tolist() == [0.0, 0.0]  # an empty slice


def test_the_reason_names_the_cue_and_its_value():
    options = LocalizeOptions()
    assert implausible(cues(), options) is None
    reason = implausible(cues(body_width=2.4), options)  # a head-and-neck organ in a trunk
    assert reason and "body 2.4x" in reason and "0.60" in reason and "0.75" in reason
    assert implausible(cues(body_width=2.4, ncc=0.8), options) is None  # it matches as well as the templates agree
    assert implausible(cues(body_width=0.3), options) is None  # narrower: a cropped field of view does that too
    assert implausible(cues(body_width=0.3, agreement=None), options) is None  # (agreement only computed if wider)
    one = {"agreement": None, "templates": 1}  # one template: the body decides alone
    assert "one template" in implausible(cues(body_width=2.4, **one), options)
    assert implausible(cues(body_width=0.3, **one), options) is None
    assert implausible(cues(body_width=None), options) is None  # a bank without body sizes skips that cue
    assert implausible(cues(body_width=2.4), LocalizeOptions(max_body_width=0)) is None


def test_bank_round_trip_keeps_the_body_sizes(tmp_path, hn_bank):
    path = tmp_path / "bank.pt"
    hn_bank.save(path)
    loaded = load_bank(path)
    for name, organ in hn_bank.organs.items():
        assert loaded.organs[name].body_mm == organ.body_mm and len(organ.body_mm) == len(TEMPLATES)


@pytest.fixture(scope="module")
def model():
    from medlsam.medlam.network import load_medlam
    from medlsam.paths import default_medlam_path

    torch.set_num_threads(1)
    return load_medlam(default_medlam_path())


@pytest.fixture(scope="module")
def hn_bank(model, data_dir) -> TemplateBank:
    import json

    from medlsam.atlas.bank_builder import build_bank

    kbp = data_dir / "openkbp"
    names = {int(k): v for k, v in json.loads((kbp / "dataset.json").read_text())["labels"].items()}
    return build_bank(
        model,
        [kbp / "images" / f"{t}.nii.gz" for t in TEMPLATES],
        [kbp / "labels" / f"{t}.nii.gz" for t in TEMPLATES],
        names,
    )


def test_head_and_neck_organs_are_not_drawn_on_a_chest(model, hn_bank, data_dir):
    from medlsam.io.volume import read_volume

    located = Localizer(model, hn_bank).localize(read_volume(data_dir / "dicom_rt" / "thorax_rt"))["organs"]
    assert not located["Brainstem"].found
    for name in HEAD:
        loc = located[name]
        if loc.found:  # only at the top of the series, where the mandible and larynx are
            assert np.mean(loc.box_mm, axis=0)[2] > TOP_MM, (name, loc.box_mm, loc.cues)
        else:
            assert loc.reason and loc.box_voxel is None
    refused = [located[n] for n in HEAD if not located[n].found and located[n].cues is not None]
    assert refused, "the matched head organs in the chest are refused by their cues"
    for loc in refused:  # the reason names the cue and its value
        assert any(cue in loc.reason for cue in ("template match", "body", "intensit", "organ")), loc.reason


@pytest.mark.parametrize("case", ["openkbp_pt_201", "openkbp_pt_238"])  # 238: its cord reaches the shoulders
def test_openkbp_scans_keep_their_organs(model, hn_bank, data_dir, case):
    from medlsam.io.volume import load_ct

    scan = load_ct(data_dir / "openkbp" / "images" / f"{case}.nii.gz")
    located = Localizer(model, hn_bank).localize(scan)["organs"]
    assert all(loc.found for loc in located.values()), {n: loc.reason for n, loc in located.items() if not loc.found}
