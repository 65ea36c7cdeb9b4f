"""The medlsam package as a user installs it: `pip install .` (not editable) gives the `medlsam` command and the
library with its shipped weights, working from any folder; every third-party import of lib/medlsam is declared in
pyproject.toml. No network: the package alone is built and installed (--no-deps) into a private folder that shadows
the checkout's editable install."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import make_phantom

REPO_ROOT = Path(__file__).resolve().parents[2]
LIBRARY = REPO_ROOT / "lib" / "medlsam"
SHIPPED_FINGERPRINT = "416179d323899aa9"  # the shipped MedLAM's (apps/medlsam/model/README.md)

# In the installed package, from another folder: every module imports from there, the weights are package data,
# and a checkout's data folder is not guessed.
IMPORT_ALL = """
import json, os, pkgutil, importlib, sys
import medlsam
from medlsam.errors import MedLSAMError
from medlsam.paths import SHIPPED_CLICK_REFINER, SHIPPED_MEDLAM, data_dir
modules = [m.name for m in pkgutil.walk_packages(medlsam.__path__, "medlsam.")]
files = {name: importlib.import_module(name).__file__ for name in modules}
try:
    data = str(data_dir())
except MedLSAMError as exc:
    data = f"error: {exc}"
print(json.dumps({"package": medlsam.__file__, "modules": files, "data": data,
                  "weights": [str(p) for p in (SHIPPED_MEDLAM, SHIPPED_CLICK_REFINER) if p.is_file()]}))
"""


def _imports(folder: Path) -> dict[str, set[str]]:
    """Top-level third-party modules imported anywhere under folder -> the files importing them."""
    found: dict[str, set[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "medlsam":
                    found.setdefault(top, set()).add(path.relative_to(folder).as_posix())
    return found


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_third_party_import_of_the_library_is_a_declared_dependency():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    declared = {_canonical(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", r.strip()).group(0)) for r in requirements}
    providers = importlib.metadata.packages_distributions()
    missing = []
    for module, users in sorted(_imports(LIBRARY).items()):
        distributions = {_canonical(d) for d in providers.get(module, [])}
        if not distributions:
            missing.append(f"{module} (imported by {sorted(users)}): no installed distribution provides it")
        elif not distributions & declared:
            missing.append(f"{module} (imported by {sorted(users)}): declare {sorted(distributions)} in pyproject.toml")
    assert not missing, "undeclared dependencies of lib/medlsam:\n" + "\n".join(missing)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """pip install . (a wheel, not editable) of a copy of the package's sources into a private folder."""
    tmp = tmp_path_factory.mktemp("package")
    source = tmp / "source"
    (source / "lib").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "pyproject.toml", source)
    shutil.copytree(LIBRARY, source / "lib" / "medlsam", ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp / "site"
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    done = subprocess.run(
        command + ["--target", str(site), str(source)], capture_output=True, text=True, timeout=300, cwd=tmp
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return site


def _run(site: Path, folder: Path, *args: str) -> subprocess.CompletedProcess:
    """A command run from a folder outside the checkout, with the private install first on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("MEDLSAM_MEDLAM", "MEDLSAM_DATA", "PYTHONPATH")}
    env["PYTHONPATH"] = str(site)
    return subprocess.run(list(args), capture_output=True, text=True, timeout=300, cwd=folder, env=env)


def test_the_installed_package_imports_whole_from_its_own_folder(installed, tmp_path):
    done = _run(installed, tmp_path, sys.executable, "-c", IMPORT_ALL)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(report["package"]).is_relative_to(installed), report["package"]
    outside = {name: path for name, path in report["modules"].items() if not Path(path).is_relative_to(installed)}
    assert not outside, outside
    sources = [p.relative_to(LIBRARY.parent).with_suffix("").parts for p in LIBRARY.rglob("*.py")]
    modules = {".".join(parts[:-1] if parts[-1] == "__init__" else parts) for parts in sources} - {"medlsam"}
    assert modules == set(report["modules"])  # every module of lib/medlsam, none left out of the wheel
    assert [Path(p).name for p in report["weights"]] == ["pretrained_medlam.pt", "click_refiner.pt"]
    assert all(Path(p).is_relative_to(installed) for p in report["weights"]), report["weights"]
    assert report["data"].startswith("error: ") and "MEDLSAM_DATA" in report["data"]


def test_the_installed_command_builds_a_bank_with_the_shipped_medlam(installed, tmp_path):
    """`medlsam templates build` on a small phantom loads the shipped MedLAM from the installed package."""
    from medlsam.io.volume import write_volume

    ct, label = make_phantom((64, 64, 48))
    write_volume(ct.array, ct, tmp_path / "ct.nii.gz")
    write_volume(label.array, label, tmp_path / "label.nii.gz")
    command = str(installed / "bin" / "medlsam")
    assert "templates" in _run(installed, tmp_path, command, "--help").stdout
    args = ["templates", "build", "--images", "ct.nii.gz", "--labels", "label.nii.gz", "--out", "bank.pt"]
    build = _run(installed, tmp_path, command, *args)
    assert build.returncode == 0, build.stderr
    show = _run(installed, tmp_path, command, "templates", "show", "bank.pt", "--json")
    assert show.returncode == 0, show.stderr
    summary = json.loads(show.stdout)
    assert Path(summary["medlam"]).is_relative_to(installed), summary["medlam"]
    assert summary["model_fingerprint"] == SHIPPED_FINGERPRINT and summary["matches_medlam"]
    assert list(summary["organs"]) == ["label_1"]
