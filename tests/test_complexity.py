"""Params/FLOPs rows: the method, the tables and the reference numbers come from params/."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from omniad.complexity import complexity_rows, cost_tables
from omniad.grid import Params

REPO = Path(__file__).resolve().parent.parent
#: Official counts of the released code (fvcore), as tests/test_model_omniad.py checks them
RELEASED_M = 29.927


def test_reference_numbers_tables_and_method_are_read_from_params(tmp_path: Path) -> None:
    shutil.copytree(REPO / "params", tmp_path, dirs_exist_ok=True)
    shutil.copy(tmp_path / "methods/omniad.yaml", tmp_path / "methods/omni2.yaml")
    grid = yaml.safe_load((tmp_path / "grid.yaml").read_text())
    grid["ablation_method"] = "omni2"
    grid["tables"]["table4"]["rows"] = {"16": {"tokens": 16}}  # one cheap row to build
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid, sort_keys=False))
    paper = yaml.safe_load((tmp_path / "paper.yaml").read_text())
    paper["released_counts"]["default"] = {"params_m": 30.0, "flops_g": 12.0}
    paper["table4"][16]["params_m"] = 29.0
    for table in ("table6", "table7"):  # without params/FLOPs they are no cost tables
        paper[table] = {row: {"mad": v["mad"]} for row, v in paper[table].items()}
    (tmp_path / "paper.yaml").write_text(yaml.safe_dump(paper, sort_keys=False))

    params = Params(tmp_path)
    assert cost_tables(params) == ["table4"]
    rows = complexity_rows(params, flops=False)
    assert [(r["table"], r["method"], r["row"]) for r in rows] == [
        ("default", "omni2", "default"), ("table4", "omni2", "16")]
    default, tokens16 = rows
    assert default["params_m"] == RELEASED_M
    assert default["paper_params_m"] == 30.0 and default["paper_flops_g"] == 12.0
    assert default["params_rel_diff"] == round(RELEASED_M / 30.0 - 1, 4)
    assert tokens16["paper_params_m"] == 29.0
    assert tokens16["params_m"] == 29.383  # the row's override built (the official count)
    assert tokens16["params_rel_diff"] == round(29.383 / 29.0 - 1, 4)
