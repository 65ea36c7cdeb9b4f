"""The DICOMweb side of the app's DICOMweb datastore: a client with timeouts and one quick retry, DICOM JSON
tag reading, and the check that a downloaded series is one CT volume."""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import requests
from fastapi import HTTPException
from monailabel.datastore.dicom import DICOMwebClientX

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 120.0  # default of --conf dicomweb_timeout: a slow server becomes a 503, not a hung request


class TimeoutSession(requests.Session):
    """A requests session with a default timeout (dicomweb-client sets none)."""

    def __init__(self, read_timeout_s: float = READ_TIMEOUT_S):
        super().__init__()
        self.timeout = (CONNECT_TIMEOUT_S, read_timeout_s)

    def request(self, *args, **kwargs):
        kwargs.setdefault("timeout", self.timeout)
        return super().request(*args, **kwargs)


def dicomweb_client(url: str, read_timeout_s: float = READ_TIMEOUT_S) -> DICOMwebClientX:
    """MONAI Label's client with a timeout, and one quick retry (dicomweb-client's default retries every failure
    5 times over 30 s, so a stopped server would hold each request half a minute before its 503)."""
    client = DICOMwebClientX(url=url, session=TimeoutSession(read_timeout_s))
    client.set_http_retry_params(retry=True, max_attempts=2, wait_exponential_multiplier=100)
    return client


def _tag(meta: dict, tag: str, default: str = "") -> str:
    value = (meta.get(tag) or {}).get("Value") or [default]
    return str(value[0])


def _timestamp(date: str, clock: str) -> float:
    """Seconds since the epoch of a DICOM DA + TM (0 when absent or malformed)."""
    try:
        return time.mktime(time.strptime(f"{date}{(clock.split('.')[0] + '000000')[:6]}", "%Y%m%d%H%M%S"))
    except ValueError:
        return 0.0


def _check_ct_series(series_id: str, folder: str) -> None:
    """400 unless the downloaded series is a CT volume: at least two slices, one orientation."""
    import pydicom

    files = [os.path.join(folder, f) for f in os.listdir(folder)]
    if len(files) < 2:
        shutil.rmtree(folder, ignore_errors=True)
        raise HTTPException(
            status_code=400, detail=f"series {series_id} has {len(files)} image(s): a CT volume needs several slices"
        )
    orientations = set()
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        iop = ds.get("ImageOrientationPatient")
        orientations.add(tuple(np.round(np.asarray(iop, dtype=float), 3)) if iop is not None else None)
    if len(orientations) != 1 or None in orientations:
        shutil.rmtree(folder, ignore_errors=True)
        raise HTTPException(
            status_code=400,
            detail=f"series {series_id} mixes {len(orientations)} slice orientations (or lacks them): "
            "not one CT volume (a localizer or a multi-stack series?)",
        )
