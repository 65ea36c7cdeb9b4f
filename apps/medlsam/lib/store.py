"""Everything the app's tasks share: lazily loaded, cached models, the organ names, the template bank built
from the datastore's final labels, and an LRU cache of loaded volumes with their SAM slice embeddings.

Nothing heavy happens at construction: MONAI Label re-creates the app in every training subprocess.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from medlsam.errors import CheckpointError, MedLSAMError, TemplateError

logger = logging.getLogger(__name__)

BACKEND_DEFAULT = "lite_medsam"
LABELS_FILE = "labels.json"  # optional organ names at the datastore root: {"1": "Brainstem", ...}


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
        self.device = conf.get("device", "cpu")
        self.labels_path = conf.get("labels") or None
        self.cache_size = _conf_int(conf, "embedding_cache", 2, 1)
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
        self._bank_lock = threading.Lock()
        self._medlam = None  # (key, path, model)
        self._segmenter = None
        self._bank = None  # (key, bank, info)
        self._volumes: OrderedDict = OrderedDict()
        self._rebuild_thread: threading.Thread | None = None

    # ------------------------------------------------------------------ MedLAM
    @property
    def published_medlam(self) -> Path:
        return self.model_dir / "medlam.pt"

    @property
    def shipped_medlam(self) -> Path:
        return self.model_dir / "pretrained_medlam.pt"

    def medlam_path(self) -> Path:
        """model/medlam.pt (published by training) if present, else --conf medlam, else the shipped model."""
        candidates = [self.published_medlam]
        candidates.append(Path(self.medlam_conf) if self.medlam_conf else self.shipped_medlam)
        for path in candidates:
            if path.is_file():
                return path
        raise CheckpointError(
            f"no MedLAM weights: none of {[str(c) for c in candidates]} exists. Pass --conf medlam <checkpoint> "
            "or train one with POST /train/medlam; the app never runs with random weights")

    def medlam(self):
        """(model, path, fingerprint); reloaded when the checkpoint file changes."""
        from medlsam.network import load_medlam, model_fingerprint

        path = self.medlam_path()
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if self._medlam is None or self._medlam[0] != key:
                tic = time.perf_counter()
                model = load_medlam(path, device=self.device)
                self._medlam = (key, path, model, model_fingerprint(model))
                logger.info(f"MedLAM loaded from {path} in {time.perf_counter() - tic:.2f} s "
                            f"(fingerprint {self._medlam[3]})")
            return self._medlam[2], self._medlam[1], self._medlam[3]

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
        from medlsam.templates import read_names

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
        """Images with a final label: [{id, image, label, label_info {value: name}, ts}], ids sorted."""
        if self.datastore is None:
            return []
        out = []
        for image_id in sorted(self.datastore.get_labeled_images()):
            label = self.datastore.get_label_uri(image_id, "final")
            if not label or not os.path.exists(label):
                continue
            info = self.datastore.get_label_info(image_id, "final") or {}
            names = {}
            for item in info.get("label_info") or []:
                if isinstance(item, dict) and item.get("name") and item.get("idx") is not None:
                    name = str(item["name"])
                    if name.lower() not in ("background", "foreground_scribbles", "background_scribbles"):
                        names[int(item["idx"])] = name
            out.append({"id": image_id, "image": self.datastore.get_image_uri(image_id), "label": label,
                        "label_info": names, "ts": info.get("ts", 0)})
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
    def chosen_templates(self) -> list[dict]:
        """The newest ``templates`` labelled images (by label save time), in id order."""
        labelled = self.labelled_images()
        newest = sorted(labelled, key=lambda item: (item["ts"], item["id"]), reverse=True)[: self.max_templates]
        return sorted(newest, key=lambda item: item["id"])

    @staticmethod
    def _file_key(path: str) -> str:
        stat = os.stat(path)
        return f"{os.path.realpath(path)}:{stat.st_size}:{stat.st_mtime_ns}"

    def bank(self):
        """(TemplateBank, info) for the current templates and MedLAM; rebuilt when either changed."""
        model, model_path, fingerprint = self.medlam()
        templates = self.chosen_templates()
        if not templates:
            raise NoTemplatesError(
                "no template yet: save a final label (organ segmentation) on at least one image - e.g. segment "
                "organs in Slicer or OHIF and submit the label - then run medlsam again")
        names = self.label_names()
        key = (fingerprint, json.dumps([[t["id"], self._file_key(t["image"]), self._file_key(t["label"]),
                                          sorted(t["label_info"].items())] for t in templates]),
               json.dumps(names))
        with self._bank_lock:
            if self._bank is not None and self._bank[0] == key:
                return self._bank[1], self._bank[2]
            tic = time.perf_counter()
            bank, info = self._build_bank(model, fingerprint, templates, names)
            info.update({"medlam": str(model_path), "medlam_fingerprint": fingerprint,
                         "build_s": round(time.perf_counter() - tic, 2)})
            bank.save(self.model_dir / "templates.pt")
            _write_json_atomic(info, self.model_dir / "templates.json")
            logger.info(f"template bank: {len(info['templates'])} template(s), organs {sorted(bank.organs)}, "
                        f"{info['build_s']} s")
            self._bank = (key, bank, info)
            return bank, info

    def _template_bank(self, model, fingerprint: str, item: dict):
        """One template's bank (cached on disk per image, label and model)."""
        from medlsam.templates import build_bank, load_bank
        from medlsam.volume import read_volume

        digest = hashlib.sha1(json.dumps([fingerprint, self._file_key(item["image"]), self._file_key(item["label"]),
                                          sorted(item["label_info"].items()),
                                          sorted(self._labels_file().items())]).encode()).hexdigest()[:12]
        folder = self.model_dir / "templates"
        path = folder / f"{item['id']}-{digest}.pt"
        if path.is_file():
            try:
                return load_bank(path, model)
            except TemplateError:
                path.unlink(missing_ok=True)
        label = read_volume(item["label"])
        values = [int(v) for v in np.unique(label.array) if v != 0]
        if not values:
            raise TemplateError(f"final label of {item['id']} is empty")
        bank = build_bank(model, [item["image"]], [label], self.template_names(item, values))
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob(f"{item['id']}-*.pt"):
            old.unlink(missing_ok=True)
        bank.save(path)
        return bank

    def _build_bank(self, model, fingerprint: str, templates: list[dict], names: dict[str, int]):
        from medlsam.templates import TemplateBank

        banks, used, skipped = [], [], {}
        for item in templates:
            try:
                banks.append(self._template_bank(model, fingerprint, item))
                used.append(item["id"])
            except MedLSAMError as exc:
                logger.warning(f"template {item['id']} skipped: {exc}")
                skipped[item["id"]] = str(exc)
        if not banks:
            raise NoTemplatesError("no usable template: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
        organs = merge_organs(banks, names)
        bank = TemplateBank(organs=organs, model_fingerprint=fingerprint,
                            sources=[s for b in banks for s in b.sources])
        info = {"templates": used, "skipped": skipped,
                "organs": {n: {"value": o.value, "templates": o.count} for n, o in organs.items()}}
        return bank, info

    def rebuild_bank_in_background(self) -> None:
        """Start building the bank now (after a label save) so that the next medlsam finds it ready."""
        def run():
            try:
                self.bank()
            except Exception as exc:  # noqa: BLE001 - reported again, clearly, by the next inference
                logger.warning(f"template bank rebuild failed: {exc}")

        if self._rebuild_thread is None or not self._rebuild_thread.is_alive():
            self._rebuild_thread = threading.Thread(target=run, name="template-bank", daemon=True)
            self._rebuild_thread.start()


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
