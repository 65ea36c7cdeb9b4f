"""medlsam.learn on real OpenKBP scans: a tiny training run saves a loadable model with its held-out scores and
per-organ choice, an organ a label did not draw teaches nothing, writes are atomic, bad files and options fail
clearly. The few-shot priors are given (blurred true masks of the held-out label's neighbours would cost a MedLAM
bank per label; benchmarks/learning.py runs the real few-shot path)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from medlsam.atlas.prior import FilePrior
from medlsam.cli import main
from medlsam.io.volume import CTVolume, load_ct, read_volume
from medlsam.learn.data import example
from medlsam.learn.loss import masked_loss
from medlsam.learn.model import load_learned
from medlsam.learn.options import LearnError, LearnOptions
from medlsam.learn.predict import chosen_probabilities, learned_probabilities
from medlsam.learn.trainer import learn
from medlsam.utils.metrics import dice

CASES = ("openkbp_pt_1", "openkbp_pt_2", "openkbp_pt_3")
TINY = {
    "patch": [16, 32, 32],
    "filters": 4,
    "max_epochs": 2,
    "iterations_per_epoch": 2,
    "batch_size": 1,
    "validate_every": 1,
    "held_out_fraction": 0.34,
    "threads": 1,
}


@pytest.fixture(scope="module")
def scans(data_dir: Path):
    root = data_dir / "openkbp"
    names = {int(k): v for k, v in json.loads((root / "dataset.json").read_text())["labels"].items()}
    vols = [load_ct(root / "images" / f"{c}.nii.gz") for c in CASES]
    labs = [read_volume(root / "labels" / f"{c}.nii.gz") for c in CASES]
    return vols, labs, names


def blurred_priors(label: CTVolume, names: dict[int, str]) -> dict[str, FilePrior | None]:
    """A stand-in few-shot prior: each organ's true mask shifted by 2 voxels and blurred (None when not drawn)."""
    out = {}
    for value, name in names.items():
        mask = np.roll(label.array == value, 2, axis=0).astype(np.float32)
        if not mask.any():
            out[name] = None
            continue
        p = ndimage.gaussian_filter(mask, 1.5)
        out[name] = FilePrior(np.zeros(3, int), np.array(p.shape) - 1, p.astype(np.float32))
    return out


@pytest.fixture(scope="module")
def trained(scans, tmp_path_factory):
    vols, labs, names = scans
    priors = [blurred_priors(la, names) for la in labs]
    model = learn(vols, labs, names, LearnOptions.from_dict(TINY), priors=priors)
    path = tmp_path_factory.mktemp("learn") / "model.pt"
    model.save(path)
    return model, path, priors


def test_tiny_training_saves_a_loadable_model_with_held_out_scores_and_choice(trained, scans):
    model, path, priors = trained
    vols, _, names = scans
    loaded = load_learned(path)
    assert loaded.organs == model.organs == [names[v] for v in sorted(names)]
    assert set(loaded.choice) == set(model.organs) and set(loaded.choice.values()) <= {"learned", "fewshot"}
    assert loaded.held_out["learned"] and set(loaded.held_out["learned"]) == set(loaded.held_out["fewshot"])
    assert len(loaded.record["held_out_sources"]) == 1 and loaded.record["iterations"] == 4
    for a, b in zip(model.network.state_dict().values(), loaded.network.state_dict().values()):
        assert torch.equal(a.float(), b)
    probabilities = learned_probabilities(loaded, vols[0], priors[0])
    assert set(probabilities) == set(model.organs)
    assert all(p.shape == vols[0].shape and 0 <= p.min() and p.max() <= 1 for p in probabilities.values())
    chosen, used = chosen_probabilities(loaded, vols[0], priors[0], loaded.prior_cuts)
    assert used == {o: loaded.choice[o] for o in model.organs}
    assert all(c.shape == vols[0].shape for c in chosen.values())


def test_a_new_model_is_compared_with_the_model_in_use_on_the_label_it_never_saw(trained, scans):
    """The model in use learnt from scans 0 and 1 (or held one out): with scan 2 new, scan 2 is held out, and both
    drafts are scored there: the incumbent's figures are its served draft's Dice on scan 2, recomputed by hand."""
    incumbent, _, priors = trained
    vols, labs, names = scans
    model = learn(vols, labs, names, LearnOptions.from_dict(TINY), priors=priors, incumbent=incumbent, unseen=[2])
    assert model.record["held_out_sources"] == [vols[2].source]
    comparison = model.record["comparison"]
    assert comparison["scans"] == 1 and comparison["organs"]
    served, _ = chosen_probabilities(incumbent, vols[2], priors[2], model.prior_cuts, model.organs)
    values = {n: v for v, n in names.items()}
    for organ, pair in comparison["organs"].items():
        truth = labs[2].array == values[organ]
        assert truth.any() and abs(pair["incumbent"] - dice(served[organ] >= 0.5, truth)) < 1e-6
        path = model.choice[organ]
        assert abs(pair["new"] - model.held_out[path][organ]) < 1e-6  # one held-out scan: its own Dice


def test_an_organ_a_label_did_not_draw_teaches_nothing(scans):
    vols, labs, names = scans
    lacking = labs[0].array.copy()
    lacking[lacking == 1] = 0  # Brainstem not drawn
    label = CTVolume(lacking, labs[0].affine, "lacking")
    ex = example(vols[0], label, names, list(names.values()), None, (3.0, 4.0, 4.0))
    assert not ex.known[0] and ex.known[1] and not ex.target[0].any()
    logits = torch.zeros((1, len(names), 8, 8, 8), requires_grad=True)
    target = torch.from_numpy(ex.target[None, :, 40:48, 30:38, 20:28].copy())
    target[:, 0] = 1  # whatever lies there, the unknown organ's channel must not matter
    loss = masked_loss(logits, target, torch.from_numpy(ex.known[None]))
    loss.backward()
    assert torch.all(logits.grad[0, 0] == 0) and torch.any(logits.grad[0, 1] != 0)
    target[:, 0] = 0
    assert loss.detach().item() == float(masked_loss(logits.detach(), target, torch.from_numpy(ex.known[None])))


def test_model_write_is_atomic(trained, tmp_path, monkeypatch):
    model, _, _ = trained
    path = tmp_path / "model.pt"
    model.save(path)
    before = path.read_bytes()

    def broken(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError):
        model.save(path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_a_corrupt_or_foreign_model_file_fails_clearly(tmp_path, trained):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(LearnError, match="not a readable model file"):
        load_learned(bad)
    torch.save({"weights": torch.zeros(2)}, bad)
    with pytest.raises(LearnError, match="not a learned segmentation model"):
        load_learned(bad)
    data = torch.load(trained[1], weights_only=True)
    data["state_dict"] = {k: v[..., :1] for k, v in data["state_dict"].items()}
    torch.save(data, bad)
    with pytest.raises(LearnError, match="damaged model file"):
        load_learned(bad)
    with pytest.raises(LearnError, match="not found"):
        load_learned(tmp_path / "missing.pt")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"max_epoch": 3}, "unknown learner option"),
        ({"max_epochs": 0}, "max_epochs"),
        ({"time_limit_min": -1}, "time_limit_min"),
        ({"time_limit_min": float("nan")}, "time_limit_min"),
        ({"patch": [20, 32, 32]}, "patch"),
        ({"network": "transformer"}, "network"),
        ({"held_out_fraction": 1.0}, "held_out_fraction"),
    ],
)
def test_bad_options_fail_clearly(options, message):
    with pytest.raises(LearnError, match=message):
        LearnOptions.from_dict(options)


def test_bad_labels_fail_clearly(scans):
    vols, labs, names = scans
    opts = LearnOptions.from_dict(TINY)
    renamed = {**names, 1: names[1].lower()}
    with pytest.raises(LearnError, match="name one organ differently"):
        learn(vols[:2], labs[:2], [names, renamed], opts, priors=[{}, {}])
    with pytest.raises(LearnError, match="2 images but 1 labels"):
        learn(vols[:2], labs[:1], names, opts)
    with pytest.raises(LearnError, match="no organ name"):
        learn(vols[:2], labs[:2], {1: "Brainstem"}, opts, priors=[{}, {}])


def test_learn_command_refuses_bad_options_before_any_work(tmp_path, capsys, openkbp_case):
    image, label = openkbp_case
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"1": "Brainstem"}))
    common = ["learn", "--images", str(image), str(image), "--labels", str(label), str(label), "--names", str(names)]
    assert main([*common, "--out", str(tmp_path / "m.pt"), "--max-epochs", "0"]) == 2
    assert "max_epochs" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "m.pt"), "--time-limit-min", "-5"]) == 2
    assert "time_limit_min" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


def test_an_untrained_prior_residual_model_gives_the_prior():
    from medlsam.learn.network import build_network

    network = build_network(LearnOptions(filters=4), 8, 7)
    x = torch.rand(1, 8, 16, 32, 32)
    assert torch.allclose(torch.sigmoid(network(x)), x[:, 1:].clamp(1e-3, 1 - 1e-3), atol=1e-5)


def test_one_template_banks_are_cached_by_file_content(data_dir, tmp_path):
    """The learner's one-template banks come from the bank builder's cache while the files are unchanged, and are
    built again when a label is saved again under the same path (a stale bank would teach the old label)."""
    from app_support import tiny_case
    from medlsam.learn import fewshot
    from medlsam.medlam.network import load_medlam
    from medlsam.paths import default_medlam_path

    medlam = load_medlam(default_medlam_path())
    image, label = tiny_case(data_dir, 3, [1, 4], tmp_path / "src")
    names = {1: "Brainstem", 4: "LeftParotid"}
    cache = tmp_path / "cache"
    first = fewshot.one_template_banks(medlam, [load_ct(image)], [read_volume(label)], names, cache)
    assert set(first[0].organs) == {"Brainstem", "LeftParotid"}
    kept = sorted(cache.glob("*.pt"))
    assert len(kept) == 1
    again = fewshot.one_template_banks(medlam, [load_ct(image)], [read_volume(label)], names, cache)
    assert set(again[0].organs) == set(first[0].organs) and sorted(cache.glob("*.pt")) == kept  # reused
    relabelled = read_volume(label)
    relabelled.array = np.where(relabelled.array == 4, 0, relabelled.array).astype(np.uint8)  # the parotid removed
    from medlsam.io.volume import write_volume

    write_volume(relabelled.array, relabelled, label)
    changed = fewshot.one_template_banks(medlam, [load_ct(image)], [read_volume(label)], names, cache)
    assert set(changed[0].organs) == {"Brainstem"} and sorted(cache.glob("*.pt")) != kept  # built again


def test_segment_command_serves_each_organ_by_its_path_and_blends_sam_only_where_asked(trained, data_dir, tmp_path):
    """`medlsam segment --learned`: organs the bank knows and the model left to the few-shot path get the calibrated
    prior (SAM blended in only with a prior weight below 1), organs the bank lacks the network; one label file."""
    from app_support import tiny_case
    from medlsam.atlas.bank_builder import build_bank
    from medlsam.medlam.network import load_medlam
    from medlsam.paths import default_medlam_path

    model, _, _ = trained
    fewshot_everywhere = load_learned(trained[1])
    fewshot_everywhere.choice = {organ: "fewshot" for organ in model.organs}
    model_path = tmp_path / "fewshot.pt"
    fewshot_everywhere.save(model_path)
    cases = [tiny_case(data_dir, case, [1, 4], tmp_path / "src") for case in (1, 2, 3)]
    names = {1: "Brainstem", 4: "LeftParotid"}
    bank = build_bank(
        load_medlam(default_medlam_path()),
        [load_ct(image) for image, _ in cases[1:]],
        [read_volume(label) for _, label in cases[1:]],
        names,
    )
    bank.save(tmp_path / "bank.pt")
    command = ["segment", str(cases[0][0]), "--templates", str(tmp_path / "bank.pt"), "--learned", str(model_path)]

    def paths(out: Path, *extra: str) -> dict[str, str]:
        assert main([*command, "--out", str(out), *extra]) == 0
        served = json.loads(Path(f"{out}.json").read_text())["boxes"]
        return {organ: box["path"] for organ, box in served.items()}

    alone = paths(tmp_path / "alone.nii.gz")
    assert alone == {o: ("fewshot" if o in names.values() else "learned") for o in model.organs}, alone
    blended = paths(tmp_path / "blended.nii.gz", "--prior-weight", "0.5")
    assert {o: p for o, p in blended.items() if p != "learned"} == dict.fromkeys(names.values(), "fewshot_sam")
    one, two = read_volume(tmp_path / "alone.nii.gz").array, read_volume(tmp_path / "blended.nii.gz").array
    assert one.shape == two.shape == load_ct(cases[0][0]).shape
    assert (two == 1).any() and not np.array_equal(one == 1, two == 1)  # SAM moved the brainstem's boundary


def test_leave_one_out_priors_are_reused_as_labels_accumulate_and_redone_when_a_label_changes(data_dir, tmp_path):
    """A label's leave-one-out prior from 1 of now 2 other labels serves again (at least half of them, all still
    there, same organs); the new label's is made; once a template's label is saved again, the priors made from it are
    made anew, and so is its own bank's content key."""
    from app_support import tiny_case
    from medlsam.io.volume import write_volume
    from medlsam.learn import fewshot
    from medlsam.medlam.network import load_medlam
    from medlsam.paths import default_medlam_path

    medlam = load_medlam(default_medlam_path())
    names = {1: "Brainstem", 4: "LeftParotid"}
    cases = [tiny_case(data_dir, case, [1, 4], tmp_path / "src") for case in (1, 2, 3)]
    vols, labs = [load_ct(i) for i, _ in cases], [read_volume(la) for _, la in cases]
    cache = tmp_path / "cache"

    def priors(n: int) -> list:
        banks = fewshot.one_template_banks(medlam, vols[:n], [read_volume(la) for _, la in cases[:n]], names, cache)
        return fewshot.held_out_priors(medlam, banks, vols[:n], None, cache), banks

    two, banks = priors(2)
    made = sorted(cache.glob("prior-*.npz"))
    assert len(made) == 2 and all(p["Brainstem"] is not None for p in two)
    three, _ = priors(3)
    assert len(sorted(cache.glob("prior-*.npz"))) == 3  # only the third label's prior was made
    for before, after in zip(two, three[:2]):  # the same prior, as kept on disk (float16)
        kept = before["Brainstem"].probabilities.astype(np.float16).astype(np.float32)
        assert np.array_equal(kept, after["Brainstem"].probabilities)
    relabelled = labs[1]
    relabelled.array = np.where(relabelled.array == 4, 0, relabelled.array).astype(np.uint8)  # the parotid removed
    write_volume(relabelled.array, relabelled, cases[1][1])
    changed, new_banks = priors(3)
    assert fewshot.bank_digest(new_banks[1]) != fewshot.bank_digest(banks[1])
    # labels 0 and 2 were made from label 1's old content: made anew (the organs the others draw are the same)
    assert len(sorted(cache.glob("prior-*.npz"))) == 5 and len(sorted(cache.glob("loo-*.json"))) == 3
    old, new = three[0]["Brainstem"].probabilities, changed[0]["Brainstem"].probabilities
    assert old.shape != new.shape or not np.array_equal(old, new)
