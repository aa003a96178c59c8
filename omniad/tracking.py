"""MLflow tracking: one experiment per table, runs logged from the files a run leaves on disk.

Logging reads only the run's folder (``metrics.json``, ``history.json``, ``train.json``) and
the dataset's cache key, so a run whose tracking server was down is logged later, identically
(same start and end times), by ``omniad track sync``. Tracking never fails a run: results on
disk are the record, MLflow is the index.

What an MLflow user expects to find: experiments of the model-training kind (the UI opens on
the runs table), a description per experiment, runs whose start and end are the training's,
the standard source tags (git commit, entry point), the dataset as a logged input, and the
table row, the mean metrics and the paper's numbers as columns, so that selecting one table's
runs and pressing Compare gives that table.
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from omniad.grid import (
    REPO,
    Params,
    Run,
    cache_dir,
    data_root,
    load_params,
    results_root,
    tables_of,
)

DEFAULT_URI = f"sqlite:///{REPO / 'mlruns.db'}"
ARTIFACTS = REPO / "mlartifacts"
MARKER = "tracked.json"
#: Experiment tag the MLflow 3 UI reads to open an experiment on its runs table ("Machine
#: learning") instead of the GenAI traces overview (mlflow.utils.mlflow_tags has no constant).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
#: The paper's metric columns, in order; tables II, III and V list the first seven.
METRIC_ORDER = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap",
                "pixel_f1max", "pixel_aupro", "mad")


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


def experiment_note(params: Params, protocol: str, table: str) -> str:
    """The experiment's description (markdown): the table's title, what varies, how to compare."""
    spec = params.grid.tables.get(table)
    proto = params.protocol(protocol)
    if spec is None:
        return f"Runs of protocol `{protocol}` that appear in no table of params/grid.yaml."
    if spec.kind == "methods":
        varies = (f"the method (params `row`, tag `method`) on each dataset "
                  f"({', '.join(proto.datasets)}; tag `dataset`)")
    else:
        varies = (f"`{spec.axis}` of Omni-AD (param `row`: "
                  f"{', '.join(spec.rows)}) on {proto.ablation_dataset}")
    if spec.source == "ours":
        varies += "; a table of ours, not the paper's (no `paper_*` columns)"
    return (f"**{table}: {spec.title}** (protocol `{protocol}`, seeds "
            f"{proto.seeds_for(spec.kind)}, each its own run, tag `seed`).\n\n"
            f"What varies: {varies}. Select the runs and press Compare: metrics `image_auroc` "
            f"... `mad` are ours (0-1, mean over categories), `paper_*` the paper's (0-1), "
            f"per-category metrics are `<category>.<metric>`. Start and end are the "
            f"training's; `train_wall_s` its compute time.")


def _experiment(client: Any, name: str, note: str | None = None) -> str:
    """The experiment's id, created (or updated) as a model-training experiment with a note."""
    tags = dict([EXPERIMENT_KIND])
    if note is not None:
        tags["mlflow.note.content"] = note
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = None if tracking_uri().startswith("http") else ARTIFACTS.as_uri()
        try:
            return client.create_experiment(name, artifact_location=location, tags=tags)
        except Exception:  # noqa: BLE001 - a parallel job created it first
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    for k, v in tags.items():  # stores made by older code: set what they lack
        if exp.tags.get(k) != v:
            client.set_experiment_tag(exp.experiment_id, k, v)
    return exp.experiment_id


def _table_experiment(client: Any, params: Params, protocol: str, table: str) -> str:
    return _experiment(client, experiment_name(protocol, table),
                       experiment_note(params, protocol, table))


def init_store(protocol: str) -> list[str]:
    """Create the store and every table's experiment once, before parallel jobs race on it."""
    client = _client()
    params = load_params()
    return [_table_experiment(client, params, protocol, t) for t in params.grid.table_order]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list | tuple) else str(v)
    return out


def _render_samples(run_dir: Path, out: Path, tile: int = 128) -> Path | None:
    """Up to 6 test samples as rows of (image, ground truth, anomaly map): the run's
    anomaly-map artifact. Composed with PIL (the map through matplotlib's jet, scaled to its own
    range as imshow would): ~20 ms a run, where a matplotlib figure took ~0.7 s, and the MLflow
    sync of a whole grid runs at the end of the DAG."""
    path = run_dir / "samples.npz"
    if not path.exists():
        return None
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    data = np.load(path)
    n = min(len(data["category"]), 6)
    head, pad = 14, 4
    sheet = Image.new("RGB", (3 * tile + 4 * pad, n * (tile + head + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    jet = colormaps["jet"]
    for i in range(n):
        heat = data["map"][i].astype("float32")
        span = float(heat.max() - heat.min()) or 1.0
        tiles = (data["image"][i],
                 np.repeat((data["mask"][i].astype("uint8") * 255)[..., None], 3, axis=-1),
                 (jet((heat - heat.min()) / span)[..., :3] * 255).astype("uint8"))
        titles = (str(data["category"][i]), "ground truth", "anomaly map")
        y = pad + i * (tile + head + pad)
        for j, (img, title) in enumerate(zip(tiles, titles, strict=True)):
            x = pad + j * (tile + pad)
            draw.text((x, y), title, fill="black")
            sheet.paste(Image.fromarray(img).resize((tile, tile), Image.NEAREST), (x, y + head))
    sheet.save(out)
    return out


def training_times(run_dir: Path, metrics: dict[str, Any]) -> tuple[int, int]:
    """(start, end) of the training in ms since the epoch, as MLflow wants a run's times.

    ``train.json`` records them; for runs trained before it did, the end is train.json's (else
    metrics.json's) modification time and the start that minus the training's wall time.
    """
    info = _read_json(run_dir / "train.json")
    if info.get("started_at") and info.get("finished_at"):
        return int(info["started_at"] * 1000), int(info["finished_at"] * 1000)
    stamped = run_dir / "train.json" if (run_dir / "train.json").exists() else run_dir / "metrics.json"
    end = os.path.getmtime(stamped)
    wall = info.get("train_wall_s", metrics["meta"].get("train_wall_s")) or 0.0
    return int((end - float(wall)) * 1000), int(end * 1000)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def dataset_input(dataset: str, image_size: int) -> Any:
    """The run's dataset as an MLflow input: name, the source manifest's digest, the cache.

    The digest is the manifest's tree SHA-256 (as recorded in the resized cache the run read),
    cut to MLflow's 36-character limit; the source and profile give the whole hashes.
    """
    from mlflow.entities import Dataset, DatasetInput, InputTag

    key = _read_json(cache_dir(dataset, image_size) / "cache_key.json")
    tree = key.get("source_tree_sha256")
    if tree is None:
        from omniad.data.manifest import read_manifest

        tree = (read_manifest(data_root(dataset)) or {}).get("tree_sha256")
    source = {"uri": data_root(dataset).as_uri(), "manifest_tree_sha256": tree,
              "cache_sha256": key.get("sha256")}
    profile = {"image_size": image_size, "categories": key.get("categories")}
    ds = Dataset(name=dataset, digest=(tree or "unknown")[:16], source_type="local",
                 source=json.dumps(source), profile=json.dumps(profile))
    return DatasetInput(ds, tags=[InputTag("mlflow.data.context", "train")])


def paper_metrics(params: Params, table: str, row: str, dataset: str) -> dict[str, float]:
    """The paper's numbers for one table cell: ``paper_<metric>`` on our 0-1 scale, and
    ``paper_params_m`` / ``paper_flops_g`` as printed; empty where the paper has none."""
    entry = params.paper.get(table) or {}
    if table in params.grid.tables and params.grid.tables[table].kind == "methods":
        label = params.methods[row].label if row in params.methods else row
        cell = (entry.get(dataset) or {}).get(label) or {}
        values: Any = cell.get("values") if isinstance(cell, dict) else None
    else:
        values = {str(k): v for k, v in entry.items()}.get(str(row))
    if isinstance(values, list):
        values = dict(zip(METRIC_ORDER, values, strict=False))
    if not isinstance(values, dict):
        return {}
    out = {f"paper_{k}": round(float(v) / 100.0, 6) for k, v in values.items()
           if k in METRIC_ORDER and v is not None}
    out.update({f"paper_{k}": float(v) for k, v in values.items()
                if k in ("params_m", "flops_g") and v is not None})
    return out


def _user() -> str:
    try:
        return os.environ.get("USER") or getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return "unknown"


def _source_tags(metrics: dict[str, Any]) -> dict[str, str]:
    """MLflow's standard source tags: what ran (the entry point), from which commit, by whom."""
    git = metrics["meta"].get("git") or {}
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": "omniad/cli.py",
            "mlflow.project.entryPoint": "omniad train + omniad evaluate",
            "mlflow.user": _user()}
    if git.get("commit"):
        tags["mlflow.source.git.commit"] = str(git["commit"])
    if git.get("dirty") is not None:
        tags["mlflow.source.git.dirty"] = str(bool(git["dirty"])).lower()
    return tags


def _replace_stale(client: Any, exp: str, run_key: str, table: str, digest: str) -> str | None:
    """A finished run already logged from these exact results, if any; other runs of the same
    cell (older results, or a logging cut short by a server that went away) are deleted."""
    found = None
    for old in client.search_runs([exp], f"tags.run_key = '{run_key}' and tags.table = '{table}'"):
        if (found is None and old.data.tags.get("results_sha256") == digest
                and old.info.status == "FINISHED"):
            found = old.info.run_id
        else:
            client.delete_run(old.info.run_id)
    return found


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
    raw = (run_dir / "metrics.json").read_bytes()
    metrics = json.loads(raw)
    digest = hashlib.sha256(raw).hexdigest()
    history = _read_json(run_dir / "history.json").get("epochs", [])
    uri = tracking_uri()
    marker = run_dir / MARKER
    done = _read_json(marker)
    if done.get("uri") == uri and done.get("results_sha256") == digest:
        return done["mlflow_run_ids"]
    client = _client()
    params = load_params()
    run = Run(protocol=metrics["protocol"], dataset=metrics["dataset"], method=metrics["method"],
              variant=metrics["variant"], seed=metrics["seed"])
    cfg = metrics["meta"]["config"]
    start, end = training_times(run_dir, metrics)
    from mlflow.entities import Metric, Param

    ids = []
    with tempfile.TemporaryDirectory() as tmp:
        figure = _render_samples(run_dir, Path(tmp) / "anomaly_maps.png")
        for table, row in tables_of(params, run) or [("untabled", "-")]:
            spec = params.grid.tables.get(table)
            axis = spec.axis if spec and spec.axis else "method"
            exp = _table_experiment(client, params, run.protocol, table)
            found = _replace_stale(client, exp, metrics["run"], table, digest)
            if found is not None:
                ids.append(found)
                continue
            tags = {"dataset": run.dataset, "method": run.method, "variant": run.variant,
                    "protocol": run.protocol, "seed": str(run.seed), "table": table,
                    "axis": axis, "value": row, "run_key": metrics["run"],
                    "git_commit": str(metrics["meta"]["git"]["commit"]),
                    "encoder_weights": str(metrics["meta"].get("encoder_weights")),
                    "config_hash": str(metrics["meta"].get("config_hash")),
                    "results_sha256": digest, **_source_tags(metrics)}
            name = (f"{row} on {run.dataset}" if axis == "method" else f"{axis}={row}")
            mr = client.create_run(exp, start_time=start, run_name=name, tags=tags)
            rid = mr.info.run_id
            # the table's row and axis first: the columns a Compare of one table needs
            params_list = [Param("row", row), Param("axis", axis), Param("table", table)]
            params_list += [Param(k, v[:6000]) for k, v in _flatten(cfg).items()
                            if k not in ("row", "axis", "table")]
            ms = [Metric("train_loss", h["loss"], end, h["epoch"]) for h in history]
            ms += [Metric(k, v, end, 0) for k, v in metrics["mean"].items()]
            ms += [Metric(k, v, end, 0)
                   for k, v in paper_metrics(params, table, row, run.dataset).items()]
            ms += evaluation_metrics(metrics, end)
            for cat, vals in metrics["per_category"].items():
                ms += [Metric(f"{cat}.{k}", v, end, 0) for k, v in vals.items()]
            for k in ("train_wall_s", "eval_wall_s", "test_images_per_s", "train_images_per_s",
                      "peak_mem_mb"):
                if metrics["meta"].get(k) is not None:
                    ms.append(Metric(k, float(metrics["meta"][k]), end, 0))
            for i in range(0, len(params_list), 100):
                client.log_batch(rid, params=params_list[i:i + 100])
            for i in range(0, len(ms), 500):
                client.log_batch(rid, metrics=ms[i:i + 500])
            client.log_inputs(rid, datasets=[dataset_input(run.dataset, cfg["image_size"])])
            client.log_artifact(rid, str(run_dir / "metrics.json"))
            if figure is not None:
                client.log_artifact(rid, str(figure))
            client.set_terminated(rid, "FINISHED", end_time=end)
            ids.append(rid)
    from omniad.atomic import write_json_atomic

    write_json_atomic(marker, {"uri": uri, "mlflow_run_ids": ids, "results_sha256": digest,
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
        try:
            ids = init_store(protocol)
        except ConnectionError as exc:  # the DAG's onstart: training goes on without it
            print(f"[track] {exc}; runs will be logged by `omniad track sync` later", flush=True)
            return 0
        print(f"[track] {tracking_uri()}: {len(ids)} experiments ready for {protocol}")
    else:
        print(f"[track] synced {sync(args.protocol)} runs to {tracking_uri()}")
    return 0
