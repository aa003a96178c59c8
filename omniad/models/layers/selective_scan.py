"""Mamba's selective scan in pure PyTorch: a sequential reference and a fast chunked form.

Shared by any method built on state-space blocks (MambaAD's SS2D today); the official code
calls mamba_ssm's CUDA kernel, this is its pure-PyTorch equivalent (equal to the sequential
reference to 1e-5, see tests; ``benchmarks/selective_scan.py`` times the two forms).

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
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


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
