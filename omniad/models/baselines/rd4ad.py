"""RD4AD (reverse distillation from one-class embedding, CVPR'22), in ADer's and the official form.

Read top to bottom: config, one-class bottleneck embedding (OCBE), student decoder, model.

Computed, for a 256x256 input and the WideResNet50-2 teacher:
  - teacher (frozen, eval, detached): stages 1-3 -> t1 256@64, t2 512@32, t3 1024@16.
  - OCBE: conv3x3 s2 256->512 BN ReLU -> conv3x3 s2 512->1024 BN ReLU on t1; conv3x3 s2
    512->1024 BN ReLU on t2; concat with t3 (3072@16); 3 bottleneck blocks (the first strided,
    with a 1x1 s2 downsample) -> 2048@8. The bottleneck width is ``64 * 512 / 64 = 512`` in
    ADer's multi-class form (``form: ader``, its MFF_OCE) and the teacher's own width per group
    (128 for the wide net -> 1024) in the official code (``form: official``).
  - student: reversed bottleneck stages of [3, 4, 6] blocks (planes 256, 128, 64, the teacher's
    width per group) -> s3 1024@16, s2 512@32, s1 256@64. Each stage opens with a block whose
    3x3 conv is a 2x2 stride-2 transposed conv and whose shortcut is a 2x2 stride-2 transposed
    conv + BN.
  - loss: sum over the three scales of mean over samples of ``1 - cos(flatten(t), flatten(s))``.
  - map: sum over scales of ``1 - cos`` over channels, each bilinear (align_corners) to the
    input size, Gaussian sigma ``map_sigma`` (4 at 256 px); image score = max of that map.

The official code also builds a 1x1 conv 4096->2048 + BN (``conv4``/``bn4``) that its forward
never calls: ``form: official`` registers it (as ``ocbe.unused``) so the parameter count matches
the official 117.1M, and never uses it. ADer's form has no such conv (80.6M).

Teacher weights: ``wide_resnet50_2.racm_in1k``, the file ADer loads
(``wide_resnet50_racm-8234f177.pth``), since the defaults follow ADer's multi-class model; the
official single-class code loads torchvision's (``wide_resnet50_2.tv_in1k``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from timm.models.resnet import Bottleneck
from torch import nn

from omniad.models.encoder import FrozenEncoder, Pretrained
from omniad.models.frozen_encoder import FrozenEncoderMethod
from omniad.models.layers.init import resnet_init

#: Width per group of each supported teacher (torchvision's ``width_per_group``).
TEACHER_WIDTH: dict[str, int] = {"wide_resnet50_2": 128, "resnet50": 64}
#: ADer's MFF_OCE keeps torchvision's default width per group whatever the teacher.
ADER_OCBE_WIDTH = 64


class RD4ADConfig(BaseModel):
    """RD4AD switches; defaults reproduce ADer's multi-class model (Table I)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: Literal["wide_resnet50_2", "resnet50"] = "wide_resnet50_2"
    pretrained: Pretrained = "wide_resnet50_2.racm_in1k"
    form: Literal["ader", "official"] = "ader"
    ocbe_blocks: int = Field(3, ge=1)
    map_sigma: float = Field(4.0, ge=0)


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    """conv3x3 stride 2 (no bias) + BN + ReLU: one OCBE downsampling step."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


# --------------------------------------------------------------------------------------------
# One-class bottleneck embedding.
# --------------------------------------------------------------------------------------------
class OCBE(nn.Module):
    """Fuse the teacher's three scales (c1, c2, c3) into one 2*c3 map at half the last stride."""

    def __init__(self, channels: list[int], base_width: int, blocks: int, unused_conv: bool) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.down1 = nn.Sequential(_conv_bn_relu(c1, c2), _conv_bn_relu(c2, c3))
        self.down2 = _conv_bn_relu(c2, c3)
        planes = c3 // 2
        out = planes * Bottleneck.expansion
        downsample = nn.Sequential(nn.Conv2d(3 * c3, out, 1, stride=2, bias=False), nn.BatchNorm2d(out))
        layers = [Bottleneck(3 * c3, planes, stride=2, downsample=downsample, base_width=base_width)]
        layers += [Bottleneck(out, planes, base_width=base_width) for _ in range(blocks - 1)]
        self.blocks = nn.Sequential(*layers)
        self.out_channels = out
        if unused_conv:  # the official conv4 + bn4: counted, never called
            self.unused = nn.Sequential(nn.Conv2d(4 * c3, out, 1, bias=False), nn.BatchNorm2d(out))
        resnet_init(self)  # torchvision's ResNet init, as both codes use

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        fused = torch.cat([self.down1(feats[0]), self.down2(feats[1]), feats[2]], dim=1)
        return self.blocks(fused)


# --------------------------------------------------------------------------------------------
# Student decoder: the teacher's bottleneck stages reversed.
# --------------------------------------------------------------------------------------------
class DeBottleneck(nn.Module):
    """Bottleneck whose stride-2 form upsamples: 1x1 -> (2x2 s2 transposed | 3x3) -> 1x1, + shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, base_width: int = 64) -> None:
        super().__init__()
        width = planes * base_width // 64
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        if stride == 2:
            self.conv2: nn.Module = nn.ConvTranspose2d(width, width, 2, stride=2, bias=False)
        else:
            self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.upsample = None
        if stride != 1 or inplanes != out:
            self.upsample = nn.Sequential(
                nn.ConvTranspose2d(inplanes, out, 2, stride=stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        shortcut = x if self.upsample is None else self.upsample(x)
        return self.relu(y + shortcut)


class StudentDecoder(nn.Module):
    """Three upsampling stages of [3, 4, 6] blocks; returns maps finest first (teacher order)."""

    def __init__(self, in_channels: int, channels: list[int], base_width: int,
                 depths: tuple[int, int, int] = (3, 4, 6)) -> None:
        super().__init__()
        stages, inplanes = [], in_channels
        for c, n in zip(reversed(channels), depths, strict=True):
            planes = c // DeBottleneck.expansion
            blocks = [DeBottleneck(inplanes, planes, stride=2, base_width=base_width)]
            blocks += [DeBottleneck(c, planes, base_width=base_width) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            inplanes = c
        self.stages = nn.ModuleList(stages)
        resnet_init(self)  # torchvision's ResNet init, as both codes use

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.insert(0, x)
        return outs


# --------------------------------------------------------------------------------------------
# The model.
# --------------------------------------------------------------------------------------------
def cosine_distillation_loss(feats_t: list[torch.Tensor], feats_s: list[torch.Tensor]) -> torch.Tensor:
    """Sum over scales of mean over samples of 1 - cos between whole flattened maps."""
    return sum(
        (1 - F.cosine_similarity(t.flatten(1), s.flatten(1), dim=1)).mean()
        for t, s in zip(feats_t, feats_s, strict=True)
    )


class RD4AD(FrozenEncoderMethod):
    """Frozen teacher -> OCBE -> student decoder; anomalies are where the student disagrees."""

    name = "rd4ad"
    config_class = RD4ADConfig
    cfg: RD4ADConfig
    cached_backbone = "teacher"  # sees clean images only, once per step
    teacher: FrozenEncoder

    def __init__(self, cfg: RD4ADConfig | None = None, **overrides: object) -> None:
        super().__init__(cfg, **overrides)
        cfg = self.cfg
        channels = self.teacher.channels
        teacher_width = TEACHER_WIDTH[cfg.backbone]
        ocbe_width = ADER_OCBE_WIDTH if cfg.form == "ader" else teacher_width
        self.ocbe = OCBE(channels, ocbe_width, cfg.ocbe_blocks, unused_conv=cfg.form == "official")
        self.student = StudentDecoder(self.ocbe.out_channels, channels, teacher_width)

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        feats_t = self.teacher(images)
        return feats_t, self.student(self.ocbe(feats_t))

    def training_step(self, images: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        feats_t, feats_s = self(images)
        return {"loss": cosine_distillation_loss(feats_t, feats_s)}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        from omniad.anomaly_map import cosine_anomaly_map

        feats_t, feats_s = self(images)
        return cosine_anomaly_map(feats_t, feats_s, images.shape[-2:], divisor=1.0,
                                  sigma=self.cfg.map_sigma)
