"""All-or-nothing writes: files via temp + os.replace, trees via a temp sibling + rename.

Used by fetch, demo and cache so that an interrupted run never leaves a half-written result
where a later run would take it for a complete one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO]:
    """A file object whose content appears at path only once complete (temp, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON atomically: readers see the old file or the new one, never half."""
    with atomic_file(path) as fh:
        json.dump(data, fh, indent=1, sort_keys=True, default=str)
        fh.write("\n")


def tmp_sibling(root: Path, tag: str = "tmp") -> Path:
    """A fresh hidden path beside root (same file system, so the final rename is atomic)."""
    return root.parent / f".{root.name}.{tag}-{uuid.uuid4().hex[:8]}"


def remove_stale(root: Path) -> None:
    """Remove temp trees a killed run left beside root (runs on one root are not concurrent)."""
    for tag in ("tmp", "old"):
        for stale in root.parent.glob(f".{root.name}.{tag}-*"):
            shutil.rmtree(stale, ignore_errors=True)


def install_tree(tmp: Path, root: Path) -> None:
    """Move a complete tree into place; an older tree at root is swapped out, then removed."""
    old = None
    if root.exists():
        old = tmp_sibling(root, "old")
        os.rename(root, old)
    os.rename(tmp, root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
