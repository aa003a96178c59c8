"""Evaluation: stream the test set through the method's map function into exact metrics.

Maps never pile up: each batch is folded into one accumulator per category, so memory is
bounded by one category's statistics, not the test set's maps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from omniad import constants
from omniad.atomic import atomic_file
from omniad.engine.checkpoint import rng_state, seed_everything, set_rng_state
from omniad.engine.progress import Progress
from omniad.engine.runtime import Runtime
from omniad.metrics import CategoryAccumulator, mean_over_categories
from omniad.models.base import ADMethod
from omniad.run_config import RunConfig

IMAGENET_MEAN = np.array(constants.IMAGENET_MEAN, dtype=np.float32)
IMAGENET_STD = np.array(constants.IMAGENET_STD, dtype=np.float32)
#: Qualitative samples kept per category for the report's figure (anomalous first).
SAMPLES_PER_CATEGORY = 2


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    x = images.float().cpu().numpy().transpose(0, 2, 3, 1) * IMAGENET_STD + IMAGENET_MEAN
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


def evaluate(model: ADMethod, dataset: Dataset, cfg: RunConfig, rt: Runtime,
             samples_path: Path | None = None) -> dict[str, Any]:
    """Per-category metrics, their mean, and timing; optional qualitative samples (.npz)."""
    model.to(rt.device).eval()
    loader = DataLoader(dataset, batch_size=cfg.eval_batch_size, shuffle=False,
                        num_workers=rt.workers, pin_memory=rt.device.type == "cuda")
    accs: dict[str, CategoryAccumulator] = {}
    per_category: dict[str, dict[str, float]] = {}
    # a category's metrics are computed, and its accumulator freed, once its last test image
    # is in: memory is one category's statistics however large the test set (the cached
    # test split is stored category by category)
    left = _images_per_category(dataset)
    metric_s = 0.0
    order: dict[str, int] = {}  # categories in order of appearance (the report's order)
    keep: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray, int]]] = {}
    progress = Progress(f"eval {cfg.run}", len(loader))
    t0, n_images = time.perf_counter(), 0
    with torch.no_grad():
        for i, item in enumerate(loader):
            images = item["image"].to(rt.device, non_blocking=True)
            if rt.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with rt.autocast():
                maps, scores = model.predict(images)
            maps, scores = np.asarray(maps, np.float32), np.asarray(scores, np.float32)
            masks = item["mask"][:, 0].numpy() > 0.5
            cats = np.asarray(item["category"])
            for cat in dict.fromkeys(cats.tolist()):
                order.setdefault(cat, len(order))
                sel = cats == cat
                if cat not in accs:
                    accs[cat] = CategoryAccumulator()
                accs[cat].update(maps[sel], masks[sel], scores[sel])
                if left is not None:
                    left[cat] -= int(sel.sum())
                    if left[cat] == 0:
                        t1 = time.perf_counter()
                        per_category[cat] = accs.pop(cat).compute()
                        metric_s += time.perf_counter() - t1
            if samples_path is not None:
                _keep_samples(keep, images, masks, maps, item)
            n_images += images.shape[0]
            progress.update(i + 1)
    progress.close()
    infer_s = time.perf_counter() - t0 - metric_s
    t1 = time.perf_counter()
    per_category.update({cat: acc.compute() for cat, acc in accs.items()})
    per_category = dict(sorted(per_category.items(), key=lambda kv: order[kv[0]]))
    metric_s += time.perf_counter() - t1
    if samples_path is not None:
        _save_samples(keep, samples_path)
    return {"per_category": per_category, "mean": mean_over_categories(per_category),
            "test_images": n_images, "test_images_per_s": round(n_images / infer_s, 2),
            "eval_wall_s": round(infer_s + metric_s, 3), "metric_wall_s": round(metric_s, 3)}


def _images_per_category(dataset: Dataset) -> dict[str, int] | None:
    """Test images per category, when the dataset lists its records (CachedDataset)."""
    records = getattr(dataset, "records", None)
    if records is None:
        return None
    out: dict[str, int] = {}
    for r in records:
        out[r["category"]] = out.get(r["category"], 0) + 1
    return out


def _keep_samples(keep: dict, images: torch.Tensor, masks: np.ndarray, maps: np.ndarray,
                  item: dict[str, Any]) -> None:
    """The first anomalous test images of each category, for the qualitative figure."""
    rgb = None
    for j, cat in enumerate(item["category"]):
        slot = keep.setdefault(cat, [])
        if int(item["label"][j]) == 1 and len(slot) < SAMPLES_PER_CATEGORY:
            rgb = _to_uint8(images) if rgb is None else rgb
            slot.append((rgb[j], masks[j], maps[j].astype(np.float16)))


def _save_samples(keep: dict, path: Path) -> None:
    cats, imgs, msk, mps = [], [], [], []
    for cat in sorted(keep):
        for img, mask, amap in keep[cat]:
            cats.append(cat)
            imgs.append(img)
            msk.append(mask)
            mps.append(amap)
    with atomic_file(path, "wb") as fh:  # the package's one write helper
        np.savez_compressed(fh, category=np.array(cats), image=np.stack(imgs),
                            mask=np.stack(msk), map=np.stack(mps))


def evaluation_record(epoch: int, result: dict[str, Any]) -> dict[str, Any]:
    """What metrics.json / history.json keep of one evaluation."""
    return {"epoch": epoch, "mean": result["mean"], "per_category": result["per_category"],
            "eval_wall_s": result["eval_wall_s"]}


def periodic_evaluator(dataset: Dataset, cfg: RunConfig, rt: Runtime
                       ) -> Callable[[ADMethod, int], dict[str, Any]]:
    """An evaluation during training that does not perturb it.

    Every RNG state is saved and restored around it (the released FFN and the eval jitter draw
    random numbers, and so does a DataLoader), and it is seeded as ``omniad evaluate`` seeds
    the final one, so the record at epoch e equals evaluating that epoch's weights by hand.
    The caller puts the model back in train mode.
    """
    def run(model: ADMethod, epoch: int) -> dict[str, Any]:
        saved = rng_state()
        try:
            seed_everything(cfg.seed)
            result = evaluate(model, dataset, cfg.model_copy(update={"run": f"{cfg.run} @{epoch}"}), rt)
        finally:
            set_rng_state(saved)
        m = result["mean"]
        print(f"[eval] {cfg.run} epoch {epoch}: mAD {100 * m['mad']:.1f}", flush=True)
        return evaluation_record(epoch, result)
    return run
