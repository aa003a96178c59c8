"""x2 upsampling of channels-last maps (Swin-UNet's PatchExpand), in Omni-AD's and MambaAD's decoders."""

from __future__ import annotations

import torch
from torch import nn


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
