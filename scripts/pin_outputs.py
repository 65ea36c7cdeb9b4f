"""Pin what the `medlsam` command writes, so that a refactoring can prove it changed nothing: for a few
OpenKBP validation scans, the sha256 of the label volumes of `medlsam segment` (default, prior alone, SAM + prior) and
of `medlsam localize`'s boxes JSON, and each JSON with its timings left out.

    python scripts/pin_outputs.py --out tests/golden/outputs.json [--data ../shared/data]

`tests/data/test_golden.py` runs the same commands with the current code and compares. Everything runs through
the command line (one torch thread), the interface that stays the same across versions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ("openkbp_pt_4", "openkbp_pt_13")  # the first two protocol templates
SCANS = ("openkbp_pt_201", "openkbp_pt_202", "openkbp_pt_203")  # the first validation scans
# default: with the shipped LiteMedSAM the prior alone (issue 12: it does not pay); sam: SAM blended with the prior
RUNS = {"default": [], "prior": ["--prior-weight", "1"], "sam": ["--prior-weight", "0.8"]}
UNPINNED = ("timings_s", "image", "latencies")  # vary from run to run or machine to machine


def _run(args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, torch; torch.set_num_threads(1); from medlsam.cli import main; sys.exit(main(sys.argv[1:]))",
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"medlsam {' '.join(args)} failed:\n{done.stderr[-3000:]}")


def _pinned_json(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in UNPINNED}


def _label_digest(path: Path) -> dict:
    from medlsam.io.volume import read_volume

    array = read_volume(path).array
    return {
        "sha256": hashlib.sha256(array.tobytes()).hexdigest(),
        "dtype": str(array.dtype),
        "shape": list(array.shape),
        "voxels": int((array > 0).sum()),
    }


def pin(data: Path, scans: tuple[str, ...] = SCANS) -> dict:
    """The pinned outputs of the current code."""
    kbp = data / "openkbp"
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        bank = Path(tmp) / "bank.pt"
        _run(
            [
                "templates",
                "build",
                "--images",
                *(str(kbp / "images" / f"{t}.nii.gz") for t in TEMPLATES),
                "--labels",
                *(str(kbp / "labels" / f"{t}.nii.gz") for t in TEMPLATES),
                "--names",
                str(kbp / "dataset.json"),
                "--out",
                str(bank),
            ]
        )
        for scan in scans:
            image = str(kbp / "images" / f"{scan}.nii.gz")
            boxes = Path(tmp) / f"{scan}_boxes.json"
            _run(["localize", image, "--templates", str(bank), "--out", str(boxes)])
            out[f"{scan} localize"] = _pinned_json(boxes)
            for name, extra in RUNS.items():
                label = Path(tmp) / f"{scan}_{name}.nii.gz"
                _run(["segment", image, "--templates", str(bank), "--out", str(label), "--quiet", *extra])
                out[f"{scan} segment {name}"] = {
                    "label": _label_digest(label),
                    "json": _pinned_json(Path(f"{label}.json")),
                }
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("MEDLSAM_DATA", REPO_ROOT.parent / "shared" / "data"))
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    pinned = pin(Path(args.data))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(pinned, indent=1, sort_keys=True) + "\n")
    print(f"{args.out}: {len(pinned)} outputs pinned")
    return 0


if __name__ == "__main__":
    sys.exit(main())
