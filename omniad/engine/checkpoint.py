"""Atomic checkpoints holding everything a bit-identical resume needs."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omniad.atomic import atomic_file


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save through a temp file + rename: never a half-written checkpoint."""
    with atomic_file(path, "wb") as fh:
        torch.save(obj, fh)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint at path, or None; a corrupt file is an error that names it."""
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name
        raise RuntimeError(f"{path}: checkpoint unreadable ({exc}); delete it to restart") from exc
