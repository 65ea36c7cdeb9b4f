"""Request options shared by the localising tasks (`medlam`, `medlsam`): each task reads its request once through
these, and a bad value is an HTTP 400 naming it."""

from __future__ import annotations

from fastapi import HTTPException

from lib.infers.common import flag, number

LOCALIZE_SWITCHES = ("refine", "match")  # boolean LocalizeOptions a request may switch
BOX_MODES = ["wpl", "spl"]  # the localiser's: one box per organ, or also one per z-slab


def request_mode(request: dict, default: str, choices: list[str]) -> str:
    """The request's `mode` (a client echoing the config's choice list sends that list: its first entry)."""
    mode = request.get("mode") or default
    if isinstance(mode, (list, tuple)):
        mode = mode[0] if mode else default
    if mode not in choices:
        raise HTTPException(status_code=400, detail=f"mode must be one of {', '.join(choices)}, not {mode!r}")
    return mode


def organs_option(request: dict) -> list[str] | None:
    """``organs`` as a list or a comma-separated string; None for all."""
    organs = request.get("organs")
    if organs is None or organs == "" or organs == []:
        return None
    if isinstance(organs, str):
        organs = [o.strip() for o in organs.split(",") if o.strip()]
    if not isinstance(organs, (list, tuple)) or not all(isinstance(o, str) for o in organs):
        raise HTTPException(status_code=400, detail=f"organs must be a list of organ names, got {organs!r}")
    return list(organs) or None


def localize_options(request: dict, mode: str):
    """The library's measured LocalizeOptions with the request's switches."""
    from medlsam.atlas.localize import LocalizeOptions

    options = LocalizeOptions(mode=mode)
    for key in LOCALIZE_SWITCHES:
        value = flag(request, key)
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
    return number(request, "prior_weight", default, float, 0.0, 1.0)
