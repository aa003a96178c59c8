"""``omniad weights fetch|check``: put pretrained encoder weights into the local cache.

Models never download at build time (a compute node may have no internet, and a silent
fallback to random weights would poison a table); this command is the one place that does,
run once on a machine with access. Weights land in the Hugging Face cache that timm reads.
"""

from __future__ import annotations

import argparse

import timm

from omniad.models.encoder import DEFAULT_TAGS, WeightsNotFoundError, resolve_weights


def hub_id(tag: str) -> str:
    cfg = timm.models.get_pretrained_cfg(tag)
    if cfg is None:
        raise ValueError(f"unknown timm pretrained tag {tag!r}")
    return cfg.hf_hub_id or f"timm/{tag}"


def fetch(tag: str) -> str:
    """Download a tag's weights into the HF cache and check they load; returns the file."""
    from huggingface_hub import hf_hub_download

    arch = tag.split(".")[0]
    path = hf_hub_download(hub_id(tag), "model.safetensors")
    timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": path})
    return path


def cli(args: argparse.Namespace) -> int:
    tags = args.tags or sorted(set(DEFAULT_TAGS.values()))
    status = 0
    for tag in tags:
        if args.what == "fetch":
            print(f"{tag}: {fetch(tag)}")
            continue
        try:
            _, path = resolve_weights(tag.split(".")[0], tag)
            print(f"{tag}: cached at {path}")
        except WeightsNotFoundError:
            print(f"{tag}: MISSING (omniad weights fetch {tag})")
            status = 1
    return status
