"""The grid in params/: validation, dedup of shared variants, and the DAG's job count."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from omniad.grid import Params, ParamsError, enumerate_runs, load_params, tables_of

REPO = Path(__file__).resolve().parent.parent
DEFAULTS = {"attention": ["q", "kv"], "tokens": 64, "branches": "both",
            "depths": [3, 9, 9, 7], "backbone": "resnet34"}  # the released model, by hand


def expected_runs(protocol: str) -> int:
    """Count the paper grid straight from the YAML, independently of omniad.grid."""
    protos = yaml.safe_load((REPO / "params/protocols.yaml").read_text())["protocols"]
    proto = protos[protocol]
    if "inherit" in proto:
        proto = {**protos[proto["inherit"]], **proto}
    methods = {f.stem: yaml.safe_load(f.read_text()) for f in (REPO / "params/methods").glob("*.yaml")}
    implemented = [m for m, s in methods.items() if s["status"] == "implemented"]
    grid = yaml.safe_load((REPO / "params/grid.yaml").read_text())["tables"]
    variants = set()
    for name, table in grid.items():
        if table["kind"] != "ablation":
            continue
        for row, overrides in table["rows"].items():
            if row in proto.get("exclude_rows", {}).get(name, []):
                continue
            diff = {k: v for k, v in overrides.items() if k != "pretrained" and DEFAULTS[k] != v}
            variants.add(tuple(sorted((k, str(v)) for k, v in diff.items())))
    variants.discard(())
    per_seed = len(proto["datasets"]) * len(implemented) + len(variants)
    return per_seed * len(proto.get("seeds", [42]))


@pytest.mark.parametrize("protocol", ["paper", "demo"])
def test_enumerated_runs_match_the_yaml(protocol: str) -> None:
    runs = enumerate_runs(load_params(), protocol)
    assert len(runs) == expected_runs(protocol)
    assert len({r.key for r in runs}) == len(runs)


def test_default_variant_is_one_run_in_every_table() -> None:
    params = load_params()
    runs = [r for r in enumerate_runs(params, "paper")
            if r.method == "omniad" and r.variant == "default" and r.dataset == "mvtec_ad"]
    assert len(runs) == 1
    tables = dict(tables_of(params, runs[0]))
    assert tables == {"table1": "omniad", "table2": "q_kv", "table3": "Q+KV", "table4": "64",
                      "table5": "both", "table6": "3-9-9-7", "table7": "resnet34"}


def test_snakemake_dry_run_lists_the_whole_paper_grid() -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = subprocess.run([str(Path(sys.executable).parent / "snakemake"), "-n", "--config",
                          "protocol=paper"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", out.stdout, flags=re.M))
    n = expected_runs("paper")
    assert int(counts["train"]) == n and int(counts["evaluate"]) == n
    assert int(counts["fetch"]) == 3 and int(counts["cache"]) == 3 and int(counts["report"]) == 1


def test_bad_params_name_file_and_field(tmp_path: Path) -> None:
    shutil.copytree(REPO / "params", tmp_path, dirs_exist_ok=True)
    protos = yaml.safe_load((tmp_path / "protocols.yaml").read_text())
    protos["protocols"]["demo"]["image_size"] = -4
    (tmp_path / "protocols.yaml").write_text(yaml.safe_dump(protos))
    with pytest.raises(ParamsError, match=r"protocols.yaml: demo(.|\n)*image_size"):
        Params(tmp_path)
    protos["protocols"]["demo"]["image_size"] = 64
    protos["protocols"]["demo"]["datasets"] = ["mnist"]
    (tmp_path / "protocols.yaml").write_text(yaml.safe_dump(protos))
    with pytest.raises(ParamsError, match="mnist"):
        Params(tmp_path)
