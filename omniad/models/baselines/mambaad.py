"""MambaAD (NeurIPS'24) with a pure-PyTorch selective scan, as released (lewandofskee/MambaAD).

Read top to bottom: config, selective scan (sequential reference, then the fast chunked form),
Hilbert scan orders, SS2D, HSS block, locality-enhanced state-space (LSS) module, decoder, model.

Computed, for a 256x256 input:
  - encoder: frozen timm ResNet34 stages 1-3 (64@64, 128@32, 256@16), features detached.
  - neck: Omni-AD's fusion neck (the same MFF_OCE as MambaAD's) -> 512@8x8.
  - decoder: four stages of widths 512/256/128/64 on grids 8/16/32/64, stages 2-4 opening with
    a PatchExpand (Linear C->2C, pixel shuffle x2, LayerNorm). A stage of depth d is d//3 LSS
    modules of 3 HSS blocks when d % 3 == 0, else d//2 modules of 2 (depths 3-4-6-3 -> 1x3,
    2x2, 2x3, 1x3). The last three stages are the student features (finest first).
  - LSS module (channels-last x): ``x + conv1x1_3C->C(cat[HSS chain(x), local5(x), local7(x)])``
    with ``localk = 1x1 conv IN SiLU -> depthwise kxk (no bias) IN SiLU -> 1x1 conv IN SiLU``.
  - HSS block: ``x + DropPath(SS2D(LN(x)))``. SS2D(C): in_proj C->4C (no bias) split (x, z);
    x: depthwise 3x3 + SiLU; the map is read in 8 orders (the Hilbert curve of the identity,
    transpose, rot90 and transpose-of-rot90 views, each also reversed); per order k:
    ``x_dbl = W_x[k] x`` (dt_rank + 2*16 rows, no bias) -> (dt, B, C); ``delta = softplus(W_dt[k] dt
    + b_dt[k])``; ``y = selective_scan(x, delta, A=-exp(A_log), B, C, D)`` with A_log = log(1..16)
    and D = 1 at init, state 16, dt_rank = ceil(C/16); each y is put back in raster order (inverse
    permutation) and the 8 are summed; LayerNorm, times SiLU(z), out_proj 2C->C (no bias).
  - loss: ``5 * sum over scales of MSE(student, teacher)`` (ADer's L2Loss, lam 5).
  - map: Omni-AD's (both use ADer's evaluator): per scale ``1 - cos`` over channels, bilinear
    (align_corners) to the input size, summed and divided by 9 (``amap_mode='add'`` divides by
    scales x sum of weights), Gaussian sigma ``map_sigma``; image score = max of the map.

Selective scan and Hilbert orders: ``omniad/models/layers/selective_scan.py`` and
``scan_orders.py`` (shared layers); ``benchmarks/selective_scan.py`` times the scan.

Two released details this file keeps: all HSS blocks of one LSS module share one drop-path rate
(``MambaDecoder``); and with the released views two of the 8 directions read the same sequence
(a Hilbert curve's reversal is a mirror image; see :func:`scan_orders`), ``scan_views:
rotations`` being the all-distinct alternative (not the released model).

Parameter count: 25.615M for the defaults. The official object reports 25.655M because it keeps
its Hilbert scan indices (index and inverse, 2 * H*W int64 per HSS block: 39,296 numbers) as
``nn.Parameter(requires_grad=False)``; here they are non-persistent buffers. fvcore FLOPs at
256 px: the selective scan is elementwise work that fvcore does not count (the official 8.30G
does not count it either).

Hilbert order: the classic ``d2xy`` curve (``omniad/models/layers/scan_orders.py``), identical
to the official ``hilbert`` package's for every grid side 2-64.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from timm.layers import DropPath
from torch import nn

from omniad.models.encoder import Pretrained
from omniad.models.feature_reconstruction import FeatureReconstructionMethod
from omniad.models.layers.decoder import StagedDecoder, init_linear_and_norm
from omniad.models.layers.patch_expand import PatchExpand
from omniad.models.layers.scan_orders import scan_orders
from omniad.models.layers.selective_scan import scan_tokens, selective_scan_ref


class MambaADConfig(BaseModel):
    """MambaAD switches; defaults reproduce the released MVTec-AD model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: Literal["resnet34", "resnet18"] = "resnet34"
    #: torchvision's ResNet34 (the released config loads resnet34-43635321.pth).
    pretrained: Pretrained = "resnet34.bt_in1k"  # official: resnet34-43635321.pth (= Omni-AD's)
    depths: tuple[int, int, int, int] = (3, 4, 6, 3)
    d_state: int = Field(16, ge=1)
    expand: int = Field(2, ge=1)
    directions: Literal[2, 4, 8] = 8
    #: Base views read in Hilbert order: the released identity/transpose/rot90/transpose-of-rot90
    #: (two of whose reversals coincide with other directions, see scan_orders), or the four
    #: rotations (all 8 directions distinct). Not in the paper: ``released`` is the default.
    scan_views: Literal["released", "rotations"] = "released"
    drop_path: float = Field(0.2, ge=0, lt=1)
    #: Side of the neck's map (input / 32): stage i scans a (grid * 2**i)^2 Hilbert grid.
    grid: int = 8
    scan_impl: Literal["fast", "ref"] = "fast"
    #: Steps per chunk of the fast scan; 0 = about sqrt(L) per stage.
    scan_chunk: int = Field(0, ge=0)
    compile_scan: bool = True
    loss_weight: float = Field(5.0, gt=0)
    map_divisor: float = Field(9.0, gt=0)
    map_sigma: float = Field(4.0, ge=0)

    @field_validator("grid")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v < 2 or v & (v - 1):
            raise ValueError(f"grid must be a power of two >= 2 (Hilbert order; input size / 32), "
                             f"got {v}")
        return v

    @field_validator("depths")
    @classmethod
    def _groupable(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(d < 2 or (d % 3 and d % 2) for d in v):
            raise ValueError(f"each depth must be a multiple of 3 or of 2 (blocks are grouped in "
                             f"modules of 3 or 2), got {list(v)}")
        return v


# --------------------------------------------------------------------------------------------
# SS2D and the HSS block.
# --------------------------------------------------------------------------------------------
class SS2D(nn.Module):
    """2-D selective scan over ``directions`` Hilbert orders of an n x n map (channels-last)."""

    def __init__(self, dim: int, grid: int, cfg: MambaADConfig) -> None:
        super().__init__()
        self.grid, self.cfg = grid, cfg
        self.d_inner = inner = cfg.expand * dim
        self.d_state = n = cfg.d_state
        self.dt_rank = rank = math.ceil(dim / 16)
        k = cfg.directions
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.conv2d = nn.Conv2d(inner, inner, 3, padding=1, groups=inner, bias=True)
        # Per direction: x_proj (nn.Linear's default init), dt_proj (Mamba's dt init).
        bound = inner ** -0.5
        self.x_proj_weight = nn.Parameter(torch.empty(k, rank + 2 * n, inner).uniform_(-bound, bound))
        std = rank ** -0.5
        self.dt_projs_weight = nn.Parameter(torch.empty(k, inner, rank).uniform_(-std, std))
        dt = torch.exp(torch.rand(k, inner) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
        dt = dt.clamp(min=1e-4)
        self.dt_projs_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        a_log = torch.log(torch.arange(1, n + 1, dtype=torch.float32))
        self.A_logs = nn.Parameter(a_log.repeat(k * inner, 1))  # A = -(1..n) per channel
        self.Ds = nn.Parameter(torch.ones(k * inner))
        self.out_norm = nn.LayerNorm(inner)
        self.out_proj = nn.Linear(inner, dim, bias=False)
        orders = scan_orders(grid, k, cfg.scan_views)
        self.register_buffer("read_index", orders.reshape(-1), persistent=False)
        self.register_buffer("write_index", orders.argsort(dim=1), persistent=False)

    def scan(self, xs: torch.Tensor, dts: torch.Tensor, Bs: torch.Tensor, Cs: torch.Tensor) -> torch.Tensor:
        """Selective scan of all directions at once, token-major: (b, K, L, inner) in and out."""
        b, k, length, inner = xs.shape
        A = -torch.exp(self.A_logs.float())
        with torch.autocast(xs.device.type, enabled=False):
            if self.cfg.scan_impl == "ref":  # Mamba's (b, d, L) layout
                y = selective_scan_ref(
                    xs.transpose(2, 3).reshape(b, k * inner, length),
                    dts.transpose(2, 3).reshape(b, k * inner, length), A, Bs.transpose(2, 3),
                    Cs.transpose(2, 3), D=self.Ds.float(), delta_bias=self.dt_projs_bias.float().reshape(-1),
                    delta_softplus=True)
                return y.view(b, k, inner, length).transpose(2, 3)
            return scan_tokens(xs, dts, A.view(k, inner, -1), Bs, Cs, D=self.Ds.float().view(k, inner),
                               delta_bias=self.dt_projs_bias.float(), delta_softplus=True,
                               chunk=self.cfg.scan_chunk, use_compile=self.cfg.compile_scan)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        if (h, w) != (self.grid, self.grid):
            raise ValueError(
                f"MambaAD was built for grid {self.cfg.grid} ({32 * self.cfg.grid} px input): this "
                f"stage scans a {self.grid}x{self.grid} map but got {h}x{w}; set the model's grid "
                f"to input size / 32 (a power of two)"
            )
        k, inner, length = self.cfg.directions, self.d_inner, h * w
        xin, z = self.in_proj(x).chunk(2, dim=-1)
        xin = F.silu(self.conv2d(xin.permute(0, 3, 1, 2)))
        tokens = xin.permute(0, 2, 3, 1).reshape(b, length, inner)  # raster order
        xs = tokens[:, self.read_index].view(b, k, length, inner)  # each direction's order
        x_dbl = torch.einsum("bkld,kcd->bklc", xs, self.x_proj_weight)
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dts = torch.einsum("bklr,kdr->bkld", dts, self.dt_projs_weight)
        ys = self.scan(xs, dts, Bs, Cs)
        index = self.write_index.view(1, k, length, 1).expand(b, k, length, inner)
        y = torch.gather(ys, 2, index).sum(1)  # back to raster order, summed over directions
        y = self.out_norm(y.view(b, h, w, inner))
        return self.out_proj(y * F.silu(z))


class HSSBlock(nn.Module):
    """x + DropPath(SS2D(LN(x)))."""

    def __init__(self, dim: int, grid: int, drop_path: float, cfg: MambaADConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.self_attention = SS2D(dim, grid, cfg)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.self_attention(self.ln_1(x)))


# --------------------------------------------------------------------------------------------
# LSS module and decoder.
# --------------------------------------------------------------------------------------------
def _conv_in_silu(dim: int, k: int, depthwise: bool = False) -> nn.Sequential:
    conv = nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim if depthwise else 1, bias=not depthwise)
    return nn.Sequential(conv, nn.InstanceNorm2d(dim), nn.SiLU())


class LocalBranch(nn.Sequential):
    """1x1 conv IN SiLU -> depthwise k x k (no bias) IN SiLU -> 1x1 conv IN SiLU (NCHW)."""

    def __init__(self, dim: int, k: int) -> None:
        super().__init__(_conv_in_silu(dim, 1), _conv_in_silu(dim, k, depthwise=True), _conv_in_silu(dim, 1))


class LSSModule(nn.Module):
    """x + conv1x1(cat[HSS chain(x), local5(x), local7(x)]); all HSS blocks share one drop rate."""

    def __init__(self, dim: int, grid: int, blocks: int, drop_path: float, cfg: MambaADConfig) -> None:
        super().__init__()
        self.hss = nn.ModuleList(HSSBlock(dim, grid, drop_path, cfg) for _ in range(blocks))
        self.local5 = LocalBranch(dim, 5)
        self.local7 = LocalBranch(dim, 7)
        self.fuse = nn.Conv2d(3 * dim, dim, 1)
        for m in self.modules():  # the released init of this module's convs
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ssm = x
        for blk in self.hss:
            ssm = blk(ssm)
        xc = x.permute(0, 3, 1, 2)
        out = self.fuse(torch.cat([ssm.permute(0, 3, 1, 2), self.local5(xc), self.local7(xc)], dim=1))
        return out.permute(0, 2, 3, 1) + x


class MambaDecoder(StagedDecoder):
    """Four LSS stages; stages 2-4 open with a PatchExpand; returns stages 2-4, finest first.

    Drop path as released: ``linspace(0, rate, sum(depths))`` reversed, stage i takes its slice
    of depth d_i and module j of the stage uses the slice's j-th value for all its blocks.
    """

    def __init__(self, dims: list[int], cfg: MambaADConfig) -> None:
        super().__init__()
        rates = torch.linspace(0, cfg.drop_path, sum(cfg.depths)).flip(0).tolist()
        self.ups = nn.ModuleList([nn.Identity()] + [PatchExpand(d) for d in dims[:-1]])
        self.stages = nn.ModuleList()
        start = 0
        for i, (dim, depth) in enumerate(zip(dims, cfg.depths, strict=True)):
            per = 3 if depth % 3 == 0 else 2
            mine = rates[start:start + depth]
            self.stages.append(nn.Sequential(*(
                LSSModule(dim, cfg.grid * 2 ** i, per, mine[j], cfg) for j in range(depth // per))))
            start += depth
        self.apply(init_linear_and_norm)


# --------------------------------------------------------------------------------------------
# The model.
# --------------------------------------------------------------------------------------------
class MambaAD(FeatureReconstructionMethod):
    """Frozen ResNet encoder -> fusion neck -> Mamba decoder; MSE reconstruction of features."""

    name = "mambaad"
    config_class = MambaADConfig
    cfg: MambaADConfig
    decoder_class = MambaDecoder

    def training_step(self, images: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        return {"loss": self.cfg.loss_weight * super().training_step(images, step)["loss"]}
