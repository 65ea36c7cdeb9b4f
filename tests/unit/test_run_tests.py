"""`make test`'s runner (scripts/run_tests.py): its groups run side by side and a failing group fails the run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RUNNER = [sys.executable, str(REPO / "scripts" / "run_tests.py")]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*RUNNER, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_each_group_runs_in_its_own_process_and_its_log_is_printed():
    done = _run("--groups", "tests/unit,tests/unit", "--", "-k", "added_clicks")
    assert done.returncode == 0, done.stdout[-2000:]
    assert done.stdout.count("1 passed") == 2 and "exit codes [0, 0]" in done.stdout


def test_a_failing_group_fails_the_run_and_a_missing_folder_is_named():
    done = _run("--groups", "tests/unit,tests/unit", "--", "-k", "no_test_has_this_name")
    assert done.returncode == 5 and "exit codes [5, 5]" in done.stdout  # pytest: no test collected
    done = _run("--groups", "tests/nowhere")
    assert done.returncode == 2 and "no test folder ['tests/nowhere']" in done.stderr
