"""Self-supervised training: the losses, the tracked augmentation, patches, and the Trainer's files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medlsam.errors import MedLSAMError
from medlsam.io.grid import to_localization_grid
from medlsam.io.volume import write_volume
from medlsam.medlam.augment import augment_crop, random_rotation
from medlsam.medlam.losses import (
    DISTANCE_RATIO_MM,
    RDR_SCALE_MM,
    mss_loss,
    predicted_offset_mm,
    rdr_loss,
)
from medlsam.medlam.network import MedLAMConfig, load_medlam
from medlsam.medlam.patches import cached_grid_array, cut_patch, list_images
from medlsam.medlam.training import Trainer, TrainOptions

TINY = MedLAMConfig(base_channels=2, patch_size=(32, 32, 32))


# -- losses ---------------------------------------------------------------------------------------------


def latents_for(offset_mm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A latent pair whose exact predicted offset is `offset_mm` (N, 3)."""
    ratio = torch.tensor(DISTANCE_RATIO_MM)
    base = torch.randn(offset_mm.shape, generator=torch.Generator().manual_seed(0))
    return base, base + torch.atanh(offset_mm / ratio)


def test_rdr_sign_convention():
    """predicted_offset_mm(from, to) estimates c_to - c_from, and rdr_loss is zero exactly then."""
    c_from = torch.tensor([[10.0, 20.0, -30.0], [0.0, 0.0, 0.0]])
    c_to = torch.tensor([[40.0, -10.0, 5.0], [-300.0, 100.0, 250.0]])
    latent_from, latent_to = latents_for(c_to - c_from)
    assert torch.allclose(predicted_offset_mm(latent_from, latent_to), c_to - c_from, atol=1e-3)
    assert torch.allclose(predicted_offset_mm(latent_to, latent_from), c_from - c_to, atol=1e-3)
    assert rdr_loss(latent_from, latent_to, c_to - c_from) < 1e-9
    wrong_sign = rdr_loss(latent_from, latent_to, c_from - c_to)
    expected = ((2 * (c_to - c_from) / RDR_SCALE_MM) ** 2).mean()
    assert torch.isclose(wrong_sign, expected, rtol=1e-4)


def test_offsets_saturate_at_the_distance_ratio():
    huge = predicted_offset_mm(torch.zeros(1, 3), torch.full((1, 3), 50.0))
    assert torch.allclose(huge, torch.tensor([DISTANCE_RATIO_MM]))


def _feature_maps(channels: int = 16, patch: int = 32, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        F.normalize(torch.randn(channels, n, n, n, generator=generator), dim=0) for n in (patch // 4, patch // 2, patch)
    ]


def _identity_source(patch: int = 32) -> torch.Tensor:
    axis = torch.arange(patch, dtype=torch.float32)
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"))


def _points(n: int = 20, patch: int = 32) -> torch.Tensor:
    return torch.randint(4, patch - 4, (n, 3), generator=torch.Generator().manual_seed(1))


def test_mss_loss_prefers_matching_features():
    features, source, points = _feature_maps(), _identity_source(), _points()
    identical = mss_loss(features, features, source, points, 3.0)
    generator = torch.Generator().manual_seed(2)
    shuffled = [
        f.reshape(f.shape[0], -1)[:, torch.randperm(f[0].numel(), generator=generator)].reshape(f.shape)
        for f in features
    ]
    other = mss_loss(features, shuffled, source, points, 3.0)
    assert identical < 0.5 * other
    assert torch.isfinite(identical) and torch.isfinite(other)


def test_mss_loss_follows_the_source_map():
    """Augmented features shifted by 4 voxels match only when `source` says where they came from."""
    features, points = _feature_maps(), _points()
    shift = 4
    shifted = [torch.roll(f, shifts=(-shift * f.shape[-1] // 32,) * 3, dims=(1, 2, 3)) for f in features]
    source = _identity_source() + shift  # augmented voxel x came from x + shift
    tracked = mss_loss(features, shifted, source, points, 3.0)
    untracked = mss_loss(features, shifted, _identity_source(), points, 3.0)
    reference = mss_loss(features, features, _identity_source(), points, 3.0)
    assert tracked < 0.5 * untracked
    assert abs(float(tracked) - float(reference)) < 0.5 * float(reference) + 0.1


# -- augmentation ---------------------------------------------------------------------------------------


def test_rotation_is_orthonormal():
    generator = torch.Generator().manual_seed(0)
    rotation = random_rotation(generator, 15.0)
    assert torch.allclose(rotation @ rotation.T, torch.eye(3), atol=1e-6)
    assert torch.isclose(torch.det(rotation), torch.tensor(1.0), atol=1e-6)
    assert torch.equal(random_rotation(generator, 0.0), torch.eye(3))


def _smooth_crop(size: int) -> torch.Tensor:
    axis = torch.linspace(0, 1, size)
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    return (0.3 * z + 0.2 * y + 0.4 * torch.exp(-((x - 0.5) ** 2 + (y - 0.4) ** 2) * 20))[None]


def test_identity_augmentation_keeps_the_voxel_grid():
    patch, margin = 32, 8
    crop = _smooth_crop(patch + 2 * margin)
    warped, source = augment_crop(
        crop, patch, torch.Generator().manual_seed(0), max_degrees=0, max_scale=0, elastic_voxels=0
    )
    assert warped.shape == (1, patch, patch, patch)
    assert torch.allclose(source, _identity_source(patch), atol=1e-4)
    centre = crop[:, margin : margin + patch, margin : margin + patch, margin : margin + patch]
    correlation = torch.corrcoef(torch.stack([warped.flatten(), centre.flatten()]))[0, 1]
    assert correlation > 0.95  # only the monotonic intensity change and noise remain


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_source_map_says_where_each_voxel_came_from(axis):
    """With a ramp along one axis, augmented intensities rank like the source coordinate on that axis."""
    patch, margin = 32, 8
    size = patch + 2 * margin
    ramp = torch.linspace(0, 1, size)
    crop = ramp.reshape([size if a == axis else 1 for a in range(3)]).expand(size, size, size)[None].contiguous()
    warped, source = augment_crop(crop, patch, torch.Generator().manual_seed(axis))
    inside = ((source > -margin + 1) & (source < patch + margin - 2)).all(dim=0)
    values, coordinate = warped[0][inside], source[axis][inside]
    ranks = lambda t: t.argsort().argsort().float()  # noqa: E731
    spearman = torch.corrcoef(torch.stack([ranks(values), ranks(coordinate)]))[0, 1]
    assert spearman > 0.95
    assert not torch.allclose(source, _identity_source(patch), atol=0.5)  # the default does deform


# -- patches --------------------------------------------------------------------------------------------


def test_cut_patch_centre_and_zero_padding():
    array = np.arange(10 * 12 * 14, dtype=np.float32).reshape(10, 12, 14) + 1
    patch = cut_patch(array, np.array([5, 6, 7]), 4)
    assert patch[2, 2, 2] == array[5, 6, 7]  # the centre voxel sits at size // 2
    assert np.array_equal(patch, array[3:7, 4:8, 5:9])
    corner = cut_patch(array, np.array([0, 0, 0]), 4)
    assert np.all(corner[:2] == 0) and np.all(corner[:, :2] == 0)
    assert np.array_equal(corner[2:, 2:, 2:], array[:2, :2, :2])
    assert np.all(cut_patch(array, np.array([100, 0, 0]), 4) == 0)


def test_list_images_from_folder_and_text_file(tmp_path, phantom):
    ct, _ = phantom
    for name in ("b.nii.gz", "a.nrrd"):
        write_volume(ct.array.astype(np.int16), ct, tmp_path / name)
    (tmp_path / "notes.md").write_text("not an image")
    (tmp_path / "list.txt").write_text("a.nrrd\n\n" + str(tmp_path / "b.nii.gz") + "\n")
    assert list_images(tmp_path) == [tmp_path / "a.nrrd", tmp_path / "b.nii.gz"]
    assert list_images(tmp_path / "list.txt") == [tmp_path / "a.nrrd", tmp_path / "b.nii.gz"]
    combined = list_images([tmp_path / "a.nrrd", tmp_path / "list.txt"])
    assert combined == [tmp_path / "a.nrrd", tmp_path / "a.nrrd", tmp_path / "b.nii.gz"]


def test_grid_cache_is_written_and_reused(tmp_path, phantom):
    ct, _ = phantom
    write_volume(ct.array.astype(np.int16), ct, tmp_path / "scan.nii.gz")
    first = cached_grid_array(tmp_path / "scan.nii.gz", tmp_path / "cache")
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and files[0].suffix == ".npy"
    np.save(files[0], np.zeros_like(first))  # a cached array is used as is
    assert np.all(cached_grid_array(tmp_path / "scan.nii.gz", tmp_path / "cache") == 0)
    expected = to_localization_grid(ct).array.astype(np.float16)
    assert first.dtype == np.float16 and np.array_equal(first, expected)


# -- the Trainer ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scans(tmp_path_factory, make_ct) -> list:
    """Two small synthetic CTs on disk, with their bony ball in different places."""
    folder = tmp_path_factory.mktemp("scans")
    paths = []
    for n, centre in enumerate([(14.0, 20.0, 10.0), (24.0, 14.0, 18.0)]):
        ct, _ = make_ct(ball_centre=centre, ball_radius=5.0)
        write_volume(ct.array.astype(np.int16), ct, folder / f"scan{n}.nii.gz")
        paths.append(folder / f"scan{n}.nii.gz")
    return paths


def _options(**changes) -> TrainOptions:
    return TrainOptions(
        **{"epochs": 2, "iterations_per_epoch": 2, "batch_size": 1, "mss_points": 8, "validation_pairs": 2, **changes}
    )


def test_tiny_training_run_writes_weights_state_and_stats(scans, tmp_path):
    out = tmp_path / "run" / "medlam.pt"
    result = Trainer(scans, out, TINY, _options(), val_images=scans[:1], cache_dir=tmp_path / "cache").run()
    assert result["epoch"] == 2 and math.isfinite(result["best_metric"])
    assert load_medlam(out).config == TINY
    state = torch.load(out.with_name("medlam.state.pt"), weights_only=True)
    assert state["epoch"] == 2
    stats = json.loads((out.parent / "train_stats.json").read_text())
    assert {"epoch", "total_epochs", "total_time", "best_metric"} <= set(stats)
    assert stats["epoch"] == 2 and stats["total_epochs"] == 2 and stats["total_time"] > 0
    assert stats["best_metric"] == pytest.approx(result["best_metric"], abs=1e-3)
    assert stats["status"] == "finished"
    assert [record["epoch"] for record in stats["history"]] == [1, 2]
    assert all(math.isfinite(record["loss"]) for record in stats["history"])
    assert sorted(p.name for p in out.parent.iterdir()) == ["medlam.pt", "medlam.state.pt", "train_stats.json"]


class _Crash(Exception):
    pass


def _weights_metric(model) -> float:
    """A deterministic validation metric that depends on the weights only."""
    return float(sum(p.detach().double().abs().sum() for p in model.parameters()))


def test_resume_continues_where_the_run_stopped(scans, tmp_path):
    """A run interrupted in epoch 3 and resumed from its state ends exactly like an uninterrupted run."""
    options = _options(epochs=3)
    straight = Trainer(scans, tmp_path / "a" / "medlam.pt", TINY, options, validator=_weights_metric)
    straight.run()

    calls = []

    def crash_in_epoch_3(model):
        calls.append(1)
        if len(calls) == 3:
            raise _Crash
        return _weights_metric(model)

    interrupted = Trainer(scans, tmp_path / "b" / "medlam.pt", TINY, options, validator=crash_in_epoch_3)
    with pytest.raises(_Crash):
        interrupted.run()
    state_path = tmp_path / "b" / "medlam.state.pt"
    assert torch.load(state_path, weights_only=True)["epoch"] == 2

    resumed = Trainer(scans, tmp_path / "b" / "medlam.pt", TINY, options, validator=_weights_metric)
    resumed.resume(state_path)
    assert resumed.epoch == 2 and len(resumed.history) == 2
    result = resumed.run()
    assert result["epoch"] == 3
    stats = json.loads((tmp_path / "b" / "train_stats.json").read_text())
    assert stats["epoch"] == 3 and [r["epoch"] for r in stats["history"]] == [1, 2, 3]
    for key, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key


def test_resume_refuses_another_configuration(scans, tmp_path):
    trainer = Trainer(scans, tmp_path / "medlam.pt", TINY, _options(epochs=1, iterations_per_epoch=1))
    trainer.run()
    other = Trainer(
        scans, tmp_path / "other.pt", MedLAMConfig(base_channels=3, patch_size=(32, 32, 32)), _options(epochs=1)
    )
    with pytest.raises(Exception, match="trained with"):
        other.resume(tmp_path / "medlam.state.pt")


def test_training_steps_are_reproducible(scans, tmp_path):
    """Same seed, same losses: small patches must not use the broken bfloat16 gradient (see Trainer)."""
    runs = []
    for name in ("a", "b"):
        trainer = Trainer(scans, tmp_path / name / "medlam.pt", TINY, _options(bf16=True))
        runs.append([trainer.step()["loss"] for _ in range(3)])
    assert runs[0] == runs[1]
    assert trainer.amp_dtype is None


def test_bfloat16_convolution_gradients_at_the_default_bottleneck():
    """The default 64^3 patch has a 4^3 bottleneck, where bfloat16 weight gradients are sound on this
    machine's torch (at 2^3 they are not); a canary for the Trainer's autocast."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(8, 16, 3, padding=1)
    x = torch.randn(3, 8, 4, 4, 4).contiguous(memory_format=torch.channels_last_3d)
    weights = torch.linspace(-1, 1, 3 * 16 * 64).reshape(3, 16, 4, 4, 4)
    grads = []
    for bf16 in (False, True, True):
        conv.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = conv(x)
        (y.float() * weights).sum().backward()
        grads.append(conv.weight.grad.clone())
    assert torch.equal(grads[1], grads[2])
    assert (grads[1] - grads[0]).norm() < 0.02 * grads[0].norm()


def test_zero_crop_margin_trains(scans, tmp_path):
    """crop_margin=0 (no room around the query) must still give full-size query patches."""
    trainer = Trainer(scans, tmp_path / "medlam.pt", TINY, _options(crop_margin=0))
    losses = trainer.step()
    assert all(math.isfinite(v) for v in losses.values())


def test_no_training_images_is_an_error(tmp_path):
    with pytest.raises(MedLSAMError, match="no training images"):
        Trainer([], tmp_path / "medlam.pt", TINY, _options())


def test_cli_train_and_resume(scans, tmp_path, capsys):
    """`medlsam train` with the default 64^3 patch (bfloat16 path), then resumed for one more epoch."""
    from medlsam.cli import main

    out = tmp_path / "medlam.pt"
    common = [
        "train",
        "--images",
        *map(str, scans),
        "--out",
        str(out),
        "--base-channels",
        "2",
        "--iterations-per-epoch",
        "1",
        "--batch-size",
        "1",
        "--seed",
        "7",
    ]
    assert main([*common, "--epochs", "1"]) == 0
    assert json.loads((tmp_path / "train_stats.json").read_text())["epoch"] == 1
    assert main([*common, "--epochs", "2", "--resume", str(tmp_path / "medlam.state.pt")]) == 0
    stats = json.loads((tmp_path / "train_stats.json").read_text())
    assert stats["epoch"] == 2 and stats["total_epochs"] == 2 and len(stats["history"]) == 2
    assert load_medlam(out).config.patch_size == (64, 64, 64)
    assert "trained 2 epochs" in capsys.readouterr().out
