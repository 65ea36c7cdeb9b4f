"""The MedLSAM pipeline: localise every organ of a template bank (MedLAM), prompt a SAM-family slice
segmenter with the boxes on every slice of each organ, assemble one label volume in the input's grid.

- Prompts. prior (default): on each slice, the box of the organ's prior (the matched templates' masks
  weighed by their intensities, ``medlsam.prior``). WPL: the organ's box on every slice of its cranio-caudal
  range. SPL: on each slice, the box of the localiser's z-slab holding that slice (``OrganLocation.slabs``).
  Boxes are inclusive voxel indices; on a slice ``np.take(array, k, axis)`` the box's x is the column index,
  y the row index.
- Work. One slice about every ``slice_spacing_mm`` of the organs' ranges is encoded, each encoder input (a
  slice, or a crop of one for zoomed organs) once (:class:`SliceEmbeddings`), and all the boxes sharing it are
  decoded in one call; SAM's masks are interpolated between the encoded slices.
- Assembly. An organ's probability is (1 - prior_weight) SAM + prior_weight prior; per voxel the most
  probable organ wins if its probability is above the threshold; organs not localised are left out and
  listed in ``not_found``.
- The query's labels are never read.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import ndimage

from medlsam.errors import MedLSAMError
from medlsam.localize import Localizer, OrganLocation
from medlsam.prior import FilePrior, prior_on_file, prior_slice_boxes
from medlsam.sam.slices import DEFAULT_WINDOW, Crop, SliceEmbeddings
from medlsam.volume import CTVolume

MODES = ("wpl", "spl", "prior")
LOG_EVERY_SLICES = 10  # without a progress bar, one log line per this many slices

logger = logging.getLogger(__name__)


@dataclass
class SegmentOptions:
    """Knobs of the segmentation stage; defaults are the measured best (benchmarks/results/segmentation.md)."""

    # wpl: one box per organ on all its slices; spl: the box of the slice's z-slab; prior: on each slice the
    # box of the organ prior (matched template masks x template intensities; wpl for organs without a prior).
    # Measured on the 33 OpenKBP validation scans: see benchmarks/results/segmentation.md.
    mode: str = "prior"
    # Keep only each organ's largest 3D connected component. Off: measured on OpenKBP train cases 59 / 60 (full
    # 3D, ground-truth boxes) it lowered mean Dice 0.270 -> 0.251 / raised it 0.301 -> 0.306 (3D box), and
    # 0.312 -> 0.273 on case 59 with slice boxes (thin esophagus / larynx masks are split across slices).
    largest_component: bool = False
    window: tuple[float, float] = DEFAULT_WINDOW  # CT window (HU) of the encoder's slice images
    threshold: float = 0.5  # mask probability above which a voxel belongs to an organ
    # Zoom: organs whose box is smaller than this (largest in-plane side, mm) are encoded in a crop. Off: with
    # the (-500, 1000) window a 64 px crop (x4) helped cord / esophagus with slice boxes (0.13 -> 0.67, 0.48 ->
    # 0.59, case 34) but hurt them with the 3D box, and each cropped organ costs an encoder call per slice.
    zoom_below_mm: float = 0.0
    crop_side_px: int = 64  # ... to a square crop of at least this many slice pixels (then resized to 256)
    crop_factor: float = 3.0  # ... and of at least crop_factor x the box's largest side
    # On a slice where SAM returns nothing inside the box, fill the ellipse inscribed in the box (at the
    # threshold, so real masks win overlaps). Measured with ground-truth prompts: case 34 (every 3rd slice)
    # slice boxes 0.473 -> 0.551 (cord 0.62 -> 0.78, esophagus 0.46 -> 0.81); 3D box: case 59 0.270 -> 0.305,
    # cases 34 / 60 unchanged. Not yet measured with MedLAM boxes (benchmark: --set empty_fallback=false).
    empty_fallback: bool = True
    encode_batch: int = 1  # slices per encoder pass (batches of 4 were not faster per slice on this CPU)
    prior_box_threshold: float = 0.5  # mode prior: the prompt is the box of the prior at this level
    # probability = (1 - w) SAM + w prior; 1: the prior alone (SAM is not run). With 0.8 the prior decides
    # where it is confident (below 0.375 or above 0.625) and SAM draws the edge in the band between. OpenKBP
    # train scans 2, 3, 5, 6 (not templates), mean Dice: prior alone 0.556, w 0.6 0.526, 0.7 0.545, 0.8 0.554;
    # scan 1: SAM alone on the prior's boxes 0.376, w 0.5 0.437, 0.7 0.522, prior alone 0.505. So on these
    # 4-5 mm slices SAM adds nothing measurable; 0.8 keeps it for the edges of finer scans at no Dice cost here
    # (but 25 s against 2.5 s per scan: prior_weight 1 is the fast choice).
    prior_weight: float = 0.8
    # Encode slices about this many mm apart (0: every slice) and interpolate SAM's masks between them. OpenKBP
    # train scans 2, 3, 5, 6 (2.5-3 mm slices, w 0.7): every slice 0.545, every 2nd 0.547, 3rd 0.546, 4th 0.545.
    slice_spacing_mm: float = 10.0

    @property
    def localizer_mode(self) -> str:
        """The localiser's box mode these prompts need (slab boxes for spl)."""
        return "spl" if self.mode == "spl" else "wpl"

    def __post_init__(self):
        if self.mode not in MODES:
            raise MedLSAMError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if not 0.0 <= self.prior_weight <= 1.0:
            raise MedLSAMError(f"prior_weight must be in [0, 1], got {self.prior_weight}")
        if not self.slice_spacing_mm >= 0:
            raise MedLSAMError(f"slice_spacing_mm must be 0 or more, got {self.slice_spacing_mm}")

        if not 0.0 < self.threshold < 1.0:
            raise MedLSAMError(f"threshold must be in (0, 1), got {self.threshold}")

    @property
    def uses_prior(self) -> bool:
        """Whether these options need the organ prior from the localiser."""
        return self.mode == "prior" or self.prior_weight > 0

    def slice_step(self, spacing_mm: float) -> int:
        """Every how many slices of ``spacing_mm`` one is encoded."""
        return max(1, int(np.floor(self.slice_spacing_mm / spacing_mm + 0.5))) if self.slice_spacing_mm > 0 else 1


@dataclass
class SegmentationResult:
    label: np.ndarray  # uint8 (uint16 if a value > 255), same shape and order as volume.array
    label_names: dict[str, int]  # organs of the bank selection -> bank label values
    boxes: dict[str, dict]  # OrganLocation.to_json() per organ (+ "voxels" in the label)
    not_found: list[str]
    timings_s: dict[str, float] = field(default_factory=dict)
    encoder_calls: int = 0
    reference_encoder_calls: int = 0  # one encoder call per organ per slice (the reference implementation)

    def to_json(self) -> dict:
        return {"labels": dict(self.label_names), "boxes": self.boxes, "not_found": list(self.not_found),
                "timings_s": {k: round(float(v), 3) for k, v in self.timings_s.items()},
                "encoder_calls": int(self.encoder_calls), "reference_encoder_calls": int(self.reference_encoder_calls)}


@dataclass
class _Prompts:
    """One organ's prompts: slice index -> (x0, y0, x1, y1) box, the crop its slices are encoded in, and its
    prior on the file grid (when the localiser matched templates)."""

    name: str
    value: int
    boxes: dict[int, np.ndarray]
    crop: Crop | None = None
    prior: FilePrior | None = None


def _inplane(axis: int) -> tuple[int, int]:
    rows, cols = (a for a in range(3) if a != axis)
    return rows, cols


def _slice_box(lo, hi, axis: int, shape: tuple[int, int]) -> np.ndarray:
    """Inclusive voxel box -> (x0, y0, x1, y1) on slices along ``axis`` (x = column, y = row), clipped."""
    r, c = _inplane(axis)
    box = np.array([lo[c], lo[r], hi[c], hi[r]], dtype=np.float64)
    box[[0, 2]] = np.clip(box[[0, 2]], 0, shape[1] - 1)
    box[[1, 3]] = np.clip(box[[1, 3]], 0, shape[0] - 1)
    return box


def organ_prompts(location: OrganLocation, axis: int, shape3d: tuple[int, int, int], mode: str) -> dict[int, np.ndarray]:
    """Per slice index along ``axis``, the box prompt of one localised organ (WPL or SPL)."""
    if not location.found or not location.box_voxel:
        return {}
    lo, hi = (np.asarray(b) for b in location.box_voxel)
    slice_shape = tuple(s for a, s in enumerate(shape3d) if a != axis)
    k0, k1 = max(0, int(lo[axis])), min(shape3d[axis] - 1, int(hi[axis]))
    whole = _slice_box(lo, hi, axis, slice_shape)
    slabs = [(np.asarray(s["box_voxel"][0]), np.asarray(s["box_voxel"][1])) for s in location.slabs] \
        if mode == "spl" else []
    if not slabs:
        return {k: whole for k in range(k0, k1 + 1)}
    ranges = [(int(a[axis]), int(b[axis])) for a, b in slabs]
    centres = np.array([(a + b) / 2 for a, b in ranges])
    k0 = max(0, min(k0, min(a for a, _ in ranges)))
    k1 = min(shape3d[axis] - 1, max(k1, max(b for _, b in ranges)))
    prompts = {}
    for k in range(k0, k1 + 1):
        covering = [i for i, (a, b) in enumerate(ranges) if a <= k <= b]
        candidates = covering or list(range(len(slabs)))
        best = min(candidates, key=lambda i: abs(centres[i] - k))  # boundary slices: the slab it is central in
        prompts[k] = _slice_box(*slabs[best], axis, slice_shape)
    return prompts


def _crop_window(boxes: list[np.ndarray], shape: tuple[int, int], side: float) -> Crop:
    """A square window of ``side`` pixels centred on the union of ``boxes``, inside the slice."""
    union = np.array([min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes),
                      max(b[3] for b in boxes)])
    side = int(min(np.ceil(side), shape[0], shape[1]))
    cx, cy = (union[0] + union[2] + 1) / 2, (union[1] + union[3] + 1) / 2
    r0 = int(np.clip(round(cy - side / 2), 0, shape[0] - side))
    c0 = int(np.clip(round(cx - side / 2), 0, shape[1] - side))
    return (r0, c0, r0 + side, c0 + side)


def _ellipse(shape: tuple[int, int], box: np.ndarray) -> np.ndarray:
    x0, y0, x1, y1 = box
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return (((rows - (y0 + y1) / 2) / ((y1 - y0 + 1) / 2)) ** 2
            + ((cols - (x0 + x1) / 2) / ((x1 - x0 + 1) / 2)) ** 2) <= 1.0


def _box_mask(shape: tuple[int, int], box: np.ndarray, margin: int = 0) -> np.ndarray:
    """1 inside the (x0, y0, x1, y1) box widened by ``margin`` pixels, 0 elsewhere."""
    mask = np.zeros(shape, np.float32)
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    mask[max(0, y0 - margin):y1 + margin + 1, max(0, x0 - margin):x1 + margin + 1] = 1.0
    return mask


def encoded_slices(organ_slices: list[list[int]], step: int) -> list[int]:
    """The slices to encode: every ``step``-th slice of the organs' ranges (one lattice for all organs, so a
    slice serves every organ on it) plus, for an organ that no lattice slice reaches, its middle slice."""
    ks = sorted({k for organ in organ_slices for k in organ})
    if step <= 1 or not ks:
        return ks
    chosen = {k for k in ks if (k - ks[0]) % step == 0}
    for organ in organ_slices:
        if organ and not chosen.intersection(organ):
            chosen.add(organ[len(organ) // 2])
    for organ in organ_slices:  # an organ's first and last slices: within step // 2 of an encoded one
        for end in (organ[0], organ[-1]) if organ else ():
            if min(abs(end - k) for k in chosen if k in organ) > step // 2:
                chosen.add(end)
    return sorted(chosen)


def interpolate_slices(known: dict[int, np.ndarray], k: int) -> np.ndarray:
    """Linear interpolation of slice probabilities between the nearest known slices around k (the nearest
    one when k is beyond them)."""
    below = [j for j in known if j < k]
    above = [j for j in known if j > k]
    if below and above:
        lo, hi = max(below), min(above)
        t = (k - lo) / (hi - lo)
        return (1.0 - t) * known[lo] + t * known[hi]
    return known[max(below)] if below else known[min(above)]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean mask (the mask itself when empty)."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


class MedLSAMPipeline:
    """Localise (MedLAM + template bank) and segment (SAM-family slice segmenter) the bank's organs."""

    def __init__(self, localizer: Localizer, segmenter, options: SegmentOptions | None = None):
        self.localizer, self.segmenter = localizer, segmenter
        self.options = options or SegmentOptions()

    def _localizer(self) -> Localizer:
        """The localiser with the box mode and the prior these options need."""
        mode, prior = self.options.localizer_mode, self.options.uses_prior
        if (self.localizer.options.mode, self.localizer.options.prior) == (mode, prior):
            return self.localizer
        options = replace(self.localizer.options, mode=mode, prior=prior)
        return Localizer(self.localizer.model, self.localizer.bank, options)

    def segment(self, volume: CTVolume, organs: list[str] | None = None, progress: bool = False,
                embeddings: SliceEmbeddings | None = None) -> SegmentationResult:
        """Localise the chosen organs (all of the bank by default) and segment them."""
        chosen = self.localizer.bank.select(organs)  # unknown organ: TemplateError before any work
        tic = time.perf_counter()
        located = self._localizer().localize(volume, list(chosen))
        seconds = time.perf_counter() - tic
        result = self.segment_locations(volume, located["organs"], progress=progress, embeddings=embeddings)
        result.timings_s = {"localize": seconds, **result.timings_s}
        return result

    def segment_locations(self, volume: CTVolume, locations: dict[str, OrganLocation], progress: bool = False,
                          embeddings: SliceEmbeddings | None = None) -> SegmentationResult:
        """Segment given organ locations (MedLAM's, or e.g. ground-truth boxes for benchmarks)."""
        opt = self.options
        own = embeddings is None
        if own:
            embeddings = SliceEmbeddings(self.segmenter, volume, window=opt.window)
        elif embeddings.volume.shape != volume.shape:
            raise MedLSAMError(f"embeddings of a {embeddings.volume.shape} volume given for a {volume.shape} volume")
        axis, shape = embeddings.axis, embeddings.slice_shape
        calls0 = embeddings.encoder_calls
        timings = {"encode": 0.0, "decode": 0.0, "assemble": 0.0}
        tic = time.perf_counter()
        prompts = [p for p in (self._organ_prompts(name, loc, volume, axis, shape) for name, loc in locations.items())
                   if p.boxes]
        timings["prompts"] = time.perf_counter() - tic
        ks = sorted({k for p in prompts for k in p.boxes})
        with_sam = [p for p in prompts if opt.prior_weight < 1.0 or p.prior is None]  # prior_weight 1: no SAM
        encoded = encoded_slices([sorted(p.boxes) for p in with_sam], opt.slice_step(float(volume.spacing[axis])))

        try:
            from tqdm import tqdm
        except ImportError:  # tqdm comes with MONAI; without it there is simply no bar
            tqdm = None
        bar = tqdm(encoded, desc="segmenting slices", unit="slice", disable=not (progress and encoded)) if tqdm \
            else encoded
        sam: dict[str, dict[int, np.ndarray]] = {p.name: {} for p in prompts}  # organ -> slice -> probabilities
        try:
            for n, k in enumerate(bar, 1):
                if not progress and (n % LOG_EVERY_SLICES == 0 or n == len(encoded)):  # a log line, not a bar
                    logger.info(f"SAM: slice {n}/{len(encoded)} ({timings['encode']:.1f} s encoding so far)")
                here = [p for p in with_sam if k in p.boxes]
                for crop in dict.fromkeys(p.crop for p in here):  # one encoder input, one decoder call
                    group = [p for p in here if p.crop == crop]
                    tic = time.perf_counter()
                    embeddings.get(k, crop)
                    timings["encode"] += time.perf_counter() - tic
                    tic = time.perf_counter()
                    boxes = np.array([p.boxes[k] for p in group])
                    if crop is not None:
                        boxes = boxes - np.array([crop[1], crop[0], crop[1], crop[0]], dtype=np.float64)
                    masks, _ = embeddings.decode(k, crop, boxes=boxes)
                    timings["decode"] += time.perf_counter() - tic
                    for p, mask in zip(group, masks):
                        if crop is None:
                            sam[p.name][k] = mask
                        else:
                            full = np.zeros(shape, np.float32)
                            full[crop[0]:crop[2], crop[1]:crop[3]] = mask
                            sam[p.name][k] = full
                    if own:
                        embeddings.discard(k, crop)
        finally:
            if progress and tqdm:
                bar.close()

        tic = time.perf_counter()
        max_value = max([int(loc.value) for loc in locations.values()] + [0])
        label = np.zeros(volume.shape, dtype=np.uint16 if max_value > 255 else np.uint8)
        slices_view = np.moveaxis(label, axis, 0)  # a view: slices_view[k] is np.take(label, k, axis)
        for k in ks:
            here = [p for p in prompts if k in p.boxes]
            probs = np.stack([self._slice_probability(p, k, sam[p.name], axis, shape) for p in here])
            best = probs.argmax(axis=0)
            keep = probs.max(axis=0) > opt.threshold
            values = np.array([p.value for p in here], dtype=label.dtype)
            slices_view[k] = np.where(keep, values[best], 0)

        voxels = {}
        for p in prompts:
            ks_p = sorted(p.boxes)
            region = [slice(None)] * 3
            region[axis] = slice(ks_p[0], ks_p[-1] + 1)
            region = tuple(region)
            mask = label[region] == p.value
            if opt.largest_component and mask.any():
                cleaned = largest_component(mask)
                label[region][mask & ~cleaned] = 0
                mask = cleaned
            voxels[p.name] = int(mask.sum())
        timings["assemble"] += time.perf_counter() - tic

        boxes_json = {}
        for name, loc in locations.items():
            entry = loc.to_json()
            entry["voxels"] = voxels.get(name, 0)
            if loc.found and voxels.get(name, 0) == 0:
                entry.setdefault("reason", "segmentation empty inside the box")
            boxes_json[name] = entry
        not_found = [name for name in locations if voxels.get(name, 0) == 0]
        return SegmentationResult(
            label=label, label_names={name: int(loc.value) for name, loc in locations.items()}, boxes=boxes_json,
            not_found=not_found, timings_s=timings, encoder_calls=embeddings.encoder_calls - calls0,
            reference_encoder_calls=sum(len(p.boxes) for p in prompts))

    def _organ_prompts(self, name: str, loc: OrganLocation, volume: CTVolume, axis: int,
                       shape: tuple[int, int]) -> _Prompts:
        """The organ's per-slice boxes (mode), the crop it is encoded in (zoom) and its prior on the file grid."""
        opt = self.options
        prior = None
        if opt.uses_prior and loc.found and loc.prior is not None and loc.grid is not None:
            prior = prior_on_file(loc.prior, loc.grid)
        if opt.mode == "prior" and prior is not None:
            boxes = prior_slice_boxes(prior, axis, opt.prior_box_threshold)
        else:
            boxes = organ_prompts(loc, axis, volume.shape, "spl" if opt.mode == "spl" else "wpl")
        crop = None
        if opt.zoom_below_mm > 0 and boxes:
            r, c = _inplane(axis)
            union = np.array([min(b[0] for b in boxes.values()), min(b[1] for b in boxes.values()),
                              max(b[2] for b in boxes.values()), max(b[3] for b in boxes.values())])
            side_mm = max((union[2] - union[0] + 1) * volume.spacing[c], (union[3] - union[1] + 1) * volume.spacing[r])
            if side_mm < opt.zoom_below_mm:
                side_px = max(union[2] - union[0], union[3] - union[1]) + 1
                crop = _crop_window(list(boxes.values()), shape, max(opt.crop_side_px, opt.crop_factor * side_px))
                if crop == (0, 0, shape[0], shape[1]):
                    crop = None
        return _Prompts(name, int(loc.value), boxes, crop, prior)

    def _slice_probability(self, p: _Prompts, k: int, sam: dict[int, np.ndarray], axis: int,
                           shape: tuple[int, int]) -> np.ndarray:
        """Organ probability on slice k: SAM's mask (interpolated between encoded slices, kept to the slice's
        box), with the empty-mask fallback, blended with the template prior; the prior alone when SAM is not
        run (prior_weight 1)."""
        opt = self.options
        box = p.boxes[k]
        if not sam:
            prior = p.prior.slice(axis, k, shape)
            return np.zeros(shape, np.float32) if prior is None else prior
        if k in sam:
            prob = sam[k]
        else:
            prob = interpolate_slices(sam, k) * _box_mask(shape, box, margin=2)
        if opt.empty_fallback and not (prob > opt.threshold).any():
            prob = np.maximum(prob, np.where(_ellipse(shape, box), opt.threshold + 1e-3, 0.0)).astype(np.float32)
        if opt.prior_weight > 0 and p.prior is not None:
            prior = p.prior.slice(axis, k, shape)
            if prior is not None:
                prob = (1.0 - opt.prior_weight) * prob + opt.prior_weight * prior
        return prob
