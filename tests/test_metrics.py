"""omniad.metrics against independent references (scikit-learn and a plain AU-PRO loop)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

import omniad.metrics as M
from omniad.metrics import (
    METRIC_KEYS,
    CategoryAccumulator,
    MetricError,
    evaluate_category,
    mean_over_categories,
)

TOL = 1e-9  # the brief asks for 1e-6; exact algorithms agree far closer


# --------------------------------------------------------------------------- references
def ref_f1max(y: np.ndarray, s: np.ndarray) -> float:
    p, r, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * p * r / (p + r)
    return float(np.nanmax(f1))


def ref_aupro(maps: np.ndarray, masks: np.ndarray, max_fpr: float = 0.3) -> float:
    """Straight from the definition: every distinct threshold, regions relabelled per image."""
    regions = []  # (image index, boolean region mask)
    for i, mask in enumerate(masks):
        labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(i, labels == r) for r in range(1, n + 1)]
    normal = ~masks
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        ys.append(np.mean([pred[i][region].mean() for i, region in regions]))
        xs.append(pred[normal].mean())
    area = 0.0
    for x0, y0, x1, y1 in zip(xs[:-1], ys[:-1], xs[1:], ys[1:], strict=True):
        if x0 >= max_fpr:
            break
        if x1 <= max_fpr:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_lim = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            area += (max_fpr - x0) * (y0 + y_lim) / 2
            break
    return area / max_fpr


def reference(maps: np.ndarray, masks: np.ndarray, image_scores=None) -> dict[str, float]:
    n = len(maps)
    s_img = maps.reshape(n, -1).max(axis=1) if image_scores is None else image_scores
    y_img = masks.reshape(n, -1).any(axis=1)
    y, s = masks.ravel(), maps.ravel()
    out = {
        "image_auroc": roc_auc_score(y_img, s_img),
        "image_ap": average_precision_score(y_img, s_img),
        "image_f1max": ref_f1max(y_img, s_img),
        "pixel_auroc": roc_auc_score(y, s),
        "pixel_ap": average_precision_score(y, s),
        "pixel_f1max": ref_f1max(y, s),
        "pixel_aupro": ref_aupro(maps, masks),
    }
    out["mad"] = sum(out.values()) / 7
    return {k: float(v) for k, v in out.items()}


def assert_close(got: dict[str, float], want: dict[str, float], tol: float = TOL) -> None:
    assert list(got) == list(METRIC_KEYS)
    for k in METRIC_KEYS:
        assert got[k] == pytest.approx(want[k], abs=tol), k


# --------------------------------------------------------------------------- cases
def blobs(rng: np.random.Generator, n: int, size: int, p_anomalous: float = 0.6) -> np.ndarray:
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n):
        if rng.random() < p_anomalous:
            for _ in range(rng.integers(1, 4)):
                y, x = rng.integers(0, size, 2)
                h, w = rng.integers(1, size // 3 + 1, 2)
                masks[i, y : y + h, x : x + w] = True
    return masks


def make_case(kind: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    n, size = 6, 16
    masks = blobs(rng, n, size)
    masks[0] = False  # at least one normal image
    masks[1, 3:6, 3:6] = True  # at least one anomalous image
    maps = rng.standard_normal((n, size, size)).astype(np.float32) + 1.5 * masks
    scores = None
    if kind == "ties":  # few levels, with -0.0 and +0.0 mixed
        maps = (np.round(maps * 1.5) / 1.5).astype(np.float32)
        maps[maps == 0] = np.where(rng.random(int((maps == 0).sum())) < 0.5, -0.0, 0.0)
    elif kind == "extreme":  # one huge value in a normal pixel, one very negative
        maps[0, 2, 2] = 1e30
        maps[2, 0, 0] = -1e30
    elif kind == "one_pixel_regions":
        masks = np.zeros_like(masks)
        masks[1:4, ::3, ::3] = True
        maps = rng.standard_normal(maps.shape).astype(np.float32) + masks
    elif kind == "many_regions":
        masks = rng.random(masks.shape) < 0.12
        masks[0] = False
        maps = rng.standard_normal(maps.shape).astype(np.float32) + 0.7 * masks
    elif kind == "diagonal":
        masks = np.zeros_like(masks)
        idx = np.arange(size)
        masks[1, idx, idx] = True  # one diagonal line = one 8-connected region
        masks[2, idx[:-1], idx[1:]] = True
        masks[2, idx[1:], idx[:-1]] = True
        masks[3, 4, 4] = masks[3, 5, 5] = masks[3, 6, 4] = True  # touching corners only
    elif kind == "mostly_normal":
        masks[2:] = False
        masks = np.concatenate([masks, np.zeros_like(masks)])
        maps = np.concatenate([maps, rng.standard_normal(maps.shape).astype(np.float32)])
    elif kind == "image_scores":
        scores = np.round(rng.standard_normal(n) + masks.any(axis=(1, 2)), 0)
    elif kind == "quantised_near":  # distinct values inside one 16-bit key bucket
        maps = (1.0 + rng.integers(0, 40, maps.shape) * 2.0**-20).astype(np.float32)
        maps += masks * np.float32(2.0**-19)
    return maps.astype(np.float32), masks, scores


KINDS = [
    "random",
    "ties",
    "extreme",
    "one_pixel_regions",
    "many_regions",
    "diagonal",
    "mostly_normal",
    "image_scores",
    "quantised_near",
]


@pytest.fixture
def tiny_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shrink the internal buffers so small inputs use many blocks, chunks and gap splits."""
    monkeypatch.setattr(M, "_STAGE_PIXELS", 97)
    monkeypatch.setattr(M, "_CHUNK_PIXELS", 53)
    monkeypatch.setattr(M, "_GAP_PIXELS", 7)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_references(kind: str, seed: int) -> None:
    maps, masks, scores = make_case(kind, seed)
    assert_close(evaluate_category(maps, masks, scores), reference(maps, masks, scores))


@pytest.mark.parametrize("kind", KINDS)
def test_matches_references_with_tiny_buffers(kind: str, tiny_buffers: None) -> None:
    maps, masks, scores = make_case(kind, 3)
    assert_close(evaluate_category(maps, masks, scores), reference(maps, masks, scores))


def test_tiny_buffers_really_split() -> None:
    """Guard for the test above: the monkeypatched sizes do produce many blocks/chunks."""
    maps, masks, _ = make_case("random", 3)
    old = M._STAGE_PIXELS, M._CHUNK_PIXELS, M._GAP_PIXELS
    try:
        M._STAGE_PIXELS, M._CHUNK_PIXELS, M._GAP_PIXELS = 97, 53, 7
        acc = CategoryAccumulator(n_threads=1)
        acc.update(maps, masks)
        acc.compute()
        assert len(acc._blocks) > 5
    finally:
        M._STAGE_PIXELS, M._CHUNK_PIXELS, M._GAP_PIXELS = old


def sorted_reference(maps: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """Second independent exact path for inputs too big for the loop: one argsort + cumsums."""
    s = maps.astype(np.float64).ravel()
    y = masks.ravel()
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # 8-connected within an image, never across images
    labels, n_regions = ndimage.label(masks, structure=structure)
    sizes = np.bincount(labels.ravel()).astype(np.float64)
    w = np.where(y, 1.0 / sizes[labels.ravel()], 0.0)
    order = np.argsort(-s, kind="stable")
    ss, yy, ww = s[order], y[order], w[order]
    ends = np.append(np.flatnonzero(np.diff(ss)), len(ss) - 1)
    fpr = np.concatenate(([0.0], np.cumsum(~yy)[ends] / (~y).sum()))
    pro = np.concatenate(([0.0], np.cumsum(ww)[ends] / n_regions))
    area, i = 0.0, 0
    while fpr[i + 1] <= 0.3:
        area += (fpr[i + 1] - fpr[i]) * (pro[i + 1] + pro[i]) / 2
        i += 1
    y_lim = pro[i] + (pro[i + 1] - pro[i]) * (0.3 - fpr[i]) / (fpr[i + 1] - fpr[i])
    area += (0.3 - fpr[i]) * (pro[i] + y_lim) / 2
    n = len(maps)
    s_img, y_img = maps.reshape(n, -1).max(axis=1), masks.reshape(n, -1).any(axis=1)
    out = {
        "image_auroc": roc_auc_score(y_img, s_img),
        "image_ap": average_precision_score(y_img, s_img),
        "image_f1max": ref_f1max(y_img, s_img),
        "pixel_auroc": roc_auc_score(y, maps.ravel()),
        "pixel_ap": average_precision_score(y, maps.ravel()),
        "pixel_f1max": ref_f1max(y, maps.ravel()),
        "pixel_aupro": area / 0.3,
    }
    out["mad"] = sum(out.values()) / 7
    return {k: float(v) for k, v in out.items()}


def test_sorted_reference_agrees_with_loop_reference() -> None:
    maps, masks, _ = make_case("ties", 5)
    assert_close(sorted_reference(maps, masks), reference(maps, masks))


def test_larger_smooth_maps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Realistic smooth maps, 30 x 48 x 48, many distinct values; exercises chunk splitting."""
    monkeypatch.setattr(M, "_STAGE_PIXELS", 3000)
    monkeypatch.setattr(M, "_CHUNK_PIXELS", 4000)
    monkeypatch.setattr(M, "_GAP_PIXELS", 500)
    rng = np.random.default_rng(7)
    masks = blobs(rng, 30, 48)
    noise = rng.standard_normal((30, 48, 48)).astype(np.float32)
    maps = ndimage.gaussian_filter(noise, (0, 2, 2)) + ndimage.gaussian_filter(
        masks.astype(np.float32), (0, 3, 3)
    )
    assert_close(evaluate_category(maps, masks), sorted_reference(maps, masks))


# --------------------------------------------------------------------------- hand computed
def test_hand_computed_example() -> None:
    """Two 2x2 images. A: region {4, 2} (one region), normal {3, 0}; B (normal): {2, -1, -2, -3}.

    Normal pixels: 3, 0, 2, -1, -2, -3 (6). Thresholds downwards:
      t=4: FPR 0,   PRO 1/2;  t=3: FPR 1/6, PRO 1/2;  t=2: FPR 2/6, PRO 1 (normal 2 ties in).
    PRO curve: (0,0) (0,.5) (1/6,.5) (1/3,1): at FPR .3 the last segment gives .5 + .5 * .8 = .9,
    area = 1/6 * .5 + (.3 - 1/6) * (.5 + .9) / 2 = 1/12 + 7/75 = 53/300, so AU-PRO = 53/90.
    Pixel AU-ROC: 4 beats 6 normals, 2 beats 4 and ties 1 -> (6 + 4.5) / 12 = 0.875.
    Pixel AP: recall .5 at precision 1, recall 1 at precision 2/4 -> .75. F1-max: 2/3.
    Image scores 4 (anomalous) > 2 (normal): AU-ROC = AP = F1-max = 1.
    """
    maps = np.array([[[4, 2], [3, 0]], [[2, -1], [-2, -3]]], dtype=np.float32)
    masks = np.array([[[1, 1], [0, 0]], [[0, 0], [0, 0]]], dtype=bool)
    got = evaluate_category(maps, masks)
    want = [1.0, 1.0, 1.0, 0.875, 0.75, 2 / 3, 53 / 90]
    assert [got[k] for k in METRIC_KEYS[:-1]] == pytest.approx(want, abs=1e-12)
    assert got["mad"] == pytest.approx(sum(want) / 7, abs=1e-12)
    assert_close(got, reference(maps, masks))


def test_diagonal_touching_is_one_region() -> None:
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 3, 3] = True  # two 8-connected regions
    acc = CategoryAccumulator()
    acc.update(np.zeros((2, 4, 4), dtype=np.float32), masks)
    assert acc.n_regions == 2
    # with 8-connectivity the pair (0,0)-(1,1) weighs 1/2 each; check a value that depends on it
    maps = np.zeros((2, 4, 4), dtype=np.float32)
    maps[0, 0, 0] = 1.0  # half of the diagonal region, none of the single pixel
    got = evaluate_category(maps, masks)
    assert_close(got, reference(maps, masks))
    # curve: (0, .25) at FPR 0 (1/2 of region 1, 0 of region 2), then (1, 1): area to .3
    assert got["pixel_aupro"] == pytest.approx((0.3 * (0.25 + 0.25 + 0.75 * 0.3)) / 2 / 0.3)


def test_constant_maps() -> None:
    rng = np.random.default_rng(2)
    masks = blobs(rng, 8, 12)
    masks[0] = False
    masks[1, 0, 0] = True
    maps = np.zeros(masks.shape, dtype=np.float32)
    got = evaluate_category(maps, masks)
    p_pix = masks.mean()
    p_img = masks.any(axis=(1, 2)).mean()
    assert got["pixel_auroc"] == 0.5
    assert got["image_auroc"] == 0.5
    assert got["pixel_ap"] == pytest.approx(p_pix)
    assert got["image_ap"] == pytest.approx(p_img)
    assert got["pixel_f1max"] == pytest.approx(2 * p_pix / (1 + p_pix))
    assert got["pixel_aupro"] == pytest.approx(0.15)  # the diagonal (0,0)-(1,1) up to .3
    assert_close(got, reference(maps, masks))


def test_perfect_and_inverted_separation() -> None:
    maps, masks, _ = make_case("random", 4)
    perfect = np.where(masks, 2.0, 1.0).astype(np.float32)
    got = evaluate_category(perfect, masks)
    assert all(got[k] == pytest.approx(1.0) for k in METRIC_KEYS)
    got = evaluate_category(-perfect, masks)
    assert got["pixel_auroc"] == 0.0
    assert got["pixel_aupro"] == 0.0
    assert_close(got, reference(-perfect, masks))


# --------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("splits", [[1], [2], [5], [3, 1, 4, 1, 5]])
def test_streaming_equals_array(splits: list[int], tiny_buffers: None) -> None:
    maps, masks, scores = make_case("many_regions", 11)
    maps = np.concatenate([maps, make_case("ties", 12)[0]])
    masks = np.concatenate([masks, make_case("ties", 12)[1]])
    want = evaluate_category(maps, masks)
    acc = CategoryAccumulator()
    i, j = 0, 0
    while i < len(maps):
        b = splits[j % len(splits)]
        acc.update(torch.from_numpy(maps[i : i + b]), torch.from_numpy(masks[i : i + b]))
        i, j = i + b, j + 1
    got = acc.compute()
    for k in METRIC_KEYS:
        assert got[k] == pytest.approx(want[k], abs=1e-9)
    assert got == want  # the result does not even depend on the batching
    inline = CategoryAccumulator(n_threads=1)  # no worker thread
    for i in range(0, len(maps), splits[0]):
        inline.update(maps[i : i + splits[0]], masks[i : i + splits[0]])
    assert inline.compute() == want


def test_streaming_accepts_channel_dim_scores_and_recompute() -> None:
    maps, masks, _ = make_case("random", 8)
    scores = maps.reshape(len(maps), -1).mean(axis=1)
    want = evaluate_category(maps, masks, scores)
    acc = CategoryAccumulator()
    acc.update(torch.from_numpy(maps[:3, None]), torch.from_numpy(masks[:3, None]), scores[:3])
    acc.update(maps[3:, None], masks[3:].astype(np.uint8), torch.from_numpy(scores[3:]))
    assert acc.compute() == want
    assert acc.compute() == want  # compute is repeatable
    acc.update(maps, masks, scores)  # and updates may follow
    assert acc.compute() == evaluate_category(
        np.concatenate([maps, maps]), np.concatenate([masks, masks]), np.tile(scores, 2)
    )


def test_float64_input_is_evaluated_in_float32() -> None:
    maps, masks, _ = make_case("random", 9)
    assert evaluate_category(maps.astype(np.float64), masks) == evaluate_category(maps, masks)


def test_blockwise_curve_metrics_do_not_depend_on_block_size() -> None:
    rng = np.random.default_rng(0)
    k = 50
    cp = rng.integers(1, 5, k)
    between, equal = rng.integers(0, 4, k), rng.integers(0, 2, k)  # negatives per gap / tie
    lt = np.cumsum(between) + np.concatenate(([0], np.cumsum(equal)[:-1]))
    le = lt + equal
    n_neg = int(le[-1] + 3)
    w = rng.random(k)
    want = M._curve_metrics(cp, lt, le, n_neg, w, 40, 0.3)
    for block in (1, 2, 7, 49):
        got = M._curve_metrics(cp, lt, le, n_neg, w, 40, 0.3, block=block)
        assert got == pytest.approx(want, abs=1e-12)


# --------------------------------------------------------------------------- errors
def test_undefined_cases_raise() -> None:
    maps, masks, _ = make_case("random", 0)
    with pytest.raises(MetricError, match="no anomalous image") as e:
        evaluate_category(maps, np.zeros_like(masks))
    assert "no anomalous pixel" in str(e.value)
    some = masks.copy()
    some[:, 0, 0] = True
    with pytest.raises(MetricError, match="no normal image") as e:
        evaluate_category(maps, some)
    assert "no normal pixel" not in str(e.value)
    with pytest.raises(MetricError, match="no normal pixel"):
        evaluate_category(maps, np.ones_like(masks))
    with pytest.raises(ValueError, match="differ in shape"):
        evaluate_category(maps, masks[:, :-1])
    with pytest.raises(ValueError, match="shape"):
        evaluate_category(maps[0], masks[0])
    bad = maps.copy()
    bad[2, 1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        evaluate_category(bad, masks)
    bad[2, 1, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        evaluate_category(bad, masks)
    with pytest.raises(ValueError, match="image_scores has"):
        evaluate_category(maps, masks, np.zeros(len(maps) + 1))
    with pytest.raises(ValueError, match="image_scores contain NaN"):
        evaluate_category(maps, masks, np.full(len(maps), np.nan))
    with pytest.raises(ValueError, match="only 0 and 1"):
        evaluate_category(maps, masks * 0.5)
    with pytest.raises(MetricError, match="no images"):
        CategoryAccumulator().compute()


def test_rejected_batch_leaves_no_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(M, "_STAGE_PIXELS", 256)  # the bad batch is split into 1-image parts
    maps, masks, _ = make_case("random", 6)
    acc = CategoryAccumulator()
    acc.update(maps, masks)
    bad = maps.copy()
    bad[-1, 0, 0] = np.nan
    with pytest.raises(MetricError, match="NaN"):
        acc.update(bad, masks)
    assert acc.n_images == len(maps)
    assert acc.compute() == evaluate_category(maps, masks)


# --------------------------------------------------------------------------- mean
def test_keys_order_range_and_mad() -> None:
    maps, masks, _ = make_case("random", 1)
    got = evaluate_category(maps, masks)
    assert tuple(got) == METRIC_KEYS
    assert METRIC_KEYS[-1] == "mad" and len(METRIC_KEYS) == 8
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in got.values())
    assert got["mad"] == pytest.approx(np.mean([got[k] for k in METRIC_KEYS[:-1]]), abs=1e-15)


def test_mean_over_categories() -> None:
    per = {f"c{i}": evaluate_category(*make_case(k, i)[:2]) for i, k in enumerate(KINDS[:4])}
    mean = mean_over_categories(per)
    assert tuple(mean) == METRIC_KEYS
    for k in METRIC_KEYS:
        assert mean[k] == pytest.approx(np.mean([m[k] for m in per.values()]), abs=1e-12)
    assert mean["mad"] == pytest.approx(np.mean([mean[k] for k in METRIC_KEYS[:-1]]), abs=1e-15)
    with pytest.raises(MetricError, match="no categories"):
        mean_over_categories({})
    with pytest.raises(MetricError, match="lacks"):
        mean_over_categories({"a": {"image_auroc": 1.0}})
