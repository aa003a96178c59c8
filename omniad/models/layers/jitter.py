"""UniAD's feature jitter, as Omni-AD, UniAD and RLR apply it to their tokens."""

from __future__ import annotations

import torch


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
