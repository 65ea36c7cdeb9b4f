"""Reading and writing volumes with exact geometry, and the localisation grid's maps back to the file.

The key property: an organ's box found on the localisation grid maps back onto the same anatomy in the
file, however the file stores the scan (flipped, axis-permuted, oblique, another spacing or format).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from medlsam.io.grid import GRID_SPACING_MM, canonical_affine, map_hu, resample_to_grid, to_localization_grid
from medlsam.io.volume import CTVolume, load_ct, read_volume, write_volume

ORGANS = {1: "Brainstem", 2: "SpinalCord", 3: "RightParotid", 4: "LeftParotid", 7: "Mandible"}


# -- building copies of a volume with the same world geometry ------------------------------------------


def flipped(volume: CTVolume, axes: tuple[int, ...]) -> CTVolume:
    """The volume with its voxel order reversed along `axes`; the affine keeps every voxel in place."""
    array, affine = volume.array, volume.affine.copy()
    for a in axes:
        array = np.flip(array, axis=a)
        affine[:3, 3] += affine[:3, a] * (volume.shape[a] - 1)
        affine[:3, a] *= -1
    return CTVolume(np.ascontiguousarray(array), affine, volume.source)


def permuted(volume: CTVolume, order: tuple[int, int, int]) -> CTVolume:
    """The volume with file axes reordered: new axis t is old axis order[t]."""
    affine = volume.affine.copy()
    affine[:3, :3] = volume.affine[:3, list(order)]
    return CTVolume(np.ascontiguousarray(volume.array.transpose(order)), affine, volume.source)


def to_sitk(volume: CTVolume) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array.transpose(2, 1, 0)))
    spacing = volume.spacing
    image.SetSpacing(spacing.tolist())
    image.SetDirection((volume.affine[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin(volume.affine[:3, 3].tolist())
    return image


def resampled(volume: CTVolume, spacing: tuple[float, float, float], nearest: bool) -> CTVolume:
    """The volume resampled by SimpleITK to another spacing over the same region (same origin, axes)."""
    image = to_sitk(volume)
    extent = volume.spacing * (np.array(volume.shape) - 1)
    size = [int(math.floor(e / s + 1e-6)) + 1 for e, s in zip(extent, spacing)]
    out = sitk.Resample(
        image,
        size,
        sitk.Transform(),
        sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear,
        image.GetOrigin(),
        spacing,
        image.GetDirection(),
        -1024.0 if not nearest else 0.0,
    )
    array = sitk.GetArrayFromImage(out).transpose(2, 1, 0)
    affine = np.eye(4)
    affine[:3, :3] = np.array(out.GetDirection()).reshape(3, 3) * np.array(spacing)
    affine[:3, 3] = out.GetOrigin()
    return CTVolume(np.ascontiguousarray(array), affine, volume.source)


def box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    points = np.argwhere(mask)
    return points.min(axis=0), points.max(axis=0)


def world_box(volume: CTVolume, low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The world (LPS mm) axis-aligned box spanned by an inclusive voxel box's corners."""
    corners = np.array([[a[0], b[1], c[2]] for a in (low, high) for b in (low, high) for c in (low, high)])
    world = volume.index_to_world(corners)
    return world.min(axis=0), world.max(axis=0)


# Copies: name -> (transform of a volume, exact world geometry?, file suffix)
COPIES = {
    "flip_0_2": (lambda v, nearest: flipped(v, (0, 2)), True, ".nii.gz"),
    "permute_201": (lambda v, nearest: permuted(v, (2, 0, 1)), True, ".nrrd"),
    "permute_flip": (lambda v, nearest: flipped(permuted(v, (1, 2, 0)), (1,)), True, ".mha"),
    "resample_5_3_2mm": (lambda v, nearest: resampled(v, (5.0, 3.0, 2.0), nearest), False, ".nrrd"),
    "resample_flip": (lambda v, nearest: flipped(resampled(v, (3.0, 4.5, 3.5), nearest), (1,)), False, ".nii.gz"),
}


@pytest.fixture(scope="module")
def original(openkbp_case):
    """The real scan, its label and its localisation grid."""
    image = load_ct(openkbp_case[0])
    label = read_volume(openkbp_case[1])
    return image, label, to_localization_grid(image)


@pytest.fixture(scope="module")
def copies(original, tmp_path_factory):
    """Every copy written to disk, read back, with its grid: name -> (image, label, grid, exact)."""
    image, label, _ = original
    folder = tmp_path_factory.mktemp("copies")
    out = {}
    for name, (transform, exact, suffix) in COPIES.items():
        ct, lab = transform(image, False), transform(label, True)
        write_volume(ct.array.astype(np.int16), ct, folder / f"{name}{suffix}")
        write_volume(lab.array.astype(np.uint8), lab, folder / f"{name}_label{suffix}")
        ct = load_ct(folder / f"{name}{suffix}")
        out[name] = (ct, read_volume(folder / f"{name}_label{suffix}"), to_localization_grid(ct), exact)
    return out


def test_grid_is_canonical_for_real_anatomy(original):
    """Grid axes run superior->inferior, anterior->posterior, right->left at 3 mm."""
    image, label, grid = original
    assert np.allclose(np.abs(grid.affine[:3, :3]).sum(axis=0), GRID_SPACING_MM)
    centre = {
        name: grid.from_file_index(np.argwhere(label.array == value)).mean(axis=0) for value, name in ORGANS.items()
    }
    z, y, x = 0, 1, 2
    assert centre["Brainstem"][z] < centre["SpinalCord"][z] - 5  # brainstem above the cord
    assert centre["Mandible"][y] < centre["SpinalCord"][y] - 5  # mandible in front of the cord
    assert centre["LeftParotid"][x] > centre["RightParotid"][x] + 5  # the patient's left has larger x
    # the grid covers the body (air far from it is cropped): every voxel denser than air falls inside it
    inside = grid.from_file_index(np.argwhere(image.array > -500))
    assert inside.min() > -1e-6 and np.all(inside.max(axis=0) < np.array(grid.shape) - 1 + 1e-6)
    # ... on the lattice of the whole-scan grid, with the same values there
    whole_affine, whole_shape = canonical_affine(image)
    offset = (np.linalg.inv(whole_affine) @ grid.affine)[:3, 3]
    assert np.allclose(offset, np.round(offset), atol=1e-6) and np.prod(grid.shape) < np.prod(whole_shape)
    whole = resample_to_grid(image.array, image, whole_affine, whole_shape, fill=-1024.0)
    o = np.round(offset).astype(int)
    crop = whole[o[0] : o[0] + grid.shape[0], o[1] : o[1] + grid.shape[1], o[2] : o[2] + grid.shape[2]]
    assert np.allclose(map_hu(crop), grid.array, atol=1e-4)


def test_grid_is_canonical_for_a_scan_stored_the_other_way(data_dir):
    """The abdomen CT is stored right/anterior/superior, opposite to OpenKBP on every axis."""
    folder = data_dir / "abdomen"
    slab, label = load_ct(folder / "abdomen_slab_ct.nii.gz"), read_volume(folder / "abdomen_slab_label.nii.gz")
    assert slab.affine[0, 0] < 0 and slab.affine[1, 1] < 0 and slab.affine[2, 2] > 0  # i -> R, j -> A, k -> S
    grid = to_localization_grid(slab)
    centre = {
        name: grid.from_file_index(np.argwhere(label.array == value)).mean(axis=0)
        for value, name in {1: "spleen", 2: "kidney_right", 3: "kidney_left", 5: "liver"}.items()
    }
    assert centre["spleen"][2] > centre["liver"][2] + 10  # spleen on the patient's left
    assert centre["kidney_left"][2] > centre["kidney_right"][2] + 10
    assert centre["kidney_right"][1] > centre["liver"][1] + 5  # kidneys behind the liver
    # the slab is the lowest part of the full scan: on the full scan's grid it sits at the inferior end
    full = to_localization_grid(load_ct(folder / "abdomen_full_ct.nii.gz"))
    slab_on_full = full.from_world(slab.index_to_world(np.array(slab.shape) / 2 - 0.5))[0]
    assert slab_on_full[0] > 0.8 * (full.shape[0] - 1)


@pytest.mark.parametrize("name", list(COPIES))
def test_organ_box_survives_flips_permutations_and_resampling(original, copies, name):
    """An organ box found on the grid of the original maps onto the copy's own label box (within 1 voxel)."""
    image, label, grid = original
    ct, lab, copy_grid, exact = copies[name]
    if exact:  # same world geometry: the very same grid and grid intensities
        assert copy_grid.shape == grid.shape
        assert np.allclose(copy_grid.affine, grid.affine, atol=1e-4)
        assert np.allclose(copy_grid.array, grid.array, atol=1e-3)
    spacing = max(ct.spacing.max(), image.spacing.max())
    for value in ORGANS:
        grid_low, grid_high = grid.file_box_to_grid(*box(label.array == value))
        # each grid covers its own scan's body: go through world mm (the grids differ by a translation)
        copy_low, copy_high = copy_grid.from_world(grid.to_world(np.stack([grid_low, grid_high])))
        low, high = copy_grid.box_to_file(copy_low, copy_high)
        assert np.all(low <= high)
        truth_low, truth_high = box(lab.array == value)
        tolerance = 0 if exact else 1
        assert np.abs(low - truth_low).max() <= tolerance, (ORGANS[value], low, truth_low)
        assert np.abs(high - truth_high).max() <= tolerance, (ORGANS[value], high, truth_high)
        # and in world mm, against the original file's box
        w_low, w_high = world_box(ct, low, high)
        o_low, o_high = world_box(image, *box(label.array == value))
        assert np.allclose(w_low, o_low, atol=1e-3 if exact else spacing)
        assert np.allclose(w_high, o_high, atol=1e-3 if exact else spacing)


@pytest.mark.parametrize("name", ["flip_0_2", "permute_flip", "resample_flip"])
def test_resampled_grid_content_matches_the_coordinate_maps(copies, name):
    """The label resampled onto the grid sits where from_file_index puts the label's voxels."""
    ct, lab, grid, _ = copies[name]
    for value in (1, 4):
        mask = (lab.array == value).astype(np.float32)
        on_grid = resample_to_grid(mask, lab, grid.affine, grid.shape, fill=0.0) > 0.5
        sampled_low, sampled_high = box(on_grid)
        mapped = grid.from_file_index(np.argwhere(lab.array == value))
        assert np.abs(sampled_low - mapped.min(axis=0)).max() <= 1.0
        assert np.abs(sampled_high - mapped.max(axis=0)).max() <= 1.0


@pytest.mark.parametrize("name", list(COPIES))
def test_index_grid_round_trips_are_exact(copies, name):
    ct, _, grid, _ = copies[name]
    rng = np.random.default_rng(0)
    index = rng.uniform(0, np.array(ct.shape) - 1, size=(200, 3))
    assert np.allclose(grid.to_file_index(grid.from_file_index(index)), index, atol=1e-6)
    points = rng.uniform(0, np.array(grid.shape) - 1, size=(200, 3))
    assert np.allclose(grid.from_file_index(grid.to_file_index(points)), points, atol=1e-6)
    assert np.allclose(grid.from_world(grid.to_world(points)), points, atol=1e-6)
    # an integer file box -> grid -> file is the same box
    low, high = np.array([3, 5, 7]), np.array(ct.shape) - np.array([9, 4, 2])
    back_low, back_high = grid.box_to_file(*grid.file_box_to_grid(low, high))
    assert np.array_equal(back_low, low) and np.array_equal(back_high, high)


def test_box_to_file_clips_to_the_scan(original):
    _, _, grid = original
    low, high = grid.box_to_file(np.array([-50.0, -50.0, -50.0]), np.array(grid.shape) + 50.0)
    assert np.array_equal(low, [0, 0, 0]) and np.array_equal(high, np.array(grid.source.shape) - 1)


@pytest.mark.parametrize("degrees", [0.0, 25.0])
def test_known_object_lands_at_its_world_position(make_ct, degrees):
    """A bony ball at a known world position appears there on the grid, for axial and oblique scans."""
    angle = math.radians(degrees)
    rotation = np.array([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([2.5, 3.0, 3.5])
    affine[:3, 3] = (10.0, -30.0, 50.0)
    ball_index = np.array([18.0, 15.0, 12.0])
    ct, label = make_ct(shape=(40, 36, 30), affine=affine, ball_centre=tuple(ball_index), ball_radius=5.0)
    grid = to_localization_grid(ct)
    bone = np.argwhere(grid.array > 0.9)  # 1000 HU maps to ~0.94; soft tissue and air stay below 0.8
    expected = grid.from_world(ct.index_to_world(ball_index))[0]
    assert np.allclose(bone.mean(axis=0), expected, atol=0.5)
    # the ball's grid box comes back to the label's file box within a voxel, even when oblique
    grid_low, grid_high = bone.min(axis=0), bone.max(axis=0)
    low, high = grid.box_to_file(grid_low, grid_high)
    truth_low, truth_high = box(label.array > 0)
    slack = 2 if degrees else 1  # an oblique box encloses the rotated one
    assert np.all(low <= truth_low + 1) and np.all(low >= truth_low - slack)
    assert np.all(high >= truth_high - 1) and np.all(high <= truth_high + slack)


def test_canonical_grid_covers_the_volume_at_3mm(phantom):
    ct, _ = phantom
    affine, shape = canonical_affine(ct)
    extent = ct.spacing * (np.array(ct.shape) - 1)  # (i, j, k) = L, P, S world axes here
    assert shape == tuple(math.ceil(e / 3) + 1 for e in extent[::-1])  # reaches the far edge
    assert np.allclose(affine[:3, :3], [[0, 0, 3], [0, 3, 0], [-3, 0, 0]])


def test_headers_are_checked_before_any_voxel_is_read(data_dir, tmp_path, monkeypatch):
    """A header claiming more voxels than the budget, or more than its file holds, and a file naming another file
    are refused by every reader, naming why; a detached pair beside its header (.nhdr/.mhd) still reads."""
    import gzip

    import nibabel

    from medlsam.errors import InvalidImageError
    from medlsam.io.image_header import check_header

    ct = read_volume(data_dir / "openkbp" / "images" / "openkbp_pt_1.nii.gz")
    header = nibabel.Nifti1Header()
    header.set_data_shape((1000, 1000, 1000))
    header.set_data_dtype(np.int16)
    (tmp_path / "bomb.nii.gz").write_bytes(gzip.compress(header.binaryblock + b"\0" * 4))
    header.set_data_shape((512, 512, 300))
    (tmp_path / "forged.nii.gz").write_bytes(gzip.compress(header.binaryblock + b"\0" * 1028))
    (tmp_path / "forged.nii").write_bytes(header.binaryblock + b"\0" * 1028)
    raw = ct.array.astype(np.int16)
    (tmp_path / "voxels.raw").write_bytes(np.ascontiguousarray(raw.transpose(2, 1, 0)).tobytes())
    sizes = " ".join(map(str, raw.shape))
    nrrd = f"NRRD0004\ntype: short\ndimension: 3\nsizes: {sizes}\nencoding: raw\nendian: little\n"
    (tmp_path / "elsewhere.nrrd").write_text(nrrd + f"data file: {tmp_path / 'voxels.raw'}\n\n")
    (tmp_path / "pair.nhdr").write_text(nrrd + "data file: voxels.raw\n\n")
    (tmp_path / "climbs.nhdr").write_text(nrrd + "data file: ../voxels.raw\n\n")
    meta = f"ObjectType = Image\nNDims = 3\nDimSize = {sizes}\nElementType = MET_SHORT\nElementDataFile = "
    (tmp_path / "elsewhere.mha").write_text(meta + f"{tmp_path / 'voxels.raw'}\n")
    (tmp_path / "pair.mhd").write_text(meta + "voxels.raw\n")
    pair = bytearray(nibabel.Nifti1Header().binaryblock)
    pair[344:348] = b"ni1\x00"
    (tmp_path / "pair.nii").write_bytes(bytes(pair))
    refused = {
        "bomb.nii.gz": "over the server's budget",
        "forged.nii.gz": "truncated or forged",
        "forged.nii": "truncated or forged",
        "elsewhere.nrrd": "detached NRRD header",
        "climbs.nhdr": "not a plain file name",
        "elsewhere.mha": "ElementDataFile names another file",
        "pair.nii": "separate .img",
    }
    for name, needle in refused.items():
        with pytest.raises(InvalidImageError, match=needle):
            read_volume(tmp_path / name)
    for name in ("pair.nhdr", "pair.mhd"):
        assert np.array_equal(read_volume(tmp_path / name).array, raw), name
    write_volume(raw, ct, tmp_path / "ct.nii.gz")
    assert check_header(tmp_path / "ct.nii.gz") == raw.shape
    monkeypatch.setenv("MEDLSAM_MAX_VOXELS", str(raw.size - 1))  # the budget is the operator's to set
    with pytest.raises(InvalidImageError, match="budget"):
        load_ct(tmp_path / "ct.nii.gz")
