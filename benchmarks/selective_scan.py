"""Speed of MambaAD's chunked selective scan against the sequential reference, same run.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/selective_scan.py [--device cuda] [--backward]``.
Shapes are SS2D's: batch x 8 directions folded into d (d = 8 * d_inner, grouped B/C per
direction), state 16. Prints per shape the median wall time of each, the speed-up, and the max
abs difference of the outputs (and of the input gradients with --backward).
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch

from omniad.models.layers.selective_scan import selective_scan_fast, selective_scan_ref

SHAPES = [(64, 64), (256, 64), (1024, 64), (4096, 64), (64, 128), (256, 128), (1024, 128),
          (4096, 128)]


def _inputs(batch: int, d: int, length: int, n: int, groups: int, device: str, grad: bool):
    g = torch.Generator().manual_seed(length * 1000 + d)
    t = [torch.randn(batch, d, length, generator=g),  # u
         torch.randn(batch, d, length, generator=g) * 0.5,  # delta (pre-softplus)
         -torch.exp(torch.log(torch.arange(1, n + 1.0)).repeat(d, 1)),  # A as at init
         torch.randn(batch, groups, n, length, generator=g),
         torch.randn(batch, groups, n, length, generator=g),
         torch.ones(d), torch.randn(d, generator=g) * 0.5 - 4.0]  # D, delta_bias
    return [x.to(device).requires_grad_(grad) for x in t]


def _call(fn, x: list[torch.Tensor], kw: dict, backward: bool, **extra) -> torch.Tensor:  # noqa: ANN001
    """Outputs (and, with backward, the input gradients of sum(y)) flattened into one tensor."""
    y = fn(*x[:5], **kw, **extra)
    if not backward:
        return y.detach()
    grads = torch.autograd.grad(y.sum(), x[:5])
    return torch.cat([y.detach().flatten()] + [g.flatten() for g in grads])


def _time(fn, device: str, repeats: int) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--state", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=0, help="steps per chunk (0: about sqrt(L))")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backward", action="store_true", help="time forward + backward")
    ap.add_argument("--max-length", type=int, default=4096)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"batch {args.batch}, 8 directions, state {args.state}, chunk {args.chunk}, "
          f"{'forward+backward' if args.backward else 'forward'}")
    print(f"{'L':>5} {'d_inner':>7} {'ref ms':>10} {'fast ms':>9} {'speed-up':>8} {'max |diff|':>11}")
    for length, inner in SHAPES:
        if length > args.max_length:
            continue
        d = 8 * inner
        x = _inputs(args.batch, d, length, args.state, 8, args.device, args.backward)
        kw = {"D": x[5], "delta_bias": x[6], "delta_softplus": True}

        fast = partial(_call, selective_scan_fast, x, kw, args.backward, chunk=args.chunk)
        ref = partial(_call, selective_scan_ref, x, kw, args.backward)
        with torch.set_grad_enabled(args.backward):
            _time(fast, args.device, 1)  # warm-up (and compilation on CUDA)
            t_fast, y_fast = _time(fast, args.device, args.repeats)
            t_ref, y_ref = _time(ref, args.device, max(1, args.repeats // 2))
        diff = (y_fast - y_ref).abs().max().item()
        print(f"{length:>5} {inner:>7} {1e3 * t_ref:>10.1f} {1e3 * t_fast:>9.1f} "
              f"{t_ref / t_fast:>7.1f}x {diff:>11.2e}", flush=True)


if __name__ == "__main__":
    main()
