"""Interactive SAM: `sam` (2D, the clicked slice) and `sam_3d` (carried to the neighbouring slices).

Prompts follow MONAI Label: voxel indices of the stored file, ``foreground`` / ``background`` clicks
``[[i, j, k], ...]`` and Slicer's ``roi`` ``[i0, i1, j0, j1, k0, k1]``. The 2D task segments slices along the
last file axis (Slicer replaces slice k = the clicks' third index); the 3D task propagates along the
file axis closest to the cranio-caudal axis. Slice embeddings are cached per image: a second click on
an encoded slice costs only SAM's decoder.
"""

from __future__ import annotations

from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferType

from lib.infers.common import MedLSAMInferTask, number
from lib.volumes import Volumes
from medlsam.utils.names import NAME_RULE, is_plain_name

SLICER_SLICE_AXIS = 2
MAX_SLICES = 10000  # sam_3d max_slices (per direction; 0 = until the object ends)


def _prompts(request: dict, shape):
    from medlsam.interact.interactive import parse_prompts

    return parse_prompts(shape, request.get("foreground"), request.get("background"), request.get("roi"))


def _label_name(request: dict) -> str:
    """The result's structure name (the request's ``label``), plain text; else 400."""
    label = request.get("label_name")
    if label is None or label == "":
        return "sam"
    if not is_plain_name(label):
        raise HTTPException(status_code=400, detail=f"label {str(label)[:80]!r} is not plain text ({NAME_RULE})")
    return label


class SAM2DInfer(MedLSAMInferTask):
    def __init__(self, volumes: Volumes):
        super().__init__(
            volumes,
            InferType.DEEPGROW,
            [],
            2,
            "SAM on the current slice: foreground/background clicks and/or a roi box",
            config={},
        )

    def run(self, request: dict, entry: dict):
        from medlsam.interact.interactive import segment_slice, slice_mask_to_volume

        volume = entry["volume"]
        prompts = _prompts(request, volume.shape)
        clicked = sorted({int(p[SLICER_SLICE_AXIS]) for p in [*prompts.foreground, *prompts.background]})
        if len(clicked) > 1:
            raise HTTPException(
                status_code=400,
                detail=f"foreground/background: the 2D task takes clicks on one "
                f"slice, got slices {clicked}; use sam_3d for several",
            )
        embeddings = self.volumes.embeddings(entry, axis=SLICER_SLICE_AXIS)
        calls = embeddings.encoder_calls
        out = segment_slice(embeddings, prompts)
        label = slice_mask_to_volume(out["mask"], volume.shape, out["axis"], out["slice"])
        return label, {
            "label_names": {_label_name(request): 1},
            "slice": out["slice"],
            "axis": out["axis"],
            "predicted_iou": round(out["iou"], 4),
            "voxels": int(out["mask"].sum()),
            "encoder_calls": embeddings.encoder_calls - calls,
        }


class SAM3DInfer(MedLSAMInferTask):
    def __init__(self, volumes: Volumes):
        super().__init__(
            volumes,
            InferType.DEEPGROW,
            [],
            3,
            "SAM in 3D: the mask of the clicked slices is carried slice by slice both ways",
            config={"max_slices": 0, "min_iou": 0.5},
        )

    def check_options(self, request: dict):
        """The request's PropagationOptions; 400 naming a bad one (checked before any work)."""
        from medlsam.interact.propagation import PropagationOptions

        _label_name(request)
        return PropagationOptions(
            max_slices=number(request, "max_slices", 0, int, 0, MAX_SLICES),
            min_iou=number(request, "min_iou", 0.5, float, 0.0, 1.0),
        )

    def run(self, request: dict, entry: dict):
        from medlsam.interact.propagation import segment_volume

        volume = entry["volume"]
        prompts = _prompts(request, volume.shape)
        options = self.check_options(request)
        embeddings = self.volumes.embeddings(entry)
        calls = embeddings.encoder_calls
        result = segment_volume(embeddings, prompts, options)
        return result.mask, {
            "label_names": {_label_name(request): 1},
            **result.to_json(),
            "encoder_calls": embeddings.encoder_calls - calls,
        }
