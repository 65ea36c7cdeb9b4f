"""The one parser of the app's options: ``--conf`` keys, infer (request) options and train options, each declared
once (lib/option_spec.py: name, kind, default, range or choices, one-line doc) and read by ``parse``, whose
``OptionError`` names the key and what it accepts. docs/configuration.md is generated from the spec
(scripts/gen_configuration.py); lib/conf.py reads the --conf keys through it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Collection, Iterable, Mapping

from medlsam.errors import MedLSAMError

TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
KINDS = ("int", "float", "bool", "str", "path", "list", "choice", "names", "device", "points", "box", "object")
NOUNS = {"--conf": "--conf key"}  # how an unknown key is named: "unknown --conf key(s) [...]"


def parse_bool(value) -> bool | None:
    """true/false, 1/0, yes/no, on/off (any case) or a bool; None for anything else."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    return True if text in TRUE else False if text in FALSE else None


class OptionError(MedLSAMError):
    """An option that cannot be used: the message names the key and the values it accepts (HTTP 400)."""


@dataclass(frozen=True)
class Option:
    """One option: ``kind`` (KINDS) says how a value is read; ``low``/``high`` bound a number (``open_low``: the
    low bound itself is refused); ``choices`` the values of a ``choice``; ``hidden`` keeps it out of the docs and
    of /info/ (still accepted)."""

    name: str
    kind: str
    default: Any
    doc: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] | None = None
    hidden: bool = False
    open_low: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"option {self.name}: unknown kind {self.kind!r}")
        if (self.kind == "choice") != bool(self.choices):
            raise ValueError(f"option {self.name}: a choice needs choices, and only a choice has them")

    def accepted(self) -> str:
        """What the option accepts, in words: "an integer in [1, 64]", "refiner or geodesic", ..."""
        if self.kind in ("int", "float"):
            return ("an integer" if self.kind == "int" else "a number") + bounds_text(self)
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return choices_text(self.choices)
        return {
            "names": "a list of names (or comma-separated text)",
            "list": "comma-separated text",
            "path": "a file path",
            "device": "cpu, cuda or cuda:N",
            "points": "a list of voxel indices [[i, j, k], ...]",
            "box": "[i0, i1, j0, j1, k0, k1]",
            "object": "a JSON object",
        }.get(self.kind, "text")


def bounds_text(option: Option) -> str:
    low, high = option.low, option.high
    if low is not None and high is not None:
        return f" in {'(' if option.open_low else '['}{low}, {high}]"
    if low is not None:
        return f" above {low}" if option.open_low else f" of at least {low}"
    return f" of at most {high}" if high is not None else ""


def choices_text(choices: Iterable[str]) -> str:
    choices = list(choices)
    return " or ".join(choices) if len(choices) == 2 else "one of " + ", ".join(choices)


def _absent(value) -> bool:
    return value is None or (isinstance(value, str) and value == "")


def _number(option: Option, value):
    """An int or a finite float within the option's bounds; None when it is not one."""
    try:
        if isinstance(value, bool):
            return None
        number = float(value)
        if not math.isfinite(number):
            return None
        if option.kind == "int":
            if number != int(number):
                return None
            number = int(number)
    except (TypeError, ValueError, OverflowError):
        return None
    if option.low is not None and (number < option.low or (option.open_low and number == option.low)):
        return None
    if option.high is not None and number > option.high:
        return None
    return number


def _names(value):
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        return None
    return list(value)


def read(option: Option, value, where: str, default=None, use_default: bool = False):
    """``value`` as ``option`` reads it (absent: ``default`` when ``use_default``, else the option's default);
    OptionError "<where> <key> must be <accepted>, not <value>"."""
    if _absent(value):
        return default if use_default else option.default
    kind = option.kind
    if isinstance(value, (list, tuple)) and kind not in ("names", "points", "box", "list"):
        if not value:  # a client echoing a "choose one" list: its first entry
            return default if use_default else option.default
        value = value[0]
    if kind in ("points", "box", "object"):
        if kind == "object" and not isinstance(value, dict):
            raise OptionError(f"{where} {option.name} must be {option.accepted()}, not {value!r}")
        return value  # clicks are checked against the image by the task
    if kind == "device":
        from medlsam.utils.devices import check_device

        if not isinstance(value, str):
            raise OptionError(f"{where} {option.name} must be {option.accepted()}, not {value!r}")
        try:
            return check_device(value)
        except MedLSAMError as exc:
            raise OptionError(f"{where} {exc}") from None
    if kind in ("int", "float"):
        result = _number(option, value)
    elif kind == "bool":
        result = parse_bool(value)
    elif kind == "choice":
        result = value if isinstance(value, str) and value in option.choices else None
    elif kind == "names":
        result = _names(value)
    elif kind == "list":
        result = _names(value) if isinstance(value, str) else None
    else:
        result = value if isinstance(value, str) else None
    if result is None:
        raise OptionError(f"{where} {option.name} must be {option.accepted()}, not {value!r}")
    return result


def parse(
    spec: Iterable[Option],
    values: Mapping[str, Any] | None,
    where: str,
    allowed: Collection[str] | None = (),
    defaults: Mapping[str, Any] | None = None,
) -> dict:
    """Every option of ``spec`` read from ``values`` (absent: ``defaults``, else the option's default). A key of
    ``values`` outside the spec is refused unless it is in ``allowed`` (None: any key may come, as in an infer
    request, whose other keys are the task's clicks and MONAI Label's fields). OptionError names the key."""
    spec = tuple(spec)
    values = values or {}
    names = {o.name for o in spec}
    if allowed is not None:
        unknown = sorted(str(k) for k in values if k not in names and k not in allowed)
        if unknown:
            public = sorted(o.name for o in spec if not o.hidden)
            raise OptionError(f"unknown {NOUNS.get(where, where)}(s) {unknown}; accepted: {public}")
    defaults = defaults or {}
    return {o.name: read(o, values.get(o.name), where, defaults.get(o.name), o.name in defaults) for o in spec}


def option(spec: Iterable[Option], name: str) -> Option:
    """The option ``name`` of ``spec``; KeyError naming it when it is not declared (a reader's mistake)."""
    for item in spec:
        if item.name == name:
            return item
    raise KeyError(f"option {name!r} is not declared in lib/option_spec.py")


def train_config(spec: Iterable[Option]) -> dict:
    """A trainer's config for /info/ (MONAI Label's form): defaults, a choice as its list (the default first),
    ``device`` as the devices present; hidden options left out."""
    from medlsam.utils.devices import device_choices

    config = {}
    for item in spec:
        if item.hidden:
            continue
        if item.kind == "device":
            config[item.name] = device_choices()
        elif item.kind == "choice":
            config[item.name] = [item.default] + [c for c in item.choices if c != item.default]
        else:
            config[item.name] = item.default
    return config
