"""Slice embeddings of one volume: every encoder input (a whole axial slice, or a crop of one) is encoded
at most once and cached, and the encoder calls are counted.

Slices are taken along ``axis`` (default: the file axis closest to the body's cranio-caudal axis) as
``np.take(volume.array, k, axis)``: rows are the first remaining file axis, columns the second, so a voxel
box maps to pixels as x = column index, y = row index. Prompts and masks use those slice pixels; the
encoder, however, sees every slice in the radiological display orientation (rows anterior to posterior,
columns patient right to left) whatever the file order: on OpenKBP case 202 with ground-truth slice boxes,
LiteMedSAM's mean Dice was 0.46 that way against 0.375 on the file-order (transposed) image (mandible
0.24 / 0.04, left parotid 0.69 / 0.52). ``decode`` maps prompts in and masks back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medlsam.errors import MedLSAMError
from medlsam.io.volume import CTVolume
from medlsam.segment.sam.images import ct_slice_to_image
from medlsam.segment.sam.segmenter import Embedding
from medlsam.utils import cancel
from medlsam.utils.atomic import torch_save_atomic
from medlsam.utils.geometry import inplane_axes
from medlsam.utils.metrics import cranio_caudal_axis

# A soft-tissue window. Measured with LiteMedSAM and ground-truth boxes on every 3rd slice of OpenKBP train
# case 34 (not a template): mean Dice over the 7 organs 0.43 (3D box) / 0.47 (slice boxes) against 0.27 /
# 0.31 with the reference's (-500, 1000) window (brainstem 0.77 vs 0.18; only the mandible, bone, lost).
DEFAULT_WINDOW = (-160.0, 240.0)

Crop = tuple[int, int, int, int]  # (row0, col0, row1, col1), exclusive ends, in slice pixels


class SliceEmbeddings:
    """Encodes each axial slice (or slice crop) of one volume at most once (lazy cache); counts encoder calls."""

    def __init__(
        self,
        segmenter,
        volume: CTVolume,
        window: tuple[float, float] = DEFAULT_WINDOW,
        axis: int | None = None,
        cache_dir: str | Path | None = None,
    ):
        """``cache_dir``: keep whole-slice embeddings on disk there too (float16, one file per slice; the folder
        must be this scan's and this window's and encoder's: benchmarks and the adaptation reuse it across runs;
        encoder_calls counts only real encoder calls)."""
        self.segmenter, self.volume = segmenter, volume
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.window = (float(window[0]), float(window[1]))
        self.axis = cranio_caudal_axis(volume.affine) if axis is None else int(axis)
        if self.axis not in (0, 1, 2):
            raise MedLSAMError(f"slice axis must be 0, 1 or 2, got {axis}")
        self.encoder_calls = 0  # encoded inputs (slices or crops), not batches; from cache_dir included
        self.disk_reads = 0  # of which read from cache_dir
        self._cache: dict[tuple[int, Crop | None], Embedding] = {}
        self.transpose, self.flip_rows, self.flip_cols = display_orientation(volume.affine, self.axis)

    @property
    def num_slices(self) -> int:
        return self.volume.shape[self.axis]

    @property
    def slice_shape(self) -> tuple[int, int]:
        return tuple(s for a, s in enumerate(self.volume.shape) if a != self.axis)  # type: ignore[return-value]

    def _check(self, k: int) -> int:
        k = int(k)
        if not 0 <= k < self.num_slices:
            raise MedLSAMError(f"slice {k} outside 0..{self.num_slices - 1} along axis {self.axis}")
        return k

    def slice_image(self, k: int, crop: Crop | None = None) -> np.ndarray:
        """(H, W, 3) uint8 image of slice k (array order of np.take(volume.array, k, axis)), or of a crop."""
        hu = np.take(self.volume.array, self._check(k), axis=self.axis)
        if crop is not None:
            r0, c0, r1, c1 = crop
            hu = hu[r0:r1, c0:c1]
        return ct_slice_to_image(self._to_display(hu), self.window)

    def _to_display(self, image: np.ndarray) -> np.ndarray:
        """Slice pixels (rows, cols, ...) -> the display orientation the encoder sees."""
        if self.transpose:
            image = np.swapaxes(image, 0, 1)
        if self.flip_rows:
            image = image[::-1]
        if self.flip_cols:
            image = image[:, ::-1]
        return np.ascontiguousarray(image)

    def _from_display(self, masks: np.ndarray) -> np.ndarray:
        """(N, h, w) masks in display orientation -> slice pixels."""
        if self.flip_cols:
            masks = masks[:, :, ::-1]
        if self.flip_rows:
            masks = masks[:, ::-1]
        if self.transpose:
            masks = np.swapaxes(masks, 1, 2)
        return np.ascontiguousarray(masks)

    def _points_to_display(self, xy: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """(..., 2) x (column), y (row) slice pixel coordinates -> display coordinates; shape = (rows, cols)."""
        xy = np.array(xy, dtype=np.float64)
        height, width = shape
        if self.transpose:
            xy = xy[..., ::-1].copy()
            height, width = width, height
        if self.flip_rows:
            xy[..., 1] = height - 1 - xy[..., 1]
        if self.flip_cols:
            xy[..., 0] = width - 1 - xy[..., 0]
        return xy

    def decode(
        self,
        k: int,
        crop: Crop | None = None,
        boxes: np.ndarray | None = None,
        points: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        multimask: bool = False,
        mask_inputs: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The segmenter's decode on slice k (or a crop of it) with prompts and masks in slice pixels
        (relative to the crop when given): boxes (N, 4) x0, y0, x1, y1, points (N, P, 2) x, y, mask prompts
        (N, rows, cols) probabilities."""
        embedding = self.get(k, crop)
        shape = self.slice_shape if crop is None else (crop[2] - crop[0], crop[3] - crop[1])
        if boxes is not None:
            boxes = self.boxes_to_display(boxes, shape)
        if points is not None:
            points = self._points_to_display(points, shape)
        if mask_inputs is not None:
            mask_inputs = self.to_display(np.moveaxis(np.asarray(mask_inputs, dtype=np.float32), 0, -1))
            mask_inputs = np.ascontiguousarray(np.moveaxis(mask_inputs, -1, 0))
        extra = {} if mask_inputs is None else {"mask_inputs": mask_inputs}  # segmenters without mask prompts
        masks, iou = self.segmenter.decode(
            embedding, boxes=boxes, points=points, point_labels=point_labels, multimask=multimask, **extra
        )
        return self._from_display(masks), iou

    def to_display(self, image: np.ndarray) -> np.ndarray:
        """Slice pixels (rows, cols, ...) -> the display orientation the encoder sees (masks, priors)."""
        return self._to_display(image)

    def boxes_to_display(self, boxes: np.ndarray, shape: tuple[int, int] | None = None) -> np.ndarray:
        """(N, 4) x0, y0, x1, y1 boxes in slice pixels -> display pixels (``shape``: rows, cols of the slice)."""
        shape = self.slice_shape if shape is None else shape
        corners = self._points_to_display(np.asarray(boxes, dtype=np.float64).reshape(-1, 2, 2), shape)
        return np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1)

    def get(self, k: int, crop: Crop | None = None) -> Embedding:
        """The embedding of slice k (or of ``crop`` of it), encoded on first use."""
        key = (self._check(k), None if crop is None else tuple(int(c) for c in crop))
        if key not in self._cache:
            self._encode([key])
        return self._cache[key]

    def prefetch(self, ks: list[int], batch: int = 1, crop: Crop | None = None) -> None:
        """Encode the slices of ``ks`` not cached yet, ``batch`` inputs per encoder forward pass."""
        crop = None if crop is None else tuple(int(c) for c in crop)
        todo = list(dict.fromkeys((self._check(k), crop) for k in ks if (int(k), crop) not in self._cache))
        for start in range(0, len(todo), max(1, int(batch))):
            self._encode(todo[start : start + max(1, int(batch))])

    def _disk_path(self, key: tuple[int, Crop | None]) -> Path | None:
        return None if self.cache_dir is None or key[1] is not None else self.cache_dir / f"{self.axis}_{key[0]}.pt"

    def _encode(self, keys: list[tuple[int, Crop | None]]) -> None:
        todo = []
        for key in keys:
            path = self._disk_path(key)
            if path is not None and path.is_file():
                stored = torch.load(path, map_location="cpu", weights_only=True)
                self._cache[key] = Embedding(
                    stored["features"].float(),
                    tuple(stored["original_size"]),
                    tuple(stored["input_size"]),
                    self.segmenter.name,
                )
                self.encoder_calls += 1  # the slice needed its encoding; this run read it from disk
                self.disk_reads += 1
            else:
                todo.append(key)
        if not todo:
            return
        cancel.check()  # encoding is the costly step of every SAM task: a bounded request stops here
        embeddings = self.segmenter.encode_batch([self.slice_image(k, crop) for k, crop in todo])
        self.encoder_calls += len(todo)
        for key, embedding in zip(todo, embeddings):
            path = self._disk_path(key)
            if path is not None:
                stored = {
                    "features": embedding.features.half().cpu(),
                    "original_size": list(embedding.original_size),
                    "input_size": list(embedding.input_size),
                }
                torch_save_atomic(stored, path)
                # the same float16-rounded features whether this run encoded them or a later run reads them
                embedding = Embedding(
                    stored["features"].float(), embedding.original_size, embedding.input_size, embedding.backend
                )
            self._cache[key] = embedding

    def discard(self, k: int, crop: Crop | None = None) -> None:
        """Free one cached embedding (LiteMedSAM's is 4 MB) once nothing more will be decoded on it."""
        self._cache.pop((int(k), None if crop is None else tuple(int(c) for c in crop)), None)

    def with_segmenter(self, segmenter) -> SliceEmbeddings:
        """The same slices decoded by another segmenter with the same image encoder (e.g. LiteMedSAM adapted by
        ``medlsam adapt``, whose encoder is frozen): the embeddings cache is shared, nothing is re-encoded."""
        if segmenter.name != self.segmenter.name or not _same_encoder(segmenter, self.segmenter):
            raise MedLSAMError(f"{segmenter.name}'s image encoder differs: its slices must be encoded again")
        twin = SliceEmbeddings(segmenter, self.volume, self.window, self.axis, self.cache_dir)
        twin._cache = self._cache
        return twin

    def clear(self) -> None:
        """Drop the cached embeddings (the count stays)."""
        self._cache.clear()


def _same_encoder(a, b) -> bool:
    if a is b or a.model.image_encoder is b.model.image_encoder:
        return True
    mine, theirs = a.model.image_encoder.state_dict(), b.model.image_encoder.state_dict()
    return mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k].to(mine[k].device)) for k in mine)


def display_orientation(affine: np.ndarray, axis: int) -> tuple[bool, bool, bool]:
    """(transpose, flip rows, flip columns) that turn slices along `axis` into the radiological view:
    rows run anterior to posterior (+y of LPS), columns patient right to left (+x)."""
    rows_axis, cols_axis = inplane_axes(axis)
    rows_dir, cols_dir = affine[:3, rows_axis], affine[:3, cols_axis]
    transpose = abs(rows_dir[0]) > abs(cols_dir[0])  # file rows run along x: swap rows and columns
    if transpose:
        rows_dir, cols_dir = cols_dir, rows_dir
    return bool(transpose), bool(rows_dir[1] < 0), bool(cols_dir[0] < 0)
