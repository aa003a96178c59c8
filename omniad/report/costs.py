"""Parameters and FLOPs for the report: :func:`omniad.complexity.complexity_rows`, cached.

Counting FLOPs of every variant takes about a minute, so the rows are cached in
``results/complexity.json`` under a key made of the *contents* of the model code, the
complexity code and the params that shape the variants (uncommitted edits change the key too).
``$OMNIAD_COMPLEXITY_JSON`` may name a precomputed file (a list of rows, or ``{"rows": [...]}``).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from omniad.codehash import builder_module, fingerprint
from omniad.grid import Params, load_params, results_root
from omniad.report.latex import write_atomic

CACHE_NAME = "complexity.json"


def cache_key(params: Params) -> str:
    """The code that builds and counts the models (omniad/codehash.py: normalised source, so a
    comment edit keeps the cache) and every params entry the rows are made of."""
    from omniad.complexity import cost_tables

    ablation = params.grid.ablation_method
    spec = params.methods[ablation]
    tables = cost_tables(params)
    shaping = {
        "code": fingerprint("omniad.complexity", builder_module(spec.builder or "")),
        "method": ablation, "model": spec.model,
        "rows": {t: params.grid.tables[t].rows for t in tables},
        "paper": {t: params.paper.get(t) for t in [*tables, "released_counts"]},
    }
    return hashlib.sha256(json.dumps(shaping, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_file(results: Path | None = None) -> Path:
    """The rows' cache: ``results/complexity.json`` (the DAG's ``complexity`` rule fills it)."""
    return (results or results_root()) / CACHE_NAME


def fill_cache(args: Any = None) -> int:
    """``omniad complexity --cache``: count into the report's cache unless it is current (the
    DAG runs this as a job beside training, so the report does not count after it)."""
    rows, problem = load_complexity(load_params())
    if problem:
        print(f"complexity: {problem}", file=sys.stderr)
        return 1
    print(f"complexity: {len(rows)} rows in {cache_file()}")
    return 0


def _rows_of(data: Any) -> list[dict]:
    rows = data.get("rows") if isinstance(data, dict) else data
    if not isinstance(rows, list):
        raise ValueError("expected a list of rows or {'rows': [...]}")
    return rows


def load_complexity(params: Params, results: Path | None = None,
                    log=lambda msg: print(msg, file=sys.stderr)) -> tuple[list[dict], str | None]:
    """(rows, problem): rows of complexity_rows, from a given file, the cache, or computed.

    On failure the rows are empty and ``problem`` says why (the report then shows "--").
    """
    given = os.environ.get("OMNIAD_COMPLEXITY_JSON")
    if given:
        try:
            return _rows_of(json.loads(Path(given).read_text())), None
        except (OSError, ValueError) as exc:
            return [], f"$OMNIAD_COMPLEXITY_JSON={given}: {exc}"
    path = cache_file(results)
    key = cache_key(params)
    if path.exists():
        try:
            data = json.loads(path.read_text())
            if data.get("key") == key:
                return _rows_of(data), None
        except (OSError, ValueError, AttributeError):
            pass
    log("complexity: counting params and FLOPs of every variant (about a minute; cached in "
        f"{path})")
    try:
        from omniad.complexity import complexity_rows

        rows = complexity_rows(params)
    except Exception as exc:  # the report must still say what it could not measure
        return [], f"complexity_rows failed: {type(exc).__name__}: {exc}"
    write_atomic(path, json.dumps({"key": key, "rows": rows}, indent=1) + "\n")
    return rows, None


def costs_by_cell(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """(table, row) -> {params_m, flops_g} (ours only; the paper's come from paper.yaml)."""
    return {(r["table"], str(r["row"])): {"params_m": r.get("params_m"), "flops_g": r.get("flops_g")}
            for r in rows}
