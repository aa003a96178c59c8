"""`omniad report --dvc-summary`: summary/ receives the protocol's summary.json unchanged and
its plots/ whole (a plot gone from the source is gone from the copy); a broken summary is
refused and leaves summary/ as it was."""

from __future__ import annotations

from pathlib import Path

import pytest

from omniad.report.dvc_summary import copy_summary


def test_copy_replaces_plots_whole_and_refuses_broken_json(tmp_path: Path, monkeypatch) -> None:
    results = tmp_path / "results"
    monkeypatch.setenv("OMNIAD_RESULTS", str(results))
    source = results / "demo"
    (source / "plots").mkdir(parents=True)
    (source / "summary.json").write_text('{\n "table4": {"100": 0.5}\n}\n')
    (source / "plots" / "table4.csv").write_text("row,mad\n100,0.5\n")
    (source / "plots" / "gone.csv").write_text("x\n")
    dest = tmp_path / "summary"
    out = copy_summary("demo", dest)
    assert out.read_bytes() == (source / "summary.json").read_bytes()
    assert sorted(p.name for p in (dest / "plots").iterdir()) == ["gone.csv", "table4.csv"]

    (source / "plots" / "gone.csv").unlink()
    copy_summary("demo", dest)
    assert sorted(p.name for p in (dest / "plots").iterdir()) == ["table4.csv"]
    assert sorted(p.name for p in dest.iterdir()) == ["metrics.json", "plots"]  # no leftovers

    (source / "summary.json").write_text('{"table4": ')
    with pytest.raises(ValueError, match="summary.json: not valid JSON"):
        copy_summary("demo", dest)
    assert out.read_text() == '{\n "table4": {"100": 0.5}\n}\n'
