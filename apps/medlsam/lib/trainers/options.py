"""The check both trainers make of a train request's options, before any training starts (the server calls it at
submission, so a bad option is a 400 instead of a failure later in the training subprocess). The options are the
trainer's of the spec (lib/option_spec.py TRAIN_OPTIONS), read by lib/options.py."""

from __future__ import annotations

import re
from typing import Iterable

from lib.option_spec import MONAI_TRAIN_KEYS
from lib.options import Option, OptionError, parse
from medlsam.errors import MedLSAMError
from medlsam.utils.devices import check_device, cuda_count

MONAI_KEYS = MONAI_TRAIN_KEYS  # MONAI Label adds these to a train request


def check_train_options(request: dict, spec: Iterable[Option]) -> dict:
    """The options of ``spec`` as ``request`` sets them (absent: the spec's default); OptionError naming the key
    for an unknown key (MONAI Label's own pass) or a bad value. ``device`` must be one this machine has, with
    MONAI Label's ``gpus`` (see ``check_train_device``)."""
    options = parse(spec, request, "train option", allowed=MONAI_KEYS)
    if options.get("device") is not None:  # None: the trainer's own default (segmentation: the server's device)
        options["device"] = check_train_device(options["device"], request.get("gpus"))
    return options


def check_train_device(device, gpus=None) -> str:
    """The train option ``device`` normalised, if this machine has it: cpu; cuda or cuda:N only where
    torch.cuda.is_available() and N < torch.cuda.device_count() (medlsam.utils.devices.check_device). MONAI Label's
    ``gpus`` ("all", or GPU indices "0,2" that become the training's CUDA_VISIBLE_DEVICES) must name GPUs present,
    and cuda:N one of those it leaves visible. Else OptionError naming the option, the value and what is here."""
    if not isinstance(device, str):
        raise OptionError(f"train option device must be cpu, cuda or cuda:N, not {device!r}")
    try:
        device = check_device(device)
    except MedLSAMError as exc:
        raise OptionError(f"train option {exc}") from None
    if gpus is None or gpus == "" or gpus == "all":
        return device
    count = cuda_count()
    indices = gpus.split(",") if isinstance(gpus, str) else None
    if indices is None or not all(re.fullmatch(r"\s*[0-9]+\s*", i) and int(i) < count for i in indices):
        raise OptionError(
            f"train option gpus must be 'all' or a comma-separated list of GPU indices present here "
            f"({'0..' + str(count - 1) if count else 'none: CUDA is not available'}), not {gpus!r}"
        )
    if device.startswith("cuda:") and int(device[5:]) >= len(indices):
        raise OptionError(
            f"train option device={device!r}: gpus={gpus!r} leaves {len(indices)} GPU(s) visible to the training "
            f"(cuda:0..cuda:{len(indices) - 1})"
        )
    return device
