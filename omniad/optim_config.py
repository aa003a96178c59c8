"""A method's ``optim`` block as a validated model (no torch here: ``omniad.grid`` reads it).

An untyped dict let ``weight_deacy: 1e-4`` through and trained with no decay; here unknown
keys and impossible values fail when params are loaded. ``omniad.engine.optim`` builds the
torch optimizer and schedule from it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ScheduleConfig(BaseModel):
    """Per-iteration schedule: ``constant``, or ``step`` (lr x gamma at fraction ``at``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["constant", "step"] = "constant"
    at: float = Field(0.8, gt=0, le=1)  # fraction of all iterations
    gamma: float = Field(0.1, gt=0)

    @model_validator(mode="after")
    def _step_keys_only_for_step(self) -> ScheduleConfig:
        if self.name == "constant" and self.model_fields_set & {"at", "gamma"}:
            raise ValueError("'at' and 'gamma' are read only by the 'step' schedule")
        return self


class OptimConfig(BaseModel):
    """Optimizer, clipping and schedule of one method (its yaml's ``optim`` block).

    ``lr`` is meant for a batch of ``lr_batch`` when that is set (the run scales it by
    batch / lr_batch). A few keys serve one method's second optimizer or part: ``adaptor``
    (SimpleNet's adaptor, a nested block), ``clip_mode`` (SimpleNet), ``seg_lr_res`` /
    ``seg_lr_head`` (DeSTSeg's segmentation head).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(gt=0)
    lr_batch: int | None = Field(None, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    no_decay_1d: bool = False  # 1-D params and names ending in .bias not decayed (timm)
    clip_grad: float | None = Field(None, gt=0)
    clip_mode: Literal["joint", "separate"] = "joint"
    schedule: ScheduleConfig = ScheduleConfig()
    adaptor: OptimConfig | None = None
    seg_lr_res: float | None = Field(None, gt=0)
    seg_lr_head: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _betas_in_range(self) -> OptimConfig:
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas {list(self.betas)} must each lie in [0, 1)")
        return self

    def scaled(self, batch: int) -> OptimConfig:
        """This block with ``lr`` for ``batch`` (lr x batch / lr_batch when lr_batch is set)."""
        if self.lr_batch is None:
            return self
        return OptimConfig.model_validate({**self.to_dict(), "lr": self.lr * batch / self.lr_batch})

    def to_dict(self) -> dict[str, Any]:
        """The keys the yaml set (defaults left out), as a plain dict: what a run's config
        records and hashes, so adding a field with a default here changes no run's hash."""
        return self.model_dump(exclude_unset=True)
