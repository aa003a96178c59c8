"""``omniad report``: aggregate a protocol's runs, write tables, figures, report.tex and the PDF."""

from __future__ import annotations

import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from omniad.data.manifest import provenance
from omniad.grid import (
    Params,
    data_root,
    load_params,
    report_dir,
    report_table_file,
    report_tex_file,
    results_root,
)
from omniad.report import aggregate as agg
from omniad.report.audit import caveats, encoder_weights, render_audit
from omniad.report.claims import render_claims
from omniad.report.costs import costs_by_cell, load_complexity
from omniad.report.figures import make_figures
from omniad.report.inflation import SELECTION_NAMES, inflation_csv, inflation_rows, render_inflation
from omniad.report.latex import (
    APT_PACKAGES,
    ReportError,
    TeX,
    compile_pdf,
    escape,
    join,
    pdflatex,
    render,
    write_atomic,
)
from omniad.report.stats import stats_csv
from omniad.report.tables import dataset_name, render_complexity, render_table


@dataclass
class ReportResult:
    protocol: str
    folder: Path
    planned: int
    found: int
    missing: int
    files: list[Path] = field(default_factory=list)
    pdf: Path | None = None
    pdf_skipped: str | None = None


def _git_line(state: dict) -> str:
    commit = state.get("commit")
    if not commit:
        return "unknown (not a git checkout)"
    return f"{commit[:12]} ({'dirty' if state.get('dirty') else 'clean'})"


def _runs_git(col: agg.Collection) -> str:
    seen = Counter(_git_line(r.meta.get("git") or {}) for r in col.found)
    if not seen:
        return "no runs yet"
    return "; ".join(f"{k}: {n} run{'s' if n > 1 else ''}" for k, n in sorted(seen.items()))


def _safe(stem: str) -> TeX:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", stem):
        raise ReportError(f"unsafe file name for LaTeX: {stem!r}")
    return TeX(stem)


def epochs_line(params: Params, protocol: str) -> str:
    """The protocol's epochs per dataset, then each method's own schedule where its
    ``methods:`` block sets one (the demo trains most methods for other epoch counts)."""
    proto = params.protocol(protocol)
    line = ", ".join(f"{dataset_name(d)} {e}" for d, e in proto.epochs.items())
    own = []
    for m, sched in proto.methods.items():
        parts = [f"{dataset_name(d)} {e}" if len(proto.epochs) > 1 else str(e)
                 for d, e in sched.epochs.items()]
        parts += [f"batch {sched.batch_size}"] if sched.batch_size else []
        if parts:
            own.append(f"{params.methods[m].label} {', '.join(parts)}")  # refs checked
    return f"{line} ({'; '.join(own)})" if own else line


def report_context(col: agg.Collection, figures: list, git: dict) -> dict:
    params = col.params
    proto = params.protocol(col.protocol)
    order = params.grid.table_order
    weights = encoder_weights(col)
    seeds = (f"Table I {', '.join(map(str, proto.seeds_for('methods')))}; ablations "
             f"{', '.join(map(str, proto.seeds_for('ablation')))}")
    epochs = epochs_line(params, col.protocol)
    return {
        "protocol": escape(col.protocol),
        "datasets": join([dataset_name(d) for d in proto.datasets]),
        "ablation_dataset": escape(dataset_name(proto.ablation_dataset)),
        "setting": TeX(rf"{proto.image_size}$\times${proto.image_size}\,px; epochs: "
                       f"{escape(epochs)}; seeds: {escape(seeds)}"),
        "report_git": escape(_git_line(git)),
        "runs_git": escape(_runs_git(col)),
        "data": escape("; ".join(f"{dataset_name(d)}: {provenance(data_root(d))}"
                                 for d in proto.datasets)),
        "weights": escape(", ".join(weights) if weights else
                          ("pretrained" if proto.pretrained else "random") + " (from params; no runs)"),
        "n_found": len(col.found), "n_missing": len(col.missing), "n_planned": len(col.results),
        "caveats": caveats(col),
        "selection": TeX(escape(f"the {SELECTION_NAMES[col.selection]} ")
                         + rf"(\texttt{{--selection {escape(col.selection)}}})"),
        "evaluate_every": escape(_evaluate_every(col)),
        "methods_tables": [_safe(t) for t in order if params.grid.tables[t].kind == "methods"],
        "ablation_tables": [_safe(t) for t in order if params.grid.tables[t].kind != "methods"],
        "figures": [{"stem": _safe(f.stem), "caption": f.caption} for f in figures],
        "missing": [{"key": r.run.key, "cells": ", ".join(f"{t}:{w}" for t, w in r.cells)}
                    for r in col.missing],
    }


def _evaluate_every(col: agg.Collection) -> str:
    proto = col.params.protocol(col.protocol)
    own = {m: s.evaluate_every for m, s in proto.methods.items() if s.evaluate_every is not None}
    text = f"every {proto.evaluate_every} epochs" if proto.evaluate_every else "none"
    if own:
        text += " (" + ", ".join(f"{m}: {e}" for m, e in own.items()) + ")"
    return text + "; the final evaluation counts as one"


def _git_state() -> dict:
    from omniad.engine.runtime import git_state

    return git_state()


def build_report(protocol: str | None = None, *, params: Params | None = None, pdf: bool = True,
                 results: Path | None = None, reports: Path | None = None,
                 complexity: list[dict] | None = None, git: dict | None = None,
                 selection: str = "final", log=print) -> ReportResult:
    """Everything of ``omniad report``; returns what was written.

    ``complexity`` (rows of :func:`omniad.complexity.complexity_rows`) and ``git`` may be given
    to skip measuring / asking git (tests). ``selection``: what the tables show, the final model
    (headline) or the released-style maximum; the selection section shows both either way.
    Raises :class:`ReportError` on LaTeX failure, or when
    pdflatex is missing while ``$OMNIAD_REQUIRE_PDF=1``.
    """
    params = params or load_params()
    protocol = protocol or params.default_protocol
    params.protocol(protocol)  # validates the name
    results = results or results_root()
    folder = report_dir(protocol, reports)
    col = agg.collect(params, protocol, results, selection)
    out = ReportResult(protocol, folder, len(col.results), len(col.found), len(col.missing))
    log(f"omniad report {protocol}: {out.found} of {out.planned} runs found, {out.missing} missing"
        + (" (shown as '--')" if out.missing else ""))

    problem = None
    if complexity is None:
        complexity, problem = load_complexity(params, results, log=log)
        if problem:
            log(f"warning: {problem}")
    costs = costs_by_cell(complexity)

    # the machine-readable products (DVC metrics) always hold the headline: the final model
    final = col if col.selection == "final" else agg.collect(params, protocol, results)
    out.files += agg.write_products(final, costs, results).values()
    out.files.append(write_atomic((results or results_root()) / protocol / "inflation.csv",
                                  inflation_csv(inflation_rows(col))))
    out.files.append(write_atomic((results or results_root()) / protocol / "stats.csv",
                                  stats_csv(final)))

    tables = folder / "tables"
    out.files.append(write_atomic(tables / "macros.tex", render("macros.tex.j2")))
    for t in params.grid.table_order:
        out.files.append(write_atomic(report_table_file(protocol, t, reports),
                                      render_table(col, t, costs)))
    out.files.append(write_atomic(tables / "complexity.tex",
                                  render_complexity(params, protocol, complexity, problem)))
    out.files.append(write_atomic(tables / "audit.tex", render_audit(col, complexity)))
    out.files.append(write_atomic(tables / "inflation.tex", render_inflation(col)))
    out.files.append(write_atomic(tables / "claims.tex", render_claims(col)))

    figdir = folder / "figures"
    figures = make_figures(col, costs, figdir)
    keep = {f"{f.stem}.{ext}" for f in figures for ext in ("pdf", "png")}
    for stale in sorted(figdir.glob("*")) if figdir.exists() else []:
        if stale.is_file() and stale.suffix in (".pdf", ".png") and stale.name not in keep:
            stale.unlink()
    out.files += [figdir / k for k in sorted(keep)]

    git = git if git is not None else _git_state()
    tex = write_atomic(report_tex_file(protocol, reports),
                       render("report.tex.j2", **report_context(col, figures, git)))
    out.files.append(tex)
    log(f"tables, figures and report.tex in {folder}")

    if not pdf:
        out.pdf_skipped = "--no-pdf"
        return out
    if pdflatex() is None:
        msg = ("pdflatex not found on PATH: report.pdf not made (install: apt-get install "
               + " ".join(APT_PACKAGES) + ")")
        if os.environ.get("OMNIAD_REQUIRE_PDF") == "1":
            raise ReportError(msg + "; OMNIAD_REQUIRE_PDF=1")
        log(msg)
        out.pdf_skipped = "pdflatex missing"
        return out
    out.pdf = compile_pdf(tex)
    log(f"PDF: {out.pdf}")
    return out


def cli(args) -> int:
    """``omniad report --protocol P [--selection final|released-max] [--no-pdf]``."""
    try:
        build_report(getattr(args, "protocol", None), pdf=not getattr(args, "no_pdf", False),
                     selection=getattr(args, "selection", None) or "final")
    except ReportError as exc:
        print(f"omniad report: error: {exc}", file=sys.stderr)
        return 1
    return 0
