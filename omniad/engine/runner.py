"""``omniad train`` / ``omniad evaluate``: resolve a run from params/, then train or evaluate it."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from omniad.atomic import write_json_atomic
from omniad.codehash import evaluate_code
from omniad.data.cache import CachedDataset
from omniad.engine.checkpoint import load_checkpoint, seed_everything
from omniad.engine.evaluate import evaluate, evaluation_record, periodic_evaluator
from omniad.engine.features import FeatureCache, build_features
from omniad.engine.runtime import Runtime, git_state, package_versions
from omniad.engine.train import evaluation_due, train
from omniad.grid import (
    cache_dir,
    config_hash,
    feature_key,
    load_params,
    parse_run_key,
    resolve_run,
)
from omniad.methods import create_method
from omniad.models.base import ADMethod
from omniad.models.encoder import FrozenBackbone
from omniad.run_config import RunConfig
from omniad.selection import released_max


def build_model(cfg: RunConfig) -> ADMethod:
    """The method's model, initialised from the run's seed (its random init is part of it)."""
    seed_everything(cfg.seed)
    return create_method(cfg.method, **cfg.model)


def _setup(key: str, device: str | None, bf16: bool, channels_last: bool
           ) -> tuple[RunConfig, Path, Runtime]:
    run = parse_run_key(key)
    cfg = resolve_run(load_params(), run)
    gpu = cfg.gpu_options  # the protocol's; the command-line flags can only add to them
    gpu = gpu.model_copy(update={"bf16": gpu.bf16 or bf16,
                                 "channels_last": gpu.channels_last or channels_last})
    cfg = cfg.model_copy(update={"gpu_options": gpu})
    rt = Runtime.create(device, cfg.workers, gpu.bf16, gpu.channels_last,
                        config_hash(cfg), gpu.compile)
    run_dir = run.dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "config.json", {"config_hash": rt.config_hash, **cfg.as_dict()})
    return cfg, run_dir, rt


def train_run(key: str, device: str | None = None, bf16: bool = False,
              channels_last: bool = False) -> Path:
    return _train(*_setup(key, device, bf16, channels_last))


def _train(cfg: RunConfig, run_dir: Path, rt: Runtime) -> Path:
    key = cfg.run
    done = load_checkpoint(run_dir / "model.pt")
    if done is not None and done.get("config_hash") == rt.config_hash:
        print(f"[train] {key}: already trained ({run_dir / 'model.pt'})")
        return run_dir
    dataset = CachedDataset(cache_dir(cfg.dataset, cfg.image_size), "train",
                            cfg.categories)
    model = build_model(cfg)
    features = FeatureCache(cfg, len(dataset)) if feature_key(cfg) is not None else None
    evaluator = None
    if any(evaluation_due(cfg, e) for e in range(1, cfg.epochs)):
        test = CachedDataset(cache_dir(cfg.dataset, cfg.image_size), "test",
                             cfg.categories)
        evaluator = periodic_evaluator(test, cfg, rt)
    summary = train(model, dataset, cfg, run_dir, rt, evaluator, features)
    print(f"[train] {key}: done in {summary['train_wall_s']:.1f}s, final loss "
          f"{summary['final_loss']:.4f}")
    return run_dir


def evaluate_run(key: str, device: str | None = None, bf16: bool = False,
                 channels_last: bool = False, track: bool | None = None) -> dict[str, Any]:
    """Evaluate a trained run and write metrics.json; log it to MLflow when ``track`` (None:
    when its protocol's ``tracking`` is each_run; at_end leaves it to ``omniad track sync``)."""
    return _evaluate(*_setup(key, device, bf16, channels_last), track)


def _evaluate(cfg: RunConfig, run_dir: Path, rt: Runtime, track: bool | None) -> dict[str, Any]:
    key = cfg.run
    if track is None:
        track = load_params().protocol(cfg.protocol).tracking == "each_run"
    state = load_checkpoint(run_dir / "model.pt")
    if state is None:
        raise FileNotFoundError(f"{run_dir / 'model.pt'}: not trained yet; run `omniad train {key}`")
    if state.get("config_hash") != rt.config_hash:
        raise RuntimeError(f"{run_dir / 'model.pt'}: trained under another config; retrain")
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    dataset = CachedDataset(cache_dir(cfg.dataset, cfg.image_size), "test",
                            cfg.categories)
    seed_everything(cfg.seed)  # the released FFN draws random weights at test time too
    result = evaluate(model, dataset, cfg, rt, samples_path=run_dir / "samples.npz")
    train_info = _read_json(run_dir / "train.json")
    # every frozen backbone (an encoder, RD4AD's teacher, SimpleNet's trunk): its weights' tag
    weights = sorted({m.pretrained for m in model.modules() if isinstance(m, FrozenBackbone)})
    meta = {
        "git": git_state(), "config": cfg.as_dict(), "config_hash": rt.config_hash, "seed": cfg.seed,
        "evaluate_code": evaluate_code(cfg.builder),
        "packages": package_versions(), "runtime": rt.describe(),
        "encoder_weights": "+".join(weights) if weights else None,
        "train_wall_s": train_info.get("train_wall_s"),
        "train_images_per_s": train_info.get("train_images_per_s"),
        "feature_cache": train_info.get("features"),  # the cache training read, if any
        "eval_wall_s": result["eval_wall_s"], "test_images_per_s": result["test_images_per_s"],
        "test_images": result["test_images"],
        "peak_mem_mb": max(train_info.get("peak_mem_mb") or 0, rt.peak_memory_mb()),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    # the periodic evaluations of training plus this, the final one (it counts, as released)
    history = _read_json(run_dir / "history.json")
    evaluations = [*history.get("evaluations", []), evaluation_record(cfg.epochs, result)]
    out = {"run": key, "protocol": cfg.protocol, "dataset": cfg.dataset,
           "method": cfg.method, "variant": cfg.variant, "seed": cfg.seed,
           "mean": result["mean"], "per_category": result["per_category"],
           "evaluations": evaluations, "released_max": released_max(evaluations), "meta": meta}
    write_json_atomic(run_dir / "metrics.json", out)
    m = result["mean"]
    print(f"[eval] {key}: mAD {100 * m['mad']:.1f}  image AUROC {100 * m['image_auroc']:.1f}  "
          f"pixel AUROC {100 * m['pixel_auroc']:.1f}  AU-PRO {100 * m['pixel_aupro']:.1f}")
    if track:
        from omniad.tracking import log_run_safely

        log_run_safely(run_dir)
    return out


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def cli_train(args: argparse.Namespace) -> int:
    """``omniad train RUN [--evaluate]``. With --evaluate, the final model is evaluated from
    model.pt as a separate ``omniad evaluate`` would (fresh model, same seed), saving a second
    process start-up (torch, timm: ~4 s a run on a laptop)."""
    setup = _setup(args.run, args.device, args.bf16, args.channels_last)
    _train(*setup)
    if getattr(args, "evaluate", False):
        _evaluate(*setup, track=None)
    return 0


def cli_features(args: argparse.Namespace) -> int:
    """Build the feature cache a run reads (shared by every run with its feature key)."""
    cfg = resolve_run(load_params(), parse_run_key(args.run))
    if feature_key(cfg) is None:
        print(f"[features] {args.run}: reads images (feature cache off or not cacheable)")
        return 0
    build_features(cfg, args.device)
    return 0


def cli_evaluate(args: argparse.Namespace) -> int:
    evaluate_run(args.run, args.device, args.bf16, args.channels_last,
                 track=False if args.no_track else None)
    return 0
