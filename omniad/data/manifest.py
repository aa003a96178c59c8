"""The dataset manifest: every file of an extracted/generated tree with its size and SHA-256.

It is written last (atomically), so a tree with a manifest is a complete tree; its digest keys
the resized cache, so a changed source rebuilds the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omniad.atomic import write_json_atomic
from omniad.data.samples import DatasetError

MANIFEST_NAME = "omniad_manifest.json"
MANIFEST_FORMAT = 1
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (archives are many GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def list_files(root: Path, exclude: Iterable[str] = (MANIFEST_NAME,)) -> list[dict[str, Any]]:
    """Relative path, size and SHA-256 of every file under root, sorted by path.

    A symbolic link (safe extraction only lets through links that stay inside the tree) is
    recorded with its target, hashed as text, and not followed.
    """
    skip = set(exclude)
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        links = [d for d in dirnames if (Path(dirpath) / d).is_symlink()]
        dirnames[:] = sorted(d for d in dirnames if d not in links)
        for fname in sorted(filenames + links):
            path = Path(dirpath) / fname
            rel = path.relative_to(root).as_posix()
            if rel in skip:
                continue
            if path.is_symlink():
                target = os.readlink(path)
                sha = hashlib.sha256(target.encode()).hexdigest()
                entries.append({"path": rel, "size": 0, "sha256": sha, "link": target})
            elif path.is_file():
                entries.append(
                    {"path": rel, "size": path.stat().st_size, "sha256": sha256_file(path)}
                )
            else:
                raise DatasetError(f"{path}: not a regular file")
    entries.sort(key=lambda e: e["path"])
    return entries


def tree_digest(files: Iterable[dict[str, Any]]) -> str:
    """One SHA-256 over the (path, size, sha256) list: equal trees give equal digests."""
    digest = hashlib.sha256()
    for entry in sorted(files, key=lambda e: e["path"]):
        digest.update(f"{entry['path']}\0{entry['size']}\0{entry['sha256']}\n".encode())
    return digest.hexdigest()


def write_manifest(root: Path, dataset: str, files: list[dict[str, Any]], **extra: Any) -> dict:
    """Write root/omniad_manifest.json (no timestamps, so equal trees give equal bytes)."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "dataset": dataset,
        "tree_sha256": tree_digest(files),
        "files": files,
        **extra,
    }
    write_json_atomic(root / MANIFEST_NAME, manifest)
    return manifest


def read_manifest(root: Path) -> dict[str, Any] | None:
    """The manifest of a dataset root, or None when there is none (never extracted by us)."""
    path = Path(root) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: unreadable manifest: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DatasetError(f"{path}: not an omniad manifest (format {MANIFEST_FORMAT})")
    files = manifest.get("files")
    if not isinstance(files, list) or tree_digest(files) != manifest.get("tree_sha256"):
        raise DatasetError(f"{path}: manifest file list does not match its tree_sha256")
    return manifest


def provenance(root: Path) -> str:
    """How the dataset at root was verified, in words (the report's provenance names it).

    Pinned: every archive matched a SHA-256 pinned in params; first-trust lock: some archive
    was accepted on first download and is verified against the lock from then on.
    """
    try:
        manifest = read_manifest(root) if Path(root).is_dir() else None
    except DatasetError:
        return "unreadable manifest"
    if manifest is None:
        return "not fetched here"
    if "generator" in manifest:
        return "generated locally"
    origins = {a.get("sha256_origin") for a in manifest.get("archives", [])}
    if not origins:
        return "extracted tree adopted after a full check (no archive hash)"
    if origins == {"params"}:
        return "archives verified against SHA-256 pinned in params"
    if origins <= {"params", "lock", "trusted-first-download"}:
        return (f"archives verified against the first-trust lock "
                f"(params/checksums/{manifest['dataset']}.sha256)")
    return "archive hashes recorded on first trust, no lock"
