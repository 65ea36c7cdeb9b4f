"""Load a MONAI Label folder datastore (e.g. `make sample-datastore`) into a DICOMweb server: every scan as a DICOM
CT series, every final label as a DICOM SEG of its series (organ names as segment labels, dcmqi).

    python scripts/load_dicomweb.py --studies sample-datastore --url http://127.0.0.1:8042/dicom-web \
        [--state runs/orthanc/loaded.json]

Scans already on the server (recorded in --state) are not stored twice.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "lib"))


def organ_names(studies: Path, label_info) -> dict[int, str]:
    """{value: name} from a label's saved label_info, else the datastore's labels.json."""
    names = {}
    for item in label_info if isinstance(label_info, list) else []:
        try:
            names[int(item["idx"])] = str(item["name"])
        except (KeyError, TypeError, ValueError):
            continue
    if not names and (studies / "labels.json").is_file():
        names = {int(k): v for k, v in json.loads((studies / "labels.json").read_text()).items()}
    return names


def series_on_server(url: str, series_uid: str) -> bool:
    import requests

    answer = requests.get(f"{url}/series", params={"SeriesInstanceUID": series_uid}, timeout=30)
    return answer.status_code == 200 and bool(answer.text.strip()) and answer.json() != []


def load(studies: Path, url: str, state_path: Path) -> dict:
    from monailabel.datastore.local import LocalDatastore

    from medlsam.io.dicom import SeriesFields, export_ct_series, label_to_seg, stow_files

    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    store = LocalDatastore(str(studies), extensions=("*.nii.gz", "*.nii", "*.nrrd"), auto_reload=False)
    for image_id in sorted(store.list_images()):
        entry = state.get(image_id)
        if entry and series_on_server(url, entry["series"]):
            continue
        tic = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            fields = SeriesFields(patient_id=image_id, patient_name=image_id, study_description=image_id)
            series = export_ct_series(store.get_image_uri(image_id), Path(tmp) / "ct", fields)
            stow_files(series.files, url)
            entry = {"study": series.study_uid, "series": series.series_uid}
            label = store.get_label_uri(image_id, "final")
            if label:
                info = store.get_label_info(image_id, "final") or {}
                seg = label_to_seg(
                    label, series.files, organ_names(studies, info.get("label_info")), Path(tmp) / "s.dcm"
                )
                stow_files([seg], url)
                entry["seg"] = True
        state[image_id] = entry
        state_path.parent.mkdir(parents=True, exist_ok=True)
        state_path.write_text(json.dumps(state, indent=2))
        kind = "CT + final label as SEG" if entry.get("seg") else "CT"
        print(f"{image_id}: {kind}, study {entry['study']} ({time.perf_counter() - tic:.1f} s)", flush=True)
    return state


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", default="sample-datastore")
    parser.add_argument("--url", required=True, help="DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web")
    parser.add_argument("--state", default="runs/orthanc/loaded.json")
    parser.add_argument("--ohif", help="the app's URL: print the OHIF link of every unlabeled scan")
    args = parser.parse_args(argv)
    state = load(Path(args.studies), args.url.rstrip("/"), Path(args.state))
    print(f"{len(state)} series on {args.url} ({sum(bool(e.get('seg')) for e in state.values())} with a SEG label)")
    for image_id, entry in state.items():
        if args.ohif and not entry.get("seg"):
            print(f"  {image_id}: {args.ohif}/ohif/monai-label?StudyInstanceUIDs={entry['study']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
