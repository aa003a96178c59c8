"""Weight inits that several released models share."""

from __future__ import annotations

from torch import nn


def resnet_init(module: nn.Module) -> None:
    """torchvision's ResNet init, which RD4AD and the fusion neck (Omni-AD, MambaAD) use as
    released: Conv2d kaiming-normal fan_out, BatchNorm weight 1 and bias 0. Transposed convs
    are not ``nn.Conv2d`` and keep PyTorch's default init (RD4AD's decoder, as released)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
