"""What Omni-AD's and MambaAD's feature decoders share: the init and the stage walk.

Both decoders are four stages of blocks on channels-last maps, stages 2-4 opening with a
x2 PatchExpand, and return the last three stages (finest first) to match the encoder's three
scales; only their blocks differ. Both initialise Linear and LayerNorm layers as released.
"""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from torch import nn


def init_linear_and_norm(m: nn.Module) -> None:
    """The released init: Linear weights truncated-normal (std 0.02), biases zero; LayerNorm 1, 0."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class StagedDecoder(nn.Module):
    """Walks ``ups`` and ``stages`` (set by the subclass, one per stage) from the coarsest map;
    (B, C, H, W) in, the last three stages' outputs (B, C_i, H_i, W_i) out, finest first."""

    ups: nn.ModuleList
    stages: nn.ModuleList

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = x.permute(0, 2, 3, 1)
        outs = []
        for i, (up, stage) in enumerate(zip(self.ups, self.stages, strict=True)):
            x = stage(up(x))
            if i:
                outs.insert(0, x.permute(0, 3, 1, 2))
        return outs
