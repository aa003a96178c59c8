"""Methods that open with a frozen timm encoder seeing clean images only (Omni-AD, MambaAD,
RD4AD, UniAD, RLR): the encoder is built here, once, and the engine may cache its features."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel

from omniad.models.base import ADMethod
from omniad.models.encoder import FrozenEncoder


class FrozenEncoderMethod(ADMethod):
    """Builds ``FrozenEncoder(cfg.backbone, encoder_stages(cfg), cfg.pretrained)`` first (so
    it draws no RNG before the method's own layers) as attribute ``cached_backbone``.

    The config class needs ``backbone`` and ``pretrained``; ``encoder_stages`` defaults to
    stages 1-3 (strides 4, 8, 16)."""

    #: The encoder sees clean images only, once per step: cacheable (omniad/engine/features.py).
    cached_backbone: ClassVar[str | None] = "encoder"

    @classmethod
    def encoder_stages(cls, cfg: Any) -> tuple[int, ...] | list[int]:
        return (1, 2, 3)

    @classmethod
    def backbone_spec(cls, model: dict[str, Any]) -> dict[str, Any]:
        cfg = cls.config_class.model_validate(model)
        return FrozenEncoder.spec(cfg.backbone, cls.encoder_stages(cfg), cfg.pretrained)

    def __init__(self, cfg: BaseModel | None = None, **overrides: Any) -> None:
        super().__init__(cfg, **overrides)
        c: Any = self.cfg
        setattr(self, str(self.cached_backbone),
                FrozenEncoder(c.backbone, self.encoder_stages(c), c.pretrained))
