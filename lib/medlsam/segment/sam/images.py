"""Slice images for SAM-family encoders: CT windowing and each checkpoint's resize / normalise / pad."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from medlsam.errors import InvalidImageError, MedLSAMError

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


def ct_slice_to_image(hu_slice: np.ndarray, window: tuple[float, float] = (-500, 1000)) -> np.ndarray:
    """Clip a 2D CT slice (HU) to ``window``, scale to [0, 255] and repeat to an (H, W, 3) uint8 image."""
    hu = np.asarray(hu_slice, dtype=np.float32)
    if hu.ndim != 2:
        raise InvalidImageError(f"a CT slice must be 2D, got shape {hu.shape}")
    lo, hi = float(window[0]), float(window[1])
    if not hi > lo:
        raise MedLSAMError(f"window must be (low, high) with low < high, got {window}")
    hu = np.nan_to_num(hu, nan=lo, posinf=hi, neginf=lo)
    scaled = np.rint((np.clip(hu, lo, hi) - lo) / (hi - lo) * 255.0).astype(np.uint8)
    return np.repeat(scaled[:, :, None], 3, axis=2)


def _as_float_image(image: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1) or (H, W, 3), uint8 or float in [0, 1] -> float32 (H, W, 3) in [0, 255]."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3) or min(image.shape[:2]) < 1:
        raise InvalidImageError(f"a slice image must be (H, W, 3) (or (H, W)), got shape {image.shape}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if image.dtype == np.uint8:
        return image.astype(np.float32)
    if not np.issubdtype(image.dtype, np.floating) and image.dtype != bool:
        raise InvalidImageError(f"a slice image must be uint8 or float in [0, 1], got dtype {image.dtype}")
    image = image.astype(np.float32)
    if not np.isfinite(image).all():
        raise InvalidImageError("a slice image contains NaN or infinite values")
    if image.size and (image.min() < -1e-3 or image.max() > 1 + 1e-3):
        raise InvalidImageError(
            f"a float slice image must be in [0, 1], got [{image.min():.3g}, {image.max():.3g}]; "
            "use ct_slice_to_image for HU slices"
        )
    return np.clip(image, 0.0, 1.0) * 255.0


def _longest_side_shape(h: int, w: int, target: int) -> tuple[int, int]:
    scale = target / max(h, w)  # as ResizeLongestSide.get_preprocess_shape and LiteMedSAM's script
    return int(h * scale + 0.5), int(w * scale + 0.5)


def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of area-averaging resampling: overlap of each output footprint with each
    input pixel. Equal to OpenCV INTER_AREA when shrinking and when enlarging."""
    edges = np.arange(n_out + 1) * (n_in / n_out)
    lo, hi = edges[:-1, None], edges[1:, None]
    pix = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, pix + 1) - np.maximum(lo, pix), 0, None)
    return (overlap / overlap.sum(axis=1, keepdims=True)).astype(np.float32)


def _resize_area(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    wy, wx = _area_weights(image.shape[0], shape[0]), _area_weights(image.shape[1], shape[1])
    return np.einsum("ah,hwc,bw->abc", wy, image, wx, optimize=True)


def _resize_spline(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """skimage.transform.resize(image, shape, order=3, anti_aliasing=True, preserve_range=True)."""
    from scipy import ndimage

    factors = (image.shape[0] / shape[0], image.shape[1] / shape[1])
    out = np.empty((*shape, image.shape[2]), dtype=np.float32)
    for c in range(image.shape[2]):
        channel = image[:, :, c].astype(np.float64)
        sigma = tuple(max(0.0, (f - 1) / 2) for f in factors)
        if any(s > 0 for s in sigma):
            channel = ndimage.gaussian_filter(channel, sigma, mode="mirror")
        zoom = (shape[0] / channel.shape[0], shape[1] / channel.shape[1])
        out[:, :, c] = ndimage.zoom(channel, zoom, order=3, mode="mirror", grid_mode=True)
    return np.clip(out, image.min(), image.max())


def _minmax(image: np.ndarray) -> np.ndarray:
    lo, hi = float(image.min()), float(image.max())
    return (image - lo) / max(hi - lo, 1e-8)


def prepare_input(
    image: np.ndarray, size: int, resize: str, normalise: str, square: bool = False
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """One slice -> ((3, size, size) float model input, original (H, W), resized (h, w)).

    ``resize``: "area" (LiteMedSAM: OpenCV INTER_AREA), "sam" (SamPredictor: PIL bilinear on uint8) or
    "spline" (MedSAM: skimage cubic spline); ``normalise``: "minmax" ([0, 1]) or "imagenet" (SAM's
    mean/std in [0, 255] units); ``square`` resizes to size x size instead of the longest side.
    The resized image sits top-left, zero padded to size x size (like Sam.preprocess / LiteMedSAM).
    """
    pixels = _as_float_image(image)
    h, w = pixels.shape[:2]
    new = (size, size) if square else _longest_side_shape(h, w, size)
    if resize == "sam":
        from PIL import Image

        rgb = Image.fromarray(np.rint(pixels).astype(np.uint8))
        resized = np.asarray(rgb.resize((new[1], new[0]), Image.BILINEAR), dtype=np.float32)
    elif resize == "area":
        resized = _resize_area(pixels, new)
    elif resize == "spline":
        resized = _resize_spline(pixels, new)
    else:
        raise ValueError(f"unknown resize {resize!r}")
    if normalise == "minmax":
        resized = _minmax(resized)
    elif normalise == "imagenet":
        resized = (resized - np.asarray(SAM_PIXEL_MEAN, np.float32)) / np.asarray(SAM_PIXEL_STD, np.float32)
    else:
        raise ValueError(f"unknown normalisation {normalise!r}")
    tensor = torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1), dtype=np.float32))
    return F.pad(tensor, (0, size - new[1], 0, size - new[0])), (h, w), new
