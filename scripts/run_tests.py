"""The test suite as two pytest processes side by side (`make test`, which CI runs): the server and training tests
beside the data and unit tests. Each test uses one torch thread, and in one process the suite kept about one of the
2-core CI machine's cores busy (36.7 CPU minutes in 36.7 minutes); side by side it took 23 minutes, not 37. Each
process has its own temporary folder and log; the logs are printed when both have ended (then the folders are
removed), and the exit status is the first failing one's (0 when both pass).

    python scripts/run_tests.py [--groups tests/server:tests/training,tests/data:tests/unit] [-- pytest args]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GROUPS = "tests/server:tests/training,tests/data:tests/unit"  # groups by ",", a group's folders by ":"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", default=GROUPS, help="groups of test folders run side by side (see the module)")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    groups = [group.split(":") for group in args.groups.split(",")]
    missing = [folder for group in groups for folder in group if not (REPO / folder).is_dir()]
    if missing:
        parser.error(f"no test folder {missing}")
    work = Path(tempfile.mkdtemp(prefix="medlsam-tests-"))
    runs = []
    tic = time.monotonic()
    for number, folders in enumerate(groups):
        log = work / f"group{number}.log"
        command = [sys.executable, "-m", "pytest", "-q", "--durations=15", f"--basetemp={work / f'tmp{number}'}"]
        command += ["-p", "no:cacheprovider", *extra, *folders]
        print(f"[run_tests] group {number}: {' '.join(folders)} (log {log})", flush=True)
        runs.append(
            (folders, log, subprocess.Popen(command, cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT))
        )
    codes = []
    for folders, log, process in runs:
        codes.append(process.wait())
        print(f"\n[run_tests] ===== {' '.join(folders)}: exit {codes[-1]} =====", flush=True)
        sys.stdout.write(log.read_text(errors="replace"))
    print(f"\n[run_tests] exit codes {codes}, {time.monotonic() - tic:.0f} s wall", flush=True)
    shutil.rmtree(work, ignore_errors=True)  # the logs are printed above
    return next((code for code in codes if code), 0)


if __name__ == "__main__":
    raise SystemExit(main())
