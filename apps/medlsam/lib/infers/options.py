"""Request options shared by the localising tasks (`medlam`, `medlsam`), read through the option spec
(lib/option_spec.py): a bad value is an OptionError naming it (HTTP 400)."""

from __future__ import annotations

from dataclasses import replace

from lib.option_spec import INFER_OPTIONS
from lib.options import option, read

LOCALIZE_SWITCHES = ("refine", "match")  # boolean LocalizeOptions a request may switch
BOX_MODES = list(option(INFER_OPTIONS["medlam"], "mode").choices)  # one box per organ, or also per z-slab
WHERE = "infer option"


def request_mode(request: dict, default: str, choices: list[str]) -> str:
    """The request's `mode` (a client echoing the config's choice list sends that list: its first entry)."""
    spec = replace(option(INFER_OPTIONS["medlsam"], "mode"), default=default, choices=tuple(choices))
    return read(spec, request.get("mode"), WHERE)


def organs_option(request: dict) -> list[str] | None:
    """``organs`` as a list or a comma-separated string; None for all."""
    return read(option(INFER_OPTIONS["medlsam"], "organs"), request.get("organs"), WHERE) or None


def localize_options(request: dict, mode: str):
    """The library's measured LocalizeOptions with the request's switches."""
    from medlsam.atlas.localize import LocalizeOptions

    options = LocalizeOptions(mode=mode)
    for key in LOCALIZE_SWITCHES:
        value = read(option(INFER_OPTIONS["medlsam"], key), request.get(key), WHERE, None, True)
        if value is not None:
            setattr(options, key, value)
    return options


def localize_config(modes: list[str]) -> dict:
    """The options a client shows for a localising task."""
    from medlsam.atlas.localize import LocalizeOptions

    defaults = LocalizeOptions()
    return {"mode": modes, "organs": "", **{key: getattr(defaults, key) for key in LOCALIZE_SWITCHES}}


def prior_weight(request: dict, default: float | None = None) -> float | None:
    """The request's `prior_weight` (0: SAM alone, 1: the template prior alone), else ``default`` (the server's
    --conf prior_weight; None: the segmenter's choice, see ``SegmentOptions.prior_weight``)."""
    return read(option(INFER_OPTIONS["medlsam"], "prior_weight"), request.get("prior_weight"), WHERE, default, True)
