"""RT structure names -> organ names: AAPM TG-263 standard names, a synonyms file, and the rules that leave out
targets, PRVs, rings, optimisation helpers and non-anatomical structures.

A name is compared by its words, ignoring case, spaces, underscores, hyphens, dots and brackets (``Brain Stem``,
``BRAINSTEM`` and ``brain_stem`` are one name); a laterality word first or last (L, Lt, Left, R, Rt, Right) is read
as TG-263's ``_L`` / ``_R`` suffix, so ``Parotid (L)``, ``L Parotid``, ``Parotid_L``, ``PAROTID LT`` and
``LeftParotid`` are all ``Parotid_L``. The built-in synonyms are ``medlsam/data/roi_synonyms.json``; a user's file of
the same form (or a plain ``{"Standard": ["other name", ...]}``) extends it and wins over it.

Order of the decision for one ROI: its RT ROI Interpreted Type (GTV, CTV, PTV, marker, support, ... : left out),
then the name (a standard or synonym: mapped; a body outline: left out), then the name rules (PRV, ring, helper,
target, non-anatomical: left out); anything else is unmapped and reported by name.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from medlsam.errors import MedLSAMError
from medlsam.utils.names import is_plain_name

BUILTIN_SYNONYMS = Path(__file__).resolve().parents[1] / "data" / "roi_synonyms.json"
LATERALITY = {"l": "L", "lt": "L", "left": "L", "lft": "L", "r": "R", "rt": "R", "right": "R", "rght": "R"}
WORDS = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")
# RT ROI Interpreted Types that are not organs (DICOM PS3.3 C.8.8.8); AVOIDANCE, ORGAN, CAVITY are organs (ARIA
# exports organs at risk as AVOIDANCE).
TARGET_TYPES = {"GTV", "CTV", "PTV", "ITV", "TREATED_VOLUME", "IRRAD_VOLUME"}
NON_ANATOMICAL_TYPES = {
    "BOLUS", "MARKER", "REGISTRATION", "ISOCENTER", "SUPPORT", "FIXATION", "DOSE_REGION", "CONTROL",
    "BRACHY_CHANNEL", "BRACHY_ACCESSORY", "BRACHY_SRC_APP", "BRACHY_CHNL_SHLD", "CONTRAST_AGENT",
}  # fmt: skip
EXTERNAL_STANDARDS = {"Body", "External"}
TARGET_NAME = re.compile(r"(^|[^a-z])(i?gtv|i?ctv|ptv|itv|hr-?ctv|ir-?ctv|boost|target|tumou?r)", re.IGNORECASE)
PRV_NAME = re.compile(r"prv", re.IGNORECASE)
RING_NAME = re.compile(r"(^|[^a-z])(ring|shell)", re.IGNORECASE)
HELPER_WORDS = {
    "opt", "optim", "avoid", "avd", "help", "helper", "dummy", "tmp", "temp", "minus", "crop", "exp", "expand",
    "overlap", "ovlp", "eval", "hot", "cold", "dose", "isodose", "ctrl", "nt", "ns", "block",
}  # fmt: skip
NON_ANATOMICAL_WORDS = {
    "couch", "table", "bolus", "marker", "markers", "clip", "clips", "seed", "seeds", "artifact", "artefact",
    "contrast", "override", "density", "bb", "fiducial", "fiducials", "iso", "isocenter", "isocentre", "calypso",
    "metal", "implant", "wire", "mask", "immobilization", "immobilisation", "support", "rail", "rails",
}  # fmt: skip
KEEP_HELP = "pass keep_targets (CLI: --keep-targets) to import it"


class SynonymsError(MedLSAMError, ValueError):
    """A synonyms file that cannot be read or understood."""


def words(name: str) -> list[str]:
    """The lower-case words of a structure name: split at non-alphanumerics, camel case and digits."""
    return [w.lower() for w in WORDS.findall(str(name))]


def name_key(name: str) -> tuple[str, str]:
    """(base, side) of a name: the words without a laterality word first or last, joined; side "L", "R" or ""."""
    parts = words(name)
    side = ""
    if len(parts) > 1:
        first, last = LATERALITY.get(parts[0], ""), LATERALITY.get(parts[-1], "")
        if last and not first:
            side, parts = last, parts[:-1]
        elif first and not last:
            side, parts = first, parts[1:]
    return "".join(parts), side


@dataclass
class Synonyms:
    """Name keys -> standard names: ``organs`` by (base, side), ``paired`` by base (the side is added)."""

    organs: dict[tuple[str, str], str]
    paired: dict[str, str]

    def standard(self, name: str) -> str | None:
        """The TG-263 (or user-given) standard name of ``name``; None when it is not known."""
        base, side = name_key(name)
        if not base:
            return None
        if (base, side) in self.organs:
            return self.organs[(base, side)]
        if side and base in self.paired:
            return f"{self.paired[base]}_{side}"
        if side:  # a laterality word that is part of the name ("Lens L" known only as "Lens_L" spelled out)
            whole = "".join(words(name))
            return self.organs.get((whole, ""))
        return None

    def extend(self, data: Mapping, source: str) -> None:
        """Add the entries of a parsed synonyms file (which win over those already held)."""
        if not isinstance(data, Mapping):
            raise SynonymsError(f"{source}: expected a JSON object of standard name -> [other names]")
        organs = {k: v for k, v in data.items() if not str(k).startswith("_") and k not in ("organs", "paired")}
        if isinstance(data.get("organs"), Mapping):
            organs.update(data["organs"])
        elif "organs" in data:
            organs["organs"] = data["organs"]  # reported below as a malformed section
        paired = data.get("paired", {})
        for kind, table in (("organs", organs), ("paired", paired)):
            if not isinstance(table, Mapping):
                raise SynonymsError(f"{source}: {kind!r} must be an object of standard name -> [other names]")
            for standard, others in table.items():
                others = [others] if isinstance(others, str) else others
                if not is_plain_name(standard) or not isinstance(others, list):
                    raise SynonymsError(f"{source}: entry {str(standard)[:80]!r} must be a plain name -> [names]")
                for other in [standard, *others]:
                    if not isinstance(other, str) or not words(other):
                        raise SynonymsError(f"{source}: {standard!r} has a synonym that is not a name: {other!r}")
                    base, side = name_key(other)
                    if kind == "paired":
                        self.paired["".join(words(other))] = standard
                        for letter in "LR":
                            self.organs[("".join(words(other)), letter)] = f"{standard}_{letter}"
                    else:
                        self.organs[(base, side)] = standard


@functools.lru_cache(maxsize=1)
def _builtin() -> tuple[tuple[tuple[tuple[str, str], str], ...], tuple[tuple[str, str], ...]]:
    synonyms = Synonyms({}, {})
    try:
        text = BUILTIN_SYNONYMS.read_text()
    except OSError as exc:
        raise SynonymsError(f"the built-in ROI synonyms {BUILTIN_SYNONYMS} cannot be read: {exc}") from None
    synonyms.extend(json.loads(text), str(BUILTIN_SYNONYMS))
    return tuple(synonyms.organs.items()), tuple(synonyms.paired.items())


def load_synonyms(path: str | os.PathLike | Mapping | None = None) -> Synonyms:
    """The built-in synonyms, extended by a user's JSON file (or an already parsed mapping) when given."""
    organs, paired = _builtin()
    synonyms = Synonyms(dict(organs), dict(paired))
    if path is None:
        return synonyms
    if isinstance(path, Mapping):
        synonyms.extend(path, "synonyms")
        return synonyms
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SynonymsError(f"synonyms file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SynonymsError(f"synonyms file {path} cannot be read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise SynonymsError(f"synonyms file {path} is not JSON ({exc.msg} at line {exc.lineno})") from None
    synonyms.extend(data, f"synonyms file {path}")
    return synonyms


def standard_name(name: str, synonyms: Synonyms | None = None) -> str | None:
    """The TG-263 standard name of an ROI name (built-in synonyms unless given); None when unknown."""
    return (synonyms or load_synonyms()).standard(name)


def type_category(interpreted_type: str) -> tuple[str, str] | None:
    """(category, reason) when an RT ROI Interpreted Type says the ROI is no organ; else None."""
    kind = (interpreted_type or "").strip().upper()
    if kind in TARGET_TYPES:
        return "target", f"RT ROI Interpreted Type {kind} (a target volume)"
    if kind in NON_ANATOMICAL_TYPES:
        return "non-anatomical", f"RT ROI Interpreted Type {kind}"
    if kind == "EXTERNAL":
        return "external", "RT ROI Interpreted Type EXTERNAL (the body outline)"
    return None


def name_category(name: str) -> tuple[str, str] | None:
    """(category, reason) when an ROI name is that of a PRV, ring, helper, target or non-anatomical structure."""
    parts, text = words(name), name.strip()
    if PRV_NAME.search(text):
        return "prv", "a planning organ-at-risk volume (PRV)"
    if RING_NAME.search(text):
        return "ring", "a ring / shell structure"
    if re.match(r"^(z|zz|x)[A-Z0-9_\-z]", text) or text.startswith(("_", "-", "~")):
        return "helper", "a planning helper structure (TG-263: names starting with z or _)"
    if any(w in HELPER_WORDS for w in parts) or (len(parts) > 1 and re.search(r"\w\s*[-+]\s*\w", text)):
        return "helper", "an optimisation / avoidance helper structure"
    if TARGET_NAME.search(text):
        return "target", "a target volume (by its name)"
    if any(w in NON_ANATOMICAL_WORDS for w in parts):
        return "non-anatomical", "not anatomy (couch, bolus, marker, artefact, ...)"
    return None


def excluded_category(name: str, interpreted_type: str = "", standard: str | None = None) -> tuple[str, str] | None:
    """(category, reason) when an ROI is left out by default; else None. Its interpreted type decides first; a
    known organ name (``standard``) is kept unless it is the body outline; other names go through the name rules.
    Categories: target, prv, ring, helper, external, non-anatomical."""
    by_type = type_category(interpreted_type)
    if by_type:
        return by_type
    if standard in EXTERNAL_STANDARDS:
        return "external", "the body outline"
    return None if standard else name_category(name)


@dataclass
class RoiDecision:
    """What becomes of one ROI of a structure set."""

    number: int
    name: str
    interpreted_type: str = ""
    status: str = "unmapped"  # mapped | excluded | unmapped (| dropped, set by the reader: empty, composite)
    organ: str | None = None  # the organ name it is imported as
    standard: str | None = None  # its TG-263 name, when known
    reason: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def _plain(name: str) -> str:
    text = re.sub(r"[^\w .,()+:/#-]", "_", name.strip())[:64]
    return text if is_plain_name(text) else f"ROI_{re.sub(r'[^A-Za-z0-9]', '_', text)}"[:64]


def organ_vocabulary(organs: Mapping[int, str] | Iterable[str], synonyms: Synonyms) -> dict[str, str]:
    """standard name (or the name itself when it has none) -> organ name, for a bank's organ names."""
    names = list(organs.values()) if isinstance(organs, Mapping) else list(organs)
    return {synonyms.standard(n) or n: n for n in names}


def _decide(number: int, name: str, kind: str, synonyms: Synonyms, keep: bool, vocab) -> RoiDecision:
    decision = RoiDecision(int(number), str(name), str(kind or ""))
    standard = decision.standard = synonyms.standard(name)
    excluded = excluded_category(name, kind, standard)
    if excluded:
        decision.status, decision.reason = "excluded", f"{excluded[0]}: {excluded[1]}"
        if keep:
            decision.status, decision.organ = "mapped", _plain(standard or name)
            decision.reason += " (kept: keep_targets)"
        else:
            decision.reason += f"; {KEEP_HELP}"
        return decision
    if standard is None:
        decision.reason = "not a known organ name: add it to a synonyms file"
        return decision
    if vocab is not None and standard not in vocab:
        decision.reason = f"{standard} is not one of the organs asked for ({', '.join(sorted(vocab.values()))})"
        return decision
    decision.status, decision.organ = "mapped", vocab[standard] if vocab is not None else standard
    decision.reason = f"{name!r} -> {decision.organ}" + (f" (TG-263 {standard})" if decision.organ != standard else "")
    return decision


def map_rois(
    rois: Sequence[tuple[int, str, str]],
    synonyms: Synonyms | str | os.PathLike | None = None,
    keep_targets: bool = False,
    organs: Mapping[int, str] | Iterable[str] | None = None,
) -> list[RoiDecision]:
    """Decide every ROI of a structure set, given as (ROI number, ROI name, RT ROI Interpreted Type).

    Mapped ROIs get an organ name: the standard name, or, with ``organs`` (a bank's names, e.g. OpenKBP's
    ``LeftParotid``), the organ of that list with the same standard name; ROIs whose standard is not in ``organs``
    are unmapped. Two ROIs mapped to one organ: the first keeps it, the other is reported as a duplicate."""
    if not isinstance(synonyms, Synonyms):
        synonyms = load_synonyms(synonyms)
    vocab = organ_vocabulary(organs, synonyms) if organs is not None else None
    decisions, taken = [], {}
    for number, name, kind in rois:
        decision = _decide(number, name, kind or "", synonyms, keep_targets, vocab)
        if decision.status == "mapped":
            if decision.organ in taken:
                decision.status = "unmapped"
                decision.reason = (
                    f"duplicate: ROI {taken[decision.organ][1]!r} (number {taken[decision.organ][0]}) is already "
                    f"imported as {decision.organ}"
                )
            else:
                taken[decision.organ] = (number, name)
        decisions.append(decision)
    return decisions
