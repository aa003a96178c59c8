"""End to end, in a clean checkout of this working tree: the demo DAG through DVC, as a new user
meets it. `dvc repro` (what `make demo` runs) builds everything; a second one and `dvc status`
find nothing to do; the MLflow store reads right; an edit to code the training imports marks
the train stage changed; `dvc exp run -S` with another Omni-AD token count retrains that variant
only, and `dvc exp show` lists it beside the baseline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow

# Mean image AU-ROC over the 4 categories after the demo budget (random encoder with BatchNorm
# statistics from the training images, 64 px; chance is 0.5, each category has 8 normal and 8
# defective test images), averaged over a variant's seeds (the demo runs one). Every method of
# Table I and every Omni-AD variant beats chance through the engine with its demo epochs from
# params/protocols.yaml (Omni-AD, RD4AD and RLR 2, UniAD 4, MambaAD 5, SimpleNet 10, DeSTSeg 6 at
# batch 8).
BEATS_CHANCE = 0.55
#: The experiment: Table IV's 100-token row retrained with 81 tokens (a perfect square).
EXPERIMENT = "params/grid.yaml:tables.table4.rows.100.tokens=81"


def clean_checkout(dest: Path) -> Path:
    """This working tree as a fresh clone would have it: tracked and untracked-but-not-ignored
    files (uncommitted edits included), no products, in a new git repository."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=REPO, capture_output=True, check=True)
    for rel in sorted({p for p in listed.stdout.decode().split("\0") if p}):
        src = REPO / rel
        if src.is_file():  # deleted but still in the index: skip
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "clean checkout"]):
        subprocess.run(["git", *args], cwd=dest, env=_env(dest), check=True)
    return dest


def _env(repo: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("OMNIAD_") and k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{BIN}:{env['PATH']}"
    env["PYTHONPATH"] = str(repo)  # the checkout's omniad, not an installed one
    for k in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
        env.setdefault(k, "omniad test")
    for k in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        env.setdefault(k, "test@omniad.invalid")
    if os.environ.get("OMNIAD_REQUIRE_PDF"):
        env["OMNIAD_REQUIRE_PDF"] = os.environ["OMNIAD_REQUIRE_PDF"]
    return env


def _dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=_env(repo), text=True,
                          capture_output=True, timeout=3600)


def _stamps(results: Path) -> dict[str, int]:
    return {str(p.relative_to(results)): p.stat().st_mtime_ns
            for p in results.glob("*/runs/**/metrics.json")}


def test_demo_dag_through_dvc_in_a_clean_checkout(tmp_path: Path) -> None:
    from omniad.grid import enumerate_runs, load_params, run_dir

    repo = clean_checkout(tmp_path / "checkout")
    results = repo / "results"
    first = _dvc(repo, "repro")
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    reports = repo / "reports" / "demo"
    for i in range(1, 9):  # Table VIII: ours (attention FFN)
        tex = (reports / "tables" / f"table{i}.tex").read_text()
        assert "\\begin{tabular" in tex and "\\toprule" in tex
    figures = list((reports / "figures").glob("*.png"))
    assert len(figures) >= 3
    if shutil.which("pdflatex"):
        assert (reports / "report.pdf").stat().st_size > 10_000
    params = load_params(repo / "params")
    runs = enumerate_runs(params, "demo")
    image: dict[tuple[str, str], list[float]] = {}
    for run in runs:
        metrics = json.loads((run.dir(results) / "metrics.json").read_text())
        assert 0.0 <= metrics["mean"]["mad"] <= 1.0
        assert metrics["meta"]["encoder_weights"] == "random"
        image.setdefault((run.method, run.variant), []).append(metrics["mean"]["image_auroc"])
    mean = {k: float(np.mean(v)) for k, v in image.items()}
    table1 = {m for m in params.grid.tables["table1"].methods if (m, "default") in mean}
    assert len(table1) == 7, sorted(table1)  # DiAD is cited, not run
    for method in table1:
        assert mean[method, "default"] > BEATS_CHANCE, (method, mean[method, "default"])
    omni = [v for (m, _), v in mean.items() if m == "omniad"]
    assert len(omni) == 17 and min(omni) > BEATS_CHANCE and np.mean(omni) > 0.65, mean
    summary = json.loads((repo / "summary" / "metrics.json").read_text())
    assert summary == json.loads((results / "demo" / "summary.json").read_text())

    # MLflow: model-training experiments whose runs last as long as their training
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlruns.db'}")
    exp = client.get_experiment_by_name("omniad/demo/table1")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    logged = client.search_runs([exp.experiment_id], max_results=1000)
    assert {r.data.tags["method"] for r in logged} >= {r.method for r in runs}
    for r in logged:
        folder = run_dir(*r.data.tags["run_key"].split("/"), results=results)
        train = json.loads((folder / "train.json").read_text())
        assert r.info.end_time - r.info.start_time == pytest.approx(
            1000 * (train["finished_at"] - train["started_at"]), abs=2)
        assert r.info.end_time > r.info.start_time

    # nothing to do a second time, for DVC and for Snakemake
    stamp = _stamps(results)
    second = _dvc(repo, "repro")
    assert second.returncode == 0, second.stderr[-4000:]
    assert "didn't change, skipping" in second.stdout and "Running stage" not in second.stdout
    assert stamp == _stamps(results)
    status = _dvc(repo, "status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stdout
    shown = _dvc(repo, "metrics", "show")
    assert shown.returncode == 0 and "table1" in shown.stdout, shown.stdout + shown.stderr

    # code the training imports (omniad/data/cache.py, via omniad.codehash.TRAIN_ENTRY)
    edited = repo / "omniad" / "data" / "cache.py"
    original = edited.read_text()
    edited.write_text(original + "\n# an edit\n")
    changed = json.loads(_dvc(repo, "status", "--json").stdout)
    assert "train" in changed, changed
    edited.write_text(original)
    assert json.loads(_dvc(repo, "status", "--json").stdout) == {}

    # a DVC experiment: the committed demo is the baseline, one variant changes
    subprocess.run(["git", "add", "-A"], cwd=repo, env=_env(repo), check=True)
    subprocess.run(["git", "commit", "-qm", "demo baseline"], cwd=repo, env=_env(repo),
                   check=True)
    stamp = _stamps(results)
    exp_run = _dvc(repo, "exp", "run", "-S", EXPERIMENT)
    assert exp_run.returncode == 0, exp_run.stdout[-4000:] + exp_run.stderr[-4000:]
    after = _stamps(results)
    new = {k for k in after if k not in stamp}
    assert new == {f"demo/runs/demo/omniad/tokens-81/seed{s}/metrics.json"
                   for s in params.protocol("demo").seeds_for("ablation")}, new
    assert {k: after[k] for k in stamp} == stamp  # nothing else retrained or re-evaluated
    table = json.loads(_dvc(repo, "exp", "show", "--json").stdout)
    baseline = next(row for row in table if row["rev"] != "workspace")
    mad = baseline["data"]["metrics"]["summary/metrics.json"]["data"]["table4"]["100"]
    exps = [r for e in baseline.get("experiments") or [] for r in e["revs"]]
    assert len(exps) == 1, table
    data = exps[0]["data"]
    rows = data["params"]["params/grid.yaml"]["data"]["tables"]["table4"]["rows"]
    assert rows["100"] == {"tokens": 81}
    assert data["metrics"]["summary/metrics.json"]["data"]["table4"]["100"] != mad
    assert json.loads(_dvc(repo, "status", "--json").stdout) == {}
