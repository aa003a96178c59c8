"""Evaluation holds one category's accumulator at a time, with the same numbers."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from torch.utils.data import Dataset

from omniad.engine import evaluate as ev
from omniad.engine.runtime import Runtime
from omniad.metrics import CategoryAccumulator


class Cats(Dataset):
    """3 categories x 10 images of 16 px, category by category, half anomalous."""

    def __init__(self, with_records: bool) -> None:
        rng = np.random.default_rng(0)
        self.items = []
        for c in ("a", "b", "c"):
            for i in range(10):
                mask = np.zeros((1, 16, 16), np.float32)
                if i % 2:
                    mask[0, 4:9, 5:11] = 1
                img = rng.standard_normal((3, 16, 16)).astype(np.float32) + 2 * mask
                self.items.append({"image": torch.from_numpy(img), "mask": torch.from_numpy(mask),
                                   "label": i % 2, "category": c, "defect": "x", "index": 0})
        if with_records:
            self.records = [{"category": it["category"]} for it in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class MeanMap(torch.nn.Module):
    def predict(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        maps = images.mean(1).numpy()
        return maps, maps.reshape(len(maps), -1).max(1)


def test_one_category_accumulator_at_a_time(monkeypatch) -> None:
    alive, peak = [0], [0]

    class Counting(CategoryAccumulator):
        def __init__(self, *a, **k) -> None:
            super().__init__(*a, **k)
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])

        def compute(self) -> dict[str, float]:
            alive[0] -= 1
            return super().compute()

    cfg = SimpleNamespace(eval_batch_size=4, run="t")  # the RunConfig fields evaluate reads
    rt = Runtime(torch.device("cpu"), 0)
    monkeypatch.setattr(ev, "CategoryAccumulator", Counting)
    streamed = ev.evaluate(MeanMap(), Cats(with_records=True), cfg, rt)
    assert peak[0] == 1  # batches span a|b and b|c, yet a is done before b starts
    alive[0] = peak[0] = 0
    at_end = ev.evaluate(MeanMap(), Cats(with_records=False), cfg, rt)  # no record list
    assert peak[0] == 3
    assert list(streamed["per_category"]) == ["a", "b", "c"]
    assert streamed["per_category"] == at_end["per_category"]
    assert streamed["mean"] == at_end["mean"] and 0.5 < streamed["mean"]["image_auroc"] <= 1
