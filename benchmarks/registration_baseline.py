"""Multi-atlas registration baseline: what a user would otherwise pick to put boxes around organs.

Each template CT is registered to the query CT with SimpleITK (affine, then a coarse B-spline, both on
Mattes mutual information), its label is warped onto the query's grid with nearest neighbour, and the
warped labels are fused per organ by majority vote over the templates that contain the organ. The box
of each organ's fused mask is the prediction. Everything is in the query's own voxel grid, in file
index order (i, j, k) as nibabel and MedLSAM use (SimpleITK's arrays transposed).

Run and scored by ``python benchmarks/localization.py [--registration-only] [--cases N]`` with the protocol's
templates (the first five train cases, by case number, with all seven organs).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from medlsam.utils.metrics import label_box


@dataclass(frozen=True)
class RegistrationParams:
    """Every setting of the registration; the defaults are the benchmarked configuration.

    Per-level tuples run coarse to fine. Shrink factors are in voxels of the query, smoothing sigmas in
    mm, sampling fractions are the share of the (shrunk) query voxels drawn at random per iteration.
    """

    clamp_hu: tuple[float, float] = (-1024.0, 1500.0)  # intensity window applied to both images
    metric: str = "mattes"  # affine and B-spline: Mattes mutual information ("correlation", "meansquares")
    histogram_bins: int = 32  # Mattes mutual information
    seed: int = 2023  # sampling seed, for repeatable results
    init: str = "search"  # "centroids" of the valid regions, or those refined by an exhaustive "search"
    search_mm: tuple[float, float, float] = (0.0, 36.0, 96.0)  # +- range searched per world axis (x, y, z)
    search_step_mm: float = 12.0
    search_sampling: float = 0.2
    search_metric: str = "correlation"  # CT to CT: normalised correlation gives a cleaner coarse optimum than MI
    affine_shrink: tuple[int, ...] = (4, 2, 1)
    affine_sigmas_mm: tuple[float, ...] = (8.0, 4.0, 0.0)
    affine_sampling: tuple[float, ...] = (0.5, 0.05, 0.01)
    affine_iterations: int = 40  # per level, regular-step gradient descent, scales from physical shift
    affine_learning_rate: float = 2.0
    bspline_mesh: tuple[int, int, int] = (6, 6, 6)  # control-point mesh size over the query image
    bspline_domain: str = "image"  # the mesh spans the whole query "image" or its "valid" region's box
    bspline_shrink: tuple[int, ...] = (4, 2)
    bspline_sigmas_mm: tuple[float, ...] = (8.0, 4.0)
    bspline_sampling: tuple[float, ...] = (0.25, 0.03)
    bspline_iterations: int = 10  # per level, L-BFGS-B (0: affine only)
    bspline_evaluations: int = 15  # per level, cap on metric evaluations (line searches included)
    warp_field_shrink: int = 2  # the deformation is sampled on a grid this much coarser for warping labels


def _read_image(path: str | os.PathLike, params: RegistrationParams) -> sitk.Image:
    image = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)
    return sitk.Clamp(image, sitk.sitkFloat32, *params.clamp_hu)


def _valid_mask(image: sitk.Image, params: RegistrationParams) -> sitk.Image:
    """Voxels inside the scan's planning region (OpenKBP fills everything outside it with -1024)."""
    return sitk.Cast(image > params.clamp_hu[0] + 0.5, sitk.sitkUInt8)


def _method(
    params: RegistrationParams,
    shrink: Sequence[int],
    sigmas: Sequence[float],
    sampling: Sequence[float],
    fixed_mask: sitk.Image | None,
    metric: str = "mattes",
) -> sitk.ImageRegistrationMethod:
    """A metric on random samples of the query's valid region, linear interpolation, a pyramid."""
    reg = sitk.ImageRegistrationMethod()
    if metric == "mattes":
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=params.histogram_bins)
    elif metric == "correlation":
        reg.SetMetricAsCorrelation()
    elif metric == "meansquares":
        reg.SetMetricAsMeanSquares()
    else:
        raise ValueError(f"unknown metric {metric!r}")
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentagePerLevel(list(sampling), params.seed)
    if fixed_mask is not None:
        reg.SetMetricFixedMask(fixed_mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetShrinkFactorsPerLevel(list(shrink))
    reg.SetSmoothingSigmasPerLevel(list(sigmas))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return reg


def _mask_region(image: sitk.Image, mask: sitk.Image) -> sitk.Image:
    """The image cropped to the bounding box of the mask (the B-spline grid then spans the anatomy only)."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    box = stats.GetBoundingBox(1)  # start index, then size
    return sitk.RegionOfInterest(image, box[3:], box[:3])


def _centroid(mask: sitk.Image) -> np.ndarray:
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    return np.array(stats.GetCentroid(1))


def initial_translation(
    fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image, params: RegistrationParams
) -> tuple[np.ndarray, np.ndarray]:
    """Centre (query mm) and translation (query to template mm) to start the affine from.

    The centroids of the two valid regions are matched, then the anterior-posterior and cranio-caudal
    offsets are searched exhaustively on a grid (`search_*`) at the coarsest level: scans are cropped
    to very different fields of view, so centroids alone can be several centimetres off.
    """
    centre = _centroid(fixed_mask)
    translation = _centroid(_valid_mask(moving, params)) - centre
    if params.init == "centroids" or not any(params.search_mm):
        return centre, translation
    start = sitk.Euler3DTransform()
    start.SetCenter(centre.tolist())
    start.SetTranslation(translation.tolist())
    reg = _method(
        params,
        params.affine_shrink[:1],
        params.affine_sigmas_mm[:1],
        [params.search_sampling],
        fixed_mask,
        params.search_metric,
    )
    step = params.search_step_mm
    reg.SetOptimizerAsExhaustive([0, 0, 0] + [int(r // step) for r in params.search_mm], stepLength=step)
    reg.SetInitialTransform(start, inPlace=True)
    trials: list[tuple[float, tuple[float, ...]]] = []
    reg.AddCommand(sitk.sitkIterationEvent, lambda: trials.append((reg.GetMetricValue(), reg.GetOptimizerPosition())))
    reg.Execute(fixed, moving)
    best = min(trials)[1]
    return centre, np.array(best[3:])


def register_affine(
    fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image, params: RegistrationParams
) -> sitk.Transform:
    """Affine map from fixed (query) to moving (template) physical points."""
    centre, translation = initial_translation(fixed, moving, fixed_mask, params)
    start = sitk.AffineTransform(3)
    start.SetCenter(centre.tolist())
    start.SetTranslation(translation.tolist())
    reg = _method(
        params, params.affine_shrink, params.affine_sigmas_mm, params.affine_sampling, fixed_mask, params.metric
    )
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=params.affine_learning_rate,
        minStep=1e-3,
        numberOfIterations=params.affine_iterations,
        gradientMagnitudeTolerance=1e-6,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(start, inPlace=False)
    return reg.Execute(fixed, moving)


def register_bspline(
    fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image, affine: sitk.Transform, params: RegistrationParams
) -> sitk.Transform:
    """The affine refined by a coarse B-spline deformation (composite: affine, then B-spline)."""
    reg = _method(
        params, params.bspline_shrink, params.bspline_sigmas_mm, params.bspline_sampling, fixed_mask, params.metric
    )
    domain = _mask_region(fixed, fixed_mask) if params.bspline_domain == "valid" else fixed
    bspline = sitk.BSplineTransformInitializer(domain, list(params.bspline_mesh), order=3)
    reg.SetMovingInitialTransform(affine)
    reg.SetInitialTransform(bspline, inPlace=True)
    reg.SetOptimizerAsLBFGSB(
        gradientConvergenceTolerance=1e-5,
        numberOfIterations=params.bspline_iterations,
        maximumNumberOfCorrections=5,
        maximumNumberOfFunctionEvaluations=params.bspline_evaluations,
        costFunctionConvergenceFactor=1e7,
    )
    reg.Execute(fixed, moving)
    composite = sitk.CompositeTransform(affine)
    composite.AddTransform(bspline)
    return composite


def warp_label(
    label: sitk.Image, fixed: sitk.Image, transform: sitk.Transform, params: RegistrationParams
) -> sitk.Image:
    """The template label on the query's grid, nearest neighbour.

    A B-spline is slow to evaluate at every query voxel, so its composite is first sampled as a
    displacement field on a grid `warp_field_shrink` times coarser (linear in between): the deformation
    is smooth on that scale (control points tens of mm apart), the difference is sub-voxel.
    """
    if params.warp_field_shrink > 1 and isinstance(transform, sitk.CompositeTransform):
        f = params.warp_field_shrink
        size = [(n + f - 1) // f for n in fixed.GetSize()]
        spacing = [s * f for s in fixed.GetSpacing()]
        field = sitk.TransformToDisplacementField(
            transform, sitk.sitkVectorFloat64, size, fixed.GetOrigin(), spacing, fixed.GetDirection()
        )
        transform = sitk.DisplacementFieldTransform(field)
    return sitk.Resample(label, fixed, transform, sitk.sitkNearestNeighbor, 0, label.GetPixelID())


def _to_file_order(image: sitk.Image) -> np.ndarray:
    """SimpleITK's (k, j, i) array as the file's (i, j, k) order."""
    return np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0))


def register_and_fuse(
    query_image_path: str | os.PathLike,
    template_image_paths: Sequence[str | os.PathLike],
    template_label_paths: Sequence[str | os.PathLike],
    label_values: Sequence[int],
    params: RegistrationParams = RegistrationParams(),
    timings: dict | None = None,
) -> tuple[np.ndarray, dict[int, tuple | None], float]:
    """Register every template to the query, warp the template labels and fuse them by majority vote.

    Returns the fused label array (uint8, in the query's file index order (i, j, k)), per label value
    the inclusive box `(low, high)` of its fused mask or None when no voxel has a majority, and the
    wall-clock seconds for the whole call (reading included). A voxel gets an organ when more than half
    of the templates that contain that organ vote for it. Pass a dict as `timings` to receive the
    wall-clock seconds per stage (read, affine, bspline, warp_fuse) and the process's CPU seconds (cpu).
    """
    if len(template_image_paths) != len(template_label_paths) or not template_image_paths:
        raise ValueError("need the same, non-zero number of template images and labels")
    start, cpu_start = time.perf_counter(), time.process_time()
    stages = {"read": 0.0, "affine": 0.0, "bspline": 0.0, "warp_fuse": 0.0}
    tic = time.perf_counter()
    fixed = _read_image(query_image_path, params)
    fixed_mask = _valid_mask(fixed, params)
    stages["read"] += time.perf_counter() - tic
    values = [int(v) for v in label_values]
    votes = {v: np.zeros(fixed.GetSize()[::-1], dtype=np.uint8) for v in values}
    voters = {v: 0 for v in values}
    for image_path, label_path in zip(template_image_paths, template_label_paths):
        tic = time.perf_counter()
        moving = _read_image(image_path, params)
        label = sitk.ReadImage(str(label_path))
        stages["read"] += time.perf_counter() - tic
        tic = time.perf_counter()
        affine = register_affine(fixed, moving, fixed_mask, params)
        stages["affine"] += time.perf_counter() - tic
        tic = time.perf_counter()
        transform = register_bspline(fixed, moving, fixed_mask, affine, params) if params.bspline_iterations else affine
        stages["bspline"] += time.perf_counter() - tic
        tic = time.perf_counter()
        present = set(np.unique(sitk.GetArrayViewFromImage(label)).tolist())
        warped = sitk.GetArrayFromImage(warp_label(label, fixed, transform, params))
        for v in values:
            if v in present:
                voters[v] += 1
                votes[v] += warped == v
        stages["warp_fuse"] += time.perf_counter() - tic
    tic = time.perf_counter()
    fused = np.zeros(fixed.GetSize()[::-1], dtype=np.uint8)
    for v in values:
        if voters[v]:
            fused[votes[v] * 2 > voters[v]] = v  # strict majority: organs can never overlap
    fused = np.ascontiguousarray(fused.transpose(2, 1, 0))
    boxes = {v: label_box(fused == v) for v in values}
    stages["warp_fuse"] += time.perf_counter() - tic
    if timings is not None:
        timings.update(stages, cpu=time.process_time() - cpu_start)
    return fused, boxes, time.perf_counter() - start
