"""The app's option spec (apps/medlsam/lib/option_spec.py): one parser and one error naming the key and what it
accepts, every --conf key the app reads declared, the library's measured defaults matched, and
docs/configuration.md generated from it. No data, no server."""

from __future__ import annotations

import ast
import functools
import importlib.util
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
APP_DIR = REPO_ROOT / "apps" / "medlsam"
CONF_READERS = ("conf_int", "conf_float", "conf_bool", "conf_value")

if str(APP_DIR) not in sys.path:
    sys.path.insert(0, str(APP_DIR))

from lib.conf import parse_conf  # noqa: E402
from lib.option_spec import (  # noqa: E402
    COMMON_INFER_OPTIONS,
    CONF_OPTIONS,
    INFER_OPTIONS,
    MONAI_CONF_KEYS,
    TRAIN_OPTIONS,
    infer_options,
)
from lib.options import Option, OptionError, option, parse, read, train_config  # noqa: E402
from medlsam.errors import MedLSAMError  # noqa: E402

# The app's modules as this file imported them: the server tests load `lib` from private app copies, which stay in
# sys.modules; each test here runs against these (the repository's), so one OptionError class is raised and caught.
APP_MODULES = {name: module for name, module in sys.modules.items() if name == "lib" or name.startswith("lib.")}


@pytest.fixture(autouse=True)
def _repository_app_modules(monkeypatch):
    for name in [name for name in sys.modules if name == "lib" or name.startswith("lib.")]:
        monkeypatch.delitem(sys.modules, name)
    for name, module in APP_MODULES.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.syspath_prepend(str(APP_DIR))


def _generator():
    spec = importlib.util.spec_from_file_location("gen_configuration", REPO_ROOT / "scripts" / "gen_configuration.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_are_generated_from_the_spec():
    """docs/configuration.md is what scripts/gen_configuration.py writes: run it after changing the spec."""
    text = (REPO_ROOT / "docs" / "configuration.md").read_text()
    generator = _generator()
    assert generator.render() == text, "docs/configuration.md is out of date: python scripts/gen_configuration.py"
    for options in (CONF_OPTIONS, COMMON_INFER_OPTIONS, *INFER_OPTIONS.values(), *TRAIN_OPTIONS.values()):
        rows = generator.table(options)
        for item in options:
            assert (f"| `{item.name}` |" in rows) != item.hidden, item.name


def test_names_are_unique_and_defaults_are_accepted():
    for options in (CONF_OPTIONS, *(infer_options(t) for t in INFER_OPTIONS), *TRAIN_OPTIONS.values()):
        names = [o.name for o in options]
        assert len(names) == len(set(names)), names
        for item in options:
            assert item.doc and item.kind, item
            if item.default is not None and item.kind not in ("device", "list"):
                assert read(item, item.default, "test") == item.default, item.name


def test_conf_defaults_are_the_old_ones():
    """Behaviour kept: every --conf default as the app read it before the spec."""
    defaults = parse_conf({})
    assert defaults == {
        "models": ("medlsam",),
        "backend": "lite_medsam",
        "checkpoint": None,
        "medlam": None,
        "mode": "prior",
        "templates": 5,
        "device": "cpu",
        "threads": 0,
        "labels": None,
        "embedding_cache": 2,
        "compile": False,
        "infer_concurrency": 2,
        "prior_weight": None,
        "edit_method": "refiner",
        "adapt_on_save": True,
        "dicomweb_timeout": 120.0,
        "rt_synonyms": None,
        "allowed_hosts": None,
        "cors_origins": None,
        "expose_logs": False,
        "infer_timeout": 600.0,
        "max_voxels": 512 * 512 * 1024,
        "learn_every": 5,
    }
    parsed = parse_conf({"templates": "7", "compile": "YES", "prior_weight": "0.8", "models": "medlsam, all"})
    assert (parsed["templates"], parsed["compile"], parsed["prior_weight"]) == (7, True, 0.8)
    assert parsed["models"] == ["medlsam", "all"]
    assert parse_conf({"prior_weight": "", "server_mode": "true"})["prior_weight"] is None  # MONAI Label's key


@pytest.mark.parametrize(
    "values,needles",
    [
        ({"templtes": "3"}, ["unknown --conf key", "'templtes'", "templates"]),
        ({"templates": "0"}, ["--conf templates", "integer of at least 1", "'0'"]),
        ({"templates": "two"}, ["--conf templates", "integer", "'two'"]),
        ({"threads": "1.5"}, ["--conf threads", "integer"]),
        ({"compile": "maybe"}, ["--conf compile", "true or false", "'maybe'"]),
        ({"mode": "boxes"}, ["--conf mode", "one of prior, wpl, spl", "'boxes'"]),
        ({"edit_method": "magic"}, ["--conf edit_method", "refiner or geodesic"]),
        ({"backend": "sam2"}, ["--conf backend", "lite_medsam", "medsam_vit_b"]),
        ({"prior_weight": "2"}, ["--conf prior_weight", "[0.0, 1.0]", "'2'"]),
        ({"prior_weight": "nan"}, ["--conf prior_weight", "[0.0, 1.0]"]),
        ({"infer_timeout": "0.5"}, ["--conf infer_timeout", "at least 1.0"]),
        ({"max_voxels": "10"}, ["--conf max_voxels", "at least 1000000"]),
        ({"device": "gpu"}, ["--conf device", "cpu, cuda or cuda:N"]),
    ],
)
def test_bad_conf_values_name_the_key_and_what_it_accepts(values, needles):
    with pytest.raises(OptionError) as caught:
        parse_conf(values)
    assert isinstance(caught.value, MedLSAMError)  # the HTTP layer's 400, the start's clear stop
    for needle in needles:
        assert needle in str(caught.value), (needle, str(caught.value))


@pytest.mark.parametrize(
    "trainer,values,needles",
    [
        ("medlam", {"epoch": 2}, ["unknown train option", "'epoch'", "accepted", "epochs"]),
        ("medlam", {"epochs": -1}, ["train option epochs", "[1, 1000]", "-1"]),
        ("medlam", {"epochs": 10**9}, ["train option epochs", "[1, 1000]"]),
        ("medlam", {"epochs": "abc"}, ["train option epochs", "integer"]),
        ("medlam", {"epochs": 2.5}, ["train option epochs", "integer"]),
        ("medlam", {"epochs": True}, ["train option epochs", "integer"]),
        ("medlam", {"learning_rate": 0}, ["train option learning_rate", "(0.0, 1.0]"]),
        ("medlam", {"init": "warm"}, ["train option init", "current or scratch", "'warm'"]),
        ("medlam", {"multi_gpu": "maybe"}, ["train option multi_gpu", "true or false"]),
        ("medlam", {"device": "gpu"}, ["train option device", "cpu, cuda or cuda:N", "'gpu'"]),
        ("medlam", {"device": 3}, ["train option device", "cpu, cuda or cuda:N"]),
        ("lite_medsam", {"steps": 0}, ["train option steps", "[1, 100000]"]),
        ("segmentation", {"device": "cuda:99"}, ["train option device", "cuda:99"]),
        ("segmentation", {"device": "tpu"}, ["train option device", "cpu, cuda or cuda:N", "'tpu'"]),
        ("lite_medsam", {"epochs": 3}, ["unknown train option", "'epochs'", "slice_step"]),
    ],
)
def test_bad_train_options_name_the_key_and_what_it_accepts(trainer, values, needles):
    from lib.trainers.options import check_train_options

    with pytest.raises(OptionError) as caught:
        check_train_options(values, TRAIN_OPTIONS[trainer])
    for needle in needles:
        assert needle in str(caught.value), (needle, str(caught.value))


def test_train_options_keep_their_defaults_and_monai_keys():
    from lib.trainers.options import check_train_options

    request = {"model": "medlam", "local_rank": 0, "description": "x", "bundle_path": "", "epochs": "2"}
    options = check_train_options(request, TRAIN_OPTIONS["medlam"])
    assert options["epochs"] == 2 and options["learning_rate"] == 1e-4 and options["device"] == "cpu"
    assert options["init"] == "current" and options["publish"] == "if_better" and options["multi_gpu"] is True
    assert check_train_options({"init": ["scratch", "current"]}, TRAIN_OPTIONS["medlam"])["init"] == "scratch"
    assert check_train_options({}, TRAIN_OPTIONS["segmentation"])["device"] is None  # the server's device
    assert check_train_options({"device": "CPU"}, TRAIN_OPTIONS["segmentation"])["device"] == "cpu"
    assert check_train_options({"gpus": "all"}, TRAIN_OPTIONS["lite_medsam"]) == {
        "steps": 120,
        "slice_step": 3,
        "threads": 0,
        "device": "cpu",
    }
    config = train_config(TRAIN_OPTIONS["medlam"])  # /info/: as before the spec
    assert list(config) == [
        "epochs",
        "iterations_per_epoch",
        "batch_size",
        "learning_rate",
        "device",
        "multi_gpu",
        "gpus",
        "processes",
        "workers",
        "init",
        "publish",
        "validation_pairs",
        "max_images",
        "threads",
        "base_channels",
    ]
    assert config["init"] == ["current", "scratch"] and config["publish"] == ["if_better", "always"]
    assert config["device"][0] == "cpu"


def test_infer_options_refuse_bad_values_and_leave_other_keys():
    spec = infer_options("sam_3d")
    parsed = parse(spec, {"max_slices": "3", "Brainstem": [[1, 2, 3]], "client_id": "x"}, "infer option", None)
    assert parsed["max_slices"] == 3 and parsed["min_iou"] == 0.5 and parsed["result_dtype"] == "uint8"
    cases = [
        ("sam_3d", {"max_slices": -5}, "infer option max_slices must be an integer in [0, 10000], not -5"),
        ("sam_3d", {"min_iou": "NaN"}, "infer option min_iou must be a number in [0.0, 1.0], not 'NaN'"),
        ("medlam", {"refine": "maybe"}, "infer option refine must be true or false, not 'maybe'"),
        ("medlam", {"mode": "prior"}, "infer option mode must be wpl or spl, not 'prior'"),
        ("medlsam", {"organs": [1, 2]}, "infer option organs must be a list of names"),
        ("medlsam", {"result_extension": ".exe"}, "infer option result_extension must be one of .nii.gz"),
        ("edit", {"method": "magic"}, "method must be refiner or geodesic"),
        ("edit", {"label_names": [1]}, "infer option label_names must be a JSON object"),
        ("sam", {"device": "gpu"}, "infer option device must be cpu, cuda or cuda:N"),
        ("sam", {"save_label": "perhaps"}, "infer option save_label must be true or false"),
    ]
    for task, values, needle in cases:
        with pytest.raises(OptionError) as caught:
            parse(infer_options(task), values, "infer option", None)
        assert needle in str(caught.value), (task, str(caught.value))


def test_infer_helpers_read_through_the_spec():
    from lib.infers.common import http_error, result_options
    from lib.infers.options import organs_option, prior_weight, request_mode

    assert request_mode({"mode": ["spl", "wpl"]}, "wpl", ["wpl", "spl"]) == "spl"  # a client echoing the config
    assert request_mode({}, "spl", ["wpl", "spl"]) == "spl"
    assert organs_option({"organs": "Brainstem, Mandible"}) == ["Brainstem", "Mandible"]
    assert organs_option({"organs": ""}) is None and prior_weight({}, 0.3) == 0.3
    assert result_options({}) == (".nii.gz", "uint8")
    with pytest.raises(OptionError) as caught:
        prior_weight({"prior_weight": "2"})
    error = http_error(caught.value)
    assert error.status_code == 400 and "prior_weight" in error.detail and "[0.0, 1.0]" in error.detail


def _module_constants(tree: ast.Module) -> dict:
    constants = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                constants[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return constants


def _literal(node, constants: dict):
    if isinstance(node, ast.Name) and node.id in constants:
        return constants[node.id]
    try:
        return ast.literal_eval(node)
    except ValueError:
        return ...  # not a literal (e.g. a library default): checked against the library below


def _app_sources():
    for path in sorted(APP_DIR.rglob("*.py")):
        if "model" not in path.relative_to(APP_DIR).parts:
            yield path, ast.parse(path.read_text())


def _conf_reads():
    """(file, key, call) of every --conf lookup in the app: the readers, ``conf.get(key)``, ``conf[key]``, and
    ``options[key]`` in a module that reads ``options = parse_conf(conf)``."""
    for path, tree in _app_sources():
        parsed = any(getattr(n.func, "id", None) == "parse_conf" for n in ast.walk(tree) if isinstance(n, ast.Call))
        names = ("conf", "options") if parsed else ("conf",)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in CONF_READERS:
                yield path, _literal(node.args[1], {}), node
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
                owner = node.func.value
                owner = owner.values[0] if isinstance(owner, ast.BoolOp) else owner  # (conf or {}).get(...)
                if (getattr(owner, "id", None) or getattr(owner, "attr", None)) == "conf" and node.args:
                    yield path, _literal(node.args[0], {}), None
            elif isinstance(node, ast.Subscript) and getattr(node.value, "id", None) in names:
                yield path, _literal(node.slice, {}), None


def test_every_conf_key_the_app_reads_is_declared():
    declared = {o.name: o for o in CONF_OPTIONS}
    seen = set()
    for path, key, call in _conf_reads():
        where = path.relative_to(REPO_ROOT)
        if key is ... and path.parent.name == "lib" and path.name in ("conf.py", "options.py"):
            continue  # the readers themselves
        assert key in declared or key in MONAI_CONF_KEYS, f"{where} reads --conf {key!r}, not in lib/option_spec.py"
        seen.add(key)
        if call is not None and len(call.args) > 2:  # an older reader's literal default and bounds: the spec's
            item = declared[key]
            for got, want in zip([_literal(a, {}) for a in call.args[2:]], (item.default, item.low, item.high)):
                assert got is ... or got == want, f"{where}: --conf {key} read with {got}, the spec says {want}"
    assert seen - {...} == set(declared), "declared --conf keys the app never reads"


def test_infer_number_callers_use_the_spec_bounds():
    """The tasks' ``number(request, key, default, cast, low, high)`` calls pass the spec's default and bounds."""
    checked = 0
    for path, tree in _app_sources():
        constants = _module_constants(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "number" and len(node.args) == 6:
                key = _literal(node.args[1], constants)
                items = [o for options in INFER_OPTIONS.values() for o in options if o.name == key]
                assert items, f"{path.name}: infer option {key!r} is not in lib/option_spec.py"
                kind = "int" if getattr(node.args[3], "id", None) == "int" else "float"
                got = [_literal(a, constants) for a in (node.args[2], node.args[4], node.args[5])]
                want = [items[0].default, items[0].low, items[0].high]
                assert items[0].kind == kind and all(g is ... or g == w for g, w in zip(got, want)), (key, got, want)
                checked += 1
    assert checked >= 3


@functools.lru_cache(maxsize=1)
def _source_constants() -> dict:
    """Literal module constants and dataclass field defaults of the library and the app, read from their source
    (importing the segmenters would take seconds): {"NAME": value, "Class.field": value}."""
    found = {}

    def value(node):
        try:
            return ast.literal_eval(node)
        except ValueError:
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
                left, right = value(node.left), value(node.right)
                return left * right if isinstance(left, int) and isinstance(right, int) else ...
            return ...

    for root in (REPO_ROOT / "lib" / "medlsam", APP_DIR / "lib"):
        for path in root.rglob("*.py"):
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
                    found.setdefault(node.targets[0].id, value(node.value))
                elif isinstance(node, ast.ClassDef):
                    for item in node.body:
                        if isinstance(item, ast.AnnAssign) and item.value is not None:
                            found.setdefault(f"{node.name}.{item.target.id}", value(item.value))
    return found


def test_spec_matches_the_library_and_app_constants():
    from lib.option_spec import BACKENDS, SEGMENT_MODES

    lib = _source_constants()
    assert set(SEGMENT_MODES) == set(lib["MODES"]) and BACKENDS == ("lite_medsam", *lib["SAM_ARCHS"])
    conf = {o.name: o.default for o in CONF_OPTIONS}
    assert conf["max_voxels"] == lib["DEFAULT_MAX_VOXELS"] and conf["infer_timeout"] == lib["DEFAULT_INFER_TIMEOUT_S"]
    assert conf["dicomweb_timeout"] == lib["READ_TIMEOUT_S"] and conf["backend"] == lib["BACKEND_DEFAULT"]
    defaults = {
        ("medlsam", "refine"): "LocalizeOptions.refine",
        ("medlsam", "match"): "LocalizeOptions.match",
        ("sam_3d", "max_slices"): "PropagationOptions.max_slices",
        ("sam_3d", "min_iou"): "PropagationOptions.min_iou",
        ("edit", "reach_mm"): "EditOptions.reach_mm",
    }
    for (task, name), field in defaults.items():
        assert option(INFER_OPTIONS[task], name).default == lib[field], (task, name, lib[field])
    for name in ("steps", "slice_step"):
        assert option(TRAIN_OPTIONS["lite_medsam"], name).default == lib[f"AdaptOptions.{name}"], name
    for name in ("max_epochs", "time_limit_min", "threads"):
        assert option(TRAIN_OPTIONS["segmentation"], name).default == lib[f"LearnOptions.{name}"], name


def test_option_declarations_are_checked():
    with pytest.raises(ValueError):
        Option("x", "number", 1, "doc")
    with pytest.raises(ValueError):
        Option("x", "choice", "a", "doc")
    with pytest.raises(KeyError, match="not declared"):
        option(CONF_OPTIONS, "nosuch")


def test_agnostic_auto_is_combo_on_a_gpu_and_blobs_on_a_cpu():
    from medlsam.interact.edit_requests import agnostic_path

    assert option(INFER_OPTIONS["edit"], "agnostic").default == "auto"
    assert [agnostic_path("auto", d) for d in ("cpu", "cuda", "cuda:1")] == ["blobs", "combo", "combo"]
    assert [agnostic_path(m, "cuda") for m in ("blobs", "combo")] == ["blobs", "combo"]  # asked for: kept
