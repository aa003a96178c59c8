"""DRAEM-style synthetic anomalies (used by DeSTSeg): Perlin-noise masks blending in textures.

Per image, as in the official DeSTSeg data code:
  - Perlin noise (gradient noise with the quintic fade 6t^5 - 15t^4 + 10t^3, times sqrt 2) on a
    lattice of 2^tx x 2^ty cells, tx and ty drawn uniformly from [0, ``max_exp``) (6 -> scale
    1..32), rotated by an angle uniform in [-``rotate``, ``rotate``] degrees (zero fill);
  - mask = noise > ``threshold`` (0.5);
  - augmented = image (1 - m) + (1 - beta) texture m + beta image m, beta ~ U(0, ``beta_max``)
    (0.8), in [0, 1] pixel space; the texture is one image of the texture source resized to
    the image size.

Texture sources: the Describable Textures Dataset (``dtd``, the official source: each texture is
a whole DTD image resized) or images shipped inside scikit-image (``package``: no download, for
the offline demo; a random square crop of side 25-100% of the image, randomly flipped, resized).
The package textures exclude the images the demo set itself is drawn from, so a blended texture
is foreign material. Every random draw comes from torch's global CPU generator, which the engine
checkpoints, so a resumed run draws the same anomalies.
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

#: scikit-image images used as textures in ``package`` mode (none is a demo-set source).
PACKAGE_TEXTURES: tuple[str, ...] = (
    "grass", "camera", "moon", "cell", "chelsea", "hubble_deep_field", "immunohistochemistry",
    "retina", "rocket", "page", "text", "clock",
)


def perlin_noise(height: int, width: int, res_y: int, res_x: int) -> torch.Tensor:
    """(height, width) Perlin noise on a res_y x res_x lattice of random unit gradients."""
    angles = 2 * math.pi * torch.rand(res_y + 1, res_x + 1)
    grads = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)  # (ry+1, rx+1, 2)
    ys = torch.arange(height, dtype=torch.float64) * res_y / height
    xs = torch.arange(width, dtype=torch.float64) * res_x / width
    cy, cx = ys.floor().long(), xs.floor().long()
    fy, fx = (ys - cy).float()[:, None], (xs - cx).float()[None, :]

    def corner(dy: int, dx: int) -> torch.Tensor:
        g = grads[(cy + dy)[:, None], (cx + dx)[None, :]]  # (H, W, 2)
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    def fade(t: torch.Tensor) -> torch.Tensor:
        return t ** 3 * (t * (t * 6 - 15) + 10)

    wy, wx = fade(fy), fade(fx)
    top = torch.lerp(corner(0, 0), corner(0, 1), wx)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), wx)
    return math.sqrt(2) * torch.lerp(top, bottom, wy)


def rotate(maps: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, W) maps about their centres by per-map angles, bilinear, zero fill."""
    rad = degrees * math.pi / 180
    cos, sin = torch.cos(rad), torch.sin(rad)
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1)
    grid = F.affine_grid(theta, [maps.shape[0], 1, *maps.shape[-2:]], align_corners=False)
    return F.grid_sample(maps.unsqueeze(1), grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False).squeeze(1)


def perlin_masks(batch: int, height: int, width: int, max_exp: int = 6, threshold: float = 0.5,
                 rotate_deg: float = 90.0) -> torch.Tensor:
    """(B, H, W) float {0, 1} anomaly masks (may be empty, as in the official code)."""
    exps = torch.randint(0, max_exp, (batch, 2))
    noise = torch.stack([perlin_noise(height, width, 2 ** int(ty), 2 ** int(tx)) for ty, tx in exps])
    noise = rotate(noise, (torch.rand(batch) * 2 - 1) * rotate_deg)
    return (noise > threshold).float()


# --------------------------------------------------------------------------------------------
# Texture sources.
# --------------------------------------------------------------------------------------------
@cache
def _package_image(name: str) -> torch.Tensor:
    """(3, H, W) float [0, 1] scikit-image picture (grey images replicated to RGB)."""
    import skimage.data

    arr = np.asarray(getattr(skimage.data, name)())
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    arr = arr[..., :3].astype(np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)


def package_textures(batch: int, height: int, width: int) -> torch.Tensor:
    """(B, 3, H, W) random crops of scikit-image pictures, in [0, 1]."""
    out = []
    for i in torch.randint(0, len(PACKAGE_TEXTURES), (batch,)).tolist():
        img = _package_image(PACKAGE_TEXTURES[i])
        side = min(img.shape[-2:])
        crop = max(8, int(side * (0.25 + 0.75 * float(torch.rand(())))))
        y = int(torch.randint(0, img.shape[-2] - crop + 1, ()))
        x = int(torch.randint(0, img.shape[-1] - crop + 1, ()))
        patch = img[:, y:y + crop, x:x + crop]
        if torch.rand(()) < 0.5:
            patch = patch.flip(-1)
        out.append(F.interpolate(patch[None], size=(height, width), mode="bilinear",
                                 align_corners=False, antialias=True)[0])
    return torch.stack(out)


class DTDTextures:
    """Whole DTD images resized to the image size (the official source), decoded lazily and
    kept in memory as uint8 (5,640 images: about 1.1 GB at 256 px)."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = list(paths)
        self._cache: dict[tuple[int, int, int], torch.Tensor] = {}

    def _load(self, index: int, height: int, width: int) -> torch.Tensor:
        key = (index, height, width)
        if key not in self._cache:
            from PIL import Image

            with Image.open(self.paths[index]) as im:
                im = im.convert("RGB").resize((width, height), Image.BILINEAR)
                self._cache[key] = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
        return self._cache[key]

    def __call__(self, batch: int, height: int, width: int) -> torch.Tensor:
        idx = torch.randint(0, len(self.paths), (batch,)).tolist()
        return torch.stack([self._load(i, height, width) for i in idx]).float() / 255.0


def blend(images: torch.Tensor, textures: torch.Tensor, masks: torch.Tensor, beta_max: float = 0.8
          ) -> torch.Tensor:
    """images (B, 3, H, W) in [0, 1] with textures under masks (B, H, W), per-image beta."""
    beta = (torch.rand(images.shape[0]) * beta_max).to(images).view(-1, 1, 1, 1)
    m = masks.unsqueeze(1)
    return images * (1 - m) + (1 - beta) * textures * m + beta * images * m
