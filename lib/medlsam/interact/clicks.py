"""What click editing works with: one organ's clicks, the editing knobs, the organ's intensity model (from the
templates' histograms or from the clicks), and the error for clicks that cannot be used."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from medlsam.atlas.prior import HISTOGRAM_BINS, intensity_histograms
from medlsam.errors import MedLSAMError
from medlsam.io.grid import map_hu


class ClickError(MedLSAMError):
    """Clicks that cannot be used: outside the image, one voxel both foreground and background, none at all."""


@dataclass
class EditOptions:
    """Knobs of click editing (tuned on OpenKBP train scans that are not templates: benchmarks/results/editing.md)."""

    # A click's influence exp(-(d / reach)^2) over the geodesic distance d (mm). OpenKBP train scans 1-7 (not
    # templates), mean Dice after 5 clicks, alone: 10 mm 0.621, 20 mm 0.668; with the level below: 20 mm 0.703,
    # 30 mm 0.634.
    reach_mm: float = 20.0
    # Geodesic cost: extra mm per mm travelled per 100 HU of difference to the click. 0.3 / 1 / 3: 0.686 / 0.703 /
    # 0.700 after 5 clicks (train scans, with the level below).
    hu_cost: float = 1.0
    intensity_power: float = 2.0  # likelihood ratio ** power, as the localiser's prior (3: 0.669 against 0.703)
    margin: float = 0.05  # the base keeps the current mask: p >= 0.5 + margin inside, <= 0.5 - margin outside
    smooth_hu_mm: float = 2.0  # Gaussian smoothing of the HU image for the geodesic costs
    # Re-anchoring: the organ's spatial prior moves by the smallest shift (within shift_mm) that puts every
    # foreground click at prior >= anchor_level and every background click at <= 1 - anchor_level
    # (0: no shift). Measured: shift 20 mm lowered the mean Dice after 5 clicks from 0.621 to 0.494 (train scans).
    shift_mm: float = 0.0
    anchor_level: float = 0.8
    # Level: a foreground click at posterior p says the organ reaches down to p, a background click that it stops
    # above p; the organ's threshold moves there (by level_margin past the click) with weight
    # exp(-(|x - c| / level_reach_mm)^2) around each click (0: off), kept within [level_min, 1 - level_min].
    # Same scans, reach 20 mm: level reach 20 / 30 / global 0.691 / 0.703 / 0.670, margin 0.15 0.694, min 0.25
    # 0.689 (0.668 without).
    level_reach_mm: float = 30.0
    level_margin: float = 0.05
    level_min: float = 0.1
    # Depth: a background click d mm inside the organ's current mask removes, within depth_reach_mm of it, the
    # mask's voxels no deeper than d + depth_margin_mm (a layer peeled off); a foreground click d mm outside adds
    # the voxels no farther out than d + depth_margin_mm (0: off). Measured: 20 mm lowered the mean Dice after 5
    # clicks from 0.703 to 0.627 (thin organs lose their one-voxel rims).
    depth_reach_mm: float = 0.0
    depth_margin_mm: float = 1.0
    # Extent along the cranio-caudal axis: a background click central in its slice's cross-section of the organ
    # (2D depth at least extent_centrality of the slice's deepest) ends the organ there, towards the nearer
    # end; a foreground click on a slice the organ does not reach extends it there, the end slice's shape
    # carried towards the click (0: off). Measured at 0.5: 0.630 against 0.703 after 5 clicks.
    extent_centrality: float = 0.0


@dataclass
class OrganClicks:
    """One organ's clicks so far, file voxel indices."""

    foreground: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), int))
    background: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), int))

    def __post_init__(self):
        self.foreground = np.asarray(self.foreground, int).reshape(-1, 3)
        self.background = np.asarray(self.background, int).reshape(-1, 3)

    def __len__(self) -> int:
        return len(self.foreground) + len(self.background)


@dataclass
class IntensityModel:
    """An organ's intensity histograms (organ, around) over the mapped HU [0, 1]."""

    organ: np.ndarray
    around: np.ndarray

    @classmethod
    def from_patches(cls, patches) -> IntensityModel:
        organ, around = intensity_histograms(patches)
        return cls(organ, around)

    @classmethod
    def from_clicks(cls, hu: np.ndarray, foreground: np.ndarray) -> IntensityModel:
        """For an organ the templates do not know: the intensities of the foreground clicks' 3 x 3 x 3
        neighbourhoods against those of the whole ``hu`` region (clicks in its indices)."""
        bins = np.clip((map_hu(hu) * HISTOGRAM_BINS).astype(int), 0, HISTOGRAM_BINS - 1)
        near = np.zeros(hu.shape, bool)
        near[tuple(foreground.T)] = True
        near = ndimage.binary_dilation(near, np.ones((3, 3, 3), bool))
        out = []
        for hist in (
            np.bincount(bins[near], minlength=HISTOGRAM_BINS),
            np.bincount(bins.ravel(), minlength=HISTOGRAM_BINS),
        ):
            hist = (
                ndimage.gaussian_filter1d(hist.astype(np.float64), 1.0) + 1e-3 * max(hist.sum(), 1.0) / HISTOGRAM_BINS
            )
            out.append(hist / hist.sum())
        return cls(out[0], out[1])

    def ratio(self, hu: np.ndarray, power: float) -> np.ndarray:
        bins = np.clip((map_hu(hu) * HISTOGRAM_BINS).astype(int), 0, HISTOGRAM_BINS - 1)
        return ((self.organ[bins] / self.around[bins]) ** power).astype(np.float32)
