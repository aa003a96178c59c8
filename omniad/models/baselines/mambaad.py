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

Selective scan (Mamba's recurrence, per channel d and state n, with a_t = exp(delta_t A)):
``h_t = a_t h_{t-1} + delta_t B_t u_t``, ``y_t = <C_t, h_t> + D u_t``, times SiLU(z) if given.
:func:`selective_scan_ref` runs it step by step over precomputed (b, d, n, L) decays (Mamba's
reference form). :func:`selective_scan_fast` computes the same numbers without ever building a
(b, d, L, n) tensor: L is cut into chunks of T steps that all advance together (state tensors
(chunks, b, g, d/g, n)), a first pass gets each chunk's end state and decay product from a zero
start, a carry pass over chunks gives each chunk's entering state, and a last pass emits y. Its
hand-written backward runs the mirror-image reverse scan and recomputes the states instead of
storing them (memory near that of the inputs, as with the official CUDA kernel). T is L on CPU
(one chunk: a step's tensors stay in cache) and about sqrt(L) on accelerators (T + 2 L/T
sequential steps, each a kernel launch, instead of L); on CUDA each step function goes through
``torch.compile`` when it works (any failure falls back to eager, for good, silently).
``benchmarks/selective_scan.py`` measures both forms against each other.

Two released details this file keeps: all HSS blocks of one LSS module share one drop-path rate
(``MambaDecoder``); and with the released views two of the 8 directions read the same sequence
(a Hilbert curve's reversal is a mirror image; see :func:`scan_orders`), ``scan_views:
rotations`` being the all-distinct alternative (not the released model).

Parameter count: 25.615M for the defaults. The official object reports 25.655M because it keeps
its Hilbert scan indices (index and inverse, 2 * H*W int64 per HSS block: 39,296 numbers) as
``nn.Parameter(requires_grad=False)``; here they are non-persistent buffers. fvcore FLOPs at
256 px: the selective scan is elementwise work that fvcore does not count (the official 8.30G
does not count it either).

Hilbert order: the classic ``d2xy`` curve. The official code takes it from the ``hilbert``
package; for every grid side 2-64 the two orders are identical (checked index by index).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from timm.layers import DropPath, trunc_normal_
from torch import nn

from omniad.models.base import ADMethod
from omniad.models.encoder import FrozenEncoder
from omniad.models.omniad import FusionNeck, PatchExpand


class MambaADConfig(BaseModel):
    """MambaAD switches; defaults reproduce the released MVTec-AD model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: Literal["resnet34", "resnet18"] = "resnet34"
    #: torchvision's ResNet34 (the released config loads resnet34-43635321.pth).
    pretrained: str | bool = "resnet34.bt_in1k"  # official: resnet34-43635321.pth (= Omni-AD's)
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

    @field_validator("pretrained", mode="before")
    @classmethod
    def _false_like(cls, v: object) -> object:
        return False if v in (None, "false", "False", "none") else v


# --------------------------------------------------------------------------------------------
# Selective scan: sequential reference.
# --------------------------------------------------------------------------------------------
def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _grouped(B: torch.Tensor) -> torch.Tensor:
    """B or C as (b, n, l) (one group) or (b, g, n, l) -> (b, g, n, l)."""
    return B.unsqueeze(1) if B.dim() == 3 else B


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """Mamba's selective scan, one time step after another (the reference; slow for long L).

    u, delta, z: (b, d, l); A: (d, n); B, C: (b, n, l) or (b, g, n, l) with channel group
    ``d // (d/g)`` sharing B/C; D, delta_bias: (d,). Computed in (at least) float32.
    """
    dtype = _compute_dtype(u)
    u, delta, A = u.to(dtype), delta.to(dtype), A.to(dtype)
    B, C = _grouped(B).to(dtype), _grouped(C).to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    b, d, length = u.shape
    g = B.shape[1]
    per = d // g
    Bd = B.repeat_interleave(per, dim=1)  # (b, d, n, l)
    Cd = C.repeat_interleave(per, dim=1)
    decay = torch.exp(delta.unsqueeze(2) * A.unsqueeze(-1))  # (b, d, n, l)
    drive = (delta * u).unsqueeze(2) * Bd
    h = u.new_zeros(b, d, A.shape[1])
    ys = []
    for t in range(length):
        h = decay[..., t] * h + drive[..., t]
        ys.append((h * Cd[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D.to(dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y


# --------------------------------------------------------------------------------------------
# Selective scan: chunked parallel form with a recomputing backward.
# --------------------------------------------------------------------------------------------
# The fast form works token-major: u, delta (b, g, L, d/g) and B, C (b, g, L, n), g channel
# groups sharing B/C (the 8 scan directions in SS2D). Per step a state is (c, b, g, n, d/g):
# c = chunks, which all run their T steps at once; channels innermost, so that the many
# broadcasts over the (small) state dim vectorise. Inputs are rearranged once into (T, c, ...)
# "step" layout (a copy that keeps the channel dim contiguous) so that each step reads
# contiguous slices; nothing of size (b, d, L, n) is ever materialised.
def chunk_size(length: int, device: torch.device, chunk: int = 0) -> int:
    """Steps per chunk: ``chunk`` if set; else L (one chunk) on CPU, where a step's tensors stay
    in cache and fewer, larger steps do not pay, and about sqrt(L) on accelerators, where each
    step is a kernel launch (2T + L/T sequential steps instead of L)."""
    if chunk:
        return max(1, min(chunk, length))
    if device.type == "cpu" and not torch.jit.is_tracing():  # traced (fvcore): fewer ops to record
        return length
    return max(1, math.ceil(math.sqrt(length)))


def _to_steps(x: torch.Tensor, size: int) -> torch.Tensor:
    """(b, g, L, r) -> (T, c, b, g, r) with position l = c * T + t; the tail is zero-padded (a
    zero delta is an identity step: decay 1, drive 0)."""
    b, g, length, r = x.shape
    pad = (-length) % size
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.reshape(b, g, -1, size, r).permute(3, 2, 0, 1, 4).contiguous()


def _from_steps(steps: list[torch.Tensor], length: int) -> torch.Tensor:
    """Inverse of :func:`_to_steps` for a list of T tensors (c, b, g, r) -> (b, g, L, r)."""
    x = torch.stack(steps).permute(2, 3, 1, 0, 4)  # (b, g, c, T, r)
    return x.reshape(x.shape[0], x.shape[1], -1, x.shape[-1])[:, :, :length]


def _decay_drive(dt: torch.Tensor, u: torch.Tensor, A: torch.Tensor, B: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """a = exp(delta A) and x = delta u B for a block of steps: (S, c, b, g, n, d/g) each."""
    return torch.exp(dt.unsqueeze(-2) * A), (dt * u).unsqueeze(-2) * B.unsqueeze(-1)


def _read(h: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """y = <C, h> over the state. A batched matmul is one pass over h, but fvcore would count it
    as FLOPs, and the released count leaves the scan out: traced, it is an elementwise sum."""
    if torch.jit.is_tracing():
        return (h * C.unsqueeze(-1)).sum(-2)
    return (C.unsqueeze(-2) @ h).squeeze(-2)


def _recur(h: torch.Tensor, a: torch.Tensor, x: torch.Tensor) -> list[torch.Tensor]:
    """h_i = a_i h_{i-1} + x_i over the block's first dim: the only sequential part."""
    out = []
    for i in range(a.shape[0]):
        h = torch.addcmul(x[i], a[i], h)
        out.append(h)
    return out


def _block_summary(h: torch.Tensor, prod: torch.Tensor, dt: torch.Tensor, u: torch.Tensor,
                   A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Advance zero-start chunk states and their decay products over a block of steps."""
    a, x = _decay_drive(dt, u, A, B)
    return _recur(h, a, x)[-1], prod * a.prod(0)


def _block_states(h: torch.Tensor, dt: torch.Tensor, u: torch.Tensor, A: torch.Tensor,
                  B: torch.Tensor) -> torch.Tensor:
    """The entering state and all states of a block: (S + 1, c, b, g, n, d/g)."""
    a, x = _decay_drive(dt, u, A, B)
    return torch.stack([h, *_recur(h, a, x)])


def _block_out(h: torch.Tensor, dt: torch.Tensor, u: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
               C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Advance the states over a block and read y = <C, h> at each step: (last h, (S, ...) y)."""
    states = _block_states(h, dt, u, A, B)[1:]
    return states[-1], _read(states, C)


def _recur_back(g: torch.Tensor, a_next: torch.Tensor, a: torch.Tensor, e: torch.Tensor
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """g_t = e_t + a_{t+1} g_{t+1} backwards over the block's first dim: the reverse pass's only
    sequential part. Returns the g_t from the block's end to its start, and a of its start."""
    gs = []
    for i in reversed(range(a.shape[0])):
        g = torch.addcmul(e[i], a_next, g)
        a_next = a[i]
        gs.append(g)
    return gs, a_next


def _block_gsummary(g: torch.Tensor, a_next: torch.Tensor, trans: torch.Tensor, dt: torch.Tensor,
                    A: torch.Tensor, C: torch.Tensor, gy: torch.Tensor, first: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reverse over a block: g_t = gy_t C_t + a_{t+1} g_{t+1} from the block's end, alone.

    Also carries a_t of the block's first step and ``trans``, the product of the decays after
    each chunk's first step (a_1 ... a_{T-1}; ``first`` marks the block holding step 0).
    """
    a = torch.exp(dt.unsqueeze(-2) * A)
    gs, a_next = _recur_back(g, a_next, a, gy.unsqueeze(-2) * C.unsqueeze(-1))
    return gs[-1], a_next, trans * (a[1:] if first else a).prod(0)


def _block_grad(g: torch.Tensor, a_next: torch.Tensor, states: torch.Tensor, dt: torch.Tensor,
                u: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, gy: torch.Tensor,
                g_A: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Reverse over a block: g_t = dL/dh_t = gy_t C_t + a_{t+1} g_{t+1}, then its gradients.

    With a = exp(delta A) and x = delta u B: dL/d(delta A) = g h_{t-1} a and dL/dx = g.
    ``states`` are the entering state and the block's states (S + 1). Returns (g and a of the
    block's first step, g_delta, g_u, g_A accumulated, g_B, g_C), per step (S, ...).
    """
    a = torch.exp(dt.unsqueeze(-2) * A)
    gs, a_next = _recur_back(g, a_next, a, gy.unsqueeze(-2) * C.unsqueeze(-1))
    g, G = gs[-1], torch.stack(gs[::-1])
    g_dA = G * states[:-1] * a
    g_xb = (B.unsqueeze(-2) @ G).squeeze(-2)
    g_delta = (g_dA * A).sum(-2) + g_xb * u
    g_A = g_A + (g_dA * dt.unsqueeze(-2)).sum(0)
    g_B = (G @ (dt * u).unsqueeze(-1)).squeeze(-1)
    g_C = (states[1:] @ gy.unsqueeze(-1)).squeeze(-1)
    return g, a_next, g_delta, g_xb * dt, g_A, g_B, g_C


_BLOCKS: dict[str, Callable] = {"summary": _block_summary, "states": _block_states, "out": _block_out,
                                "gsummary": _block_gsummary, "grad": _block_grad}
_COMPILED: dict[str, Callable] = {}
_COMPILE_FAILED = False


def _block(name: str, use_compile: bool, *args: object) -> tuple[torch.Tensor, ...]:
    """Run one block function eagerly, or compiled (fused kernels) on CUDA; a compiler failure
    falls back to eager for good, silently (eager is always correct)."""
    global _COMPILE_FAILED
    first = args[0]
    if (use_compile and not _COMPILE_FAILED and isinstance(first, torch.Tensor)
            and first.device.type == "cuda" and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling()):
        try:
            if name not in _COMPILED:
                _COMPILED[name] = torch.compile(_BLOCKS[name], dynamic=False)
            return _COMPILED[name](*args)
        except Exception:  # noqa: BLE001 - any compiler problem
            _COMPILE_FAILED = True
    return _BLOCKS[name](*args)


#: Steps per block: the recurrence runs one step at a time, everything else per block.
BLOCK = 4


class _Steps:
    """The scan's inputs in step layout, cut into blocks of steps."""

    def __init__(self, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                 C: torch.Tensor, chunk: int, use_compile: bool) -> None:
        b, g, self.length, per = u.shape
        self.size = size = chunk_size(self.length, u.device, chunk)
        self.jit = use_compile
        self.u = _to_steps(u, size)  # (T, c, b, g, d/g)
        self.dt = _to_steps(delta, size)
        self.B = _to_steps(B, size)  # (T, c, b, g, n)
        self.C = _to_steps(C, size)
        self.A = A.transpose(-1, -2).contiguous().view(1, 1, g, A.shape[-1], per)
        self.chunks = self.u.shape[1]
        self.state_shape = (self.chunks, b, g, A.shape[-1], per)
        self.blocks = [slice(t, min(t + BLOCK, size)) for t in range(0, size, BLOCK)]

    def run(self, name: str, *args: object) -> tuple[torch.Tensor, ...]:
        return _block(name, self.jit, *args)

    def carries(self) -> torch.Tensor:
        """State entering each chunk: chunk summaries from zero, then carried chunk to chunk."""
        h = self.u.new_zeros(self.state_shape)
        if self.chunks == 1:
            return h
        prod = torch.ones_like(h)
        for s in self.blocks:
            h, prod = self.run("summary", h, prod, self.dt[s], self.u[s], self.A, self.B[s])
        carry = [torch.zeros_like(h[0])]
        for c in range(self.chunks - 1):
            carry.append(torch.addcmul(h[c], prod[c], carry[-1]))
        return torch.stack(carry)

    def grad_carries(self, gy: torch.Tensor) -> torch.Tensor:
        """Per chunk, a_T g_T from the next chunk (what its last step receives)."""
        if self.chunks == 1:
            return self.u.new_zeros(self.state_shape)
        g = self.u.new_zeros(self.state_shape)
        a, trans = torch.ones_like(g), torch.ones_like(g)
        for s in reversed(self.blocks):
            g, a, trans = self.run("gsummary", g, a, trans, self.dt[s], self.A, self.C[s], gy[s],
                                   s.start == 0)
        # g: each chunk's g at its first step from a zero carry; a: that step's decay.
        carry = [torch.zeros_like(g[0])]
        for c in range(self.chunks - 1, 0, -1):
            carry.append(a[c] * torch.addcmul(g[c], trans[c], carry[-1]))
        return torch.stack(carry[::-1])


def _core_forward(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                  C: torch.Tensor, chunk: int, use_compile: bool) -> torch.Tensor:
    """y_t = <C_t, h_t> (token-major, post-softplus delta, A (g, d/g, n)): (b, g, L, d/g)."""
    s = _Steps(u, delta, A, B, C, chunk, use_compile)
    h, ys = s.carries(), []
    for blk in s.blocks:
        h, y = s.run("out", h, s.dt[blk], s.u[blk], s.A, s.B[blk], s.C[blk])
        ys.extend(y.unbind(0))
    return _from_steps(ys, s.length)


def _core_backward(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   C: torch.Tensor, gy: torch.Tensor, chunk: int, use_compile: bool
                   ) -> tuple[torch.Tensor, ...]:
    """Gradients of :func:`_core_forward` w.r.t. (u, delta, A, B, C), states recomputed."""
    s = _Steps(u, delta, A, B, C, chunk, use_compile)
    g_steps = _to_steps(gy, s.size)
    states, h = [], s.carries()  # per block: entering state + its states
    for blk in s.blocks:
        states.append(s.run("states", h, s.dt[blk], s.u[blk], s.A, s.B[blk]))
        h = states[-1][-1]
    g, a = s.grad_carries(g_steps), torch.ones(s.state_shape, dtype=u.dtype, device=u.device)
    g_A = torch.zeros_like(g)  # summed over chunks and batch at the end
    grads: list[list[torch.Tensor]] = [[], [], [], []]  # delta, u, B, C per block, reversed
    for blk in reversed(s.blocks):
        g, a, gd, gu, g_A, gb, gc = s.run("grad", g, a, states.pop(), s.dt[blk], s.u[blk], s.A,
                                          s.B[blk], s.C[blk], g_steps[blk], g_A)
        for acc, part in zip(grads, (gd, gu, gb, gc), strict=True):
            acc.extend(part.unbind(0)[::-1])
    g_delta, g_u, g_B, g_C = (_from_steps(acc[::-1], s.length) for acc in grads)
    return g_u, g_delta, g_A.sum((0, 1)).transpose(-1, -2), g_B, g_C


class _ScanCore(torch.autograd.Function):
    """The recurrence (softplus of delta included) with a backward that recomputes the states:
    it saves only its inputs. softplus' derivative is sigmoid (torch's own softplus backward is
    many times slower on CPU)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, softplus, chunk, use_compile):  # noqa: ANN001, ANN205
        ctx.save_for_backward(u, delta, A, B, C)
        ctx.softplus, ctx.chunk, ctx.use_compile = softplus, chunk, use_compile
        dt = F.softplus(delta) if softplus else delta
        return _core_forward(u, dt, A, B, C, chunk, use_compile)

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        u, delta, A, B, C = ctx.saved_tensors
        dt = F.softplus(delta) if ctx.softplus else delta
        g_u, g_dt, g_A, g_B, g_C = _core_backward(u, dt, A, B, C, gy, ctx.chunk, ctx.use_compile)
        if ctx.softplus:
            g_dt = g_dt * torch.sigmoid(delta)
        return g_u, g_dt, g_A, g_B, g_C, None, None, None


def scan_tokens(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    chunk: int = 0,
    use_compile: bool = True,
) -> torch.Tensor:
    """The fast scan in token-major layout (what SS2D feeds it, with no transposes).

    u, delta: (b, g, L, d/g); A: (g, d/g, n); B, C: (b, g, L, n); D, delta_bias: (g, d/g).
    Returns y (b, g, L, d/g) in (at least) float32.
    """
    dtype = _compute_dtype(u)
    u, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype).unsqueeze(1)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, A, B, C)):
        y = _ScanCore.apply(u, delta, A, B, C, delta_softplus, chunk, use_compile)
    else:
        dt = F.softplus(delta) if delta_softplus else delta
        y = _core_forward(u, dt, A, B, C, chunk, use_compile)
    if D is not None:
        y = y + u * D.to(dtype).unsqueeze(1)
    return y


def selective_scan_fast(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    chunk: int = 0,
    use_compile: bool = True,
) -> torch.Tensor:
    """Same arguments (Mamba's (b, d, L) layout) and result as :func:`selective_scan_ref`."""
    B, C = _grouped(B), _grouped(C)
    b, d, length = u.shape
    g = B.shape[1]

    def tokens(x: torch.Tensor) -> torch.Tensor:  # (b, d, L) -> (b, g, L, d/g)
        return x.view(b, g, d // g, length).transpose(2, 3)

    y = scan_tokens(tokens(u), tokens(delta), A.view(g, d // g, -1), B.transpose(2, 3),
                    C.transpose(2, 3), None if D is None else D.view(g, -1),
                    None if delta_bias is None else delta_bias.view(g, -1), delta_softplus, chunk,
                    use_compile)
    y = y.transpose(2, 3).reshape(b, d, length)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


# --------------------------------------------------------------------------------------------
# Hilbert scan orders.
# --------------------------------------------------------------------------------------------
def hilbert_order(n: int) -> np.ndarray:
    """Raster indices (row * n + col) of an n x n grid in Hilbert-curve order (n a power of 2)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hilbert scan needs a power-of-two grid side, got {n}")
    order = np.empty(n * n, dtype=np.int64)
    for d in range(n * n):
        x = y = 0
        t, s = d, 1
        while s < n:  # the classic d -> (x, y) walk, one quadrant level per step
            rx = 1 & (t // 2)
            ry = 1 & (t ^ rx)
            if ry == 0:
                if rx == 1:
                    x, y = s - 1 - x, s - 1 - y
                x, y = y, x
            x, y = x + s * rx, y + s * ry
            t //= 4
            s *= 2
        order[d] = y * n + x
    return order


def scan_orders(n: int, directions: int = 8, views: str = "released") -> torch.Tensor:
    """(directions, n*n) raster indices read by each scan, in the released order.

    Base views (the first directions/2 of identity, transpose, rot90, transpose of rot90) each
    read in Hilbert order, then the same sequences reversed. A Hilbert curve's reversal is its
    mirror image, and the transpose of rot90 is a mirror too, so with the released views two
    reversed sequences equal two forward ones (6 distinct of 8, for every curve orientation and
    every n >= 2; the official model has the same property). ``views="rotations"`` uses the four
    rotations instead, whose mirrors are never rotations: 8 distinct sequences.
    """
    grid = torch.arange(n * n).view(n, n)
    if views == "released":
        views_ = [grid, grid.t(), torch.rot90(grid, 1, (0, 1)), torch.rot90(grid, 1, (0, 1)).t()]
    elif views == "rotations":
        views_ = [torch.rot90(grid, k, (0, 1)) for k in range(4)]
    else:
        raise ValueError(f"views must be 'released' or 'rotations', got {views!r}")
    curve = torch.from_numpy(hilbert_order(n))
    base = [v.reshape(-1)[curve] for v in views_[: directions // 2]]
    return torch.stack(base + [b.flip(0) for b in base])


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


class MambaDecoder(nn.Module):
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
        self.apply(self._init_linear_and_norm)

    @staticmethod
    def _init_linear_and_norm(m: nn.Module) -> None:
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
# The model.
# --------------------------------------------------------------------------------------------
class MambaAD(ADMethod):
    """Frozen ResNet encoder -> fusion neck -> Mamba decoder; MSE reconstruction of features."""

    name = "mambaad"
    config_class = MambaADConfig
    cfg: MambaADConfig
    cached_backbone = "encoder"  # sees clean images only, once per step

    @classmethod
    def backbone_spec(cls, model: dict) -> dict:
        cfg = cls.config_class.model_validate(model)
        return FrozenEncoder.spec(cfg.backbone, (1, 2, 3), cfg.pretrained)

    def __init__(self, cfg: MambaADConfig | None = None, **overrides: object) -> None:
        super().__init__(cfg, **overrides)
        cfg = self.cfg
        self.encoder = FrozenEncoder(cfg.backbone, (1, 2, 3), cfg.pretrained)
        self.neck = FusionNeck(self.encoder.channels)
        c = self.encoder.channels
        self.decoder = MambaDecoder([self.neck.out_channels, c[2], c[1], c[0]], cfg)

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        feats_t = self.encoder(images)
        return feats_t, self.decoder(self.neck(feats_t))

    def training_step(self, images: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        feats_t, feats_s = self(images)
        mse = sum(F.mse_loss(s, t) for t, s in zip(feats_t, feats_s, strict=True))
        return {"loss": self.cfg.loss_weight * mse}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        from omniad.anomaly_map import cosine_anomaly_map

        feats_t, feats_s = self(images)
        return cosine_anomaly_map(feats_t, feats_s, images.shape[-2:], divisor=self.cfg.map_divisor,
                                  sigma=self.cfg.map_sigma)
