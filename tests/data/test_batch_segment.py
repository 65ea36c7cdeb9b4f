"""`medlsam segment DIR --out OUT_DIR`: one label + JSON per scan, resumable, atomic, sharded, failures reported.
The prior-alone mode (--prior-weight 1) keeps SAM's encoder out of it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from app_support import NAMES, tiny_case
from medlsam.cli import main as cli_main
from medlsam.segment.batch import batch_plan, is_batch, scan_name


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, data_dir):
    from medlsam.atlas.bank_builder import build_bank
    from medlsam.medlam.network import load_medlam
    from medlsam.paths import default_medlam_path

    folder = tmp_path_factory.mktemp("batch")
    scans = folder / "scans"
    image, label = tiny_case(data_dir, 1, [1], folder / "template")
    for case in (1, 2, 3):
        tiny_case(data_dir, case, None, scans, name=f"case{case}")
    bank = build_bank(load_medlam(default_medlam_path()), [image], [label], {1: NAMES[1]})
    bank.save(folder / "bank.pt")
    return {"scans": scans, "bank": folder / "bank.pt", "folder": folder}


def _args(inputs, out, *more) -> list[str]:
    return [
        "segment",
        str(inputs["scans"]),
        "--templates",
        str(inputs["bank"]),
        "--out",
        str(out),
        "--prior-weight",
        "1",
        "--quiet",
        *more,
    ]


def test_batch_mode_is_chosen_by_the_inputs(tmp_path):
    scan = tmp_path / "a.nii.gz"
    scan.write_bytes(b"")
    assert not is_batch([str(scan)], str(tmp_path / "label.nii.gz"))  # today's single-scan form
    assert is_batch([str(scan)], str(tmp_path / "out"))
    assert is_batch([str(scan), str(scan)], str(tmp_path / "out.nii.gz"))
    assert is_batch([str(tmp_path)], str(tmp_path / "x.nii.gz"))
    assert scan_name(scan) == "a" and scan_name(tmp_path / "b.c.nrrd") == "b.c"
    with pytest.raises(Exception, match="same output"):
        batch_plan([str(scan), str(scan)], tmp_path / "out")


def test_interrupted_batch_restarts_and_writes_every_output_once(inputs, tmp_path, monkeypatch, capsys):
    import medlsam.segment.outputs as outputs

    out = tmp_path / "labels"
    written = []
    real_write = outputs.write_segmentation

    def write_then_interrupt(result, volume, path):
        if len(written) == 1:  # the second scan: interrupted in the middle of its write
            (path.parent / ".tmp-partial.nii.gz").write_bytes(b"partial")
            (path.parent / ".tmp-partial.nii.gz").unlink()
            raise KeyboardInterrupt
        real_write(result, volume, path)
        written.append(path.name)

    monkeypatch.setattr(outputs, "write_segmentation", write_then_interrupt)
    assert cli_main(_args(inputs, out)) == 130
    assert written == ["case1.nii.gz"]
    assert sorted(p.name for p in out.iterdir()) == ["case1.nii.gz", "case1.nii.gz.json"]  # nothing partial
    first = (out / "case1.nii.gz").stat()

    def count_writes(result, volume, path):
        written.append(path.name)
        real_write(result, volume, path)

    monkeypatch.setattr(outputs, "write_segmentation", count_writes)
    assert cli_main(_args(inputs, out)) == 0
    assert written == ["case1.nii.gz", "case2.nii.gz", "case3.nii.gz"]  # each once
    text = capsys.readouterr().out
    assert "3 scans, 2 written, 1 already complete, 0 failed" in text
    assert sorted(p.name for p in out.iterdir()) == [f"case{n}.nii.gz{s}" for n in (1, 2, 3) for s in ("", ".json")]
    assert (out / "case1.nii.gz").stat().st_mtime_ns == first.st_mtime_ns  # not rewritten
    assert cli_main(_args(inputs, out)) == 0  # all complete: returns at once
    assert written[3:] == [] and "0 to segment" in capsys.readouterr().out


def test_a_failing_scan_is_reported_and_the_others_go_on(inputs, tmp_path, capsys):
    scans = tmp_path / "mixed"
    scans.mkdir()
    os.symlink(inputs["scans"] / "case2.nii.gz", scans / "case2.nii.gz")
    (scans / "broken.nii.gz").write_text("not an image")
    out = tmp_path / "out"
    code = cli_main(
        ["segment", str(scans), "--templates", str(inputs["bank"]), "--out", str(out), "--prior-weight", "1", "--quiet"]
    )
    captured = capsys.readouterr()
    assert code == 1
    assert (out / "case2.nii.gz").is_file() and (out / "case2.nii.gz.json").is_file()
    assert not (out / "broken.nii.gz").exists()
    assert "broken.nii.gz FAILED" in captured.err and "1 written" in captured.out and "1 failed" in captured.out


@pytest.mark.slow
def test_workers_share_the_scans(inputs, tmp_path):
    """--workers 2: two processes (RANK/WORLD_SIZE shards) write every output once between them."""
    out = tmp_path / "labels"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-m", "medlsam.cli", *_args(inputs, out, "--workers", "2")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0/2: 2 scans" in done.stdout and "rank 1/2: 1 scans" in done.stdout
    assert "all workers: 3 scans, 3 complete, 0 failed or missing" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == [f"case{n}.nii.gz{s}" for n in (1, 2, 3) for s in ("", ".json")]
