"""Exact metrics at Real-IAD scale: streaming per category keeps memory flat.

(a) One Real-IAD-sized category: 3,800 test maps of 256x256 streamed in batches of 32
    through omniad.metrics.CategoryAccumulator (the maps are made batch by batch and never all
    held), against holding every map, as ours in one array (float32, `evaluate_category`) and
    as the released code does (float64 maps and masks: ADer / Omni-AD append every batch and
    concatenate at the end; its memory is computed, not allocated).
(b) A whole Real-IAD-sized test set: 114,585 maps in 30 categories, streamed category by
    category at a reduced map size (default 64x64, 1/16 of the pixels: the accumulator's
    memory and time scale with pixels, so the 256 px figures are these x16, or (a)'s peak for
    memory, since one category's accumulator is all that is ever held). The peak resident
    memory after each category shows it does not grow with the number of images seen.

Synthetic maps: a pool of 128 maps per size from benchmarks/metrics.py's generator (smooth
noise, raised blobs where the random elliptic masks are, false-positive blobs; ~70% anomalous
images); each batch draws pool rows, rescales each map by U(0.8, 1.2) and adds fresh noise, so
no two maps repeat and making them costs little next to the metrics.

    OMP_NUM_THREADS=1 python benchmarks/eval_scale.py [--size 64] [--categories 30]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from metrics import _LIBC, _reset_hwm, _rss_kib, make_category  # noqa: E402

from omniad.metrics import METRIC_KEYS, CategoryAccumulator, evaluate_category  # noqa: E402

REAL_IAD_TEST, REAL_IAD_CATEGORIES, CATEGORY_MAPS = 114_585, 30, 3_800
BATCH = 32


def _peak_mib() -> float:
    return _rss_kib("VmHWM") / 1024


def _start() -> float:
    """RSS (MiB) after returning freed heap to the OS, with the peak reset to it."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    _reset_hwm()
    return _rss_kib() / 1024


_POOLS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def make_batch(b: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """b fresh maps (rescaled pool maps plus new noise) and their masks."""
    if size not in _POOLS:
        _POOLS[size] = make_category(128, size, seed=size)
    pool_maps, pool_masks = _POOLS[size]
    idx = rng.integers(0, len(pool_maps), b)
    maps = pool_maps[idx] * rng.uniform(0.8, 1.2, (b, 1, 1)).astype(np.float32)
    maps += rng.standard_normal(maps.shape, dtype=np.float32) * np.float32(0.02)
    return maps, pool_masks[idx]


def stream_category(n: int, size: int, seed: int) -> tuple[dict[str, float], float, float]:
    """(metrics, seconds in the accumulator, seconds making maps): maps made per batch."""
    acc = CategoryAccumulator()
    rng = np.random.default_rng(seed)
    t_acc = t_gen = 0.0
    for start in range(0, n, BATCH):
        t0 = time.perf_counter()
        maps, masks = make_batch(min(BATCH, n - start), size, rng)
        t1 = time.perf_counter()
        acc.update(maps, masks)
        t_acc += time.perf_counter() - t1
        t_gen += t1 - t0
    t0 = time.perf_counter()
    out = acc.compute()
    return out, t_acc + time.perf_counter() - t0, t_gen


def released_gib(n: int, size: int) -> float:
    """Maps and masks of every test image as float64 (released evaluation), GiB."""
    return n * size * size * 8 * 2 / 2**30


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--category-maps", type=int, default=CATEGORY_MAPS)
    ap.add_argument("--size", type=int, default=64, help="map side for the whole set (b)")
    ap.add_argument("--categories", type=int, default=REAL_IAD_CATEGORIES)
    ap.add_argument("--total", type=int, default=REAL_IAD_TEST)
    ap.add_argument("--skip-array", action="store_true", help="(a) without the all-in-RAM run")
    ap.add_argument("--only-set", action="store_true", help="(b) only")
    a = ap.parse_args(argv)

    # (a) one category at 256 px
    n = a.category_maps
    make_batch(1, 256, np.random.default_rng(0))  # the pools are not part of any peak
    make_batch(1, a.size, np.random.default_rng(0))
    if not a.only_set:
        stream_peak = category(a, n)
    else:
        stream_peak = float("nan")
    whole_set(a, stream_peak)


def category(a: argparse.Namespace, n: int) -> float:
    """(a): one category at 256 px, streamed and held; returns the streaming peak (MiB)."""
    base = _start()
    out, t_acc, t_gen = stream_category(n, 256, 0)
    stream_peak = _peak_mib() - base
    print(f"(a) one category, {n} maps of 256x256 ({n * 65536 / 1e6:.0f}M pixels)")
    print(f"    streaming (batches of {BATCH}): {t_acc:6.1f} s in the metrics "
          f"(+{t_gen:.1f} s making maps), peak {stream_peak:7.0f} MiB above start")
    array_peak = None
    if not a.skip_array:
        rng = np.random.default_rng(0)  # the streamed maps, batch by batch, all held
        parts = [make_batch(min(BATCH, n - i), 256, rng) for i in range(0, n, BATCH)]
        maps = np.concatenate([m for m, _ in parts])
        masks = np.concatenate([k for _, k in parts])
        del parts
        held = (maps.nbytes + masks.nbytes) / 2**20
        base2 = _start()
        t0 = time.perf_counter()
        ref = evaluate_category(maps, masks)
        t_arr = time.perf_counter() - t0
        array_peak = _peak_mib() - base2 + held
        del maps, masks
        print(f"    all maps in one float32 array:  {t_arr:6.1f} s, peak {array_peak:7.0f} MiB "
              f"(incl. {held:.0f} MiB of maps and masks)")
        same = max(abs(ref[k] - out[k]) for k in METRIC_KEYS)  # same rng: the same maps
        print(f"    max |array - streaming| over the 7 metrics: {same:.1e}")
    rel = released_gib(n, 256) * 1024
    print(f"    released (float64 maps + masks held): {rel:7.0f} MiB computed = "
          f"{n} x 256 x 256 x 8 B x 2; streaming / released = {stream_peak / rel:.3f}")
    print("    mAD {:.1f}, pixel AU-ROC {:.1f}, AU-PRO {:.1f}".format(
        100 * out["mad"], 100 * out["pixel_auroc"], 100 * out["pixel_aupro"]))
    return stream_peak


def whole_set(a: argparse.Namespace, stream_peak: float) -> None:
    """(b): every category of a Real-IAD-sized test set, streamed at reduced size."""
    per_cat = [a.total // a.categories + (i < a.total % a.categories) for i in range(a.categories)]
    scale = (256 / a.size) ** 2
    print(f"\n(b) whole test set: {sum(per_cat)} maps in {a.categories} categories at "
          f"{a.size}x{a.size} (x{scale:.0f} pixels at 256 px)")
    base = _start()
    peaks, t_total, t_gen_total = [], 0.0, 0.0
    t_wall = time.perf_counter()
    for c, m in enumerate(per_cat):
        _, t_acc, t_gen = stream_category(m, a.size, 100 + c)
        t_total += t_acc
        t_gen_total += t_gen
        peaks.append(_peak_mib() - base)
        if c in (0, 1, a.categories // 2, a.categories - 1):
            print(f"    after category {c + 1:2d} ({sum(per_cat[:c + 1]):6d} maps): peak "
                  f"{peaks[-1]:6.0f} MiB above start", flush=True)
    wall = time.perf_counter() - t_wall
    growth = peaks[-1] - peaks[0]
    print(f"    metrics {t_total:.1f} s (+{t_gen_total:.1f} s making maps; wall {wall:.1f} s); "
          f"peak after the first category {peaks[0]:.0f} MiB, after all {peaks[-1]:.0f} MiB "
          f"(growth {growth:+.0f} MiB over {a.categories - 1} more categories)")
    full = released_gib(sum(per_cat), 256)
    print(f"    at 256 px: metrics ~{t_total * scale / 60:.0f} min (x{scale:.0f} pixels); "
          f"peak = one category's accumulator, ~{stream_peak:.0f} MiB as in (a)")
    print(f"    released at 256 px: {full:.0f} GiB computed ({sum(per_cat)} x 256 x 256 x 8 B "
          f"x 2); ours / released = {stream_peak / 1024 / full:.4f}")


if __name__ == "__main__":
    main()
