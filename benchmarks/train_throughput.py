"""Training images/s: the released-style loop against ours, per method, in one run.

released: the frozen encoder runs at every step, fp32, eager (the official code and ADer).
ours:     the encoder's features come from a memory-mapped feature cache (what
          omniad/engine/features.py writes; read per batch here as in training); on CUDA also
          bf16 autocast + torch.compile (the protocol's GPU options).

The configurations are built and warmed up one after the other, and their timed steps
interleave, so a busy machine slows them alike. Peak memory: on CUDA each configuration's
allocations above those before it was built; on CPU the peak RSS of a fresh process that builds
it and runs its warm-up steps. Both train the method's own optimization step (loss, backward,
gradient clip, AdamW step) on the same batches with the released hyper-parameters; the
encoder is random (no weights offline; throughput does not depend on the weights' values).
It also measures the effect of a float16 feature cache on the loss (same weights, same
batch, same RNG: relative difference).

    OMP_NUM_THREADS=1 python benchmarks/train_throughput.py              # CPU, 64 px, minutes
    python benchmarks/train_throughput.py --device cuda --json out.json  # 256 px, batch 16

The JSON (--json) is what `omniad grid cost --throughput FILE` reads.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omniad.engine import optim as optim_builders
from omniad.engine.checkpoint import seed_everything
from omniad.engine.runtime import Runtime
from omniad.grid import load_params
from omniad.methods import method_class
from omniad.models.encoder import FrozenBackbone

#: MVTec-AD training images and the released configs' epochs: the projected run.
MVTEC_TRAIN, RELEASED_EPOCHS = 3629, 1000


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        try:  # resets VmHWM (Linux), so each configuration's peak RSS is its own
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(method: str, size: int, device: torch.device) -> tuple[Any, dict[str, Any]]:
    spec = load_params().methods[method]
    model_cfg = {**spec.model, "pretrained": False}  # the released model, at `size` px
    fields = method_class(method).config_class.model_fields
    if "image_size" in fields:
        model_cfg["image_size"] = size
    if "grid" in fields:  # MambaAD's scan grid: input size / 32
        model_cfg["grid"] = size // 32
    seed_everything(42)
    model = method_class(method)(**model_cfg).to(device)
    return model, spec.optim.scaled(spec.batch_size).to_dict()


def write_feature_cache(model: Any, pool: torch.Tensor, folder: Path, dtype: Any) -> list[np.ndarray]:
    """The pool's features as .npy memmaps (one per scale), as the features rule writes them."""
    bb: FrozenBackbone = getattr(model, model.cached_backbone)
    arrays = []
    with torch.no_grad():
        feats = [torch.cat(parts) for parts in zip(*(bb(x) for x in pool.split(16)),
                                                   strict=True)]
    for s, f in enumerate(feats):
        path = folder / f"scale{s}-{np.dtype(dtype).name}.npy"
        a = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(f.shape))
        a[:] = f.float().cpu().numpy().astype(dtype)
        a.flush()
        arrays.append(np.load(path, mmap_mode="r"))
    return arrays


class Loop:
    """One configuration's training loop, stepped from outside so that the configurations'
    timed steps interleave (same machine load for each: this machine is shared)."""

    def __init__(self, method: str, size: int, rt: Runtime, batches: list[Any], cached: bool,
                 pool: torch.Tensor, folder: Path) -> None:
        base = _current_mib(rt.device)
        _reset_peak(rt.device)
        self.model, optim_cfg = build(method, size, rt.device)
        self.rt, self.size, self.cached = rt, size, cached
        if cached:
            arrays = write_feature_cache(self.model, pool.to(rt.device), folder, np.float32)
            batches = [(arrays, idx) for idx in batches]
        else:
            batches = [pool[idx] for idx in batches]
        self.batches = batches
        self.opts, self.scheds = self.model.configure_optimizers(optim_cfg, 10_000, optim_builders)
        self.clip = optim_cfg.get("clip_grad")
        self.bb = getattr(self.model, self.model.cached_backbone)
        self.model.train()
        rt.compile_modules(self.model)
        self.losses: list[float] = []
        self.seconds, self.images, self.base = 0.0, 0, base

    def step(self, i: int, timed: bool) -> None:
        rt, batch = self.rt, self.batches[i]
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.manual_seed(1000 + i)  # jitter / released FFN draws: same in every config
        if self.cached:  # read the batch's rows from the memmaps, as FeatureDataset does
            arrays, idx = batch
            feats = [torch.from_numpy(a[idx].astype(np.float32)).to(rt.device, non_blocking=True)
                     for a in arrays]
            images = torch.empty((len(idx), 3, self.size, self.size), device="meta")
            with self.bb.feed(feats):
                terms = self.model.optimization_step(images, i, self.opts, self.clip,
                                                     rt.autocast)
        else:
            terms = self.model.optimization_step(batch.to(rt.device, non_blocking=True), i,
                                                 self.opts, self.clip, rt.autocast)
        for s in self.scheds:
            s.step()
        loss = terms["loss"]
        self.losses.append(float(loss.detach()))  # syncs, as the engine's loop does
        if timed:
            self.seconds += time.perf_counter() - t0
            self.images += len(batch[1]) if self.cached else batch.shape[0]

    def peak_mib(self) -> float:
        """Peak memory of this configuration (model, optimizer, steps) above the start;
        read right after its warm-up steps, before the next configuration is built."""
        return _peak_mib(self.rt.device) - self.base


def _current_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def encoder_share(method: str, size: int, device: torch.device, pool: torch.Tensor,
                  batches: list[list[int]], released_ips: float) -> float:
    """Seconds of the frozen encoder's forward per image / seconds of a released step per
    image: what a feature cache can save at most (robust on a busy machine, unlike the ratio
    of two short loops)."""
    model, _ = build(method, size, device)
    bb = getattr(model, model.cached_backbone)
    t0, n = time.perf_counter(), 0
    for idx in batches:
        bb(pool[idx].to(device))
        n += len(idx)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * released_ips


def _compare(r: dict[str, Any], ref: dict[str, Any]) -> str:
    if r["losses"] == ref["losses"]:
        return "bit-identical"
    diff = max(abs(x - y) / abs(y) for x, y in zip(r["losses"], ref["losses"], strict=True))
    return f"max rel diff {diff:.1e}"


def fp16_loss_effect(method: str, size: int, device: torch.device, pool: torch.Tensor,
                     folder: Path) -> float:
    """|loss(fp16 cache) - loss(fp32 cache)| / loss(fp32), same weights, batch and RNG."""
    out = []
    for dtype in (np.float32, np.float16):
        model, _ = build(method, size, device)
        model.train()
        arrays = write_feature_cache(model, pool, folder, dtype)
        bb = getattr(model, model.cached_backbone)
        idx = list(range(min(16, pool.shape[0])))
        feats = [torch.from_numpy(a[idx].astype(np.float32)).to(device) for a in arrays]
        torch.manual_seed(7)
        with bb.feed(feats), torch.no_grad():
            out.append(float(model.training_step(
                torch.empty((len(idx), 3, size, size), device="meta"), 0)["loss"]))
    return abs(out[1] - out[0]) / abs(out[0])


def _data(size: int, batch: int, n: int) -> tuple[torch.Tensor, list[list[int]]]:
    """The image pool and the n batches of indices (same in every process)."""
    gen = torch.Generator().manual_seed(0)
    pool = torch.randn(n * batch, 3, size, size, generator=gen)
    order = torch.randperm(pool.shape[0], generator=gen).tolist()
    return pool, [sorted(order[i * batch:(i + 1) * batch]) for i in range(n)]


def _cpu_peak(method: str, size: int, batch: int, warmup: int, cached: bool) -> float:
    """One CPU configuration's peak RSS above the start of a fresh process (build + warm-up
    steps): in one process the second configuration would reuse the first one's freed heap."""
    torch.set_num_threads(1)
    pool, batches = _data(size, batch, max(warmup, 1))
    with tempfile.TemporaryDirectory() as tmp:
        loop = Loop(method, size, Runtime(torch.device("cpu"), 0), batches, cached, pool,
                    Path(tmp))
        for i in range(max(warmup, 1)):
            loop.step(i, timed=False)
        return loop.peak_mib()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--size", type=int, default=None, help="px (default 256 cuda, 64 cpu)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 30 cuda, 3 cpu)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5 cuda, 1 cpu)")
    ap.add_argument("--methods", nargs="+", default=["omniad", "mambaad"])
    ap.add_argument("--json", type=Path, default=None, help="write the numbers here")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    size = a.size or (256 if cuda else 64)
    steps = a.steps or (30 if cuda else 3)
    warmup = a.warmup if a.warmup is not None else (5 if cuda else 1)
    if not cuda:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    n = steps + warmup
    pool, idx_batches = _data(size, a.batch, n)
    configs = [("released", dict(), False), ("ours: feature cache", dict(), True)]
    if cuda:
        configs.append(("ours: cache + bf16 + compile",
                        dict(bf16=True, compile="inductor"), True))
    result: dict[str, Any] = {"device": a.device, "size": size, "batch": a.batch,
                              "steps": steps, "warmup": warmup, "methods": {}}
    if cuda:
        result["gpu"] = torch.cuda.get_device_name(device)
    print(f"[throughput] {a.device}, {size} px, batch {a.batch}, {steps} timed steps after "
          f"{warmup} warm-up")
    with tempfile.TemporaryDirectory() as tmp:
        for method in a.methods:
            loops, peaks = {}, {}
            for name, opts, cached in configs:  # built and warmed up one after the other
                loops[name] = Loop(method, size, Runtime(device, 0, **opts), idx_batches,
                                   cached, pool, Path(tmp))
                for i in range(warmup):
                    loops[name].step(i, timed=False)
                peaks[name] = loops[name].peak_mib()
                if not cuda:  # RSS is no per-configuration measure in one process
                    ctx = multiprocessing.get_context("spawn")
                    with ctx.Pool(1) as proc:
                        peaks[name] = proc.apply(_cpu_peak, (method, size, a.batch, warmup,
                                                             cached))
            for i in range(warmup, n):  # timed steps, interleaved
                for loop in loops.values():
                    loop.step(i, timed=True)
            rows = {name: {"images_per_s": lp.images / lp.seconds, "peak_mib": peaks[name],
                           "losses": lp.losses} for name, lp in loops.items()}
            del loops
            base = rows["released"]["images_per_s"]
            for name, r in rows.items():
                same = "" if name == "released" else f"  loss: {_compare(r, rows['released'])}"
                hours = MVTEC_TRAIN * RELEASED_EPOCHS / r["images_per_s"] / 3600
                print(f"[throughput] {method:8s} {name:30s} {r['images_per_s']:8.2f} img/s  "
                      f"x{r['images_per_s'] / base:5.2f}  peak {r['peak_mib']:8.0f} MiB  "
                      f"1000-epoch MVTec-AD run: {hours:8.1f} h{same}", flush=True)
            eff = fp16_loss_effect(method, size, device, pool[:16].to(device), Path(tmp))
            print(f"[throughput] {method:8s} float16 feature cache: loss rel diff {eff:.1e} "
                  "(one step, same weights, batch and RNG)")
            ours = configs[-1][0]  # the full "ours" of this device
            share = encoder_share(method, size, device, pool, idx_batches[warmup:],
                                  rows["released"]["images_per_s"])
            result["methods"][method] = {
                **{k: {"images_per_s": round(v["images_per_s"], 3),
                       "peak_mib": round(v["peak_mib"], 1)} for k, v in rows.items()},
                "ratio": round(rows[ours]["images_per_s"] / rows["released"]["images_per_s"], 3),
                "encoder_share": round(share, 4),
                "fp16_cache_loss_rel_diff": eff,
                "ours_images_per_s": round(rows[ours]["images_per_s"], 3),
            }
            print(f"[throughput] {method:8s} the encoder's forward is {100 * share:.1f}% of a "
                  f"released step: the cache alone can give at most {1 / (1 - share):.2f}x")
            print(f"[throughput] {method:8s} ours / released: "
                  f"{result['methods'][method]['ratio']:.2f}x")
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"[throughput] wrote {a.json}")


if __name__ == "__main__":
    main()
