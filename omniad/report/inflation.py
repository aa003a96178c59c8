"""The report's model-selection section: final model vs the released-style maximum.

The released trainers log, per metric, the maximum over every evaluation during training
(:mod:`omniad.selection`): selection on the test set. This section sets that number beside
the final model's for every method of the methods table (Table I), with the difference
(the inflation) and the paper's value, and writes the same as ``inflation.csv``.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any

from omniad.report.aggregate import METRICS, Collection
from omniad.report.latex import DASH, TeX, escape, num, render, signed
from omniad.report.tables import (
    METRIC_HEADER,
    SEVEN,
    dataset_name,
    paper_reference_dataset,
)

SELECTION_NAMES = {"final": "final model",
                   "released-max": "released-style maximum over the evaluations"}


def methods_table(col: Collection) -> str | None:
    return next((t for t in col.params.grid.table_order
                 if col.params.grid.tables[t].kind == "methods"), None)


def inflation_rows(col: Collection) -> list[dict[str, Any]]:
    """One row per (dataset, implemented method): final, released-max, inflation and the
    paper's value per metric (percent; means over the seeds found), and the evaluated epochs."""
    params, table = col.params, methods_table(col)
    if table is None:
        return []
    paper_t = params.paper.get(table) or {}
    out = []
    for ds in params.protocol(col.protocol).datasets:
        ref = ds if ds in paper_t else paper_reference_dataset(params)
        for m in params.implemented():
            seeds = col.cell(table, m, ds)
            if not seeds:
                continue
            label = params.methods[m].label
            paper = ((paper_t.get(ref) or {}).get(label) or {}).get("values") or [None] * len(METRICS)
            row: dict[str, Any] = {"dataset": ds, "method": m, "label": label,
                                   "paper_dataset": ref, "metrics": {}}
            for k, p in zip(METRICS, paper, strict=True):
                fin = col.stat(table, m, ds, k, selection="final")
                mx = col.stat(table, m, ds, k, selection="released-max")
                f = fin.mean if fin else None
                x = mx.mean if mx else None
                row["metrics"][k] = {"final": f, "released_max": x, "paper": p,
                                     "inflation": None if f is None or x is None else x - f}
            infl = [row["metrics"][k]["inflation"] for k in SEVEN]
            row["mean_inflation"] = (math.fsum(infl) / len(infl)
                                     if all(v is not None for v in infl) else None)
            epochs = sorted({tuple(r.evaluated_epochs) for r in seeds if r.found})
            row["epochs"] = list(epochs[0]) if len(epochs) == 1 else None
            out.append(row)
    return out


def inflation_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["dataset", "method", "metric", "final", "released_max", "inflation", "paper"])

    def f(x: float | None) -> str:
        return "" if x is None else f"{x:.4f}"
    for r in rows:
        for k, v in r["metrics"].items():
            w.writerow([r["dataset"], r["method"], k, f(v["final"]), f(v["released_max"]),
                        f(v["inflation"]), "" if v["paper"] is None else v["paper"]])
        w.writerow([r["dataset"], r["method"], "mean_inflation_7", "", "",
                    f(r["mean_inflation"]), ""])
    return buf.getvalue()


def _cells(values: list[float | None], signed_: bool = False) -> list[TeX]:
    if signed_:
        return [DASH if v is None else signed(v, 1) for v in values]
    return [DASH if v is None else escape(num(v, 1)) for v in values]


def inflation_context(col: Collection) -> dict[str, Any]:
    rows = inflation_rows(col)
    blocks: dict[str, dict[str, Any]] = {}
    for r in rows:
        b = blocks.setdefault(r["dataset"], {"title": escape(dataset_name(r["dataset"])),
                                             "stand_in": r["paper_dataset"] != r["dataset"],
                                             "entries": []})
        get = [r["metrics"][k] for k in METRICS]
        epochs = ", ".join(map(str, r["epochs"])) if r["epochs"] else "--"
        b["entries"].append({
            "label": escape(r["label"]), "epochs": escape(epochs),
            "final": _cells([g["final"] for g in get]),
            "max": _cells([g["released_max"] for g in get]),
            "inflation": _cells([g["inflation"] for g in get], signed_=True),
            "paper": [TeX(r"\paperval{" + (num(float(g["paper"]), 1) if g["paper"] is not None
                                           else "--") + "}") for g in get],
            "mean_inflation": DASH if r["mean_inflation"] is None else signed(r["mean_inflation"], 2),
        })
    return {"header": [TeX(METRIC_HEADER[m]) for m in METRICS], "blocks": list(blocks.values()),
            "ncols": 3 + len(METRICS), "shown": escape(SELECTION_NAMES[col.selection]),
            "table": escape(methods_table(col) or "")}


def render_inflation(col: Collection) -> str:
    return render("inflation.tex.j2", **inflation_context(col))
