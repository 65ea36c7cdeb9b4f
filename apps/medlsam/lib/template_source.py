"""The app's template source: the datastore's final labels -> organ names and the template bank, rebuilt in the
background when a label is saved (one build at a time, cancelled when the templates change)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lib.conf import scrub_paths
from lib.models import Models
from medlsam.atlas.bank_builder import BankBuilder, BuildCancelled, NoTemplatesError, Template, file_key
from medlsam.errors import TemplateError
from medlsam.utils.atomic import write_json_atomic
from medlsam.utils.names import is_plain_name

logger = logging.getLogger(__name__)

LABELS_FILE = "labels.json"  # optional organ names at the datastore root: {"1": "Brainstem", ...}


class TemplateSource:
    """Organ names and the template bank of a datastore (``datastore()`` gives it: MONAI Label creates it after
    the task configs), for the current MedLAM."""

    def __init__(
        self,
        models: Models,
        model_dir: str | Path,
        datastore: Callable,
        max_templates: int,
        labels_path: str | None = None,
    ):
        self.models, self.model_dir, self._datastore = models, Path(model_dir), datastore
        self.max_templates, self.labels_path = max_templates, labels_path
        self._lock = threading.RLock()
        self._bank = None  # (key, bank, info)
        self._build: _Build | None = None  # the bank build in progress
        self._builder: BankBuilder | None = None  # for the current MedLAM: caches templates' banks and refusals
        self._all_labels = None  # (key, bank of every labelled image, uncalibrated) for the learned network
        self._unreadable: dict[str, str] = {}  # image id -> why its final label could not be read (shown in /info/)
        self._progress: dict = {"state": "not built"}  # what /info/ reports (template_bank)

    def progress(self) -> dict:
        """The bank build's state for /info/: not built | building (built k of N; then its prior cuts) | ready | failed
        (why); ``skipped`` also names the final labels that cannot be read now (they never reach a build)."""
        with self._lock:
            progress = dict(self._progress)
            if progress.get("state") == "ready" and self._unreadable:
                unreadable = {i: f"final label unreadable: {why}" for i, why in self._unreadable.items()}
                progress["skipped"] = {**unreadable, **progress.get("skipped", {})}
            return progress

    def _report(self, **fields) -> None:
        with self._lock:
            self._progress = fields

    @property
    def datastore(self):
        return self._datastore()

    # ------------------------------------------------------------------ organ names
    def _labels_file(self) -> dict[int, str]:
        from medlsam.utils.names import read_names

        paths = [Path(self.labels_path)] if self.labels_path else []
        studies = getattr(self.datastore, "_datastore_path", None)
        if studies:
            paths.append(Path(studies) / LABELS_FILE)
        for path in paths:
            if path.is_file():
                try:
                    return read_names(path)
                except (ValueError, OSError, json.JSONDecodeError) as exc:
                    raise TemplateError(f'{path}: not a labels file {{"1": "Organ", ...}} ({exc})') from None
        return {}

    def labelled_images(self) -> list[dict]:
        """Images with a final label: [{id, image, label, label_info {value: name}, ts}], ids sorted.
        Never raises: a malformed entry is skipped with a warning (a label can never break /info/)."""
        if self.datastore is None:
            return []
        out, unreadable = [], {}
        for image_id in sorted(self.datastore.get_labeled_images()):
            try:
                label = self.datastore.get_label_uri(image_id, "final")
                if not label or not os.path.exists(label):
                    continue
                info = self.datastore.get_label_info(image_id, "final") or {}
                out.append(
                    {
                        "id": image_id,
                        "image": self.datastore.get_image_uri(image_id),
                        "label": label,
                        "label_info": _label_names(info.get("label_info")),
                        "ts": _number(info.get("ts")),
                    }
                )
            except Exception as exc:  # noqa: BLE001 - one bad entry must not hide the others
                logger.warning(f"final label of {image_id} ignored: {exc}")
                unreadable[image_id] = scrub_paths(str(getattr(exc, "detail", exc)))[:300]
        with self._lock:
            self._unreadable = unreadable
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

    def template(self, item: dict) -> Template:
        """One labelled image as a template: its label's names (label_info first, then the labels file; a value
        named by neither becomes ``label_N``)."""
        return Template(item["id"], item["image"], item["label"], {**self._labels_file(), **item["label_info"]})

    def builder(self, model) -> BankBuilder:
        """The bank builder of ``model`` (one per MedLAM: its per-template banks kept under model/templates/)."""
        with self._lock:
            if self._builder is None or self._builder.model is not model:
                self._builder = BankBuilder(model, self.model_dir / "templates", progress=self._report)
            return self._builder

    def template_bank(self, item: dict):
        """One labelled image's template bank for the current MedLAM (cached; TemplateError when unusable)."""
        return self.builder(self.models.medlam()[0]).template_bank(self.template(item))

    # ------------------------------------------------------------------ template bank
    def candidate_templates(self) -> list[dict]:
        """All labelled images, newest label first: the bank takes the first ``templates`` usable ones."""
        return sorted(self.labelled_images(), key=lambda item: (item["ts"], item["id"]), reverse=True)

    def bank(self):
        """(TemplateBank, info) for the current templates and MedLAM; rebuilt when either changed.

        One build runs at a time, outside the store's lock; a request needing another bank (a label was saved
        or deleted meanwhile) cancels it between templates and starts its own."""
        while True:
            model, model_path, fingerprint = self.models.medlam()
            candidates = self.candidate_templates()
            if not candidates:
                self._report(state="no templates")
                raise NoTemplatesError(
                    "no template yet: save a final label (organ segmentation) on at least one image - e.g. segment "
                    "organs in Slicer or OHIF and submit the label - then run medlsam again"
                )
            names = self.label_names(candidates)
            key = self._key(fingerprint, candidates, names)
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

    def _key(self, fingerprint: str, candidates: list[dict], names: dict[str, int]) -> tuple:
        """What a bank depends on: the MedLAM, every labelled image and label (file versions, names)."""
        files = [
            [t["id"], file_key(t["image"]), file_key(t["label"]), sorted(t["label_info"].items())] for t in candidates
        ]
        return fingerprint, json.dumps(files), json.dumps(names)

    def all_labels_bank(self):
        """The uncalibrated bank of every usable labelled image (no ``templates`` limit, every prior cut 0.5): the
        prior the learned segmentation network takes as input (``medlsam.learn``). Built from the per-template
        banks the template bank keeps, cached until the labels or the MedLAM change."""
        model, _, fingerprint = self.models.medlam()
        candidates = self.candidate_templates()
        names = self.label_names(candidates)
        key = self._key(fingerprint, candidates, names)
        with self._lock:
            if self._all_labels is not None and self._all_labels[0] == key:
                return self._all_labels[1]
        templates = [self.template(item) for item in candidates]
        bank = self.builder(model).build(templates, names, skip_unusable=True, calibrate=False, report=False).bank
        with self._lock:
            self._all_labels = (key, bank)
        return bank

    def _run_build(
        self, build: "_Build", model, model_path: Path, fingerprint: str, candidates: list[dict], names: dict[str, int]
    ) -> None:
        tic = time.perf_counter()
        of = min(self.max_templates, len(candidates))
        logger.info(f"template bank: building from {of} of {len(candidates)} labelled image(s)")
        self._report(state="building", built=0, of=of)
        try:
            bank, info = self._build_bank(model, candidates, names, build.cancel)
            info.update(
                {
                    "medlam": model_path.name,
                    "medlam_fingerprint": fingerprint,
                    "build_s": round(time.perf_counter() - tic, 2),
                }
            )
            bank.save(self.model_dir / "templates.pt")
            write_json_atomic(info, self.model_dir / "templates.json")
            logger.info(
                f"template bank: {len(info['templates'])} template(s) {info['templates']}, organs "
                f"{sorted(bank.organs)}, {info['build_s']} s"
            )
            build.result = (bank, info)
            with self._lock:
                self._bank = (build.key, bank, info)
            self._report(
                state="ready",
                templates=info["templates"],
                organs=sorted(bank.organs),
                build_s=info["build_s"],
                skipped=info["skipped"],
            )
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting request
            build.error = exc
            if isinstance(exc, BuildCancelled):
                logger.info("template bank: build cancelled (the templates changed)")
            else:
                self._report(state="failed", error=scrub_paths(str(exc))[:300])
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

    def _build_bank(self, model, candidates: list[dict], names: dict[str, int], cancel: threading.Event):
        """The bank of the newest ``templates`` usable candidates (unusable ones skipped and reported)."""
        with self._lock:
            skipped = {image_id: f"final label unreadable: {why}" for image_id, why in self._unreadable.items()}
        templates = [self.template(item) for item in candidates]
        try:
            built = self.builder(model).build(templates, names, self.max_templates, cancel, skip_unusable=True)
        except NoTemplatesError as exc:
            raise NoTemplatesError(scrub_paths(str(exc))) from None
        skipped.update({image_id: scrub_paths(why) for image_id, why in built.skipped.items()})
        bank = built.bank
        info = {
            "templates": sorted(built.used),
            "skipped": skipped,
            "organs": {
                n: {"value": o.value, "templates": o.count, "prior_cut": o.prior_cut} for n, o in bank.organs.items()
            },
        }
        return bank, info

    def rebuild_in_background(self) -> None:
        """Start building the bank now (after a label change) so that the next medlsam finds it ready; a build
        for outdated templates is cancelled."""

        def run():
            try:
                self.bank()
            except Exception as exc:  # noqa: BLE001 - reported again, clearly, by the next inference
                logger.warning(f"template bank rebuild failed: {scrub_paths(str(exc))}")

        threading.Thread(target=run, name="template-bank", daemon=True).start()


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
        if not is_plain_name(name):  # saved before names were checked: never shown to a client
            logger.warning(f"label_info name {name[:40]!r} ignored: not plain text")
            continue
        if value > 0 and name.lower() not in ("background", "foreground_scribbles", "background_scribbles"):
            names.setdefault(value, name)
    return names


def _number(value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    return number if np.isfinite(number) else 0.0
