"""The MedLSAM pipeline: scan -> localisation (MedLAM, the template bank, the organ prior; file frame) ->
prompts (``medlsam.segment.prompts``) -> SAM's slice masks -> one label volume (``medlsam.segment.assemble``).

One slice about every ``slice_spacing_mm`` of the organs' ranges is encoded, each once
(:class:`SliceEmbeddings`), and all the boxes on it are decoded in one call; SAM's masks are interpolated
between the encoded slices. Organs not localised are left out and listed in ``not_found``. Writing the
result is ``medlsam.segment.outputs``' job, the QC picture ``medlsam.segment.qc``'s. The query's labels are never read.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from medlsam.atlas.localize import Localizer, OrganLocation
from medlsam.errors import MedLSAMError
from medlsam.io.volume import CTVolume
from medlsam.segment.assemble import assemble, slice_probability
from medlsam.segment.prompts import OrganPrompts, encoded_slices, prompts_for
from medlsam.segment.sam.slices import DEFAULT_WINDOW, SliceEmbeddings

MODES = ("wpl", "spl", "prior")
SHIPPED_PRIOR_WEIGHT = 1.0  # prior_weight None with weights not adapted to the templates: the prior alone
ADAPTED_PRIOR_WEIGHT = 0.5  # prior_weight None with adapted weights that record no per-organ weight
BOX_MODES_PRIOR_WEIGHT = 0.8  # prior_weight None in the wpl / spl modes (SAM on MedLAM's boxes)
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
    # On a slice where SAM returns nothing inside the box, fill the ellipse inscribed in the box (at the
    # threshold, so real masks win overlaps). Measured with ground-truth prompts: case 34 (every 3rd slice)
    # slice boxes 0.473 -> 0.551 (cord 0.62 -> 0.78, esophagus 0.46 -> 0.81); 3D box: case 59 0.270 -> 0.305,
    # cases 34 / 60 unchanged. Not yet measured with MedLAM boxes (benchmark: --set empty_fallback=false).
    empty_fallback: bool = True
    prior_box_threshold: float = 0.5  # mode prior: the prompt is the box of the prior at this level
    # probability = (1 - w) SAM + w prior; 1: the prior alone (SAM is not run, nothing is encoded); 0: SAM alone.
    # None (default): chosen by the segmenter's weights. The shipped LiteMedSAM adds nothing to the prior on OpenKBP
    # (33 validation scans: w 0.8 0.548, the prior alone 0.550, SAM alone 0.388) at 10x the time, so with it the
    # prior alone serves (SHIPPED_PRIOR_WEIGHT); LiteMedSAM adapted to the templates (``medlsam adapt``) carries
    # its own per-organ weights, chosen on the templates (``medlsam.segment.adapt``), 1 where SAM does not pay.
    prior_weight: float | None = None
    # Encode slices about this many mm apart (0: every slice) and interpolate SAM's masks between them. OpenKBP
    # train scans 2, 3, 5, 6 (2.5-3 mm slices, w 0.7): every slice 0.545, every 2nd 0.547, 3rd 0.546, 4th 0.545.
    slice_spacing_mm: float = 10.0
    # Give SAM the organ prior on the slice as its mask prompt, with the box. None: when the segmenter's weights
    # were adapted with mask prompts (``medlsam adapt``), not with the shipped LiteMedSAM, which never learnt them.
    mask_prompt: bool | None = None

    @property
    def localizer_mode(self) -> str:
        """The localiser's box mode these prompts need (slab boxes for spl)."""
        return "spl" if self.mode == "spl" else "wpl"

    def __post_init__(self):
        if self.mode not in MODES:
            raise MedLSAMError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.prior_weight is not None and not 0.0 <= self.prior_weight <= 1.0:
            raise MedLSAMError(f"prior_weight must be in [0, 1], got {self.prior_weight}")
        if not self.slice_spacing_mm >= 0:
            raise MedLSAMError(f"slice_spacing_mm must be 0 or more, got {self.slice_spacing_mm}")

        if not 0.0 < self.threshold < 1.0:
            raise MedLSAMError(f"threshold must be in (0, 1), got {self.threshold}")

    @property
    def uses_prior(self) -> bool:
        """Whether these options need the organ prior from the localiser."""
        return self.mode == "prior" or self.prior_weight is None or self.prior_weight > 0

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
        return {
            "labels": dict(self.label_names),
            "boxes": self.boxes,
            "not_found": list(self.not_found),
            "timings_s": {k: round(float(v), 3) for k, v in self.timings_s.items()},
            "encoder_calls": int(self.encoder_calls),
            "reference_encoder_calls": int(self.reference_encoder_calls),
        }


class MedLSAMPipeline:
    """Localise (MedLAM + template bank) and segment (SAM-family slice segmenter) the bank's organs."""

    def __init__(self, localizer: Localizer, segmenter, options: SegmentOptions | None = None):
        self.localizer, self.segmenter = localizer, segmenter
        self.options = options or SegmentOptions()

    def segment(
        self,
        volume: CTVolume,
        organs: list[str] | None = None,
        progress: bool = False,
        embeddings: SliceEmbeddings | None = None,
        timings: dict[str, float] | None = None,
    ) -> SegmentationResult:
        """Localise the chosen organs (all of the bank by default) and segment them. ``timings``: the caller's
        own stages (e.g. loading the scan), reported first."""
        tic = time.perf_counter()  # the localiser refuses an unknown organ before any work
        located = self.localizer.localize(
            volume, organs, mode=self.options.localizer_mode, prior=self.options.uses_prior
        )
        timings = {**(timings or {}), "localize": time.perf_counter() - tic}
        return self.segment_locations(volume, located["organs"], progress, embeddings, timings)

    def segment_locations(
        self,
        volume: CTVolume,
        locations: dict[str, OrganLocation],
        progress: bool = False,
        embeddings: SliceEmbeddings | None = None,
        timings: dict[str, float] | None = None,
    ) -> SegmentationResult:
        """Segment given organ locations (MedLAM's, or e.g. ground-truth boxes for benchmarks)."""
        opt = self.options
        own = embeddings is None
        if own:
            embeddings = SliceEmbeddings(self.segmenter, volume, window=opt.window)
        calls0 = embeddings.encoder_calls
        timings = {**(timings or {}), "encode": 0.0, "decode": 0.0, "assemble": 0.0}
        prompts, weights, sam = self._prompts_and_masks(volume, locations, embeddings, timings, progress, own)
        axis = embeddings.axis

        tic = time.perf_counter()
        max_value = max([int(loc.value) for loc in locations.values()] + [0])
        label, voxels = assemble(
            volume.shape,
            axis,
            prompts,
            sam,
            opt.threshold,
            weights,
            opt.empty_fallback,
            opt.largest_component,
            dtype=np.uint16 if max_value > 255 else np.uint8,
        )
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
            label=label,
            label_names={name: int(loc.value) for name, loc in locations.items()},
            boxes=boxes_json,
            not_found=not_found,
            timings_s=timings,
            encoder_calls=embeddings.encoder_calls - calls0,
            reference_encoder_calls=sum(len(p.boxes) for p in prompts),
        )

    def organ_probabilities(
        self,
        volume: CTVolume,
        locations: dict[str, OrganLocation],
        embeddings: SliceEmbeddings | None = None,
        timings: dict[str, float] | None = None,
    ) -> dict[str, np.ndarray]:
        """Each localised organ's probability on ``volume``'s voxels as ``segment_locations`` blends it (SAM where
        its prior weight is below 1, the prior alone elsewhere), before the organs compete for voxels: for callers
        that combine organs served by different paths (``medlsam.learn.predict``)."""
        own = embeddings is None
        if own:
            embeddings = SliceEmbeddings(self.segmenter, volume, window=self.options.window)
        timings = timings if timings is not None else {}
        for stage in ("encode", "decode"):
            timings.setdefault(stage, 0.0)
        prompts, weights, sam = self._prompts_and_masks(volume, locations, embeddings, timings, False, own)
        axis, opt = embeddings.axis, self.options
        slice_shape = embeddings.slice_shape
        out = {}
        for p in prompts:
            probability = np.zeros(volume.shape, np.float32)
            view = np.moveaxis(probability, axis, 0)
            for k in p.boxes:
                view[k] = slice_probability(
                    p, k, sam[p.name], axis, slice_shape, opt.threshold, weights[p.name], opt.empty_fallback
                )
            out[p.name] = probability
        return out

    def _prompts_and_masks(
        self,
        volume: CTVolume,
        locations: dict[str, OrganLocation],
        embeddings: SliceEmbeddings,
        timings: dict[str, float],
        progress: bool,
        discard: bool,
    ) -> tuple[list[OrganPrompts], dict[str, float], dict[str, dict[int, np.ndarray]]]:
        """The organs' prompts (those with boxes), their prior weights and SAM's slice probabilities (empty for an
        organ of weight 1: SAM is not run for it)."""
        opt = self.options
        if embeddings.volume.shape != volume.shape:
            raise MedLSAMError(f"embeddings of a {embeddings.volume.shape} volume given for a {volume.shape} volume")
        axis = embeddings.axis
        tic = time.perf_counter()
        prompts = [
            prompts_for(loc, opt.mode, axis, volume.shape, opt.uses_prior, opt.prior_box_threshold)
            for loc in locations.values()
        ]
        prompts = [p for p in prompts if p.boxes]
        timings["prompts"] = timings.get("prompts", 0.0) + time.perf_counter() - tic
        weights = self.organ_weights([p.name for p in prompts])
        with_sam = [p for p in prompts if weights[p.name] < 1.0 or p.prior is None]  # weight 1: no SAM
        encoded = encoded_slices([sorted(p.boxes) for p in with_sam], opt.slice_step(float(volume.spacing[axis])))
        adaptation = getattr(self.segmenter, "adaptation", None) or {}
        mask_prompt = bool(adaptation.get("mask_prompt")) if opt.mask_prompt is None else opt.mask_prompt
        sam = self._segment_slices(embeddings, with_sam, encoded, timings, progress, discard=discard, masks=mask_prompt)
        return prompts, weights, {p.name: sam.get(p.name, {}) for p in prompts}

    def organ_weights(self, organs: list[str]) -> dict[str, float]:
        """Each organ's prior weight: the options' when set; in the wpl / spl modes BOX_MODES_PRIOR_WEIGHT; in the
        prior mode the adapted segmenter's recorded per-organ weight
        (``medlsam adapt``), else SHIPPED_PRIOR_WEIGHT (the shipped LiteMedSAM does not pay: the prior alone)."""
        if self.options.prior_weight is not None:
            return {o: float(self.options.prior_weight) for o in organs}
        if self.options.mode != "prior":  # wpl / spl: SAM's box modes, asked for by name
            return {o: BOX_MODES_PRIOR_WEIGHT for o in organs}
        adaptation = getattr(self.segmenter, "adaptation", None)
        if not adaptation:
            return {o: SHIPPED_PRIOR_WEIGHT for o in organs}
        chosen = adaptation.get("prior_weights") or {}
        default = float(adaptation.get("prior_weight", ADAPTED_PRIOR_WEIGHT))
        return {o: float(chosen.get(o, default)) for o in organs}

    @staticmethod
    def _segment_slices(
        embeddings: SliceEmbeddings,
        prompts: list[OrganPrompts],
        encoded: list[int],
        timings: dict[str, float],
        progress: bool,
        discard: bool,
        masks: bool = False,
    ) -> dict[str, dict[int, np.ndarray]]:
        """SAM's mask probabilities, organ -> slice -> (rows, cols), on the ``encoded`` slices: each slice encoded
        once, all its organs' boxes decoded in one call (``discard``: free each embedding once used; ``masks``:
        each organ's prior on the slice as mask prompt too)."""
        try:
            from tqdm import tqdm
        except ImportError:  # tqdm comes with MONAI; without it there is simply no bar
            tqdm = None
        bar = (
            tqdm(encoded, desc="segmenting slices", unit="slice", disable=not (progress and encoded))
            if tqdm
            else encoded
        )
        sam: dict[str, dict[int, np.ndarray]] = {p.name: {} for p in prompts}
        try:
            for n, k in enumerate(bar, 1):
                if not progress and (n % LOG_EVERY_SLICES == 0 or n == len(encoded)):  # a log line, not a bar
                    logger.info(f"SAM: slice {n}/{len(encoded)} ({timings['encode']:.1f} s encoding so far)")
                here = [p for p in prompts if k in p.boxes]
                tic = time.perf_counter()
                embeddings.get(k)
                timings["encode"] += time.perf_counter() - tic
                tic = time.perf_counter()
                mask_inputs = np.array([_prior_slice(p, embeddings, k) for p in here]) if masks else None
                probs, _ = embeddings.decode(k, boxes=np.array([p.boxes[k] for p in here]), mask_inputs=mask_inputs)
                timings["decode"] += time.perf_counter() - tic
                for p, mask in zip(here, probs):
                    sam[p.name][k] = mask
                if discard:
                    embeddings.discard(k)
        finally:
            if progress and tqdm:
                bar.close()
        return sam


def _prior_slice(prompts: OrganPrompts, embeddings: SliceEmbeddings, k: int) -> np.ndarray:
    """The organ's prior on slice k (zeros where it has none), as a mask prompt."""
    prior = None if prompts.prior is None else prompts.prior.slice(embeddings.axis, k, embeddings.slice_shape)
    return np.zeros(embeddings.slice_shape, np.float32) if prior is None else prior
