"""Each organ's prior cut, chosen by leaving one template out (medlsam.atlas.calibration), and the calibrated prior."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from medlsam.atlas.bank_builder import build_bank
from medlsam.atlas.calibration import CUTS, choose_cut, prior_cuts
from medlsam.atlas.localize import Localizer
from medlsam.atlas.prior import OrganPrior, calibrated
from medlsam.atlas.templates import TemplateBank, load_bank
from medlsam.io.volume import CTVolume, load_ct, read_volume
from medlsam.medlam.network import load_medlam
from medlsam.paths import default_medlam_path
from medlsam.utils.metrics import dice

KEEP = {1: "Brainstem", 7: "Mandible"}  # OpenKBP values: a soft-tissue organ and a thin bone
TEMPLATES = ("openkbp_pt_4", "openkbp_pt_13", "openkbp_pt_17")  # protocol templates (train split)
QUERY = "openkbp_pt_1"  # a train scan that is not a template


def test_the_cut_nearest_half_wins_among_near_ties():
    def rows(mean_by_cut: dict[float, float]) -> list[list[float]]:
        mean = [mean_by_cut.get(cut, 0.0) for cut in CUTS]
        return [[m + 0.02 for m in mean], [m - 0.02 for m in mean]]  # two templates around the mean

    assert choose_cut(rows({0.6: 0.60, 0.7: 0.70, 0.8: 0.69})) == 0.7  # a clear best
    assert choose_cut(rows({0.4: 0.605, 0.5: 0.60, 0.6: 0.55})) == 0.5  # 0.4 better by less than the tolerance
    assert choose_cut(rows({0.4: 0.60, 0.6: 0.60})) == 0.4  # equally far from 0.5: the lower cut


def test_the_calibrated_prior_maps_the_cut_to_half_and_keeps_the_order():
    values = np.linspace(0.0, 1.0, 11, dtype=np.float32).reshape(1, 1, 11)
    prior = OrganPrior(origin=np.zeros(3, int), probabilities=values)
    for cut in (0.3, 0.7):
        out = calibrated(prior, cut).probabilities.ravel()
        assert out[0] == 0.0 and out[-1] == pytest.approx(1.0)
        assert np.all(np.diff(out) > 0)
        assert out[int(round(cut * 10))] == pytest.approx(0.5, abs=1e-6)
        assert np.array_equal(out >= 0.5, values.ravel() >= cut - 1e-6)  # cutting at 0.5 is cutting at the cut
    assert calibrated(prior, 0.5) is prior
    with pytest.raises(ValueError, match="cut"):
        calibrated(prior, 1.0)


def _label(kbp: Path, case: str) -> CTVolume:
    label = read_volume(kbp / "labels" / f"{case}.nii.gz")
    return CTVolume(np.where(np.isin(label.array, list(KEEP)), label.array, 0), label.affine, label.source)


@pytest.mark.slow
def test_held_out_templates_choose_a_cut_that_helps_a_new_scan(data_dir, tmp_path):
    """Three real templates: the mandible's prior, cut at 0.5, over-fills the thin bone, so the held-out
    templates choose a higher cut for it; on a scan that is not a template the calibrated prior scores higher,
    and an organ whose cut stays 0.5 is unchanged."""
    kbp = data_dir / "openkbp"
    model = load_medlam(default_medlam_path())
    images = [str(kbp / "images" / f"{t}.nii.gz") for t in TEMPLATES]
    bank = build_bank(model, images, [_label(kbp, t) for t in TEMPLATES], KEEP)
    cuts = {name: organ.prior_cut for name, organ in bank.organs.items()}
    assert set(cuts) == set(KEEP.values()) and all(cut in CUTS for cut in cuts.values()), cuts
    assert cuts["Mandible"] > 0.5, cuts
    bank.save(tmp_path / "bank.pt")
    assert {n: o.prior_cut for n, o in load_bank(tmp_path / "bank.pt", model).organs.items()} == cuts

    flat = TemplateBank({n: replace(o, prior_cut=0.5) for n, o in bank.organs.items()}, bank.model_fingerprint, [])
    query, truth = load_ct(kbp / "images" / f"{QUERY}.nii.gz"), read_volume(kbp / "labels" / f"{QUERY}.nii.gz")
    scores = []
    for each in (bank, flat):
        organs = Localizer(model, each).localize(query, None, mode="wpl", prior=True)["organs"]
        row = {}
        for value, name in KEEP.items():
            probabilities = np.zeros(truth.shape, np.float32)
            probabilities[organs[name].prior.region()] = organs[name].prior.probabilities
            row[name] = dice(probabilities >= 0.5, truth.array == value)
        scores.append(row)
    calibrated_scores, uncalibrated_scores = scores
    assert calibrated_scores["Mandible"] > uncalibrated_scores["Mandible"] + 0.005, scores
    for name, cut in cuts.items():
        if cut == 0.5:
            assert calibrated_scores[name] == uncalibrated_scores[name], scores

    # fewer than three templates: every held-out prior would come from one template, so nothing is chosen
    assert prior_cuts(model, [bank, bank], images[:2], [_label(kbp, t) for t in TEMPLATES[:2]]) == {}
