"""Optimizers and schedules from a params ``optim`` block (the released protocol's rules)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


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


def build_optimizer(module: nn.Module, optim: dict[str, Any]) -> torch.optim.Optimizer:
    name = optim.get("name", "adamw").lower()
    lr = float(optim["lr"])
    wd = float(optim.get("weight_decay", 0.0))
    groups = param_groups(module, wd, bool(optim.get("no_decay_1d", False)))
    if name in ("adamw", "adam"):
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        return cls(groups, lr=lr, betas=tuple(optim.get("betas", (0.9, 0.999))),
                   eps=float(optim.get("eps", 1e-8)))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=float(optim.get("momentum", 0.0)))
    raise ValueError(f"optim.name {name!r} is not one of adamw, adam, sgd")


def build_scheduler(opt: torch.optim.Optimizer, optim: dict[str, Any],
                    total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-iteration schedule; 'step' multiplies lr by gamma at a fraction of all iterations."""
    sched = optim.get("schedule", {"name": "constant"})
    if sched["name"] == "step":
        milestone = max(1, int(total_steps * float(sched.get("at", 0.8))))
        return torch.optim.lr_scheduler.MultiStepLR(opt, [milestone], float(sched.get("gamma", 0.1)))
    if sched["name"] == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    raise ValueError(f"optim.schedule.name {sched['name']!r} is not one of step, constant")
