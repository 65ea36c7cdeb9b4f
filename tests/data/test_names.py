"""Organ-names files: every form a user has at hand is read, every malformed one is a clear error naming the
file, through the library and through `medlsam templates build`."""

from __future__ import annotations

import json

import pytest

from medlsam.cli import main as cli_main
from medlsam.utils.names import NamesFileError, read_names

EXPECTED = {1: "Brainstem", 2: "SpinalCord"}


@pytest.mark.parametrize(
    "content",
    [
        {"1": "Brainstem", "2": "SpinalCord"},
        {"Brainstem": 1, "SpinalCord": 2},
        {"0": "background", "1": "Brainstem", "2": "SpinalCord"},
        {"labels": {"1": "Brainstem", "2": "SpinalCord"}, "cases": []},
        {"labels": {"background": 0, "Brainstem": 1, "SpinalCord": 2}},
        {"labels": ["background", "Brainstem", "SpinalCord"]},
        {"labels": [{"name": "Brainstem", "idx": 1}, {"name": "SpinalCord", "idx": 2}]},
    ],
    ids=[
        "value-name",
        "name-value",
        "with-background",
        "dataset-dict",
        "dataset-inverted",
        "dataset-list",
        "label-info",
    ],
)
def test_accepted_forms(tmp_path, content):
    path = tmp_path / "names.json"
    path.write_text(json.dumps(content))
    assert read_names(path) == EXPECTED


def test_the_real_dataset_json(data_dir):
    names = read_names(data_dir / "openkbp" / "dataset.json")
    assert names[1] == "Brainstem" and names[7] == "Mandible" and len(names) == 7


@pytest.mark.parametrize(
    "text, message",
    [
        (None, "does not exist"),
        ("not json {", "is not JSON"),
        ('{"labels": ["Brainstem", "SpinalCord"]}', 'must start with "background"'),
        ('{"1": 2, "3": 4}', "both keys and values are numbers"),
        ('{"1": "Brainstem", "SpinalCord": 2}', "neither the keys nor the values"),
        ('{"1": "Brainstem", "2": "Brainstem"}', "given twice"),
        ('{"1": ""}', "has no organ name"),
        ('{"labels": [{"name": "Brainstem"}]}', "no integer label value"),
        ('{"0": "background"}', "no organ names"),
        ("[1, 2]", "a labels list must hold"),
    ],
    ids=[
        "missing",
        "not-json",
        "bare-list",
        "numbers",
        "mixed",
        "duplicate",
        "empty-name",
        "no-value",
        "only-background",
        "number-list",
    ],
)
def test_malformed_files_name_the_file_and_the_problem(tmp_path, text, message):
    path = tmp_path / "names.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(NamesFileError, match=message) as error:
        read_names(path)
    assert str(path) in str(error.value)


def test_templates_build_with_a_bad_names_file_is_a_clear_cli_error(tmp_path, capsys):
    path = tmp_path / "names.json"
    path.write_text('{"labels": [{"name": "Brainstem"}]}')
    code = cli_main(
        [
            "templates",
            "build",
            "--images",
            "scan.nii.gz",
            "--labels",
            "label.nii.gz",
            "--names",
            str(path),
            "--out",
            str(tmp_path / "bank.pt"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("medlsam: error: names file") and str(path) in err and "Traceback" not in err
    assert not (tmp_path / "bank.pt").exists()
