"""Download, verify, safely extract and record a dataset (`omniad data fetch`).

Order of trust: an archive is used only after its SHA-256 matched (every time, also when it is
already on disk); it is extracted into a temporary directory beside the dataset root, the
manifest of every extracted file is written into it last, and only then is the directory
renamed into place. An interrupted run therefore leaves either the old tree or the new one,
never half of one.
"""

from __future__ import annotations

import lzma
import os
import shutil
import stat
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import requests
from tqdm import tqdm

from omniad.atomic import install_tree, remove_stale, tmp_sibling
from omniad.data.manifest import (
    MANIFEST_NAME,
    list_files,
    read_manifest,
    sha256_file,
    write_manifest,
)
from omniad.data.params import Params, dataset_facts, load_params, mirror_base
from omniad.data.readers import read_samples
from omniad.data.samples import SPLITS, ArchiveError, ChecksumError, DatasetError

Log = Callable[[str], None]
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ArchiveSpec:
    """One archive to fetch: its file name, where it comes from and what it must hash to."""

    name: str  # relative to the downloads directory (and to a --source directory)
    url: str | None
    sha256: str | None  # None = not known (see trust_first_download)
    extract_to: str  # directory inside the dataset root


class _Incomplete(Exception):
    """The server closed the stream before the announced length: resume from where it ended."""


# --------------------------------------------------------------------------------------------
# archive list and URLs
# --------------------------------------------------------------------------------------------


def archive_specs(
    name: str,
    params: Params | None = None,
    *,
    url: str | None = None,
    variants: Iterable[str] | None = None,
) -> list[ArchiveSpec]:
    """The archives of a dataset, templates expanded, with their resolved URLs.

    URL order: `url` (--url: the archive's URL for a one-archive dataset, else a base URL the
    archive names are appended to) > the mirror ($OMNIAD_DATA_MIRROR or params' `mirror`) >
    the archive's official `url` > the dataset's `base_url` + name.
    """
    params = params if params is not None else load_params()
    facts = dataset_facts(name, params)
    archives = facts.get("archives") or []
    if not archives:
        raise DatasetError(f"{name}: nothing to fetch (params list no archives)")
    chosen = list(variants) if variants else [facts.get("default_variant", "")]
    for v in chosen:
        if v and v not in facts.get("variants", [v]):
            raise DatasetError(f"{name}: unknown variant {v!r} (known: {facts.get('variants')})")
    expanded: list[dict[str, Any]] = []
    for arch in archives:
        keys = {k for k in ("{variant}", "{category}") if k in arch["name"]}
        combos = [{"variant": v, "category": c}
                  for v in (chosen if "{variant}" in keys else [""])
                  for c in (facts["categories"] if "{category}" in keys else [""])]
        for combo in combos:
            expanded.append({**arch, "name": arch["name"].format(**combo),
                             "extract_to": str(arch.get("extract_to") or "").format(**combo),
                             "url": arch.get("url") if not keys else None})
    mirror = mirror_base(params)
    specs = []
    for arch in expanded:
        if url and len(expanded) == 1 and not url.endswith("/"):
            arch_url: str | None = url
        elif url or mirror:
            arch_url = f"{(url or mirror or '').rstrip('/')}/{arch['name']}"
        elif arch.get("url"):
            arch_url = arch["url"]
        elif facts.get("base_url"):
            arch_url = f"{facts['base_url'].rstrip('/')}/{arch['name']}"
        else:
            arch_url = None
        specs.append(ArchiveSpec(arch["name"], arch_url, arch.get("sha256"), arch["extract_to"]))
    return specs


def _auth_headers(name: str, facts: Mapping[str, Any], url: str) -> dict[str, str]:
    """Authorization header for a gated dataset's hub; a token never goes to other hosts."""
    host = urlsplit(url).hostname or ""
    hosts = facts.get("auth_hosts") or []
    if not facts.get("auth_env") or not any(host == h or host.endswith("." + h) for h in hosts):
        return {}
    for var in facts["auth_env"]:
        if os.environ.get(var):
            return {"Authorization": f"Bearer {os.environ[var]}"}
    raise DatasetError(_gated_help(name, facts))


def _gated_help(name: str, facts: Mapping[str, Any]) -> str:
    env = facts["auth_env"][0]
    return (
        f"{name} is gated and no token was found (looked at ${', $'.join(facts['auth_env'])}). "
        f"Either: (1) open {facts.get('access_page', 'the dataset page')}, log in, accept the "
        f"terms, create a read token, then `export {env}=<your token>` and rerun this command; "
        f"or (2) download the archives yourself and rerun with `--source DIR_OR_ZIP` (a "
        f"directory holding them under their hub paths, e.g. realiad_jsons.zip and "
        f"realiad_256/<object>.zip, or one zip of the extracted tree)."
        + (" Its archives have no SHA-256 in params, so add --trust-first-download the first "
           "time (the hashes seen are recorded and checked from then on)."
           if any(a.get("sha256") is None for a in facts.get("archives", [])) else "")
    )


# --------------------------------------------------------------------------------------------
# download
# --------------------------------------------------------------------------------------------


def _content_range(header: str | None) -> tuple[int | None, int | None]:
    """(first byte, total) of a Content-Range such as 'bytes 100-199/200' or 'bytes */200'."""
    if not header or not header.startswith("bytes "):
        return None, None
    span, _, total = header[6:].partition("/")
    first = None if span == "*" else int(span.split("-")[0])
    return first, (int(total) if total.isdigit() else None)


def download(
    url: str,
    dest: Path,
    *,
    sha256: str | None = None,
    headers: Mapping[str, str] | None = None,
    session: requests.Session | None = None,
    attempts: int = 5,
    retry_wait: float = 2.0,
    timeout: float = 60.0,
    progress: bool = False,
    chunk_size: int = 1 << 16,
    log: Log = print,
) -> str:
    """Download url to dest through dest.part, resuming with Range; returns the SHA-256.

    A 206 reply is appended to the partial file, a 200 reply (server ignored Range) restarts
    it. The result is renamed to dest only after its hash matched `sha256` (when given); a
    mismatching download is deleted, since a corrupt part must never be resumed.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    session = session or requests.Session()
    for attempt in range(1, attempts + 1):
        offset = part.stat().st_size if part.exists() else 0
        req = {**(headers or {}), "Accept-Encoding": "identity"}
        if offset:
            req["Range"] = f"bytes={offset}-"
        try:
            with session.get(url, headers=req, stream=True, timeout=timeout) as resp:
                if resp.status_code == 416 and offset:
                    _, total = _content_range(resp.headers.get("Content-Range"))
                    if total == offset:
                        break  # the part was already complete
                    log(f"{part.name}: server rejected resume at byte {offset}; restarting")
                    part.unlink()
                    continue
                if resp.status_code in (401, 403):
                    raise DatasetError(f"{url}: HTTP {resp.status_code}: access denied (missing "
                                       "or invalid token, or the dataset's terms not accepted)")
                if resp.status_code == 206:
                    first, total = _content_range(resp.headers.get("Content-Range"))
                    if first != offset:
                        part.unlink()
                        raise _Incomplete(f"server resumed at byte {first}, not {offset}")
                    mode = "ab"
                elif resp.status_code == 200:
                    if offset:
                        log(f"{part.name}: server ignored the Range request; restarting")
                    offset, mode = 0, "wb"
                    length = resp.headers.get("Content-Length")
                    total = int(length) if length and length.isdigit() else None
                else:
                    raise DatasetError(f"{url}: HTTP {resp.status_code} {resp.reason}")
                bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                           desc=dest.name, disable=not progress)
                with bar, open(part, mode) as fh:
                    # small chunks: a dropped connection loses at most one chunk
                    for chunk in resp.iter_content(chunk_size=chunk_size):
                        fh.write(chunk)
                        bar.update(len(chunk))
                size = part.stat().st_size
                if total is not None and size != total:
                    raise _Incomplete(f"got {size} of {total} bytes")
                break
        except (requests.RequestException, _Incomplete) as exc:
            size = part.stat().st_size if part.exists() else 0
            if attempt == attempts:
                raise DatasetError(f"{url}: download failed after {attempts} attempts ({exc}); "
                                   f"{part} ({size} bytes) is kept and resumed next time") from exc
            log(f"{dest.name}: interrupted ({exc}); resuming from byte {size}")
            time.sleep(retry_wait * attempt)
    digest = sha256_file(part)
    if sha256 and digest != sha256.lower():
        part.unlink()
        raise ChecksumError(f"{dest}: SHA-256 mismatch after download from {url}: expected "
                            f"{sha256}, got {digest}; the download was deleted")
    os.replace(part, dest)
    return digest


# --------------------------------------------------------------------------------------------
# safe extraction
# --------------------------------------------------------------------------------------------


def _safe_member(archive: Path, name: str) -> PurePosixPath:
    """A member name as a relative path; absolute names and '..' are rejected, not rewritten."""
    norm = name.replace("\\", "/")
    pure = PurePosixPath(norm)
    if not norm or pure.is_absolute() or (len(norm) > 1 and norm[1] == ":"):
        raise ArchiveError(f"{archive}: member {name!r} has an absolute path")
    if ".." in pure.parts:
        raise ArchiveError(f"{archive}: member {name!r} contains '..'")
    return pure


def _link_inside(archive: Path, member: PurePosixPath, target: str, hard: bool) -> None:
    """A link target must resolve inside the extraction root (hard links: relative to it)."""
    if not target or PurePosixPath(target).is_absolute():
        raise ArchiveError(f"{archive}: link {member} points to absolute path {target!r}")
    base = [] if hard else list(member.parent.parts)
    depth = len(base)
    for part in PurePosixPath(target).parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            raise ArchiveError(f"{archive}: link {member} points outside the archive ({target!r})")


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar (any compression) or zip archive into dest, refusing unsafe members.

    Raises ArchiveError for a truncated/corrupt archive or a member that is absolute, holds
    '..', is a device/fifo, or is a link pointing outside dest. dest may be left partly
    written: callers extract into a temporary directory.
    """
    dest.mkdir(parents=True, exist_ok=True)
    if archive.suffix.lower() == ".zip":
        _extract_zip(archive, dest)
    else:
        _extract_tar(archive, dest)


def _extract_tar(archive: Path, dest: Path) -> None:
    member = "?"
    try:
        # Stream mode: one pass over the (possibly xz-compressed, many GB) archive.
        with tarfile.open(archive, mode="r|*") as tf:
            for info in tf:
                member = info.name
                pure = _safe_member(archive, info.name)
                if info.issym() or info.islnk():
                    _link_inside(archive, pure, info.linkname, hard=info.islnk())
                elif not (info.isreg() or info.isdir()):
                    raise ArchiveError(f"{archive}: member {info.name!r} is a device or fifo")
                tf.extract(info, dest, filter="data")
    except ArchiveError:
        raise
    except tarfile.FilterError as exc:
        raise ArchiveError(f"{archive}: unsafe member {member!r}: {exc}") from exc
    except (tarfile.TarError, EOFError, OSError, ValueError, lzma.LZMAError, zlib.error) as exc:
        raise ArchiveError(f"{archive}: truncated or corrupt archive (at member {member!r}): "
                           f"{exc}") from exc


def _extract_zip(archive: Path, dest: Path) -> None:
    member = "?"
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                member = info.filename
                pure = _safe_member(archive, info.filename)
                target = dest.joinpath(*pure.parts)
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    link = zf.read(info).decode()
                    _link_inside(archive, pure, link, hard=False)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(link, target)
                elif info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst, _CHUNK)  # CRC checked at the end
    except ArchiveError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as exc:
        raise ArchiveError(f"{archive}: truncated or corrupt zip (at member {member!r}): "
                           f"{exc}") from exc


# --------------------------------------------------------------------------------------------
# fetch
# --------------------------------------------------------------------------------------------


def _check_replaceable(root: Path, manifest: dict | None, name: str) -> None:
    """Only a tree omniad recorded for this same dataset (or an empty dir) may be replaced."""
    if manifest is not None and manifest.get("dataset") != name:
        raise DatasetError(f"{root}: holds dataset {manifest.get('dataset')!r}, not {name!r}; "
                           "pick another --root")
    if root.exists() and manifest is None and (not root.is_dir() or any(root.iterdir())):
        raise DatasetError(f"{root}: exists and holds no {MANIFEST_NAME}, so it was not fetched "
                           "by omniad; move it away or pick another --root (or adopt it in "
                           "place with --source equal to --root)")


def _up_to_date(root: Path, manifest: dict | None, archives: list[dict[str, Any]]) -> bool:
    if manifest is None:
        return False
    key = [(a["name"], a["sha256"], a["extract_to"]) for a in archives]
    if [(a["name"], a["sha256"], a.get("extract_to")) for a in manifest.get("archives", [])] != key:
        return False
    for entry in manifest["files"]:
        path = root / entry["path"]
        if "link" not in entry and (not path.is_file() or path.stat().st_size != entry["size"]):
            return False
    return True


def _find_in_source(source: Path, spec: ArchiveSpec, n_specs: int) -> Path:
    if source.is_file():
        if n_specs != 1:
            raise DatasetError(f"{source}: one file given as --source, but the dataset has "
                               f"{n_specs} archives; pass the directory holding them")
        return source
    for candidate in (source / spec.name, source / PurePosixPath(spec.name).name):
        if candidate.is_file():
            return candidate
    raise DatasetError(f"{source}: missing archive {spec.name} in --source directory")


def fetch_dataset(
    name: str,
    root: Path | str,
    params: Params | None = None,
    *,
    url: str | None = None,
    source: Path | str | None = None,
    trust_first_download: bool = False,
    downloads: Path | str | None = None,
    variants: Iterable[str] | None = None,
    session: requests.Session | None = None,
    retry_wait: float = 2.0,
    progress: bool = False,
    log: Log = print,
) -> dict[str, Any]:
    """Fetch a dataset into root (the dataset's own directory); returns its manifest.

    source: a local copy instead of downloading: an archive file, a directory holding the
    archives under their names, or an already extracted tree (copied, or adopted in place when
    source == root). downloads: where archives are kept (default: <root's parent>/downloads).
    An archive whose hash is unknown (params `sha256: null`, not pinned by an earlier
    manifest) is refused unless trust_first_download, which records the hash it saw.
    """
    params = params if params is not None else load_params()
    facts = dataset_facts(name, params)
    if facts.get("generated"):
        raise DatasetError(f"{name}: generated locally, use `omniad data demo` instead of fetch")
    root = Path(root).absolute()
    root.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(root)
    manifest = read_manifest(root) if root.is_dir() else None
    src = Path(source).absolute() if source is not None else None
    if src is not None and not src.exists():
        raise DatasetError(f"{src}: --source does not exist")
    specs = archive_specs(name, params, url=url, variants=variants)
    if src is not None and src.is_dir() and not any(
        (src / s.name).is_file() or (src / PurePosixPath(s.name).name).is_file() for s in specs
    ):
        return _adopt_tree(name, root, src, params, manifest, log)
    if src is not None and src.is_file() and len(specs) > 1:
        # one zip/tar of the whole extracted tree (e.g. Real-IAD repacked by the user)
        specs = [ArchiveSpec(src.name, None, None, "")]
    _check_replaceable(root, manifest, name)

    pinned = {a["name"]: a["sha256"] for a in (manifest or {}).get("archives", [])}
    downloads_dir = Path(downloads).absolute() if downloads else root.parent / "downloads"
    if src is None:  # a gated dataset without a token: say how to get in before anything else
        for spec in specs:
            if spec.url and not (downloads_dir / spec.name).is_file():
                _auth_headers(name, facts, spec.url)
    records: list[dict[str, Any]] = []
    paths: list[Path] = []
    trusted: list[str] = []  # said once the hashes are really recorded
    for spec in specs:
        expected = spec.sha256 or pinned.get(spec.name)
        origin = "params" if spec.sha256 else ("pinned" if expected else "trusted-first-download")
        if expected is None and not trust_first_download:
            raise DatasetError(
                f"{name}: no SHA-256 is known for {spec.name} (params sha256: null); nothing "
                "was downloaded. Rerun with --trust-first-download to accept the file and record "
                "the hash it has in the manifest (then pin it in params/datasets.yaml)."
            )
        if src is not None:
            path = _find_in_source(src, spec, len(specs))
            digest = sha256_file(path)
            if expected and digest != expected.lower():
                raise ChecksumError(f"{path}: SHA-256 mismatch: expected {expected}, got {digest}")
        else:
            path = downloads_dir / spec.name
            digest = _verified_download(name, facts, spec, path, expected, session,
                                        retry_wait, progress, log)
        if expected is None:
            trusted.append(f"WARNING: {spec.name}: no known SHA-256; trusted this first "
                           f"download (--trust-first-download): sha256 {digest} is recorded "
                           f"in {root / MANIFEST_NAME}; add it to params/datasets.yaml to pin it")
        records.append({"name": spec.name, "sha256": digest, "size": path.stat().st_size,
                        "extract_to": spec.extract_to, "sha256_origin": origin,
                        "url": spec.url if src is None else None})
        paths.append(path)

    if _up_to_date(root, manifest, records):
        log(f"{name}: {root} is already extracted from these archives (manifest up to date)")
        assert manifest is not None
        for msg in trusted:
            log(msg)
        return manifest
    tmp = tmp_sibling(root, "tmp")
    try:
        for spec, path in zip(specs, paths, strict=True):
            log(f"{name}: extracting {path.name}")
            target = tmp.joinpath(*_safe_member(path, spec.extract_to or ".").parts)
            safe_extract(path, target)
        files = list_files(tmp)
        new = write_manifest(tmp, name, files, archives=records)
        install_tree(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"{name}: {len(files)} files in {root} (tree sha256 {new['tree_sha256'][:16]}...)")
    for msg in trusted:
        log(msg)
    return new


def _verified_download(
    name: str,
    facts: Mapping[str, Any],
    spec: ArchiveSpec,
    path: Path,
    expected: str | None,
    session: requests.Session | None,
    retry_wait: float,
    progress: bool,
    log: Log,
) -> str:
    """The hash of a verified archive at path: re-hashed if present, else (re)downloaded."""
    if path.is_file():
        digest = sha256_file(path)
        if expected is None or digest == expected.lower():
            return digest
        log(f"{path}: on disk but its SHA-256 {digest} != {expected}; deleting and downloading")
        path.unlink()
    if not spec.url:
        raise DatasetError(f"{name}: no URL for {spec.name}; pass --url or --source")
    headers = _auth_headers(name, facts, spec.url)
    log(f"{name}: downloading {spec.url}")
    return download(spec.url, path, sha256=expected, headers=headers, session=session,
                    retry_wait=retry_wait, progress=progress, log=log)


def _adopt_tree(
    name: str, root: Path, src: Path, params: Params, manifest: dict | None, log: Log
) -> dict[str, Any]:
    """Record an already extracted tree (after the reader accepted its layout)."""
    facts = dataset_facts(name, params)
    try:
        for split in SPLITS if facts["layout"] != "dtd" else ("train",):
            read_samples(name, src, split, params=params)
    except DatasetError as exc:
        names = ", ".join(a["name"] for a in facts.get("archives", []))
        raise DatasetError(f"{src}: --source holds neither the archives ({names}) nor an "
                           f"extracted {name} tree ({exc})") from exc
    extra = {"archives": [], "source": "local tree"}
    if src.resolve() == root.resolve():
        new = write_manifest(root, name, list_files(root), **extra)
        log(f"{name}: adopted {root} in place ({len(new['files'])} files recorded)")
        return new
    _check_replaceable(root, manifest, name)
    tmp = tmp_sibling(root, "tmp")
    try:
        shutil.copytree(src, tmp, symlinks=True, ignore=shutil.ignore_patterns(MANIFEST_NAME))
        new = write_manifest(tmp, name, list_files(tmp), **extra)
        install_tree(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"{name}: copied {src} to {root} ({len(new['files'])} files recorded)")
    return new
