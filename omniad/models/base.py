"""The small interface every method implements, so the engine has no method-specific branches.

A method is an ``nn.Module`` that knows its forward pass, its training loss, its anomaly maps
and its optimizers. The engine owns everything else (loop, checkpoints, tracking, metrics).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn


class ADMethod(nn.Module):
    """Base class of anomaly-detection methods trained and evaluated by ``omniad.engine``."""

    #: Keys of the hyper-parameter block this method reads from params (for validation).
    name: str = "method"

    #: Attribute name of the frozen backbone whose output depends on the image alone (no
    #: augmentation, no second call), so the engine may compute it once for the whole
    #: training set and feed it back (omniad/engine/features.py). None: not cacheable
    #: (DeSTSeg's teacher also sees augmented images).
    cached_backbone: ClassVar[str | None] = None

    @classmethod
    def backbone_spec(cls, model: dict[str, Any]) -> dict[str, Any] | None:
        """How to build the cached backbone alone from the run's model config:
        ``{"class": "module:Class", "kwargs": {...}}`` (None when not cacheable). The engine
        checks the built backbone's state against the run's, so a mismatch cannot pass."""
        return None

    def training_step(self, images: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """Return at least ``{"loss": scalar}``; extra entries are logged as per-step terms."""
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Return (anomaly maps (B,H,W) float32 at the input size, image scores (B,))."""
        raise NotImplementedError

    def configure_optimizers(
        self, optim: dict[str, Any], total_steps: int
    ) -> tuple[list[torch.optim.Optimizer], list[torch.optim.lr_scheduler.LRScheduler]]:
        """Build optimizers and per-iteration schedulers from the ``optim`` params block."""
        from omniad.engine.optim import build_optimizer, build_scheduler

        opt = build_optimizer(self, optim)
        return [opt], [build_scheduler(opt, optim, total_steps)]

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
