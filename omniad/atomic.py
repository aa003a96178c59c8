"""All-or-nothing writes: files via temp + os.replace, trees via a temp sibling + rename.

The one write helper of the package (fetch, demo, cache, checkpoints, metrics, reports go
through `atomic_file` / `write_bytes_atomic` / `write_json_atomic`), so that an interrupted run
never leaves a half-written result where a later run would take it for a complete one, and so
that every file gets the mode the umask asks for (a colleague on a shared file system can read
it), not mkstemp's private 0600.

Trees: `install_tree` swaps a complete temporary tree into place in three steps, and
`recover_tree` (run before anything else touches a root) repairs whatever a crash between two
steps left, so that no moment exists at which the only complete copy is deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

Complete = Callable[[Path], bool]


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else set+reset."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO]:
    """A file object whose content appears at path only once complete (temp, fsync, rename).

    The file gets mode 0666 & ~umask, like a file made by open(): mkstemp's 0600 would hide
    it from every other user of a shared file system.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path, data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes atomically; returns path."""
    with atomic_file(Path(path), "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON atomically: readers see the old file or the new one, never half."""
    with atomic_file(path) as fh:
        json.dump(data, fh, indent=1, sort_keys=True, default=str)
        fh.write("\n")


def tmp_sibling(root: Path, tag: str = "tmp") -> Path:
    """A fresh hidden path beside root (same file system, so the final rename is atomic)."""
    return root.parent / f".{root.name}.{tag}-{uuid.uuid4().hex[:8]}"


def _siblings(root: Path, tag: str) -> list[Path]:
    return sorted(root.parent.glob(f".{root.name}.{tag}-*")) if root.parent.is_dir() else []


def _delete_tree(path: Path, marker: str | None) -> None:
    """Delete a tree, its completion marker first: a half-deleted tree never looks complete."""
    if marker is not None:
        try:
            (path / marker).unlink(missing_ok=True)
        except OSError:  # not ours to delete (another user's leftover): leave it whole
            return
    shutil.rmtree(path, ignore_errors=True)


def recover_tree(
    root: Path, complete: Complete, marker: str | None = None, log: Callable[[str], None] = print
) -> None:
    """Repair what a killed `install_tree` left beside root, then remove the leftovers.

    Root missing or incomplete: a complete new tree (.tmp-*, its marker is written last) is
    put in place, else a complete old one (.old-*). Leftovers are deleted only once root is
    complete; an old tree is never deleted while it might be the only complete copy.
    """
    if not root.exists() or not complete(root):
        for cand in [p for p in _siblings(root, "tmp") if complete(p)] + \
                    [p for p in _siblings(root, "old") if complete(p)]:
            if root.exists():  # an incomplete root (no marker) is moved aside, not deleted
                os.rename(root, tmp_sibling(root, "bad"))
            os.rename(cand, root)
            log(f"{root}: recovered the complete tree {cand.name} left by an interrupted run")
            break
    for stale in _siblings(root, "tmp"):
        _delete_tree(stale, marker)  # never complete here: a complete one was installed above
    if root.exists() and complete(root):
        for stale in _siblings(root, "old"):
            _delete_tree(stale, marker)


def remove_stale(root: Path, marker: str | None = None) -> None:
    """recover_tree with `marker` (a file written last) as the sign of a complete tree."""
    if marker is None:  # no way to tell complete from partial: only temp trees may go
        for stale in _siblings(root, "tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        return
    recover_tree(root, lambda p: (p / marker).is_file(), marker, log=lambda _m: None)


def install_tree(tmp: Path, root: Path, marker: str | None = None) -> None:
    """Move a complete tree into place: old root aside, new one in, old one deleted.

    A crash between two steps leaves a complete tree at root or beside it (.old-* or the
    complete .tmp-*), which `recover_tree` puts back; a failed second step is undone here.
    """
    old = None
    if root.exists():
        old = tmp_sibling(root, "old")
        os.rename(root, old)
    try:
        os.rename(tmp, root)
    except BaseException:
        if old is not None and not root.exists():
            os.rename(old, root)
        raise
    if old is not None:
        _delete_tree(old, marker)
