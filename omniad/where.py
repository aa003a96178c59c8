"""``omniad where``: what a protocol has produced, where it is, and what is missing and why.

A path is printed only for what exists; anything else says what is missing and what makes it,
so a new user is not sent to a report.pdf that was never built.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from omniad.grid import REPO, enumerate_runs, load_params, results_root


def _show(path: Path) -> str:
    """Relative to the current folder when inside it (shorter), else absolute."""
    try:
        return os.path.relpath(path) if path.resolve().is_relative_to(Path.cwd()) else str(path)
    except ValueError:
        return str(path)


def _json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _stale(pdf: Path, tex: Path) -> bool:
    """The PDF was compiled from another report.tex: by the digest compile_pdf recorded
    (Snakemake touches report.tex after the job, so times mislead), else by time."""
    from omniad.report.latex import source_digest, source_digest_file

    try:
        return source_digest_file(tex).read_text().strip() != source_digest(tex)
    except OSError:
        return tex.stat().st_mtime > pdf.stat().st_mtime


def _pdf(reports: Path) -> str:
    pdf, tex = reports / "report.pdf", reports / "report.tex"
    if pdf.is_file():
        if tex.is_file() and _stale(pdf, tex):
            return f"{_show(pdf)}  (stale: not made from this report.tex; rerun `omniad report`)"
        return _show(pdf)
    why = ("pdflatex not installed (apt-get install texlive-latex-base "
           "texlive-latex-recommended lmodern)" if shutil.which("pdflatex") is None
           else "run `omniad report`" if tex.is_file() else "run `make demo` or `dvc repro`")
    return f"not built, {why}"


#: MLflow 3.17's UI opens experiments by a per-browser GenAI / Model training switch (default
#: GenAI: the traces overview); this parameter selects Model training, i.e. the runs table.
UI_URL = "http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"


def _mlflow() -> str:
    from omniad.tracking import DEFAULT_URI, tracking_uri

    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        hint = "" if uri != DEFAULT_URI else (
            "  (browse: mlflow ui --backend-store-uri sqlite:///mlruns.db, then open "
            f"{UI_URL}: the runs tables)")
        return f"{uri}{hint}" if db.is_file() else f"{uri}: no store yet (`omniad track init`)"
    return f"{uri}  (server; not contacted)"


def lines(protocol: str | None = None, repo: Path = REPO,
          results: Path | None = None) -> list[tuple[str, str]]:
    """(what, where or what is missing) for every product of a protocol."""
    params = load_params()
    proto = protocol or params.default_protocol
    reports = repo / "reports" / proto
    results = results or results_root()
    runs = enumerate_runs(params, proto)
    done = sum((r.dir(results) / "metrics.json").is_file() for r in runs)
    tables = [reports / "tables" / f"{t}.tex" for t in params.grid.table_order]
    n_tables = sum(t.is_file() for t in tables)
    figures = sorted((reports / "figures").glob("*.png")) if (reports / "figures").is_dir() else []
    summary = results.parent / "summary" / "metrics.json"
    own = results / proto / "summary.json"
    same = summary.is_file() and own.is_file() and _json(summary) == _json(own)
    out = [
        ("Protocol", f"{proto}" + ("  (params/protocols.yaml default)"
                                   if proto == params.default_protocol else "")),
        ("PDF", _pdf(reports)),
        ("Tables", f"{_show(reports / 'tables')}  ({n_tables} of {len(tables)})" if n_tables
         else "none yet"),
        ("Figures", f"{_show(reports / 'figures')}  ({len(figures)} PNG)" if figures
         else "none yet"),
        ("Results", f"{_show(results / proto / 'runs')}  ({done} of {len(runs)} runs evaluated)"
         if done else f"none yet (0 of {len(runs)} runs evaluated)"),
        ("DVC", (f"{_show(summary)}  (dvc metrics show)" if same else
                 f"{_show(summary)} holds another protocol's numbers (`dvc repro`)"
                 if summary.is_file() else "summary/metrics.json not written yet (`dvc repro`)")
         + ("" if (repo / "dvc.lock").is_file() else "; no dvc.lock yet")),
        ("MLflow", _mlflow()),
    ]
    return out


def main(protocol: str | None = None) -> int:
    for what, where in lines(protocol):
        print(f"{what + ':':<9} {where}")
    return 0
