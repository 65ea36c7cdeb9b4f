"""Everything the app's tasks share: lazily loaded, cached models, the organ names, the template bank built
from the datastore's final labels, and an LRU cache of loaded volumes with their SAM slice embeddings.

Nothing heavy happens at construction: MONAI Label re-creates the app in every training subprocess.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from medlsam.devices import check_device
from medlsam.errors import CheckpointError, MedLSAMError, TemplateError

logger = logging.getLogger(__name__)

BACKEND_DEFAULT = "lite_medsam"
LABELS_FILE = "labels.json"  # optional organ names at the datastore root: {"1": "Brainstem", ...}
MAX_WAITING = 16  # inference requests waiting for a slot; more are refused (429)
SLOT_TIMEOUT_S = 600
MAX_TEMPLATE_ORGANS = 64  # organs of one template (bounds a bank build; the datastore refuses more at save)
MAX_ORGAN_FRACTION = 0.5  # one organ covers at most this fraction of its scan


class NoTemplatesError(TemplateError):
    """The datastore has no image with a usable final label yet."""


def _conf_int(conf: dict, key: str, default: int, minimum: int) -> int:
    try:
        value = int(conf.get(key, default))
    except (TypeError, ValueError):
        raise MedLSAMError(f"--conf {key} must be an integer, not {conf.get(key)!r}") from None
    if value < minimum:
        raise MedLSAMError(f"--conf {key} must be at least {minimum}, not {value}")
    return value


class ModelStore:
    """Shared, thread-safe state of one app instance."""

    def __init__(self, app_dir: str, model_dir: str, conf: dict):
        self.app_dir, self.model_dir = Path(app_dir), Path(model_dir)
        conf = conf or {}
        self.backend = conf.get("backend", BACKEND_DEFAULT)
        self.checkpoint = conf.get("checkpoint") or None
        self.medlam_conf = conf.get("medlam") or None
        self.mode = conf.get("mode", "prior")
        self.max_templates = _conf_int(conf, "templates", 5, 1)
        self.device = check_device(conf.get("device", "cpu"))  # cpu, cuda, cuda:N: a clear error if absent
        self.labels_path = conf.get("labels") or None
        self.cache_size = _conf_int(conf, "embedding_cache", 2, 1)
        self.infer_concurrency = _conf_int(conf, "infer_concurrency", 2, 1)
        self._slots = threading.BoundedSemaphore(self.infer_concurrency)
        self._waiting = 0
        compile_conf = str(conf.get("compile", "false")).strip().lower()
        if compile_conf not in ("true", "false", "1", "0", "yes", "no"):
            raise MedLSAMError(f"--conf compile must be true or false, not {conf.get('compile')!r}")
        self.compile = compile_conf in ("true", "1", "yes")  # torch.compile of the SAM encoder
        threads = _conf_int(conf, "threads", 0, 0)
        if threads > 0:
            torch.set_num_threads(threads)
        from medlsam.pipeline import MODES

        if self.mode not in MODES:
            raise MedLSAMError(f"--conf mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        self.datastore = None  # set by the app once its datastore exists
        self._lock = threading.RLock()
        self._medlam = None  # (key, path, model)
        self._segmenter = None
        self._bank = None  # (key, bank, info)
        self._volumes: OrderedDict = OrderedDict()
        self._build: _Build | None = None  # the bank build in progress
        self._unusable: dict[str, str] = {}  # template digest -> why it cannot serve

    # ------------------------------------------------------------------ MedLAM
    @property
    def published_medlam(self) -> Path:
        return self.model_dir / "medlam.pt"

    @property
    def shipped_medlam(self) -> Path:
        return self.model_dir / "pretrained_medlam.pt"

    def _medlam_candidates(self) -> list[Path]:
        return [self.published_medlam, Path(self.medlam_conf) if self.medlam_conf else self.shipped_medlam]

    def medlam_path(self) -> Path:
        """model/medlam.pt (published by training) if it loads, else --conf medlam, else the shipped model."""
        return self.medlam()[1]

    def medlam(self):
        """(model, path, fingerprint); reloaded when the checkpoint file changes. A published model that cannot
        be loaded is set aside (model/medlam.pt.rejected) and the next candidate serves."""
        from medlsam.network import load_medlam, model_fingerprint

        with self._lock:
            for path in self._medlam_candidates():
                if not path.is_file():
                    continue
                stat = path.stat()
                key = (str(path), stat.st_mtime_ns, stat.st_size)
                if self._medlam is not None and self._medlam[0] == key:
                    return self._medlam[2], self._medlam[1], self._medlam[3]
                tic = time.perf_counter()
                try:
                    model = load_medlam(path, device=self.device)
                except CheckpointError as exc:
                    if path != self.published_medlam:
                        raise
                    self._set_aside(path, exc)
                    continue
                self._medlam = (key, path, model, model_fingerprint(model))
                logger.info(f"MedLAM loaded from {path.name} in {time.perf_counter() - tic:.2f} s "
                            f"(fingerprint {self._medlam[3]})")
                return model, path, self._medlam[3]
        raise CheckpointError(
            f"no MedLAM weights: none of {[c.name for c in self._medlam_candidates()]} is usable. Pass --conf medlam "
            "<checkpoint> or train one with POST /train/medlam; the app never runs with random weights")

    @staticmethod
    def _set_aside(path: Path, exc: Exception) -> None:
        aside = path.with_name(path.name + ".rejected")
        try:
            os.replace(path, aside)
        except OSError as error:
            logger.error(f"published MedLAM {path.name} cannot be loaded and cannot be set aside ({error}): {exc}")
            return
        logger.error(f"published MedLAM {path.name} cannot be loaded ({exc}); set aside as {aside.name}, "
                     "the shipped/configured MedLAM serves instead")

    # ------------------------------------------------------------------ SAM
    def segmenter(self):
        from medlsam.sam import build_segmenter

        with self._lock:
            if self._segmenter is None:
                if self.backend != BACKEND_DEFAULT and not self.checkpoint:
                    raise CheckpointError(
                        f"backend {self.backend} needs its weights: start the server with --conf checkpoint "
                        f"<path to the {self.backend} checkpoint> (only lite_medsam has bundled weights)")
                tic = time.perf_counter()
                self._segmenter = build_segmenter(self.backend, self.checkpoint, self.device, compile=self.compile)
                logger.info(f"segmenter {self.backend} built in {time.perf_counter() - tic:.2f} s")
            return self._segmenter

    # ------------------------------------------------------------------ inference slots
    @contextlib.contextmanager
    def infer_slot(self):
        """At most ``infer_concurrency`` inferences run at once (each in a server worker thread, never on the event
        loop); up to MAX_WAITING more wait, beyond that a request is refused with 429."""
        from fastapi import HTTPException

        with self._lock:
            if self._waiting >= MAX_WAITING:
                raise HTTPException(status_code=429, detail=f"server busy: {self._waiting} inferences waiting; "
                                                            "try again shortly")
            self._waiting += 1
        try:
            acquired = self._slots.acquire(timeout=SLOT_TIMEOUT_S)
        finally:
            with self._lock:
                self._waiting -= 1
        if not acquired:
            raise HTTPException(status_code=503, detail=f"server busy: no inference slot within {SLOT_TIMEOUT_S} s")
        try:
            yield
        finally:
            self._slots.release()

    # ------------------------------------------------------------------ volumes and embeddings
    def volume_entry(self, path: str) -> dict:
        """The loaded CT of ``path`` and its slice embeddings per axis (LRU over images)."""
        from medlsam.volume import load_ct

        stat = os.stat(path)
        key = (os.path.realpath(path), stat.st_mtime_ns, stat.st_size)
        with self._lock:
            entry = self._volumes.get(key)
            if entry is not None:
                self._volumes.move_to_end(key)
                return entry
        volume = load_ct(path)
        with self._lock:
            entry = self._volumes.setdefault(key, {"volume": volume, "embeddings": {}, "lock": threading.Lock()})
            self._volumes.move_to_end(key)
            while len(self._volumes) > self.cache_size:
                self._volumes.popitem(last=False)
            return entry

    def embeddings(self, entry: dict, axis: int | None = None):
        """The SliceEmbeddings of a cached volume along ``axis`` (default: cranio-caudal)."""
        from medlsam.metrics import cranio_caudal_axis
        from medlsam.sam.slices import SliceEmbeddings

        volume = entry["volume"]
        axis = cranio_caudal_axis(volume.affine) if axis is None else int(axis)
        segmenter = self.segmenter()
        with self._lock:
            key = (segmenter.name, axis)
            if key not in entry["embeddings"]:
                entry["embeddings"][key] = SliceEmbeddings(segmenter, volume, axis=axis)
            return entry["embeddings"][key]

    # ------------------------------------------------------------------ organ names
    def _labels_file(self) -> dict[int, str]:
        from medlsam.names import read_names

        paths = [Path(self.labels_path)] if self.labels_path else []
        studies = getattr(self.datastore, "_datastore_path", None)
        if studies:
            paths.append(Path(studies) / LABELS_FILE)
        for path in paths:
            if path.is_file():
                try:
                    return read_names(path)
                except (ValueError, OSError, json.JSONDecodeError) as exc:
                    raise TemplateError(f"{path}: not a labels file {{\"1\": \"Organ\", ...}} ({exc})") from None
        return {}

    def labelled_images(self) -> list[dict]:
        """Images with a final label: [{id, image, label, label_info {value: name}, ts}], ids sorted.
        Never raises: a malformed entry is skipped with a warning (a label can never break /info/)."""
        if self.datastore is None:
            return []
        out = []
        for image_id in sorted(self.datastore.get_labeled_images()):
            try:
                label = self.datastore.get_label_uri(image_id, "final")
                if not label or not os.path.exists(label):
                    continue
                info = self.datastore.get_label_info(image_id, "final") or {}
                out.append({"id": image_id, "image": self.datastore.get_image_uri(image_id), "label": label,
                            "label_info": _label_names(info.get("label_info")), "ts": _number(info.get("ts"))})
            except Exception as exc:  # noqa: BLE001 - one bad entry must not hide the others
                logger.warning(f"final label of {image_id} ignored: {exc}")
        return out

    def label_names(self, labelled: list[dict] | None = None) -> dict[str, int]:
        """{organ name: output value}: the labels file first, then names from saved label_info."""
        registry = {name: value for value, name in sorted(self._labels_file().items())}
        used = set(registry.values())
        for item in labelled if labelled is not None else self.labelled_images():
            for idx, name in sorted(item["label_info"].items()):
                if name in registry:
                    continue
                value = idx if idx not in used and idx > 0 else max(used | {0}) + 1
                registry[name] = value
                used.add(value)
        return dict(sorted(registry.items(), key=lambda kv: kv[1]))

    def template_names(self, item: dict, values: list[int]) -> dict[int, str]:
        """value -> organ name for the values present in one template's label."""
        file_names = self._labels_file()
        return {v: item["label_info"].get(v) or file_names.get(v) or f"label_{v}" for v in values}

    # ------------------------------------------------------------------ template bank
    def candidate_templates(self) -> list[dict]:
        """All labelled images, newest label first: the bank takes the first ``templates`` usable ones."""
        return sorted(self.labelled_images(), key=lambda item: (item["ts"], item["id"]), reverse=True)

    @staticmethod
    def _file_key(path: str) -> str:
        stat = os.stat(path)
        return f"{os.path.realpath(path)}:{stat.st_size}:{stat.st_mtime_ns}"

    def bank(self):
        """(TemplateBank, info) for the current templates and MedLAM; rebuilt when either changed.

        One build runs at a time, outside the store's lock; a request needing another bank (a label was saved
        or deleted meanwhile) cancels it between templates and starts its own."""
        while True:
            model, model_path, fingerprint = self.medlam()
            candidates = self.candidate_templates()
            if not candidates:
                raise NoTemplatesError(
                    "no template yet: save a final label (organ segmentation) on at least one image - e.g. segment "
                    "organs in Slicer or OHIF and submit the label - then run medlsam again")
            names = self.label_names(candidates)
            key = (fingerprint, json.dumps([[t["id"], self._file_key(t["image"]), self._file_key(t["label"]),
                                              sorted(t["label_info"].items())] for t in candidates]),
                   json.dumps(names))
            with self._lock:
                if self._bank is not None and self._bank[0] == key:
                    return self._bank[1], self._bank[2]
                build = self._build
                owner = build is None or build.key != key
                if owner:
                    if build is not None:
                        build.cancel.set()
                    build = self._build = _Build(key)
            if owner:
                self._run_build(build, model, model_path, fingerprint, candidates, names)
            else:
                build.done.wait()
            if isinstance(build.error, BuildCancelled):
                continue  # the templates changed meanwhile: build for the current ones
            if build.error is not None:
                raise build.error
            return build.result

    def _run_build(self, build: "_Build", model, model_path: Path, fingerprint: str, candidates: list[dict],
                   names: dict[str, int]) -> None:
        tic = time.perf_counter()
        try:
            bank, info = self._build_bank(model, fingerprint, candidates, names, build.cancel)
            info.update({"medlam": model_path.name, "medlam_fingerprint": fingerprint,
                         "build_s": round(time.perf_counter() - tic, 2)})
            bank.save(self.model_dir / "templates.pt")
            _write_json_atomic(info, self.model_dir / "templates.json")
            logger.info(f"template bank: {len(info['templates'])} template(s) {info['templates']}, organs "
                        f"{sorted(bank.organs)}, {info['build_s']} s")
            build.result = (bank, info)
            with self._lock:
                self._bank = (build.key, bank, info)
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting request
            build.error = exc
            if isinstance(exc, BuildCancelled):
                logger.info("template bank: build cancelled (the templates changed)")
        finally:
            with self._lock:
                if self._build is build:
                    self._build = None
            build.done.set()

    def cancel_build(self) -> None:
        """Stop the running bank build at the next template (the server is stopping or the labels changed)."""
        with self._lock:
            if self._build is not None:
                self._build.cancel.set()

    def _template_bank(self, model, fingerprint: str, item: dict):
        """One template's bank (cached on disk per image, label and model; refusals cached in memory)."""
        from medlsam.templates import build_bank, load_bank
        from medlsam.volume import read_volume

        digest = hashlib.sha1(json.dumps([fingerprint, self._file_key(item["image"]), self._file_key(item["label"]),
                                          sorted(item["label_info"].items()),
                                          sorted(self._labels_file().items())]).encode()).hexdigest()[:12]
        if digest in self._unusable:
            raise TemplateError(self._unusable[digest])
        folder = self.model_dir / "templates"
        path = folder / f"{item['id']}-{digest}.pt"
        if path.is_file():
            try:
                return load_bank(path, model)
            except TemplateError:
                path.unlink(missing_ok=True)
        try:
            label = read_volume(item["label"])
            size = _image_size(item["image"])
            if label.shape != size:
                raise TemplateError(f"final label of {item['id']} has shape {list(label.shape)}, its image "
                                    f"{list(size)}")
            values, counts = np.unique(label.array, return_counts=True)
            organs = {int(v): int(c) for v, c in zip(values, counts) if v != 0}
            if not organs:
                raise TemplateError(f"final label of {item['id']} is empty")
            if len(organs) > MAX_TEMPLATE_ORGANS:
                raise TemplateError(f"final label of {item['id']} has {len(organs)} values (at most "
                                    f"{MAX_TEMPLATE_ORGANS} organs)")
            big = [v for v, c in organs.items() if c > MAX_ORGAN_FRACTION * label.array.size]
            if big:
                raise TemplateError(f"final label of {item['id']}: value(s) {big} cover over "
                                    f"{MAX_ORGAN_FRACTION:.0%} of the scan")
            bank = build_bank(model, [item["image"]], [label], self.template_names(item, sorted(organs)))
        except MedLSAMError as exc:
            self._unusable[digest] = str(exc)
            raise
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob(f"{item['id']}-*.pt"):
            old.unlink(missing_ok=True)
        bank.save(path)
        return bank

    def _build_bank(self, model, fingerprint: str, candidates: list[dict], names: dict[str, int],
                    cancel: threading.Event | None = None):
        """The bank of the newest ``templates`` usable candidates (unusable ones are skipped and reported)."""
        from medlsam.templates import TemplateBank

        banks, used, skipped = [], [], {}
        for item in candidates:
            if len(banks) >= self.max_templates:
                break
            if cancel is not None and cancel.is_set():
                raise BuildCancelled()
            tic = time.perf_counter()
            try:
                banks.append(self._template_bank(model, fingerprint, item))
                used.append(item["id"])
                logger.info(f"template bank: building {len(banks)}/{self.max_templates} ({item['id']}) ... "
                            f"{time.perf_counter() - tic:.1f} s")
            except Exception as exc:  # noqa: BLE001 - a bad template is skipped, never fatal
                if not isinstance(exc, MedLSAMError):
                    exc = TemplateError(f"{item['id']}: unusable template ({type(exc).__name__}: {exc})")
                logger.warning(f"template {item['id']} skipped: {exc}")
                skipped[item["id"]] = _scrub(str(exc))
        if not banks:
            raise NoTemplatesError("no usable template: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
        organs = merge_organs(banks, names)
        bank = TemplateBank(organs=organs, model_fingerprint=fingerprint,
                            sources=[s for b in banks for s in b.sources])
        info = {"templates": sorted(used), "skipped": skipped,
                "organs": {n: {"value": o.value, "templates": o.count} for n, o in organs.items()}}
        return bank, info

    def rebuild_bank_in_background(self) -> None:
        """Start building the bank now (after a label change) so that the next medlsam finds it ready; a build
        for outdated templates is cancelled."""
        def run():
            try:
                self.bank()
            except Exception as exc:  # noqa: BLE001 - reported again, clearly, by the next inference
                logger.warning(f"template bank rebuild failed: {_scrub(str(exc))}")

        threading.Thread(target=run, name="template-bank", daemon=True).start()


class BuildCancelled(TemplateError):
    """A bank build stopped because the templates changed."""


class _Build:
    """One bank build: its key, a cancel flag, and its outcome for the requests waiting on it."""

    def __init__(self, key):
        self.key = key
        self.cancel = threading.Event()
        self.done = threading.Event()
        self.result = None
        self.error: BaseException | None = None


def _label_names(label_info) -> dict[int, str]:
    """{value: name} from a saved label_info; malformed entries are skipped."""
    names = {}
    for item in label_info if isinstance(label_info, list) else []:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"].strip():
            continue
        try:
            value = int(item.get("idx"))
        except (TypeError, ValueError, OverflowError):
            logger.debug(f"label_info entry {item!r} ignored: idx is not an integer")
            continue
        name = item["name"].strip()
        if value > 0 and name.lower() not in ("background", "foreground_scribbles", "background_scribbles"):
            names.setdefault(value, name)
    return names


def _image_size(path: str) -> tuple[int, ...]:
    """The voxel shape of an image file from its header (file order, as read_volume's arrays)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise TemplateError(f"{Path(path).name}: cannot be read as an image") from None
    return tuple(int(s) for s in reader.GetSize())[:3]


def _number(value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    return number if np.isfinite(number) else 0.0


def _scrub(text: str) -> str:
    """Absolute server paths in a message reduced to their file names."""
    return re.sub(r"(?:/[^/\s'\",;:()\[\]]+)+/([^/\s'\",;:()\[\]]+)", r"\1", text)


def merge_organs(banks: list, names: dict[str, int]) -> dict:
    """Average single-template banks organ by organ (weighted by their template counts; the per-template
    intensity neighbourhoods are pooled), giving each organ its output value from ``names`` (organs in no
    template are simply absent)."""
    from medlsam.templates import OrganTemplate

    merged = {}
    for name in sorted({n for b in banks for n in b.organs}):
        parts = [b.organs[name] for b in banks if name in b.organs]
        roles = [r for r in parts[0].roles if all(r in p.roles for p in parts)]
        weights = torch.tensor([float(p.count) for p in parts])
        total = float(weights.sum())

        def avg(get):
            return sum(get(p) * (p.count / total) for p in parts)

        pick = lambda p, t: t[[p.roles.index(r) for r in roles]]  # noqa: E731
        merged[name] = OrganTemplate(
            value=int(names.get(name, parts[0].value)), roles=roles,
            latent=avg(lambda p: pick(p, p.latent)), offset=avg(lambda p: pick(p, p.offset)),
            kernels=[avg(lambda p, s=s: pick(p, p.kernels[s])) for s in range(len(parts[0].kernels))],
            count=int(total), size_mm=np.round(sum(np.array(p.size_mm) * p.count for p in parts) / total, 1).tolist(),
            **({"neighbourhoods": [n for p in parts for n in p.neighbourhoods]}
               if hasattr(parts[0], "neighbourhoods") else {}))
    return merged


def _write_json_atomic(data: dict, path: Path) -> None:
    from medlsam.training import write_json_atomic

    write_json_atomic(data, path)
