"""What `medlsam localize` and `medlsam segment` (default, prior alone, SAM + prior) write for three OpenKBP validation
scans is pinned in tests/golden/outputs.json (made with the code before the library's restructuring, by
scripts/pin_outputs.py): the current code must write exactly the same labels and JSON. The test checks the first
scan's pinned outputs (about half the time: the three took 419 s of a 33 min CI); ``pin(data)`` writes all
three for a full comparison."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCANS = ("openkbp_pt_201",)  # of the pinned scans


@pytest.mark.slow
def test_outputs_are_identical_to_the_pinned_ones(data_dir):
    spec = importlib.util.spec_from_file_location("pin_outputs", REPO_ROOT / "scripts" / "pin_outputs.py")
    pin_outputs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pin_outputs)
    pinned = json.loads((REPO_ROOT / "tests" / "golden" / "outputs.json").read_text())
    expected = {key: value for key, value in pinned.items() if key.split()[0] in SCANS}
    assert len(expected) == 1 + len(pin_outputs.RUNS)  # the scan's localize and each segment run
    actual = json.loads(json.dumps(pin_outputs.pin(data_dir, SCANS), sort_keys=True))  # same types as the file
    assert sorted(actual) == sorted(expected)
    changed = [key for key in expected if actual[key] != expected[key]]
    details = {key: {"expected": expected[key], "actual": actual[key]} for key in changed[:2]}
    assert not changed, f"outputs changed: {changed}\n{json.dumps(details, indent=1)[:4000]}"
