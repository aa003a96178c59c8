"""Parameters and FLOPs of every variant, beside the paper's numbers.

Convention (the released code's): fvcore's FlopCountAnalysis, one multiply-add = one FLOP,
encoder included, one image at the paper's size (params/paper.yaml ``setup``), model in eval
mode. Parameters: every registered parameter (the frozen, truncated encoder included); the
released resampled FFNs are not registered and so not counted, as in the paper's count.
"""

from __future__ import annotations

import json
import warnings
from typing import TYPE_CHECKING, Any

from omniad.grid import Params, load_params

if TYPE_CHECKING:  # torch is imported where models are built: the report's cache key
    from torch import nn  # (cost_tables) needs no torch


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, size: int = 256) -> int:
    """fvcore multiply-adds for one image of size x size."""
    import torch
    from fvcore.nn import FlopCountAnalysis

    model = model.eval()
    with warnings.catch_warnings(), torch.no_grad():  # the same counts, ~20% faster tracing
        warnings.simplefilter("ignore")
        fca = FlopCountAnalysis(model, torch.zeros(1, 3, size, size))
        fca.unsupported_ops_warnings(False)
        fca.uncalled_modules_warnings(False)
        fca.tracer_warnings("none")
        return int(fca.total())


def build(params: Params, method: str, overrides: dict[str, Any]) -> nn.Module:
    spec = params.methods[method]
    from omniad.methods import method_class  # imports torch: only where models are built

    return method_class(method, params)(**{**spec.model, **overrides, "pretrained": False})


def cost_tables(params: Params) -> list[str]:
    """Ablation tables whose paper rows report params/FLOPs (the paper's IV, VI, VII)."""
    return [t for t in params.grid.table_order if params.grid.tables[t].kind == "ablation"
            and any(isinstance(v, dict) and "params_m" in v
                    for v in (params.paper.get(t) or {}).values())]


def complexity_rows(params: Params, method: str | None = None, flops: bool = True) -> list[dict]:
    """One row per variant of the cost tables (or per method), paper numbers beside ours.

    The ablation method's default is compared with the released code's exact counts
    (params/paper.yaml ``released_counts``), the variants with the paper's tables."""
    targets: list[tuple[str, str, str, dict[str, Any], dict | None]] = []
    if method is None:
        ablation = params.grid.ablation_method
        released = (params.paper.get("released_counts") or {}).get("default")
        targets.append(("default", ablation, "default", {}, released))
        for table in cost_tables(params):
            paper_rows = {str(k): v for k, v in params.paper[table].items()}
            for row, overrides in params.grid.tables[table].rows.items():
                targets.append((table, ablation, row, overrides, paper_rows.get(row)))
    else:
        targets.append(("method", method, "default", {}, None))
    import torch

    rows = []
    torch.manual_seed(0)
    for table, meth, row, overrides, paper in targets:
        model = build(params, meth, overrides)
        p = count_params(model) / 1e6
        f = count_flops(model, params.paper["setup"]["image_size"]) / 1e9 if flops else None
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
    if getattr(args, "cache", False):
        from omniad.report.costs import fill_cache

        return fill_cache()
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
