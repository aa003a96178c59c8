"""The resolved configuration of one run: what the engine trains and what gets hashed.

Typed and frozen so the engine reads ``cfg.epochs`` rather than a dict key that a typo can
miss; :meth:`RunConfig.as_dict` is the exact dict written to ``config.json`` / ``meta.config``
and hashed into the run's config hash (field order and values as they were when this was a
dict: a change here would retrain the grid).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from omniad.optim_config import OptimConfig


class GpuOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    bf16: bool
    channels_last: bool
    compile: str | bool  # the compile backend, or False


class RunConfig(BaseModel):
    """One run, resolved from params (``omniad.grid.resolve_run``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run: str
    protocol: str
    dataset: str
    method: str
    builder: str
    code: str  # fingerprint of what training runs (codehash.py): an edit retrains
    variant: str
    seed: int
    model: dict[str, Any]  # the builder's keyword arguments (validated by its config class)
    image_size: int
    encoder_bn: Literal["pretrained", "train", "init"]
    epochs: int
    evaluate_every: int
    periodic_eval_code: str | None  # periodic evaluations are part of training's record
    batch_size: int
    eval_batch_size: int
    checkpoint_every: int
    feature_cache: Literal["off", "float32", "float16"]
    gpu_options: GpuOptions
    workers: int | Literal["auto"]
    optim: OptimConfig  # lr already scaled to batch_size
    categories: list[str] | None

    def as_dict(self) -> dict[str, Any]:
        """The plain dict recorded and hashed (optim: only the keys its yaml set)."""
        out = self.model_dump()
        out["optim"] = self.optim.to_dict()
        return out
