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
            "depths": [3, 9, 9, 7], "backbone": "resnet34",
            "ffn": "resampled"}  # the released model, by hand


def expected_runs(protocol: str) -> int:
    """Count the paper grid straight from the YAML, independently of omniad.grid."""
    protos = yaml.safe_load((REPO / "params/protocols.yaml").read_text())["protocols"]
    proto = protos[protocol]
    if "inherit" in proto:
        proto = {**protos[proto["inherit"]], **proto}
    methods = {f.stem: yaml.safe_load(f.read_text()) for f in (REPO / "params/methods").glob("*.yaml")}
    implemented = [m for m, s in methods.items() if s["status"] == "implemented"]
    grid = yaml.safe_load((REPO / "params/grid.yaml").read_text())["tables"]
    seeds = proto.get("seeds", [42])
    if isinstance(seeds, list):
        seeds = {"methods": seeds, "ablation": seeds}
    variants = set()
    for name, table in grid.items():
        if table["kind"] != "ablation":
            continue
        for row, overrides in table["rows"].items():
            if row in proto.get("exclude_rows", {}).get(name, []):
                continue
            diff = {k: v for k, v in overrides.items() if k != "pretrained" and DEFAULTS[k] != v}
            variants.add(tuple(sorted((k, str(v)) for k, v in diff.items())))
    runs = {(ds, m, (), s) for ds in proto["datasets"] for m in implemented
            for s in seeds.get("methods", [42])}
    ablation = yaml.safe_load((REPO / "params/grid.yaml").read_text())["ablation_method"]
    runs |= {(proto["ablation_dataset"], ablation, v, s) for v in variants
             for s in seeds.get("ablation", [42])}  # the default () is shared with Table I
    return len(runs)


@pytest.mark.parametrize("protocol", ["paper", "demo"])
def test_enumerated_runs_match_the_yaml(protocol: str) -> None:
    runs = enumerate_runs(load_params(), protocol)
    assert len(runs) == expected_runs(protocol)
    assert len({r.key for r in runs}) == len(runs)


def test_default_variant_is_one_run_in_every_table() -> None:
    params = load_params()
    runs = [r for r in enumerate_runs(params, "paper")
            if r.method == "omniad" and r.variant == "default" and r.dataset == "mvtec_ad"
            and r.seed == 42]
    assert len(runs) == 1
    tables = dict(tables_of(params, runs[0]))
    assert tables == {"table1": "omniad", "table2": "q_kv", "table3": "Q+KV", "table4": "64",
                      "table5": "both", "table6": "3-9-9-7", "table7": "resnet34",
                      "table8": "resampled"}


def test_paper_runs_three_seeds_per_ablation_row_and_shares_the_default() -> None:
    """paper: Table I one seed, every ablation row three; the default is not trained twice."""
    params = load_params()
    runs = enumerate_runs(params, "paper")
    by_cell: dict[tuple[str, str], set[int]] = {}
    for r in runs:
        for table, row in tables_of(params, r):
            by_cell.setdefault((table, row if table != "table1" else f"{row}/{r.dataset}"),
                               set()).add(r.seed)
    ablation = {k: v for k, v in by_cell.items() if k[0] != "table1"}
    assert ablation and all(v == {42, 43, 44} for v in ablation.values())
    assert all(v == {42} for k, v in by_cell.items() if k[0] == "table1")
    default = [r for r in runs if (r.dataset, r.method, r.variant) == ("mvtec_ad", "omniad", "default")]
    assert sorted(r.seed for r in default) == [42, 43, 44]
    seed43 = next(r for r in default if r.seed == 43)
    assert "table1" not in dict(tables_of(params, seed43))  # Table I shows seed 42 only
    # by hand: 7 methods x 3 datasets (seed 42) + 19 Omni-AD variants (default included) x 3
    # seeds, less the default's seed-42 run that Table I already has
    assert len(runs) == 7 * 3 + 19 * 3 - 1


def test_a_plain_seed_list_means_every_table(tmp_path: Path) -> None:
    shutil.copytree(REPO / "params", tmp_path, dirs_exist_ok=True)
    protos = yaml.safe_load((tmp_path / "protocols.yaml").read_text())
    protos["protocols"]["demo"]["seeds"] = [1, 2]
    (tmp_path / "protocols.yaml").write_text(yaml.safe_dump(protos))
    proto = Params(tmp_path).protocol("demo")
    assert proto.seeds_for("methods") == proto.seeds_for("ablation") == [1, 2]
    protos["protocols"]["demo"]["seeds"] = {"methods": [], "ablation": [1]}
    (tmp_path / "protocols.yaml").write_text(yaml.safe_dump(protos))
    with pytest.raises(ParamsError, match=r"protocols.yaml: protocols.demo.seeds.methods: "
                                          r"List should have at least 1 item"):
        Params(tmp_path)


def test_the_ablation_method_is_read_from_grid_yaml(tmp_path: Path) -> None:
    """Ablate a copy of Omni-AD under another name: the ablation runs, their tables and the
    report's default costs follow grid.yaml's ablation_method, not a name in the code."""
    from omniad.complexity import cost_tables
    from omniad.report.tables import default_paper_costs

    shutil.copytree(REPO / "params", tmp_path, dirs_exist_ok=True)
    shutil.copy(tmp_path / "methods/omniad.yaml", tmp_path / "methods/omni2.yaml")
    grid = yaml.safe_load((tmp_path / "grid.yaml").read_text())
    grid["ablation_method"] = "omni2"
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid, sort_keys=False))
    params, real = Params(tmp_path), load_params()
    ours = enumerate_runs(params, "paper")
    assert {r.variant for r in ours if r.method == "omniad"} == {"default"}  # Table I only
    ablation = {(r.variant, r.seed) for r in ours if r.method == "omni2" and r.variant != "default"}
    assert ablation == {(r.variant, r.seed) for r in enumerate_runs(real, "paper")
                        if r.method == "omniad" and r.variant != "default"}
    assert len(ablation) == 18 * 3  # 19 variants (default apart) x 3 seeds
    default = next(r for r in ours if r.method == "omni2" and r.variant == "default"
                   and r.dataset == "mvtec_ad" and r.seed == 42)
    assert dict(tables_of(params, default))["table4"] == "64"
    assert default_paper_costs(params, "paper") == {"params_m": 29.9, "flops_g": 11.2, "mad": 86.4}
    assert cost_tables(params) == ["table4", "table6", "table7"]

    grid["ablation_method"] = "diad"  # cited, not implemented: nothing to ablate
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid, sort_keys=False))
    with pytest.raises(ParamsError, match=r"grid.yaml: ablation_method: 'diad'"):
        Params(tmp_path)


def test_snakemake_dry_run_lists_the_whole_paper_grid(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "OMNIAD_REPORTS": str(tmp_path / "reports")}
    out = subprocess.run([str(Path(sys.executable).parent / "snakemake"), "-n", "--config",
                          "protocol=paper"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", out.stdout, flags=re.M))
    n = expected_runs("paper")
    assert int(counts["run"]) == n and "evaluate" not in counts and "train" not in counts
    assert int(counts["fetch"]) == 3 and int(counts["cache"]) == 3 and int(counts["report"]) == 1
    # the report's folder is omniad.grid's, $OMNIAD_REPORTS honoured as `omniad report` does
    report = re.search(r"^rule report:\n(?:.*\n)*?\s+output: (.*)$", out.stdout, flags=re.M)
    tex = [Path(REPO, p).resolve() for p in report.group(1).split(", ") if p.endswith(".tex")]
    assert len(tex) == 9 and all(p.is_relative_to(tmp_path / "reports" / "paper") for p in tex)


def test_bad_params_name_file_and_field(tmp_path: Path) -> None:
    shutil.copytree(REPO / "params", tmp_path, dirs_exist_ok=True)
    protos = yaml.safe_load((tmp_path / "protocols.yaml").read_text())
    protos["protocols"]["demo"]["image_size"] = -4
    (tmp_path / "protocols.yaml").write_text(yaml.safe_dump(protos))
    with pytest.raises(ParamsError, match=r"protocols.yaml: protocols.demo.image_size: "
                                          r"Input should be greater than 0 \(got -4\)$"):
        Params(tmp_path)
    protos["protocols"]["demo"]["image_size"] = 64
    protos["protocols"]["demo"]["datasets"] = ["mnist"]
    (tmp_path / "protocols.yaml").write_text(yaml.safe_dump(protos))
    with pytest.raises(ParamsError, match="mnist"):
        Params(tmp_path)


def test_every_protocol_shares_table1_seeds_with_the_ablations() -> None:
    """Table I's seeds inside the ablation seeds (the default is then trained once per seed);
    the paper protocols run three per ablation row (intervals), the demo one (minutes)."""
    params = load_params()
    for name, proto in params.protocols.items():
        assert set(proto.seeds_for("methods")) <= set(proto.seeds_for("ablation")), name
    assert params.protocol("demo").seeds_for("ablation") == [42]
    assert len(params.protocol("paper").seeds_for("ablation")) == 3
    assert len(params.protocol("released").seeds_for("ablation")) == 3


def test_workflow_names_come_from_the_grid() -> None:
    """What workflow/rules/*.smk used to spell: the fetched datasets, resource defaults, keys."""
    from omniad.grid import fetched_datasets, resources, run_key

    params = load_params()
    raw = yaml.safe_load((REPO / "params/datasets.yaml").read_text())["datasets"]
    assert fetched_datasets(params) == ["mvtec_ad", "visa", "real_iad", "dtd"]
    assert raw["demo"]["generated"] is True  # generated by `omniad data demo`, never fetched
    demo = params.protocol("demo")
    assert resources(demo, "no-such-kind").model_dump() == {
        "gpu": 0, "cpus": 1, "mem_mb": 2000, "runtime": 30}
    assert resources(demo, "train") == demo.resources["train"]
    run = enumerate_runs(params, "demo")[0]
    assert run.key == run_key(run.protocol, run.dataset, run.method, run.variant, run.seed)
    assert run.key == "/".join([run.protocol, run.dataset, run.method, run.variant, str(run.seed)])
