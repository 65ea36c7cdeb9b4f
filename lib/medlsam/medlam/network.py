"""MedLAM: a 3D U-Net-like patch network giving a latent anatomical point and multi-scale features.

Layer names follow the published MedLAM so that official checkpoints load into the `reference`
configuration (base width 24, 64^3 patches, 3-class head). Our smaller default shares the structure.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medlsam.errors import CheckpointError
from medlsam.utils.atomic import torch_save_atomic


@dataclass(frozen=True)
class MedLAMConfig:
    """Network size. `base_channels` b gives encoder widths 2b, 2b, 4b, 8b, 16b and features of 4b."""

    base_channels: int = 6
    patch_size: tuple[int, int, int] = (64, 64, 64)
    num_classes: int = 0  # the reference's unused segmentation head (3 in official checkpoints)
    dropout: float = 0.0

    @property
    def feature_channels(self) -> int:
        return 4 * self.base_channels

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "MedLAMConfig":
        data = dict(data)
        data["patch_size"] = tuple(int(s) for s in data.get("patch_size", (64, 64, 64)))
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


CONFIGS = {
    "default": MedLAMConfig(),
    "reference": MedLAMConfig(base_channels=24, num_classes=3, dropout=0.2),
}


class _Conv(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.Conv = nn.Conv3d(cin, cout, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.Conv(x)


class ConvBlock(nn.Module):
    """conv 3^3 -> InstanceNorm -> ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.model = nn.Sequential(
            OrderedDict(
                [
                    ("conv1_1", _Conv(cin, cout)),
                    ("norm1_1", nn.InstanceNorm3d(cout)),
                    ("relu1_1", nn.ReLU(inplace=True)),
                ]
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class MedLAM(nn.Module):
    """Encoder (4 max-pools) + fully connected latent-point head + decoder with features at 1/4, 1/2, 1."""

    def __init__(self, config: MedLAMConfig = MedLAMConfig()):
        super().__init__()
        self.config = config
        b = config.base_channels
        if any(s % 16 for s in config.patch_size):
            raise ValueError(f"patch size {config.patch_size} must be a multiple of 16 along each axis")
        self.conv0_1, self.conv0_2 = ConvBlock(1, 2 * b), ConvBlock(2 * b, 2 * b)
        self.conv1_1, self.conv1_2 = ConvBlock(2 * b, 2 * b), ConvBlock(2 * b, 2 * b)
        self.conv2_1, self.conv2_2 = ConvBlock(2 * b, 2 * b), ConvBlock(2 * b, 4 * b)
        self.conv3_1, self.conv3_2 = ConvBlock(4 * b, 4 * b), ConvBlock(4 * b, 8 * b)
        self.conv4_1, self.conv4_2 = ConvBlock(8 * b, 8 * b), ConvBlock(8 * b, 16 * b)
        self.conv5_1, self.conv5_2 = ConvBlock(24 * b, 8 * b), ConvBlock(8 * b, 8 * b)
        self.conv6_1, self.conv6_2 = ConvBlock(12 * b, 4 * b), ConvBlock(4 * b, 4 * b)
        self.conv7_1, self.conv7_2 = ConvBlock(6 * b, 4 * b), ConvBlock(4 * b, 4 * b)
        self.conv8_1, self.conv8_2 = ConvBlock(6 * b, 4 * b), ConvBlock(4 * b, 4 * b)
        self.drop = nn.Dropout(config.dropout)
        if config.num_classes:
            self.classification = nn.Sequential(nn.Conv3d(4 * b, config.num_classes, kernel_size=1))
        bottleneck = 1
        for s in config.patch_size:
            bottleneck *= s // 16
        self.fc1 = nn.Linear(bottleneck * 16 * b, 8 * b)
        self.fc2 = nn.Linear(8 * b, 4 * b)
        self.fc3 = nn.Linear(4 * b, 3)

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        conv0 = self.conv0_2(self.conv0_1(x))
        conv1 = self.conv1_2(self.conv1_1(F.max_pool3d(conv0, 2)))
        conv2 = self.conv2_2(self.conv2_1(F.max_pool3d(conv1, 2)))
        conv3 = self.conv3_2(self.conv3_1(F.max_pool3d(conv2, 2)))
        bottom = self.drop(self.conv4_2(self.conv4_1(F.max_pool3d(conv3, 2))))
        return [conv0, conv1, conv2, conv3, bottom]

    def latent_head(self, bottom: torch.Tensor) -> torch.Tensor:
        """(B, 16b, d, h, w) bottleneck features -> (B, 3) latent points."""
        return self.fc3(self.fc2(self.fc1(bottom.flatten(1))))

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) patches -> the encoder's deepest features."""
        return self._encode(x)[-1]

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) patches -> (B, 3) latent points, without running the decoder."""
        return self.latent_head(self.bottleneck(x))

    def _decode(self, skips: list[torch.Tensor], scales: int) -> list[torch.Tensor]:
        """Decoder features at 1/4, 1/2 and full resolution, stopping after the first `scales` of them."""
        conv0, conv1, conv2, conv3, bottom = skips
        up = lambda t: F.interpolate(t, scale_factor=2, mode="trilinear", align_corners=False)  # noqa: E731
        out = self.conv5_2(self.conv5_1(torch.cat((up(bottom), conv3), 1)))
        features = [self.conv6_2(self.conv6_1(torch.cat((up(out), conv2), 1)))]
        for block_1, block_2, skip in ((self.conv7_1, self.conv7_2, conv1), (self.conv8_1, self.conv8_2, conv0)):
            if len(features) == scales:
                break
            features.append(block_2(block_1(torch.cat((up(features[-1]), skip), 1))))
        return [F.normalize(f, dim=1) for f in features]

    def features(self, x: torch.Tensor, scales: int = 3) -> list[torch.Tensor]:
        """L2-normalised features at 1/4, 1/2 and full resolution (the first `scales`), without the latent.

        Two scales skip the full-resolution decoder blocks, about three quarters of the network's cost."""
        return self._decode(self._encode(x), scales)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Latent point and L2-normalised features at 1/4, 1/2 and full resolution."""
        skips = self._encode(x)
        return {"latent": self.latent_head(skips[-1]), "features": self._decode(skips, 3)}


def build_medlam(name_or_config: str | MedLAMConfig = "default") -> MedLAM:
    """Build an untrained MedLAM from a configuration name (`default`, `reference`) or a config."""
    if isinstance(name_or_config, str):
        if name_or_config not in CONFIGS:
            raise ValueError(f"unknown MedLAM configuration {name_or_config!r}; choose from {sorted(CONFIGS)}")
        name_or_config = CONFIGS[name_or_config]
    return MedLAM(name_or_config)


def state_dict_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """A short hash of the weights: template banks record it to refuse another model's bank."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().to("cpu", torch.float32).contiguous()
        digest.update(key.encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def _clean_state_dict(raw: dict) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model_state_dict", "model"):
        if key in raw and isinstance(raw[key], dict):
            raw = raw[key]
            break
    return {
        (k[len("module.") :] if k.startswith("module.") else k): v
        for k, v in raw.items()
        if isinstance(v, torch.Tensor)
    }


def _infer_config(state: dict[str, torch.Tensor], saved: dict | None) -> MedLAMConfig:
    if saved:
        return MedLAMConfig.from_dict(saved)
    if "conv0_1.model.conv1_1.Conv.weight" not in state or "fc1.weight" not in state:
        raise CheckpointError("checkpoint does not contain MedLAM weights (no conv0_1 / fc1 layers)")
    b = state["conv0_1.model.conv1_1.Conv.weight"].shape[0] // 2
    cells = state["fc1.weight"].shape[1] // (16 * b)
    side = round(cells ** (1 / 3)) * 16
    classes = state["classification.0.weight"].shape[0] if "classification.0.weight" in state else 0
    return MedLAMConfig(base_channels=b, patch_size=(side, side, side), num_classes=classes)


def _numpy_safe_globals() -> list:
    """numpy scalar and array types, safe to unpickle: official `.tar` checkpoints store `best_loss` as a
    numpy float, which `torch.load(weights_only=True)` refuses otherwise."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 1.26
        from numpy.core.multiarray import _reconstruct, scalar
    dtypes = {type(np.dtype(t)) for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.bool_)}
    return [scalar, _reconstruct, np.ndarray, np.dtype, *dtypes]


def load_medlam(
    path: str | os.PathLike, config: MedLAMConfig | None = None, device: str | torch.device = "cpu"
) -> MedLAM:
    """Load MedLAM weights: our checkpoints, or official ones (raw state dict or `.tar` with
    `state_dict`, keys with or without `module.`). Shapes that do not fit fail with CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"MedLAM checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(raw).__name__}")
    state = _clean_state_dict(raw)
    config = config or _infer_config(state, raw.get("config"))
    model = MedLAM(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        details = "; ".join(
            filter(
                None,
                [
                    f"missing {missing[:4]}" if missing else "",
                    f"unexpected {unexpected[:4]}" if unexpected else "",
                    f"shape mismatch {wrong[:3]}" if wrong else "",
                ],
            )
        )
        raise CheckpointError(f"{path}: weights do not match MedLAM {config}: {details}")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.to(device).eval()


def save_medlam(model: MedLAM, path: str | os.PathLike, half: bool = False, **extra) -> None:
    """Save config + weights (optionally fp16) atomically; `extra` entries are stored alongside."""
    state = {
        k: (v.half() if half and v.is_floating_point() else v).detach().cpu() for k, v in model.state_dict().items()
    }
    torch_save_atomic({"config": model.config.to_dict(), "state_dict": state, **extra}, path)


def model_fingerprint(model: MedLAM) -> str:
    return state_dict_fingerprint(model.state_dict())


__all__ = ["MedLAM", "MedLAMConfig", "CONFIGS", "build_medlam", "load_medlam", "save_medlam", "model_fingerprint"]
