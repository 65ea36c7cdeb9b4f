"""Build a MONAI Label datastore from the OpenKBP data: a few template scans with final labels (and their
organ names as Slicer's label_info), plus unlabeled scans to segment and to train MedLAM on.

    python scripts/make_sample_datastore.py [--data ../shared/data] [--out sample-datastore]
                                            [--templates 3] [--unlabeled 5] [--copy]

Templates: the first train-split cases with all seven organs contoured. Unlabeled: validation-split scans.
Images are hard-linked where the file system allows it (else copied; always copied with --copy), never symlinked:
deleting a scan through the server then removes the datastore's entry only, never the shared data. Labels are saved
through MONAI Label's datastore API.
Existing entries are kept, so running it again is cheap.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data",
        default=os.environ.get("MEDLSAM_DATA", REPO_ROOT.parent / "shared" / "data"),
        help="shared data folder holding openkbp/ (default: $MEDLSAM_DATA or ../shared/data)",
    )
    parser.add_argument("--out", default=REPO_ROOT / "sample-datastore")
    parser.add_argument("--templates", type=int, default=3)
    parser.add_argument("--unlabeled", type=int, default=5)
    parser.add_argument("--copy", action="store_true", help="copy the scans instead of hard-linking them")
    args = parser.parse_args(argv)

    kbp = Path(args.data) / "openkbp"
    if not (kbp / "dataset.json").is_file():
        print(
            f"error: {kbp}/dataset.json not found: the data folder must hold openkbp/. With make, give it as "
            f"`make sample-datastore DATA=/path/to/data` (or `make serve DATA=...`); running this script, pass "
            f"--data /path/to/data",
            file=sys.stderr,
        )
        return 2
    dataset = json.loads((kbp / "dataset.json").read_text())
    names = {int(k): v for k, v in dataset["labels"].items()}
    value_of = {v: k for k, v in names.items()}
    cases = dataset["cases"]
    templates = [c for c in cases if c["split"] == "train" and len(c["contoured"]) == len(names)][: args.templates]
    unlabeled = [c for c in cases if c["split"] == "validation"][: args.unlabeled]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for case in templates + unlabeled:
        src = (kbp / "images" / f"{case['id']}.nii.gz").resolve()
        dst = out / f"{case['id']}.nii.gz"
        if dst.is_symlink():  # made by an earlier version: a delete through the server followed it
            dst.unlink()
        if dst.exists():
            continue
        try:
            if args.copy:
                raise OSError("copy asked for")
            os.link(src, dst)
        except OSError:  # another file system, or --copy
            shutil.copy(src, dst)
    (out / "labels.json").write_text(json.dumps({str(k): v for k, v in names.items()}, indent=2))

    from monailabel.datastore.local import LocalDatastore

    store = LocalDatastore(str(out), extensions=("*.nii.gz",), auto_reload=False)
    labelled = set(store.get_labeled_images())
    for case in templates:
        if case["id"] in labelled:
            continue
        info = [{"name": n, "idx": value_of[n]} for n in case["contoured"]]
        store.save_label(case["id"], str(kbp / "labels" / f"{case['id']}.nii.gz"), "final", {"label_info": info})
        saved = store.get_label_uri(case["id"], "final")
        os.chmod(saved, 0o644)  # the source labels are read-only: let users overwrite the saved copy
    print(
        f"{out}: {len(templates)} template scans with final labels ({', '.join(c['id'] for c in templates)}), "
        f"{len(unlabeled)} unlabeled scans; organ names in labels.json"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
