"""MLflow as its users see it, against a real ``mlflow server`` on 127.0.0.1.

The store is made by the project's own tracking code from a few tiny run folders (metrics.json,
train.json, history.json as the engine writes them); the checks read the server's REST API,
which is what the UI shows: each table's experiment is a model-training experiment with a
description, its runs carry the training's own start and end, the source tags, the dataset as
an input, the row / mean metrics / paper's numbers as columns. The server then goes away while
a run finishes; the run completes, and ``omniad track sync`` logs it once the server is back.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from omniad.grid import REPO, load_params, parse_run_key

BIN = Path(sys.executable).parent
TREE = "3f" * 32  # the demo manifest's tree digest, as the cache key records it
#: run key -> (started_at, training seconds): distinct, known start and end times
RUNS = {
    "demo/demo/omniad/tokens-16/42": (1_700_000_000.25, 61.5),
    "demo/demo/omniad/tokens-36/42": (1_700_000_100.5, 75.25),
    "demo/demo/rd4ad/default/42": (1_700_000_200.0, 42.0),
}
LATE = "demo/demo/omniad/tokens-100/42"  # finished while the server was down


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``mlflow server`` in its own process group, over one sqlite store that outlives it."""

    def __init__(self, root: Path) -> None:
        self.root, self.port, self.proc = root, _free_port(), None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            stdout=open(self.root / "server.log", "ab"), stderr=subprocess.STDOUT, env=env,
            start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.url}/health", timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        raise TimeoutError((self.root / "server.log").read_text()[-3000:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self.proc = None

    def api(self, method: str, path: str, **kw: object) -> dict:
        resp = requests.request(method, f"{self.url}/api/2.0/mlflow/{path}", timeout=30, **kw)
        assert resp.ok, resp.text
        return resp.json()


def write_run(results: Path, key: str, started: float, seconds: float) -> Path:
    """A finished run's folder, as omniad train + evaluate leave it (numbers made up)."""
    run = parse_run_key(key)
    cfg = {"run": key, "protocol": run.protocol, "dataset": run.dataset, "method": run.method,
           "variant": run.variant, "seed": run.seed, "model": dict(run.overrides),
           "image_size": 64, "epochs": 2}
    mean = {m: round(0.5 + 0.01 * i + seconds / 1000, 4) for i, m in enumerate(
        ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max",
         "pixel_aupro", "mad"))}
    metrics = {"run": key, "protocol": run.protocol, "dataset": run.dataset,
               "method": run.method, "variant": run.variant, "seed": run.seed, "mean": mean,
               "per_category": {"brick": mean, "coins": mean},
               "meta": {"config": cfg, "config_hash": f"h{len(key)}",
                        "git": {"commit": "0123456789abcdef0123456789abcdef01234567",
                                "dirty": False},
                        "encoder_weights": "random", "train_wall_s": seconds,
                        "eval_wall_s": 1.5}}
    d = run.dir(results)
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(metrics))
    (d / "history.json").write_text(json.dumps({"epochs": [
        {"epoch": 1, "loss": 0.9}, {"epoch": 2, "loss": 0.7}]}))
    (d / "train.json").write_text(json.dumps({"train_wall_s": seconds, "started_at": started,
                                              "finished_at": started + seconds}))
    return d


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    """A real server, a results tree of tiny runs, the demo cache key; env pointed at them."""
    root = tmp_path_factory.mktemp("mlflow")
    cache = root / "cache" / "demo-64"
    cache.mkdir(parents=True)
    (cache / "cache_key.json").write_text(json.dumps({
        "dataset": "demo", "size": 64, "source_tree_sha256": TREE, "sha256": "c" * 64,
        "categories": ["brick", "coins"]}))
    server = Server(root)
    saved = {k: os.environ.get(k) for k in ("OMNIAD_RESULTS", "OMNIAD_CACHE",
                                            "MLFLOW_TRACKING_URI", "OMNIAD_PARAMS")}
    os.environ.update({"OMNIAD_RESULTS": str(root / "results"), "OMNIAD_CACHE": str(root / "cache"),
                       "MLFLOW_TRACKING_URI": server.url})
    os.environ.pop("OMNIAD_PARAMS", None)
    load_params.cache_clear()
    server.start()
    try:
        yield server, root / "results"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        load_params.cache_clear()


def _runs(server: Server, exp_id: str) -> list[dict]:
    return server.api("POST", "runs/search", json={"experiment_ids": [exp_id],
                                                   "max_results": 100}).get("runs", [])


def _experiment(server: Server, name: str) -> dict:
    return server.api("GET", "experiments/get-by-name",
                      params={"experiment_name": name})["experiment"]


def _kv(items: list[dict]) -> dict[str, str]:
    return {i["key"]: i["value"] for i in items}


def test_tables_read_right_over_the_rest_api(store) -> None:
    from omniad.tracking import init_store, log_run

    server, results = store
    init_store("demo")
    for key, (started, seconds) in RUNS.items():
        assert log_run(write_run(results, key, started, seconds))
    params = load_params()
    durations = {}
    for table in params.grid.table_order:
        exp = _experiment(server, f"omniad/demo/{table}")
        tags = _kv(exp.get("tags", []))
        assert tags["mlflow.experimentKind"] == "custom_model_development"
        assert params.grid.tables[table].title in tags["mlflow.note.content"]
        runs = _runs(server, exp["experiment_id"])
        expected = {"table1": {"demo/demo/rd4ad/default/42"},
                    "table4": {"demo/demo/omniad/tokens-16/42",
                               "demo/demo/omniad/tokens-36/42"}}.get(table, set())
        assert {_kv(r["data"]["tags"])["run_key"] for r in runs} == expected, table
        for r in runs:
            info, data = r["info"], r["data"]
            rtags, rparams = _kv(data["tags"]), _kv(data["params"])
            metrics = {m["key"]: m["value"] for m in data["metrics"]}
            started, seconds = RUNS[rtags["run_key"]]
            # the training's own start and end, to the millisecond, also as the UI's duration
            assert int(info["start_time"]) == int(started * 1000)
            assert int(info["end_time"]) == int((started + seconds) * 1000)
            assert info["status"] == "FINISHED"
            durations[info["run_name"], table] = (int(info["end_time"])
                                                  - int(info["start_time"])) / 1000
            assert rtags["mlflow.source.git.commit"].startswith("0123456789abcdef")
            assert rtags["mlflow.source.name"] and rtags["mlflow.source.type"] == "LOCAL"
            ds = r["inputs"]["dataset_inputs"][0]
            assert ds["dataset"]["name"] == "demo" and ds["dataset"]["digest"] == TREE[:16]
            assert json.loads(ds["dataset"]["source"])["manifest_tree_sha256"] == TREE
            assert rparams["table"] == table and rparams["row"] == rtags["value"]
            written = json.loads((parse_run_key(rtags["run_key"]).dir(results)
                                  / "metrics.json").read_text())
            assert metrics["mad"] == pytest.approx(written["mean"]["mad"])
            assert metrics["train_wall_s"] == pytest.approx(seconds)
        if table == "table4":  # Compare of these runs = Table IV: row, ours, the paper's mAD
            rows = {_kv(r["data"]["params"])["row"]: {m["key"]: m["value"]
                                                      for m in r["data"]["metrics"]}
                    for r in runs}
            assert set(rows) == {"16", "36"}
            assert rows["16"]["paper_mad"] == pytest.approx(0.862)
            assert rows["36"]["paper_params_m"] == pytest.approx(29.6)
            assert rows["36"]["paper_flops_g"] == pytest.approx(10.5)
    print("MLflow run durations (REST API):", durations)
    assert sorted(set(durations.values())) == [42.0, 61.5, 75.25]
    # logging the same results again changes nothing (no duplicate runs)
    before = len(_runs(server, _experiment(server, "omniad/demo/table4")["experiment_id"]))
    for key in RUNS:
        log_run(parse_run_key(key).dir(results))
    assert len(_runs(server, _experiment(server, "omniad/demo/table4")["experiment_id"])) == before


def test_server_going_away_mid_run_then_sync(store, capsys) -> None:
    from mlflow.tracking import MlflowClient

    from omniad.tracking import init_store, log_run_safely

    server, results = store
    init_store("demo")  # the DAG's onstart: the server was up when the run began
    exp_id = _experiment(server, "omniad/demo/table4")["experiment_id"]
    # a logging cut short by the outage: a run left RUNNING for the same table cell
    stale = MlflowClient(server.url).create_run(
        exp_id, tags={"run_key": LATE, "table": "table4"}).info.run_id
    server.stop()
    started, seconds = 1_700_000_300.0, 33.0
    run_dir = write_run(results, LATE, started, seconds)
    t0 = time.monotonic()
    assert log_run_safely(run_dir) is None  # the run completes; tracking says what to do
    assert time.monotonic() - t0 < 30
    assert "omniad track sync" in capsys.readouterr().out
    assert not (run_dir / "tracked.json").exists()
    server.start()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    synced = subprocess.run([sys.executable, "-m", "omniad.cli", "track", "sync", "--protocol",
                             "demo"], env=env, capture_output=True, text=True, timeout=300)
    assert synced.returncode == 0, synced.stderr[-3000:]
    assert json.loads((run_dir / "tracked.json").read_text())["mlflow_run_ids"]
    runs = [r for r in _runs(server, exp_id) if _kv(r["data"]["tags"])["run_key"] == LATE]
    assert len(runs) == 1 and runs[0]["info"]["run_id"] != stale
    info = runs[0]["info"]
    assert (int(info["start_time"]), int(info["end_time"])) == (int(started * 1000),
                                                               int((started + seconds) * 1000))
    assert info["status"] == "FINISHED"
    gone = server.api("GET", "runs/get", params={"run_id": stale})["run"]["info"]
    assert gone["lifecycle_stage"] == "deleted"


def test_training_times_without_stamps_and_paper_columns(tmp_path: Path) -> None:
    """Runs trained before train.json held its start and end: the end is train.json's
    modification time, the start that minus the training's wall time."""
    from omniad.tracking import paper_metrics, training_times

    (tmp_path / "train.json").write_text(json.dumps({"train_wall_s": 12.5}))
    os.utime(tmp_path / "train.json", (1_700_000_050.0, 1_700_000_050.0))
    assert training_times(tmp_path, {"meta": {}}) == (1_700_000_037_500, 1_700_000_050_000)
    params = load_params()
    # Table I by the method's label, Table II's seven metrics as a list, both on a 0-1 scale
    assert paper_metrics(params, "table1", "omniad", "mvtec_ad")["paper_mad"] == 0.864
    assert paper_metrics(params, "table1", "rd4ad", "visa")["paper_image_auroc"] == 0.924
    two = paper_metrics(params, "table2", "q", "mvtec_ad")
    assert two["paper_pixel_aupro"] == 0.931 and "paper_mad" not in two
    assert paper_metrics(params, "table1", "omniad", "demo") == {}
