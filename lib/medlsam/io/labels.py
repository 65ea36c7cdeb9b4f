"""The one check of an organ label volume, wherever a label enters (a save in the app, a template of a bank)."""

from __future__ import annotations

import numpy as np

from medlsam.errors import MedLSAMError

MAX_ORGANS = 64  # distinct non-zero values in one label (bounds a bank build and the outputs)
MAX_LABEL_VALUE = 65535  # fits the widest integer output most viewers read (uint16)
MAX_ORGAN_FRACTION = 0.5  # one organ covers at most this fraction of its scan


class LabelError(MedLSAMError):
    """A label volume that cannot be an organ label (its message names the problem)."""


def check_label_array(array: np.ndarray, require_organ: bool = True) -> dict[int, int]:
    """{organ value: voxel count} of an integer label; LabelError naming the problem for fractional or non-finite
    values, values outside 0..``MAX_LABEL_VALUE``, more than ``MAX_ORGANS`` organs, no organ (``require_organ``), or
    an organ over ``MAX_ORGAN_FRACTION`` of the scan."""
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or not np.array_equal(array, np.round(array)):
            raise LabelError("label must hold integer organ values, found fractional or non-finite values")
    elif array.dtype.kind not in "iub":
        raise LabelError(f"label must be an integer volume, not {array.dtype}")
    if array.size == 0:
        raise LabelError("label has no voxels")
    values, counts = np.unique(array, return_counts=True)
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > MAX_LABEL_VALUE:
        raise LabelError(f"label values must lie in 0..{MAX_LABEL_VALUE}, found {low}..{high}")
    organs = {int(v): int(c) for v, c in zip(values, counts) if v != 0}
    if len(organs) > MAX_ORGANS:
        raise LabelError(f"label has {len(organs)} distinct values: at most {MAX_ORGANS} organs per label")
    if require_organ and not organs:
        raise LabelError("label is empty: a final label needs at least one organ")
    big = [v for v, c in organs.items() if c > MAX_ORGAN_FRACTION * array.size]
    if big:
        raise LabelError(f"label value(s) {big} cover more than {MAX_ORGAN_FRACTION:.0%} of the scan: not an organ")
    return organs
