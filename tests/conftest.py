"""Shared fixtures: where the real data lives, and a small synthetic CT phantom."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from medlsam.io.volume import CTVolume

REPO_ROOT = Path(__file__).resolve().parents[1]

# The tests run tiny networks: one thread is fastest, and several threads competing with other jobs on
# a small machine (e.g. a training run) are many times slower. MEDLSAM_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("MEDLSAM_TEST_THREADS", "1")))


DATA_FIXTURES = {"data_dir", "openkbp_case"}


def pytest_collection_modifyitems(items) -> None:
    """Tests that read the shared data folder (through these fixtures) are marked ``data``; tests/unit holds none
    (`make test-quick` runs it without the data folder)."""
    unit = Path(__file__).resolve().parent / "unit"
    for item in items:
        if DATA_FIXTURES & set(getattr(item, "fixturenames", ())):
            if unit in Path(str(item.fspath)).resolve().parents:
                raise pytest.UsageError(f"{item.nodeid} reads the data folder: it belongs in tests/data")
            item.add_marker(pytest.mark.data)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """$MEDLSAM_DATA, or ../shared/data beside the repository; skips only when that folder is missing."""
    path = Path(os.environ.get("MEDLSAM_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"data folder {path} not found (set MEDLSAM_DATA)")
    return path


@pytest.fixture(scope="session")
def openkbp_case(data_dir: Path) -> tuple[Path, Path]:
    """Image and label of one real OpenKBP head-and-neck CT (must exist when the data folder does)."""
    image = data_dir / "openkbp" / "images" / "openkbp_pt_1.nii.gz"
    label = data_dir / "openkbp" / "labels" / "openkbp_pt_1.nii.gz"
    assert image.is_file() and label.is_file(), f"OpenKBP case missing under {data_dir}"
    return image, label


def make_phantom(
    shape: tuple[int, int, int] = (40, 36, 30),
    affine: np.ndarray | None = None,
    ball_centre: tuple[float, float, float] = (14.0, 20.0, 10.0),
    ball_radius: float = 4.0,
) -> tuple[CTVolume, CTVolume]:
    """A CT phantom in HU (air, a soft-tissue body, a bony ball) and the ball's label.

    Default geometry: LPS axes, spacing (3, 3.5, 4) mm, a non-zero origin. `ball_centre` is in voxels.
    """
    if affine is None:
        affine = np.diag([3.0, 3.5, 4.0, 1.0])
        affine[:3, 3] = (-60.0, -40.0, 100.0)
    i, j, k = np.meshgrid(*(np.arange(s, dtype=np.float32) for s in shape), indexing="ij")
    centre = (np.array(shape) - 1) / 2
    hu = np.full(shape, -1000.0, dtype=np.float32)
    body = ((i - centre[0]) / (0.45 * shape[0])) ** 2 + ((j - centre[1]) / (0.45 * shape[1])) ** 2 < 1
    hu[body] = 40.0
    ball = (i - ball_centre[0]) ** 2 + (j - ball_centre[1]) ** 2 + (k - ball_centre[2]) ** 2 <= ball_radius**2
    hu[ball] = 1000.0
    return CTVolume(hu, affine.copy(), "phantom"), CTVolume(ball.astype(np.uint8), affine.copy(), "phantom label")


def right_anterior_marker(x_axis: int, signs: tuple[int, int], shape=(30, 40, 5)) -> CTVolume:
    """Slices along axis 2 whose in-plane file axes run along world x (patient left; file axis ``x_axis``) and y
    (posterior), with ``signs``; one bright voxel at the patient's right-anterior corner of slice 2, which the
    radiological view shows as the top-left pixel."""
    affine = np.diag([0.0, 0.0, 3.0, 1.0])
    affine[0, x_axis], affine[1, 1 - x_axis] = 2.0 * signs[0], 2.0 * signs[1]
    hu = np.zeros(shape, np.float32)
    corner = [0, 0]
    corner[x_axis] = 0 if signs[0] > 0 else shape[x_axis] - 1
    corner[1 - x_axis] = 0 if signs[1] > 0 else shape[1 - x_axis] - 1
    hu[corner[0], corner[1], 2] = 1000.0
    return CTVolume(hu, affine, "oriented")


@pytest.fixture
def phantom() -> tuple[CTVolume, CTVolume]:
    return make_phantom()


@pytest.fixture(scope="session")
def make_ct():
    """The phantom factory, for tests that need other shapes or geometries."""
    return make_phantom


@pytest.fixture(scope="session")
def phantom_scans(tmp_path_factory, make_ct) -> list[Path]:
    """Three small synthetic CTs on disk, their bony ball in different places (the torch.distributed tests)."""
    from medlsam.io.volume import write_volume

    folder = tmp_path_factory.mktemp("phantom-scans")
    paths = []
    for n, centre in enumerate([(14.0, 20.0, 10.0), (24.0, 14.0, 18.0), (18.0, 18.0, 14.0)]):
        ct, _ = make_ct(ball_centre=centre, ball_radius=5.0)
        write_volume(ct.array.astype(np.int16), ct, folder / f"scan{n}.nii.gz")
        paths.append(folder / f"scan{n}.nii.gz")
    return paths
