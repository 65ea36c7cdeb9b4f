"""The click refiner: a small 3D network that corrects one organ's mask from the annotator's clicks.

Built in the style of ``segment_anything``: ``build_click_refiner`` loads the weights, ``ClickRefiner`` answers a
request. Inputs on a fixed physical crop around the organ (``CROP`` voxels of ``CROP_SPACING_MM``, the
cranio-caudal axis last, whatever the file's orientation), six channels:

0. CT, soft-tissue window; 1. CT, bone window;
2. the organ's template posterior (zeros for an organ the templates do not know);
3. the organ's starting mask (the auto-segmentation, or empty);
4. / 5. foreground / background clicks, each a Gaussian ball (``CLICK_SIGMA_MM``) at its position.

Output: the organ's probability on the crop, mapped back onto the file's voxels inside the crop; outside it the
mask is unchanged. An organ longer than a crop (the spinal cord: 160 mm of crop, 300 mm of cord) gets crops
overlapping along the cranio-caudal axis, all run in one batch and blended where they overlap. The network is
trained with simulated clicks on OpenKBP train scans (``scripts/train_click_refiner.py``; the account in
``benchmarks/results/editing.md``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from medlsam.atlas.prior import FilePrior
from medlsam.errors import CheckpointError

CROP = (48, 48, 64)  # voxels: two in-plane axes, then the cranio-caudal axis
CROP_SPACING_MM = (4.0, 4.0, 2.5)
CLICK_SIGMA_MM = 5.0
IN_CHANNELS = 6
SOFT_WINDOW = (-250.0, 250.0)
BONE_WINDOW = (-1000.0, 2000.0)


class _Block(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv3d(cin, cout, 3, padding=1),
            nn.BatchNorm3d(cout),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Conv3d(cout, cout, 3, padding=1),
            nn.BatchNorm3d(cout),
            nn.LeakyReLU(0.01, inplace=True),
        )


class ClickRefinerNet(nn.Module):
    """A 3D U-Net with three poolings: (N, 6, 48, 48, 64) -> (N, 1, 48, 48, 64) logits."""

    def __init__(self, widths: tuple[int, ...] = (8, 16, 32, 64)):
        super().__init__()
        self.widths = tuple(widths)
        self.down = nn.ModuleList()
        cin = IN_CHANNELS
        for w in widths:
            self.down.append(_Block(cin, w))
            cin = w
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for w_low, w in zip(widths[::-1][:-1], widths[::-1][1:]):
            self.up.append(nn.ConvTranspose3d(w_low, w, 2, stride=2))
            self.merge.append(_Block(2 * w, w))
        self.head = nn.Conv3d(widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool3d(x, 2))
            skips.append(x)
        x = skips.pop()
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


def build_click_refiner(checkpoint: str | os.PathLike, device: str | torch.device = "cpu") -> ClickRefiner:
    """The refiner with trained weights (``weights_only=True``); CheckpointError naming the file otherwise."""
    path = Path(checkpoint)
    if not path.is_file():
        raise CheckpointError(f"click refiner weights not found: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(raw, dict) or raw.get("kind") != "click_refiner" or "state_dict" not in raw:
        raise CheckpointError(f"{path}: not click refiner weights (no 'kind': 'click_refiner' record)")
    net = ClickRefinerNet(tuple(int(w) for w in raw.get("widths", (8, 16, 32, 64))))
    try:
        net.load_state_dict(raw["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the click refiner ({exc})") from None
    return ClickRefiner(net.eval().to(device))


def save_click_refiner(net: ClickRefinerNet, path: str | os.PathLike, record: dict) -> None:
    """The weights and a training record, written atomically."""
    from medlsam.utils.atomic import torch_save_atomic

    torch_save_atomic(
        {"kind": "click_refiner", "widths": list(net.widths), "state_dict": net.state_dict(), "record": record}, path
    )


@dataclass
class Crop:
    """Where the network's crop lies in the file: the file axes in network order (cranio-caudal last), the
    file-voxel coordinate of the crop's centre, and the crop's step in file voxels per axis (network order)."""

    axes: tuple[int, int, int]
    centre: np.ndarray  # (3,) file voxel coordinates, network axis order
    step: np.ndarray  # (3,) file voxels per crop voxel, network axis order
    size: tuple[int, int, int] = CROP

    @classmethod
    def around(
        cls, spacing, axis: int, points: np.ndarray, anchor: np.ndarray | None = None, size: tuple[int, ...] = CROP
    ) -> Crop:
        """A crop centred on the box of ``points`` (N, 3 file voxels); if ``anchor`` (a click) would fall outside,
        the crop moves to hold it with a quarter-crop margin."""
        axes = tuple([a for a in range(3) if a != axis] + [axis])
        spacing = np.asarray(spacing, np.float64)[list(axes)]
        step = np.asarray(CROP_SPACING_MM) / spacing
        pts = np.asarray(points, np.float64).reshape(-1, 3)[:, list(axes)]
        centre = (pts.min(axis=0) + pts.max(axis=0)) / 2.0
        if anchor is not None:
            a = np.asarray(anchor, np.float64)[list(axes)]
            half = (np.asarray(size) - 1) / 2.0 * step * 0.5
            centre = np.clip(centre, a - half, a + half)
        return cls(axes, centre, step, tuple(size))

    @classmethod
    def tiled(cls, spacing, axis: int, points: np.ndarray, anchor: np.ndarray | None = None) -> list[Crop]:
        """``around`` when the points' box fits a crop along the cranio-caudal axis; otherwise crops overlapping by
        at least a quarter along it, their ends at the box's ends (same in-plane centre, moved to hold ``anchor``)."""
        one = cls.around(spacing, axis, points, anchor)
        pts = np.asarray(points, np.float64).reshape(-1, 3)[:, axis]
        length = (one.size[2] - 1) * one.step[2]
        lo, hi = float(pts.min()), float(pts.max())
        if hi - lo <= length:
            return [one]
        count = int(np.ceil((hi - lo - length) / (0.75 * length))) + 1
        centres = np.linspace(lo + length / 2, hi - length / 2, count)
        return [cls(one.axes, np.array([*one.centre[:2], c]), one.step, one.size) for c in centres]

    def centrality(self, region: tuple[slice, ...]) -> np.ndarray:
        """Per file voxel of ``region`` (a box of the crop), the weight of the crop's answer where crops overlap:
        falling linearly from 1 at the crop's centre to near 0 at its ends along the cranio-caudal axis."""
        a = self.axes[2]
        z = np.arange(region[a].start, region[a].stop, dtype=np.float64)
        half = (self.size[2] - 1) / 2.0 * self.step[2] + 1.0
        ramp = np.clip(1.0 - np.abs(z - self.centre[2]) / half, 1e-3, None).astype(np.float32)
        shape = [1, 1, 1]
        shape[a] = len(z)
        return ramp.reshape(shape)

    def coordinates(self) -> list[np.ndarray]:
        """Per network axis, the file-voxel coordinate of each crop voxel."""
        return [c + (np.arange(n) - (n - 1) / 2.0) * s for c, n, s in zip(self.centre, self.size, self.step)]

    def sample(self, array: np.ndarray, fill: float = 0.0, offset=(0, 0, 0)) -> np.ndarray:
        """``array`` on the crop (network order), linear interpolation, ``fill`` outside; ``offset``: the file
        voxel of ``array[0, 0, 0]`` (a box of the file). Only the box the crop covers is read."""
        grids = np.meshgrid(*self.coordinates(), indexing="ij")
        coords = [np.empty(0)] * 3
        for net_axis, a in enumerate(self.axes):
            coords[a] = grids[net_axis] - offset[a]
        lo = [max(int(np.floor(c.min())), 0) for c in coords]
        hi = [min(int(np.ceil(c.max())) + 1, n) for c, n in zip(coords, array.shape)]
        if any(h <= lo_ for lo_, h in zip(lo, hi)):
            return np.full(self.size, fill, np.float32)
        sub = array[tuple(slice(a, b) for a, b in zip(lo, hi))].astype(np.float32)
        coords = [c - a for c, a in zip(coords, lo)]
        return ndimage.map_coordinates(sub, coords, order=1, mode="constant", cval=fill).astype(np.float32)

    def file_region(self, shape: tuple[int, ...]) -> tuple[slice, ...]:
        """The box of file voxels the crop covers (file axis order)."""
        region = [slice(0, 0)] * 3
        for net_axis, coords in enumerate(self.coordinates()):
            a = self.axes[net_axis]
            lo = max(int(np.ceil(coords[0])), 0)
            hi = min(int(np.floor(coords[-1])) + 1, shape[a])
            region[a] = slice(lo, max(hi, lo))
        return tuple(region)

    def to_file(self, values: np.ndarray, region: tuple[slice, ...]) -> np.ndarray:
        """Crop values (network order) at the file voxels of ``region`` (file order), linear interpolation."""
        firsts = [c[0] for c in self.coordinates()]
        index = [np.empty(0)] * 3
        for net_axis, a in enumerate(self.axes):
            index[a] = (np.arange(region[a].start, region[a].stop) - firsts[net_axis]) / self.step[net_axis]
        grids = np.meshgrid(*index, indexing="ij")
        return ndimage.map_coordinates(values, [grids[a] for a in self.axes], order=1, mode="nearest")

    def click_map(self, clicks: np.ndarray) -> np.ndarray | None:
        """Gaussian balls (``CLICK_SIGMA_MM``) at the clicks (N, 3 file voxels) on the crop; None without clicks."""
        coords = self.coordinates()
        points = [np.asarray(c, np.float64)[list(self.axes)] for c in np.asarray(clicks).reshape(-1, 3)]
        return click_balls([(x - c) / s for x, c, s in zip(coords, p, self.step)] for p in points)


def click_balls(offsets) -> np.ndarray:
    """Gaussian balls (``CLICK_SIGMA_MM``) on a crop: for each click, per network axis the crop voxels' offsets
    from it in crop voxels; their maximum (zeros of the crop's shape without clicks)."""
    out = None
    for d in offsets:
        d2 = [(v * mm) ** 2 for v, mm in zip(d, CROP_SPACING_MM)]
        ball = np.exp(-(d2[0][:, None, None] + d2[1][None, :, None] + d2[2][None, None, :]) / (2 * CLICK_SIGMA_MM**2))
        out = ball.astype(np.float32) if out is None else np.maximum(out, ball.astype(np.float32))
    return out


def network_input(
    crop: Crop, hu: np.ndarray, prior: FilePrior | None, mask: np.ndarray, foreground, background
) -> np.ndarray:
    """The six input channels on ``crop`` (see the module's docstring); ``mask`` in file shape, ``prior`` the
    organ's template posterior on its box."""
    ct = crop.sample(hu, fill=-1024.0)
    soft = (np.clip(ct, *SOFT_WINDOW) - SOFT_WINDOW[0]) / (SOFT_WINDOW[1] - SOFT_WINDOW[0])
    bone = (np.clip(ct, *BONE_WINDOW) - BONE_WINDOW[0]) / (BONE_WINDOW[1] - BONE_WINDOW[0])
    zeros = np.zeros(crop.size, np.float32)
    posterior = crop.sample(prior.probabilities, offset=prior.low) if prior is not None else zeros
    fg, bg = crop.click_map(foreground), crop.click_map(background)
    channels = [soft, bone, posterior, crop.sample(mask), zeros if fg is None else fg, zeros if bg is None else bg]
    return np.stack(channels).astype(np.float32)


class ClickRefiner:
    """Answers a click request for one organ: ``refine`` -> (file region, the organ's mask on it)."""

    def __init__(self, net: ClickRefinerNet):
        self.net = net

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.no_grad()
    def probability(self, x: np.ndarray) -> np.ndarray:
        """The organ's probability on each crop for inputs (N, 6, *CROP): the mean over the four in-plane flips (one
        batch), so the answer does not depend on the file's left-right or front-back direction."""
        crops = torch.from_numpy(x).to(self.device)
        flips = [(), (2,), (3,), (2, 3)]
        batch = torch.cat([crops.flip(f) if f else crops for f in flips])
        prob = torch.sigmoid(self.net(batch)).reshape(len(flips), len(crops), *crops.shape[2:])
        mean = sum(p.flip([a - 1 for a in f]) if f else p for p, f in zip(prob, flips)) / len(flips)
        return mean.float().cpu().numpy()

    def refine(
        self,
        hu: np.ndarray,
        spacing,
        axis: int,
        mask: np.ndarray,
        foreground: np.ndarray,
        background: np.ndarray,
        prior: FilePrior | None = None,
    ) -> tuple[tuple[slice, ...], np.ndarray]:
        """The organ's corrected mask on the crops' file box. ``mask``: its starting mask (file shape), ``prior``:
        its template posterior (None: an organ the templates do not know), ``axis``: the cranio-caudal file axis.
        The crops hold the organ, its prior and clicks (``tiles``), and always the last click; where crops
        overlap their answers are weighed by closeness to each crop's centre."""
        crops = self.tiles(spacing, axis, mask, foreground, background, prior)
        x = np.stack([network_input(c, hu, prior, mask, foreground, background) for c in crops])
        probs = self.probability(x)
        regions = [c.file_region(hu.shape) for c in crops]
        lo = np.min([[r.start for r in region] for region in regions], axis=0)
        hi = np.max([[r.stop for r in region] for region in regions], axis=0)
        total = np.zeros(hi - lo, np.float32)
        weights = np.zeros(hi - lo, np.float32)
        for crop, prob, region in zip(crops, probs, regions):
            inside = tuple(slice(r.start - a, r.stop - a) for r, a in zip(region, lo))
            weight = crop.centrality(region)
            total[inside] += weight * crop.to_file(prob, region)
            weights[inside] += weight
        region = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        return region, total > 0.5 * weights  # the weighted mean above 0.5 (weights > 0 wherever a crop reaches)

    @staticmethod
    def tiles(spacing, axis, mask, foreground, background, prior=None) -> list[Crop]:
        """The crops of one organ's request: one around the organ (its mask's and confident prior's boxes) and its
        clicks, moved to hold the last click; an organ longer than a crop along the cranio-caudal axis (the spinal
        cord) gets overlapping crops along it."""
        boxes = [np.asarray(p).reshape(-1, 3) for p in (foreground, background) if len(p)]
        inside = np.argwhere(mask)
        if len(inside):
            boxes.append(np.vstack([inside.min(axis=0), inside.max(axis=0)]))
        if prior is not None and (prior.probabilities > 0.5).any():
            confident = np.argwhere(prior.probabilities > 0.5) + prior.low
            boxes.append(np.vstack([confident.min(axis=0), confident.max(axis=0)]))
        if not boxes:
            raise ValueError("a refinement needs a mask, a prior or a click")
        anchor = background[-1] if len(background) else None
        anchor = foreground[-1] if len(foreground) else anchor
        return Crop.tiled(spacing, axis, np.concatenate(boxes), anchor)
