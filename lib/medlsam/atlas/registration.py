"""Similarity registration of one template's organ neighbourhood to the query, for the organ prior.

Intensity matching (``medlsam.medlam.matching``) places each template's neighbourhood by translation, slab by slab.
Organs
also differ in size and tilt between patients: ``register_neighbourhood`` starts where the neighbourhood matched and
fits a similarity transform (rotation, one scale, translation; SimpleITK, correlation of the grid intensities) whose
metric counts only the template's organ and ``FOCUS_VOXELS`` around it, so the surrounding anatomy (a mouth opened
or closed, dental streaks) does not pull the organ away. The template's organ mask, warped by that transform, is
one more placement for the prior (``medlsam.atlas.prior.file_prior``), with the template's intensities warped alike
(with
``LocalizeOptions.prior_match_sharpness`` > 0 the prior weighs each placement by how well they match the query).
Measured on OpenKBP train scans that are not templates: benchmarks/notes/segmentation.md.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from medlsam.io.grid import GRID_SPACING_MM
from medlsam.medlam.matching import OrganPatch, window_region

MARGIN_VOXELS = 4  # query grid voxels around the matched neighbourhood the organ may move into (12 mm)
FOCUS_VOXELS = 3  # the metric counts the template's organ and this many voxels around it (9 mm)
ITERATIONS = 60  # per level, coarse (6 mm) then fine (3 mm)


def _image(array: np.ndarray, corner: np.ndarray) -> sitk.Image:
    """A grid array as a SimpleITK image whose physical coordinates are the grid's (mm from voxel 0)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    image.SetSpacing((GRID_SPACING_MM,) * 3)
    image.SetOrigin(tuple(float(v) for v in (np.asarray(corner, np.float64) * GRID_SPACING_MM)[::-1]))
    return image


def register_neighbourhood(
    array: np.ndarray, patch: OrganPatch, corner: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The template's organ mask and intensities after a similarity registration of its neighbourhood, which
    matched at ``corner`` of the query grid ``array``: (mask, intensities, the corner of their box on the grid;
    intensities -1 where the warped neighbourhood does not reach), or None when the neighbourhood is too flat or
    small to register or the registration fails (the caller keeps the matched placement alone)."""
    intensities, mask = patch.intensities.float().numpy(), patch.mask.float().numpy()
    organ = mask > 0.5
    if min(intensities.shape) < 4 or float(intensities.std()) < 1e-3 or not organ.any():
        return None
    corner = np.asarray(corner, dtype=int)
    low = corner - MARGIN_VOXELS
    fixed = _image(window_region(array, low, np.array(intensities.shape) + 2 * MARGIN_VOXELS), low)
    moving = _image(intensities, corner)
    focus = sitk.GetImageFromArray(ndimage.binary_dilation(organ, iterations=FOCUS_VOXELS).astype(np.uint8))
    focus.CopyInformation(moving)
    transform = sitk.Similarity3DTransform()
    centre = (corner + (np.array(intensities.shape) - 1) / 2.0) * GRID_SPACING_MM
    transform.SetCenter(tuple(float(v) for v in centre[::-1]))

    method = sitk.ImageRegistrationMethod()
    method.SetNumberOfThreads(1)  # the metric's sums in one order: the same answer on every machine
    method.SetMetricAsCorrelation()
    method.SetMetricSamplingStrategy(method.NONE)  # every voxel: deterministic
    method.SetMetricMovingMask(focus)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-2, numberOfIterations=ITERATIONS, relaxationFactor=0.5
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetInitialTransform(transform, inPlace=False)
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([1.0, 0.0])
    method.SetSmoothingSigmasAreSpecifiedInPhysicalUnits(False)
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # a diverging fit warns on stderr per iteration; it is declined
    try:
        fitted = method.Execute(fixed, moving)
    except RuntimeError:  # e.g. every sample mapped outside the neighbourhood
        return None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    warped = sitk.Resample(_image(mask, corner), fixed, fitted, sitk.sitkLinear, 0.0)
    warped_intensities = sitk.Resample(moving, fixed, fitted, sitk.sitkLinear, -1.0)
    return (
        sitk.GetArrayFromImage(warped).astype(np.float32),
        sitk.GetArrayFromImage(warped_intensities).astype(np.float32),
        low,
    )
