"""Template banks as the CLI and the app build them: one bank per template (cached on disk by what it depends on),
the newest usable ones merged, each organ's prior cut chosen by leaving one template out (cached per template set),
progress reported and cancellable between templates."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from medlsam.atlas.calibration import CalibrationCancelled, prior_cuts, with_cuts
from medlsam.atlas.templates import TemplateBank, load_bank, merge_banks, template_bank
from medlsam.errors import MedLSAMError, TemplateError
from medlsam.io.labels import check_label_array
from medlsam.io.volume import CTVolume, read_volume
from medlsam.medlam.network import MedLAM, model_fingerprint
from medlsam.utils.atomic import write_json_atomic

logger = logging.getLogger(__name__)


class BuildCancelled(TemplateError):
    """A bank build stopped between templates because its caller cancelled it."""


class NoTemplatesError(TemplateError):
    """No usable template: none given, or every one unusable (the message names each one's reason)."""


@dataclass
class Template:
    """One annotated scan: its label (or six extreme points per organ) and the names of the label's values."""

    id: str
    image: str | Path | CTVolume
    label: str | Path | CTVolume | None = None
    names: dict[int, str] = field(default_factory=dict)
    points: dict | None = None


@dataclass
class BuiltBank:
    """A merged bank, the templates it used (ids) and those skipped, each with its reason."""

    bank: TemplateBank
    used: list[str]
    skipped: dict[str, str]


def file_key(path) -> str:
    """A file's real path, size and modification time: whether it changed since it was last looked at."""
    stat = os.stat(path)
    return f"{os.path.realpath(path)}:{stat.st_size}:{stat.st_mtime_ns}"


_CONTENT_KEYS: dict[str, str] = {}  # file_key -> content_key, for this process


def content_key(path) -> str:
    """What a cache entry made from a file depends on: the SHA-1 of its bytes (a folder: its ``file_key``), read
    once per process per ``file_key``. A copy, a restored backup or a datastore moved elsewhere keeps its caches; a
    file saved again with new content does not."""
    key = file_key(path)
    if os.path.isdir(path):
        return key
    digest = _CONTENT_KEYS.get(key)
    if digest is None:
        h = hashlib.sha1()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                h.update(block)
        digest = _CONTENT_KEYS[key] = h.hexdigest()
    return digest


class BankBuilder:
    """Builds banks for one MedLAM. With ``cache_dir``, each template's bank is kept there (``ID-DIGEST.pt``) and
    reused while its image, label, names and the model are unchanged, and so are the prior cuts of a template set.
    ``progress(**fields)`` hears ``state="building", built=k, of=n`` (and ``step=...`` for the prior cuts)."""

    def __init__(
        self,
        model: MedLAM,
        cache_dir: str | Path | None = None,
        localize_options=None,
        progress: Callable[..., None] | None = None,
    ):
        self.model, self.localize_options = model, localize_options
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.fingerprint = model_fingerprint(model)
        self._progress = progress or (lambda **fields: None)
        self._unusable: dict[str, str] = {}  # template digest -> why it cannot serve (refusals kept in memory)

    def digest(self, template: Template) -> str | None:
        """What one template's bank depends on (None when image or label is not a file: never cached)."""
        files = [template.image] + ([template.label] if template.label is not None else [])
        if not all(isinstance(f, (str, Path)) for f in files):
            return None
        parts = [self.fingerprint, [content_key(f) for f in files], sorted(template.names.items()), template.points]
        return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()[:12]

    def template_bank(self, template: Template) -> TemplateBank:
        """One template's bank, its label checked first (``medlsam.io.labels``, and on its image's grid)."""
        digest = self.digest(template)
        if digest in self._unusable:
            raise TemplateError(self._unusable[digest])
        path = self.cache_dir / f"{template.id}-{digest}.pt" if self.cache_dir and digest else None
        if path is not None and path.is_file():
            try:
                return load_bank(path, self.model)
            except TemplateError:
                path.unlink(missing_ok=True)
        try:
            label = template.label
            if label is not None:
                label = label if isinstance(label, CTVolume) else read_volume(label)
                try:
                    check_label_array(label.array)
                except MedLSAMError as exc:
                    raise TemplateError(f"label of {template.id}: {exc}") from None
            bank = template_bank(self.model, template.image, label, template.names, template.points)
        except MedLSAMError as exc:
            if digest is not None:
                self._unusable[digest] = str(exc)
            raise
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            for old in path.parent.glob(f"{template.id}-*.pt"):
                old.unlink(missing_ok=True)
            bank.save(path)
        return bank

    def build(
        self,
        templates: list[Template],
        names: dict[str, int] | None = None,
        max_templates: int | None = None,
        cancel: threading.Event | None = None,
        skip_unusable: bool = False,
        calibrate: bool = True,
        report: bool = True,
    ) -> BuiltBank:
        """The bank of the first ``max_templates`` usable ``templates`` (in their order), organs renumbered by
        ``names`` (organ -> value); an unusable template fails the build, or with ``skip_unusable`` is skipped and
        reported (and prior cuts that cannot be chosen leave every organ cut at 0.5). With ``calibrate`` and at least
        three labelled templates, each organ's prior cut is chosen by leaving one out (``medlsam.atlas.calibration``).
        BuildCancelled when ``cancel`` is set between templates. ``report``: tell ``progress`` (a side build, e.g. a
        bank for another use than the app's template bank, says nothing)."""
        of = min(max_templates or len(templates), len(templates))
        banks, used, skipped = [], [], {}
        for template in templates:
            if len(banks) >= of:
                break
            if cancel is not None and cancel.is_set():
                raise BuildCancelled("the bank build was cancelled")
            tic = time.perf_counter()
            try:
                banks.append(self.template_bank(template))
            except Exception as exc:  # noqa: BLE001 - skipped and reported, or raised as a TemplateError
                if not isinstance(exc, MedLSAMError):
                    exc = TemplateError(f"{template.id}: unusable template ({type(exc).__name__}: {exc})")
                if not skip_unusable:
                    raise exc from None
                logger.warning(f"template {template.id} skipped: {exc}")
                skipped[template.id] = str(exc)
                continue
            used.append(template.id)
            if report:
                self._progress(state="building", built=len(banks), of=of, last=template.id)
            logger.info(f"template bank: built {len(banks)}/{of} ({template.id}) in {time.perf_counter() - tic:.1f} s")
        if not banks:
            raise NoTemplatesError("no usable template: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
        bank = merge_banks(banks, names)
        if not bank.organs:
            raise TemplateError("no organ found in the templates")
        if calibrate:
            by_id = {t.id: t for t in templates}
            held = [i for i, t in enumerate(used) if by_id[t].label is not None]
            items = [by_id[used[i]] for i in held]
            with_cuts(bank, self.prior_cuts(items, [banks[i] for i in held], cancel, lenient=skip_unusable))
        return BuiltBank(bank, used, skipped)

    def prior_cuts(
        self,
        templates: list[Template],
        banks: list[TemplateBank],
        cancel: threading.Event | None = None,
        lenient: bool = False,
    ) -> dict[str, float]:
        """Each organ's prior cut for this template set (kept in the cache folder); {} (every organ cut at 0.5)
        when there are too few templates, or with ``lenient`` when it cannot be chosen."""
        digests = [self.digest(t) for t in templates]
        path = None
        if self.cache_dir and None not in digests:
            key = hashlib.sha1(json.dumps([digests, repr(self.localize_options)]).encode()).hexdigest()[:12]
            path = self.cache_dir / f"prior-cuts-{key}.json"
            kept = _read_cuts(path)
            if kept is not None:
                return kept
        tic = time.perf_counter()
        self._progress(state="building", built=len(banks), of=len(banks), step="prior cuts (templates held out)")
        try:
            images, labels = [t.image for t in templates], [t.label for t in templates]
            cuts = prior_cuts(self.model, banks, images, labels, cancel, options=self.localize_options)
        except CalibrationCancelled:
            raise BuildCancelled("the bank build was cancelled") from None
        except MedLSAMError as exc:
            if not lenient:
                raise
            logger.warning(f"template bank: prior cuts not chosen, every organ cut at 0.5: {exc}")
            return {}
        if path is not None:
            for old in path.parent.glob("prior-cuts-*.json"):
                old.unlink(missing_ok=True)
            write_json_atomic(cuts, path)
        logger.info(f"template bank: prior cuts {cuts} chosen in {time.perf_counter() - tic:.1f} s")
        return cuts


def build_bank(
    model: MedLAM,
    images: list,
    labels: list | None = None,
    names: dict[int, str] | None = None,
    extreme_points_json: list[dict | None] | None = None,
    calibrate: bool = True,
    localize_options=None,
) -> TemplateBank:
    """A bank from template scans with labels and/or six extreme points per organ (file indices), every template
    required to be usable; ``names`` (value -> organ) names the label values (an organ named but in no template is
    an error). With ``calibrate``, prior cuts as in ``BankBuilder.build``."""
    labels = labels or [None] * len(images)
    points = extreme_points_json or [None] * len(images)
    if not (len(images) == len(labels) == len(points)):
        raise TemplateError(f"{len(images)} template images but {len(labels)} labels / {len(points)} point sets")
    names = {int(k): v for k, v in (names or {}).items()}
    templates = []
    for number, (image, label, pts) in enumerate(zip(images, labels, points), 1):
        if label is None and pts is None:
            raise TemplateError(f"template {image}: needs a label or extreme points")
        source = image.source if isinstance(image, CTVolume) else image
        templates.append(Template(f"{number}:{Path(str(source)).name}", image, label, names, pts))
    bank = BankBuilder(model, localize_options=localize_options).build(templates, calibrate=calibrate).bank
    absent = [n for n in names.values() if n not in bank.organs]
    if absent:
        raise TemplateError(f"organ(s) {absent} named in the label names are in none of the templates")
    return bank


def _read_cuts(path: Path) -> dict[str, float] | None:
    """Prior cuts kept at ``path``; None (and the file removed) when missing, unreadable or out of range."""
    if not path.is_file():
        return None
    try:
        kept = {str(k): float(v) for k, v in json.loads(path.read_text()).items()}
        if all(0.0 < v < 1.0 for v in kept.values()):
            return kept
    except (ValueError, AttributeError):
        pass
    path.unlink(missing_ok=True)
    return None
