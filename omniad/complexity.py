"""Parameters and FLOPs of every variant, beside the paper's numbers.

Convention (the released code's): fvcore's FlopCountAnalysis, one multiply-add = one FLOP,
encoder included, one 1x3x256x256 image, model in eval mode. Parameters: every registered
parameter (the frozen, truncated encoder included); the released resampled FFNs are not
registered and so not counted, as in the paper's 29.9M.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import torch
from torch import nn

from omniad.grid import Params, load_params
from omniad.methods import method_class


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, size: int = 256) -> int:
    """fvcore multiply-adds for one image of size x size."""
    from fvcore.nn import FlopCountAnalysis

    model = model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fca = FlopCountAnalysis(model, torch.zeros(1, 3, size, size))
        fca.unsupported_ops_warnings(False)
        fca.uncalled_modules_warnings(False)
        fca.tracer_warnings("none")
        return int(fca.total())


def build(params: Params, method: str, overrides: dict[str, Any]) -> nn.Module:
    spec = params.methods[method]
    return method_class(method, params)(**{**spec.model, **overrides, "pretrained": False})


def complexity_rows(params: Params, method: str | None = None, flops: bool = True) -> list[dict]:
    """One row per variant of Tables IV, VI, VII (or per method), paper numbers beside ours."""
    targets: list[tuple[str, str, str, dict[str, Any], dict | None]] = []
    if method is None:
        targets.append(("default", "omniad", "default", {}, {"params_m": 29.927, "flops_g": 11.157}))
        for table in ("table4", "table6", "table7"):
            for row, overrides in params.grid.tables[table].rows.items():
                paper_rows = {str(k): v for k, v in params.paper[table].items()}
                targets.append((table, "omniad", row, overrides, paper_rows.get(row)))
    else:
        targets.append(("method", method, "default", {}, None))
    rows = []
    torch.manual_seed(0)
    for table, meth, row, overrides, paper in targets:
        model = build(params, meth, overrides)
        p = count_params(model) / 1e6
        f = count_flops(model) / 1e9 if flops else None
        entry: dict[str, Any] = {"table": table, "method": meth, "row": row,
                                 "params_m": round(p, 3), "flops_g": None if f is None else round(f, 3)}
        if paper:
            entry["paper_params_m"] = paper.get("params_m")
            entry["paper_flops_g"] = paper.get("flops_g")
            entry["params_rel_diff"] = round(p / paper["params_m"] - 1, 4)
            if f is not None:
                entry["flops_rel_diff"] = round(f / paper["flops_g"] - 1, 4)
        rows.append(entry)
        del model
    return rows


def main(args) -> int:
    rows = complexity_rows(load_params(), args.method, flops=not args.no_flops)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'table':8} {'row':16} {'params M':>9} {'paper':>7} {'diff':>7} "
          f"{'GFLOPs':>8} {'paper':>7} {'diff':>7}")

    def pct(r: dict, k: str) -> str:
        return f"{100 * r[k]:+.2f}%" if r.get(k) is not None else "-"

    for r in rows:
        print(f"{r['table']:8} {r['method'] + ':' + r['row']:16} {r['params_m']:9.3f} "
              f"{r.get('paper_params_m') or '-':>7} {pct(r, 'params_rel_diff'):>7} "
              f"{r['flops_g'] if r['flops_g'] is not None else '-':>8} "
              f"{r.get('paper_flops_g') or '-':>7} {pct(r, 'flops_rel_diff'):>7}")
    return 0
