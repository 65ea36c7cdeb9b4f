"""The app's `--conf` values and switches (one parser per kind, each error naming the key), and the scrubbing of
what it sends back to clients."""

from __future__ import annotations

import re

from medlsam.errors import MedLSAMError

TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_bool(value) -> bool | None:
    """true/false, 1/0, yes/no, on/off (any case) or a bool; None for anything else."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    return True if text in TRUE else False if text in FALSE else None


def conf_int(conf: dict, key: str, default: int, minimum: int) -> int:
    try:
        value = int(conf.get(key, default))
    except (TypeError, ValueError):
        raise MedLSAMError(f"--conf {key} must be an integer, not {conf.get(key)!r}") from None
    if value < minimum:
        raise MedLSAMError(f"--conf {key} must be at least {minimum}, not {value}")
    return value


def conf_float(conf: dict, key: str, default: float, minimum: float, maximum: float | None = None) -> float:
    try:
        value = float(conf.get(key, default))
    except (TypeError, ValueError):
        value = float("nan")
    if not (value >= minimum and (maximum is None or value <= maximum)):
        bounds = f"in [{minimum}, {maximum}]" if maximum is not None else f"at least {minimum}"
        raise MedLSAMError(f"--conf {key} must be a number {bounds}, not {conf.get(key)!r}")
    return value


def conf_bool(conf: dict, key: str, default: bool) -> bool:
    value = parse_bool(conf.get(key, default))
    if value is None:
        raise MedLSAMError(f"--conf {key} must be true or false, not {conf.get(key)!r}")
    return value


def scrub_paths(text: str) -> str:
    """Absolute server paths in a message reduced to their file names."""
    return re.sub(r"(?:/[^/\s'\",;:()\[\]]+)+/([^/\s'\",;:()\[\]]+)", r"\1", text)
