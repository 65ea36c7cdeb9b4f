"""The QC picture and the commands a first-time user reads: `segment --qc [--qc-reference]` and
`templates show`, on the real abdomen slab with the shipped MedLAM (prior alone: no SAM encoder)."""

from __future__ import annotations

import json

import matplotlib.image
import numpy as np
import pytest
from conftest import right_anterior_marker

from medlsam.atlas.bank_builder import build_bank
from medlsam.cli import main as cli_main
from medlsam.io.volume import CTVolume, read_volume, write_volume
from medlsam.medlam.network import load_medlam
from medlsam.paths import default_medlam_path
from medlsam.segment.qc import _display


@pytest.fixture(scope="module")
def case(data_dir, tmp_path_factory):
    """The abdomen slab (every 3rd slice), its reference label and a 3-organ bank built from it."""
    folder = data_dir / "abdomen"
    ct, label = read_volume(folder / "abdomen_slab_ct.nii.gz"), read_volume(folder / "abdomen_slab_label.nii.gz")
    names = {int(k): v for k, v in json.loads((folder / "README.json").read_text())["labels"].items()}
    affine = ct.affine.copy()
    affine[:3, 2] *= 3
    ct = CTVolume(np.ascontiguousarray(ct.array[:, :, ::3], dtype=np.float32), affine, "slab")
    keep = {v: n for v, n in names.items() if n in ("liver", "stomach", "spleen")}
    reference = np.where(np.isin(label.array[:, :, ::3], list(keep)), label.array[:, :, ::3], 0).astype(np.uint8)
    out = tmp_path_factory.mktemp("qc")
    write_volume(ct.array, ct, out / "ct.nii.gz")
    write_volume(reference, ct, out / "reference.nii.gz")
    build_bank(load_medlam(default_medlam_path()), [ct], [CTVolume(reference, affine)], keep).save(out / "bank.pt")
    return out, keep


def test_segment_writes_a_qc_picture_with_the_reference_and_says_where_everything_went(case, capsys):
    out, keep = case
    assert (
        cli_main(
            [
                "segment",
                str(out / "ct.nii.gz"),
                "--templates",
                str(out / "bank.pt"),
                "--out",
                str(out / "seg.nii.gz"),
                "--prior-weight",
                "1",
                "--quiet",
                "--qc",
                str(out / "qc.png"),
                "--qc-reference",
                str(out / "reference.nii.gz"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    for line in (f"label   {out / 'seg.nii.gz'}", f"result  {out / 'seg.nii.gz'}.json", f"QC      {out / 'qc.png'}"):
        assert line in printed
    picture = matplotlib.image.imread(out / "qc.png")
    # two panels (result, reference) per organ, four panels a row at 2.8 inches and 150 dpi
    assert picture.shape[1] == pytest.approx(4 * 2.8 * 150, abs=2)
    assert picture.shape[0] >= 2 * 3.2 * 150  # three organs: two rows
    assert picture[..., :3].std() > 0.1  # not blank


def test_qc_reference_needs_a_picture(case, capsys):
    out, _ = case
    assert (
        cli_main(
            [
                "segment",
                str(out / "ct.nii.gz"),
                "--templates",
                str(out / "bank.pt"),
                "--out",
                str(out / "seg2.nii.gz"),
                "--qc-reference",
                str(out / "reference.nii.gz"),
            ]
        )
        == 2
    )
    assert "--qc-reference needs --qc" in capsys.readouterr().err


def test_templates_show_lists_organs_sources_and_the_medlam(case, capsys):
    out, keep = case
    assert cli_main(["templates", "show", str(out / "bank.pt")]) == 0
    printed = capsys.readouterr().out
    assert "version 3" in printed and "matches" in printed and "NOT" not in printed
    for value, name in keep.items():
        # one template: no other to hold out, so its prior is cut at 0.5 (uncalibrated)
        assert any(line.split()[:4] == [str(value), name, "1", "0.5"] for line in printed.splitlines())
    assert cli_main(["templates", "show", str(out / "bank.pt"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["matches_medlam"] and summary["sources"] == ["slab"]
    assert {n: o["value"] for n, o in summary["organs"].items()} == {n: v for v, n in keep.items()}


def test_templates_show_of_a_file_that_is_no_bank(tmp_path, capsys):
    (tmp_path / "bank.pt").write_text("not a bank")
    assert cli_main(["templates", "show", str(tmp_path / "bank.pt")]) == 2
    assert "not a readable template bank" in capsys.readouterr().err


@pytest.mark.parametrize("x_axis", [0, 1])
@pytest.mark.parametrize("signs", [(1, 1), (-1, 1), (1, -1), (-1, -1)])
def test_qc_slices_are_in_the_radiological_view(x_axis, signs):
    """Patient right-anterior is the picture's top-left corner whatever the file's in-plane order."""
    volume = right_anterior_marker(x_axis, signs)
    shown = _display(np.take(volume.array, 2, axis=2), volume.affine, 2)
    assert shown[0, 0] == 1000.0 and shown.sum() == 1000.0
