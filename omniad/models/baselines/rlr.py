"""RLR (ECCV'24): reconstruct features from a learnable reference, not from the input itself.

Read top to bottom: config, window masks, 2-D sinusoidal encoding, layer, per-level network,
model (features, jitter, loss, map).

Computed, for a 256x256 input, per feature level l (frozen ``tf_efficientnet_b6`` stages 2 and
3: C = 72 @ 32x32 and 200 @ 16x16; grid g, N = g*g tokens, width d = 256 and 512):
  - target f: the stage's map after a 3x3 stride-1 average pool (zero padding counted), as
    (B, N, C) tokens; in training the input is f + ``N(0,1) * ||f||_2 / C * 4`` on every token.
  - x = Linear(C->d)(input) + P, with P a fixed 2-D sinusoidal encoding (first d/2 channels
    encode the column, the last d/2 the row; sin on even, cos on odd channels); a 1x1 conv over
    tokens is this Linear.
  - reference R: a parameter (1, N, C) in feature space, shared by every image and class;
    r = Linear'(C->d)(R) + P with its own embedding.
  - 4 layers, each: MCA = MHA(q=x, k=r, v=r) where query i sees only the keys in the k x k
    window around i; NSA = MHA(q=x, k=r, v=x) where query i sees only the keys OUTSIDE that
    window; x = LN(2 * MCA + NSA) (no residual from the layer input); x = LN(x + FFN(x))
    (FFN d->4d->d, GELU, no dropout; 8 heads).
  - out = Linear(d->C)(LN(x)); loss per level = MSE(out, f) + mean(1 - cos_C(out, f)).
    ``stepping: per_level`` (released): the official loop runs zero_grad / backward / step once
    per level on one shared Adam, under torch 1.12.1, whose ``zero_grad()`` leaves zero tensors:
    each step also moves the other level's parameters by momentum alone, and Adam's step count
    is about twice that of one step on the sum. ``stepping: summed`` is that loop under
    torch >= 2 (zero_grad sets None) = one step on the summed loss.
  - map per level: mean_C (f - out)^2 + 1 - cos_C(f, out) at g x g, bilinear (align_corners) to
    the input, averaged over levels. The official code scores pixels on this map as is; the
    image score is the max of the map after a Gaussian of sigma ``map_sigma`` (4 at 256 px).

Windows: the official code picks 5x5 at 16x16, 7x7 at 32x32, 11x11 at 64x64 (``windows: null``
uses that table); other grids need explicit ``windows`` (the demo's 8x8 and 4x4 at 64 px use 5x5
and 3x3: NSA then never sees a key whose 3x3 pooling support overlaps the query's, where that
fits, and always sees some key).
The reference and the encodings are sized for ``image_size``, so inputs must have that size.

Size: 60.92M parameters (39.40M frozen b6 blocks + 21.51M trained), 13.85 GFLOPs at 256 px with
fvcore, which (as for the official ``nn.MultiheadAttention``) does not count the masked q @ k^T.
Training for the paper: Adam lr 1e-4, batch 4, 200 epochs, seed 3407; the official code keeps
the epoch with the best image AU-ROC on the test set, we report the last epoch instead.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from omniad.models.encoder import FrozenEncoder, Pretrained
from omniad.models.frozen_encoder import FrozenEncoderMethod
from omniad.models.layers.jitter import add_jitter

#: The official window per grid side (models/model.py, generate_mask).
OFFICIAL_WINDOWS: dict[int, int] = {16: 5, 32: 7, 64: 11}


class RLRConfig(BaseModel):
    """RLR switches; defaults reproduce the official model (2 levels of tf_efficientnet_b6)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: Literal["tf_efficientnet_b6", "wide_resnet50_2"] = "tf_efficientnet_b6"
    pretrained: Pretrained = "tf_efficientnet_b6.aa_in1k"
    out_indices: tuple[int, ...] = (2, 3)
    image_size: int = Field(256, gt=0)
    windows: tuple[int, ...] | None = None
    heads: int = Field(8, gt=0)
    layers: int = Field(4, ge=1)
    ffn_scale: int = Field(4, ge=1)
    jitter_scale: float = Field(4.0, ge=0)
    map_sigma: float = Field(4.0, ge=0)
    stepping: Literal["per_level", "summed"] = "per_level"  # see the module docstring

    @field_validator("out_indices")
    @classmethod
    def _levels(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(i < 1 for i in v):
            raise ValueError(f"out_indices must be stage indices >= 1, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _windows_fit(self) -> RLRConfig:
        grids = self.grids
        if any(self.image_size % (2 ** (i + 1)) for i in self.out_indices):
            raise ValueError(f"image_size {self.image_size} is not divisible by every level's stride")
        if self.windows is None:
            missing = [g for g in grids if g not in OFFICIAL_WINDOWS]
            if missing:
                raise ValueError(f"no official window for grids {missing} (known: "
                                 f"{OFFICIAL_WINDOWS}); set windows, one odd size per level")
        elif len(self.windows) != len(grids) or any(
            k % 2 == 0 or not 1 <= k < g for k, g in zip(self.windows, grids, strict=True)
        ):
            raise ValueError(f"windows must give one odd size in [1, grid) per level (grids "
                             f"{grids}; a window as large as the grid leaves NSA no key), got "
                             f"{list(self.windows)}")
        for d in self.widths:
            if d % self.heads or d % 4:
                raise ValueError(f"width {d} must be divisible by 4 and by heads {self.heads}")
        return self

    @property
    def grids(self) -> list[int]:
        """Grid side per level: the official ``inp_size // 2 ** (i + 1)``."""
        return [self.image_size // 2 ** (i + 1) for i in self.out_indices]

    @property
    def widths(self) -> list[int]:
        """Width per level: the official ``128 * 2 ** (i - 1)`` (256 for stage 2, 512 for 3)."""
        return [128 * 2 ** (i - 1) for i in self.out_indices]

    @property
    def window_sizes(self) -> list[int]:
        return list(self.windows) if self.windows is not None else [OFFICIAL_WINDOWS[g] for g in self.grids]


# --------------------------------------------------------------------------------------------
# Window masks (True = hidden, nn.MultiheadAttention's convention).
# --------------------------------------------------------------------------------------------
def window(h: int, w: int, k: int) -> torch.Tensor:
    """(h*w, h*w) bool, True where key j lies in the k x k window around query i (clipped)."""
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    return (((rows[:, None] - rows[None, :]).abs() <= k // 2)
            & ((cols[:, None] - cols[None, :]).abs() <= k // 2))


def mca_mask(h: int, w: int, k: int) -> torch.Tensor:
    """MCA hides every key outside the window: each query sees only its neighbourhood."""
    return ~window(h, w, k)


def nsa_mask(h: int, w: int, k: int) -> torch.Tensor:
    """NSA hides every key inside the window: each query sees only what is far from it."""
    return window(h, w, k)


def sincos_2d(h: int, w: int, dim: int) -> torch.Tensor:
    """(h*w, dim) fixed encoding, row-major: channels [0, dim/2) the column, [dim/2, dim) the row.

    Within each half, even channels are sin(pos * f_j) and odd ones cos(pos * f_j), with
    f_j = 10000^(-2j / (dim/2)).
    """
    half = dim // 2
    freq = torch.exp(torch.arange(0, half, 2, dtype=torch.float32) * -(math.log(1e4) / half))
    enc = torch.zeros(h, w, dim)
    col = torch.arange(w, dtype=torch.float32)[:, None] * freq  # (w, half/2)
    row = torch.arange(h, dtype=torch.float32)[:, None] * freq  # (h, half/2)
    enc[:, :, 0:half:2] = torch.sin(col)[None]
    enc[:, :, 1:half:2] = torch.cos(col)[None]
    enc[:, :, half::2] = torch.sin(row)[:, None]
    enc[:, :, half + 1::2] = torch.cos(row)[:, None]
    return enc.reshape(h * w, dim)


# --------------------------------------------------------------------------------------------
# One layer and one level's reconstruction network.
# --------------------------------------------------------------------------------------------
class ReferenceLayer(nn.Module):
    """x = LN(2 * MCA(x, r, r) + NSA(x, r, x)); x = LN(x + FFN(x))."""

    def __init__(self, dim: int, heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.mca = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.nsa = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, dim))
        self.norm2 = nn.LayerNorm(dim)

    def attend(self, x: torch.Tensor, ref: torch.Tensor, mca: torch.Tensor,
               nsa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two attention outputs, apart (so tests can probe what each query sees)."""
        return (self.mca(x, ref, ref, attn_mask=mca)[0],
                self.nsa(x, ref, x, attn_mask=nsa)[0])

    def forward(self, x: torch.Tensor, ref: torch.Tensor, mca: torch.Tensor,
                nsa: torch.Tensor) -> torch.Tensor:
        a_mca, a_nsa = self.attend(x, ref, mca, nsa)
        x = self.norm1(2 * a_mca + a_nsa)
        return self.norm2(x + self.ffn(x))


def _embedding(cin: int, dim: int) -> nn.Linear:
    """Token-wise 1x1 conv C -> d, kaiming-normal (fan_in, leaky_relu) as the official one."""
    layer = nn.Linear(cin, dim)
    nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="leaky_relu")
    return layer


class LevelReconstructor(nn.Module):
    """(B, N, C) tokens -> (B, N, C) reconstruction, from the level's learnable reference."""

    def __init__(self, channels: int, dim: int, grid: int, window_size: int, heads: int,
                 layers: int, ffn_scale: int) -> None:
        super().__init__()
        self.embed = _embedding(channels, dim)
        self.reference = nn.Parameter(torch.randn(1, grid * grid, channels))
        self.ref_embed = _embedding(channels, dim)
        self.layers = nn.ModuleList(ReferenceLayer(dim, heads, dim * ffn_scale) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, channels)
        self.register_buffer("pos", sincos_2d(grid, grid, dim)[None], persistent=False)
        self.register_buffer("mca_mask", mca_mask(grid, grid, window_size), persistent=False)
        self.register_buffer("nsa_mask", nsa_mask(grid, grid, window_size), persistent=False)

    def embed_reference(self, batch: int) -> torch.Tensor:
        return (self.ref_embed(self.reference) + self.pos).expand(batch, -1, -1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos
        ref = self.embed_reference(tokens.shape[0])
        for layer in self.layers:
            x = layer(x, ref, self.mca_mask, self.nsa_mask)
        return self.proj(self.norm(x))


# --------------------------------------------------------------------------------------------
# The model.
# --------------------------------------------------------------------------------------------
def level_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE + mean(1 - cosine over channels), on (B, N, C) tokens."""
    return F.mse_loss(out, target) + (1 - F.cosine_similarity(out, target, dim=-1)).mean()


class RLR(FrozenEncoderMethod):
    """Frozen features -> per level, reconstruction from a learnable reference -> error map."""

    name = "rlr"
    config_class = RLRConfig
    cfg: RLRConfig
    encoder: FrozenEncoder

    @classmethod
    def encoder_stages(cls, cfg: RLRConfig) -> tuple[int, ...]:
        return cfg.out_indices

    def __init__(self, cfg: RLRConfig | None = None, **overrides: object) -> None:
        super().__init__(cfg, **overrides)
        cfg = self.cfg
        self.levels = nn.ModuleList(
            LevelReconstructor(c, d, g, k, cfg.heads, cfg.layers, cfg.ffn_scale)
            for c, d, g, k in zip(self.encoder.channels, cfg.widths, cfg.grids, cfg.window_sizes,
                                  strict=True)
        )

    def targets(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per level (B, N, C) tokens of the 3x3 average-pooled frozen features."""
        size = self.cfg.image_size
        if images.shape[-2:] != (size, size):
            raise ValueError(f"RLR is built for {size}px inputs (references of {self.cfg.grids} "
                             f"grids), got {tuple(images.shape[-2:])}; set image_size")
        return [F.avg_pool2d(f, 3, stride=1, padding=1).flatten(2).transpose(1, 2)
                for f in self.encoder(images)]

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(targets, reconstructions), one (B, N, C) pair per level."""
        targets = self.targets(images)
        return targets, [net(self.jitter(t)) for net, t in zip(self.levels, targets, strict=True)]

    def jitter(self, target: torch.Tensor) -> torch.Tensor:
        """Training input of one level (the official code skips the draw at scale 0)."""
        if self.training and self.cfg.jitter_scale > 0:
            return add_jitter(target, self.cfg.jitter_scale, 1.0)
        return target

    def training_step(self, images: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        targets, outs = self(images)
        losses = [level_loss(o, t) for o, t in zip(outs, targets, strict=True)]
        return {"loss": sum(losses), **{f"loss_l{i}": loss.detach() for i, loss in enumerate(losses)}}

    def optimization_step(self, images: torch.Tensor, step: int,
                          optimizers: list[torch.optim.Optimizer], clip: float | None,
                          autocast: Callable[[], contextlib.AbstractContextManager]
                          ) -> dict[str, torch.Tensor]:
        """``per_level``: the official loop, one zero_grad / backward / step per level with
        torch-1.12 ``zero_grad`` (gradients zeroed, not freed: Adam steps every parameter that
        ever had a gradient). The jitter is drawn level by level, as there; the networks draw
        nothing else, so the RNG stream matches ``training_step``'s."""
        if self.cfg.stepping == "summed":
            return super().optimization_step(images, step, optimizers, clip, autocast)
        with autocast():
            targets = self.targets(images)
        losses = []
        for net, t in zip(self.levels, targets, strict=True):
            with autocast():
                loss = level_loss(net(self.jitter(t)), t)
            for o in optimizers:
                o.zero_grad(set_to_none=False)
            loss.backward()
            if clip:
                for group in self.clip_groups():
                    torch.nn.utils.clip_grad_norm_(group, float(clip))
            for o in optimizers:
                o.step()
            losses.append(loss.detach())
        return {"loss": sum(losses), **{f"loss_l{i}": v for i, v in enumerate(losses)}}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        from omniad.anomaly_map import (
            combine_scales,
            gaussian_smooth,
            max_score,
            resize_maps,
            to_numpy_maps,
        )

        targets, outs = self(images)
        per_level = []
        for t, o, g in zip(targets, outs, self.cfg.grids, strict=True):
            err = ((t - o) ** 2).mean(dim=-1) + 1 - F.cosine_similarity(t, o, dim=-1)
            per_level.append(resize_maps(err.reshape(-1, g, g).float(), images.shape[-2:]))
        maps = to_numpy_maps(combine_scales(per_level, mode="mean"))
        return maps, max_score(gaussian_smooth(maps, self.cfg.map_sigma))
