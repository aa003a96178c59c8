"""omniad.anomaly_map against computations written out independently here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from omniad.anomaly_map import (
    combine_scales,
    cosine_anomaly_map,
    cosine_distance_maps,
    gaussian_smooth,
    max_score,
    resize_maps,
)


def bilinear_align_corners(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Explicit formula: output (i, j) samples input at (i (h-1)/(H-1), j (w-1)/(W-1))."""
    h, w = img.shape
    out = np.empty((out_h, out_w))
    for i in range(out_h):
        sy = i * (h - 1) / (out_h - 1) if out_h > 1 else 0.0
        y0 = min(int(np.floor(sy)), h - 1)
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for j in range(out_w):
            sx = j * (w - 1) / (out_w - 1) if out_w > 1 else 0.0
            x0 = min(int(np.floor(sx)), w - 1)
            x1, fx = min(x0 + 1, w - 1), sx - x0
            top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
            bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bottom * fy
    return out


def cosine_distance_np(ft: np.ndarray, fs: np.ndarray) -> np.ndarray:
    """(B, C, h, w) pair -> (B, h, w): 1 - <t, s> / (|t| |s|) per pixel, in float64."""
    dot = (ft * fs).sum(axis=1)
    return 1.0 - dot / (np.linalg.norm(ft, axis=1) * np.linalg.norm(fs, axis=1))


def test_bilinear_2x2_to_5x5_by_hand() -> None:
    a, b, c, d = 1.0, 3.0, 5.0, 11.0
    img = torch.tensor([[[a, b], [c, d]]])
    out = resize_maps(img, 5)[0].numpy()
    assert out[0, 0] == a and out[0, 4] == b and out[4, 0] == c and out[4, 4] == d
    assert out[2, 2] == pytest.approx((a + b + c + d) / 4)
    assert out[0, 1] == pytest.approx(0.75 * a + 0.25 * b)
    assert out[1, 0] == pytest.approx(0.75 * a + 0.25 * c)
    # (1, 3): 1/4 down, 3/4 across
    want = 0.75 * (0.25 * a + 0.75 * b) + 0.25 * (0.25 * c + 0.75 * d)
    assert out[1, 3] == pytest.approx(want)
    assert out == pytest.approx(bilinear_align_corners(img[0].numpy(), 5, 5))
    # scipy.ndimage.zoom is a different resampling: the test must not rely on it
    assert resize_maps(img, (3, 7))[0].numpy() == pytest.approx(
        bilinear_align_corners(img[0].numpy(), 3, 7)
    )


def make_feats(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 8, 8, 8), (2, 16, 4, 4), (2, 32, 2, 2)]
    ft = [torch.randn(s, generator=g) for s in shapes]
    fs = [t + 0.7 * torch.randn(t.shape, generator=g) for t in ft]
    return ft, fs


def test_cosine_distance_maps_per_scale() -> None:
    ft, fs = make_feats()
    maps = cosine_distance_maps(ft, fs, (12, 10))
    assert len(maps) == 3
    for t, s, m in zip(ft, fs, maps, strict=True):
        assert m.shape == (2, 12, 10)
        raw = cosine_distance_np(t.double().numpy(), s.double().numpy())
        want = np.stack([bilinear_align_corners(r, 12, 10) for r in raw])
        np.testing.assert_allclose(m.numpy(), want, atol=1e-5)


def test_combine_scales_modes() -> None:
    maps = [torch.full((1, 2, 2), v) for v in (1.0, 2.0, 6.0)]
    assert combine_scales(maps, "add", 9.0).numpy() == pytest.approx(np.full((1, 2, 2), 1.0))
    assert combine_scales(maps, "mean").numpy() == pytest.approx(np.full((1, 2, 2), 3.0))
    assert combine_scales(maps, "mean", 2.0).numpy() == pytest.approx(np.full((1, 2, 2), 1.5))
    assert maps[0][0, 0, 0] == 1.0  # inputs untouched
    with pytest.raises(ValueError):
        combine_scales(maps, "max")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        combine_scales([])


@pytest.mark.parametrize("sigma", [4.0, 1.5])
def test_full_protocol_against_independent_computation(sigma: float) -> None:
    ft, fs = make_feats(1)
    out = 16
    maps, scores = cosine_anomaly_map(ft, fs, out, sigma=sigma)
    assert maps.dtype == np.float32 and maps.shape == (2, out, out) and scores.shape == (2,)
    total = np.zeros((2, out, out))
    for t, s in zip(ft, fs, strict=True):
        raw = cosine_distance_np(t.double().numpy(), s.double().numpy())
        total += np.stack([bilinear_align_corners(r, out, out) for r in raw])
    total /= 9.0
    want = np.stack([ndimage.gaussian_filter(m, sigma=sigma) for m in total])  # one map each
    np.testing.assert_allclose(maps, want, atol=1e-5)
    np.testing.assert_array_equal(scores, maps.reshape(2, -1).max(axis=1))


def test_sigma_behaviour() -> None:
    ft, fs = make_feats(2)
    raw, raw_scores = cosine_anomaly_map(ft, fs, 16, sigma=0)
    none, _ = cosine_anomaly_map(ft, fs, 16, sigma=None)
    np.testing.assert_array_equal(raw, none)
    unsmoothed = combine_scales(cosine_distance_maps(ft, fs, 16), "add", 9.0).numpy()
    np.testing.assert_allclose(raw, unsmoothed, atol=1e-7)
    np.testing.assert_array_equal(raw_scores, raw.reshape(2, -1).max(axis=1))
    smooth, smooth_scores = cosine_anomaly_map(ft, fs, 16, sigma=4.0)
    assert smooth.std() < raw.std()  # smoothing flattens
    assert np.all(smooth_scores <= raw_scores + 1e-6)  # and cannot raise the max
    # smoothing is per map: changing image 1 leaves image 0 untouched
    other = [t.clone() for t in fs]
    for t in other:
        t[1] = torch.randn_like(t[1])
    smooth2, _ = cosine_anomaly_map(ft, other, 16, sigma=4.0)
    np.testing.assert_array_equal(smooth2[0], smooth[0])
    with pytest.raises(ValueError):
        gaussian_smooth(raw, -1.0)


def test_gaussian_smooth_matches_per_image_filter_and_truncate() -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((3, 40, 40)).astype(np.float32)
    got = gaussian_smooth(maps, 4.0)
    want = np.stack([ndimage.gaussian_filter(m.astype(np.float64), 4.0) for m in maps])
    np.testing.assert_allclose(got, want, atol=1e-6)
    # scipy's default truncate=4.0 (radius 16), not a shorter kernel
    short = np.stack([ndimage.gaussian_filter(m, 4.0, truncate=2.0) for m in maps])
    assert np.abs(got - short).max() > 1e-4


def test_max_score() -> None:
    maps = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    maps[0, 1, 2] = 100.0
    np.testing.assert_array_equal(max_score(maps), [100.0, 23.0])


def test_bad_inputs() -> None:
    ft, fs = make_feats()
    with pytest.raises(ValueError):
        cosine_distance_maps(ft, fs[:2], 8)
    with pytest.raises(ValueError):
        cosine_distance_maps(ft, [fs[0][:, :4]] + fs[1:], 8)
    with pytest.raises(ValueError):
        cosine_distance_maps(ft, fs, (8, 8, 8))
