"""An image file's header read and checked before any voxel is: the voxel budget, and files that name other files.

A header is a promise the voxels have not kept yet: a 70-byte ``.nii.gz`` may claim 1000^3 voxels, an NRRD header
may name a CT elsewhere on disk (``data file:``), a MetaImage its ``ElementDataFile``, a ``.nii`` a separate
``.img`` (magic ``ni1``). ``check_header`` refuses these with an InvalidImageError naming why, reading at most the
header and, for a gzip file whose claim is large for its size, streaming its data once without keeping it (memory
flat), so the reader that follows never allocates for voxels that are not there.
"""

from __future__ import annotations

import gzip
import os
import re
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medlsam.errors import InvalidImageError

DEFAULT_MAX_VOXELS = 512 * 512 * 1024  # a 512 x 512 scan of 1024 slices; MEDLSAM_MAX_VOXELS overrides
DETACHED_SUFFIXES = (".nhdr", ".mhd")  # formats whose data lives in a second file, by design
NRRD_DATA_FILE = re.compile(rb"^data ?file\s*:", re.IGNORECASE | re.MULTILINE)
META_DATA_FILE = re.compile(rb"^ElementDataFile\s*=\s*(.*?)\s*$", re.IGNORECASE | re.MULTILINE)
HEADER_BYTES = 64 * 1024  # text headers (NRRD, MetaImage) end well within this
GZIP_RATIO = 16  # real CT compresses < 4x; a claim above this many times the file size is verified by streaming


def max_voxels() -> int:
    """The voxel budget of one image: MEDLSAM_MAX_VOXELS, else DEFAULT_MAX_VOXELS."""
    text = os.environ.get("MEDLSAM_MAX_VOXELS", "").strip()
    try:
        return int(text) if text else DEFAULT_MAX_VOXELS
    except ValueError:
        raise InvalidImageError(f"MEDLSAM_MAX_VOXELS must be an integer, not {text!r}") from None


def check_header(path: str | os.PathLike, budget: int | None = None) -> tuple[int, ...]:
    """The image size of ``path`` from its header, after refusing references to other files and sizes over the
    voxel budget (``budget`` or ``max_voxels()``); InvalidImageError naming why. Folders (DICOM series) pass."""
    path = Path(path)
    if path.is_dir():
        return ()
    name = path.name.lower()
    compressed, head = _head(path)
    _refuse_references(path, name, head)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines()
        raise InvalidImageError(f"{path}: cannot be read as a medical image ({lines[-1] if lines else exc})") from None
    size = tuple(int(s) for s in reader.GetSize())
    voxels = int(np.prod(size, dtype=np.float64)) * reader.GetNumberOfComponents()
    limit = max_voxels() if budget is None else budget
    if voxels > limit:
        raise InvalidImageError(
            f"{path}: its header claims {' x '.join(map(str, size))} = {voxels:,} voxels, over the server's budget "
            f"of {limit:,} (MEDLSAM_MAX_VOXELS)"
        )
    _check_data_length(path, compressed, head, voxels * _bytes_per_component(reader))
    return size


def check_series_header(files: list[str] | tuple[str, ...], budget: int | None = None) -> None:
    """The voxel budget for a DICOM series: its first file's slice size times the number of files."""
    first = check_header(files[0], budget)
    voxels = int(np.prod(first[:2], dtype=np.float64)) * max(1, int(np.prod(first[2:], dtype=np.float64))) * len(files)
    limit = max_voxels() if budget is None else budget
    if voxels > limit:
        raise InvalidImageError(
            f"{Path(files[0]).parent}: a series of {len(files)} slices of {first[0]} x {first[1]} = {voxels:,} voxels, "
            f"over the server's budget of {limit:,} (MEDLSAM_MAX_VOXELS)"
        )


def _head(path: Path) -> tuple[bool, bytes]:
    """(gzip-compressed, the first HEADER_BYTES of the file, decompressed)."""
    try:
        with open(path, "rb") as raw:
            compressed = raw.read(2) == b"\x1f\x8b"
        with (gzip.open if compressed else open)(path, "rb") as stream:
            return compressed, stream.read(HEADER_BYTES)
    except (OSError, EOFError, zlib.error) as exc:
        raise InvalidImageError(f"{path}: cannot be read ({type(exc).__name__})") from None


def _refuse_references(path: Path, name: str, head: bytes) -> None:
    """Only the detached formats (.nhdr, .mhd) may name a data file, and only a plain name beside the header."""
    text, detached = head, name.endswith(DETACHED_SUFFIXES)
    if text.startswith(b"NRRD"):
        match = NRRD_DATA_FILE.search(text.split(b"\n\n", 1)[0])
        if match and not detached:
            raise InvalidImageError(
                f"{path}: a detached NRRD header (its 'data file' names another file); upload the image with its "
                "voxels in one file"
            )
        if match:
            _plain_name(path, text[match.end() :].split(b"\n", 1)[0])
    meta = META_DATA_FILE.search(text) if re.search(rb"^(ObjectType|NDims)\s*=", text, re.MULTILINE) else None
    if meta is not None and meta.group(1).upper() != b"LOCAL":
        if not detached:
            raise InvalidImageError(
                f"{path}: a MetaImage header whose ElementDataFile names another file; upload an .mha with its "
                "voxels in one file"
            )
        _plain_name(path, meta.group(1))
    if name.endswith((".nii", ".nii.gz")) and len(text) >= 348 and text[344:348] == b"ni1\x00":
        raise InvalidImageError(
            f"{path}: a NIfTI header whose voxels live in a separate .img file; upload a single-file .nii or .nii.gz"
        )


def _plain_name(path: Path, reference: bytes) -> None:
    """A detached header's data file must be a plain file name in the header's own folder."""
    target = reference.strip().split()[0].decode("utf-8", "replace") if reference.strip() else ""
    if not target or "/" in target or "\\" in target or target in (".", "..") or "%" in target or target == "LIST":
        raise InvalidImageError(
            f"{path}: its data file {target!r} is not a plain file name beside the header; only such pairs are read"
        )


def _bytes_per_component(reader: sitk.ImageFileReader) -> int:
    pixel = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    sizes = {"8-bit": 1, "16-bit": 2, "32-bit": 4, "64-bit": 8}
    return next((b for key, b in sizes.items() if key in pixel), 8)


def _check_data_length(path: Path, compressed: bool, head: bytes, claimed: int) -> None:
    """Refuse a file that holds fewer voxel bytes than its header claims, before a reader allocates for them: a raw
    file by its size, compressed data (gzip file, NRRD gzip encoding, MetaImage CompressedData) by streaming it once
    without keeping it, where the claim is large for the file's size."""
    size, name = path.stat().st_size, path.name.lower()
    if name.endswith(DETACHED_SUFFIXES):
        return None
    large = claimed > GZIP_RATIO * size  # streaming is worth its time only then
    if compressed:
        return _check_stream_length(path, 0, 31, claimed) if large else None
    header_end = head.find(b"\n\n") + 2 if head.startswith(b"NRRD") else -1
    encoding = re.search(rb"^encoding\s*:\s*(\w+)\s*$", head[: max(header_end, 0)], re.I | re.M)
    meta = META_DATA_FILE.search(head)
    if encoding is not None and encoding.group(1).lower() in (b"gzip", b"gz"):
        return _check_stream_length(path, header_end, 31, claimed) if large else None
    if meta is not None and re.search(rb"^CompressedData\s*=\s*True", head, re.I | re.M):
        offset = meta.end() + head[meta.end() :].find(b"\n") + 1
        return _check_stream_length(path, offset, 15, claimed) if large else None
    raw = name.endswith(".nii") or meta is not None or (encoding is not None and encoding.group(1).lower() == b"raw")
    if raw and claimed > size:
        raise InvalidImageError(
            f"{path}: its header claims {claimed:,} bytes of voxels but the file has {size:,}: truncated or forged"
        )
    return None


def _check_stream_length(path: Path, offset: int, wbits: int, claimed: int) -> None:
    """Decompress from ``offset`` counting bytes (nothing kept); fewer than ``claimed``: truncated or forged."""
    total, inflate = 0, zlib.decompressobj(wbits)
    try:
        with open(path, "rb") as stream:
            stream.seek(offset)
            while total < claimed:
                chunk = stream.read(1 << 20)
                if not chunk:
                    break
                total += len(inflate.decompress(chunk, 1 << 24))
                while inflate.unconsumed_tail and total < claimed:
                    total += len(inflate.decompress(inflate.unconsumed_tail, 1 << 24))
    except zlib.error as exc:
        raise InvalidImageError(f"{path}: damaged compressed voxel data ({exc})") from None
    if total < claimed:
        raise InvalidImageError(
            f"{path}: its header claims {claimed:,} bytes of voxels but the file holds {total:,}: truncated or forged"
        )
