"""The readers of `--conf` values (every one through the option spec: lib/option_spec.py, read by lib/options.py),
the app's booleans (``parse_bool``), and the scrubbing of what the app sends back to clients."""

from __future__ import annotations

import re
from typing import Any, Mapping

from lib.option_spec import CONF_OPTIONS, MONAI_CONF_KEYS
from lib.options import option, parse, parse_bool, read  # noqa: F401 - parse_bool: the app's booleans


def conf_value(conf: Mapping[str, Any] | None, key: str):
    """The ``--conf key`` value as the spec reads it (every read of a --conf key goes through here or
    ``parse_conf``; an undeclared key is a KeyError naming it)."""
    return read(option(CONF_OPTIONS, key), (conf or {}).get(key), "--conf")


def parse_conf(conf: Mapping[str, Any] | None) -> dict:
    """Every --conf key, checked (a bad or unknown key stops the start, naming it); MONAI Label's own keys pass."""
    return parse(CONF_OPTIONS, conf, "--conf", allowed=MONAI_CONF_KEYS)


def conf_int(conf: dict, key: str, default: int | None = None, minimum: int | None = None) -> int:
    """``conf_value`` for older call sites (``default``/``minimum``: the spec's; tests/unit/test_options.py checks
    that they agree)."""
    return conf_value(conf, key)


def conf_float(
    conf: dict, key: str, default: float | None = None, minimum: float | None = None, maximum: float | None = None
) -> float:
    """``conf_value`` for older call sites (the other arguments: see ``conf_int``)."""
    return conf_value(conf, key)


def conf_bool(conf: dict, key: str, default: bool | None = None) -> bool:
    """``conf_value`` for older call sites (the other arguments: see ``conf_int``)."""
    return conf_value(conf, key)


def scrub_paths(text: str) -> str:
    """Absolute server paths in a message reduced to their file names."""
    return re.sub(r"(?:/[^/\s'\",;:()\[\]]+)+/([^/\s'\",;:()\[\]]+)", r"\1", text)
