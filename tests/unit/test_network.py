"""MedLAM: configurations, outputs, and loading our own and the official checkpoints."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from medlsam.errors import CheckpointError
from medlsam.medlam.network import MedLAM, MedLAMConfig, build_medlam, load_medlam, save_medlam

SMALL = MedLAMConfig(base_channels=2, patch_size=(32, 32, 32))
DECODER = ["conv5_1", "conv5_2", "conv6_1", "conv6_2", "conv7_1", "conv7_2", "conv8_1", "conv8_2"]


def expected_parameters(b: int, patch: tuple[int, int, int], classes: int) -> int:
    """Parameter count of the published MedLAM, layer by layer (conv 3^3 with bias; InstanceNorm has none)."""
    convs = [
        (2, 2),
        (2, 2),
        (2, 2),
        (2, 2),
        (2, 4),
        (4, 4),
        (4, 8),
        (8, 8),
        (8, 16),
        (24, 8),
        (8, 8),
        (12, 4),
        (4, 4),
        (6, 4),
        (4, 4),
        (6, 4),
        (4, 4),
    ]  # widths in units of b
    total = 27 * 1 * 2 * b + 2 * b  # conv0_1 takes the 1-channel CT
    total += sum(27 * cin * b * cout * b + cout * b for cin, cout in convs)
    bottleneck = int(np.prod([s // 16 for s in patch])) * 16 * b
    total += bottleneck * 8 * b + 8 * b + 8 * b * 4 * b + 4 * b + 4 * b * 3 + 3
    if classes:
        total += 4 * b * classes + classes
    return total


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def small() -> MedLAM:
    torch.manual_seed(0)
    return MedLAM(SMALL).eval()


@pytest.fixture(scope="module")
def patches() -> torch.Tensor:
    return torch.rand(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))


def official_state_dict(model: MedLAM) -> dict[str, torch.Tensor]:
    """The model's weights as the official training script saves them: wrapped in DataParallel."""
    return {f"module.{k}": v.clone() for k, v in model.state_dict().items()}


# -- configurations -------------------------------------------------------------------------------------


def test_default_and_reference_configurations_build():
    default, reference = build_medlam("default"), build_medlam("reference")
    assert default.config == MedLAMConfig(base_channels=6, patch_size=(64, 64, 64), num_classes=0)
    assert reference.config.base_channels == 24 and reference.config.num_classes == 3
    assert reference.config.patch_size == (64, 64, 64)
    assert count(default) == expected_parameters(6, (64, 64, 64), 0) == 942_483
    assert count(reference) == expected_parameters(24, (64, 64, 64), 3) == 15_067_878
    assert not hasattr(default, "classification") and hasattr(reference, "classification")


def test_small_and_non_cubic_configurations_count(small):
    assert count(small) == expected_parameters(2, (32, 32, 32), 0)
    odd = MedLAM(MedLAMConfig(base_channels=3, patch_size=(32, 48, 64)))
    assert count(odd) == expected_parameters(3, (32, 48, 64), 0)


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="unknown MedLAM configuration"):
        build_medlam("huge")
    with pytest.raises(ValueError, match="multiple of 16"):
        MedLAM(MedLAMConfig(patch_size=(64, 64, 40)))


def test_config_dict_round_trip():
    config = MedLAMConfig(base_channels=5, patch_size=(32, 48, 64), num_classes=3, dropout=0.1)
    assert MedLAMConfig.from_dict(config.to_dict()) == config
    assert MedLAMConfig.from_dict({**config.to_dict(), "unknown_key": 1}) == config


# -- outputs --------------------------------------------------------------------------------------------


def test_latent_skips_the_decoder(small, patches):
    called = []
    hooks = [getattr(small, name).register_forward_hook(lambda m, i, o, n=name: called.append(n)) for name in DECODER]
    try:
        with torch.no_grad():
            latent = small.latent(patches)
        assert called == []
        with torch.no_grad():
            out = small(patches)
        assert called == DECODER  # the hooks do fire when the decoder runs
    finally:
        for hook in hooks:
            hook.remove()
    assert latent.shape == (2, 3)
    assert torch.allclose(latent, out["latent"], atol=1e-5)


def test_latent_of_each_patch_is_independent_of_the_batch(small, patches):
    with torch.no_grad():
        together = small.latent(patches)
        alone = torch.cat([small.latent(patches[i : i + 1]) for i in range(2)])
    assert torch.allclose(together, alone, atol=1e-5)
    assert not torch.allclose(together[0], together[1])


def test_feature_shapes_and_normalisation(small, patches):
    with torch.no_grad():
        out = small(patches)
    shapes = [tuple(f.shape) for f in out["features"]]
    assert shapes == [(2, 8, 8, 8, 8), (2, 8, 16, 16, 16), (2, 8, 32, 32, 32)]  # 1/4, 1/2, full; 4b channels
    for feature in out["features"]:
        norm = feature.norm(dim=1)
        alive = norm > 0  # all-zero ReLU outputs stay zero
        assert alive.float().mean() > 0.5
        assert torch.allclose(norm[alive], torch.ones(()), atol=1e-4)


def test_default_configuration_outputs():
    model = build_medlam("default").eval()
    with torch.no_grad():
        out = model(torch.rand(1, 1, 64, 64, 64))
    assert out["latent"].shape == (1, 3)
    assert [tuple(f.shape) for f in out["features"]] == [(1, 24, 16, 16, 16), (1, 24, 32, 32, 32), (1, 24, 64, 64, 64)]


# -- our checkpoints ------------------------------------------------------------------------------------


def test_save_and_load_gives_identical_outputs(small, patches, tmp_path):
    save_medlam(small, tmp_path / "medlam.pt", epoch=7)
    loaded = load_medlam(tmp_path / "medlam.pt")
    assert loaded.config == small.config and not loaded.training
    with torch.no_grad():
        a, b = small(patches), loaded(patches)
    assert torch.equal(a["latent"], b["latent"])
    assert all(torch.equal(x, y) for x, y in zip(a["features"], b["features"]))
    assert torch.load(tmp_path / "medlam.pt", weights_only=True)["epoch"] == 7
    assert [p.name for p in tmp_path.iterdir()] == ["medlam.pt"]


def test_saved_config_is_used_for_non_cubic_patches(tmp_path):
    config = MedLAMConfig(base_channels=2, patch_size=(32, 48, 64))
    save_medlam(MedLAM(config), tmp_path / "odd.pt")
    assert load_medlam(tmp_path / "odd.pt").config == config


def test_checkpoint_has_ordinary_file_permissions(small, tmp_path):
    mask = os.umask(0)
    os.umask(mask)
    save_medlam(small, tmp_path / "medlam.pt")
    assert (tmp_path / "medlam.pt").stat().st_mode & 0o777 == 0o666 & ~mask


def test_fp16_checkpoint_reloads(small, patches, tmp_path):
    save_medlam(small, tmp_path / "full.pt")
    save_medlam(small, tmp_path / "half.pt", half=True)
    raw = torch.load(tmp_path / "half.pt", weights_only=True)
    assert all(v.dtype == torch.float16 for v in raw["state_dict"].values())
    assert (tmp_path / "half.pt").stat().st_size < 0.7 * (tmp_path / "full.pt").stat().st_size
    loaded = load_medlam(tmp_path / "half.pt")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    with torch.no_grad():
        a, b = small(patches), loaded(patches)
    assert torch.allclose(a["latent"], b["latent"], atol=1e-2, rtol=1e-2)
    for x, y in zip(a["features"], b["features"]):
        assert (x - y).abs().mean() < 2e-3


# -- official checkpoints -------------------------------------------------------------------------------


def test_official_small_checkpoints_load_with_identical_outputs(patches, tmp_path):
    """`.tar` with {'state_dict', 'optimizer', 'epoch', 'best_loss' (a numpy float)} and a raw `.pth`."""
    torch.manual_seed(3)
    model = MedLAM(MedLAMConfig(base_channels=2, patch_size=(32, 32, 32), num_classes=3)).eval()
    state = official_state_dict(model)
    torch.save(
        {
            "epoch": 12,
            "state_dict": state,
            "best_loss": np.float64(0.0123),
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
        },
        tmp_path / "m.tar",
    )
    torch.save(state, tmp_path / "medlam.pth")
    with torch.no_grad():
        expected = model(patches)
    for name in ("m.tar", "medlam.pth"):
        loaded = load_medlam(tmp_path / name)
        assert loaded.config.base_channels == 2 and loaded.config.num_classes == 3
        assert loaded.config.patch_size == (32, 32, 32)
        with torch.no_grad():
            out = loaded(patches)
        assert torch.equal(out["latent"], expected["latent"])
        assert all(torch.equal(x, y) for x, y in zip(out["features"], expected["features"]))


def test_official_reference_checkpoint_loads(tmp_path):
    """The published architecture (base 24, 64^3, 3 classes) is recognised from the weights alone."""
    torch.manual_seed(4)
    model = build_medlam("reference").eval()
    state = official_state_dict(model)
    torch.save({"epoch": 300, "state_dict": state, "best_loss": np.float64(0.5)}, tmp_path / "MedLAM_0.5.tar")
    torch.save(state, tmp_path / "medlam.pth")
    patch = torch.rand(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model.latent(patch)
    for name in ("MedLAM_0.5.tar", "medlam.pth"):
        loaded = load_medlam(tmp_path / name)
        assert (loaded.config.base_channels, loaded.config.patch_size, loaded.config.num_classes) == (
            24,
            (64, 64, 64),
            3,
        )
        loaded_state = loaded.state_dict()
        assert all(torch.equal(loaded_state[k[len("module.") :]], v) for k, v in state.items())
    with torch.no_grad():
        assert torch.equal(loaded.latent(patch), expected)


def test_wrong_shapes_name_the_mismatch(small, tmp_path):
    state = official_state_dict(small)
    state["module.fc2.weight"] = torch.zeros(5, 16)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="shape mismatch") as error:
        load_medlam(tmp_path / "bad.pth")
    assert "fc2.weight" in str(error.value) and "(5, 16)" in str(error.value) and "(8, 16)" in str(error.value)


def test_checkpoint_for_another_configuration_is_refused(small, tmp_path):
    save_medlam(small, tmp_path / "small.pt")
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_medlam(tmp_path / "small.pt", config=MedLAMConfig(base_channels=3, patch_size=(32, 32, 32)))


def test_missing_and_unexpected_keys(small, tmp_path):
    state = dict(small.state_dict())
    del state["fc3.bias"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="missing") as error:
        load_medlam(tmp_path / "partial.pth")
    assert "fc3.bias" in str(error.value) and "extra.weight" in str(error.value)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_medlam(tmp_path / "absent.pt")


def test_unreadable_and_foreign_files(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_medlam(tmp_path / "garbage.pt")
    torch.save({"encoder.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not contain MedLAM weights"):
        load_medlam(tmp_path / "other.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_medlam(tmp_path / "list.pt")


class _Payload:
    """An arbitrary pickled object: a checkpoint must never be able to run code on load."""

    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_pickled_code_is_refused(tmp_path):
    with open(tmp_path / "evil.pt", "wb") as handle:
        pickle.dump({"state_dict": {}, "payload": _Payload()}, handle, protocol=2)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_medlam(tmp_path / "evil.pt")


def test_features_can_stop_before_the_full_resolution_decoder():
    torch.manual_seed(0)
    model = MedLAM(MedLAMConfig(base_channels=2, patch_size=(32, 32, 32))).eval()
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        full = model(x)
        two = model.features(x, scales=2)
        assert torch.allclose(model.latent(x), full["latent"], atol=1e-6)
    assert [f.shape[-1] for f in two] == [8, 16]
    for a, b in zip(two, full["features"][:2]):
        assert torch.allclose(a, b, atol=1e-6)
