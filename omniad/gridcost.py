"""``omniad grid cost``: GPU-hours of a protocol's grid before launch.

hours(run) = training images x epochs / images per second / 3600, training only (the periodic
and final evaluations are passes over the test set, not counted). Images/s comes from a
measurement, never a guess, in this order: the images/s recorded by an earlier run of the same
key (``metrics.json`` -> ``meta.train_images_per_s``), then the same method's earlier runs of
this protocol (mean), then the throughput benchmark's JSON (``benchmarks/train_throughput.py
--json``, measured on the kind of device the protocol's training jobs ask for; the method's
full "ours" configuration, scaled by pixel count when its image size differs), then a value
the user passes (``--images-per-s``, measured on their GPU). Each run says which one it used;
runs with none are listed as unknown rather than priced.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from omniad.grid import Params, Run, enumerate_runs, load_params, resolve_run, results_root


def training_images(params: Params, dataset: str) -> int | None:
    """Training images of a dataset: params/datasets.yaml's expected counts, else the
    generated set's manifest (the demo)."""
    spec = params.datasets.get(dataset, {})
    totals = (spec.get("expected") or {}).get("totals") or {}
    if "train_normal" in totals:
        return int(totals["train_normal"]) + int(totals.get("train_anomaly", 0))
    from omniad.grid import data_root

    try:
        manifest = json.loads((data_root(dataset) / "omniad_manifest.json").read_text())
        return int(manifest["expected"]["totals"]["train_normal"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _recorded(protocol: str) -> dict[str, float]:
    """run key -> train images/s recorded in an earlier run's metrics.json."""
    out = {}
    for path in (results_root() / protocol / "runs").glob("*/*/*/seed*/metrics.json"):
        try:
            m = json.loads(path.read_text())
            ips = float(m["meta"]["train_images_per_s"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if ips > 0:
            out[m["run"]] = ips
    return out


def estimate(params: Params, protocol: str, throughput: Path | None = None,
             images_per_s: float | None = None) -> list[dict[str, Any]]:
    """One row per run: epochs, images, images/s and its source, hours (None if unknown)."""
    proto = params.protocol(protocol)
    recorded = _recorded(protocol)
    by_method: dict[str, list[float]] = {}
    for key, ips in recorded.items():
        by_method.setdefault(key.split("/")[2], []).append(ips)
    bench = json.loads(throughput.read_text()) if throughput else None
    train = proto.resources.get("train")
    wants_gpu = train is not None and train.gpu > 0
    if bench is not None and wants_gpu != (bench.get("device") == "cuda"):
        bench = None  # a CPU measurement does not price GPU jobs (nor the reverse)
    rows = []
    run: Run
    for run in enumerate_runs(params, protocol):
        images = training_images(params, run.dataset)
        ips, source = None, "unknown"
        if run.key in recorded:
            ips, source = recorded[run.key], "this run's metrics.json"
        elif run.method in by_method:
            vals = by_method[run.method]
            ips, source = sum(vals) / len(vals), f"mean of {len(vals)} earlier {run.method} runs"
        elif bench and run.method in bench.get("methods", {}):
            scale = (bench["size"] / proto.image_size) ** 2
            ips = bench["methods"][run.method]["ours_images_per_s"] * scale
            where = bench.get("gpu") or bench["device"]
            source = f"benchmark ({where}, {bench['size']} px" + (
                f", x{scale:.3g} for {proto.image_size} px)" if scale != 1 else ")")
        elif images_per_s:
            ips, source = images_per_s, "--images-per-s"
        epochs = resolve_run(params, run).epochs  # per-method schedules included
        hours = images * epochs / ips / 3600 if ips and images else None
        rows.append({"run": run.key, "epochs": epochs, "images": images,
                     "images_per_s": ips, "source": source, "gpu_hours": hours})
    return rows


def cli(a: argparse.Namespace) -> int:
    params = load_params()
    protocol = a.protocol or params.default_protocol
    bench = Path(a.throughput) if a.throughput else None
    if bench is None and (results_root() / "throughput.json").exists():
        bench = results_root() / "throughput.json"
    rows = estimate(params, protocol, bench, a.images_per_s)
    known = [r for r in rows if r["gpu_hours"] is not None]
    total = sum(r["gpu_hours"] for r in known)
    if not a.summary:
        print(f"{'run':58s} {'epochs':>6s} {'images':>7s} {'img/s':>8s} {'GPU-h':>8s}  source")
        for r in rows:
            ips = f"{r['images_per_s']:.1f}" if r["images_per_s"] else "-"
            h = f"{r['gpu_hours']:.2f}" if r["gpu_hours"] is not None else "-"
            print(f"{r['run']:58s} {r['epochs']:6d} {r['images'] or '-':>7} {ips:>8s} "
                  f"{h:>8s}  {r['source']}")
    unknown = len(rows) - len(known)
    print(f"[cost] {protocol}: {len(rows)} runs, {total:.1f} GPU-hours for {len(known)} priced "
          f"runs (training)" + (f"; {unknown} unpriced: no measured images/s (run "
                                "benchmarks/train_throughput.py --device cuda --json "
                                "results/throughput.json, or pass --images-per-s)"
                                if unknown else ""))
    return 0
