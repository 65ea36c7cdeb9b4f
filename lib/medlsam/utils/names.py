"""Organ-names files: label value -> organ name, read from the JSON forms users actually have.

Accepted (value 0 / "background" is dropped):
- ``{"1": "Brainstem", "2": "SpinalCord"}`` (value -> name), or inverted ``{"Brainstem": 1, ...}``;
- a ``dataset.json`` whose ``labels`` is either of those dicts, a list of ``{"name": ..., "idx"|"value": ...}``
  (MONAI Label's ``label_info``), or a list of names by value starting with ``"background"``.
Anything else is a ``NamesFileError`` naming the file and the problem.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from medlsam.errors import MedLSAMError

FORMAT_HELP = 'expected {"1": "Brainstem", "2": "SpinalCord", ...} (or a dataset.json with such "labels")'
# An organ name is shown by clients (Slicer, OHIF, web pages): plain text only, never markup or control characters.
PLAIN_NAME = re.compile(r"^\w[\w .,()+:/#-]{0,63}$")
NAME_RULE = "1-64 characters: letters, digits, spaces and _ . , ( ) + : / # - (starting with a letter or digit)"


def is_plain_name(name) -> bool:
    """True for an organ name that is plain text (``PLAIN_NAME``): no markup, quotes or control characters."""
    return isinstance(name, str) and bool(PLAIN_NAME.match(name))


class NamesFileError(MedLSAMError, ValueError):
    """An organ-names file that cannot be read or understood."""


def _integer(value) -> int | None:
    """An integer given as a number or a digit string; None otherwise (bools and fractions included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def _pairs(labels) -> list[tuple[int | None, object]]:
    """(value, name) pairs from any accepted form; value None where it is not an integer."""
    if isinstance(labels, dict):
        keys_numeric = all(_integer(k) is not None for k in labels)
        values_numeric = all(_integer(v) is not None for v in labels.values())
        if keys_numeric and not values_numeric:
            return [(_integer(k), v) for k, v in labels.items()]
        if values_numeric and not keys_numeric:
            return [(_integer(v), k) for k, v in labels.items()]
        if keys_numeric and values_numeric:
            raise ValueError("both keys and values are numbers: which are the organ names?")
        raise ValueError("neither the keys nor the values are all label numbers")
    if isinstance(labels, list):
        if all(isinstance(item, dict) for item in labels):
            out = []
            for item in labels:
                value = item.get("idx", item.get("value", item.get("label")))
                out.append((_integer(value), item.get("name")))
            return out
        if all(isinstance(item, str) for item in labels):
            if not labels or labels[0].strip().lower() != "background":
                raise ValueError(
                    'a list of names must start with "background", so that its positions are the label values'
                )
            return list(enumerate(labels))
        raise ValueError('a labels list must hold only names or only {"name": ..., "idx": ...} objects')
    raise ValueError(f"labels must be a JSON object or list, not {type(labels).__name__}")


def parse_names(data, source: str = "names") -> dict[int, str]:
    """value -> organ name from parsed JSON ``data`` (see the module's forms); ``source`` names it in errors."""
    if isinstance(data, dict) and "labels" in data:
        data = data["labels"]
    try:
        pairs = _pairs(data)
    except ValueError as exc:
        raise NamesFileError(f"{source}: {exc}; {FORMAT_HELP}") from None
    names: dict[int, str] = {}
    for value, name in pairs:
        if value is None:
            raise NamesFileError(f"{source}: organ {name!r} has no integer label value; {FORMAT_HELP}")
        if not isinstance(name, str) or not name.strip():
            raise NamesFileError(f"{source}: label {value} has no organ name (got {name!r})")
        name = name.strip()
        if value == 0 or name.lower() == "background":
            continue
        if not is_plain_name(name):
            raise NamesFileError(f"{source}: organ name {name[:80]!r} is not plain text; use {NAME_RULE}")
        if value < 0:
            raise NamesFileError(f"{source}: label value {value} of {name!r} is negative")
        if value in names:
            raise NamesFileError(f"{source}: label value {value} is given twice ({names[value]!r}, {name!r})")
        if name in names.values():
            raise NamesFileError(f"{source}: organ name {name!r} is given twice")
        names[value] = name
    if not names:
        raise NamesFileError(f"{source}: no organ names in it; {FORMAT_HELP}")
    return dict(sorted(names.items()))


def read_names(path: str | os.PathLike | None) -> dict[int, str]:
    """Organ names from a JSON file (any accepted form); {} for None."""
    if path is None:
        return {}
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise NamesFileError(f"names file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise NamesFileError(f"names file {path} cannot be read: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise NamesFileError(
            f"names file {path} is not JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); {FORMAT_HELP}"
        ) from None
    return parse_names(data, f"names file {path}")
