"""The check both trainers make of a train request's options, before any training starts."""

from __future__ import annotations

import re

from medlsam.errors import MedLSAMError

MONAI_KEYS = ("model", "gpus", "bundle_path", "multi_gpu", "description", "local_rank")  # MONAI Label adds these


def check_train_options(request: dict, config: dict, bounds: dict[str, tuple[float, float]]) -> dict:
    """The options of ``config`` (its values the defaults) as ``request`` sets them; MedLSAMError naming the key for
    an unknown key or a value out of range. A list default is a choice (``device``: cpu, cuda or cuda:<n>); a key
    in ``bounds`` is a number (an integer when its default is one) in [low, high] (a float may not be 0)."""
    unknown = sorted(k for k in request if k not in config and k not in MONAI_KEYS)
    if unknown:
        raise MedLSAMError(f"unknown train option(s) {unknown}; accepted: {sorted(config)}")
    options = {}
    for key, default in config.items():
        value = request.get(key, default)
        if isinstance(value, list):  # a "choose one" option left at its list default
            value = value[0] if value else None
        if isinstance(default, list):
            choices = default if key != "device" else None
            if (
                not isinstance(value, str)
                or (choices and value not in choices)
                or (key == "device" and not re.fullmatch(r"cpu|cuda(:\d+)?", value))
            ):
                allowed = choices or ["cpu", "cuda", "cuda:<n>"]
                raise MedLSAMError(f"train option {key}={value!r} must be one of {allowed}")
        elif key in bounds:
            low, high = bounds[key]
            cast = float if isinstance(default, float) else int
            try:
                if isinstance(value, bool) or value is None:
                    raise ValueError
                number = float(value)
                if cast is int and number != int(number):
                    raise ValueError
                value = cast(number)
            except (TypeError, ValueError, OverflowError):
                kind = "an integer" if cast is int else "a number"
                raise MedLSAMError(f"train option {key}={value!r} must be {kind} in [{low}, {high}]") from None
            if not (low <= value <= high) or (cast is float and value == 0):
                raise MedLSAMError(
                    f"train option {key}={value!r} must lie in {'(' if cast is float else '['}{low}, {high}]"
                )
        options[key] = value
    return options
