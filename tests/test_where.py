"""`omniad where` names what exists and says what is missing and why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from omniad.grid import enumerate_runs, load_params
from omniad.where import lines


def test_where_says_what_is_missing_then_where_products_are(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no pdflatex here
    results = tmp_path / "results"
    empty = dict(lines("demo", repo=tmp_path, results=results))
    assert empty["PDF"].startswith("not built, pdflatex not installed")
    assert empty["Tables"] == "none yet" and empty["Figures"] == "none yet"
    n = len(enumerate_runs(load_params(), "demo"))
    assert empty["Results"] == f"none yet (0 of {n} runs evaluated)"
    assert "not written yet" in empty["DVC"] and "no dvc.lock" in empty["DVC"]
    assert "no store yet" in empty["MLflow"]

    reports = tmp_path / "reports" / "demo"
    (reports / "tables").mkdir(parents=True)
    (reports / "tables" / "table1.tex").write_text("x")
    (reports / "report.tex").write_text("x")
    (reports / "report.pdf").write_bytes(b"%PDF")
    run = enumerate_runs(load_params(), "demo")[0].dir(results)
    run.mkdir(parents=True)
    (run / "metrics.json").write_text("{}")
    summary = {"table1": {"omniad/demo": 70.0}}
    (results / "demo" / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "summary").mkdir()
    (tmp_path / "summary" / "metrics.json").write_text(json.dumps(summary, indent=1))
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    (tmp_path / "mlruns.db").write_bytes(b"")
    found = dict(lines("demo", repo=tmp_path, results=results))
    assert found["PDF"].endswith("report.pdf")
    assert found["Tables"].endswith("(1 of 8)")
    assert found["Results"].endswith(f"(1 of {n} runs evaluated)")
    assert found["DVC"].endswith("summary/metrics.json  (dvc metrics show)")
    assert found["MLflow"].startswith("sqlite:///") and "no store" not in found["MLflow"]
    (reports / "report.tex").touch()
    import os

    os.utime(reports / "report.pdf", (1, 1))
    assert "stale" in dict(lines("demo", repo=tmp_path, results=results))["PDF"]
    # with the digest compile_pdf records: a later touch (Snakemake's) is not staleness, an edit is
    from omniad.report.latex import source_digest, source_digest_file

    source_digest_file(reports / "report.tex").parent.mkdir(exist_ok=True)
    source_digest_file(reports / "report.tex").write_text(source_digest(reports / "report.tex"))
    assert "stale" not in dict(lines("demo", repo=tmp_path, results=results))["PDF"]
    (reports / "report.tex").write_text("% edited\n")
    assert "stale" in dict(lines("demo", repo=tmp_path, results=results))["PDF"]
    (results / "demo" / "summary.json").write_text(json.dumps({"table1": {}}))
    assert "another protocol" in dict(lines("demo", repo=tmp_path, results=results))["DVC"]
