"""Anomaly maps from teacher/student feature pyramids (the released Omni-AD map protocol).

The protocol, per image: for every scale, ``1 - cosine similarity`` over channels between the
teacher's and the student's features, each upsampled (bilinear, ``align_corners=True``) to the
output size; the scales are summed and divided by a constant (9 in the released code), then
smoothed with a Gaussian (sigma 4, scipy's default truncation) per map; the image score is the
max of the smoothed map. It is split into small steps so that baselines can reuse or swap any of
them (e.g. an L2 distance instead of the cosine, ``mean`` instead of ``add``, another sigma).
Torch-side work stays in torch; results move to numpy float32 once, in :func:`to_numpy_maps`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

__all__ = [
    "combine_scales",
    "cosine_anomaly_map",
    "cosine_distance_maps",
    "gaussian_smooth",
    "max_score",
    "resize_maps",
    "to_numpy_maps",
]

RELEASED_DIVISOR = 9.0
RELEASED_SIGMA = 4.0


def _size_2d(out_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(out_size, int):
        return out_size, out_size
    size = tuple(int(s) for s in out_size)
    if len(size) != 2:
        raise ValueError(f"out_size must be an int or (H, W), got {out_size!r}")
    return size[0], size[1]


def resize_maps(maps: torch.Tensor, out_size: int | Sequence[int]) -> torch.Tensor:
    """(B, h, w) -> (B, H, W) by bilinear interpolation with ``align_corners=True``."""
    return F.interpolate(
        maps.unsqueeze(1), size=_size_2d(out_size), mode="bilinear", align_corners=True
    ).squeeze(1)


def cosine_distance_maps(
    feats_t: Sequence[torch.Tensor],
    feats_s: Sequence[torch.Tensor],
    out_size: int | Sequence[int],
) -> list[torch.Tensor]:
    """Per scale ``1 - cos(teacher, student)`` over channels, each resized to ``out_size``.

    Inputs are lists of (B, C_i, h_i, w_i) tensors, one per scale; returns one (B, H, W) tensor
    per scale, before any combination (so callers can weight or pick scales).
    """
    if len(feats_t) != len(feats_s) or not feats_t:
        raise ValueError(
            f"need the same non-zero number of scales, got {len(feats_t)} and {len(feats_s)}"
        )
    maps = []
    for i, (ft, fs) in enumerate(zip(feats_t, feats_s, strict=True)):
        if ft.shape != fs.shape or ft.dim() != 4:
            raise ValueError(f"scale {i}: teacher {tuple(ft.shape)} vs student {tuple(fs.shape)}")
        distance = 1.0 - F.cosine_similarity(ft, fs, dim=1)
        maps.append(resize_maps(distance, out_size))
    return maps


def combine_scales(
    maps: Sequence[torch.Tensor],
    mode: Literal["add", "mean"] = "add",
    divisor: float = 1.0,
) -> torch.Tensor:
    """Sum (``add``) or average (``mean``) same-size per-scale maps, then divide by ``divisor``.

    The released Omni-AD code adds the scales and divides by 9; keeping the divisor explicit
    matters because it rescales every score (AU-ROC etc. do not change, thresholds do).
    """
    if not maps:
        raise ValueError("no maps to combine")
    total = maps[0].clone()
    for m in maps[1:]:  # sequential, as the released code accumulates scales
        total += m
    if mode == "mean":
        total = total / len(maps)
    elif mode != "add":
        raise ValueError(f"mode must be 'add' or 'mean', got {mode!r}")
    return total / divisor


def to_numpy_maps(maps: torch.Tensor) -> np.ndarray:
    """(B, H, W) tensor (any device, grad or not) -> contiguous float32 numpy array."""
    return np.ascontiguousarray(maps.detach().to("cpu", torch.float32).numpy())


def gaussian_smooth(maps: np.ndarray, sigma: float | None = RELEASED_SIGMA) -> np.ndarray:
    """Gaussian filter of each (H, W) map of a (B, H, W) array; sigma 0 or None = no smoothing.

    Uses scipy.ndimage.gaussian_filter with its defaults (truncate 4.0, ``reflect`` borders) on
    the two spatial axes only, i.e. exactly one 2-D filter per map; returns float32.
    """
    arr = np.asarray(maps, dtype=np.float32)
    if arr.ndim != 3:
        raise ValueError(f"maps must be (B, H, W), got {arr.shape}")
    if not sigma:
        return arr
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    return ndimage.gaussian_filter(arr, sigma=(0.0, float(sigma), float(sigma)))


def max_score(maps: np.ndarray) -> np.ndarray:
    """Image score = max of each (H, W) map: (B, H, W) -> (B,)."""
    arr = np.asarray(maps)
    return arr.reshape(arr.shape[0], -1).max(axis=1)


@torch.no_grad()
def cosine_anomaly_map(
    feats_t: Sequence[torch.Tensor],
    feats_s: Sequence[torch.Tensor],
    out_size: int | Sequence[int],
    divisor: float = RELEASED_DIVISOR,
    sigma: float | None = RELEASED_SIGMA,
) -> tuple[np.ndarray, np.ndarray]:
    """The released Omni-AD maps: (B, H, W) float32 smoothed maps and (B,) image scores (max)."""
    per_scale = cosine_distance_maps(feats_t, feats_s, out_size)
    maps = to_numpy_maps(combine_scales(per_scale, mode="add", divisor=divisor))
    smoothed = gaussian_smooth(maps, sigma)
    return smoothed, max_score(smoothed)
