"""The small interface every method implements, so the engine has no method-specific branches.

A method is an ``nn.Module`` that knows its config class, its forward pass, its training
loss, its anomaly maps and (when it differs from the default) its optimizers. The engine owns
everything else (loop, checkpoints, tracking, metrics) and hands the method its optimizer
builders, so nothing under ``omniad/models`` imports the engine, the grid or the data code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn


class NoConfig(BaseModel):
    """The config of a method without switches: accepts no key."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class OptimBuilders(Protocol):
    """What the engine passes to ``configure_optimizers`` (``omniad.engine.optim`` is one)."""

    def param_groups(self, module: nn.Module, weight_decay: float, no_decay_1d: bool
                     ) -> list[dict]: ...

    def build_optimizer(self, module: nn.Module, optim: Any) -> torch.optim.Optimizer: ...

    def build_scheduler(self, opt: torch.optim.Optimizer, optim: Any, total_steps: int
                        ) -> torch.optim.lr_scheduler.LRScheduler: ...


class DataAccess(Protocol):
    """Files a method reads by itself (``omniad.data.files.DataFiles`` is one)."""

    def dataset_root(self, dataset: str) -> Path: ...

    def image_paths(self, dataset: str, root: Path, split: str) -> list[Path]: ...


class ADMethod(nn.Module):
    """Base class of anomaly-detection methods trained and evaluated by ``omniad.engine``."""

    name: str = "method"

    #: The pydantic class of the method's ``model`` params block: its defaults are the
    #: method's released model, and it validates every key (``extra="forbid"``).
    config_class: ClassVar[type[BaseModel]] = NoConfig
    cfg: BaseModel

    #: Attribute name of the frozen backbone whose output depends on the image alone (no
    #: augmentation, no second call), so the engine may compute it once for the whole
    #: training set and feed it back (omniad/engine/features.py). None: not cacheable
    #: (DeSTSeg's teacher also sees augmented images).
    cached_backbone: ClassVar[str | None] = None

    def __init__(self, cfg: BaseModel | None = None, **overrides: Any) -> None:
        """Sets ``self.cfg``: ``cfg`` (default: the config class's defaults) with ``overrides``
        merged over it, validated by ``config_class`` (unknown keys and bad values raise)."""
        super().__init__()
        self.cfg = self.make_config(cfg, **overrides)

    @classmethod
    def make_config(cls, cfg: BaseModel | None = None, **overrides: Any) -> BaseModel:
        """``cfg`` (or the defaults) with ``overrides`` merged over it, validated."""
        base = cfg if cfg is not None else cls.config_class()
        return cls.config_class.model_validate({**base.model_dump(), **overrides})

    @classmethod
    def backbone_spec(cls, model: dict[str, Any]) -> dict[str, Any] | None:
        """How to build the cached backbone alone from the run's model config:
        ``{"class": "module:Class", "kwargs": {...}}`` (None when not cacheable). The engine
        checks the built backbone's state against the run's, so a mismatch cannot pass."""
        return None

    def bind_data(self, data: DataAccess) -> None:
        """Hand the method the data files it reads by itself (default: it reads none)."""

    def training_step(self, images: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """Return at least ``{"loss": scalar}``; extra entries are logged as per-step terms."""
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Return (anomaly maps (B,H,W) float32 at the input size, image scores (B,))."""
        raise NotImplementedError

    def configure_optimizers(
        self, optim: dict[str, Any], total_steps: int, build: OptimBuilders
    ) -> tuple[list[torch.optim.Optimizer], list[torch.optim.lr_scheduler.LRScheduler]]:
        """Optimizers and per-iteration schedulers from the ``optim`` params block, made with
        the engine's ``build`` (default: one optimizer over all trainable parameters)."""
        opt = build.build_optimizer(self, optim)
        return [opt], [build.build_scheduler(opt, optim, total_steps)]

    def clip_parameters(self) -> list[nn.Parameter]:
        """Parameters whose gradient norm is clipped together (default: all trainable)."""
        return [p for p in self.parameters() if p.requires_grad]

    def clip_groups(self) -> list[list[nn.Parameter]]:
        """Groups whose gradient norms are clipped separately (default: one, ``clip_parameters``)."""
        return [self.clip_parameters()]

    def optimization_step(self, images: torch.Tensor, step: int,
                          optimizers: list[torch.optim.Optimizer], clip: float | None,
                          autocast: Callable[[], contextlib.AbstractContextManager]
                          ) -> dict[str, torch.Tensor]:
        """One training iteration: loss, backward, clip, step; returns ``training_step``'s terms.

        The default sums the loss and steps every optimizer once. A method whose reference
        steps differently (RLR: once per feature level) overrides this, so the engine's loop
        stays free of method branches. Schedulers are stepped by the engine afterwards.
        """
        with autocast():
            terms = self.training_step(images, step)
        for o in optimizers:
            o.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if clip:
            for group in self.clip_groups():
                torch.nn.utils.clip_grad_norm_(group, float(clip))
        for o in optimizers:
            o.step()
        return terms
