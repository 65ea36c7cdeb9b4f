"""The app's local datastore: MONAI Label's LocalDatastore behind a gate.

Every id and tag is a plain name (no path separator, no ``..``), so nothing a client sends can name a file
outside the datastore; uploads keep a medical-image extension; a saved label must be an integer volume on its
image's grid with a well-formed ``label_info`` naming its values. Refusals are HTTP 4xx with a clear message.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Callable, Dict, Optional

import numpy as np
from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag

from medlsam.io.labels import MAX_LABEL_VALUE, LabelError, check_label_array
from medlsam.utils.names import NAME_RULE, is_plain_name

logger = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # ids and tags: file names, never paths
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha")
SERVER_KEYS = ("ts", "name")  # label/image info the datastore itself sets


def valid_name(value: Any) -> bool:
    """A datastore id or tag: a short file name without path separators or ``..``."""
    return isinstance(value, str) and bool(NAME_PATTERN.match(value)) and ".." not in value


def check_name(value: Any, what: str) -> str:
    if not valid_name(value):
        raise HTTPException(
            status_code=400,
            detail=f"{what} {str(value)[:80]!r} is not a valid {what}: use letters, "
            "digits, '.', '_' or '-' (no path separators, no '..')",
        )
    return value


def upload_extension(filename: str, what: str) -> str:
    """The medical-image extension of an uploaded file, else 400."""
    name = os.path.basename(filename or "").lower()
    for ext in sorted(IMAGE_EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    raise HTTPException(
        status_code=400, detail=f"{what} file {os.path.basename(filename or '')!r}: use one of {list(IMAGE_EXTENSIONS)}"
    )


def parse_label_info(info: Any) -> Dict[int, str]:
    """{value: organ name} of a ``label_info`` list; 400 on a non-integer index or a missing/duplicate name."""
    if info is None:
        return {}
    if not isinstance(info, list):
        raise HTTPException(status_code=400, detail='label_info must be a list of {"name": ..., "idx": ...}')
    names: Dict[int, str] = {}
    for item in info:
        if not isinstance(item, dict):
            raise HTTPException(status_code=400, detail=f"label_info entry {item!r} is not an object")
        name, idx = item.get("name"), item.get("idx")
        if isinstance(idx, bool) or not isinstance(idx, (int, float, str)):
            idx = None
        try:
            value = int(idx) if idx is not None and float(idx) == int(float(idx)) else None
        except (TypeError, ValueError, OverflowError):
            value = None
        if value is None or not 0 <= value <= MAX_LABEL_VALUE:
            raise HTTPException(
                status_code=400,
                detail=f"label_info idx {item.get('idx')!r} (organ {name!r}) must "
                f"be an integer in 0..{MAX_LABEL_VALUE}",
            )
        if not isinstance(name, str) or not name.strip():
            raise HTTPException(status_code=400, detail=f"label_info idx {value}: the name must be a non-empty string")
        if not is_plain_name(name.strip()):
            raise HTTPException(
                status_code=400, detail=f"label_info idx {value}: the name is not plain text; use {NAME_RULE}"
            )
        if value == 0 or name.strip().lower() in ("background", "foreground_scribbles", "background_scribbles"):
            continue
        if value in names:
            raise HTTPException(status_code=400, detail=f"label_info idx {value} is given twice")
        if name.strip().lower() in (n.lower() for n in names.values()):
            raise HTTPException(status_code=400, detail=f"label_info name {name.strip()!r} is given twice")
        names[value] = name.strip()
    return names


def check_label(
    label_path: str, image_path: str, label_info: Any, require_organ: bool, known: Optional[Dict[int, str]] = None
) -> None:
    """An integer label on the image's grid, with bounded organs; every value named by ``label_info`` or, where it
    gives no name, by ``known`` (the datastore's organ names, value -> name), and every ``label_info`` name present
    in the volume; else 400."""
    import SimpleITK as sitk

    from medlsam.errors import InvalidImageError, MedLSAMError
    from medlsam.io.volume import read_volume

    try:
        label = read_volume(label_path)  # header first: voxel budget, no detached data file
        label_header = sitk.ImageFileReader()
        label_header.SetFileName(label_path)
        label_header.ReadImageInformation()
        image_header = sitk.ImageFileReader()
        image_header.SetFileName(image_path)
        image_header.ReadImageInformation()
    except (MedLSAMError, RuntimeError) as exc:
        why = str(exc).replace(label_path, "label") if isinstance(exc, InvalidImageError) else type(exc).__name__
        raise HTTPException(status_code=400, detail=f"label cannot be read as a 3D label volume ({why})") from None
    size = tuple(image_header.GetSize())[:3]
    if label.shape != size:
        raise HTTPException(
            status_code=400, detail=f"label shape {list(label.shape)} differs from its image's {list(size)}"
        )
    for what, a, b in (
        ("spacing", label_header.GetSpacing(), image_header.GetSpacing()),
        ("origin", label_header.GetOrigin(), image_header.GetOrigin()),
        ("direction", label_header.GetDirection(), image_header.GetDirection()),
    ):
        if not np.allclose(np.asarray(a)[: len(b)], np.asarray(b)[: len(a)], atol=1e-3, rtol=1e-4):
            raise HTTPException(
                status_code=400,
                detail=f"label {what} {np.round(a, 4).tolist()} differs from its "
                f"image's {np.round(b, 4).tolist()}: not on the image grid",
            )
    try:
        organs = check_label_array(label.array, require_organ)
    except LabelError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    names = parse_label_info(label_info)
    unnamed = sorted(set(organs) - set(names) - (set(known or {}) if not names else set()))
    if unnamed:
        given = f"label_info names {sorted(names)[:10]}" if names else "no label_info was given"
        raise HTTPException(
            status_code=400,
            detail=f"label value(s) {unnamed[:10]} have no entry in label_info ({given}; the datastore's organ "
            f"names cover {sorted(known or {})[:10]}): name every value",
        )
    absent = sorted(set(names) - set(organs))
    if absent:
        raise HTTPException(
            status_code=400,
            detail=f"label_info names value(s) {absent[:10]} ({', '.join(names[v] for v in absent[:10])}) that the "
            "label volume does not hold",
        )


class GatedDatastore(LocalDatastore):
    """LocalDatastore whose ids and tags are plain names, whose saved labels are checked first, and whose deletes
    and overwrites act on its own entries only (a symlinked scan is unlinked as a link, never followed).
    ``organ_names()`` gives the organ names (value -> name) that name a label's values where its label_info does
    not."""

    def __init__(
        self,
        *args,
        on_label_change: Optional[Callable[[], None]] = None,
        organ_names: Optional[Callable[[], Dict[int, str]]] = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.on_label_change = on_label_change
        self.organ_names = organ_names or (lambda: {})

    def _entry(self, folder: str, image_id: str, ext: str) -> str:
        """The datastore's own file of an image or label (not resolved: a symlink stays the link)."""
        return os.path.join(folder, self._filename(image_id, ext))

    def _unlink(self, path: str) -> None:
        if os.path.islink(path) or os.path.isfile(path):
            os.unlink(path)

    def _known_image(self, image_id: Any) -> str:
        if not valid_name(image_id) or image_id not in self._datastore.objects:
            raise HTTPException(
                status_code=404,
                detail=f"image {str(image_id)[:80]!r} not found in the datastore "
                "(GET /datastore/?output=all lists the image ids)",
            )
        return image_id

    def get_image_uri(self, image_id: str) -> str:
        return super().get_image_uri(image_id) if valid_name(image_id) else ""

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        return super().get_label_uri(label_id, label_tag) if valid_name(label_id) and valid_name(label_tag) else ""

    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        from medlsam.errors import MedLSAMError
        from medlsam.io.volume import load_ct

        ext = upload_extension(image_filename, "image")
        image_id = image_id or os.path.basename(image_filename)[: -len(ext)]
        check_name(image_id, "image id")
        if image_id in self._datastore.objects:
            raise HTTPException(
                status_code=409,
                detail=f"image {image_id!r} already exists; delete it first (DELETE /datastore/image?id=...)",
            )
        try:
            load_ct(image_filename)
        except MedLSAMError as exc:
            raise HTTPException(
                status_code=400, detail=f"image {image_id!r} refused: {str(exc).replace(image_filename, 'upload')}"
            ) from None
        image_info = {k: v for k, v in (image_info or {}).items() if k not in SERVER_KEYS}
        return super().add_image(image_id, image_filename, image_info)

    def remove_image(self, image_id: str) -> None:
        """Its labels, then the datastore's entry itself: a symlink is removed as a link, its target kept."""
        obj = self._datastore.objects[self._known_image(image_id)]
        for tag in list(obj.labels):
            self._unlink(self._entry(self._datastore.label_path(tag), image_id, obj.labels[tag].ext))
        self._unlink(self._entry(self._datastore.image_path(), image_id, obj.image.ext))
        if not self._auto_reload:
            self.refresh()
        self._label_changed()

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        self._known_image(image_id)
        check_name(label_tag, "tag")
        upload_extension(label_filename, "label")
        label_info = dict(label_info or {})
        check_label(
            label_filename,
            self.get_image_uri(image_id),
            label_info.get("label_info"),
            require_organ=label_tag == DefaultLabelTag.FINAL.value,
            known=self.organ_names(),
        )
        label_info = {k: v for k, v in label_info.items() if k not in SERVER_KEYS}
        old = self._datastore.label(image_id, label_tag)
        entry = self._entry(self._datastore.label_path(label_tag), image_id, old.ext) if old is not None else ""
        if entry and os.path.islink(entry):
            os.unlink(entry)  # replace the link itself, never write through it
        return super().save_label(image_id, label_filename, label_tag, label_info)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        self._known_image(label_id)
        check_name(label_tag, "tag")
        label = self._datastore.label(label_id, label_tag)
        if label is None or not self.get_label_uri(label_id, label_tag):
            raise HTTPException(status_code=404, detail=f"image {label_id!r} has no {label_tag!r} label")
        self._unlink(self._entry(self._datastore.label_path(label_tag), label_id, label.ext))
        if not self._auto_reload:
            self.refresh()
        self._label_changed()

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        self._known_image(image_id)
        refused = [k for k in info if k in SERVER_KEYS]
        if refused:
            raise HTTPException(status_code=400, detail=f"info keys {refused} are set by the server")
        super().update_image_info(image_id, info)

    def update_label_info(self, label_id: str, label_tag: str, info: Dict[str, Any]) -> None:
        self._known_image(label_id)
        check_name(label_tag, "tag")
        label = self.get_label_uri(label_id, label_tag)
        if not label:
            raise HTTPException(status_code=404, detail=f"image {label_id!r} has no {label_tag!r} label")
        refused = [k for k in info if k in SERVER_KEYS]
        if refused:
            raise HTTPException(status_code=400, detail=f"info keys {refused} are set by the server")
        if "label_info" in info:
            check_label(
                label, self.get_image_uri(label_id), info["label_info"], require_organ=False, known=self.organ_names()
            )
        super().update_label_info(label_id, label_tag, info)
        self._label_changed()

    def _label_changed(self) -> None:
        if self.on_label_change is not None:
            self.on_label_change()
