"""UniAD (NeurIPS'22): reconstruct frozen EfficientNet features with neighbour-masked attention.

Read top to bottom: config, neighbour mask, position embedding, encoder and decoder layers,
model (features, jitter, transformer, map).

Computed, for a 256x256 input (grid g = 256 / 16 = 16, N = g*g tokens, C = 272, d = 256):
  - features: frozen ``tf_efficientnet_b4`` stages 0-3 (24@128, 32@64, 56@32, 160@16), each
    resized bilinear (align_corners) to g x g and concatenated: f (B, 272, g, g), the target.
  - tokens (B, N, 272); in training each gets jitter ``N(0,1) * ||f||_2 / 272 * 20`` (prob 1).
  - Linear 272->d; a learned 2-D position embedding p (column table (g, d/2) then row table
    (g, d/2), concatenated) added to queries and keys only.
  - encoder: 4 post-norm layers, src = LN(src + MHA(src+p, src+p, src)); src = LN(src + FFN(src))
    (FFN d->1024->d, ReLU, dropout 0.1; 8 heads).
  - decoder: 4 post-norm layers, each with its own learned query table Q (N, d):
    t = LN(Q + MHA(Q+p, mem+p, mem)); t = LN(t + MHA(t+p, out+p, out)); t = LN(t + FFN(t)),
    with mem = encoder output and out = previous decoder output (mem for the first); final LN.
  - Linear d->272 -> reconstruction r; loss MSE(r, f).
  - map: sqrt(sum_c (r - f)^2) at g x g, bilinear (align_corners) x16 to the input; no Gaussian.
    Image score: max of the map after a ``score_pool`` x ``score_pool`` stride-1 average pool.

Other backbones: the official code also ships ResNets; ``backbone: resnet18 | resnet34 |
wide_resnet50_2`` fuses their stages 1-3 (strides 4-16) the same way (``out_indices`` to choose).

Every attention (encoder, both decoder ones) uses the same neighbour mask: query i may not see
the keys in the k x k window centred on it, clipped at the borders (:func:`neighbour_mask`).

Window and pool at other sizes. The official code hides 7x7 at 14x14 (224 px); ADer, whose
multi-class protocol Table I follows, asks for ``neighbor_size = size // 32`` = 8 at 256 px,
which the mask builder turns into a 9x9 window (it spans n//2 cells on each side). ``window:
null`` applies that same rule, ``k = 2 * ((image_size // 32) // 2) + 1``: 9 at 256, 7 at 224
(the official value), 3 at 64 (the demo: 3x3 hidden out of a 4x4 grid). ``score_pool: null``
keeps ADer's 16x16 pool as the same fraction of the image side, ``image_size // 16`` (4 at 64).
The query tables and the position embedding are sized for ``image_size``, so inputs must have
that size.

Size: 24.52M parameters (16.74M frozen b4 blocks, all of them as in the official count, + 7.78M
trained), 3.36 GFLOPs at 256 px. Attention is ``nn.MultiheadAttention`` as in the official code,
so fvcore counts its projections and attn @ v but not the masked q @ k^T (a ``baddbmm``), which
is how the official 3.36G was counted too.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from omniad.models.encoder import FrozenEncoder, Pretrained
from omniad.models.frozen_encoder import FrozenEncoderMethod
from omniad.models.layers.jitter import add_jitter

STRIDE = 16


class UniADConfig(BaseModel):
    """UniAD switches; defaults reproduce ADer's multi-class model at 256 px (Table I)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: Literal["tf_efficientnet_b4", "resnet18", "resnet34", "wide_resnet50_2"] = "tf_efficientnet_b4"
    pretrained: Pretrained = "tf_efficientnet_b4.aa_in1k"
    out_indices: tuple[int, ...] | None = None
    image_size: int = Field(256, gt=0)
    window: int | None = None
    hidden_dim: int = Field(256, gt=0)
    heads: int = Field(8, gt=0)
    encoder_layers: int = Field(4, ge=1)
    decoder_layers: int = Field(4, ge=1)
    ffn_dim: int = Field(1024, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    jitter_scale: float = Field(20.0, ge=0)
    jitter_prob: float = Field(1.0, ge=0, le=1)
    score_pool: int | None = None

    @model_validator(mode="after")
    def _consistent(self) -> UniADConfig:
        if self.image_size % STRIDE:
            raise ValueError(f"image_size must be a multiple of {STRIDE}, got {self.image_size}")
        g = self.grid
        if not 1 <= self.window_size < g or self.window_size % 2 == 0:
            raise ValueError(f"window must be odd and in [1, {g - 1}] for a {g}x{g} grid (a larger "
                             f"one hides every key), got {self.window_size}")
        if not 1 <= self.pool_size <= self.image_size:
            raise ValueError(f"score_pool must be in [1, image_size], got {self.pool_size}")
        if self.hidden_dim % self.heads or self.hidden_dim % 2:
            raise ValueError(f"hidden_dim {self.hidden_dim} must be even and divisible by heads")
        return self

    @property
    def stages(self) -> tuple[int, ...]:
        """Backbone stages: UniAD's four EfficientNet stages (strides 2-16), else ResNet stages 1-3."""
        if self.out_indices is not None:
            return self.out_indices
        return (0, 1, 2, 3) if self.backbone.startswith("tf_efficientnet") else (1, 2, 3)

    @property
    def grid(self) -> int:
        return self.image_size // STRIDE

    @property
    def window_size(self) -> int:
        return self.window if self.window is not None else 2 * ((self.image_size // 32) // 2) + 1

    @property
    def pool_size(self) -> int:
        return self.score_pool if self.score_pool is not None else max(1, self.image_size // 16)


# --------------------------------------------------------------------------------------------
# Neighbour mask and position embedding.
# --------------------------------------------------------------------------------------------
def neighbour_mask(h: int, w: int, k: int) -> torch.Tensor:
    """(h*w, h*w) bool mask, True = hidden: query (i, j) hides keys with |di|, |dj| <= k // 2.

    Row-major token order (index = row * w + col). The window is clipped at the borders, so a
    corner query hides (k//2 + 1)^2 keys. ``nn.MultiheadAttention`` reads True as not allowed.
    """
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    near_r = (rows[:, None] - rows[None, :]).abs() <= k // 2
    near_c = (cols[:, None] - cols[None, :]).abs() <= k // 2
    return near_r & near_c


class LearnedPositionEmbedding(nn.Module):
    """Row and column tables of width d/2; token (r, c) gets cat(col[c], row[r]). Uniform init."""

    def __init__(self, h: int, w: int, dim: int) -> None:
        super().__init__()
        self.h, self.w = h, w
        self.row = nn.Parameter(torch.rand(h, dim // 2))
        self.col = nn.Parameter(torch.rand(w, dim // 2))

    def forward(self) -> torch.Tensor:
        """(h*w, dim), row-major."""
        col = self.col[None].expand(self.h, -1, -1)
        row = self.row[:, None].expand(-1, self.w, -1)
        return torch.cat([col, row], dim=-1).flatten(0, 1)


# --------------------------------------------------------------------------------------------
# Transformer layers (post-norm, batch first).
# --------------------------------------------------------------------------------------------
class FeedForward(nn.Sequential):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                         nn.Linear(hidden, dim))


class EncoderLayer(nn.Module):
    """src = LN(src + MHA(src+p, src+p, src)); src = LN(src + FFN(src))."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = FeedForward(dim, ffn_dim, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        qk = src + pos
        src = self.norm1(src + self.drop1(self.attn(qk, qk, src, attn_mask=mask)[0]))
        return self.norm2(src + self.drop2(self.ffn(src)))


class DecoderLayer(nn.Module):
    """Learned queries attend to the encoder output, then to the previous decoder output."""

    def __init__(self, tokens: int, dim: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(tokens, dim))  # nn.Embedding's N(0, 1) init
        self.attn1 = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.attn2 = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = FeedForward(dim, ffn_dim, dropout)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim) for _ in range(3))
        self.drop1, self.drop2, self.drop3 = (nn.Dropout(dropout) for _ in range(3))

    def forward(self, out: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        tgt = self.queries[None].expand(memory.shape[0], -1, -1)
        a = self.attn1(tgt + pos, memory + pos, memory, attn_mask=mask)[0]
        tgt = self.norm1(tgt + self.drop1(a))
        a = self.attn2(tgt + pos, out + pos, out, attn_mask=mask)[0]
        tgt = self.norm2(tgt + self.drop2(a))
        return self.norm3(tgt + self.drop3(self.ffn(tgt)))


class Transformer(nn.Module):
    """Encoder then decoder over (B, N, d) tokens, all attentions neighbour-masked."""

    def __init__(self, cfg: UniADConfig) -> None:
        super().__init__()
        g, d = cfg.grid, cfg.hidden_dim
        self.pos = LearnedPositionEmbedding(g, g, d)
        self.encoder = nn.ModuleList(
            EncoderLayer(d, cfg.heads, cfg.ffn_dim, cfg.dropout) for _ in range(cfg.encoder_layers)
        )
        self.decoder = nn.ModuleList(
            DecoderLayer(g * g, d, cfg.heads, cfg.ffn_dim, cfg.dropout)
            for _ in range(cfg.decoder_layers)
        )
        self.norm = nn.LayerNorm(d)
        self.register_buffer("mask", neighbour_mask(g, g, cfg.window_size), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = self.pos()[None]
        memory = tokens
        for layer in self.encoder:
            memory = layer(memory, pos, self.mask)
        out = memory
        for layer in self.decoder:
            out = layer(out, memory, pos, self.mask)
        return self.norm(out)


# --------------------------------------------------------------------------------------------
# The model.
# --------------------------------------------------------------------------------------------
class UniAD(FrozenEncoderMethod):
    """Frozen multi-scale features -> jitter -> neighbour-masked transformer -> reconstruction."""

    name = "uniad"
    config_class = UniADConfig
    cfg: UniADConfig
    encoder: FrozenEncoder

    @classmethod
    def encoder_stages(cls, cfg: UniADConfig) -> tuple[int, ...]:
        return cfg.stages

    def __init__(self, cfg: UniADConfig | None = None, **overrides: object) -> None:
        super().__init__(cfg, **overrides)
        cfg = self.cfg
        if max(self.encoder.reductions) != STRIDE:
            raise ValueError(f"UniAD fuses features at stride {STRIDE}; stages {cfg.stages} of "
                             f"{cfg.backbone} reach {max(self.encoder.reductions)}")
        channels = sum(self.encoder.channels)
        self.input_proj = nn.Linear(channels, cfg.hidden_dim)
        self.transformer = Transformer(cfg)
        self.output_proj = nn.Linear(cfg.hidden_dim, channels)
        for m in [self.input_proj, self.output_proj, *self.transformer.modules()]:
            if isinstance(m, nn.Linear):  # official: xavier-uniform Linear weights, zero biases
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 272, g, g): every stage resized to stride 16 and concatenated (the target)."""
        g = self.cfg.grid
        if images.shape[-2:] != (self.cfg.image_size, self.cfg.image_size):
            raise ValueError(f"UniAD is built for {self.cfg.image_size}px inputs (query tables of "
                             f"{g}x{g}), got {tuple(images.shape[-2:])}; set image_size")
        return torch.cat([
            F.interpolate(f, size=(g, g), mode="bilinear", align_corners=True)
            for f in self.encoder(images)
        ], dim=1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(target features, reconstruction), both (B, 272, g, g)."""
        feats = self.features(images)
        b, c, h, w = feats.shape
        tokens = feats.flatten(2).transpose(1, 2)
        if self.training:
            tokens = add_jitter(tokens, self.cfg.jitter_scale, self.cfg.jitter_prob)
        rec = self.output_proj(self.transformer(self.input_proj(tokens)))
        return feats, rec.transpose(1, 2).reshape(b, c, h, w)

    def training_step(self, images: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        feats, rec = self(images)
        return {"loss": F.mse_loss(rec, feats)}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        from omniad.anomaly_map import resize_maps, to_numpy_maps

        feats, rec = self(images)
        maps = resize_maps(((rec - feats) ** 2).sum(dim=1).sqrt(), images.shape[-2:]).float()
        pooled = F.avg_pool2d(maps[:, None], self.cfg.pool_size, stride=1)
        return to_numpy_maps(maps), to_numpy_maps(pooled.flatten(1).amax(dim=1))
