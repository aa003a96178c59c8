"""Images/s of an epoch through CachedDataset vs decoding and resizing the files every epoch.

The baseline Dataset does per item what the released training code does: PIL open,
convert("RGB"), torchvision Resize((256, 256)) bilinear, ToTensor, Normalize(ImageNet). Both
read the same samples through the same DataLoader settings in the same run.

Source images: a temporary MVTec-layout tree of full-size PNGs (default 64 train images of
900x900, like MVTec AD's 700-1024 px photos), composed from photos/textures shipped inside
scikit-image plus mild sensor-like noise so that PNG sizes and decode times are realistic.

    .venv/bin/python benchmarks/data_loading.py [--images 64] [--px 900] [--size 256]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from omniad.data.cache import IMAGENET_MEAN, IMAGENET_STD, CachedDataset, build_cache
from omniad.data.fetch import fetch_dataset
from omniad.data.params import load_params, override
from omniad.data.readers import read_samples
from omniad.data.samples import Sample

CATEGORY = "bottle"


def _photo(rng: np.random.Generator, px: int) -> np.ndarray:
    """A px x px RGB image tiled from scikit-image's bundled photos, plus sensor noise."""
    import skimage.data

    sources = [skimage.data.coffee(), skimage.data.astronaut(), skimage.data.rocket(),
               np.stack([skimage.data.gravel()] * 3, -1), np.stack([skimage.data.brick()] * 3, -1)]
    out = np.empty((px, px, 3), dtype=np.float32)
    tile = 300
    for y in range(0, px, tile):
        for x in range(0, px, tile):
            src = sources[int(rng.integers(len(sources)))]
            h, w = min(tile, px - y), min(tile, px - x)
            sy = int(rng.integers(0, src.shape[0] - h + 1))
            sx = int(rng.integers(0, src.shape[1] - w + 1))
            out[y:y + h, x:x + w] = src[sy:sy + h, sx:sx + w]
    out += rng.normal(0, 2.0, size=out.shape)  # camera noise: real PNGs do not compress flat
    return np.clip(out, 0, 255).astype(np.uint8)


def make_tree(root: Path, n_images: int, px: int, seed: int = 0) -> dict[str, Any]:
    """MVTec layout (one category) with n_images train PNGs and a small test split."""
    rng = np.random.default_rng(seed)
    for i in range(n_images):
        path = root / CATEGORY / "train" / "good" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_photo(rng, px)).save(path)
    for i in range(2):
        for defect in ("good", "broken"):
            path = root / CATEGORY / "test" / defect / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_photo(rng, px)).save(path)
            if defect != "good":
                mask = np.zeros((px, px), dtype=np.uint8)
                mask[px // 3: px // 2, px // 3: px // 2] = 255
                mpath = root / CATEGORY / "ground_truth" / defect / f"{i:03d}_mask.png"
                mpath.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(mpath)
    counts = {"train_normal": n_images, "train_anomaly": 0, "test_normal": 2, "test_anomaly": 2}
    return override(load_params(), "mvtec_ad", categories=[CATEGORY],
                    expected={"totals": counts, "per_category": {CATEGORY: counts}})


class DecodeEveryEpoch(Dataset):
    """The released code's per-item work: decode the full-size file, resize, normalise."""

    def __init__(self, samples: list[Sample], size: int) -> None:
        self.samples = samples
        self.size = size
        self.transform = T.Compose([
            T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.samples[index]
        image = self.transform(Image.open(s.image).convert("RGB"))
        mask = torch.zeros((1, self.size, self.size))  # train images are normal
        return {"image": image, "mask": mask, "label": s.label, "category": s.category,
                "defect": s.defect, "index": index}


def epoch_seconds(dataset: Dataset, batch: int, workers: int) -> tuple[float, int]:
    loader = DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=workers)
    n = 0
    start = time.perf_counter()
    for b in loader:
        n += b["image"].shape[0]
    return time.perf_counter() - start, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--px", type=int, default=900, help="side of the source PNGs")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--loader-workers", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=5, help="cached epochs (median reported)")
    ap.add_argument("--decode-epochs", type=int, default=2, help="decoding epochs (mean)")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="intra-op threads for both paths (1, as in DataLoader worker "
                         "processes; on a busy small machine the pool only adds contention)")
    args = ap.parse_args()
    torch.set_num_threads(args.torch_threads)

    with tempfile.TemporaryDirectory(prefix="omniad-bench-") as tmp:
        root, cache_dir = Path(tmp) / "mvtec_ad", Path(tmp) / "cache"
        t0 = time.perf_counter()
        params = make_tree(root, args.images, args.px)
        fetch_dataset("mvtec_ad", root, params, source=root, log=lambda m: None)
        gen_s = time.perf_counter() - t0
        samples = read_samples("mvtec_ad", root, "train", params=params)
        mb = np.mean([s.image.stat().st_size for s in samples]) / 1e6
        t0 = time.perf_counter()
        build_cache("mvtec_ad", root, args.size, cache_dir, params=params, log=lambda m: None)
        cache_s = time.perf_counter() - t0

        cpus = len(os.sched_getaffinity(0))
        load = os.getloadavg()[0]
        print(f"data loading benchmark: {len(samples)} train images, {args.px}x{args.px} PNG "
              f"(mean {mb:.2f} MB) -> {args.size}x{args.size}, batch {args.batch}, DataLoader "
              f"num_workers {args.loader_workers}, torch threads {args.torch_threads}, "
              f"{cpus} CPUs (load average {load:.1f})")
        print(f"  source tree generated + recorded in {gen_s:.1f} s; cache built once in "
              f"{cache_s:.2f} s ({(len(samples) + 4) / cache_s:.1f} images/s, both splits)")

        decode_ds = DecodeEveryEpoch(samples, args.size)
        cached_ds = CachedDataset(cache_dir, "train")
        assert len(decode_ds) == len(cached_ds)
        n = len(samples)
        dec = [epoch_seconds(decode_ds, args.batch, args.loader_workers)[0]
               for _ in range(args.decode_epochs)]
        cached = [epoch_seconds(cached_ds, args.batch, args.loader_workers)[0]
                  for _ in range(args.epochs)]
        dec_s, first_s, med_s = float(np.mean(dec)), cached[0], float(np.median(cached))

        def line(label: str, secs: float) -> str:
            return f"  {label:<36}: {n} images in {secs:7.3f} s = {n / secs:8.1f} images/s"

        print(line(f"decode + resize every epoch (mean {len(dec)})", dec_s))
        print(line("CachedDataset, first epoch", first_s))
        print(line(f"CachedDataset, median of {len(cached)} epochs", med_s))
        print(f"  speed-up: {dec_s / med_s:.1f}x (median epoch), {dec_s / first_s:.1f}x (first "
              f"epoch); target >= 50x")


if __name__ == "__main__":
    main()
