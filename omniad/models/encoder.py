"""Frozen timm feature encoders with explicit, offline-safe weight resolution.

Weights are never downloaded at model-build time and never silently replaced by random ones:
``pretrained`` is a timm tag resolved from the local Hugging Face cache, a local weights file,
or ``False`` (random init, which only the demo protocol uses and its report states).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import timm
import torch
from pydantic import BeforeValidator
from torch import nn

#: Default pretrained tag per backbone (timm >= 1.0 names, see DESIGN.md / BASELINES.md).
DEFAULT_TAGS: dict[str, str] = {
    "resnet18": "resnet18.tv_in1k",
    "resnet34": "resnet34.bt_in1k",
    "resnet50": "resnet50.tv_in1k",
    "wide_resnet50_2": "wide_resnet50_2.tv_in1k",
    "tf_efficientnet_b4": "tf_efficientnet_b4.aa_in1k",
    "tf_efficientnet_b6": "tf_efficientnet_b6.aa_in1k",
}



def _false_like(v: object) -> object:
    return False if v in (None, "false", "False", "none") else v


#: A method config's ``pretrained`` field: a timm tag or weights name, or False (random init);
#: params may spell False as null, "false", "False" or "none" (yaml and the command line).
Pretrained = Annotated[str | bool, BeforeValidator(_false_like)]

class WeightsNotFoundError(FileNotFoundError):
    """Raised when pretrained weights are asked for but are not on this machine."""


def _cached_hub_file(hub_id: str) -> Path | None:
    """Return the cached safetensors/bin file of a timm hub id, without touching the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with timm
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(hub_id, filename)
        if isinstance(hit, str) and os.path.exists(hit):
            return Path(hit)
    return None


def resolve_weights(arch: str, pretrained: str | bool | None) -> tuple[str, Path | None]:
    """Map a ``pretrained`` setting to (timm model name, local weights file or None).

    ``True`` means the architecture's default tag. A tag must name this architecture.
    """
    if pretrained is None or pretrained is False:
        return arch, None
    if pretrained is True:
        pretrained = DEFAULT_TAGS.get(arch, arch)
    assert isinstance(pretrained, str)
    as_path = Path(os.path.expanduser(pretrained))
    if as_path.suffix in {".pth", ".pt", ".bin", ".safetensors"} or as_path.exists():
        if not as_path.is_file():
            raise WeightsNotFoundError(f"pretrained weights file {as_path} does not exist")
        return arch, as_path
    name = pretrained
    if name.split(".")[0] != arch:
        raise ValueError(f"pretrained tag {name!r} does not belong to backbone {arch!r}")
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise ValueError(f"unknown timm pretrained tag {name!r}")
    hub_id = cfg.hf_hub_id or f"timm/{name}"
    hit = _cached_hub_file(hub_id)
    if hit is None:
        raise WeightsNotFoundError(
            f"pretrained weights {name!r} are not in the local cache. On a machine with internet "
            f"run `omniad weights fetch {name}` (or `huggingface-cli download {hub_id}`), copy "
            f"~/.cache/huggingface/hub to this machine, or pass a local file as "
            f"pretrained: /path/to/weights.safetensors. Use pretrained: false only on purpose "
            f"(random encoder)."
        )
    return name, hit


class FrozenBackbone(nn.Module):
    """Base of the frozen feature extractors: no gradients, always in eval mode.

    ``train()`` is a no-op for it, so BatchNorm statistics are never updated by training. A
    random (demo) backbone can have them estimated once from normal training images with
    :func:`calibrate_random_backbones`: a random network's BatchNorm keeps its init
    statistics (mean 0, var 1), under which activations shrink stage after stage (a random
    EfficientNet-B4's stage 3 has a mean token norm of 0.011), and the deep features a method
    reconstructs carry no signal.
    """

    body: nn.Module
    pretrained: str
    #: Features handed in by the engine (the feature cache): the next forward returns them.
    _fed: list[torch.Tensor] | None = None

    def _load(self, arch: str, pretrained: str | bool | None, **timm_kwargs: object) -> None:
        """Build ``body`` from timm with locally resolved weights (or random), frozen."""
        name, weights = resolve_weights(arch, pretrained)
        if weights is not None:
            timm_kwargs |= {"pretrained": True, "pretrained_cfg_overlay":
                            {"file": str(weights), "hf_hub_id": None, "url": None}}
        self.body = timm.create_model(name, **timm_kwargs)
        self.pretrained = str(pretrained) if pretrained else "random"
        for p in self.body.parameters():
            p.requires_grad_(False)
        self.body.eval()

    def train(self, mode: bool = True) -> FrozenBackbone:  # noqa: D102 - stays in eval mode
        super().train(False)
        return self

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.body(x)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self._fed is not None:
            return self._take_fed(x)
        return [f.detach() for f in self._features(x)]

    @contextmanager
    def feed(self, features: list[torch.Tensor]) -> Iterator[None]:
        """Inside the block, the next forward returns ``features`` (this backbone's own
        output, computed earlier) instead of recomputing them: the method's math is untouched.
        A second forward in the block is an error, so a method that runs its backbone on other
        inputs (DeSTSeg's augmented images) cannot silently get the cached ones."""
        self._fed = list(features)
        try:
            yield
        finally:
            self._fed = None

    def _take_fed(self, x: torch.Tensor) -> list[torch.Tensor]:
        fed = self._fed
        assert fed is not None
        if not fed:
            raise RuntimeError(f"{type(self).__name__}: called twice in one fed step; this "
                               "method's backbone input is not cacheable (set cached_backbone "
                               "= None on the method)")
        if fed[0].shape[0] != x.shape[0]:
            raise RuntimeError(f"{type(self).__name__}: fed features for {fed[0].shape[0]} "
                               f"images, called on {x.shape[0]}")
        self._fed = []
        return fed


def state_fingerprint(module: nn.Module) -> str:
    """SHA-256 of a module's state (names, dtypes, shapes, bytes): two backbones with equal
    fingerprints compute the same features. Keys a feature cache to the exact encoder state
    (weights tag or random init, and calibrated BatchNorm statistics)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def build_backbone(spec: dict[str, object]) -> FrozenBackbone:
    """A frozen backbone from ``{"class": "module:Class", "kwargs": {...}}`` (a method's
    :meth:`~omniad.models.base.ADMethod.backbone_spec`)."""
    import importlib

    module, _, attr = str(spec["class"]).partition(":")
    cls = getattr(importlib.import_module(module), attr)
    kwargs = dict(spec.get("kwargs") or {})  # type: ignore[call-overload]
    return cls(**kwargs)


@torch.no_grad()
def calibrate_random_backbones(model: nn.Module, images: torch.Tensor,
                               skip: tuple[nn.Module, ...] = ()) -> int:
    """Set the BatchNorm running statistics of every random :class:`FrozenBackbone` in
    ``model`` to the mean and variance of its input over ``images``; returns the number of
    backbones calibrated.

    One forward pass in training mode over all the images as one batch: each layer then sees
    its predecessors normalised by exactly the statistics it is given, so the eval-mode network
    equals the train-mode one on these images. (Averaging per-batch statistics instead is not
    equivalent: a batch of one category hides the variance between categories, and the error
    compounds with depth: features 100x too large on the demo set.) Only random backbones are
    touched: pretrained statistics are part of the weights. ``skip``: backbones whose state
    comes from elsewhere (a feature cache's calibrated copy).
    """
    targets = [m for m in model.modules() if isinstance(m, FrozenBackbone)
               and m.pretrained == "random" and not any(m is k for k in skip)]
    norms = [n for m in targets for n in m.body.modules() if isinstance(n, nn.modules.batchnorm._BatchNorm)]
    momenta = [n.momentum for n in norms]
    for n in norms:
        n.reset_running_stats()
        n.momentum = None  # one batch, cumulative average: exactly its statistics
    try:
        for m in targets:
            m.body.train()
        with torch.random.fork_rng(devices=[]):  # no RNG draw leaks into training
            for m in targets:
                m._features(images)
    finally:
        for m in targets:
            m.body.eval()
        for n, mom in zip(norms, momenta, strict=True):
            n.momentum = mom
    return len(targets)


class FrozenEncoder(FrozenBackbone):
    """A timm ``features_only`` backbone that stays frozen and in eval mode.

    Frozen means: no gradients, BatchNorm statistics never updated by training, features
    detached, so the optimizer and the loss can never touch it.
    """

    def __init__(
        self,
        arch: str,
        out_indices: tuple[int, ...] | list[int] = (1, 2, 3),
        pretrained: str | bool | None = True,
    ) -> None:
        super().__init__()
        self._load(arch, pretrained, features_only=True, out_indices=tuple(out_indices))
        self.channels: list[int] = list(self.body.feature_info.channels())
        self.reductions: list[int] = list(self.body.feature_info.reduction())

    @staticmethod
    def spec(arch: str, out_indices: tuple[int, ...] | list[int],
             pretrained: str | bool | None) -> dict[str, object]:
        """The constructor call as data (a method's ``backbone_spec``)."""
        return {"class": f"{__name__}:FrozenEncoder",
                "kwargs": {"arch": arch, "out_indices": list(out_indices),
                           "pretrained": pretrained}}
