"""Exact, fast and memory-lean metrics for multi-class unsupervised anomaly detection.

Per category we report image and pixel AU-ROC, AP and F1-max, pixel AU-PRO (up to FPR 0.3) and
mAD, their mean. Everything is computed *exactly* from the scores, with no threshold grid: a
coarse grid between the maps' min and max (as in the released evaluation code, see
benchmarks/metrics.py) makes AU-PRO depend on the maps' range, not only on their ranks.

How it stays fast and small (a category such as MVTec-AD's whole test set has ~113M pixels):

* Every metric only changes at thresholds equal to an anomalous pixel's score: between two such
  thresholds only false positives are added (TPR, PRO and TP stay put, so ROC and PRO segments
  there are horizontal and F1/precision only get worse). So we need, per distinct anomalous score
  ``u``: its pixel count, its sum of region weights ``1/|region|``, and how many normal pixels
  score ``< u`` and ``<= u``. All metrics are then closed-form sums over these few arrays.
* Anomalous pixels (a few percent) are kept as one uint64 key each: order-preserving bits of the
  float32 score in the high half and the region size in the low half, so one plain sort groups
  equal scores and makes the float64 weight sums independent of batch order.
* Normal pixels (the bulk) are kept as 2 bytes each: the order-preserving uint32 key split into a
  high 16-bit bucket (stored once per bucket with a count) and the low 16 bits per pixel. At the
  end only buckets that contain an anomalous score are decoded and sorted, in chunks, to count
  normal pixels below each anomalous score; background buckets are never touched.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "METRIC_KEYS",
    "PRO_MAX_FPR",
    "CategoryAccumulator",
    "MetricError",
    "evaluate_category",
    "mean_over_categories",
]

METRIC_KEYS: tuple[str, ...] = (
    "image_auroc",
    "image_ap",
    "image_f1max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1max",
    "pixel_aupro",
    "mad",
)
PRO_MAX_FPR = 0.3

# Regions are 8-connected inside one image and never connected across images of a batch.
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True

_STAGE_PIXELS = 1 << 21  # normal pixels buffered before they are packed into a sorted block
_CHUNK_PIXELS = 1 << 22  # normal pixels decoded at once while counting (16 MiB of uint32)
_GAP_PIXELS = 1 << 18  # unneeded pixels worth decoding rather than starting a new chunk


class MetricError(ValueError):
    """A metric is undefined for the given data (e.g. no anomalous image) or the input is bad."""


def _available_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _to_numpy(x: Any) -> np.ndarray:
    """Accept numpy arrays and torch tensors (any device) without importing torch."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        t = x.detach().cpu()
        if str(t.dtype) in ("torch.bfloat16", "torch.float16"):
            t = t.float()
        return t.numpy()
    return np.asarray(x)


def _as_batch(x: Any, name: str) -> np.ndarray:
    """(N, H, W) or (N, 1, H, W) array or tensor -> numpy (N, H, W) view, dtype unchanged."""
    arr = _to_numpy(x)
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 3:
        raise MetricError(f"{name} must have shape (N, H, W) or (N, 1, H, W), got {arr.shape}")
    return arr


def _as_maps(maps: Any) -> np.ndarray:
    """-> float32 (N, H, W): float32 is what maps are produced in (float64 input is rounded)."""
    return np.ascontiguousarray(_as_batch(maps, "maps"), dtype=np.float32)


def _as_masks(masks: Any) -> np.ndarray:
    """-> bool (N, H, W); non-bool masks must already be binary (0/1)."""
    arr = _as_batch(masks, "masks")
    if arr.dtype != np.bool_:
        binary = arr != 0
        if not np.all(arr[binary] == 1):
            raise MetricError("masks must be boolean or contain only 0 and 1; binarise them first")
        arr = binary
    return np.ascontiguousarray(arr)


def _orderable_keys(values: np.ndarray, inplace: bool = False) -> np.ndarray:
    """Map finite float32 values to uint32 keys with the same order; -0.0 and +0.0 share a key.

    With ``inplace`` the (private, contiguous) float32 array is overwritten and reused.
    """
    out = values if inplace else None
    v = np.add(values, np.float32(0.0), out=out, dtype=np.float32)  # -0.0 + 0.0 == +0.0
    bits = v.view(np.uint32)
    # negative floats: flip all bits (reverses their order); others: set the sign bit
    flip = (v.view(np.int32) >> np.int32(31)).view(np.uint32)
    flip |= np.uint32(0x80000000)
    bits ^= flip
    return bits


def _group_starts(sorted_values: np.ndarray) -> np.ndarray:
    """Start index of each run of equal values in a sorted array."""
    change = np.flatnonzero(sorted_values[1:] != sorted_values[:-1]) + 1
    return np.concatenate(([0], change))


def _partial_area(x: np.ndarray, y: np.ndarray, limit: float) -> tuple[float, bool]:
    """Trapezoidal area under the polyline (x, y) for x <= limit, and whether limit was reached.

    ``x`` must be non-decreasing. If the polyline crosses ``limit``, it is interpolated linearly
    there (vertical pieces exactly at ``limit`` add nothing, so the area is well defined).
    """
    k = int(np.searchsorted(x, limit, side="right"))  # x[:k] <= limit < x[k]
    area = float(np.dot(np.diff(x[:k]), y[1:k] + y[: k - 1])) * 0.5
    if k == len(x):
        return area, False
    x0, y0, x1, y1 = x[k - 1], y[k - 1], x[k], y[k]
    y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
    return area + float((limit - x0) * (y0 + y_lim)) * 0.5, True


def _curve_metrics(
    pos_counts: np.ndarray,
    neg_lt: np.ndarray,
    neg_le: np.ndarray,
    n_neg: int,
    region_weight: np.ndarray | None = None,
    n_regions: int = 0,
    max_fpr: float = PRO_MAX_FPR,
    block: int = 1 << 18,
) -> tuple[float, ...]:
    """AU-ROC, AP, F1-max (and AU-PRO if region weights are given) from per-score statistics.

    Inputs are indexed by the distinct scores ``u`` of the positives in ascending order: how many
    positives score ``u``, how many negatives score ``< u`` and ``<= u``, and the positives' sum
    of ``1/|region|``. Thresholds are ``score >= t``; walking them downwards, only thresholds at
    positive scores change TP/PRO (see the module doc), so the sums below are exact:

    * AU-ROC = Mann-Whitney U with ties counting half (= the trapezoid under the exact ROC);
    * AP = sum over thresholds of recall increase x precision (scikit-learn's step-wise AP);
    * F1-max = max of 2TP / (TP + FP + P) (= max of 2PR / (P + R));
    * AU-PRO: each ``u`` adds the points (FPR of negatives > u, PRO above u) and (FPR of
      negatives >= u, PRO at u); normal-only thresholds lie on the horizontal segment between,
      so this is the exact curve with collinear points dropped. It starts at (0, 0), ends at
      FPR 1, and is integrated up to ``max_fpr`` (interpolated there) and divided by it.

    Works on descending blocks so temporaries stay small even with millions of distinct scores.
    """
    n_pos = int(pos_counts.sum())
    u2_sum = 0.0  # twice the Mann-Whitney U
    ap_sum = 0.0
    f1max = 0.0
    tp_above = 0
    w_above = 0.0
    pro_area, x_last, y_last = 0.0, 0.0, 0.0
    pro_done = region_weight is None
    for stop in range(len(pos_counts), 0, -block):
        part = slice(max(0, stop - block), stop)
        cp = pos_counts[part][::-1].astype(np.int64)
        lt = neg_lt[part][::-1].astype(np.int64)
        le = neg_le[part][::-1].astype(np.int64)
        u2_sum += float(np.dot(cp.astype(np.float64), (lt + le).astype(np.float64)))
        tp = np.cumsum(cp) + tp_above  # positives scoring >= u
        tp_above = int(tp[-1])
        fp = n_neg - lt  # negatives scoring >= u
        ap_sum += float(np.dot(cp.astype(np.float64), tp / (tp + fp)))
        f1max = max(f1max, float(np.max(2.0 * tp / (tp + fp + n_pos))))
        if pro_done:
            continue
        w = region_weight[part][::-1]
        pro = (np.cumsum(w) + w_above) / n_regions
        x = np.empty(2 * len(w) + 1)
        y = np.empty_like(x)
        x[0], y[0] = x_last, y_last
        x[1::2] = (n_neg - le) / n_neg  # FPR just above u: PRO not yet increased
        y[1::2] = np.concatenate(([y_last], pro[:-1]))
        x[2::2] = fp / n_neg  # FPR at u
        y[2::2] = pro
        area, pro_done = _partial_area(x, y, max_fpr)
        pro_area += area
        w_above += float(np.sum(w))
        x_last, y_last = float(x[-1]), float(y[-1])
    result = (0.5 * u2_sum / (float(n_pos) * n_neg), ap_sum / n_pos, f1max)
    if region_weight is None:
        return result
    if not pro_done:  # the curve ends at FPR 1 once every normal pixel is above threshold
        area, _ = _partial_area(np.array([x_last, 1.0]), np.array([y_last, y_last]), max_fpr)
        pro_area += area
    return (*result, pro_area / max_fpr)


class _NormalBlock:
    """Sorted normal-pixel keys: 2 bytes per pixel plus one (bucket, count) per 16-bit bucket."""

    __slots__ = ("hi", "count", "offset", "lo")

    def __init__(self, sorted_keys: np.ndarray) -> None:
        hi = sorted_keys >> np.uint32(16)
        starts = _group_starts(hi)
        self.hi = hi[starts].astype(np.uint16)
        self.count = np.diff(np.append(starts, len(sorted_keys))).astype(np.int64)
        self.offset = np.concatenate(([0], np.cumsum(self.count)))
        self.lo = sorted_keys.astype(np.uint16)  # low 16 bits

    def span(self, h0: int, h1: int) -> tuple[int, int]:
        """Index range of the buckets h0..h1 (inclusive) in :attr:`hi`."""
        return (
            int(np.searchsorted(self.hi, h0, side="left")),
            int(np.searchsorted(self.hi, h1, side="right")),
        )

    def decode_into(self, i0: int, i1: int, out: np.ndarray) -> None:
        """Write the uint32 keys of buckets ``hi[i0:i1]`` into ``out`` (of the right length)."""
        np.copyto(out, self.lo[self.offset[i0] : self.offset[i1]], casting="unsafe")
        out |= np.repeat(self.hi[i0:i1].astype(np.uint32) << np.uint32(16), self.count[i0:i1])


def _pack_normal(keys: np.ndarray) -> _NormalBlock:
    """Sort a private array of normal-pixel keys and pack it (runs in the worker thread)."""
    keys.sort()
    return _NormalBlock(keys)


def _anomalous_keys(masks: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, int]:
    """Region labels of (private copies of) anomalous images -> uint64 keys, number of regions.

    Key = order-preserving bits of the score (high half) | size of the pixel's region (low half).
    """
    labels, n_regions = ndimage.label(masks, structure=_REGION_STRUCTURE)
    sizes = np.bincount(labels.ravel())
    keys = _orderable_keys(values, inplace=True).astype(np.uint64) << np.uint64(32)
    keys |= sizes[labels[masks]].astype(np.uint64)
    return keys, int(n_regions)


class CategoryAccumulator:
    """Streaming form of :func:`evaluate_category`: feed batches, get the exact same numbers.

    Memory is bounded by one category and small: 2 bytes per normal pixel, 8 bytes per anomalous
    pixel and a few numbers per image; no float64 copy of a batch is ever held. Region labelling
    is per image, so it happens in :meth:`update`; the division by the total number of regions
    happens in :meth:`compute`. Scores are evaluated in float32 (float64 input is rounded).

    With ``n_threads > 1`` the sorting/packing and region labelling of a batch run in one
    background thread (numpy and scipy release the GIL) while the caller produces the next
    batch; they only ever see private copies, so callers may reuse their buffers at once.
    """

    def __init__(self, max_fpr: float = PRO_MAX_FPR, n_threads: int | None = None) -> None:
        if not 0.0 < max_fpr <= 1.0:
            raise MetricError(f"max_fpr must be in (0, 1], got {max_fpr}")
        self.max_fpr = float(max_fpr)
        if n_threads is None:
            n_threads = min(4, _available_cpus())
        self.n_threads = max(1, int(n_threads))
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        if getattr(self, "_executor", None) is not None:
            self._drain()
        self._image_scores: list[np.ndarray] = []
        self._image_labels: list[np.ndarray] = []
        self._pos_keys: list[np.ndarray] = []
        self._stage: list[np.ndarray] = []
        self._stage_size = 0
        self._blocks: list[_NormalBlock] = []
        self._bucket_count = np.zeros(1 << 16, dtype=np.int64)
        self._n_regions = 0
        self._pending: deque[Future[Any]] = deque()
        self._executor: ThreadPoolExecutor | None = None
        self.n_normal_pixels = 0
        self.n_anomalous_pixels = 0

    @property
    def n_images(self) -> int:
        return int(sum(len(s) for s in self._image_scores))

    @property
    def n_regions(self) -> int:
        """Anomalous regions (8-connected components of each mask) seen so far."""
        self._drain()
        return self._n_regions

    def _submit(self, fn: Any, *args: Any) -> None:
        """Run fn(*args) in the worker thread (or inline) and keep at most 4 results pending."""
        if self.n_threads == 1:
            self._collect(fn(*args))
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="omniad-metrics")
        self._pending.append(self._executor.submit(fn, *args))
        while len(self._pending) > 4:  # bounds the memory held by queued batches
            self._collect(self._pending.popleft().result())

    def _collect(self, result: _NormalBlock | tuple[np.ndarray, int]) -> None:
        if isinstance(result, _NormalBlock):
            self._bucket_count[result.hi] += result.count
            self._blocks.append(result)
        else:
            keys, n_regions = result
            self._pos_keys.append(keys)
            self._n_regions += n_regions

    def _drain(self) -> None:
        """Wait for the worker, collect its results and release the thread."""
        try:
            while self._pending:
                self._collect(self._pending.popleft().result())
        finally:
            self._pending.clear()
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def update(self, maps: Any, masks: Any, image_scores: Any = None) -> None:
        """Add a batch: maps (B, H, W) float, masks (B, H, W) bool, optional image scores (B,)."""
        maps_np = _as_maps(maps)
        masks_np = _as_masks(masks)
        if maps_np.shape != masks_np.shape:
            raise MetricError(f"maps {maps_np.shape} and masks {masks_np.shape} differ in shape")
        n = maps_np.shape[0]
        if image_scores is not None:
            scores = np.asarray(_to_numpy(image_scores), dtype=np.float64).reshape(-1)
            if scores.shape[0] != n:
                raise MetricError(f"image_scores has {scores.shape[0]} values for {n} maps")
            if not np.isfinite(scores).all():
                raise MetricError("image_scores contain NaN or inf")
        elif n and maps_np.shape[1] * maps_np.shape[2] == 0:
            raise MetricError("maps have no pixels, so there is no image score (max of the map)")
        step = max(1, _STAGE_PIXELS // max(1, maps_np.shape[1] * maps_np.shape[2]))
        parts = [slice(i, i + step) for i in range(0, n, step)]  # bounds temporaries
        for part in parts:  # validate everything first: a bad batch leaves no trace
            if not np.isfinite(maps_np[part]).all():
                raise MetricError("maps contain NaN or inf")
        for part in parts:
            self._update_part(
                maps_np[part], masks_np[part], None if image_scores is None else scores[part]
            )

    def _update_part(self, maps: np.ndarray, masks: np.ndarray, scores: np.ndarray | None) -> None:
        b = maps.shape[0]
        if scores is None:
            scores = maps.reshape(b, -1).max(axis=1).astype(np.float64)
        has_anomaly = masks.reshape(b, -1).any(axis=1)
        self._image_scores.append(scores)
        self._image_labels.append(has_anomaly)

        normal = maps[~masks]
        self.n_normal_pixels += normal.size
        self._stage.append(_orderable_keys(normal, inplace=True))
        self._stage_size += normal.size
        if self._stage_size >= _STAGE_PIXELS:
            self._flush_stage()

        if has_anomaly.any():
            values = maps[masks]
            self.n_anomalous_pixels += values.size
            self._submit(_anomalous_keys, masks[has_anomaly], values)

    def _flush_stage(self) -> None:
        if not self._stage:
            return
        keys = np.concatenate(self._stage) if len(self._stage) > 1 else self._stage[0]
        self._stage, self._stage_size = [], 0
        if keys.size:
            self._submit(_pack_normal, keys)

    def _normal_counts(self, uk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Numbers of normal pixels with key < uk and <= uk, for sorted distinct keys uk."""
        below = np.concatenate(([0], np.cumsum(self._bucket_count)))  # pixels in buckets < h
        hu = uk >> np.uint32(16)
        needed = hu[_group_starts(hu)].astype(np.int64)
        chunks: list[tuple[int, int]] = []
        start = prev = int(needed[0])
        for h in needed[1:].tolist():
            span = below[h + 1] - below[start]
            gap = below[h] - below[prev + 1]
            if span > _CHUNK_PIXELS or gap > _GAP_PIXELS:
                chunks.append((start, prev))
                start = h
            prev = h
        chunks.append((start, prev))

        lt = np.empty(len(uk), dtype=np.int64)
        le = np.empty(len(uk), dtype=np.int64)

        def count_chunk(chunk: tuple[int, int]) -> None:
            h0, h1 = chunk
            j0 = int(np.searchsorted(hu, h0, side="left"))
            j1 = int(np.searchsorted(hu, h1, side="right"))
            spans = [(blk, *blk.span(h0, h1)) for blk in self._blocks]
            sizes = [int(blk.offset[i1] - blk.offset[i0]) for blk, i0, i1 in spans]
            base = below[h0]
            if not any(sizes):
                lt[j0:j1] = base
                le[j0:j1] = base
                return
            keys = np.empty(sum(sizes), dtype=np.uint32)
            at = 0
            for (blk, i0, i1), size in zip(spans, sizes, strict=True):
                if size:
                    blk.decode_into(i0, i1, keys[at : at + size])
                    at += size
            keys.sort()
            q = uk[j0:j1]
            lt[j0:j1] = base + np.searchsorted(keys, q, side="left")
            le[j0:j1] = base + np.searchsorted(keys, q, side="right")

        if self.n_threads > 1 and len(chunks) > 1:
            with ThreadPoolExecutor(min(self.n_threads, len(chunks))) as pool:
                list(pool.map(count_chunk, chunks))
        else:
            for chunk in chunks:
                count_chunk(chunk)
        return lt, le

    def _check_defined(self) -> None:
        if not self._image_scores:
            raise MetricError("no images were given: metrics are undefined")
        labels = np.concatenate(self._image_labels)
        problems = []
        if not labels.any():
            problems.append("no anomalous image (every mask is empty)")
        if labels.all():
            problems.append("no normal image (every mask has an anomalous pixel)")
        if self.n_anomalous_pixels == 0:
            problems.append("no anomalous pixel")
        if self.n_normal_pixels == 0:
            problems.append("no normal pixel")
        if problems:
            raise MetricError("metrics are undefined for this category: " + "; ".join(problems))

    def compute(self) -> dict[str, float]:
        """All metrics of :data:`METRIC_KEYS` as fractions; may be called again after updates."""
        self._check_defined()
        scores = np.concatenate(self._image_scores)
        labels = np.concatenate(self._image_labels)
        neg_scores = np.sort(scores[~labels])
        pos_scores = np.sort(scores[labels])
        starts = _group_starts(pos_scores)
        u = pos_scores[starts]
        cp = np.diff(np.append(starts, len(pos_scores)))
        img = _curve_metrics(
            cp,
            np.searchsorted(neg_scores, u, side="left"),
            np.searchsorted(neg_scores, u, side="right"),
            len(neg_scores),
        )

        self._flush_stage()
        self._drain()
        if len(self._pos_keys) > 1:
            self._pos_keys = [np.concatenate(self._pos_keys)]
        pos = self._pos_keys[0]
        pos.sort()
        value_keys = (pos >> np.uint64(32)).astype(np.uint32)
        starts = _group_starts(value_keys)
        uk = value_keys[starts]
        del value_keys
        cp = np.diff(np.append(starts, len(pos)))
        inv_size = (pos & np.uint64(0xFFFFFFFF)).astype(np.float64)
        np.reciprocal(inv_size, out=inv_size)
        weight = np.add.reduceat(inv_size, starts)
        del inv_size, starts
        lt, le = self._normal_counts(uk)
        *pix, aupro = _curve_metrics(
            cp, lt, le, self.n_normal_pixels, weight, self._n_regions, self.max_fpr
        )

        values = [*img, *pix, aupro]
        values = [min(1.0, max(0.0, float(v))) for v in values]  # clip 1 + 1e-16 rounding
        values.append(sum(values) / len(values))
        return dict(zip(METRIC_KEYS, values, strict=True))


def evaluate_category(
    maps: Any,
    masks: Any,
    image_scores: Any = None,
    *,
    max_fpr: float = PRO_MAX_FPR,
    batch_size: int = 64,
) -> dict[str, float]:
    """Metrics of one category from all its maps (N, H, W), masks (N, H, W) and image scores.

    ``image_scores=None`` uses the max of each map. Image label = mask has an anomalous pixel.
    Returns fractions in [0, 1] keyed by :data:`METRIC_KEYS` in that order; raises
    :class:`MetricError` (a ``ValueError``) when a metric is undefined or the input is bad.
    Internally this is :class:`CategoryAccumulator` fed in batches (converted to float32 one
    batch at a time), so both agree exactly.
    """
    maps_np = _as_batch(maps, "maps")
    masks_np = _as_batch(masks, "masks")
    if maps_np.shape != masks_np.shape:
        raise MetricError(f"maps {maps_np.shape} and masks {masks_np.shape} differ in shape")
    scores = None
    if image_scores is not None:
        scores = np.asarray(_to_numpy(image_scores), dtype=np.float64).reshape(-1)
        if scores.shape[0] != maps_np.shape[0]:
            raise MetricError(
                f"image_scores has {scores.shape[0]} values for {maps_np.shape[0]} maps"
            )
    acc = CategoryAccumulator(max_fpr=max_fpr)
    for i in range(0, maps_np.shape[0], batch_size):
        part = slice(i, i + batch_size)
        acc.update(maps_np[part], masks_np[part], None if scores is None else scores[part])
    return acc.compute()


def mean_over_categories(per_category: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The paper's "mean over categories": plain mean of each metric over categories.

    mAD of the mean is recomputed as the mean of the seven means, which equals the mean of the
    per-category mAD values (up to rounding), so the table's last column stays consistent.
    """
    if not per_category:
        raise MetricError("no categories to average")
    seven = METRIC_KEYS[:-1]
    for name, metrics in per_category.items():
        missing = [k for k in seven if k not in metrics]
        if missing:
            raise MetricError(f"category {name!r} lacks metrics {missing}")
    means = {k: float(np.mean([m[k] for m in per_category.values()])) for k in seven}
    means["mad"] = sum(means.values()) / len(seven)
    return means
