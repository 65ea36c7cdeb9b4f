"""The app's template source: the datastore's final labels -> organ names and the template bank, rebuilt in the
background when a label is saved (one build at a time, cancelled when the templates change)."""

from __future__ import annotations

import hashlib
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
from medlsam.errors import MedLSAMError, TemplateError
from medlsam.utils.atomic import write_json_atomic
from medlsam.utils.names import is_plain_name

logger = logging.getLogger(__name__)

LABELS_FILE = "labels.json"  # optional organ names at the datastore root: {"1": "Brainstem", ...}
MAX_TEMPLATE_ORGANS = 64  # organs of one template (bounds a bank build; the datastore refuses more at save)
MAX_ORGAN_FRACTION = 0.5  # one organ covers at most this fraction of its scan


class NoTemplatesError(TemplateError):
    """The datastore has no image with a usable final label yet."""


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
        self._unusable: dict[str, str] = {}  # template digest -> why it cannot serve
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
            model, model_path, fingerprint = self.models.medlam()
            candidates = self.candidate_templates()
            if not candidates:
                self._report(state="no templates")
                raise NoTemplatesError(
                    "no template yet: save a final label (organ segmentation) on at least one image - e.g. segment "
                    "organs in Slicer or OHIF and submit the label - then run medlsam again"
                )
            names = self.label_names(candidates)
            key = (
                fingerprint,
                json.dumps(
                    [
                        [
                            t["id"],
                            self._file_key(t["image"]),
                            self._file_key(t["label"]),
                            sorted(t["label_info"].items()),
                        ]
                        for t in candidates
                    ]
                ),
                json.dumps(names),
            )
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

    def _run_build(
        self, build: "_Build", model, model_path: Path, fingerprint: str, candidates: list[dict], names: dict[str, int]
    ) -> None:
        tic = time.perf_counter()
        of = min(self.max_templates, len(candidates))
        logger.info(f"template bank: building from {of} of {len(candidates)} labelled image(s)")
        self._report(state="building", built=0, of=of)
        try:
            bank, info = self._build_bank(model, fingerprint, candidates, names, build.cancel)
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

    def _template_digest(self, fingerprint: str, item: dict) -> str:
        """What one template's bank depends on: the model, the image, the label and its names."""
        return hashlib.sha1(
            json.dumps(
                [
                    fingerprint,
                    self._file_key(item["image"]),
                    self._file_key(item["label"]),
                    sorted(item["label_info"].items()),
                    sorted(self._labels_file().items()),
                ]
            ).encode()
        ).hexdigest()[:12]

    def _template_bank(self, model, fingerprint: str, item: dict):
        """One template's bank (cached on disk per image, label and model; refusals cached in memory)."""
        from medlsam.atlas.templates import build_bank, load_bank
        from medlsam.io.volume import read_volume

        digest = self._template_digest(fingerprint, item)
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
                raise TemplateError(
                    f"final label of {item['id']} has shape {list(label.shape)}, its image {list(size)}"
                )
            values, counts = np.unique(label.array, return_counts=True)
            organs = {int(v): int(c) for v, c in zip(values, counts) if v != 0}
            if not organs:
                raise TemplateError(f"final label of {item['id']} is empty")
            if len(organs) > MAX_TEMPLATE_ORGANS:
                raise TemplateError(
                    f"final label of {item['id']} has {len(organs)} values (at most {MAX_TEMPLATE_ORGANS} organs)"
                )
            big = [v for v, c in organs.items() if c > MAX_ORGAN_FRACTION * label.array.size]
            if big:
                raise TemplateError(
                    f"final label of {item['id']}: value(s) {big} cover over {MAX_ORGAN_FRACTION:.0%} of the scan"
                )
            names = self.template_names(item, sorted(organs))
            bank = build_bank(model, [item["image"]], [label], names, calibrate=False)
        except MedLSAMError as exc:
            self._unusable[digest] = str(exc)
            raise
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob(f"{item['id']}-*.pt"):
            old.unlink(missing_ok=True)
        bank.save(path)
        return bank

    def _build_bank(
        self,
        model,
        fingerprint: str,
        candidates: list[dict],
        names: dict[str, int],
        cancel: threading.Event | None = None,
    ):
        """The bank of the newest ``templates`` usable candidates (unusable ones are skipped and reported)."""
        from medlsam.atlas.calibration import with_cuts
        from medlsam.atlas.templates import merge_banks

        banks, used = [], []
        with self._lock:
            skipped = {image_id: f"final label unreadable: {why}" for image_id, why in self._unreadable.items()}
        by_id = {item["id"]: item for item in candidates}
        for item in candidates:
            if len(banks) >= self.max_templates:
                break
            if cancel is not None and cancel.is_set():
                raise BuildCancelled()
            tic = time.perf_counter()
            try:
                banks.append(self._template_bank(model, fingerprint, item))
                used.append(item["id"])
                of = min(self.max_templates, len(candidates))
                self._report(state="building", built=len(banks), of=of, last=item["id"])
                logger.info(
                    f"template bank: built {len(banks)}/{of} ({item['id']}) in {time.perf_counter() - tic:.1f} s"
                )
            except Exception as exc:  # noqa: BLE001 - a bad template is skipped, never fatal
                if not isinstance(exc, MedLSAMError):
                    exc = TemplateError(f"{item['id']}: unusable template ({type(exc).__name__}: {exc})")
                logger.warning(f"template {item['id']} skipped: {exc}")
                skipped[item["id"]] = scrub_paths(str(exc))
        if not banks:
            raise NoTemplatesError("no usable template: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
        bank = merge_banks(banks, names)
        with_cuts(bank, self._prior_cuts(model, fingerprint, [by_id[i] for i in used], banks, cancel))
        info = {
            "templates": sorted(used),
            "skipped": skipped,
            "organs": {
                n: {"value": o.value, "templates": o.count, "prior_cut": o.prior_cut} for n, o in bank.organs.items()
            },
        }
        return bank, info

    def _prior_cuts(
        self, model, fingerprint: str, items: list[dict], banks: list, cancel: threading.Event | None
    ) -> dict[str, float]:
        """Each organ's prior cut chosen by leaving one template out (``medlsam.atlas.calibration``), kept on disk per
        set of templates; {} (every organ cut at 0.5) when it cannot be chosen."""
        from medlsam.atlas.calibration import CalibrationCancelled, prior_cuts

        digest = hashlib.sha1(json.dumps([self._template_digest(fingerprint, i) for i in items]).encode()).hexdigest()
        path = self.model_dir / "templates" / f"prior-cuts-{digest[:12]}.json"
        if path.is_file():
            try:
                kept = {str(k): float(v) for k, v in json.loads(path.read_text()).items()}
                if all(0.0 < v < 1.0 for v in kept.values()):
                    return kept
            except (ValueError, AttributeError):
                pass
            path.unlink(missing_ok=True)  # unreadable or out of range: chosen again
        tic = time.perf_counter()
        self._report(state="building", built=len(banks), of=len(banks), step="prior cuts (templates held out)")
        try:
            cuts = prior_cuts(model, banks, [i["image"] for i in items], [i["label"] for i in items], cancel)
        except CalibrationCancelled:
            raise BuildCancelled() from None
        except Exception as exc:  # noqa: BLE001 - an uncalibrated prior still serves
            logger.warning(f"template bank: prior cuts not chosen, every organ cut at 0.5: {scrub_paths(str(exc))}")
            return {}
        for old in path.parent.glob("prior-cuts-*.json"):
            old.unlink(missing_ok=True)
        write_json_atomic(cuts, path)
        logger.info(f"template bank: prior cuts {cuts} chosen in {time.perf_counter() - tic:.1f} s")
        return cuts

    def rebuild_in_background(self) -> None:
        """Start building the bank now (after a label change) so that the next medlsam finds it ready; a build
        for outdated templates is cancelled."""

        def run():
            try:
                self.bank()
            except Exception as exc:  # noqa: BLE001 - reported again, clearly, by the next inference
                logger.warning(f"template bank rebuild failed: {scrub_paths(str(exc))}")

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
        if not is_plain_name(name):  # saved before names were checked: never shown to a client
            logger.warning(f"label_info name {name[:40]!r} ignored: not plain text")
            continue
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
