"""SimpleNet (CVPR'23): frozen features, an adaptor, and a discriminator of Gaussian-noised fakes.

Facts from the official code (DonaldRR/SimpleNet) as summarised in BASELINES.md; read top to
bottom: config, frozen trunk, patch embedding, model.

Computed, for a 256x256 input and the WideResNet50-2 backbone:
  - backbone (frozen, eval, no grad): stage 2 (512@32) and stage 3 (1024@16) only; the forward
    stops after stage 3 (that is what the official 16.1 GFLOPs count).
  - patch embedding, per location of each stage: its 3x3 neighbourhood (unfold, padding 1)
    flattened to C*9 values; stage-3 neighbourhoods resized bilinear (align_corners=False) to
    the stage-2 grid; each vector adaptive-average-pooled to ``embed_dim`` (1536), the two
    stacked and pooled again to 1536: one 1536-vector per stage-2 location.
  - adaptor: Linear 1536 -> 1536; discriminator: Linear 1536 -> 1024, BatchNorm1d, LeakyReLU
    0.2, Linear 1024 -> 1 (no bias); Xavier-normal weights.
  - training: true = adaptor(embedding); fake = true + N(0, noise_std^2) (one noise scale,
    the released ``mix_noise=1``); D sees cat(true, fake) in train mode; loss
    ``mean(relu(margin - D(true))) + mean(relu(margin + D(fake)))`` with margin 0.5. The
    adaptor (AdamW lr 1e-4, wd 0.01) and the discriminator (Adam lr 2e-4, wd 1e-5) have their
    own optimizers, both stepped every iteration.
  - map: -D per stage-2 location, bilinear (align_corners=False) to the input size, Gaussian
    sigma ``map_sigma``; image score = max of that map (ADer's protocol, ``image_score:
    map_max``); the official code scores an image by the max of the raw patch scores
    (``patch_max``).

Parameter count: the official object holds the whole WideResNet50-2 classifier (layer4 and fc
included, never used): 72.8M. ``hold_full_backbone: true`` (default) registers it the same way,
so ``omniad complexity`` reports 72.8M, the count the report cites for Table I; ``false`` prunes
it after stage 3: 28.8M. Outputs and FLOPs are the same either way.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from omniad.anomaly_map import gaussian_smooth, max_score, to_numpy_maps
from omniad.models.base import ADMethod, OptimBuilders
from omniad.models.encoder import FrozenBackbone, Pretrained


class SimpleNetConfig(BaseModel):
    """SimpleNet switches; defaults reproduce the released MVTec-AD model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: Literal["wide_resnet50_2", "resnet50", "resnet18"] = "wide_resnet50_2"
    #: torchvision's weights, as the official code loads them.
    pretrained: Pretrained = "wide_resnet50_2.tv_in1k"
    layers: tuple[int, int] = (2, 3)
    hold_full_backbone: bool = True
    patch_size: int = Field(3, ge=1)
    embed_dim: int = Field(1536, ge=1)
    dsc_hidden: int = Field(1024, ge=1)
    noise_std: float = Field(0.015, gt=0)
    margin: float = Field(0.5, ge=0)
    map_sigma: float = Field(4.0, ge=0)
    image_score: Literal["map_max", "patch_max"] = "map_max"

    @field_validator("patch_size")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"patch_size must be odd (centred neighbourhood), got {v}")
        return v


class FrozenTrunk(FrozenBackbone):
    """A timm ResNet run up to its last needed stage, frozen (no grad, always eval).

    ``hold_full`` keeps the unused later stage and the classifier registered, as the official
    object does (they count as parameters but are never run).
    """

    def __init__(self, arch: str, indices: tuple[int, ...], pretrained: str | bool,
                 hold_full: bool) -> None:
        super().__init__()
        self._load(arch, pretrained)
        self.indices = list(indices)
        self.channels = [self.body.feature_info[i]["num_chs"] for i in self.indices]
        if not hold_full:
            self.body.prune_intermediate_layers(self.indices, prune_head=True)

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.body.forward_intermediates(x, indices=self.indices, stop_early=True,
                                               intermediates_only=True)


def _xavier(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_normal_(m.weight)


class SimpleNet(ADMethod):
    """Frozen trunk -> patch embedding -> adaptor -> discriminator (true vs noised features)."""

    name = "simplenet"
    config_class = SimpleNetConfig
    cfg: SimpleNetConfig
    cached_backbone = "encoder"  # sees clean images only, once per step

    @classmethod
    def backbone_spec(cls, model: dict) -> dict:
        cfg = cls.config_class.model_validate(model)
        return {"class": f"{__name__}:FrozenTrunk", "kwargs": {
            "arch": cfg.backbone, "indices": list(cfg.layers), "pretrained": cfg.pretrained,
            "hold_full": cfg.hold_full_backbone}}

    def __init__(self, cfg: SimpleNetConfig | None = None, **overrides: object) -> None:
        super().__init__(cfg, **overrides)
        cfg = self.cfg
        self.encoder = FrozenTrunk(cfg.backbone, cfg.layers, cfg.pretrained, cfg.hold_full_backbone)
        d = cfg.embed_dim
        self.adaptor = nn.Linear(d, d)
        self.discriminator = nn.Sequential(
            nn.Linear(d, cfg.dsc_hidden), nn.BatchNorm1d(cfg.dsc_hidden), nn.LeakyReLU(0.2),
            nn.Linear(cfg.dsc_hidden, 1, bias=False),
        )
        self.adaptor.apply(_xavier)
        self.discriminator.apply(_xavier)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B * h * w, embed_dim) patch embeddings on the first stage's (h, w) grid."""
        p, d = self.cfg.patch_size, self.cfg.embed_dim
        feats = self.encoder(images)
        b, _, h, w = feats[0].shape
        pooled = []
        for f in feats:
            patches = F.unfold(f, p, padding=p // 2)  # (B, C*p*p, h_i*w_i), (C, p, p) order
            if f.shape[-2:] != (h, w):  # later stages: every neighbourhood value resized
                patches = patches.view(b, -1, *f.shape[-2:])
                patches = F.interpolate(patches, size=(h, w), mode="bilinear", align_corners=False)
            vectors = patches.reshape(b, patches.shape[1], h * w).transpose(1, 2).reshape(b * h * w, 1, -1)
            pooled.append(F.adaptive_avg_pool1d(vectors, d))
        stacked = torch.cat(pooled, dim=1).reshape(b * h * w, 1, -1)
        return F.adaptive_avg_pool1d(stacked, d).squeeze(1), (h, w)

    def training_step(self, images: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        true = self.adaptor(self.embed(images)[0])
        fake = true + torch.randn_like(true) * self.cfg.noise_std
        scores = self.discriminator(torch.cat([true, fake])).squeeze(1)
        s_true, s_fake = scores[: len(true)], scores[len(true):]
        m = self.cfg.margin
        loss = F.relu(m - s_true).mean() + F.relu(m + s_fake).mean()
        return {"loss": loss, "p_true": (s_true.detach() >= m).float().mean(),
                "p_fake": (s_fake.detach() < -m).float().mean()}

    def patch_scores(self, images: torch.Tensor) -> torch.Tensor:
        """-D per location: (B, h, w), higher = more anomalous."""
        emb, (h, w) = self.embed(images)
        return -self.discriminator(self.adaptor(emb)).view(images.shape[0], h, w)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.patch_scores(images)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        scores = self.patch_scores(images)
        maps = F.interpolate(scores.unsqueeze(1), size=images.shape[-2:], mode="bilinear",
                             align_corners=False).squeeze(1)
        smoothed = gaussian_smooth(to_numpy_maps(maps), self.cfg.map_sigma)
        if self.cfg.image_score == "patch_max":
            return smoothed, to_numpy_maps(scores).reshape(len(scores), -1).max(axis=1)
        return smoothed, max_score(smoothed)

    def clip_groups(self) -> list[list[nn.Parameter]]:
        if getattr(self, "clip_mode", "joint") == "separate":
            return [[p for p in part.parameters() if p.requires_grad]
                    for part in (self.adaptor, self.discriminator)]
        return super().clip_groups()

    def configure_optimizers(
        self, optim: dict[str, Any], total_steps: int, build: OptimBuilders
    ) -> tuple[list[torch.optim.Optimizer], list[torch.optim.lr_scheduler.LRScheduler]]:
        """Two optimizers: the discriminator's from the top-level keys of ``optim``, the
        adaptor's from ``optim.adaptor`` (name, lr, weight_decay, ...); one shared schedule.
        ``optim.clip_mode``: ``separate`` clips the two parts' gradient norms each on its own
        (ADer), ``joint`` together."""
        adaptor_block = optim.get("adaptor")
        if not adaptor_block:
            raise ValueError("simplenet: optim.adaptor {name, lr, weight_decay} is required")
        self.clip_mode = optim.get("clip_mode", "joint")
        if self.clip_mode not in ("joint", "separate"):
            raise ValueError(f"simplenet: optim.clip_mode {self.clip_mode!r} is not joint or separate")
        opts = [build.build_optimizer(self.discriminator, optim),
                build.build_optimizer(self.adaptor, {**adaptor_block})]
        return opts, [build.build_scheduler(o, optim, total_steps) for o in opts]
