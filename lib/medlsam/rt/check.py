"""Independent checks of RT Structure Sets with tools that did not write them (Debian packages, see
scripts/system_deps.sh): DICOM's validator ``dciodvfy`` (dicom3tools) and ``plastimatch``'s rasteriser.

``plastimatch convert --input RS.dcm --referenced-ct SERIES_DIR --output-ss-img ss.nrrd --output-ss-list ss.txt``
rasterises every structure on the CT's grid into one bit per structure (``ss.txt``: bit | colour | name);
``--xor-contours`` makes a slice's contours combine by XOR (even-odd: inner contours are holes, as DICOM planning
systems write them) instead of plastimatch's default union.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from medlsam.errors import MedLSAMError


def missing_tools() -> str:
    """'' when dciodvfy and plastimatch are on PATH, else a sentence naming what is missing and how to get it."""
    missing = [tool for tool in ("dciodvfy", "plastimatch") if shutil.which(tool) is None]
    if not missing:
        return ""
    return f"{' and '.join(missing)} not installed (Debian: apt-get install dicom3tools plastimatch)"


def dciodvfy(path: str | os.PathLike) -> dict:
    """dciodvfy's verdict on one file: {"errors": [...], "warnings": [...], "output": full text}."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        raise MedLSAMError("dciodvfy not found: apt-get install dicom3tools")
    done = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    return {
        "errors": [line for line in lines if line.startswith("Error")],
        "warnings": [line for line in lines if line.startswith("Warning")],
        "output": "\n".join(lines),
    }


def _read_ss_list(path: Path) -> list[tuple[int, str]]:
    out = []
    for line in path.read_text().splitlines():
        parts = line.split("|", 2)
        if len(parts) == 3:
            out.append((int(parts[0]), parts[2].strip()))
    return out


def plastimatch_masks(
    rtstruct: str | os.PathLike, series_dir: str | os.PathLike, xor_contours: bool = True, reference=None
) -> dict[str, np.ndarray]:
    """plastimatch's rasterisation of every structure on the CT series' grid: {ROI name: bool (i, j, k) mask} in
    the voxel order of ``medlsam.io.volume.read_volume(series_dir)`` (or of ``reference``, that volume already read;
    checked: same geometry)."""
    import SimpleITK as sitk

    from medlsam.io.volume import _affine_from_sitk, read_volume

    tool = shutil.which("plastimatch")
    if tool is None:
        raise MedLSAMError("plastimatch not found: apt-get install plastimatch")
    reference = reference if reference is not None else read_volume(series_dir)
    with tempfile.TemporaryDirectory() as tmp:
        image, names = Path(tmp) / "ss.nrrd", Path(tmp) / "ss.txt"
        command = [tool, "convert", "--input", str(rtstruct), "--referenced-ct", str(series_dir)]
        command += ["--output-ss-img", str(image), "--output-ss-list", str(names)]
        command += ["--xor-contours"] if xor_contours else []
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode != 0 or not image.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise MedLSAMError(f"plastimatch convert failed ({done.returncode}): {' | '.join(tail)}")
        ss = sitk.ReadImage(str(image))
        affine = _affine_from_sitk(ss)
        bits = sitk.GetArrayFromImage(ss)  # (k, j, i[, planes]) unsigned char
        structures = _read_ss_list(names)
    if not np.allclose(affine, reference.affine, atol=1e-3) or bits.shape[:3] != reference.shape[::-1]:
        raise MedLSAMError("plastimatch rasterised on another grid than the CT series'")
    if bits.ndim == 3:
        bits = bits[..., None]
    planes = [np.ascontiguousarray(bits[..., p].transpose(2, 1, 0)) for p in range(bits.shape[3])]
    return {name: (planes[bit // 8] & (1 << (bit % 8))) != 0 for bit, name in structures}
