"""Omni-AD's and MambaAD's common frame: frozen encoder -> fusion neck -> decoder that
reconstructs the encoder's three scales; trained by MSE, scored by ADer's cosine map.

The two differ only in the decoder's blocks (``decoder_class``), Omni-AD's feature jitter on
the neck output (``bottleneck``) and MambaAD's loss weight; everything else is here once.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import nn

from omniad.models.encoder import FrozenEncoder
from omniad.models.frozen_encoder import FrozenEncoderMethod
from omniad.models.layers.neck import FusionNeck


class FeatureReconstructionMethod(FrozenEncoderMethod):
    """Encoder stages 1-3 (c1, c2, c3) -> ``FusionNeck`` -> ``decoder_class([2 c3, c3, c2, c1],
    cfg)`` whose three outputs, finest first, match the encoder's. The config needs
    ``map_divisor`` and ``map_sigma``."""

    decoder_class: ClassVar[type[nn.Module]]
    encoder: FrozenEncoder

    def __init__(self, cfg: BaseModel | None = None, **overrides: Any) -> None:
        super().__init__(cfg, **overrides)
        self.neck = FusionNeck(self.encoder.channels)
        c = self.encoder.channels
        self.decoder = self.decoder_class([self.neck.out_channels, c[2], c[1], c[0]], self.cfg)

    def bottleneck(self, z: torch.Tensor) -> torch.Tensor:
        """The neck's (B, C, h, w) output on its way to the decoder (default: unchanged)."""
        return z

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        feats_t = self.encoder(images)
        return feats_t, self.decoder(self.bottleneck(self.neck(feats_t)))

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

        cfg: Any = self.cfg
        feats_t, feats_s = self(images)
        return cosine_anomaly_map(feats_t, feats_s, images.shape[-2:], divisor=cfg.map_divisor,
                                  sigma=cfg.map_sigma)
