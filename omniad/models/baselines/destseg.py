"""DeSTSeg (CVPR'23): denoising student-teacher features segmented by a head trained on
synthetic anomalies. Facts from the official code (apple/ml-destseg) as in BASELINES.md.

Read top to bottom: config, student, segmentation head, model (phases, losses, map).

Computed, for a 256x256 input:
  - teacher: frozen ResNet18 (torchvision weights) stages 1-3: 64@64, 128@32, 256@16.
  - student: a randomly initialised ResNet18 (stages 1-4) then four decoder stages of two basic
    blocks (512->512, 512->256, 256->128, 128->64), each after a bilinear resize to the next
    encoder scale: outputs 64@64, 128@32, 256@16 (finest first).
  - every feature is L2-normalised over channels (``x / (||x|| + 1e-12)``).
  - segmentation head on cat over the three scales of ``-(t * s)`` (teacher and student on the
    same, possibly augmented, image), each bilinear-resized to 64x64: 448 channels -> two basic
    blocks to 256 -> ASPP (global pool branch + 3x3 dilations 6/12/18, each conv BN ReLU,
    fused by a 3x3 conv BN ReLU) -> conv3x3 BN ReLU -> conv1x1 -> sigmoid.
  - synthetic anomalies: see :mod:`omniad.models.baselines.perlin` (Perlin masks, textures from
    DTD or, in the demo protocol, from scikit-image's bundled pictures).
  - phase 1 (the first ``de_st_fraction`` of the iterations, 20% as in the official 1000 of 5000
    steps): only the student trains, in train mode, on ``sum over scales and over the batch of
    mean over pixels of (1 - <t_hat(clean), s_hat(augmented)>)`` (the official loss sums over
    the batch); SGD lr 0.4, momentum 0.9, wd 1e-4.
  - phase 2: the student is frozen (eval mode, no gradient), the head trains on focal loss
    (gamma 4, mean) + L1 between its output and the mask (bilinear to 64x64, > 0.5); SGD
    momentum 0.9, wd 1e-4, lr 0.1 for the two basic blocks and 0.01 for the rest of the head.
  - map: head output bilinear (align_corners=False) to the input size, no Gaussian; image score
    = max of the map (ADer) or mean of its top ``top_k`` (100) values (official).

The official training also rotates each category's normal images (by category); the multi-class
protocol has no augmentation, so this model does not. 35.15M parameters (the teacher truncated
after stage 3, as timm ``features_only`` builds it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import timm
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from timm.models.resnet import BasicBlock
from torch import nn

from omniad.constants import IMAGENET_MEAN, IMAGENET_STD
from omniad.models.base import ADMethod, DataAccess, OptimBuilders
from omniad.models.baselines import perlin
from omniad.models.encoder import FrozenEncoder, Pretrained


class DeSTSegConfig(BaseModel):
    """DeSTSeg switches; defaults reproduce the released model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: torchvision's ResNet18 (BASELINES.md: ``resnet18.tv_in1k``).
    pretrained: Pretrained = "resnet18.tv_in1k"
    textures: Literal["dtd", "package"] = "dtd"
    #: DTD root (the folder holding dtd/images); None: $OMNIAD_DATA/dtd.
    dtd_root: str | None = None
    de_st_fraction: float = Field(0.2, gt=0, lt=1)
    perlin_max_exp: int = Field(6, ge=1)
    perlin_threshold: float = 0.5
    rotate_deg: float = Field(90.0, ge=0)
    beta_max: float = Field(0.8, ge=0, le=1)
    focal_gamma: float = Field(4.0, ge=0)
    image_score: Literal["max", "top_mean"] = "max"
    top_k: int = Field(100, ge=1)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-12)


def basic_stage(inplanes: int, planes: int, blocks: int = 2) -> nn.Sequential:
    """torchvision's make_layer with basic blocks, stride 1 (1x1 conv + BN shortcut if needed)."""
    down = None
    if inplanes != planes:
        down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes))
    layers = [BasicBlock(inplanes, planes, downsample=down)]
    layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def _kaiming(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Student(nn.Module):
    """Random ResNet18 encoder (stages 1-4) + decoder of basic-block stages, finest first."""

    def __init__(self) -> None:
        super().__init__()
        self.decoder = nn.ModuleList([basic_stage(512, 512), basic_stage(512, 256),
                                      basic_stage(256, 128), basic_stage(128, 64)])
        _kaiming(self.decoder)
        self.encoder = timm.create_model("resnet18", pretrained=False, features_only=True,
                                         out_indices=(1, 2, 3, 4))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        e1, e2, e3, e4 = self.encoder(x)
        b4 = self.decoder[0](e4)
        b3 = self.decoder[1](F.interpolate(b4, size=e3.shape[-2:], mode="bilinear", align_corners=False))
        b2 = self.decoder[2](F.interpolate(b3, size=e2.shape[-2:], mode="bilinear", align_corners=False))
        b1 = self.decoder[3](F.interpolate(b2, size=e1.shape[-2:], mode="bilinear", align_corners=False))
        return [b1, b2, b3]


def _conv_bn_relu(cin: int, cout: int, k: int, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    """Global-pool branch + dilated 3x3 branches, each conv BN ReLU; fused by conv3x3 BN ReLU."""

    def __init__(self, cin: int, cout: int, rates: tuple[int, ...] = (6, 12, 18)) -> None:
        super().__init__()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), _conv_bn_relu(cin, cout, 1))
        self.branches = nn.ModuleList(_conv_bn_relu(cin, cout, 3, r) for r in rates)
        self.fuse = _conv_bn_relu((1 + len(rates)) * cout, cout, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.interpolate(self.pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([pooled] + [b(x) for b in self.branches], dim=1))


class SegmentationHead(nn.Module):
    """448 -> two basic blocks (256) -> ASPP -> conv3x3 BN ReLU -> conv1x1 -> sigmoid."""

    def __init__(self, inplanes: int = 448) -> None:
        super().__init__()
        self.res = basic_stage(inplanes, 256)
        _kaiming(self.res)  # the official init touches these blocks only
        self.head = nn.Sequential(ASPP(256, 256), _conv_bn_relu(256, 256, 3), nn.Conv2d(256, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(self.res(x)))


def focal_loss(pred: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    """Mean of BCE * (1 - p_t)^gamma, on probabilities (the official focal loss, alpha off).

    In float32 with autocast off: autocast refuses binary_cross_entropy on probabilities.
    """
    with torch.autocast(pred.device.type, enabled=False):
        pred, target = pred.float(), target.float()
        ce = F.binary_cross_entropy(pred, target, reduction="none")
        p_t = pred * target + (1 - pred) * (1 - target)
        return (ce * (1 - p_t) ** gamma).mean()


class DeSTSeg(ADMethod):
    """Teacher/denoising-student discrepancies segmented by a head trained on synthetic anomalies."""

    name = "destseg"
    config_class = DeSTSegConfig
    cfg: DeSTSegConfig

    def __init__(self, cfg: DeSTSegConfig | None = None, **overrides: object) -> None:
        super().__init__(cfg, **overrides)
        cfg = self.cfg
        self.encoder = FrozenEncoder("resnet18", (1, 2, 3), cfg.pretrained)  # the teacher
        self.student = Student()
        self.segmentation = SegmentationHead(sum(self.encoder.channels))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.de_st_steps: int | None = None  # set by configure_optimizers
        self._textures: Any = None
        self._data: DataAccess | None = None

    def bind_data(self, data: DataAccess) -> None:
        self._data = data

    # -- synthetic anomalies -------------------------------------------------------------
    def texture_source(self) -> Any:
        if self._textures is None:
            if self.cfg.textures == "package":
                self._textures = perlin.package_textures
            else:
                if self._data is None:
                    raise RuntimeError("destseg: textures 'dtd' read the DTD images: build the "
                                       "model with omniad.methods.create_method (or bind_data)")
                root = (Path(self.cfg.dtd_root) if self.cfg.dtd_root
                        else self._data.dataset_root("dtd"))
                self._textures = perlin.DTDTextures(self._data.image_paths("dtd", root, "train"))
        return self._textures

    @torch.no_grad()
    def augment(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ImageNet-normalised augmented images, masks (B, 1, H, W)) from normalised images."""
        b, _, h, w = images.shape
        cfg = self.cfg
        masks = perlin.perlin_masks(b, h, w, cfg.perlin_max_exp, cfg.perlin_threshold, cfg.rotate_deg)
        textures = self.texture_source()(b, h, w)
        pixels = images.float() * self.std + self.mean
        aug = perlin.blend(pixels, textures.to(pixels), masks.to(pixels), cfg.beta_max)
        return ((aug - self.mean) / self.std).to(images.dtype), masks.unsqueeze(1).to(images)

    # -- forward pieces ------------------------------------------------------------------
    def teacher(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [l2_normalize(f) for f in self.encoder(images)]

    def student_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [l2_normalize(f) for f in self.student(images)]

    def segment(self, feats_t: list[torch.Tensor], feats_s: list[torch.Tensor]) -> torch.Tensor:
        size = feats_s[0].shape[-2:]
        x = torch.cat([F.interpolate(-t * s, size=size, mode="bilinear", align_corners=False)
                       for t, s in zip(feats_t, feats_s, strict=True)], dim=1)
        return self.segmentation(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Segmentation probabilities (B, 1, H/4, W/4) of (un-augmented) images."""
        return self.segment(self.teacher(images), self.student_features(images))

    # -- training ------------------------------------------------------------------------
    def training_step(self, images: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        if self.de_st_steps is None:
            raise RuntimeError("destseg: call configure_optimizers first (it fixes the phase split)")
        aug, mask = self.augment(images)
        if step < self.de_st_steps:  # phase 1: denoising student
            self.student.train()
            self.segmentation.eval()
            feats_t = self.teacher(images)
            feats_s = self.student_features(aug)
            loss = sum((1 - (t * s).sum(1)).mean((1, 2)).sum() for t, s in zip(feats_t, feats_s, strict=True))
            return {"loss": loss, "cosine": loss.detach()}
        self.student.eval()  # phase 2: segmentation head only
        self.segmentation.train()
        with torch.no_grad():
            feats_t, feats_s = self.teacher(aug), self.student_features(aug)
        seg = self.segment(feats_t, feats_s)
        target = F.interpolate(mask, size=seg.shape[-2:], mode="bilinear", align_corners=False)
        target = (target >= 0.5).to(seg.dtype)
        focal = focal_loss(seg, target, self.cfg.focal_gamma)
        l1 = F.l1_loss(seg.float(), target.float())
        return {"loss": focal + l1, "focal": focal.detach(), "l1": l1.detach()}

    def configure_optimizers(
        self, optim: dict[str, Any], total_steps: int, build: OptimBuilders
    ) -> tuple[list[torch.optim.Optimizer], list[torch.optim.lr_scheduler.LRScheduler]]:
        """SGD for the student (``optim.lr``) and for the head (``optim.seg_lr_res`` for its two
        basic blocks, ``optim.seg_lr_head`` for the rest); momentum and weight decay shared;
        ``optim.no_decay_1d`` exempts the student's biases and BatchNorm parameters (ADer).
        Only one part has gradients at a time, so stepping both every iteration trains each in
        its own phase."""
        self.de_st_steps = max(1, int(round(total_steps * self.cfg.de_st_fraction)))
        wd = float(optim.get("weight_decay", 1e-4))
        kw = {"momentum": float(optim.get("momentum", 0.9)), "weight_decay": wd}
        student = torch.optim.SGD(build.param_groups(self.student, wd, bool(optim.get("no_decay_1d"))),
                                  lr=float(optim["lr"]), momentum=kw["momentum"])
        seg = torch.optim.SGD([
            {"params": self.segmentation.res.parameters(), "lr": float(optim.get("seg_lr_res", 0.1))},
            {"params": self.segmentation.head.parameters(), "lr": float(optim.get("seg_lr_head", 0.01))},
        ], lr=float(optim.get("seg_lr_res", 0.1)), **kw)
        opts = [student, seg]
        return opts, [build.build_scheduler(o, optim, total_steps) for o in opts]

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        from omniad.anomaly_map import max_score, to_numpy_maps

        seg = self(images)
        maps = to_numpy_maps(F.interpolate(seg, size=images.shape[-2:], mode="bilinear",
                                           align_corners=False).squeeze(1))
        if self.cfg.image_score == "top_mean":
            flat = np.sort(maps.reshape(len(maps), -1), axis=1)
            return maps, flat[:, -self.cfg.top_k:].mean(axis=1)
        return maps, max_score(maps)
