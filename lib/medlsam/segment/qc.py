"""The QC picture a radiologist reads: per organ, its middle axial slice cropped to the organ with context,
in the radiological view (patient right on the image's left, anterior up), masks as outlines with a legend,
and optionally the reference label beside it with the Dice."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medlsam.errors import MedLSAMError
from medlsam.io.volume import CTVolume
from medlsam.segment.outputs import check_png_path
from medlsam.utils.atomic import atomic_path
from medlsam.utils.metrics import cranio_caudal_axis, dice

CONTEXT_MM = 40.0  # shown around the organ on every side
MIN_FIELD_MM = 120.0  # smallest field of view of a panel
WINDOW = (-160.0, 240.0)  # soft tissue


def _display(image: np.ndarray, affine: np.ndarray, axis: int) -> np.ndarray:
    """A slice along ``axis`` in the radiological view."""
    from medlsam.segment.sam.slices import display_orientation

    transpose, flip_rows, flip_cols = display_orientation(affine, axis)
    if transpose:
        image = image.T
    if flip_rows:
        image = image[::-1]
    if flip_cols:
        image = image[:, ::-1]
    return image


def _pixel_mm(affine: np.ndarray, axis: int) -> tuple[float, float]:
    """(row, column) pixel size in mm of the displayed slice."""
    from medlsam.segment.sam.slices import display_orientation

    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    rows, cols = (float(spacing[a]) for a in range(3) if a != axis)
    return (cols, rows) if display_orientation(affine, axis)[0] else (rows, cols)


def _window(mask: np.ndarray, pixel_mm: tuple[float, float]) -> tuple[slice, slice]:
    """Rows and columns of the organ's box with CONTEXT_MM around it, at least MIN_FIELD_MM wide."""
    out = []
    for dim, size_mm in enumerate(pixel_mm):
        idx = np.nonzero(mask.any(axis=1 - dim))[0]
        centre, half = (idx.min() + idx.max()) / 2, (idx.max() - idx.min() + 1) / 2
        half = max(half + CONTEXT_MM / size_mm, MIN_FIELD_MM / 2 / size_mm)
        lo = int(max(0, np.floor(centre - half)))
        hi = int(min(mask.shape[dim], np.ceil(centre + half + 1)))
        out.append(slice(lo, hi))
    return out[0], out[1]


def _panel(ax, ct: np.ndarray, pixel_mm, outlines: dict, organ: str, title: str) -> None:
    """One panel: the CT slice in the soft-tissue window, each organ's outline (``organ``'s thicker), R/L/A marks."""
    ax.imshow(
        np.clip(ct, *WINDOW),
        cmap="gray",
        vmin=WINDOW[0],
        vmax=WINDOW[1],
        interpolation="nearest",
        aspect=pixel_mm[0] / pixel_mm[1],
    )
    for other, (mask, colour) in outlines.items():
        if mask.any():
            ax.contour(mask, levels=[0.5], colors=[colour], linewidths=2.0 if other == organ else 1.0)
    ax.set_title(title, fontsize=8)
    ax.text(0.02, 0.5, "R", color="yellow", fontsize=8, transform=ax.transAxes, va="center")
    ax.text(0.98, 0.5, "L", color="yellow", fontsize=8, transform=ax.transAxes, va="center", ha="right")
    ax.text(0.5, 0.97, "A", color="yellow", fontsize=8, transform=ax.transAxes, va="top", ha="center")


def qc_montage(
    volume: CTVolume,
    label: np.ndarray,
    names: dict[str, int],
    png_path: str | os.PathLike,
    reference: np.ndarray | None = None,
    reference_names: dict[str, int] | None = None,
) -> Path:
    """Write the QC PNG for ``label`` (``names``: organ -> value) on ``volume``; with ``reference`` (same grid;
    its own ``reference_names``, default ``names``) each organ gets a second panel with the reference and the
    organ's Dice. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    path = check_png_path(png_path)
    if label.shape != volume.shape or (reference is not None and reference.shape != volume.shape):
        raise MedLSAMError(
            f"QC: label {label.shape} / reference {None if reference is None else reference.shape} "
            f"do not match the scan's grid {volume.shape}"
        )
    reference_names = reference_names or names
    axis = cranio_caudal_axis(volume.affine)
    pixel_mm = _pixel_mm(volume.affine, axis)
    organs = [
        n
        for n, v in sorted(names.items(), key=lambda kv: kv[1])
        if (label == v).any()
        or (reference is not None and n in reference_names and (reference == reference_names[n]).any())
    ]
    colours = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(sorted(names, key=names.get))}
    per_organ = 2 if reference is not None else 1
    cols = per_organ * max(1, min(4 // per_organ, len(organs)))  # four panels a row
    rows = max(1, int(np.ceil(len(organs) * per_organ / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(2.8 * cols, 3.2 * rows + 0.5), squeeze=False, layout="constrained")
    for ax in axes.ravel():
        ax.axis("off")
    panels = iter(axes.ravel())
    for name in organs:
        pred = label == names[name]
        ref = reference == reference_names[name] if reference is not None and name in reference_names else None
        anchor = pred if pred.any() else ref
        slices = np.nonzero(np.moveaxis(anchor, axis, 0).any(axis=(1, 2)))[0]
        k = int(slices[len(slices) // 2])
        ct = _display(np.take(volume.array, k, axis=axis), volume.affine, axis)
        shown = [("", label, names)] + ([("reference", reference, reference_names)] if reference is not None else [])
        box = _window(_display(np.take(anchor, k, axis=axis), volume.affine, axis), pixel_mm)
        for title, volume_label, value_of in shown:
            lab = _display(np.take(volume_label, k, axis=axis), volume.affine, axis)[box]
            heading = f"{name} {title}".strip() if title else name
            if title == "" and ref is not None:
                heading += f"  Dice {dice(pred, ref):.2f}"
            outlines = {other: (lab == value, colours[other]) for other, value in value_of.items() if other in colours}
            _panel(next(panels), ct[box], pixel_mm, outlines, name, f"{heading}\naxial slice {k}")
    if not organs:
        axes[0, 0].text(0.5, 0.5, "no organ segmented", ha="center", va="center")
    handles = [Line2D([], [], color=colours[n], linewidth=2, label=f"{names[n]} {n}") for n in organs]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=150)
    finally:
        plt.close(fig)
    return path
