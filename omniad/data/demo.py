"""A tiny deterministic anomaly-detection set in the MVTec layout (`omniad data demo`).

Built from images shipped inside scikit-image, so it needs no download and the whole
pipeline can run end to end on a CPU. Each defect is painted through a mask, so the mask is
exactly the painted shape and no pixel outside it changes.
"""

from __future__ import annotations

import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from omniad.atomic import install_tree, remove_stale, tmp_sibling
from omniad.data.manifest import MANIFEST_NAME, list_files, read_manifest, write_manifest
from omniad.data.params import Params, dataset_facts, resolve_categories
from omniad.data.samples import NORMAL_DEFECT, DatasetError

DATASET = "demo"
Rng = np.random.Generator


@dataclass(frozen=True)
class Recipe:
    """How to draw one category: its normal image generator and its defect types."""

    kind: str  # "texture" or "object"
    source: str  # skimage.data function name
    defects: tuple[str, ...]
    center: tuple[int, int] = (0, 0)  # objects: crop centre in the source image
    crop: int = 0  # objects: crop side in source pixels
    jitter: int = 0  # objects: max shift of the crop centre, source pixels


RECIPES: dict[str, Recipe] = {
    "brick": Recipe("texture", "brick", ("scratch", "hole", "stain")),
    "gravel": Recipe("texture", "gravel", ("scratch", "hole", "cut_paste")),
    "coffee": Recipe("object", "coffee", ("scratch", "stain", "cut_paste"),
                     center=(290, 200), crop=380, jitter=8),
    "coins": Recipe("object", "coins", ("scratch", "hole", "stain"),
                    center=(212, 190), crop=76, jitter=2),
}
# Foreign material pasted by cut_paste: visibly different from the category it lands on.
_PASTE_SOURCE = {"gravel": "astronaut", "coffee": "brick"}


@cache
def _source(name: str) -> Image.Image:
    import skimage.data

    arr = getattr(skimage.data, name)()
    return Image.fromarray(arr).convert("RGB")


def _stream(seed: int, *names: object) -> Rng:
    """An independent, reproducible random stream per (seed, category, split, defect, index).

    Independent streams keep, e.g., the test images unchanged when the train count changes.
    """
    words = [seed] + [zlib.crc32(str(n).encode()) for n in names]
    return np.random.default_rng(words)


def normal_image(category: str, rng: Rng, size: int) -> np.ndarray:
    """A defect-free HxWx3 uint8 image of a category."""
    recipe = RECIPES[category]
    src = _source(recipe.source)
    if recipe.kind == "texture":
        side = int(size * 1.25)  # a little downscaling keeps the texture crisp
        x = int(rng.integers(0, src.width - side + 1))
        y = int(rng.integers(0, src.height - side + 1))
        img = src.crop((x, y, x + side, y + side)).resize((size, size), Image.BILINEAR)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
    else:
        dx, dy = rng.integers(-recipe.jitter, recipe.jitter + 1, size=2)
        cx, cy, half = recipe.center[0] + int(dx), recipe.center[1] + int(dy), recipe.crop // 2
        img = src.crop((cx - half, cy - half, cx + half, cy + half))
        img = img.resize((size, size), Image.BILINEAR)
    gain = rng.uniform(0.94, 1.06)  # lighting jitter
    return np.clip(np.asarray(img, dtype=np.float32) * gain, 0, 255).astype(np.uint8)


def _place(rng: Rng, size: int, recipe: Recipe, margin: int) -> tuple[int, int]:
    """A defect centre: anywhere on a texture, on the object (central region) otherwise."""
    if recipe.kind == "texture":
        lo, hi = margin, size - margin
    else:
        lo, hi = int(size * 0.3), int(size * 0.7)
    return int(rng.integers(lo, hi)), int(rng.integers(lo, hi))


def _contrast(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Near-white on dark areas, near-black on bright ones: a scratch must be obvious."""
    mean = img[mask].mean() if mask.any() else 128
    return np.array([250, 250, 245] if mean < 128 else [10, 10, 15], dtype=np.float32)


def _scratch(img: np.ndarray, rng: Rng, recipe: Recipe, category: str) -> np.ndarray:
    size = img.shape[0]
    s = size / 128
    x, y = _place(rng, size, recipe, int(20 * s))
    pts = [(x, y)]
    angle = rng.uniform(0, np.pi)
    for _ in range(3):
        angle += rng.uniform(-0.5, 0.5)
        step = rng.uniform(12, 22) * s
        x, y = x + step * np.cos(angle), y + step * np.sin(angle)
        pts.append((float(np.clip(x, 2, size - 3)), float(np.clip(y, 2, size - 3))))
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).line(pts, fill=255, width=max(2, round(2 * s)))
    return np.asarray(mask) > 0


def _hole(img: np.ndarray, rng: Rng, recipe: Recipe, category: str) -> np.ndarray:
    size = img.shape[0]
    s = size / 128
    x, y = _place(rng, size, recipe, int(16 * s))
    rx, ry = rng.uniform(6, 12, size=2) * s
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).ellipse((x - rx, y - ry, x + rx, y + ry), fill=255)
    return np.asarray(mask) > 0


def _stain(img: np.ndarray, rng: Rng, recipe: Recipe, category: str) -> np.ndarray:
    size = img.shape[0]
    s = size / 128
    x, y = _place(rng, size, recipe, int(20 * s))
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    for _ in range(4):  # a blob: overlapping ellipses
        ox, oy = rng.uniform(-7, 7, size=2) * s
        rx, ry = rng.uniform(5, 10, size=2) * s
        draw.ellipse((x + ox - rx, y + oy - ry, x + ox + rx, y + oy + ry), fill=255)
    return np.asarray(mask) > 0


def _cut_paste(img: np.ndarray, rng: Rng, recipe: Recipe, category: str) -> np.ndarray:
    size = img.shape[0]
    s = size / 128
    w, h = (rng.uniform(18, 30, size=2) * s).astype(int)
    x, y = _place(rng, size, recipe, int(18 * s))
    x0, y0 = int(np.clip(x - w // 2, 0, size - w)), int(np.clip(y - h // 2, 0, size - h))
    mask = np.zeros((size, size), dtype=bool)
    mask[y0:y0 + h, x0:x0 + w] = True
    return mask


_SHAPES: dict[str, Callable[[np.ndarray, Rng, Recipe, str], np.ndarray]] = {
    "scratch": _scratch,
    "hole": _hole,
    "stain": _stain,
    "cut_paste": _cut_paste,
}


def _paint(img: np.ndarray, mask: np.ndarray, defect: str, rng: Rng, category: str) -> np.ndarray:
    """Change the pixels under mask (and only those) in the way of the defect type."""
    out = img.astype(np.float32)
    size = img.shape[0]
    if defect == "scratch":
        out[mask] = _contrast(img, mask)
    elif defect == "hole":
        yy, xx = np.nonzero(mask)
        cy, cx = yy.mean(), xx.mean()
        r = np.hypot(yy - cy, xx - cx)
        shade = 12 + 50 * (r / (r.max() + 1e-6))  # dark pit, lighter at the rim
        out[yy, xx] = np.stack([shade * 1.1, shade * 0.9, shade * 0.8], axis=1)
    elif defect == "stain":
        color = np.array([rng.uniform(150, 200), rng.uniform(20, 70), rng.uniform(0, 40)])
        out[mask] = 0.25 * out[mask] + 0.75 * color
    elif defect == "cut_paste":
        src = np.asarray(_source(_PASTE_SOURCE.get(category, "gravel")), dtype=np.float32)
        yy, xx = np.nonzero(mask)
        h, w = yy.max() - yy.min() + 1, xx.max() - xx.min() + 1
        sy = int(rng.integers(0, src.shape[0] - h * 2))
        sx = int(rng.integers(0, src.shape[1] - w * 2))
        patch = src[sy:sy + 2 * h:2, sx:sx + 2 * w:2]  # 2x downscaled foreign material
        out[yy.min():yy.min() + h, xx.min():xx.min() + w] = patch
    else:
        raise DatasetError(f"demo: unknown defect type {defect!r}")
    assert out.shape[:2] == (size, size)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def render(
    category: str, seed: int, split: str, defect: str, index: int, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(clean image, final image, mask or None) of one demo sample; a pure function of its args."""
    rng = _stream(seed, category, split, defect, index)
    clean = normal_image(category, rng, size)
    if defect == NORMAL_DEFECT:
        return clean, clean, None
    recipe = RECIPES[category]
    mask = _SHAPES[defect](clean, rng, recipe, category)
    return clean, _paint(clean, mask, defect, rng, category), mask


def _save_png(arr: np.ndarray, path: Path) -> None:
    """PNG through PIL: no timestamp chunk, so equal pixels give equal bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG")


def make_demo(
    root: Path | str,
    seed: int = 0,
    size: int = 128,
    *,
    n_train: int = 32,
    n_test_good: int = 8,
    n_per_defect: int = 4,
    categories: list[str] | None = None,
    params: Params | None = None,
) -> Path:
    """Generate the demo set into root (replacing an earlier demo set) and return root.

    Same arguments give byte-identical files. The manifest records the counts, which
    `omniad data check demo` compares against.
    """
    facts = dataset_facts(DATASET, params)
    cats = resolve_categories(DATASET, facts, categories)
    missing = [c for c in cats if c not in RECIPES]
    if missing:
        raise DatasetError(f"demo: no generator recipe for categories {missing}")
    if size < 64 or min(n_train, n_test_good, n_per_defect) < 1:
        raise DatasetError("demo: size must be >= 64 and every count >= 1")
    root = Path(root).absolute()
    root.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(root, MANIFEST_NAME)  # first: puts back a tree a killed run left aside
    existing = read_manifest(root) if root.is_dir() else None
    if root.exists() and (existing or {}).get("dataset") != DATASET and (
        not root.is_dir() or any(root.iterdir())
    ):
        raise DatasetError(f"{root}: exists and is not a demo set (no demo {MANIFEST_NAME}); "
                           "refusing to overwrite it")
    tmp = tmp_sibling(root, "tmp")
    per_category: dict[str, dict[str, int]] = {}
    try:
        for cat in cats:
            cat_dir = tmp / cat
            for i in range(n_train):
                _save_png(render(cat, seed, "train", NORMAL_DEFECT, i, size)[1],
                          cat_dir / "train" / NORMAL_DEFECT / f"{i:03d}.png")
            for i in range(n_test_good):
                _save_png(render(cat, seed, "test", NORMAL_DEFECT, i, size)[1],
                          cat_dir / "test" / NORMAL_DEFECT / f"{i:03d}.png")
            for defect in RECIPES[cat].defects:
                for i in range(n_per_defect):
                    _, img, mask = render(cat, seed, "test", defect, i, size)
                    assert mask is not None
                    _save_png(img, cat_dir / "test" / defect / f"{i:03d}.png")
                    _save_png(mask.astype(np.uint8) * 255,
                              cat_dir / "ground_truth" / defect / f"{i:03d}_mask.png")
            per_category[cat] = {"train_normal": n_train, "train_anomaly": 0,
                                 "test_normal": n_test_good,
                                 "test_anomaly": n_per_defect * len(RECIPES[cat].defects)}
        totals = {k: sum(c[k] for c in per_category.values())
                  for k in ("train_normal", "train_anomaly", "test_normal", "test_anomaly")}
        write_manifest(
            tmp, DATASET, list_files(tmp),
            generator={"seed": seed, "size": size, "categories": cats,
                       "defects": {c: list(RECIPES[c].defects) for c in cats}},
            expected={"totals": totals, "per_category": per_category},
        )
        install_tree(tmp, root, MANIFEST_NAME)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
