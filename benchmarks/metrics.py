"""Benchmark omniad.metrics against the released-code approach and a plain sort-everything path.

Builds a synthetic category the size of MVTec-AD's whole test set (1,725 maps of 256x256 by
default): smooth maps (Gaussian-filtered noise) with raised blobs where the masks are (a few
random ellipses on ~70% of the images) plus some unmasked false-positive blobs, then times:

  (a) ours: ``evaluate_category`` and ``CategoryAccumulator`` fed in batches of 32;
  (b) baseline: the released Omni-AD/ADer way, re-implemented here: sklearn roc_auc_score /
      average_precision_score / precision_recall_curve on flattened float64 arrays, and AU-PRO
      from 100 thresholds evenly spaced between the maps' min and max, re-labelling the regions
      (skimage.measure.label + regionprops) at every threshold, FPR min-max rescaled before
      integrating up to 0.3 (a slightly different number by construction);
  (c) sort-all: exact, argsort of every pixel in float64 and cumulative sums.

Peak memory is the peak resident set size (Linux VmHWM, reset through /proc/self/clear_refs
before each path, falling back to a 1 ms RSS-sampling thread) minus the RSS when the path starts,
i.e. what the path allocates on top of the maps (float32) and masks (bool) already in memory.

    python benchmarks/metrics.py [--n 1725] [--size 256] [--quick] [--baseline-n N]
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omniad.metrics import (  # noqa: E402
    METRIC_KEYS,
    CategoryAccumulator,
    evaluate_category,
)

MAX_FPR = 0.3


# --------------------------------------------------------------------------- synthetic data
def _ellipse(size: int, rng: np.random.Generator) -> np.ndarray:
    """One random filled, rotated ellipse mask."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = rng.uniform(0.1, 0.9, 2) * size
    a, b = rng.uniform(0.01, 0.12, 2) * size
    t = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(t) + dy * np.sin(t)
    v = -dx * np.sin(t) + dy * np.cos(t)
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def make_category(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Realistic-looking float32 maps (n, size, size) and bool masks for one category."""
    rng = np.random.default_rng(seed)
    low = max(4, size // 8)
    maps = np.empty((n, size, size), dtype=np.float32)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(0, n, 64):
        b = min(64, n - i)
        noise = rng.standard_normal((b, low, low)).astype(np.float32)
        noise = ndimage.gaussian_filter(noise, sigma=(0, 1.0, 1.0))
        base = ndimage.zoom(noise, (1, size / low, size / low), order=1)
        maps[i : i + b] = 0.15 * base[:, :size, :size] + 0.3
    for i in range(n):
        blob = np.zeros((size, size), dtype=bool)
        if rng.random() < 0.7:
            for _ in range(rng.integers(1, 4)):
                masks[i] |= _ellipse(size, rng)
            blob |= masks[i]
        fake = rng.random() < 0.25
        if fake:  # an unmasked false-positive blob
            blob = blob | _ellipse(size, rng)
        if blob.any():
            raised = ndimage.gaussian_filter(blob.astype(np.float32), sigma=4.0)
            maps[i] += rng.uniform(0.1, 1.2) * raised
    maps += rng.standard_normal(maps.shape, dtype=np.float32) * np.float32(0.01)
    return maps, masks


# --------------------------------------------------------------------------- memory probe
_LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def _rss_kib(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(fn: Callable[[], Any]) -> tuple[Any, float, float, str]:
    """(result, seconds, peak extra MiB, method) for one call of fn."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    start_rss = _rss_kib()
    peak = [start_rss]
    if _reset_hwm():
        method, stop, sampler = "VmHWM", None, None
    else:
        method, stop = "RSS sampled every 1 ms", threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], _rss_kib())
                time.sleep(0.001)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    if sampler is not None:
        stop.set()
        sampler.join()
        top = peak[0]
    else:
        top = _rss_kib("VmHWM")
    return result, seconds, (top - start_rss) / 1024.0, method


def numpy_peak_mib(fn: Callable[[], Any]) -> float:
    """Peak of traced allocations (numpy registers its buffers with tracemalloc) during fn()."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


# --------------------------------------------------------------------------- (a) ours
def ours_array(maps: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    return evaluate_category(maps, masks)


def ours_streaming(maps: np.ndarray, masks: np.ndarray, batch: int = 32) -> dict[str, float]:
    acc = CategoryAccumulator()
    for i in range(0, len(maps), batch):
        acc.update(maps[i : i + batch], masks[i : i + batch])
    return acc.compute()


# --------------------------------------------------------------------------- (b) baseline
def _f1max_sklearn(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import precision_recall_curve

    p, r, _ = precision_recall_curve(y, s)
    denom = p + r
    f1 = np.divide(2 * p * r, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(f1.max())


def baseline_metrics(maps: np.ndarray, masks: np.ndarray, steps: int = 100) -> dict[str, float]:
    """The released approach: sklearn on float64 arrays, thresholded AU-PRO with rescaled FPR."""
    from skimage import measure
    from sklearn.metrics import auc, average_precision_score, roc_auc_score

    n = len(maps)
    img_s = maps.reshape(n, -1).max(axis=1).astype(np.float64)
    img_y = masks.reshape(n, -1).any(axis=1)
    s = maps.astype(np.float64).ravel()
    y = masks.ravel().astype(np.int64)
    out = {
        "image_auroc": roc_auc_score(img_y, img_s),
        "image_ap": average_precision_score(img_y, img_s),
        "image_f1max": _f1max_sklearn(img_y, img_s),
        "pixel_auroc": roc_auc_score(y, s),
        "pixel_ap": average_precision_score(y, s),
        "pixel_f1max": _f1max_sklearn(y, s),
    }
    del s, y
    lo, hi = float(maps.min()), float(maps.max())
    normal = ~masks
    n_normal = int(normal.sum())
    fprs, pros = [], []
    for th in np.linspace(lo, hi, steps):
        binary = maps > th
        overlaps = []
        for b_map, mask in zip(binary, masks, strict=True):
            for region in measure.regionprops(measure.label(mask)):
                rows, cols = region.coords[:, 0], region.coords[:, 1]
                overlaps.append(b_map[rows, cols].sum() / region.area)
        fprs.append(np.logical_and(binary, normal).sum() / n_normal)
        pros.append(np.mean(overlaps))
        del binary
    fprs_a, pros_a = np.asarray(fprs), np.asarray(pros)
    keep = fprs_a < MAX_FPR
    f = fprs_a[keep]
    f = (f - f.min()) / (f.max() - f.min())
    out["pixel_aupro"] = auc(f, pros_a[keep])
    out = {k: float(v) for k, v in out.items()}
    out["mad"] = sum(out.values()) / 7
    return out


# --------------------------------------------------------------------------- (c) sort-all
def _sorted_curve_metrics(
    s: np.ndarray, y: np.ndarray, w: np.ndarray | None, n_regions: int
) -> tuple[float, ...]:
    """Exact metrics from one descending argsort of all scores (float64) and cumulative sums."""
    order = np.argsort(s)[::-1]
    ss = s[order]
    yy = y[order]
    ends = np.append(np.flatnonzero(ss[1:] != ss[:-1]), len(ss) - 1)  # last index per value
    tp = np.cumsum(yy, dtype=np.int64)[ends].astype(np.float64)
    fp = (ends + 1) - tp
    n_pos, n_neg = tp[-1], fp[-1]
    tpr = np.concatenate(([0.0], tp / n_pos))
    fpr = np.concatenate(([0.0], fp / n_neg))
    auroc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    precision = tp / (tp + fp)
    ap = float(np.sum(np.diff(tpr) * precision))
    f1max = float(np.max(2 * tp / (tp + fp + n_pos)))
    if w is None:
        return auroc, ap, f1max
    pro = np.concatenate(([0.0], np.cumsum(w[order])[ends] / n_regions))
    k = int(np.searchsorted(fpr, MAX_FPR, side="right"))
    area = np.sum(np.diff(fpr[:k]) * (pro[1:k] + pro[: k - 1]) / 2)
    x0, x1, y0, y1 = fpr[k - 1], fpr[k], pro[k - 1], pro[k]
    y_lim = y0 + (y1 - y0) * (MAX_FPR - x0) / (x1 - x0)
    area += (MAX_FPR - x0) * (y0 + y_lim) / 2
    return auroc, ap, f1max, float(area / MAX_FPR)


def sortall_metrics(maps: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    n = len(maps)
    img = _sorted_curve_metrics(
        maps.reshape(n, -1).max(axis=1).astype(np.float64), masks.reshape(n, -1).any(axis=1),
        None, 0,
    )
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    labels, n_regions = ndimage.label(masks, structure=structure)
    sizes = np.bincount(labels.ravel()).astype(np.float64)
    sizes[0] = np.inf
    w = (1.0 / sizes)[labels.ravel()]
    del labels
    pix = _sorted_curve_metrics(maps.astype(np.float64).ravel(), masks.ravel(), w, n_regions)
    values = [*img, *pix]
    values.append(sum(values) / 7)
    return dict(zip(METRIC_KEYS, values, strict=True))


# --------------------------------------------------------------------------- report
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1725, help="number of maps (MVTec-AD test: 1725)")
    ap.add_argument("--size", type=int, default=256, help="map side in pixels")
    ap.add_argument("--quick", action="store_true", help="smoke test: 200 maps")
    ap.add_argument("--baseline-n", type=int, default=None,
                    help="run the baseline on the first N maps only (ours re-run on the same N)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    n = 200 if args.quick else args.n

    t0 = time.perf_counter()
    maps, masks = make_category(n, args.size, args.seed)
    gen_s = time.perf_counter() - t0
    f64_mib = maps.size * 8 / 2**20
    print(f"synthetic category: {n} maps of {args.size}x{args.size} = {maps.size / 1e6:.1f}M "
          f"pixels, {masks.any(axis=(1, 2)).mean():.0%} anomalous images, "
          f"{masks.mean():.2%} anomalous pixels (built in {gen_s:.1f} s)")
    print(f"maps as float32: {maps.nbytes / 2**20:.0f} MiB, as float64: {f64_mib:.0f} MiB")

    rows: dict[str, tuple[dict[str, float], float, float]] = {}
    traced: dict[str, float] = {}
    method = ""
    paths = [
        ("ours evaluate_category", lambda: ours_array(maps, masks)),
        ("ours streaming (batches of 32)", lambda: ours_streaming(maps, masks)),
        ("sort-all exact (float64 argsort)", lambda: sortall_metrics(maps, masks)),
    ]
    for name, fn in paths:
        res, sec, mib, method = measure(fn)
        rows[name] = (res, sec, mib)
    for name, fn in paths:  # separate, untimed runs: tracemalloc slows Python code down
        traced[name] = numpy_peak_mib(fn)

    bn = n if args.baseline_n is None else min(n, args.baseline_n)
    sub = "" if bn == n else f" on first {bn} maps"
    bmaps, bmasks = (maps, masks) if bn == n else (maps[:bn], masks[:bn])
    res, sec, mib, _ = measure(lambda: baseline_metrics(bmaps, bmasks))
    rows[f"baseline released-style{sub}"] = (res, sec, mib)
    if bn != n:
        res, sec, mib, _ = measure(lambda: ours_array(bmaps, bmasks))
        rows[f"ours evaluate_category{sub}"] = (res, sec, mib)

    print("\npeak RSS = peak resident memory above the RSS at the start of the path "
          f"({method}; input maps and masks excluded)")
    print("numpy peak = tracemalloc peak of traced (numpy) allocations, separate untimed run")
    header = f"{'path':<44}{'time [s]':>10}{'peak RSS [MiB]':>16}{'numpy peak [MiB]':>18}"
    print(header)
    print("-" * len(header))
    for name, (_, sec, mib) in rows.items():
        tm = f"{traced[name]:.0f}" if name in traced else "-"
        print(f"{name:<44}{sec:>10.2f}{mib:>16.0f}{tm:>18}")

    print("\nmetric values (%)")
    names = list(rows)
    short = {
        names[0]: "ours", names[1]: "stream", names[2]: "sortall", names[3]: "baseline",
    }
    if len(names) > 4:
        short[names[4]] = "ours-sub"
    print(f"{'metric':<14}" + "".join(f"{short[k]:>14}" for k in names))
    for key in METRIC_KEYS:
        print(f"{key:<14}" + "".join(f"{100 * rows[k][0][key]:>14.6f}" for k in names))
    diff_sort = max(abs(rows[names[0]][0][k] - rows[names[2]][0][k]) for k in METRIC_KEYS)
    diff_stream = max(abs(rows[names[0]][0][k] - rows[names[1]][0][k]) for k in METRIC_KEYS)
    print(f"max |ours - sortall| = {diff_sort:.3e}, max |ours - streaming| = {diff_stream:.3e}")
    print("(baseline AU-PRO differs by construction: 100 thresholds, min-max rescaled FPR)")

    t_ours, m_ours = rows[names[0]][1], rows[names[0]][2]
    t_stream, m_stream = rows[names[1]][1], rows[names[1]][2]
    t_sort = rows[names[2]][1]
    t_base = rows[names[3]][1]
    t_ours_b = t_ours if bn == n else rows[names[4]][1]
    print("\nratios")
    print(f"baseline_time / ours_time            = {t_base / t_ours_b:8.1f}x  (target >= 50)"
          + (f" [both on the first {bn} maps]" if bn != n else ""))
    if bn == n:
        print(f"baseline_time / streaming_time       = {t_base / t_stream:8.1f}x")
    print(f"sortall_time / ours_time             = {t_sort / t_ours:8.1f}x  (target >= 1)")
    for label, name, rss in [("ours", names[0], m_ours), ("streaming", names[1], m_stream)]:
        print(f"{label + ' peak RSS / maps as float64':<37}= {rss / f64_mib:8.2f}   "
              f"({rss:.0f} / {f64_mib:.0f} MiB; numpy peak {traced[name]:.0f} MiB = "
              f"{traced[name] / f64_mib:.2f})")


if __name__ == "__main__":
    main()
