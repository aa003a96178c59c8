"""Checksum locks: the SHA-256 of archives that params cannot pin, written on first trust.

Real-IAD's per-object archives have no published hashes, so the first fetch with
`--trust-first-download` writes what it saw to params/checksums/<dataset>.sha256 (the format
of `sha256sum`, so `cd downloads && sha256sum -c` works too); the user commits that file and
every later fetch, anywhere, verifies against it. Pinned hashes in params win over the lock.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from omniad.atomic import write_bytes_atomic
from omniad.data.params import Params, checksums_dir
from omniad.data.samples import DatasetError

_LINE = re.compile(r"([0-9a-fA-F]{64}) [ *](.+)")


def lock_path(name: str, params: Params) -> Path:
    return checksums_dir(params) / f"{name}.sha256"


def read_lock(name: str, params: Params) -> dict[str, str]:
    """archive name -> SHA-256 from the dataset's lock file (empty when there is none)."""
    path = lock_path(name, params)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read checksum lock: {exc.strerror}") from exc
    out: dict[str, str] = {}
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        match = _LINE.fullmatch(line.strip())
        if match is None:
            raise DatasetError(f"{path}:{i}: expected '<sha256>  <archive name>', got {line!r}")
        out[match.group(2)] = match.group(1).lower()
    return out


def add_to_lock(name: str, params: Params, entries: Mapping[str, str]) -> Path:
    """Add archive hashes to the lock (existing entries are never changed); returns its path."""
    path = lock_path(name, params)
    known = read_lock(name, params)
    clash = {k: v for k, v in entries.items() if k in known and known[k] != v}
    if clash:
        k = sorted(clash)[0]
        raise DatasetError(f"{path}: {k} is locked to {known[k]}, not {clash[k]}")
    known.update(entries)
    lines = [f"# SHA-256 of the {name} archives, written by `omniad data fetch "
             "--trust-first-download`; commit this file to pin them."]
    lines += [f"{sha}  {arch}" for arch, sha in sorted(known.items())]
    write_bytes_atomic(path, "\n".join(lines) + "\n")
    return path
