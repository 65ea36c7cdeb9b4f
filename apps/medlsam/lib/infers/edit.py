"""Infer task `edit` (MONAI Label type deepedit): correct the current multi-organ segmentation with clicks.

Clicks come as Slicer's DeepEdit sends them, file voxel indices per organ plus ``background``:
``{"Brainstem": [[i, j, k], ...], "Mandible": [...], "background": [...]}``, or as ``foreground`` /
``background`` with ``label`` naming the organ. Every request carries all the clicks so far (clicks accumulate;
none is ever undone by a later one): they are applied to the image's current segmentation, which is the label
sent with the request, else the last auto-segmentation (`medlsam`) the server made for this image, else
nothing (an organ with no voxels starts from its template prior). A ``background`` click of the DeepEdit form
removes the voxel from the organ that holds it in that segmentation.

Method (request option ``method``, default ``--conf edit_method``): ``refiner``, the click refiner network
(``medlsam.interact.refiner``: image, the organ's template posterior and current mask, and the clicks, on a crop
around the
organ), or ``geodesic`` (``medlsam.interact.editing.edit_organ``). The organ priors and intensity models come from the
template bank (localised once per image and bank, then cached: a later click costs no localisation). Organs that the
bank does not know but the datastore's or the request's ``label_names`` do, and any structure given a box (``box``
[[i0, j0, k0], [i1, j1, k1]] or {name: box}, Slicer's ``roi``), are segmented class-agnostically at the scan's own
resolution (``medlsam.interact.click_structure``); with request option ``agnostic`` = ``combo`` by blobs or a
LiteMedSAM candidate chosen per request (``medlsam.interact.click_combo``; the image's slice embeddings are those of
``sam_3d``, kept per image, each slice encoded once). The result is the whole label with only the prompted structures
changed; a structure whose prompts did not change since the image's last request is replayed, not recomputed
(``medlsam.interact.edit_requests``).
"""

from __future__ import annotations

import time

import numpy as np
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferType

from lib.infers.common import DynamicLabels, MedLSAMInferTask, number
from lib.infers.options import WHERE
from lib.models import Models
from lib.option_spec import AGNOSTIC_METHODS, INFER_OPTIONS
from lib.options import option, read
from lib.template_source import NoTemplatesError, TemplateSource
from lib.volumes import Volumes
from medlsam.errors import MedLSAMError
from medlsam.utils.names import NAME_RULE, is_plain_name

RESERVED = {
    "box",
    "roi",
    "foreground",
    "background",
    "label",
    "label_name",
    "label_file",
    "label_names",
    "image",
    "image_id",
    "model",
    "device",
    "result_extension",
    "result_dtype",
    "result_compress",
    "client_id",
    "session",
    "save_label",
}


def request_clicks(
    request: dict, known: dict[str, int], shape: tuple[int, int, int]
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(foreground clicks per organ, DeepEdit ``background`` clicks, foreground/background-form background clicks
    of the ``label_name`` organ), checked against the image; 400 naming the problem. Keys of the request that hold
    lists of points and are not options must be organ names."""
    from medlsam.interact.interactive import parse_points as _points

    label = request.get("label_name")
    organ_form = isinstance(label, str) and bool(label)
    foreground: dict[str, np.ndarray] = {}
    for key, value in request.items():
        if key in RESERVED or not isinstance(value, (list, tuple)) or not value:
            continue
        if not isinstance(value[0], (list, tuple)):
            continue  # an option list (e.g. a client echoing the config), not clicks
        if key not in known:
            raise HTTPException(
                status_code=400,
                detail=f"clicks for {key!r}, an organ neither in the template bank nor in the labels "
                f"(known: {', '.join(sorted(known)) or 'none'})",
            )
        foreground[key] = _points(value, key, shape)
    own_background = np.zeros((0, 3), int)
    if request.get("foreground") is not None and len(request.get("foreground") or []) or organ_form:
        if not organ_form:
            raise HTTPException(
                status_code=400, detail="foreground clicks need `label`: the name of the organ they belong to"
            )
        if label not in known:
            raise HTTPException(
                status_code=400,
                detail=f"label {label!r} is neither in the template bank nor in the labels "
                f"(known: {', '.join(sorted(known)) or 'none'})",
            )
        fg = _points(request.get("foreground"), "foreground", shape)
        foreground[label] = np.vstack([foreground.get(label, np.zeros((0, 3), int)), fg])
        own_background = _points(request.get("background"), "background", shape)
        background = np.zeros((0, 3), int)
    else:
        background = _points(request.get("background"), "background", shape)
    both = {tuple(p) for f in foreground.values() for p in f.tolist()} & {
        tuple(p) for p in [*background.tolist(), *own_background.tolist()]
    }
    if both:
        raise HTTPException(
            status_code=400, detail=f"voxel(s) {sorted(both)} clicked both as foreground and as background"
        )
    return foreground, background, own_background


def request_label_names(request: dict) -> dict[str, int]:
    """The request's ``label_names`` {name: value} for structures the bank does not know; 400 unless every name
    is plain text and every value a positive integer."""
    names = request.get("label_names")
    if names is None or names == {}:
        return {}
    if not isinstance(names, dict):
        raise HTTPException(status_code=400, detail='label_names must be an object {"name": value, ...}')
    for name, value in names.items():
        if not is_plain_name(name):
            raise HTTPException(
                status_code=400, detail=f"label_names: {str(name)[:80]!r} is not plain text ({NAME_RULE})"
            )
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 65535:
            raise HTTPException(status_code=400, detail=f"label_names: {name!r} needs an integer value in 1..65535")
    return dict(names)


def request_boxes(request: dict, known: dict[str, int], shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """Boxes as the first prompt of a structure: ``box`` [[i0, j0, k0], [i1, j1, k1]] (inclusive voxel corners) for
    the ``label`` structure, or {structure: [[...], [...]]}; Slicer's ``roi`` [i0, i1, j0, j1, k0, k1] for the
    ``label`` structure. Checked (3, 2) low/high per structure; 400 naming the problem."""
    from medlsam.interact.click_any import check_box

    label = request.get("label_name")
    boxes = {}
    value = request.get("box")
    if isinstance(value, dict):
        boxes.update(value)
    elif value is not None and len(value):
        boxes[label] = value
    roi = request.get("roi")
    if roi is not None and len(roi):
        try:
            r = np.asarray(roi, dtype=np.float64).reshape(3, 2)
        except (TypeError, ValueError):
            raise HTTPException(status_code=400, detail=f"roi must be [i0, i1, j0, j1, k0, k1], got {roi!r}") from None
        boxes[label] = r.T.tolist()
    out = {}
    for name, corners in boxes.items():
        if not isinstance(name, str) or not name:
            raise HTTPException(status_code=400, detail="a box needs `label`: the name of the structure it outlines")
        if name not in known:
            raise HTTPException(
                status_code=400,
                detail=f"box for {name!r}, a structure neither in the template bank nor in the labels "
                f"(known: {', '.join(sorted(known)) or 'none'})",
            )
        out[name] = check_box(corners, shape)
    return out


def check_name_values(names: dict[str, int], bank_values: dict[str, int]) -> None:
    """400 when a structure of the request's ``label_names`` takes the label value of a bank organ of another name
    (its voxels would overwrite that organ's)."""
    by_value = {v: n for n, v in bank_values.items()}
    for name, value in names.items():
        other = by_value.get(value)
        if other is not None and other != name:
            raise HTTPException(
                status_code=400,
                detail=f"label_names: {name!r} takes value {value}, the value of the bank organ {other!r}; "
                "choose a value no bank organ uses",
            )


class EditInfer(DynamicLabels, MedLSAMInferTask):
    def __init__(self, models: Models, templates: TemplateSource, volumes: Volumes):
        from medlsam.interact.editing import EditOptions

        self.models, self.templates = models, templates
        super().__init__(
            volumes,
            InferType.DEEPEDIT,
            None,
            3,
            "Edit: foreground/background clicks per organ correct the current segmentation (a click refiner "
            "network given the image, the organ's template prior and current mask, and the clicks)",
            config={
                "method": ["refiner", "geodesic"],
                "reach_mm": EditOptions().reach_mm,
                "agnostic": list(AGNOSTIC_METHODS),
            },
        )

    def check_options(self, request: dict):
        """(EditOptions, method) of the request; 400 naming a bad one (checked before any work)."""
        from medlsam.interact.editing import EditOptions

        options = EditOptions(reach_mm=number(request, "reach_mm", EditOptions().reach_mm, float, 1.0, 100.0))
        method = request.get("method") or self.models.edit_method
        if isinstance(method, list):  # a client echoing the config's choices
            method = method[0] if method else self.models.edit_method
        if method not in ("refiner", "geodesic"):
            raise HTTPException(status_code=400, detail=f"method must be refiner or geodesic, not {method!r}")
        request_label_names(request)
        return options, method

    def agnostic_method(self, request: dict) -> str:
        """``blobs`` or ``combo``: the request's ``agnostic`` option as the spec reads it (lib/option_spec.py; the
        task checked it with every option before any work), ``auto`` (the default) resolved by the server's device
        (``--conf device``; ``medlsam.interact.edit_requests.agnostic_path``)."""
        from medlsam.interact.edit_requests import agnostic_path

        method = read(option(INFER_OPTIONS["edit"], "agnostic"), request.get("agnostic"), WHERE)
        return agnostic_path(method, self.models.device)

    def _combo(self, request: dict, entry: dict, cache, axis: int):
        """``cache.combo`` set for a ``combo`` request (kept per image with the image's slice embeddings), else
        None."""
        from medlsam.interact.click_combo import ComboCache
        from medlsam.interact.click_sam import SamCache

        if self.agnostic_method(request) != "combo":
            cache.combo = None
            return
        embeddings = self.volumes.embeddings(entry, axis)
        combo = entry.get("edit_combo")
        if combo is None or combo.sam.embeddings is not embeddings or combo.any is not cache.any:
            combo = entry["edit_combo"] = ComboCache(cache.any, SamCache(embeddings))
        cache.combo = combo

    def _bank(self):
        try:
            return self.templates.bank()
        except NoTemplatesError:
            return None, {}

    def _priors(self, entry: dict, bank, info: dict, organs: list[str]) -> dict:
        """The organs' template posteriors on this image, localised once per image and bank."""
        from medlsam.atlas.localize import Localizer

        key = (id(bank), tuple(info.get("templates", [])))
        cache = entry.setdefault("edit_priors", {})
        if cache.get("key") != key:
            cache.clear()
            cache["key"] = key
        missing = [o for o in organs if o not in cache]
        if missing:
            model, _, _ = self.models.medlam()
            located = Localizer(model, bank).localize(entry["volume"], missing, prior=True)["organs"]
            for name in missing:
                cache[name] = located[name].prior if located[name].found else None
        return {o: cache[o] for o in organs}

    def _base_label(self, request: dict, entry: dict) -> tuple[np.ndarray, str]:
        from medlsam.io.volume import read_volume

        volume = entry["volume"]
        label = request.get("label_file")  # set by the app for an uploaded label only, never from a request's text
        if label:
            try:
                array = read_volume(label).array
            except Exception as exc:  # noqa: BLE001 - an unreadable upload is the client's error
                why = str(exc).replace(label, "upload") if isinstance(exc, MedLSAMError) else type(exc).__name__
                raise HTTPException(status_code=400, detail=f"label file unreadable: {why}") from None
            if array.shape != volume.shape:
                raise HTTPException(
                    status_code=400,
                    detail=f"label of shape {list(array.shape)} for an image of shape {list(volume.shape)}",
                )
            if not np.all(np.isfinite(array)) or array.min() < 0:
                raise HTTPException(status_code=400, detail="label values must be non-negative integers")
            return array.astype(np.uint16 if array.max() > 255 else np.uint8), "request"
        auto = entry.get("auto_label")
        if auto is not None and auto.shape == volume.shape:
            return auto.copy(), "auto"
        return np.zeros(volume.shape, np.uint8), "none"

    def run(self, request: dict, entry: dict):
        from medlsam.interact.edit_requests import EditCache, edit_structures
        from medlsam.interact.editing import IntensityModel
        from medlsam.utils.metrics import cranio_caudal_axis

        tic = time.perf_counter()
        volume = entry["volume"]
        bank, info = self._bank()
        known = dict(self.labels)
        bank_values = {name: organ.value for name, organ in bank.organs.items()} if bank is not None else {}
        names = request_label_names(request)
        check_name_values(names, bank_values)
        for name, value in names.items():
            known.setdefault(name, value)
        for name, value in bank_values.items():
            known.setdefault(name, value)
        foreground, background, own_background = request_clicks(request, known, volume.shape)
        boxes = request_boxes(request, known, volume.shape)
        base, source = self._base_label(request, entry)
        clicks = self._organ_clicks(foreground, background, own_background, base, known, boxes)

        in_bank = [n for n in clicks if n in bank_values and n not in boxes]
        priors = self._priors(entry, bank, info, in_bank) if in_bank else {}
        intensities = {n: IntensityModel.from_patches(bank.organs[n].neighbourhoods) for n in in_bank}
        for name in in_bank:  # an organ absent from the current label starts from its template prior
            prior = priors.get(name)
            if prior is not None and not (base == known[name]).any():
                part = base[prior.region()]
                part[(prior.probabilities > 0.5) & (part == 0)] = known[name]
        localized = time.perf_counter()
        options, method = self.check_options(request)
        refiner = self.models.click_refiner() if method == "refiner" else None
        cache = entry.setdefault("edit_cache", EditCache())
        axis = cranio_caudal_axis(volume.affine)
        self._combo(request, entry, cache, axis)
        label, changed, computed = edit_structures(
            base,
            volume.array,
            np.asarray(volume.spacing, np.float64),
            known,
            clicks,
            agnostic={n for n in [*clicks, *boxes] if n not in bank_values},
            boxes=boxes,
            cache=cache,
            axis=axis,
            priors=priors,
            intensities=intensities,
            options=options,
            refiner=refiner,
        )
        choices = cache.combo.choices if cache.combo is not None else {}
        return label, {
            "method": "refiner" if refiner is not None else "geodesic",
            "label_names": known,
            "changed_voxels": changed,
            "computed": computed,
            "agnostic": {n: choices.get(n, "blobs") for n in changed if n not in bank_values or n in boxes},
            "start": source,
            "templates": info.get("templates", []),
            "timings_s": {"localize": round(localized - tic, 3), "edit": round(time.perf_counter() - localized, 3)},
        }

    @staticmethod
    def _organ_clicks(foreground, background, own_background, base, known, boxes) -> dict:
        """Per structure its OrganClicks: the DeepEdit ``background`` clicks go to the structure holding the voxel
        in the current label (all clicked structures where none does); 400 without any click or box."""
        from medlsam.interact.editing import OrganClicks

        clicks = {name: OrganClicks(points) for name, points in foreground.items()}
        if len(own_background):
            only = next(iter(clicks)) if clicks else next(iter(boxes), None)
            if only is None:
                raise HTTPException(status_code=400, detail="background clicks need `label`: the organ they leave")
            c = clicks.get(only, OrganClicks())
            clicks[only] = OrganClicks(c.foreground, own_background)
        by_value = {v: n for n, v in known.items()}
        for point in background:  # DeepEdit background: leave the organ holding the voxel
            holder = by_value.get(int(base[tuple(point)]))
            targets = [holder] if holder else list(dict.fromkeys([*clicks, *boxes]))
            for name in targets:
                c = clicks.get(name, OrganClicks())
                clicks[name] = OrganClicks(c.foreground, np.vstack([c.background, point[None]]))
        if not clicks and not boxes:
            raise HTTPException(
                status_code=400, detail="no clicks: give at least one foreground or background click, or a box"
            )
        return clicks
