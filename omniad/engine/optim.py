"""Optimizers and schedules from a method's typed ``optim`` block (the released protocol's rules)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from omniad.optim_config import OptimConfig


def as_optim_config(optim: OptimConfig | Mapping[str, Any]) -> OptimConfig:
    """The typed block; a plain dict (a method's own sub-block, e.g. SimpleNet's adaptor) is
    validated here, so a typo fails in the same words as at params load time."""
    return optim if isinstance(optim, OptimConfig) else OptimConfig.model_validate(dict(optim))


def param_groups(module: nn.Module, weight_decay: float, no_decay_1d: bool) -> list[dict]:
    """Two groups: decayed weights, and 1-D params + biases without decay (timm's rule)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if no_decay_1d and (p.ndim <= 1 or name.endswith(".bias")):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0},
            {"params": decay, "weight_decay": weight_decay}]


def build_optimizer(module: nn.Module, optim: OptimConfig | Mapping[str, Any]) -> torch.optim.Optimizer:
    cfg = as_optim_config(optim)
    groups = param_groups(module, cfg.weight_decay, cfg.no_decay_1d)
    if cfg.name in ("adamw", "adam"):
        cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
        return cls(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def build_scheduler(opt: torch.optim.Optimizer, optim: OptimConfig | Mapping[str, Any],
                    total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-iteration schedule; 'step' multiplies lr by gamma at a fraction of all iterations."""
    sched = as_optim_config(optim).schedule
    if sched.name == "step":
        milestone = max(1, int(total_steps * sched.at))
        return torch.optim.lr_scheduler.MultiStepLR(opt, [milestone], sched.gamma)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
