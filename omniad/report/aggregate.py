"""Collect every run of a protocol's grid and write the machine-readable products.

Runs come from :func:`omniad.grid.enumerate_runs` and are placed in table cells by
:func:`omniad.grid.tables_of`; nothing here builds a path or names an experiment by hand.
A run without ``metrics.json`` is *missing*: it is counted and shown as "--", never filled in.

Products (all under ``results/<protocol>/``):

* ``aggregate.csv``  one row per run x category (plus the ``mean`` pseudo-category), percent;
* ``summary.json``   ``{table: {row | method/dataset: mAD}}`` for ``dvc metrics show``;
* ``plots/<axis>.csv`` mAD, params and FLOPs along the tokens / depths / backbone axes.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omniad.grid import Params, Run, enumerate_runs, results_root, summary_file, tables_of
from omniad.report.latex import ReportError, write_atomic
from omniad.selection import SELECTIONS, selected

#: Metric keys in the paper's column order (mAD last).
METRICS: tuple[str, ...] = (
    "image_auroc", "image_ap", "image_f1max",
    "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro", "mad",
)
MEAN = "mean"  # the pseudo-category of aggregate.csv


@dataclass
class RunResult:
    """One run of the grid and what it left on disk (``metrics`` is None when missing)."""

    run: Run
    directory: Path
    metrics: dict[str, Any] | None
    cells: list[tuple[str, str]]  # (table, row) pairs this run fills
    selection: str = "final"  # which model the tables show (omniad.selection)

    @property
    def found(self) -> bool:
        return self.metrics is not None

    def pct(self, category: str = MEAN, selection: str | None = None) -> dict[str, float]:
        """Metrics of one category (or the mean) in percent, under a selection (default: the
        collection's): the final model, or the released-style per-metric maximum."""
        if self.metrics is None:
            return {}
        chosen = selected(self.metrics, selection or self.selection)
        src = chosen["mean"] if category == MEAN else chosen["per_category"].get(category, {})
        return {k: 100.0 * float(src[k]) for k in METRICS if src.get(k) is not None}

    @property
    def evaluated_epochs(self) -> list[int]:
        """Epochs of the evaluations behind the released-style maximum (final one included)."""
        return [e["epoch"] for e in (self.metrics or {}).get("evaluations", [])]

    def categories(self) -> list[str]:
        return sorted(self.metrics.get("per_category", {})) if self.metrics else []

    @property
    def meta(self) -> dict[str, Any]:
        return (self.metrics or {}).get("meta", {})

    @property
    def samples(self) -> Path | None:
        p = self.directory / "samples.npz"
        return p if self.found and p.exists() else None

    @property
    def history(self) -> Path | None:
        p = self.directory / "history.json"
        return p if self.found and p.exists() else None


@dataclass
class Stat:
    """A metric over the seeds of one cell: mean, sample std (n > 1), found / planned seeds."""

    values: list[float]
    expected: int

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return math.fsum(self.values) / self.n if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if self.n > 1 else None

    @property
    def partial(self) -> bool:
        return 0 < self.n < self.expected


@dataclass
class Collection:
    """Every run of a protocol, found or missing, indexed by table cell."""

    params: Params
    protocol: str
    results: list[RunResult]
    selection: str = "final"
    # (table, row, dataset) -> the seeds of that cell, in grid order
    cells: dict[tuple[str, str, str], list[RunResult]] = field(default_factory=dict)

    @property
    def found(self) -> list[RunResult]:
        return [r for r in self.results if r.found]

    @property
    def missing(self) -> list[RunResult]:
        return [r for r in self.results if not r.found]

    def cell(self, table: str, row: str, dataset: str) -> list[RunResult]:
        return self.cells.get((table, row, dataset), [])

    def stat(self, table: str, row: str, dataset: str, metric: str,
             category: str = MEAN, selection: str | None = None) -> Stat | None:
        """The metric of one cell over its seeds (under the collection's selection unless
        another is named); None when the grid has no run for it."""
        seeds = self.cell(table, row, dataset)
        if not seeds:
            return None
        vals = [r.pct(category, selection)[metric] for r in seeds
                if r.found and metric in r.pct(category, selection)]
        return Stat(vals, len(seeds))

    def variant_of(self, table: str, row: str, dataset: str) -> str | None:
        seeds = self.cell(table, row, dataset)
        return seeds[0].run.variant if seeds else None


def _load(path: Path, run: Run) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: unreadable metrics ({exc})") from exc
    want = {"protocol": run.protocol, "dataset": run.dataset, "method": run.method,
            "variant": run.variant, "seed": run.seed}
    got = {k: data.get(k) for k in want}
    if got != want:
        raise ReportError(f"{path}: belongs to {got}, expected {want}")
    if not isinstance(data.get("mean"), dict) or "mad" not in data["mean"]:
        raise ReportError(f"{path}: no 'mean' metrics with 'mad'")
    return data


def collect(params: Params, protocol: str, results: Path | None = None,
            selection: str = "final") -> Collection:
    """Read every ``metrics.json`` of the protocol's grid (missing ones stay missing); the
    tables will show ``selection`` (``final`` or ``released-max``)."""
    if selection not in SELECTIONS:
        raise ReportError(f"selection {selection!r} is not one of {', '.join(SELECTIONS)}")
    root = results or results_root()
    out = Collection(params, protocol, [], selection=selection)
    for run in enumerate_runs(params, protocol):
        d = run.dir(root)
        rr = RunResult(run, d, _load(d / "metrics.json", run), tables_of(params, run), selection)
        out.results.append(rr)
        for table, row in rr.cells:
            out.cells.setdefault((table, row, run.dataset), []).append(rr)
    return out


# --------------------------------------------------------------------------------------------
# aggregate.csv
# --------------------------------------------------------------------------------------------
def _f(x: float | None, digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def aggregate_csv(col: Collection) -> str:
    """One row per run x category (``mean`` last), metrics in percent; missing runs kept."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["run", "dataset", "method", "variant", "seed", "tables", "status", "category",
                *METRICS])
    for rr in col.results:
        run = rr.run
        cells = " ".join(f"{t}:{r}" for t, r in rr.cells)
        head = [run.key, run.dataset, run.method, run.variant, run.seed, cells]
        if not rr.found:
            w.writerow([*head, "missing", MEAN, *[""] * len(METRICS)])
            continue
        for cat in [*rr.categories(), MEAN]:
            vals = rr.pct(cat)
            w.writerow([*head, "found", cat, *[_f(vals.get(k)) for k in METRICS]])
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# summary.json
# --------------------------------------------------------------------------------------------
def summary(col: Collection) -> dict[str, Any]:
    """``{table: {key: mAD}}`` (percent, mean over seeds) plus run counts, for DVC metrics.

    Table I keys are ``method/dataset``; ablation keys are the row names. Cells without any
    finished run are left out (never invented).
    """
    params = col.params
    out: dict[str, Any] = {"runs": {"planned": len(col.results), "found": len(col.found),
                                    "missing": len(col.missing)}}
    proto = params.protocol(col.protocol)
    for tname in params.grid.table_order:
        spec = params.grid.tables[tname]
        if spec.kind == "methods":
            keys = [(m, ds) for ds in proto.datasets for m in params.methods]
        else:
            keys = [(row, proto.ablation_dataset) for row in spec.rows]
        entries: dict[str, float] = {}
        for row, dataset in keys:
            st = col.stat(tname, row, dataset, "mad")
            if st is None or st.mean is None:
                continue
            entries[f"{row}/{dataset}" if spec.kind == "methods" else row] = round(st.mean, 3)
        out[tname] = entries
    return out


# --------------------------------------------------------------------------------------------
# plots/<axis>.csv
# --------------------------------------------------------------------------------------------
def paper_row(params: Params, table: str, row: str) -> Any:
    """The paper's entry of an ablation row (paper.yaml's keys may be ints: '16' -> 16)."""
    entries = params.paper.get(table) or {}
    return {str(k): v for k, v in entries.items()}.get(str(row))


def axis_tables(params: Params) -> list[str]:
    """Ablation tables whose paper entries carry params / FLOPs / mAD (Tables IV, VI, VII)."""
    out = []
    for tname in params.grid.table_order:
        spec = params.grid.tables[tname]
        if spec.kind != "ablation" or not spec.rows:
            continue
        first = paper_row(params, tname, next(iter(spec.rows)))
        if isinstance(first, dict) and "mad" in first:
            out.append(tname)
    return out


def axis_value(overrides: dict[str, Any], axis: str | None, row: str) -> str:
    v = overrides.get(axis) if axis else None
    if v is None:
        return row
    return "-".join(str(x) for x in v) if isinstance(v, list | tuple) else str(v)


def axis_rows(col: Collection, table: str, costs: dict[tuple[str, str], dict]) -> list[dict]:
    """Rows of one axis table: ours (mAD over seeds, params, FLOPs) beside the paper's."""
    params = col.params
    spec = params.grid.tables[table]
    proto = params.protocol(col.protocol)
    excluded = set(proto.exclude_rows.get(table, []))
    rows = []
    for row, overrides in spec.rows.items():
        st = col.stat(table, row, proto.ablation_dataset, "mad")
        paper = paper_row(params, table, row) or {}
        cost = costs.get((table, row), {})
        status = ("excluded" if row in excluded else
                  "missing" if st is None or st.mean is None else
                  "partial" if st.partial else "found")
        rows.append({
            "row": row, "value": axis_value(overrides, spec.axis, row), "status": status,
            "mad": st.mean if st else None, "mad_std": st.std if st else None,
            "seeds": st.n if st else 0, "paper_mad": paper.get("mad"),
            "mad_values": list(st.values) if st else [],
            "params_m": cost.get("params_m"), "paper_params_m": paper.get("params_m"),
            "flops_g": cost.get("flops_g"), "paper_flops_g": paper.get("flops_g"),
        })
    return rows


#: mAD last: ``dvc plots show`` plots the last column by default.
PLOT_COLUMNS = ("row", "value", "status", "seeds", "params_m", "paper_params_m", "flops_g",
                "paper_flops_g", "paper_mad", "mad_std", "mad")


def plot_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(PLOT_COLUMNS)
    for r in rows:
        w.writerow([_f(float(r[k]), 4) if isinstance(r[k], int | float) and k != "seeds"
                    else ("" if r[k] is None else r[k]) for k in PLOT_COLUMNS])
    return buf.getvalue()


def write_products(col: Collection, costs: dict[tuple[str, str], dict],
                   results: Path | None = None) -> dict[str, Path]:
    """aggregate.csv, summary.json and plots/*.csv under results/<protocol>/."""
    base = (results or results_root()) / col.protocol
    out = {
        "aggregate": write_atomic(base / "aggregate.csv", aggregate_csv(col)),
        "summary": write_atomic(summary_file(col.protocol, results),
                                json.dumps(summary(col), indent=1, sort_keys=False) + "\n"),
    }
    for table in axis_tables(col.params):
        axis = col.params.grid.tables[table].axis or table
        out[f"plot:{axis}"] = write_atomic(base / "plots" / f"{axis}.csv",
                                           plot_csv(axis_rows(col, table, costs)))
    return out
