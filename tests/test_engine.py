"""Engine: preemption + resume is bit-identical, MLflow holds the run, tracking never fails it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

KEY = "tiny/demo/omniad/default/42"


def omniad(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "omniad.cli", *args], env=env,
                          capture_output=True, text=True, timeout=600)


def run_dir(env: dict[str, str]) -> Path:
    return Path(env["OMNIAD_RESULTS"]) / "tiny/runs/demo/omniad/default/seed42"


def test_sigterm_mid_epoch_then_resume_is_bit_identical(tiny_env, tmp_path) -> None:
    ref_env = {**tiny_env, "OMNIAD_RESULTS": str(tmp_path / "ref")}
    done = omniad("train", KEY, env=ref_env)
    assert done.returncode == 0, done.stderr
    # Interrupted run: SIGTERM once epoch 2 has started, i.e. mid-run and mid-epoch.
    proc = subprocess.Popen([sys.executable, "-m", "omniad.cli", "train", KEY], env=tiny_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "epoch 2/3" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.communicate(timeout=300)[0]
    assert proc.returncode == 75, "".join(lines) + rest
    assert (run_dir(tiny_env) / "checkpoint.pt").exists()
    assert not (run_dir(tiny_env) / "model.pt").exists()
    ckpt = torch.load(run_dir(tiny_env) / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 1 and 0 < ckpt["iter"] < 16  # resumed inside epoch 2
    resumed = omniad("train", KEY, env=tiny_env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at epoch 1 iteration" in resumed.stdout
    # the random encoder was calibrated once, before training; the resumed run loads it
    assert "BatchNorm statistics" in done.stdout and "BatchNorm statistics" not in resumed.stdout
    a = torch.load(run_dir(ref_env) / "model.pt", weights_only=False)["model"]
    b = torch.load(run_dir(tiny_env) / "model.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha = json.loads((run_dir(ref_env) / "history.json").read_text())
    hb = json.loads((run_dir(tiny_env) / "history.json").read_text())
    assert ha["epochs"] == hb["epochs"] and len(ha["epochs"]) == 3
    # periodic evaluations (after epochs 1 and 2): the one before the signal was kept, the
    # one after it made on resume; none lost, none repeated, the same numbers
    assert [e["epoch"] for e in hb["evaluations"]] == [1, 2]
    strip = [{k: v for k, v in e.items() if k != "eval_wall_s"} for e in ha["evaluations"]]
    assert strip == [{k: v for k, v in e.items() if k != "eval_wall_s"} for e in hb["evaluations"]]
    for env in (ref_env, tiny_env):
        assert omniad("evaluate", KEY, env=env).returncode == 0
    ma = json.loads((run_dir(ref_env) / "metrics.json").read_text())
    mb = json.loads((run_dir(tiny_env) / "metrics.json").read_text())
    assert ma["mean"] == mb["mean"] and ma["per_category"] == mb["per_category"]
    assert [e["epoch"] for e in mb["evaluations"]] == [1, 2, 3]  # the final one counts
    assert ma["released_max"] == mb["released_max"]


def test_train_evaluate_and_mlflow_store(tiny_env) -> None:
    from mlflow.tracking import MlflowClient

    from omniad.engine.runner import evaluate_run, train_run
    from omniad.tracking import init_store

    init_store("tiny")
    train_run(KEY)
    out = evaluate_run(KEY)
    metrics = json.loads((run_dir(tiny_env) / "metrics.json").read_text())
    assert metrics["mean"] == out["mean"]
    assert set(metrics["per_category"]) == {"brick", "gravel", "coffee", "coins"}
    meta = metrics["meta"]
    for key in ("git", "config_hash", "packages", "runtime", "train_wall_s", "peak_mem_mb",
                "train_images_per_s", "test_images_per_s", "seed"):
        assert meta[key] is not None, key
    assert meta["encoder_weights"] == "random"
    client = MlflowClient(tiny_env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("omniad/tiny/table1")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    r = runs[0]
    assert r.data.tags["dataset"] == "demo" and r.data.tags["method"] == "omniad"
    assert r.data.tags["protocol"] == "tiny" and r.data.tags["seed"] == "42"
    assert r.data.params["model.depths"] == "[1, 1, 1, 1]"
    assert r.data.metrics["mad"] == pytest.approx(metrics["mean"]["mad"])
    assert r.data.metrics["coins.pixel_aupro"] == pytest.approx(
        metrics["per_category"]["coins"]["pixel_aupro"])
    loss = client.get_metric_history(r.info.run_id, "train_loss")
    assert [m.step for m in loss] == [1, 2, 3]
    evals = client.get_metric_history(r.info.run_id, "eval.mad")  # periodic + final, as steps
    assert [(m.step, m.value) for m in evals] == [(e["epoch"], e["mean"]["mad"])
                                                  for e in metrics["evaluations"]]
    assert r.data.metrics["released_max.mad"] == pytest.approx(metrics["released_max"]["mean"]["mad"])
    arts = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"metrics.json", "anomaly_maps.png"} <= arts
    # The default variant is in every ablation table too: one experiment run per table.
    exp5 = client.get_experiment_by_name("omniad/tiny/table5")
    tagged = client.search_runs([exp5.experiment_id])
    assert [t.data.tags["value"] for t in tagged] == ["both"]


def test_train_with_evaluate_is_train_then_evaluate(tiny_env, tmp_path) -> None:
    """The DAG's one job per run (`omniad train --evaluate`) gives exactly what two processes
    give; run again, it reuses the trained model (a job killed while evaluating loses no
    training) and only re-evaluates."""
    two = {**tiny_env, "OMNIAD_RESULTS": str(tmp_path / "two"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'two.db'}"}
    for step in ("train", "evaluate"):
        done = omniad(step, KEY, env=two)
        assert done.returncode == 0, done.stderr
    one = omniad("train", KEY, "--evaluate", env=tiny_env)
    assert one.returncode == 0, one.stderr

    def outcome(env: dict[str, str]) -> dict:
        m = json.loads((run_dir(env) / "metrics.json").read_text())
        evals = [{k: v for k, v in e.items() if k != "eval_wall_s"} for e in m["evaluations"]]
        return {"mean": m["mean"], "per_category": m["per_category"], "evaluations": evals,
                "released_max": m["released_max"]}

    want = outcome(two)
    assert outcome(tiny_env) == want and len(want["evaluations"]) == 3  # epochs 1, 2 and final
    (run_dir(tiny_env) / "metrics.json").unlink()
    again = omniad("train", KEY, "--evaluate", env=tiny_env)
    assert again.returncode == 0, again.stderr
    assert "already trained" in again.stdout and ": done in " not in again.stdout
    assert outcome(tiny_env) == want


def test_unreachable_tracking_server_does_not_fail_the_run(tiny_env) -> None:
    env = {**tiny_env, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    assert omniad("train", KEY, env=env).returncode == 0
    res = omniad("evaluate", KEY, env=env)
    assert res.returncode == 0, res.stderr
    assert "omniad track sync" in res.stdout
    assert (run_dir(tiny_env) / "metrics.json").exists()
    assert not (run_dir(tiny_env) / "tracked.json").exists()
    synced = omniad("track", "sync", "--protocol", "tiny", env=tiny_env)
    assert synced.returncode == 0, synced.stderr
    assert json.loads((run_dir(tiny_env) / "tracked.json").read_text())["mlflow_run_ids"]
