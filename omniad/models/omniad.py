"""Omni-AD, as released (easyoo/Omni-AD @ d85c5f4), with every ablation of the paper a switch.

Read top to bottom: config, token attention, local branch, Omni-block, decoder, neck, model.

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

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from timm.layers import trunc_normal_
from timm.models.resnet import Bottleneck
from torch import nn

from omniad.models.base import ADMethod
from omniad.models.encoder import FrozenEncoder

AttnMode = Literal["self", "q", "kv"]


class OmniADConfig(BaseModel):
    """Every switch of Omni-AD; defaults reproduce the released model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: Literal["resnet18", "resnet34", "resnet50", "wide_resnet50_2"] = "resnet34"
    pretrained: str | bool = "resnet34.bt_in1k"
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

    @field_validator("pretrained", mode="before")
    @classmethod
    def _false_like(cls, v: object) -> object:
        return False if v in (None, "false", "False", "none") else v


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


class PatchExpand(nn.Module):
    """x2 upsampling of a channels-last map: Linear C -> 2C (no bias), pixel-shuffle, LayerNorm."""

    def __init__(self, dim_in: int) -> None:
        super().__init__()
        self.expand = nn.Linear(dim_in, 2 * dim_in, bias=False)
        self.norm = nn.LayerNorm(dim_in // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = self.expand(x).reshape(b, h, w, 2, 2, c // 2)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, c // 2)
        return self.norm(x)


class Decoder(nn.Module):
    """Four stages of Omni-blocks; stages 2-4 open with a PatchExpand. Returns the last three
    stages' outputs, finest first, to match the encoder's scales."""

    def __init__(self, dims: list[int], cfg: OmniADConfig) -> None:
        super().__init__()
        self.ups = nn.ModuleList([nn.Identity()] + [PatchExpand(d) for d in dims[:-1]])
        self.stages = nn.ModuleList(
            nn.Sequential(*(OmniBlock(d, cfg) for _ in range(n)))
            for d, n in zip(dims, cfg.depths, strict=True)
        )
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = x.permute(0, 2, 3, 1)
        outs = []
        for i, (up, stage) in enumerate(zip(self.ups, self.stages, strict=True)):
            x = stage(up(x))
            if i:
                outs.insert(0, x.permute(0, 3, 1, 2))
        return outs


# --------------------------------------------------------------------------------------------
# Neck (as in MambaAD): fuse the three encoder scales into one 2*c3 map at 1/32.
# --------------------------------------------------------------------------------------------
def _conv_bn_relu(cin: int, cout: int, k: int, stride: int = 1, bias: bool = False) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=bias)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FusionNeck(nn.Module):
    """Fuse encoder channels (c1, c2, c3), c2 = 2 c1 and c3 = 2 c2, into one 2 c3 map at 1/32.

    Width rule: every channel constant of the released neck (written for c1 = 64) scaled by
    s = c1 / 64, the Bottlenecks' ``base_width`` (timm's width per group, 64) included. For
    ResNet18/34 (s = 1) this is exactly the released neck: conv3x3 s2 64->128, conv1x1
    128->128, conv3x3 s2 128->256, conv1x1 256->256, conv1x1 256->256, then 3 timm Bottlenecks
    of width 128, the first strided, -> 512. For ResNet50 / WideResNet50-2 (c1 = 256, s = 4) the
    Bottlenecks' inner width becomes 2048 (not 512): the released code cannot build these
    encoders and no public code spells the rule out; it is derived, because it is the only rule
    found (16 tried, measured with fvcore on a minimally patched copy of the released module)
    that gives the paper's Table VII counts, 468M / 114G and 484M / 121G, while leaving
    ResNet18/34 exact.
    """

    def __init__(self, channels: list[int], blocks: int = 3) -> None:
        super().__init__()
        c1, c2, c3 = channels
        if c2 != 2 * c1 or c3 != 2 * c2:
            raise ValueError(f"encoder channels {channels} do not double per stage")
        scale = c1 / 64  # the released neck's constants assume c1 = 64
        self.down1 = _conv_bn_relu(c1, c2, 3, stride=2)
        self.lat2 = _conv_bn_relu(c2, c2, 1, bias=True)
        self.down2 = _conv_bn_relu(c2, c3, 3, stride=2)
        self.lat3 = _conv_bn_relu(c3, c3, 1, bias=True)
        self.fuse = _conv_bn_relu(c3, c3, 1, bias=True)
        planes = c3 // 2
        base_width = round(64 * scale)
        downsample = nn.Sequential(
            nn.Conv2d(c3, planes * Bottleneck.expansion, 1, stride=2, bias=False),
            nn.BatchNorm2d(planes * Bottleneck.expansion),
        )
        layers = [Bottleneck(c3, planes, stride=2, downsample=downsample, base_width=base_width)]
        layers += [Bottleneck(planes * Bottleneck.expansion, planes, base_width=base_width)
                   for _ in range(blocks - 1)]
        self.blocks = nn.Sequential(*layers)
        self.out_channels = planes * Bottleneck.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        f1 = self.lat2(feats[1]) + self.down1(feats[0])
        f2 = self.down2(f1) + self.lat3(feats[2])
        return self.blocks(self.fuse(f2))


def add_jitter(tokens: torch.Tensor, scale: float, prob: float) -> torch.Tensor:
    """UniAD-style feature jitter on (B, N, C) tokens: noise ~ N(0,1) * ||f||_2 / C * scale.

    The noise is drawn (on the CPU generator, then moved, as released) even at scale 0: the
    released model calls this in eval with scale 0, and with the re-drawn FFNs a seeded
    evaluation depends on that draw. At scale 0 the tokens come back unchanged.
    """
    if prob <= 0 or (prob < 1 and torch.rand(()) > prob):
        return tokens
    b, n, c = tokens.shape
    noise = torch.randn((b, n, c)).to(tokens.device, tokens.dtype)
    if scale == 0:
        return tokens
    return tokens + noise * tokens.norm(dim=2, keepdim=True) / c * scale


# --------------------------------------------------------------------------------------------
# The model.
# --------------------------------------------------------------------------------------------
class OmniAD(ADMethod):
    """Frozen encoder -> fusion neck (+ jitter; scale 0 in eval) -> Omni-block decoder."""

    name = "omniad"
    config_class = OmniADConfig
    cfg: OmniADConfig
    cached_backbone = "encoder"  # sees clean images only, once per step

    @classmethod
    def backbone_spec(cls, model: dict) -> dict:
        cfg = cls.config_class.model_validate(model)
        return FrozenEncoder.spec(cfg.backbone, (1, 2, 3), cfg.pretrained)

    def __init__(self, cfg: OmniADConfig | None = None, **overrides: object) -> None:
        super().__init__(cfg, **overrides)
        cfg = self.cfg
        self.encoder = FrozenEncoder(cfg.backbone, (1, 2, 3), cfg.pretrained)
        self.neck = FusionNeck(self.encoder.channels)
        c = self.encoder.channels
        self.decoder = Decoder([self.neck.out_channels, c[2], c[1], c[0]], cfg)

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        feats_t = self.encoder(images)
        z = self.neck(feats_t)
        b, c, h, w = z.shape
        # in eval too, with scale 0 (prob 1), as released: it draws the noise all the same
        scale, prob = (self.cfg.jitter_scale, self.cfg.jitter_prob) if self.training else (0.0, 1.0)
        tokens = add_jitter(z.flatten(2).transpose(1, 2), scale, prob)
        z = tokens.transpose(1, 2).reshape(b, c, h, w)
        return feats_t, self.decoder(z)

    @staticmethod
    def reconstruction_loss(feats_t: list[torch.Tensor], feats_s: list[torch.Tensor]) -> torch.Tensor:
        """Sum over scales of the mean squared error (the released L2Loss)."""
        return sum(F.mse_loss(s, t) for t, s in zip(feats_t, feats_s, strict=True))

    def training_step(self, images: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        feats_t, feats_s = self(images)
        return {"loss": self.reconstruction_loss(feats_t, feats_s)}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        from omniad.anomaly_map import cosine_anomaly_map

        feats_t, feats_s = self(images)
        return cosine_anomaly_map(
            feats_t, feats_s, images.shape[-2:], divisor=self.cfg.map_divisor,
            sigma=self.cfg.map_sigma,
        )
