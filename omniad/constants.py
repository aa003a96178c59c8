"""Numbers more than one layer needs, defined once: data normalises with them, models that
draw synthetic anomalies undo it, the evaluator un-normalises images for figures."""

from __future__ import annotations

#: torchvision's ImageNet channel statistics (RGB), the normalisation of every cached image.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
