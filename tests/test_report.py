"""omniad.report on a synthetic grid: cell values (ours and the paper's), ranking marks, cited
and planned methods, missing runs, escaping, summary.json, determinism, and the PDF."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from omniad.grid import enumerate_runs, load_params, tables_of
from omniad.report import ReportError, build_report, cli
from omniad.report.aggregate import METRICS
from omniad.report.latex import compile_pdf, escape, pdflatex, signed

REPO = Path(__file__).resolve().parent.parent
P = "tiny_report"
TITLE2 = "Tokens & Q_KV at 100% {x}"

# (table, row) -> {seed: base value}; every metric of a run is its base value.
VALUES = {
    ("table1", "omniad"): {1: 0.90, 2: 0.92},
    ("table1", "uniad"): {1: 0.80, 2: 0.80},
    ("table1", "simplenet"): {1: 0.85},  # seed 2 missing
    ("table2", "q"): {1: 0.50, 2: 0.50},
}
COMPLEXITY = [
    {"table": "default", "method": "omniad", "row": "default", "params_m": 29.927, "flops_g": 11.157},
    {"table": "table4", "method": "omniad", "row": "64", "params_m": 29.927, "flops_g": 11.157},
    {"table": "table7", "method": "omniad", "row": "resnet50", "params_m": 468.173,
     "flops_g": 113.71},
]
GIT = {"commit": "0123456789abcdef0123456789abcdef01234567", "dirty": True}


def _tiny_params(dest: Path) -> Path:
    shutil.copytree(REPO / "params", dest)
    protos = yaml.safe_load((dest / "protocols.yaml").read_text())
    protos["protocols"][P] = {
        "datasets": ["demo"], "ablation_dataset": "demo", "image_size": 32,
        "epochs": {"demo": 2}, "batch_size": 8, "seeds": [1, 2], "pretrained": False,
        "workers": 0, "exclude_rows": {"table7": ["resnet50", "wide_resnet50"]},
    }
    (dest / "protocols.yaml").write_text(yaml.safe_dump(protos, sort_keys=False))
    for m in ("uniad", "simplenet"):  # two more 'implemented' methods (built as Omni-AD)
        path = dest / "methods" / f"{m}.yaml"
        spec = yaml.safe_load(path.read_text())
        # their model blocks are checked against the builder's config class: Omni-AD's defaults
        spec.update(status="implemented", builder="omniad.models.omniad:OmniAD", model={},
                    protocol_overrides={})
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
    for m in ("rd4ad", "rlr", "destseg", "mambaad"):  # exercise the 'planned' path
        path = dest / "methods" / f"{m}.yaml"
        spec = yaml.safe_load(path.read_text())
        spec = {"label": spec["label"], "venue": spec["venue"], "status": "planned"}
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
    grid = yaml.safe_load((dest / "grid.yaml").read_text())
    grid["tables"]["table2"]["title"] = TITLE2
    (dest / "grid.yaml").write_text(yaml.safe_dump(grid, sort_keys=False))
    return dest


def _metrics(run, base: float) -> dict:
    vals = dict.fromkeys(METRICS, base)
    per = {"brick": vals, "metal_nut": dict.fromkeys(METRICS, base - 0.1)}
    out = {"run": run.key, "protocol": run.protocol, "dataset": run.dataset,
           "method": run.method, "variant": run.variant, "seed": run.seed, "mean": vals,
           "per_category": per,
           "meta": {"git": {"commit": "fedcba9876543210", "dirty": False},
                    "encoder_weights": "random"}}
    if run.method == "omniad":  # an earlier evaluation 5 points higher: released max = +5
        from omniad.selection import released_max

        up = {c: {k: v + 0.05 for k, v in m.items()} for c, m in per.items()}
        out["evaluations"] = [{"epoch": 1, "mean": up["brick"], "per_category": up},
                              {"epoch": 2, "mean": vals, "per_category": per}]
        out["released_max"] = released_max(out["evaluations"])
    return out


def _write_runs(params, results: Path) -> None:
    for run in enumerate_runs(params, P):
        base = None
        for cell in tables_of(params, run):
            base = VALUES.get(cell, {}).get(run.seed, base)
        if base is None:
            continue
        d = run.dir(results)
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps(_metrics(run, base)))
        (d / "history.json").write_text(json.dumps(
            {"epochs": [{"epoch": 1, "loss": 1.0, "lr": 1e-3}, {"epoch": 2, "loss": 0.5, "lr": 1e-4}]}))
        if run.method == "omniad" and run.seed == 1:
            rng = np.random.default_rng(0)
            mask = np.zeros((2, 16, 16), bool)
            mask[:, 4:8, 4:8] = True
            np.savez_compressed(d / "samples.npz", category=np.array(["brick", "metal_nut"]),
                                image=rng.integers(0, 255, (2, 16, 16, 3), dtype=np.uint8),
                                mask=mask, map=rng.random((2, 16, 16)).astype(np.float16))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMNIAD_PARAMS", str(_tiny_params(root / "params")))
        mp.setenv("OMNIAD_RESULTS", str(root / "results"))
        mp.setenv("OMNIAD_REPORTS", str(root / "reports"))
        mp.delenv("OMNIAD_REQUIRE_PDF", raising=False)
        mp.delenv("OMNIAD_COMPLEXITY_JSON", raising=False)
        load_params.cache_clear()
        params = load_params()
        _write_runs(params, root / "results")
        res = build_report(P, params=params, pdf=False, complexity=COMPLEXITY, git=GIT,
                           log=lambda *_: None)
        yield {"root": root, "params": params, "result": res, "mp": mp}
    load_params.cache_clear()


def _tex(env, name: str) -> str:
    return (env["root"] / "reports" / P / "tables" / f"{name}.tex").read_text()


def _row(tex: str, start: str) -> tuple[str, str]:
    """The 'ours' line starting with ``start`` and the paper line below it."""
    lines = tex.splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.startswith(start))
    return lines[i], lines[i + 1]


# --------------------------------------------------------------------------------------------
def test_escape_and_signs():
    assert escape("a_b & 5% $#{x}~^\\") == (r"a\_b \& 5\% \$\#\{x\}\textasciitilde{}"
                                            r"\textasciicircum{}\textbackslash{}")
    assert signed(1.7) == "+1.7" and signed(-1.74) == r"$-$1.7" and signed(-0.01) == "0.0"


def test_counts_and_missing(env):
    res, params = env["result"], env["params"]
    runs = enumerate_runs(params, P)
    assert res.planned == len(runs)
    assert res.found == 7  # omniad x2, uniad x2, simplenet x1, table2 q x2
    assert res.missing == len(runs) - 7
    summary = json.loads((env["root"] / "results" / P / "summary.json").read_text())
    assert summary["runs"] == {"planned": len(runs), "found": 7, "missing": len(runs) - 7}


def test_table1_cells_ranks_and_markers(env):
    tex = _tex(env, "table1")
    ours, paper = _row(tex, "Omni-AD &")
    cells = ours.removesuffix(r" \\").split(" & ")
    # mean +- std over the two seeds, best of ours in bold
    assert cells[2] == r"\best{91.0}\pmstd{1.4}"
    assert len(cells) == 2 + len(METRICS)
    pcells = paper.removesuffix(r" \\").split(" & ")
    assert pcells[2] == r"\paperval{99.0 ($-$8.0)}"  # paper's MVTec-AD Omni-AD, ours - paper
    assert pcells[-1] == r"\paperval{86.4 (+4.6)}"  # mAD
    # second best underlined; one seed missing -> partial marker
    simple, _ = _row(tex, "SimpleNet &")
    assert r"\second{85.0}\textsuperscript{*} &" in simple
    uni, upaper = _row(tex, "UniAD &")
    assert r" & 80.0\pmstd{0.0} &" in uni and r"\best" not in uni and r"\second" not in uni
    assert r"\paperval{96.5 ($-$16.5)}" in upaper
    # cited DiAD: the paper's numbers, marked; planned RD4AD: '--' with the paper line
    diad, _ = _row(tex, r"DiAD\textsuperscript{\dag}")
    assert r"\citedval{97.2}" in diad and "cited, not run" in tex
    rd, rdp = _row(tex, r"RD4AD\textsuperscript{\ddag}")
    assert rd.count("--") == len(METRICS) and r"\paperval{94.6}" in rdp
    assert "not yet implemented" in tex
    assert r"\paperval{--}" in tex and "not reported in the paper" in tex  # RLR's nulls


def test_ablation_tables(env):
    t2 = _tex(env, "table2")
    assert r"Tokens \& Q\_KV at 100\% \{x\}" in t2  # escaped title
    default, _ = _row(t2, r"q\_kv {\scriptsize\color{gray}(default)}")
    assert r"& (q, kv) & \best{91.0}\pmstd{1.4} &" in default
    q, qp = _row(t2, "q &")
    assert r"& (q, self) & \second{50.0}\pmstd{0.0} &" in q
    assert r"\paperval{98.6 ($-$48.6)}" in qp
    # q - default per seed: 50 - 90, 50 - 92 -> mean -41, t(0.975, 1) * 1.414 / 1.414 = 12.7
    assert q.endswith(r"& $-$41.0\sigmark & $<$: ? \\")
    assert qp.endswith(r"& \paperval{[$-$53.7, $-$28.3]} & \paperval{p.\,$-$0.2} \\")
    assert default.endswith(r"& \paperval{(ref.)} & \emph{best}: ? \\")
    none, _ = _row(t2, "none &")
    assert none.endswith(" & ".join(["--"] * 8) + r" & $<$: ? \\")  # missing, never invented
    assert "run not finished" in t2
    t7 = _tex(env, "table7")
    r50, r50p = _row(t7, "resnet50 &")
    assert r"468.2 & 113.7 & \multicolumn{3}{c}{\textit{not run in this protocol}}" in r50
    assert r"\paperval{468.0 (0.0\%)} & \paperval{114.0 ($-$0.3\%)}" in r50p
    assert r"wide\_resnet50 & wide\_resnet50\_2 &" in t7
    t4 = _tex(env, "table4")
    row64, p64 = _row(t4, "64")
    assert r"29.9 & 11.2 & 91.0\pmstd{1.4}" in row64  # a single mAD value: no ranking marks
    assert r"\paperval{29.9 (+0.1\%)} & \paperval{11.2 ($-$0.4\%)} & \paperval{86.4 (+4.6)}" in p64
    row16, _ = _row(t4, "16 &")
    assert row16 == r"16 & -- & -- & -- & -- & $<$: ? \\"  # no complexity row given, no run
    t8 = _tex(env, "table8")
    assert "Our Table VIII (not in the paper; no paper numbers)" in t8
    assert "paperval{paper" not in t8 and "Claim" not in t8
    claims = (env["root"] / "reports" / P / "tables" / "claims.tex").read_text()
    assert r"\textbf{The Demo set data cannot decide the" in claims
    # best + signs: II 1+2, III 1+3, IV 1+3, V 1+2, VI 1+3, VII 1+1 (two rows excluded)
    assert "Claims reproduced: 0; not reproduced:\n0; not decided by the data: 20." in claims


def test_products(env):
    base = env["root"] / "results" / P
    summary = json.loads((base / "summary.json").read_text())
    assert summary["table1"] == {"omniad/demo": 91.0, "uniad/demo": 80.0, "simplenet/demo": 85.0}
    assert summary["table2"] == {"q": 50.0, "q_kv": 91.0}
    assert summary["table7"] == {"resnet34": 91.0}
    rows = (base / "aggregate.csv").read_text().splitlines()
    assert rows[0].startswith("run,dataset,method,variant,seed,tables,status,category,image_auroc")
    assert any(",found,metal_nut,80.0000," in r for r in rows)
    assert sum(",missing,mean," in r for r in rows) == env["result"].missing
    tokens = (base / "plots" / "tokens.csv").read_text().splitlines()
    assert tokens[0] == ("row,value,status,seeds,params_m,paper_params_m,flops_g,paper_flops_g,"
                         "paper_mad,mad_std,mad")
    assert tokens[3] == "64,64,found,2,29.9270,29.9000,11.1570,11.2000,86.4000,1.4142,91.0000"
    backbone = (base / "plots" / "backbone.csv").read_text()
    assert "resnet50,resnet50,excluded,0,468.1730,468.0000,113.7100,114.0000,85.5000,,\n" in backbone
    rep = env["root"] / "reports" / P
    stats = (base / "stats.csv").read_text().splitlines()
    assert stats[0].startswith("table,row,default,seeds,mad_mean,mad_std,diff,diff_lo,diff_hi")
    assert "table2,q,0,2,50.0000,0.0000,-41.0000,-53.7062,-28.2938,2,1,-0.1857" in stats
    for stem in ("qualitative_demo", "ablation_axes", "ablation_forest", "per_category_demo",
                 "training_demo"):
        assert (rep / "figures" / f"{stem}.pdf").stat().st_size > 0
        assert (rep / "figures" / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
    tex = (rep / "report.tex").read_text()
    assert "0123456789ab (dirty)" in tex and r"\input{tables/table7}" in tex
    assert "Randomly initialised encoder" in tex and "Missing runs" in tex
    cx = (rep / "tables" / "complexity.tex").read_text()
    assert r"-- & Omni-AD (default) & 29.9 & 29.9 & +0.1\% & 11.2 & 11.2 & $-$0.4\% \\" in cx
    assert r"VII & resnet50 & 468.2 & 468.0 & 0.0\% & 113.7 & 114.0 & $-$0.3\% \\" in cx
    audit = (rep / "tables" / "audit.tex").read_text()
    for fact in "abcdefghij":
        assert f"({fact})~" in audit
    assert r"\texttt{ffn: resampled}" in audit


def test_selection_section_and_released_max_tables(env, tmp_path):
    """Final in the tables by default; the section shows final, max, inflation, paper; the
    released-max option puts the per-metric maximum in every table and says so."""
    infl = _tex(env, "inflation")
    assert "final model and released-style maximum" in infl
    omni = infl[infl.index("Omni-AD &"):]
    assert omni.splitlines()[0].startswith("Omni-AD & 1, 2 & final & 91.0")
    assert "released max & 96.0" in omni and "inflation & +5.0" in omni
    assert "seven metrics: +5.00" in omni
    csv = (env["root"] / "results" / P / "inflation.csv").read_text()
    assert "demo,omniad,mad,91.0000,96.0000,5.0000," in csv
    assert "demo,uniad,mad,80.0000,80.0000,0.0000," in csv  # no evaluations: max = final
    report = (env["root"] / "reports" / P / "report.tex").read_text()
    assert "show the final model" in report and "input{tables/inflation}" in report
    assert "final model." in _tex(env, "table1")
    build_report(P, params=env["params"], pdf=False, complexity=COMPLEXITY, git=GIT,
                 reports=tmp_path, selection="released-max", log=lambda *_: None)
    t1 = (tmp_path / P / "tables" / "table1.tex").read_text()
    assert "released-style maximum over the evaluations" in t1
    assert "96.0" in _row(t1, "Omni-AD")[0].split(" & ")[2]
    with pytest.raises(ReportError, match="selection 'best'"):
        build_report(P, params=env["params"], pdf=False, complexity=COMPLEXITY, git=GIT,
                     reports=tmp_path, selection="best", log=lambda *_: None)


def test_deterministic(env):
    """Same inputs, byte-identical outputs (tables, CSV, JSON, figures)."""
    root = env["root"]

    def snapshot() -> dict[str, bytes]:
        files = [*(root / "reports" / P).rglob("*"), *(root / "results" / P).glob("*.*"),
                 *(root / "results" / P / "plots").glob("*")]
        return {str(f.relative_to(root)): f.read_bytes() for f in files if f.is_file()}

    before = snapshot()
    build_report(P, params=env["params"], pdf=False, complexity=COMPLEXITY, git=GIT,
                 log=lambda *_: None)
    after = snapshot()
    assert sorted(before) == sorted(after)
    assert [k for k in before if before[k] != after[k]] == []


def test_cli_and_missing_pdflatex(env, monkeypatch, capsys):
    cx = env["root"] / "cx.json"
    cx.write_text(json.dumps({"rows": COMPLEXITY}))
    monkeypatch.setenv("OMNIAD_COMPLEXITY_JSON", str(cx))
    monkeypatch.setenv("OMNIAD_REPORTS", str(env["root"] / "reports_cli"))
    monkeypatch.setattr("omniad.report.build.pdflatex", lambda: None)
    assert cli(argparse.Namespace(protocol=P, no_pdf=False)) == 0
    assert "pdflatex not found" in capsys.readouterr().out
    assert (env["root"] / "reports_cli" / P / "tables" / "table1.tex").exists()
    monkeypatch.setenv("OMNIAD_REQUIRE_PDF", "1")
    assert cli(argparse.Namespace(protocol=P, no_pdf=False)) == 1
    assert "OMNIAD_REQUIRE_PDF" in capsys.readouterr().err


@pytest.mark.skipif(pdflatex() is None, reason="pdflatex not installed")
def test_pdf_compiles(env, tmp_path):
    res = build_report(P, params=env["params"], pdf=True, complexity=COMPLEXITY, git=GIT,
                       reports=tmp_path, log=lambda *_: None)
    assert res.pdf == tmp_path / P / "report.pdf"
    assert res.pdf.read_bytes()[:5] == b"%PDF-"
    log = (tmp_path / P / "latex-build" / "report.log").read_text(errors="replace")
    assert "Overfull \\hbox" not in log
    bad = tmp_path / "bad.tex"
    bad.write_text("\\documentclass{article}\\begin{document}\\undefinedmacro\\end{document}\n")
    with pytest.raises(ReportError, match="Undefined control sequence"):
        compile_pdf(bad)


def test_the_setting_line_names_each_methods_own_schedule() -> None:
    """The demo trains most methods for their own epochs: the report's setting says which."""
    from omniad.grid import load_params
    from omniad.report.build import epochs_line

    params = load_params()
    demo = params.protocol("demo")
    line = epochs_line(params, "demo")
    assert line.startswith(f"Demo set {demo.epochs['demo']} (")
    for m, sched in demo.methods.items():
        assert f"{params.methods[m].label} {sched.epochs['demo']}" in line, (m, line)
    assert "batch 8" in line  # DeSTSeg's demo batch
    assert epochs_line(params, "paper") == "MVTec-AD 500, VisA 500, Real-IAD 500"
