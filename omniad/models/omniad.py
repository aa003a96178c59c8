"""Omni-AD, as released (easyoo/Omni-AD @ d85c5f4), with every ablation of the paper a switch.

Read top to bottom: config, token attention, local branch, Omni-block, decoder, model (the
fusion neck, patch-expand and jitter it shares with other methods are in ``models/layers``).

Shapes: the decoder works channels-last, ``x`` is (B, H, W, C), N = H*W input tokens, T learnable
tokens (a perfect square, t = sqrt(T)), h heads of width C/h. Each attention slot computes
``softmax(q k^T / sqrt(C/h)) + bias`` (the learnable bias is added AFTER the softmax, as
released), multiplies by v, merges heads and applies the slot's FFN (see ``ffn``).

The two attention slots of the global branch (``attention = (first, second)``):

slot 1, input x:
  - ``q``    (released): q = Wq(tokens1) (T), k, v = Wkv(x) (N); attention T x N; bias (h, T, 1);
    output T tokens reshaped to a t x t grid, resized to H x W (nearest), then ``a1 = out + x``.
  - ``kv``:  q = Wq(x) (N), k, v = Wkv(tokens1) (T); attention N x T; bias (h, 1, T);
    ``a1 = out + x``.
  - ``self``: q = Wq(x), k, v = Wkv(x); attention N x N; no bias; ``a1 = out + x``.
slot 2, input a1:
  - ``kv``   (released): q = Wq2(a1) (N), k, v = Wkv2(tokens2) (T); bias (h, 1, T); out (N).
  - ``q``:   q = Wq2(tokens2) (T), k, v = Wkv2(a1) (N); bias (h, T, 1); out resized as in slot 1.
  - ``self``: q = Wq2(a1), k, v = Wkv2(a1); no bias; out (N).
  global = out2 + a1 + x   (= A2 + A1_up + 2x for the released (q, kv)).

Each slot owns its tokens and bias (zero-initialised, as released). Table II reads "learnable
query only" as (q, self), a choice the paper does not spell out; the report says so.

``ffn``: ``resampled`` (released) builds a default-initialised Linear-SiLU-Linear on every call,
never registered nor trained, so it is not in the parameter count and the output is random
once the tokens are non-zero; ``learned`` registers and trains it; ``none`` drops it.

Local branch: depthwise k x k conv (k = 3 and 5 in parallel), each + InstanceNorm + SiLU, then
1x1 conv + IN + SiLU; concat; 1x1 conv 2C -> C + IN + SiLU (InstanceNorm non-affine).
Combine: ``x + l2(SiLU(IN(l(global + local))))``; a disabled branch is left out of the sum.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from omniad.models.encoder import Pretrained
from omniad.models.feature_reconstruction import FeatureReconstructionMethod
from omniad.models.layers.decoder import StagedDecoder, init_linear_and_norm
from omniad.models.layers.jitter import add_jitter
from omniad.models.layers.patch_expand import PatchExpand

AttnMode = Literal["self", "q", "kv"]


class OmniADConfig(BaseModel):
    """Every switch of Omni-AD; defaults reproduce the released model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: Literal["resnet18", "resnet34", "resnet50", "wide_resnet50_2"] = "resnet34"
    pretrained: Pretrained = "resnet34.bt_in1k"
    depths: tuple[int, int, int, int] = (3, 9, 9, 7)
    tokens: int = 64
    heads: int = 8
    branches: Literal["both", "global", "local"] = "both"
    attention: tuple[AttnMode, AttnMode] = ("q", "kv")
    ffn: Literal["resampled", "learned", "none"] = "resampled"
    jitter_scale: float = Field(20.0, ge=0)
    jitter_prob: float = Field(1.0, ge=0, le=1)
    map_divisor: float = Field(9.0, gt=0)
    map_sigma: float = Field(4.0, ge=0)

    @field_validator("depths")
    @classmethod
    def _positive_depths(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(d < 1 for d in v):
            raise ValueError(f"depths must be four positive ints, got {list(v)}")
        return v

    @field_validator("tokens")
    @classmethod
    def _square_tokens(cls, v: int) -> int:
        if v < 1 or math.isqrt(v) ** 2 != v:
            raise ValueError(f"tokens must be a perfect square (16, 36, 64, 100, ...), got {v}")
        return v


# --------------------------------------------------------------------------------------------
# Global branch: one attention slot with optional learnable tokens.
# --------------------------------------------------------------------------------------------
def resampled_ffn(x: torch.Tensor) -> torch.Tensor:
    """The released FFN: Linear-SiLU-Linear with fresh default init on every call (untrained).

    Built on the CPU generator in the released order (fc1 weight, fc1 bias, fc2 ...) and moved,
    as the released ``Mlp(...).to(device)`` does, so the RNG stream matches it.
    """
    dim = x.shape[-1]
    fc1, fc2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
    w1, b1, w2, b2 = (t.detach().to(x.device, x.dtype) for t in (*fc1.parameters(), *fc2.parameters()))
    return F.linear(F.silu(F.linear(x, w1, b1)), w2, b2)


class TokenAttention(nn.Module):
    """One MHA slot: q from tokens or input, k/v from tokens or input (see module docstring)."""

    def __init__(self, dim: int, heads: int, mode: AttnMode, tokens: int, ffn: str) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.mode, self.heads, self.n_tokens, self.ffn_mode = mode, heads, tokens, ffn
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        if mode != "self":
            self.tokens = nn.Parameter(torch.zeros(1, tokens, dim))
            shape = (1, heads, tokens, 1) if mode == "q" else (1, heads, 1, tokens)
            # named `pe` (released: pe1 / pe2), not `bias`: the weight-decay rule exempts
            # 1-D params and names ending in ".bias", so the released 4-D biases ARE decayed
            self.pe = nn.Parameter(torch.zeros(shape))
        if ffn == "learned":
            self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, c = t.shape
        return t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C), the attention output before any residual."""
        b, h, w, c = x.shape
        seq = x.reshape(b, h * w, c)
        tok = self.tokens.expand(b, -1, -1) if self.mode != "self" else None
        q_src = tok if self.mode == "q" else seq
        kv_src = tok if self.mode == "kv" else seq
        q = self._split(self.q(q_src))
        k, v = (self._split(t) for t in self.kv(kv_src).chunk(2, dim=-1))
        attn = (q @ k.transpose(-1, -2) * (c // self.heads) ** -0.5).softmax(-1)
        if self.mode != "self":
            attn = attn + self.pe
        out = (attn @ v).transpose(1, 2).reshape(b, -1, c)
        if self.ffn_mode == "resampled":
            out = resampled_ffn(out)
        elif self.ffn_mode == "learned":
            out = self.ffn(out)
        if self.mode == "q":
            t = math.isqrt(self.n_tokens)
            grid = out.reshape(b, t, t, c).permute(0, 3, 1, 2)
            return F.interpolate(grid, size=(h, w), mode="nearest").permute(0, 2, 3, 1)
        return out.reshape(b, h, w, c)


class GlobalBranch(nn.Module):
    """Two attention slots in series: a1 = A1(x) + x; global = A2(a1) + a1 + x."""

    def __init__(self, dim: int, cfg: OmniADConfig) -> None:
        super().__init__()
        self.attn1 = TokenAttention(dim, cfg.heads, cfg.attention[0], cfg.tokens, cfg.ffn)
        self.attn2 = TokenAttention(dim, cfg.heads, cfg.attention[1], cfg.tokens, cfg.ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a1 = self.attn1(x) + x
        return self.attn2(a1) + a1 + x


# --------------------------------------------------------------------------------------------
# Local branch: parallel depthwise-separable convolutions.
# --------------------------------------------------------------------------------------------
def _conv_in_silu(cin: int, cout: int, k: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups), nn.InstanceNorm2d(cout), nn.SiLU()
    )


class DepthwiseSeparable(nn.Sequential):
    """Depthwise k x k (+IN+SiLU) then pointwise 1x1 (+IN+SiLU)."""

    def __init__(self, dim: int, k: int) -> None:
        super().__init__(_conv_in_silu(dim, dim, k, groups=dim), _conv_in_silu(dim, dim, 1))


class LocalBranch(nn.Module):
    """k=3 and k=5 depthwise-separable paths, concatenated and fused 2C -> C. NCHW in and out."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dw3 = DepthwiseSeparable(dim, 3)
        self.dw5 = DepthwiseSeparable(dim, 5)
        self.fuse = _conv_in_silu(2 * dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([self.dw3(x), self.dw5(x)], dim=1))


# --------------------------------------------------------------------------------------------
# Omni-block and decoder.
# --------------------------------------------------------------------------------------------
def _instance_norm_cl(x: torch.Tensor) -> torch.Tensor:
    """Non-affine InstanceNorm2d on a channels-last tensor."""
    return F.instance_norm(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class OmniBlock(nn.Module):
    """x + l2(SiLU(IN(l(global(x) + local(x)))))."""

    def __init__(self, dim: int, cfg: OmniADConfig) -> None:
        super().__init__()
        self.global_branch = GlobalBranch(dim, cfg) if cfg.branches != "local" else None
        self.local_branch = LocalBranch(dim) if cfg.branches != "global" else None
        self.l = nn.Linear(dim, dim)
        self.l2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = 0
        if self.global_branch is not None:
            mixed = self.global_branch(x)
        if self.local_branch is not None:
            mixed = mixed + self.local_branch(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.l2(F.silu(_instance_norm_cl(self.l(mixed))))


class Decoder(StagedDecoder):
    """Four stages of Omni-blocks; stages 2-4 open with a PatchExpand. Returns the last three
    stages' outputs, finest first, to match the encoder's scales."""

    def __init__(self, dims: list[int], cfg: OmniADConfig) -> None:
        super().__init__()
        self.ups = nn.ModuleList([nn.Identity()] + [PatchExpand(d) for d in dims[:-1]])
        self.stages = nn.ModuleList(
            nn.Sequential(*(OmniBlock(d, cfg) for _ in range(n)))
            for d, n in zip(dims, cfg.depths, strict=True)
        )
        self.apply(init_linear_and_norm)


# --------------------------------------------------------------------------------------------
# The model.
# --------------------------------------------------------------------------------------------
class OmniAD(FeatureReconstructionMethod):
    """Frozen encoder -> fusion neck (+ jitter; scale 0 in eval) -> Omni-block decoder."""

    name = "omniad"
    config_class = OmniADConfig
    cfg: OmniADConfig
    decoder_class = Decoder

    def bottleneck(self, z: torch.Tensor) -> torch.Tensor:
        b, c, h, w = z.shape
        # in eval too, with scale 0 (prob 1), as released: it draws the noise all the same
        scale, prob = (self.cfg.jitter_scale, self.cfg.jitter_prob) if self.training else (0.0, 1.0)
        tokens = add_jitter(z.flatten(2).transpose(1, 2), scale, prob)
        return tokens.transpose(1, 2).reshape(b, c, h, w)
