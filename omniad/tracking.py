"""MLflow tracking: one experiment per table, runs logged from the files a run leaves on disk.

Logging reads only ``metrics.json`` / ``history.json`` / ``config.json``, so a run whose
tracking server was down is logged later, identically, by ``omniad track sync``. Tracking
never fails a run: results on disk are the record, MLflow is the index.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from omniad.grid import REPO, Run, load_params, results_root, tables_of

DEFAULT_URI = f"sqlite:///{REPO / 'mlruns.db'}"
ARTIFACTS = REPO / "mlartifacts"
MARKER = "tracked.json"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI)


def experiment_name(protocol: str, table: str) -> str:
    return f"omniad/{protocol}/{table}"


def _client():  # noqa: ANN202 - mlflow is imported lazily (slow import)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    if uri.startswith("http"):
        import requests

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=3).raise_for_status()
        except requests.RequestException as exc:
            raise ConnectionError(f"MLflow tracking server {uri} unreachable: {exc}") from exc
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


def _experiment(client: Any, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None if tracking_uri().startswith("http") else ARTIFACTS.as_uri()
    return client.create_experiment(name, artifact_location=location)


def init_store(protocol: str) -> list[str]:
    """Create the store and every table's experiment once, before parallel jobs race on it."""
    client = _client()
    params = load_params()
    return [_experiment(client, experiment_name(protocol, t)) for t in params.grid.table_order]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list | tuple) else str(v)
    return out


def _render_samples(run_dir: Path, out: Path) -> Path | None:
    path = run_dir / "samples.npz"
    if not path.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    data = np.load(path)
    n = min(len(data["category"]), 6)
    fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n), squeeze=False)
    for i in range(n):
        for ax, img, title in zip(axes[i], (data["image"][i], data["mask"][i],
                                            data["map"][i].astype("float32")),
                                  (str(data["category"][i]), "ground truth", "anomaly map"),
                                  strict=True):
            ax.imshow(img, cmap=None if img.ndim == 3 else "jet" if title == "anomaly map"
                      else "gray")
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def evaluation_metrics(metrics: dict[str, Any], ts: int) -> list[Any]:
    """The periodic evaluations as MLflow steps (``eval.<metric>`` at step = epoch, mean row)
    and the released-style maximum (``released_max.<metric>``)."""
    from mlflow.entities import Metric

    out = [Metric(f"eval.{k}", float(v), ts, int(e["epoch"]))
           for e in metrics.get("evaluations", []) for k, v in e["mean"].items()]
    best = (metrics.get("released_max") or {}).get("mean", {})
    return out + [Metric(f"released_max.{k}", float(v), ts, 0) for k, v in best.items()]


def log_run(run_dir: Path) -> list[str]:
    """Log one finished run to every table experiment it belongs to; returns MLflow run ids."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    history = json.loads((run_dir / "history.json").read_text()).get("epochs", [])
    uri = tracking_uri()
    marker = run_dir / MARKER
    if marker.exists():
        done = json.loads(marker.read_text())
        if done.get("uri") == uri and done.get("config_hash") == metrics["meta"]["config_hash"]:
            return done["mlflow_run_ids"]
    client = _client()
    params = load_params()
    run = Run(protocol=metrics["protocol"], dataset=metrics["dataset"], method=metrics["method"],
              variant=metrics["variant"], seed=metrics["seed"])
    cfg = metrics["meta"]["config"]
    ids = []
    with tempfile.TemporaryDirectory() as tmp:
        figure = _render_samples(run_dir, Path(tmp) / "anomaly_maps.png")
        for table, row in tables_of(params, run) or [("untabled", "-")]:
            spec = params.grid.tables.get(table)
            exp = _experiment(client, experiment_name(run.protocol, table))
            tags = {"dataset": run.dataset, "method": run.method, "variant": run.variant,
                    "protocol": run.protocol, "seed": str(run.seed), "table": table,
                    "axis": (spec.axis if spec and spec.axis else "method"), "value": row,
                    "run_key": metrics["run"], "git_commit": str(metrics["meta"]["git"]["commit"]),
                    "encoder_weights": str(metrics["meta"].get("encoder_weights"))}
            mr = client.create_run(exp, run_name=f"{run.method}:{run.variant}:{run.dataset}",
                                   tags=tags)
            rid = mr.info.run_id
            from mlflow.entities import Metric, Param

            params_list = [Param(k, v[:6000]) for k, v in _flatten(cfg).items()]
            ts = int(os.path.getmtime(run_dir / "metrics.json") * 1000)
            ms = [Metric("train_loss", h["loss"], ts, h["epoch"]) for h in history]
            ms += [Metric(k, v, ts, 0) for k, v in metrics["mean"].items()]
            ms += evaluation_metrics(metrics, ts)
            for cat, vals in metrics["per_category"].items():
                ms += [Metric(f"{cat}.{k}", v, ts, 0) for k, v in vals.items()]
            for k in ("train_wall_s", "eval_wall_s", "test_images_per_s", "train_images_per_s",
                      "peak_mem_mb"):
                if metrics["meta"].get(k) is not None:
                    ms.append(Metric(k, float(metrics["meta"][k]), ts, 0))
            for i in range(0, len(params_list), 100):
                client.log_batch(rid, params=params_list[i:i + 100])
            for i in range(0, len(ms), 500):
                client.log_batch(rid, metrics=ms[i:i + 500])
            client.log_artifact(rid, str(run_dir / "metrics.json"))
            if figure is not None:
                client.log_artifact(rid, str(figure))
            client.set_terminated(rid)
            ids.append(rid)
    from omniad.atomic import write_json_atomic

    write_json_atomic(marker, {"uri": uri, "mlflow_run_ids": ids,
                               "config_hash": metrics["meta"]["config_hash"]})
    return ids


def log_run_safely(run_dir: Path) -> list[str] | None:
    """Log, or say why not and how to catch up later; never raises."""
    try:
        return log_run(run_dir)
    except Exception as exc:  # noqa: BLE001 - tracking must never fail a finished run
        print(f"[track] MLflow logging skipped for {run_dir}: {exc}. Results are on disk; "
              f"run `omniad track sync` once {tracking_uri()} is reachable.", flush=True)
        return None


def sync(protocol: str | None = None) -> int:
    """Log every finished run not yet in the current store; returns how many were logged."""
    base = results_root()
    runs = sorted((base / protocol / "runs" if protocol else base).rglob("metrics.json"))
    n = 0
    for path in runs:
        if log_run(path.parent):
            n += 1
    return n


def cli(args: argparse.Namespace) -> int:
    protocol = args.protocol or load_params().default_protocol
    if args.what == "init":
        ids = init_store(protocol)
        print(f"[track] {tracking_uri()}: {len(ids)} experiments ready for {protocol}")
    else:
        print(f"[track] synced {sync(args.protocol)} runs to {tracking_uri()}")
    return 0
