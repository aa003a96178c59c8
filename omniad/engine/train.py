"""The training loop: deterministic order, atomic checkpoints, resume after preemption.

A run's folder holds ``checkpoint.pt`` (latest state; written every K epochs and on SIGTERM or
SIGUSR1), ``history.json`` (per-epoch loss and the periodic evaluations) and, once done,
``model.pt`` + ``train.json``.
Batch order is a pure function of (seed, epoch), and every RNG state is checkpointed, so a
resumed run ends with the same weights, bit for bit, as one never interrupted.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from omniad.atomic import write_json_atomic
from omniad.engine import PREEMPTED_EXIT
from omniad.engine import optim as optim_builders
from omniad.engine.checkpoint import (
    atomic_torch_save,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from omniad.engine.features import FeatureCache, calibration_indices, step_inputs
from omniad.engine.progress import Progress
from omniad.engine.runtime import Runtime
from omniad.models.base import ADMethod
from omniad.models.encoder import FrozenBackbone, calibrate_random_backbones
from omniad.run_config import RunConfig


class StopFlag:
    """Set by SIGTERM / SIGUSR1; the loop checkpoints at the next iteration boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def epoch_batches(n: int, batch: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled batches of one epoch (drop_last), a pure function of (seed, epoch)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=gen).tolist()
    return [perm[i * batch:(i + 1) * batch] for i in range(n // batch)]


#: At most this many training images (evenly spaced, so every category) calibrate a random
#: encoder: one batch, so memory grows with it.
CALIBRATION_IMAGES = 256


def calibrate(model: ADMethod, dataset: Dataset, cfg: RunConfig, rt: Runtime,
              skip: tuple[FrozenBackbone, ...] = ()) -> None:
    """Random encoders' BatchNorm statistics from training images (a pure function of the
    data); saved with the weights, hence also used on resume and at test time. ``skip``: a
    backbone whose calibrated state comes from the feature cache (computed the same way)."""
    if not any(isinstance(m, FrozenBackbone) and m.pretrained == "random"
               and not any(m is k for k in skip) for m in model.modules()):
        return
    idx = calibration_indices(len(dataset), CALIBRATION_IMAGES)
    images = torch.stack([dataset[i]["image"] for i in idx]).to(rt.device)
    count = calibrate_random_backbones(model, images, skip=skip)
    print(f"[train] {cfg.run}: BatchNorm statistics of {count} random encoder(s) estimated "
          f"from {len(idx)} training images", flush=True)


def evaluation_due(cfg: RunConfig, epoch: int) -> bool:
    """A periodic evaluation after this (1-based) epoch? Every ``evaluate_every`` epochs, except
    the last: the final model is evaluated by ``omniad evaluate``, and that evaluation counts as
    one of them (the released trainers test at multiples of 20 and at the last epoch)."""
    every = cfg.evaluate_every
    return every > 0 and epoch % every == 0 and epoch < cfg.epochs


#: (model, epoch) -> one evaluation record; see omniad.engine.evaluate.periodic_evaluator.
Evaluator = Callable[[ADMethod, int], dict[str, Any]]


def train(model: ADMethod, dataset: Dataset, cfg: RunConfig, run_dir: Path,
          rt: Runtime, evaluator: Evaluator | None = None,
          features: FeatureCache | None = None) -> dict[str, Any]:
    """Train (or resume) one run; returns the training summary written to train.json.

    ``evaluator``, when given, runs after every epoch :func:`evaluation_due` names; its records
    go to history.json and the checkpoint (so a resumed run neither loses nor repeats one).
    With ``features``, batches carry the cached encoder features instead of images.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "checkpoint.pt"
    batch, epochs, seed = cfg.batch_size, cfg.epochs, cfg.seed
    n = len(dataset)
    steps_per_epoch = n // batch
    if steps_per_epoch == 0:
        raise ValueError(f"{cfg.run}: {n} training images < batch size {batch} (drop_last)")
    total = epochs * steps_per_epoch
    model.to(rt.device)
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)
    # methods read their yaml's keys (a dict); build_optimizer validates them again
    optimizers, schedulers = model.configure_optimizers(cfg.optim.to_dict(), total, optim_builders)
    clip = cfg.optim.clip_grad
    evaluations: list[dict[str, Any]] = []

    state = load_checkpoint(ckpt_path)
    cached_bb = None if features is None else features.backbone(model)
    start_epoch, start_iter, history, elapsed = 0, 0, [], 0.0
    started_at = time.time()  # wall-clock start of the training (kept across resumes)
    if state is not None:
        if state["config_hash"] != rt.config_hash:
            raise RuntimeError(f"{ckpt_path}: written for another config "
                               f"({state['config_hash']} != {rt.config_hash}); delete it")
        model.load_state_dict(state["model"])
        for o, s in zip(optimizers, state["optimizers"], strict=True):
            o.load_state_dict(s)
        for s, st in zip(schedulers, state["schedulers"], strict=True):
            s.load_state_dict(st)
        set_rng_state(state["rng"])
        start_epoch, start_iter = state["epoch"], state["iter"]
        history, elapsed = state["history"], state["elapsed_s"]
        if features is not None:
            features.attach(model, fresh=False)
        started_at = state.get("started_at", started_at)
        evaluations = list(state.get("evaluations", []))
        print(f"[train] {cfg.run}: resuming at epoch {start_epoch} iteration {start_iter}",
              flush=True)
    else:
        if features is not None:
            features.attach(model, fresh=True)
        if cfg.encoder_bn == "train":
            calibrate(model, dataset, cfg, rt, skip=(cached_bb,) if cached_bb else ())
    source = dataset if features is None else features.dataset
    rt.compile_modules(model)

    def write_history() -> None:
        write_json_atomic(run_dir / "history.json",
                          {"run": cfg.run, "epochs": history, "evaluations": evaluations})

    def save(epoch: int, it: int, epoch_losses: list[float]) -> None:
        atomic_torch_save({
            "started_at": started_at,
            "model": model.state_dict(),
            "optimizers": [o.state_dict() for o in optimizers],
            "schedulers": [s.state_dict() for s in schedulers],
            "rng": rng_state(), "epoch": epoch, "iter": it, "history": history,
            "epoch_losses": epoch_losses, "elapsed_s": elapsed + (time.perf_counter() - t0),
            "config_hash": rt.config_hash, "evaluations": evaluations,
        }, ckpt_path)
        write_history()

    progress = Progress(f"train {cfg.run}", total, start=start_epoch * steps_per_epoch + start_iter)
    model.train()
    t0 = time.perf_counter()
    images_seen, eval_s = 0, 0.0  # periodic evaluations: not training throughput
    epoch_losses: list[float] = list(state["epoch_losses"]) if state and start_iter else []
    with StopFlag() as stop:
        for epoch in range(start_epoch, epochs):
            batches = epoch_batches(n, batch, seed, epoch)
            first = start_iter if epoch == start_epoch else 0
            loader = DataLoader(source, batch_sampler=batches[first:], num_workers=rt.workers,
                                pin_memory=rt.device.type == "cuda",
                                generator=torch.Generator(), persistent_workers=False)
            for it, item in enumerate(loader, start=first):
                step = epoch * steps_per_epoch + it
                with step_inputs(item, cached_bb, rt, cfg.image_size) as images:
                    terms = model.optimization_step(images, step, optimizers, clip, rt.autocast)
                for s in schedulers:
                    s.step()
                value = float(terms["loss"].detach())
                if value != value:
                    raise FloatingPointError(f"{cfg.run}: loss is NaN at step {step}")
                epoch_losses.append(value)
                images_seen += images.shape[0]
                progress.update(step + 1, f"epoch {epoch + 1}/{epochs} loss {value:.4f}")
                if stop.signum is not None:
                    save(epoch, it + 1, epoch_losses)
                    print(f"[train] {cfg.run}: signal {stop.signum}, checkpointed at epoch "
                          f"{epoch} iteration {it + 1}; exit {PREEMPTED_EXIT} to be requeued",
                          flush=True)
                    sys.exit(PREEMPTED_EXIT)
            history.append({"epoch": epoch + 1, "loss": sum(epoch_losses) / len(epoch_losses),
                            "lr": optimizers[0].param_groups[-1]["lr"]})
            epoch_losses = []
            if evaluator is not None and evaluation_due(cfg, epoch + 1):
                t_eval = time.perf_counter()
                evaluations.append(evaluator(model, epoch + 1))
                eval_s += time.perf_counter() - t_eval
                model.train()
                if stop.signum is not None:  # a signal during the evaluation: keep it, go
                    save(epoch + 1, 0, [])
                    sys.exit(PREEMPTED_EXIT)
            if (epoch + 1) % cfg.checkpoint_every == 0 and epoch + 1 < epochs:
                save(epoch + 1, 0, [])
    progress.close()
    wall = elapsed + time.perf_counter() - t0
    atomic_torch_save({"model": model.state_dict(), "config_hash": rt.config_hash},
                      run_dir / "model.pt")
    write_history()
    summary = {"train_wall_s": round(wall, 3), "train_steps": total,
               "train_images_per_s": round(images_seen / max(time.perf_counter() - t0 - eval_s,
                                                             1e-9), 2),
               "periodic_eval_wall_s": round(sum(e.get("eval_wall_s", 0) for e in evaluations), 3),
               "final_loss": history[-1]["loss"] if history else None,
               "peak_mem_mb": rt.peak_memory_mb(),
               "features": None if features is None else features.folder.name,
               # unix seconds: the MLflow run's start and end (omniad/tracking.py)
               "started_at": round(started_at, 3), "finished_at": round(time.time(), 3)}
    write_json_atomic(run_dir / "train.json", summary)
    ckpt_path.unlink(missing_ok=True)
    return summary

