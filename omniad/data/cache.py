"""A resized uint8 cache of a dataset, and the torch Dataset that reads only that cache.

Decoding and resizing full-size PNG/JPEG files costs tens of milliseconds per image and is
repeated every epoch by the released training code; doing it once and memory-mapping the
result turns an epoch's input pipeline into a copy.

Layout of a cache directory:
    cache_key.json                  what the cache was built from (written last = complete)
    sources.json                    per source file: size, mtime, SHA-256 (the content key)
    index.json                      per split: categories with counts and array files, and
                                    per sample: category, defect, label, source paths
    <split>/<category>_images.npy   uint8 (N, S, S, 3) RGB
    <split>/<category>_masks.npy    uint8 (N, S, S) in {0, 1}

Resizing: images are decoded with PIL (convert("RGB")) and resized as uint8 tensors with
torchvision.transforms.functional.resize(bilinear, antialias=True), which matches the PIL
bilinear filter that torchvision's Resize applies to PIL images in the released code (within
one grey level). Masks: `bilinear_threshold` (MVTec, VisA, demo; the released protocol) resizes
the 0/1 mask bilinearly and keeps > 0.5; `nearest` (Real-IAD) uses nearest neighbour.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from numpy.lib.format import open_memmap
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from tqdm import tqdm

from omniad.atomic import install_tree, remove_stale, tmp_sibling, write_json_atomic
from omniad.constants import IMAGENET_MEAN, IMAGENET_STD
from omniad.data.manifest import MANIFEST_NAME, read_manifest, sha256_file
from omniad.data.params import Params, dataset_facts, load_params, resolve_categories
from omniad.data.readers import read_samples
from omniad.data.samples import SPLITS, DatasetError, Sample

CACHE_FORMAT = 1
KEY_NAME = "cache_key.json"
INDEX_NAME = "index.json"
SOURCES_NAME = "sources.json"
IMAGE_RESIZE = "PIL decode -> torchvision resize bilinear antialias=True on uint8"
Log = Callable[[str], None]


def default_workers() -> int:
    """CPUs this process may use (respects taskset/cgroup affinity, unlike os.cpu_count)."""
    return max(1, len(os.sched_getaffinity(0)))


# --------------------------------------------------------------------------------------------
# decoding and resizing one sample
# --------------------------------------------------------------------------------------------


def decode_image(path: Path) -> np.ndarray:
    """HxWx3 uint8 RGB pixels, fully decoded (a truncated file fails here, not later)."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))  # writable copy: torch refuses read-only
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{path}: cannot decode image: {exc}") from exc


def decode_mask(path: Path) -> np.ndarray:
    """HxW bool mask: any non-zero value (or channel, or palette index) is anomalous."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{path}: cannot decode mask: {exc}") from exc
    return arr.any(axis=-1) if arr.ndim == 3 else arr > 0


def load_sample(sample: Sample, size: int, mask_resize: str) -> tuple[np.ndarray, np.ndarray]:
    """(image (S,S,3) uint8, mask (S,S) uint8 0/1) of one sample, resized to size x size."""
    img = decode_image(sample.image)
    t = torch.from_numpy(img).permute(2, 0, 1)
    out = TF.resize(t, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    image = out.permute(1, 2, 0).contiguous().numpy()
    if sample.mask is None:
        return image, np.zeros((size, size), dtype=np.uint8)
    mask = decode_mask(sample.mask)
    if mask.shape != img.shape[:2]:
        raise DatasetError(f"{sample.mask}: mask size {mask.shape[1]}x{mask.shape[0]} differs "
                           f"from image size {img.shape[1]}x{img.shape[0]} ({sample.image})")
    m = torch.from_numpy(mask.astype(np.uint8))[None]
    if mask_resize == "nearest":
        small = TF.resize(m, [size, size], interpolation=InterpolationMode.NEAREST)
    else:
        small = TF.resize(m.float(), [size, size], interpolation=InterpolationMode.BILINEAR,
                          antialias=True) > 0.5
    return image, small[0].to(torch.uint8).numpy()


# --------------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------------


def cache_key(
    name: str,
    root: Path | str,
    size: int,
    *,
    categories: list[str] | None = None,
    params: Params | None = None,
    **reader_opts: Any,
) -> dict[str, Any]:
    """What a cache depends on: the source manifest's tree hash, the size, the selection."""
    params = params if params is not None else load_params()
    facts = dataset_facts(name, params)
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root of {name} does not exist")
    manifest = read_manifest(root)
    if manifest is None and facts.get("generated"):
        raise DatasetError(f"{root}: no {MANIFEST_NAME}, so the source cannot be identified; "
                           f"generate it with `omniad data demo --root {root}`")
    if manifest is None:
        raise DatasetError(f"{root}: no {MANIFEST_NAME}, so the source cannot be identified; "
                           f"record the tree you extracted with `omniad data fetch {name} "
                           f"--root {root} --source {root}`, or fetch it into an empty --root")
    if manifest.get("dataset") != name:
        raise DatasetError(f"{root}: holds dataset {manifest.get('dataset')!r} (by its "
                           f"{MANIFEST_NAME}), not {name!r}")
    opts = {k: (sorted(map(str, v)) if isinstance(v, list | tuple | set) else v)
            for k, v in sorted(reader_opts.items()) if v is not None}
    key = {
        "format": CACHE_FORMAT,
        "dataset": name,
        "size": int(size),
        "source_tree_sha256": manifest["tree_sha256"],
        "categories": resolve_categories(name, facts, categories),
        "reader_opts": opts,
        "image_resize": IMAGE_RESIZE,
        "mask_resize": facts.get("mask_resize", "bilinear_threshold"),
    }
    key["sha256"] = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return key


def _stored_key(cache_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((cache_dir / KEY_NAME).read_text())
    except (OSError, ValueError):
        return None


def source_table(
    paths: list[Path], root: Path, known: dict[str, list] | None = None
) -> dict[str, list]:
    """rel path -> [size, mtime_ns, SHA-256] of the files a cache is made from.

    A file whose size and mtime equal the `known` entry keeps its hash (as git's index does);
    any other is hashed again, so an edited or replaced image changes the content key even
    when the dataset manifest was not updated.
    """
    known = known or {}
    out: dict[str, list] = {}
    for path in paths:
        rel = _rel(path, root) or str(path)
        st = Path(path).stat()
        old = known.get(rel)
        if old is not None and old[0] == st.st_size and old[1] == st.st_mtime_ns:
            out[rel] = old
        else:
            out[rel] = [st.st_size, st.st_mtime_ns, sha256_file(Path(path))]
    return out


def _content_digest(table: dict[str, list]) -> str:
    digest = hashlib.sha256()
    for rel in sorted(table):
        digest.update(f"{rel}\0{table[rel][2]}\n".encode())
    return digest.hexdigest()


def _read_table(cache_dir: Path) -> dict[str, list]:
    try:
        return json.loads((cache_dir / SOURCES_NAME).read_text())
    except (OSError, ValueError):
        return {}


def build_cache(
    name: str,
    root: Path | str,
    size: int,
    cache_dir: Path | str,
    *,
    categories: list[str] | None = None,
    params: Params | None = None,
    workers: int | None = None,
    force: bool = False,
    progress: bool = False,
    log: Log = print,
    **reader_opts: Any,
) -> Path:
    """Resize every image and mask of a dataset once into cache_dir; returns cache_dir.

    An existing complete cache with the same key (source manifest hash, the content hash of
    every source file used, size, categories, reader options) is reused; anything else is
    rebuilt in a temporary directory and swapped in, so cache_dir is always either the old
    complete cache or the new one. Only cache_dir is written: root may be read-only.
    """
    if size < 8:
        raise DatasetError(f"cache size must be >= 8, got {size}")
    params = params if params is not None else load_params()
    facts = dataset_facts(name, params)
    root, cache_dir = Path(root).absolute(), Path(cache_dir).absolute()
    remove_stale(cache_dir, KEY_NAME)  # first: puts back a cache a killed swap left aside
    key = cache_key(name, root, size, categories=categories, params=params, **reader_opts)
    splits = ("train",) if facts["layout"] == "dtd" else SPLITS
    per_split = {s: read_samples(name, root, s, key["categories"], params=params, **reader_opts)
                 for s in splits}
    stored = _stored_key(cache_dir)
    sources = [p for ss in per_split.values() for s in ss for p in (s.image, s.mask) if p]
    table = source_table(sources, root, _read_table(cache_dir) if stored else None)
    key["content_sha256"] = _content_digest(table)
    key["sha256"] = hashlib.sha256(json.dumps(
        {k: v for k, v in key.items() if k != "sha256"}, sort_keys=True).encode()).hexdigest()
    if not force and stored is not None and stored.get("sha256") == key["sha256"]:
        log(f"{name}: reusing cache {cache_dir} (key {key['sha256'][:12]})")
        return cache_dir
    if stored is not None and stored.get("content_sha256") not in (None, key["content_sha256"]):
        old = _read_table(cache_dir)
        changed = sorted(r for r in table if old.get(r, [None] * 3)[2] != table[r][2])
        if changed:
            log(f"{name}: {len(changed)} source file(s) changed since {cache_dir} was built "
                f"(first: {root / changed[0]}); rebuilding")
    if cache_dir.exists() and stored is None and any(cache_dir.iterdir()):
        raise DatasetError(f"{cache_dir}: exists and is not an omniad cache (no {KEY_NAME}); "
                           "refusing to replace it")
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(cache_dir)
    try:
        index = _write_arrays(tmp, root, size, per_split, key, facts,
                              workers or default_workers(), progress)
        write_json_atomic(tmp / INDEX_NAME, index)
        write_json_atomic(tmp / SOURCES_NAME, table)
        write_json_atomic(tmp / KEY_NAME, key)  # last: its presence means complete
        install_tree(tmp, cache_dir, KEY_NAME)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    total = sum(len(v) for v in per_split.values())
    log(f"{name}: cached {total} images at {size}x{size} in {cache_dir}")
    return cache_dir


def _rel(path: Path | None, root: Path) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).absolute().relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _write_arrays(
    tmp: Path,
    root: Path,
    size: int,
    per_split: dict[str, list[Sample]],
    key: dict[str, Any],
    facts: dict[str, Any],
    workers: int,
    progress: bool,
) -> dict[str, Any]:
    """Fill one images/masks .npy pair per (split, category) and return the index."""
    mask_resize = facts.get("mask_resize", "bilinear_threshold")
    index: dict[str, Any] = {"format": CACHE_FORMAT, "key": key["sha256"], "size": size,
                             "dataset": key["dataset"], "splits": {}}
    jobs: list[tuple[np.ndarray, np.ndarray, int, Sample]] = []
    for split, samples in per_split.items():
        (tmp / split).mkdir(parents=True)
        cats: dict[str, dict[str, Any]] = {}
        records = []
        for cat in key["categories"]:
            members = [s for s in samples if s.category == cat]
            images_rel, masks_rel = f"{split}/{cat}_images.npy", f"{split}/{cat}_masks.npy"
            images = open_memmap(tmp / images_rel, mode="w+", dtype=np.uint8,
                                 shape=(len(members), size, size, 3))
            masks = open_memmap(tmp / masks_rel, mode="w+", dtype=np.uint8,
                                shape=(len(members), size, size))
            cats[cat] = {"count": len(members), "images": images_rel, "masks": masks_rel}
            for i, s in enumerate(members):
                records.append({"category": cat, "i": i, "defect": s.defect, "label": s.label,
                                "path": _rel(s.image, root), "mask_path": _rel(s.mask, root)})
                jobs.append((images, masks, i, s))
        index["splits"][split] = {"categories": cats, "samples": records}

    def work(job: tuple[np.ndarray, np.ndarray, int, Sample]) -> None:
        images, masks, i, sample = job
        images[i], masks[i] = load_sample(sample, size, mask_resize)

    # PIL decoding and torch resizing release the GIL, so threads scale without pickling.
    torch_threads = torch.get_num_threads()
    bar = tqdm(total=len(jobs), desc=f"cache {key['dataset']} {size}px", disable=not progress)
    try:
        if workers > 1:
            torch.set_num_threads(1)
            with ThreadPoolExecutor(workers) as pool:
                for _ in pool.map(work, jobs):
                    bar.update()
        else:
            for job in jobs:
                work(job)
                bar.update()
    finally:
        torch.set_num_threads(torch_threads)
        bar.close()
    for images, masks, _, _ in jobs:
        images.flush()
        masks.flush()
    return index


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


class CachedDataset(Dataset):
    """Items of one split of a cache, as dicts of tensors; it never touches the source files.

    item = {"image": float32 (3,S,S) ImageNet-normalised, "mask": float32 (1,S,S) in {0,1},
            "label": int, "category": str, "defect": str, "index": int (position in this
            dataset)}. Arrays are memory-mapped lazily, per process, so DataLoader workers
    share the page cache instead of pickling arrays.
    """

    def __init__(
        self, cache_dir: Path | str, split: str, categories: list[str] | None = None
    ) -> None:
        self.cache_dir = Path(cache_dir)
        if _stored_key(self.cache_dir) is None:
            raise DatasetError(f"{self.cache_dir}: not a complete cache (no {KEY_NAME}); "
                               f"build it with `omniad data cache <dataset> --root <its root> "
                               f"--out {self.cache_dir}`")
        try:
            index = json.loads((self.cache_dir / INDEX_NAME).read_text())
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{self.cache_dir / INDEX_NAME}: unreadable index: {exc}") from exc
        if split not in index["splits"]:
            raise DatasetError(f"{self.cache_dir}: no {split!r} split (has "
                               f"{', '.join(index['splits'])})")
        info = index["splits"][split]
        known = list(info["categories"])
        if categories is not None:
            unknown = [c for c in categories if c not in known]
            if unknown:
                raise DatasetError(f"{self.cache_dir}: unknown categories {unknown} "
                                   f"(cached: {', '.join(known)})")
        wanted = set(known if categories is None else categories)
        self.split = split
        self.size: int = index["size"]
        self.categories = [c for c in known if c in wanted]
        self.records: list[dict[str, Any]] = [r for r in info["samples"]
                                              if r["category"] in wanted]
        if not self.records:
            raise DatasetError(f"{self.cache_dir}: empty split {split!r} for {self.categories}")
        self._files = {c: info["categories"][c] for c in self.categories}
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        # (x / 255 - mean) / std as one multiply and one subtract, per channel
        std = np.asarray(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)
        self._scale = (1.0 / (255.0 * std)).astype(np.float32)
        self._shift = (np.asarray(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1) / std)

    def __len__(self) -> int:
        return len(self.records)

    def _open(self, category: str) -> tuple[np.ndarray, np.ndarray]:
        arrays = self._arrays.get(category)
        if arrays is None:
            files = self._files[category]
            arrays = (np.load(self.cache_dir / files["images"], mmap_mode="r"),
                      np.load(self.cache_dir / files["masks"], mmap_mode="r"))
            self._arrays[category] = arrays
        return arrays

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.records[index]
        images, masks = self._open(rec["category"])
        # numpy, single-threaded: tiny per-item torch ops would wake the intra-op thread pool,
        # which costs more than the work itself (badly so on a busy machine)
        image = np.empty((3, self.size, self.size), dtype=np.float32)
        np.multiply(images[rec["i"]].transpose(2, 0, 1), self._scale, out=image)
        image -= self._shift
        mask = masks[rec["i"]].astype(np.float32)[None]
        return {"image": torch.from_numpy(image), "mask": torch.from_numpy(mask),
                "label": int(rec["label"]),
                "category": rec["category"], "defect": rec["defect"], "index": index}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"] = {}  # memmaps are reopened in the receiving process
        return state
