"""The check both trainers make of a train request's options, before any training starts (the server calls it at
submission, so a bad option is a 400 instead of a failure later in the training subprocess)."""

from __future__ import annotations

import re

from medlsam.errors import MedLSAMError
from medlsam.utils.devices import check_device, cuda_count

MONAI_KEYS = ("model", "gpus", "bundle_path", "multi_gpu", "description", "local_rank")  # MONAI Label adds these


def check_train_options(request: dict, config: dict, bounds: dict[str, tuple[float, float]]) -> dict:
    """The options of ``config`` (its values the defaults) as ``request`` sets them; MedLSAMError naming the key for
    an unknown key or a value out of range. A list default is a choice (``device``: one this machine has, see
    ``check_train_device``); a key in ``bounds`` is a number (an integer when its default is one) in [low, high] (a
    float may not be 0)."""
    unknown = sorted(k for k in request if k not in config and k not in MONAI_KEYS)
    if unknown:
        raise MedLSAMError(f"unknown train option(s) {unknown}; accepted: {sorted(config)}")
    options = {}
    for key, default in config.items():
        value = request.get(key, default)
        if isinstance(value, list):  # a "choose one" option left at its list default
            value = value[0] if value else None
        if key == "device":
            value = check_train_device(value, request.get("gpus"))
        elif isinstance(default, list):
            if not isinstance(value, str) or value not in default:
                raise MedLSAMError(f"train option {key}={value!r} must be one of {default}")
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


def check_train_device(device, gpus=None) -> str:
    """The train option ``device`` normalised, if this machine has it: cpu; cuda or cuda:N only where
    torch.cuda.is_available() and N < torch.cuda.device_count() (medlsam.utils.devices.check_device). MONAI Label's
    ``gpus`` ("all", or GPU indices "0,2" that become the training's CUDA_VISIBLE_DEVICES) must name GPUs present,
    and cuda:N one of those it leaves visible. Else MedLSAMError naming the option, the value and what is here."""
    if not isinstance(device, str):
        raise MedLSAMError(f"train option device={device!r} must be a string: cpu, cuda or cuda:N")
    try:
        device = check_device(device)
    except MedLSAMError as exc:
        raise MedLSAMError(f"train option {exc}") from None
    if gpus is None or gpus == "" or gpus == "all":
        return device
    count = cuda_count()
    indices = gpus.split(",") if isinstance(gpus, str) else None
    if indices is None or not all(re.fullmatch(r"\s*[0-9]+\s*", i) and int(i) < count for i in indices):
        raise MedLSAMError(
            f"train option gpus={gpus!r} must be 'all' or a comma-separated list of GPU indices present here "
            f"({'0..' + str(count - 1) if count else 'none: CUDA is not available'})"
        )
    if device.startswith("cuda:") and int(device[5:]) >= len(indices):
        raise MedLSAMError(
            f"train option device={device!r}: gpus={gpus!r} leaves {len(indices)} GPU(s) visible to the training "
            f"(cuda:0..cuda:{len(indices) - 1})"
        )
    return device
