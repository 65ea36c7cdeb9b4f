"""Which labels a segmentation training holds out, and how a new model is compared with the model in use: the
labels the model in use never learnt from are held out first, and both drafts are scored on those only."""

from __future__ import annotations

from medlsam.learn.options import LearnOptions
from medlsam.learn.trainer import compare_with_incumbent, held_out_indices

OPTIONS = LearnOptions(held_out_fraction=0.2, min_held_out=1, seed=0)


def test_the_labels_the_model_in_use_never_saw_are_held_out_first():
    held = held_out_indices(20, OPTIONS, prefer=[19, 17, 18])
    assert len(held) == 4 and {17, 18, 19} <= set(held)
    assert held_out_indices(20, OPTIONS, prefer=list(range(10))) == [0, 1, 2, 3]  # at most the usual count
    assert held_out_indices(20, OPTIONS) == held_out_indices(20, OPTIONS, prefer=[])  # no preference: the seed's
    assert held_out_indices(2, OPTIONS, prefer=[1]) == []  # too few labels to hold any out
    assert held_out_indices(5, OPTIONS, prefer=[7, -1]) == held_out_indices(5, OPTIONS)  # out of range: ignored


def test_both_drafts_are_compared_on_the_unseen_held_out_scans_only():
    # held-out scans 0 and 1; the incumbent learnt from scan 0, so only scan 1 counts
    scores = {
        "learned": {"Liver": [0.9, 0.5], "Heart": [0.9, None]},
        "fewshot": {"Liver": [0.1, 0.6], "Heart": [0.1, 0.7]},
        "incumbent": {"Liver": [0.99, 0.55], "Heart": [0.99, 0.8]},
    }
    out = compare_with_incumbent(scores, {"Liver": "learned", "Heart": "fewshot"}, unseen=[1])
    assert out["scans"] == 1
    assert out["organs"] == {"Liver": {"new": 0.5, "incumbent": 0.55}, "Heart": {"new": 0.7, "incumbent": 0.8}}
    assert abs(out["new"] - 0.6) < 1e-9 and abs(out["incumbent"] - 0.675) < 1e-9
    nothing = compare_with_incumbent(scores, {"Liver": "learned", "Heart": "fewshot"}, unseen=[])
    assert nothing["scans"] == 0 and nothing["new"] is None and nothing["incumbent"] is None
