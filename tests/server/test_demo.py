"""scripts/demo.py shows the template bank's progress from /info/ while the server builds it (no server: /info/'s
answers are replayed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "demo.py"


class _Answer:
    def __init__(self, bank):
        self.bank = bank

    def json(self):
        return {"name": "MedLSAM", **({"template_bank": self.bank} if self.bank is not None else {})}


def _demo():
    spec = importlib.util.spec_from_file_location("demo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _replay(monkeypatch, demo, banks):
    answers = iter(banks)
    monkeypatch.setattr(demo.requests, "get", lambda url, timeout: _Answer(next(answers)))
    monkeypatch.setattr(demo.time, "sleep", lambda s: None)


def test_the_demo_prints_the_bank_progress_until_it_is_ready(monkeypatch, capsys):
    demo = _demo()
    building = {"state": "building", "built": 0, "of": 3}
    _replay(
        monkeypatch,
        demo,
        [
            {"state": "not built"},
            building,
            building,  # an unchanged state is not printed again
            {**building, "built": 1, "last": "kbp1"},
            {**building, "built": 3, "of": 3, "step": "prior cuts (templates held out)"},
            {"state": "ready", "templates": ["a", "b", "c"], "organs": ["Brainstem", "Mandible"], "build_s": 95.2},
        ],
    )
    demo.wait_for_bank("http://server")
    lines = [line.split("] ", 1)[1] for line in capsys.readouterr().out.splitlines()]
    assert lines == [
        "template bank: not started yet (the server loads MedLAM first)",
        "template bank: built 0 of 3 templates",
        "template bank: built 1 of 3 templates (last: kbp1)",
        "template bank: 3 of 3 templates built; prior cuts (templates held out)",
        "template bank ready: 3 template(s), 2 organ(s) in 95 s",
    ]


def test_the_demo_does_not_wait_for_a_bank_that_failed_or_a_server_without_banks(monkeypatch, capsys):
    demo = _demo()
    _replay(monkeypatch, demo, [{"state": "failed", "error": "no usable template"}, None])
    demo.wait_for_bank("http://server")
    assert capsys.readouterr().out.split("] ", 1)[1] == "template bank failed: no usable template\n"
    demo.wait_for_bank("http://server")
    assert capsys.readouterr().out == ""
