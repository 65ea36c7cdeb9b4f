"""The app's DICOMweb datastore (``--studies http://host:port/dicom-web``, e.g. Orthanc): MONAI Label's
DICOMWebDatastore with what OHIF users need fixed.

- Final labels are DICOM SEG series on the server (saved through ``PUT /datastore/label`` or stored by any other
  tool). The labelled-image list is read fresh (cached a few seconds, dropped on every save), not for MONAI
  Label's 7200 s, so a label saved after the first ``/info/`` becomes a template.
- ``get_label_uri(image_id, "final")`` finds the newest SEG referencing that image series and converts it onto the
  image's voxel grid (MONAI Label's expects the SEG's own series id and, given the image id, downloads the CT as a
  "label"); organ names come from the SEG's segment labels. A SEG off its image's grid or empty is skipped by the
  template bank with a log line.
- Saving a final label checks it on the image's grid and writes the SEG with dcmqi, one segment per organ with its
  name (MONAI Label pairs names and values by position).
- The series is checked before use: unknown id 404; not CT (MR, SEG...), one slice, mixed orientations 400. A
  DICOMweb server that is down or slow is a 503 naming it; the app keeps serving.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import requests
from fastapi import HTTPException
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.datastore.utils.convert import dicom_to_nifti
from monailabel.interfaces.datastore import DefaultLabelTag
from pydicom.dataset import Dataset

from lib.datastore import check_label, parse_label_info
from lib.dicomweb_client import READ_TIMEOUT_S, _check_ct_series, _tag, _timestamp, dicomweb_client

logger = logging.getLogger(__name__)

UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
LIST_TTL_S = 5.0  # the series lists are re-read after this (and after every save)
FINAL = DefaultLabelTag.FINAL.value
DRAFT_DESCRIPTION = "MedLSAM Label draft"  # the series description of the structure sets output=rtstruct stores


class MedLSAMDicomWebDatastore(DICOMWebDatastore):
    def __init__(
        self,
        url: str,
        search_filter: Dict[str, Any],
        cache_path: Optional[str] = None,
        on_label_change=None,
        read_timeout_s: float = READ_TIMEOUT_S,
        rt_synonyms: Optional[str] = None,
    ):
        from medlsam.rt.roi_names import load_synonyms

        self.synonyms = load_synonyms(rt_synonyms) if rt_synonyms else None  # a bad file stops the start, named
        client = dicomweb_client(url, read_timeout_s)
        super().__init__(client, search_filter, cache_path, fetch_by_frame=False, convert_to_nifti=True)
        self.url = url.rstrip("/")
        self.on_label_change: Optional[Callable[[], None]] = on_label_change
        self._cache: Dict[str, tuple] = {}  # key -> (time, value)
        self._seg_refs: Dict[str, Optional[dict]] = {}  # SEG series -> its image series (SEGs never change)
        self._lock = threading.RLock()
        self._downloads = threading.RLock()  # one download/conversion at a time (request and bank threads)
        self._label_dir = os.path.join(self._datastore_path, "segs")

    # ------------------------------------------------------------------ talking to the server
    def _call(self, what: str, fn: Callable, *args, **kwargs):
        """``fn(*args)`` against the DICOMweb server; unreachable, slow or failing -> 503 naming the server."""
        try:
            return fn(*args, **kwargs)
        except requests.Timeout:
            detail = f"DICOMweb server {self.url} did not answer in time ({what})"
        except requests.ConnectionError:
            detail = f"DICOMweb server {self.url} is not reachable ({what}): is it running?"
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else "?"
            detail = f"DICOMweb server {self.url} answered HTTP {code} ({what})"
        logger.warning(detail)
        raise HTTPException(status_code=503, detail=detail)

    def _cached(self, key: str, fn: Callable):
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and time.time() - hit[0] < LIST_TTL_S:
                return hit[1]
        value = fn()
        with self._lock:
            self._cache[key] = (time.time(), value)
        return value

    def refresh(self) -> None:
        """Forget the series lists (after a save: the next request reads them from the server)."""
        with self._lock:
            self._cache.clear()

    def _series(self, series_id: str) -> Optional[dict]:
        """The QIDO series record of ``series_id`` (any modality), None when the server has none."""
        found = self._call(
            "series search", self._client.search_for_series, search_filters={"SeriesInstanceUID": series_id}
        )
        return next((s for s in found if _tag(s, "0020000E") == series_id), None)

    def list_images(self) -> List[str]:
        def read():
            found = self._call("series search", self._client.search_for_series, search_filters=self._search_filter)
            return sorted({_tag(s, "0020000E") for s in found})

        return self._cached("images", read)

    def _final_segs(self) -> Dict[str, dict]:
        """{image series: its newest final label {"seg", "study", "ts", "kind"}}: every SEG and every RT Structure
        Set on the server referencing an image of this datastore (the newest of either wins). A structure set that
        has lost its references (anonymised) refers to the only CT series of its study. The app's own drafts
        (output=rtstruct with stow, series description DRAFT_DESCRIPTION) are never final labels."""

        def read():
            images, newest = set(self.list_images()), {}
            for kind in ("SEG", "RTSTRUCT"):
                found = self._call(f"{kind} search", self._client.search_for_series, search_filters={"Modality": kind})
                for series in found:
                    seg_id, study = _tag(series, "0020000E"), _tag(series, "0020000D")
                    if _tag(series, "0008103E") == DRAFT_DESCRIPTION:
                        continue
                    if seg_id not in self._seg_refs:
                        self._seg_refs[seg_id] = self._label_reference(kind, study, seg_id)
                    ref = self._seg_refs[seg_id]
                    if ref is None or ref["image"] not in images:
                        logger.debug(f"{kind} {seg_id} ignored: it references no CT series of this datastore")
                        continue
                    item = {"seg": seg_id, "study": study, "ts": ref["ts"], "kind": kind}
                    old = newest.get(ref["image"])
                    if old is None or (item["ts"], item["seg"]) > (old["ts"], old["seg"]):
                        newest[ref["image"]] = item
            return newest

        return self._cached("segs", read)

    def _label_reference(self, kind: str, study: str, series_id: str) -> Optional[dict]:
        """{"image": the CT series a SEG / RTSTRUCT labels, "ts": its time}; None when it names none here."""
        meta = self._call(f"{kind} metadata", self._client.retrieve_series_metadata, study, series_id)
        first = Dataset.from_json(meta[0]) if meta else Dataset()
        image = None
        if kind == "SEG":
            refs = first.get("ReferencedSeriesSequence")
            image = str(refs[0].SeriesInstanceUID) if refs else None
        else:
            for frame in first.get("ReferencedFrameOfReferenceSequence") or []:
                for ref_study in frame.get("RTReferencedStudySequence") or []:
                    for ref_series in ref_study.get("RTReferencedSeriesSequence") or []:
                        image = image or str(ref_series.SeriesInstanceUID)
            if image is None:  # anonymised: the only CT series of its study
                found = self._call(
                    "CT search", self._client.search_for_series, search_filters={"StudyInstanceUID": study}
                )
                cts = sorted({_tag(s, "0020000E") for s in found if _tag(s, "00080060") == "CT"})
                image = cts[0] if len(cts) == 1 else None
        date = first.get("StructureSetDate", first.get("ContentDate", first.get("SeriesDate", "")))
        clock = first.get("StructureSetTime", first.get("ContentTime", first.get("SeriesTime", "")))
        return {"image": image, "ts": _timestamp(str(date), str(clock))} if image else None

    # ------------------------------------------------------------------ images
    def get_image_uri(self, image_id: str) -> str:
        """The NIfTI of a CT series (downloaded and converted once); "" for an id the server does not have."""
        if not isinstance(image_id, str) or not UID_PATTERN.match(image_id) or len(image_id) > 64:
            return ""
        nifti = os.path.join(self._datastore.image_path(), f"{image_id}.nii.gz")
        if os.path.exists(nifti):
            return os.path.realpath(nifti)
        series = self._series(image_id)
        if series is None:
            return ""
        modality = _tag(series, "00080060", "?")
        if modality != "CT":
            raise HTTPException(
                status_code=400, detail=f"series {image_id} is a {modality} series, not CT: choose a CT series"
            )
        with self._downloads:
            if not os.path.exists(nifti):
                folder = self._download(image_id, _tag(series, "0020000D"), self._datastore.image_path())
                _check_ct_series(image_id, folder)
                converted = dicom_to_nifti(folder)
                LocalDatastore.add_image(self, image_id, converted, self._dicom_info(image_id))
                os.unlink(converted)
        return os.path.realpath(nifti)

    def _download(self, series_id: str, study_id: str, parent: str) -> str:
        """The series' files in ``parent/<series_id>/`` (complete or absent: downloaded beside it, then renamed)."""
        folder = os.path.join(parent, series_id)
        if os.path.isdir(folder) and os.listdir(folder):
            return folder
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".download-", dir=parent)
        try:
            instances = self._call("series download", self._client.retrieve_series, study_id, series_id)
            for instance in instances:
                uid = str(instance.get("SOPInstanceUID", ""))
                if not UID_PATTERN.match(uid) or len(uid) > 64:  # a file name from the server: never a path
                    raise HTTPException(status_code=502, detail=f"series {series_id}: an instance's UID is malformed")
                instance.save_as(os.path.join(tmp, f"{uid}.dcm"))
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

    # ------------------------------------------------------------------ final labels (DICOM SEG)
    def get_labeled_images(self, label_tag: Optional[str] = None, labels: Optional[List[str]] = None) -> List[str]:
        if label_tag not in (None, FINAL):
            return LocalDatastore.get_labeled_images(self, label_tag, labels)
        return sorted(self._final_segs())

    def get_unlabeled_images(self, label_tag: Optional[str] = None, labels: Optional[List[str]] = None) -> List[str]:
        return sorted(set(self.list_images()) - set(self.get_labeled_images(label_tag, labels)))

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """The final label of image ``label_id`` (its newest SEG on the image's voxel grid, NIfTI); "" if none."""
        if label_tag != FINAL:
            return LocalDatastore.get_label_uri(self, label_id, label_tag)
        image_id = image_id or label_id
        seg = self._final_segs().get(image_id)
        if seg is None:
            return ""
        nifti = os.path.join(self._label_dir, f"{seg['seg']}.nii.gz")
        with self._downloads:
            if not os.path.exists(nifti):
                self._convert_seg(image_id, seg, nifti)
        return nifti

    def _convert_seg(self, image_id: str, seg: dict, nifti: str) -> None:
        from medlsam.io.dicom import seg_to_label
        from medlsam.io.volume import write_volume
        from medlsam.utils.atomic import write_json_atomic

        image = self.get_image_uri(image_id)
        folder = self._download(seg["seg"], seg["study"], self._label_dir)
        files = sorted(os.listdir(folder))
        if len(files) != 1:
            raise ValueError(f"{seg.get('kind', 'SEG')} series {seg['seg']} holds {len(files)} instances, expected one")
        if seg.get("kind") == "RTSTRUCT":
            label, names = self._rtstruct_label(image_id, os.path.join(folder, files[0]), image)
        else:
            label, names = seg_to_label(os.path.join(folder, files[0]), image)
        write_json_atomic({str(k): v for k, v in names.items()}, nifti[: -len(".nii.gz")] + ".json")
        write_volume(label.array.astype(np.uint16), label, nifti)

    def _rtstruct_label(self, image_id: str, rtstruct: str, image: str):
        """(label on the image's NIfTI grid, {value: organ}) of a structure set: contours rasterised on the CT series
        by patient coordinates, ROI names mapped to organs (TG-263 and synonyms; targets, PRVs, rings left out)."""
        from medlsam.io.volume import CTVolume, read_volume
        from medlsam.rt.rtstruct import read_rtstruct
        from medlsam.rt.write import label_on_grid

        result = read_rtstruct(rtstruct, os.path.join(self._datastore.image_path(), image_id), synonyms=self.synonyms)
        unmapped = [d.name for d in result.rois if d.status == "unmapped"]
        if unmapped:
            logger.info(f"RTSTRUCT of {image_id}: ROIs not mapped to an organ: {', '.join(unmapped)}")
        volume = read_volume(image)
        array = label_on_grid(result.label, volume)
        return CTVolume(array, volume.affine), result.names

    def rtstruct_of(self, image_id: str, label_file: str, names: Dict[str, int], stow: bool = False) -> str:
        """An inference result (``label_file`` on the image's grid, {organ: value}) as an RT Structure Set of the
        image's CT series, written to a temporary file (the label file is removed); with ``stow`` also stored on
        the DICOMweb server as a draft (DRAFT_DESCRIPTION: never a final label)."""
        import pydicom

        from medlsam.errors import MedLSAMError
        from medlsam.io.volume import read_volume
        from medlsam.rt.write import write_rtstruct

        label = read_volume(label_file)
        present = set(np.unique(label.array).tolist())
        organs = {int(v): n for n, v in names.items() if int(v) in present and int(v) != 0}
        out = os.path.join(tempfile.gettempdir(), f"medlsam-rtstruct-{image_id}-{time.time_ns()}.dcm")
        try:
            path = write_rtstruct(
                label, organs, os.path.join(self._datastore.image_path(), image_id), out, description=DRAFT_DESCRIPTION
            )
        except MedLSAMError as exc:
            raise HTTPException(status_code=400, detail=f"no RT Structure Set written: {exc}") from None
        finally:
            os.unlink(label_file)
        if stow:
            self._call("RTSTRUCT upload (STOW-RS)", self._client.store_instances, [pydicom.dcmread(str(path))])
            logger.info(f"RTSTRUCT draft of {image_id} stored on {self.url} ({len(organs)} organs)")
        return str(path)

    def get_label_info(self, label_id: str, label_tag: str) -> Dict[str, Any]:
        if label_tag != FINAL:
            return LocalDatastore.get_label_info(self, label_id, label_tag)
        seg = self._final_segs().get(label_id)
        names_file = os.path.join(self._label_dir, f"{seg['seg']}.json") if seg else ""
        if not seg or not os.path.exists(names_file):
            return {}
        with open(names_file) as handle:
            names = json.load(handle)
        return {
            "label_info": [{"name": name, "idx": int(value)} for value, name in names.items()],
            "ts": seg["ts"],
            "SeriesInstanceUID": seg["seg"],
        }

    def save_label(
        self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any], label_id: str = ""
    ) -> str:
        """A final label becomes a DICOM SEG on the server (organ names as segment labels); its series id."""
        from medlsam.errors import MedLSAMError
        from medlsam.io.dicom import label_to_seg

        image = self.get_image_uri(image_id)
        if not image:
            raise HTTPException(status_code=404, detail=f"series {str(image_id)[:80]!r} not found on {self.url}")
        label_info = dict(label_info or {})
        check_label(label_filename, image, label_info.get("label_info"), require_organ=label_tag == FINAL)
        if label_tag != FINAL:
            return LocalDatastore.save_label(self, image_id, label_filename, label_tag, label_info)
        names = parse_label_info(label_info.get("label_info"))
        series_dir = os.path.join(self._datastore.image_path(), image_id)
        files = [os.path.join(series_dir, f) for f in sorted(os.listdir(series_dir))]
        with tempfile.TemporaryDirectory() as tmp:
            try:
                seg_file = label_to_seg(label_filename, files, names, os.path.join(tmp, "seg.dcm"))
            except MedLSAMError as exc:
                raise HTTPException(status_code=400, detail=f"label not saved: {exc}") from None
            import pydicom

            seg = pydicom.dcmread(str(seg_file))
            self._call("SEG upload (STOW-RS)", self._client.store_instances, [seg])
        self.refresh()
        logger.info(f"final label of {image_id} stored as DICOM SEG {seg.SeriesInstanceUID} ({len(names)} organs)")
        return str(seg.SeriesInstanceUID)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        raise HTTPException(
            status_code=409, detail=f"labels on the DICOMweb server {self.url} are deleted there (e.g. in Orthanc)"
        )

    def status(self) -> Dict[str, Any]:
        try:
            return {"total": len(self.list_images()), "completed": len(self.get_labeled_images()), "url": self.url}
        except HTTPException as exc:
            return {"total": 0, "completed": 0, "url": self.url, "error": exc.detail}

    def datalist(self, full_path=True) -> List[Dict[str, Any]]:
        return [
            {"image": self.get_image_uri(i), "label": self.get_label_uri(i, FINAL)} for i in self.get_labeled_images()
        ]
