"""Datasets for omniad-bench: readers, fetch/verify, check, resized cache, demo set.

Names are imported lazily so that `import omniad.data` stays cheap (torch loads only with the
cache).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Sample": "samples",
    "DatasetError": "samples",
    "ChecksumError": "samples",
    "ArchiveError": "samples",
    "load_params": "params",
    "read_samples": "readers",
    "fetch_dataset": "fetch",
    "check_dataset": "check",
    "CheckReport": "check",
    "build_cache": "cache",
    "CachedDataset": "cache",
    "make_demo": "demo",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'omniad.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"omniad.data.{_EXPORTS[name]}"), name)
