"""Frozen-encoder features computed once and read back by every run that uses that encoder.

Every method here trains on top of a frozen encoder whose input is the clean training image,
yet the released loops recompute its features at every step. A method that says so
(``ADMethod.cached_backbone``) gets them from a memory-mapped cache instead: one ``.npy`` per
scale, row i = training image i, written once per feature key (``omniad.grid.feature_key``:
dataset, size, backbone and weights, random-init seed, BatchNorm calibration, precision).

Nothing in a model changes: the engine hands the cached features to the method's own frozen
backbone (``FrozenBackbone.feed``), which returns them instead of recomputing, and gives the
method a shape-only ``meta`` placeholder for the images, so any other use of the pixels fails
loudly. The cache also stores the backbone's state (calibrated BatchNorm included) and two
fingerprints; a run loads that state into its own backbone, after checking that its init is
the cached one, so its ``model.pt`` and its evaluation use exactly the encoder that made the
features.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from omniad.atomic import write_json_atomic
from omniad.engine.checkpoint import seed_everything
from omniad.engine.runtime import Runtime
from omniad.grid import cache_dir, feature_key, features_dir
from omniad.models.base import ADMethod
from omniad.models.encoder import (
    FrozenBackbone,
    build_backbone,
    calibrate_random_backbones,
    state_fingerprint,
)
from omniad.run_config import RunConfig

META = "features.json"
STATE = "backbone.pt"
DTYPES = {"float32": np.float32, "float16": np.float16}


class FeatureCacheError(RuntimeError):
    """A feature cache that does not belong to this run; the message names the folder."""


def calibration_indices(n: int, images: int) -> list[int]:
    """Training images that calibrate a random encoder: evenly spaced (every category)."""
    return torch.linspace(0, n - 1, min(n, images)).round().long().unique().tolist()


def _uint8_cache_id(cfg: RunConfig) -> str:
    """Hash of the resized image cache's key file: features of a rebuilt cache are stale."""
    path = cache_dir(cfg.dataset, cfg.image_size) / "cache_key.json"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def build_features(cfg: RunConfig, device: str | None = None, batch: int = 32,
                   log: Any = print) -> Path:
    """Compute the features of a run's feature key (no-op when present); returns the folder."""
    from omniad.data.cache import CachedDataset
    from omniad.engine.train import CALIBRATION_IMAGES

    key = feature_key(cfg)
    if key is None:
        raise FeatureCacheError(f"{cfg.run}: feature cache off or method not cacheable")
    out = features_dir(key)
    if (out / META).exists():
        log(f"[features] {out}: present")
        return out
    t0 = time.perf_counter()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    seed_everything(cfg.seed)  # as build_model: a random backbone is drawn first
    backbone = build_backbone(key["backbone"]).to(dev)
    init_fp = state_fingerprint(backbone)
    dataset = CachedDataset(cache_dir(cfg.dataset, cfg.image_size), "train",
                            cfg.categories)
    n = len(dataset)
    if cfg.encoder_bn == "train" and backbone.pretrained == "random":
        idx = calibration_indices(n, CALIBRATION_IMAGES)
        calibrate_random_backbones(backbone, torch.stack([dataset[i]["image"] for i in idx]).to(dev))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dtype = DTYPES[key["dtype"]]
    arrays: list[np.memmap] = []
    for start in range(0, n, batch):
        images = torch.stack([dataset[i]["image"] for i in range(start, min(n, start + batch))])
        feats = backbone(images.to(dev))
        if not arrays:
            arrays = [np.lib.format.open_memmap(tmp / f"scale{s}.npy", mode="w+", dtype=dtype,
                                                shape=(n, *f.shape[1:]))
                      for s, f in enumerate(feats)]
        for a, f in zip(arrays, feats, strict=True):
            a[start:start + f.shape[0]] = f.float().cpu().numpy().astype(dtype)
    for a in arrays:
        a.flush()
    torch.save(backbone.state_dict(), tmp / STATE)
    meta = {"key": key, "images": n, "image_cache": _uint8_cache_id(cfg),
            "shapes": [list(a.shape[1:]) for a in arrays],
            "init_fingerprint": init_fp, "state_fingerprint": state_fingerprint(backbone),
            "bytes": int(sum(a.nbytes for a in arrays)), "wall_s": 0.0}
    meta["wall_s"] = round(time.perf_counter() - t0, 3)
    del arrays
    write_json_atomic(tmp / META, meta)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log(f"[features] {cfg.run}: {n} images x {len(meta['shapes'])} scales "
        f"({meta['bytes'] / 2**20:.1f} MiB {key['dtype']}) in {meta['wall_s']:.1f}s -> {out}")
    return out


class FeatureDataset(Dataset):
    """Items {"features": [per-scale float32 tensors], "index": i} of a feature cache, in the
    order of the training split, so the engine's batch order is unchanged."""

    def __init__(self, folder: Path, shapes: list[list[int]], n: int) -> None:
        self.folder, self.shapes, self.n = folder, shapes, n
        self._arrays: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._arrays is None:  # opened lazily, per process (DataLoader workers)
            self._arrays = [np.load(self.folder / f"scale{s}.npy", mmap_mode="r")
                            for s in range(len(self.shapes))]
        return {"features": [torch.from_numpy(a[index].astype(np.float32))
                             for a in self._arrays], "index": index}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None}


class FeatureCache:
    """A run's view of its feature cache: checks it belongs to the run, then feeds it."""

    def __init__(self, cfg: RunConfig, n_images: int) -> None:
        key = feature_key(cfg)
        if key is None:
            raise FeatureCacheError(f"{cfg.run}: reads images (no feature cache)")
        self.folder = features_dir(key)
        try:
            meta = json.loads((self.folder / META).read_text())
        except (OSError, ValueError) as exc:
            raise FeatureCacheError(f"{self.folder / META}: missing or unreadable; build it "
                                    f"with `omniad features {cfg.run}`") from exc
        if meta.get("key") != json.loads(json.dumps(key)):
            raise FeatureCacheError(f"{self.folder / META}: written for another key")
        if meta["images"] != n_images or meta["image_cache"] != _uint8_cache_id(cfg):
            raise FeatureCacheError(f"{self.folder}: stale (image cache rebuilt since); "
                                    "delete it and rebuild")
        self.meta = meta
        self.image_size = int(cfg.image_size)
        self.dataset = FeatureDataset(self.folder, meta["shapes"], n_images)

    @staticmethod
    def backbone(model: ADMethod) -> FrozenBackbone:
        bb = getattr(model, str(model.cached_backbone))
        if not isinstance(bb, FrozenBackbone):
            raise TypeError(f"{type(model).__name__}.{model.cached_backbone} is not a FrozenBackbone")
        return bb

    def attach(self, model: ADMethod, fresh: bool) -> FrozenBackbone:
        """Give the run's backbone the cached state (fresh start) and check it is the one
        that computed the features; a different init (seed, construction order) is an error."""
        bb = self.backbone(model)
        if fresh:
            if state_fingerprint(bb) != self.meta["init_fingerprint"]:
                raise FeatureCacheError(
                    f"{self.folder}: the run's {type(model).__name__}.{model.cached_backbone} "
                    "is not the encoder these features came from (its init differs: build the "
                    "backbone first in __init__, or declare cached_backbone = None)")
            state = torch.load(self.folder / STATE, map_location="cpu", weights_only=True)
            bb.load_state_dict(state)
        if state_fingerprint(bb) != self.meta["state_fingerprint"]:
            raise FeatureCacheError(f"{self.folder}: the run's encoder state differs from the "
                                    "cached one (resumed from another cache?)")
        return bb


@contextmanager
def step_inputs(item: dict[str, Any], backbone: FrozenBackbone | None, rt: Runtime,
                image_size: int) -> Iterator[torch.Tensor]:
    """The ``images`` a method's step receives: the batch's images, or (with a feature cache)
    a shape-only meta tensor while ``backbone`` returns the cached features."""
    fmt = torch.channels_last if rt.channels_last else torch.contiguous_format
    if "features" not in item:
        yield item["image"].to(rt.device, non_blocking=True).contiguous(memory_format=fmt)
        return
    assert backbone is not None
    feats = [f.to(rt.device, non_blocking=True).contiguous(memory_format=fmt)
             for f in item["features"]]
    placeholder = torch.empty((feats[0].shape[0], 3, image_size, image_size), device="meta")
    with backbone.feed(feats):
        yield placeholder
