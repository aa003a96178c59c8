"""Download, verify, safely extract and record a dataset (`omniad data fetch`).

Sources: each archive has an ordered list (--url, the official URLs current first, the
mirrors: $OMNIAD_DATA_MIRROR then params; a mirror may be a local directory). Each is tried
in turn, a failed one is one log line, and when all failed the error is the manual route
(official page, file name and hash, the exact --source command).

Order of trust: an archive is used only after its SHA-256 matched the hash pinned in params
or, failing that, the checksum lock (params/checksums/<dataset>.sha256, written by the first
download with --trust-first-download); one with an unexpected hash is moved aside, never used.
It is extracted into a temporary directory beside the dataset root, the manifest of every
extracted file is written into it last, and only then is the directory swapped into place
(omniad.atomic.install_tree; recover_tree repairs a crash between its steps). An interrupted
run therefore leaves the old tree or the new one, never half of one and never none.
A complete tree made from the same verified archives is left alone without any network.
"""

from __future__ import annotations

import errno
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

from omniad.atomic import install_tree, recover_tree, tmp_sibling
from omniad.data.lock import add_to_lock, lock_path, read_lock
from omniad.data.manifest import (
    MANIFEST_NAME,
    list_files,
    read_manifest,
    sha256_file,
    write_manifest,
)
from omniad.data.params import (
    DEFAULT_PARAMS_PATH,
    Params,
    dataset_facts,
    load_params,
    mirrors,
    params_path,
)
from omniad.data.samples import ArchiveError, ChecksumError, DatasetError

Log = Callable[[str], None]
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ArchiveSpec:
    """One archive to fetch: its file name, where it comes from and what it must hash to."""

    name: str  # relative to the downloads directory (and to a --source directory)
    urls: tuple[str, ...]  # sources in the order tried: URLs or local files
    sha256: str | None  # pinned in params; None = from the lock, or trust_first_download
    extract_to: str  # directory inside the dataset root the archive is unpacked into
    variant: str = ""  # the resolution variant this archive belongs to ("" = shared)

    @property
    def url(self) -> str | None:
        return self.urls[0] if self.urls else None


class _Incomplete(Exception):
    """The server closed the stream before the announced length: resume from where it ended."""


class SourceError(DatasetError):
    """One source of an archive failed (HTTP status, network error, hash); the next is tried."""


# --------------------------------------------------------------------------------------------
# archive list and sources
# --------------------------------------------------------------------------------------------


def archive_specs(
    name: str,
    params: Params | None = None,
    *,
    url: str | None = None,
    variants: Iterable[str] | None = None,
) -> list[ArchiveSpec]:
    """The archives of a dataset, templates expanded, each with its ordered list of sources.

    Source order: `url` (--url: the archive's URL for a one-archive dataset, else a base URL
    the archive names are appended to), the archive's official `urls` (current first, then
    older ones), the dataset's `base_url` + name, then the mirrors ($OMNIAD_DATA_MIRROR, then
    params' `mirrors`; a mirror may be a local directory).
    """
    params = params if params is not None else load_params()
    facts = dataset_facts(name, params)
    archives = facts.get("archives") or []
    if not archives:
        raise DatasetError(f"{name}: nothing to fetch (params list no archives)")
    chosen = list(dict.fromkeys(variants)) if variants else [facts.get("default_variant", "")]
    for v in chosen:
        if v and v not in facts.get("variants", [v]):
            raise DatasetError(f"{name}: unknown variant {v!r} (known: "
                               f"{', '.join(facts.get('variants', []))})")
    expanded: list[dict[str, Any]] = []
    for arch in archives:
        keys = {k for k in ("{variant}", "{category}") if k in arch["name"]}
        combos = [{"variant": v, "category": c}
                  for v in (chosen if "{variant}" in keys else [""])
                  for c in (facts["categories"] if "{category}" in keys else [""])]
        official = [*arch.get("urls", []), *([arch["url"]] if arch.get("url") else [])]
        for combo in combos:
            expanded.append({**arch, "name": arch["name"].format(**combo),
                             "extract_to": str(arch.get("extract_to") or "").format(**combo),
                             "official": official if not keys else [],
                             "variant": combo["variant"]})
    bases = mirrors(params)
    specs = []
    for arch in expanded:
        sources: list[str] = []
        if url:
            sources.append(url if len(expanded) == 1 and not url.endswith("/")
                           else f"{url.rstrip('/')}/{arch['name']}")
        sources += arch["official"]
        if not arch["official"] and facts.get("base_url"):
            sources.append(f"{facts['base_url'].rstrip('/')}/{arch['name']}")
        sources += [f"{b.rstrip('/')}/{arch['name']}" for b in bases]
        specs.append(ArchiveSpec(arch["name"], tuple(dict.fromkeys(sources)), arch.get("sha256"),
                                 arch["extract_to"], arch["variant"]))
    return specs


def trust_option(name: str, params: Params | None = None,
                 variants: Iterable[str] | None = None) -> str:
    """'--trust-first-download' when some archive has neither a pinned hash nor a lock entry.

    The DAG passes what this returns, so it trusts a download only where nothing could verify
    it, and never again once the lock holds the hash.
    """
    params = params if params is not None else load_params()
    if dataset_facts(name, params).get("generated"):
        return ""
    locked = read_lock(name, params)
    specs = archive_specs(name, params, variants=variants)
    return "--trust-first-download" if any(
        s.sha256 is None and s.name not in locked for s in specs) else ""


def _gated(facts: Mapping[str, Any], url: str) -> bool:
    host = urlsplit(url).hostname or ""
    hosts = facts.get("auth_hosts") or []
    return bool(facts.get("auth_env")) and any(host == h or host.endswith("." + h) for h in hosts)


def _has_token(facts: Mapping[str, Any]) -> bool:
    return any(os.environ.get(v) for v in facts.get("auth_env") or [])


def _auth_headers(name: str, facts: Mapping[str, Any], url: str) -> dict[str, str]:
    """Authorization header for a gated dataset's hub; a token never goes to other hosts."""
    if not _gated(facts, url):
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
        + (" Its archives have no SHA-256 in params, so unless params/checksums holds their lock "
           "add --trust-first-download the first time (the hashes seen are written to the lock "
           "and checked from then on)."
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
        answered = False
        try:
            with session.get(url, headers=req, stream=True, timeout=timeout) as resp:
                answered = True
                if resp.status_code == 416 and offset:
                    _, total = _content_range(resp.headers.get("Content-Range"))
                    if total == offset:
                        break  # the part was already complete
                    log(f"{part.name}: server rejected resume at byte {offset}; restarting")
                    part.unlink()
                    continue
                if resp.status_code in (401, 403):
                    raise SourceError(f"{url}: HTTP {resp.status_code}: access denied (missing "
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
                    raise SourceError(f"{url}: HTTP {resp.status_code} {resp.reason}")
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
            if not answered and attempt == 1:  # nobody there (DNS, refused): next source
                raise SourceError(f"{url}: {type(exc).__name__}: {exc}") from exc
            if attempt == attempts:
                raise SourceError(f"{url}: download failed after {attempts} attempts ({exc}); "
                                  f"{part} ({size} bytes) is kept and resumed next time") from exc
            log(f"{dest.name}: interrupted ({exc}); resuming from byte {size}")
            time.sleep(retry_wait * attempt)
    digest = sha256_file(part)
    if sha256 and digest != sha256.lower():
        aside = move_aside(part, dest, digest)
        raise ChecksumError(f"{dest}: SHA-256 mismatch after download from {url}: expected "
                            f"{sha256}, got {digest}; the download was moved aside to {aside}")
    os.replace(part, dest)
    remove_asides(dest)
    return digest


def move_aside(path: Path, dest: Path, digest: str) -> Path:
    """Keep a file with an unexpected hash beside dest (never resumed, never used) until a
    verified archive is in hand: it may be the right file with a wrong pin."""
    aside = dest.with_name(f"{dest.name}.unverified-{digest[:12]}")
    os.replace(path, aside)
    return aside


def remove_asides(dest: Path) -> None:
    """A verified archive is in hand: the set-aside copies of it may go."""
    for stale in dest.parent.glob(f"{dest.name}.unverified-*"):
        stale.unlink(missing_ok=True)


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
            # tarfile ends quietly at a missing header; a complete tar ends with a zero block,
            # which the loop above read. Anything else is a tar cut at a file boundary.
            if tf.fileobj.tell() - tf.offset != tarfile.BLOCKSIZE:
                raise ArchiveError(f"{archive}: truncated archive: no end-of-archive marker "
                                   f"after member {member!r} (the file was cut short)")
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
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError,
            RuntimeError, NotImplementedError, zlib.error, lzma.LZMAError) as exc:
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


def _complete(path: Path) -> bool:
    return (path / MANIFEST_NAME).is_file()


def _intact(root: Path, entries: Iterable[dict[str, Any]]) -> bool:
    """Every recorded file is still there with its recorded size (no hashing: that is check)."""
    for entry in entries:
        path = root / entry["path"]
        if "link" in entry:
            if not path.is_symlink():
                return False
        elif not path.is_file() or path.stat().st_size != entry["size"]:
            return False
    return True


def _in_group(rel: str, group: str, groups: set[str]) -> bool:
    """Whether a file belongs to the archives extracted to `group` ("" = the shared rest)."""
    if group:
        return rel.startswith(group + "/")
    return not any(g and rel.startswith(g + "/") for g in groups)


def _reusable(
    root: Path, manifest: dict | None, plan: list[tuple[ArchiveSpec, str | None, str]]
) -> tuple[set[str], set[str]]:
    """(groups whose files can be kept from root, every group): a group (the archives
    unpacked into one extract_to directory) is kept when the same verified archives made it
    and its files are intact; so fetching a second Real-IAD variant keeps the first."""
    if manifest is None or not manifest.get("archives"):
        return set(), set()
    old = manifest["archives"]
    groups = {str(a.get("extract_to") or "") for a in old} | {s.extract_to for s, _, _ in plan}
    keep = set()
    for group in groups:
        want = {(s.name, e) for s, e, _ in plan if s.extract_to == group}
        have = {(a["name"], a["sha256"]) for a in old if (a.get("extract_to") or "") == group}
        if not want or want != have or any(e is None for _, e in want):
            continue
        if _intact(root, [f for f in manifest["files"] if _in_group(f["path"], group, groups)]):
            keep.add(group)
    return keep, groups


def _link_group(root: Path, tmp: Path, manifest: dict, group: str, groups: set[str]) -> None:
    """Put a kept group's files into the new tree as hard links (no copy, no archive)."""
    for entry in manifest["files"]:
        if not _in_group(entry["path"], group, groups):
            continue
        src, dst = root / entry["path"], tmp / entry["path"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        if "link" in entry:
            os.symlink(entry["link"], dst)
            continue
        try:
            os.link(src, dst)
        except OSError:  # a file system without hard links
            shutil.copy2(src, dst)


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


def _local(source: str) -> Path | None:
    """A source that is a local file (a path or file:// URL), else None."""
    if source.startswith("file://"):
        return Path(urlsplit(source).path)
    return None if "://" in source else Path(source)


@dataclass
class _Route:
    """What the manual route needs to say (the exact command that finishes the job)."""

    name: str
    root: Path
    downloads: Path
    variants: list[str]
    params: Params
    trust: bool

    def command(self) -> str:
        cmd = f"omniad data fetch {self.name} --root {self.root} --source {self.downloads}"
        cmd += "".join(f" --variant {v}" for v in self.variants)
        if self.trust:
            cmd += " --trust-first-download"
        if params_path(self.params).resolve() != DEFAULT_PARAMS_PATH.resolve():
            cmd += f" --params {params_path(self.params)}"
        return cmd

    def text(self, spec: ArchiveSpec, expected: str | None, facts: Mapping[str, Any]) -> str:
        sha = (f"SHA-256 {expected}" if expected else
               f"no pinned SHA-256: the one it has is written to {lock_path(self.name, self.params)}")
        page = facts.get("page") or facts.get("access_page") or "the dataset's official page"
        gated = (f" (gated: log in and accept the terms at {facts['access_page']} first, or "
                 f"export {facts['auth_env'][0]}=<token> and rerun)"
                 if facts.get("access_page") and facts.get("auth_env") else "")
        tried = len(spec.urls)
        return (f"{self.name}: all {tried} source{'s' if tried != 1 else ''} of {spec.name} "
                f"failed (one line each above). Manual route: open {page}{gated}, download "
                f"{PurePosixPath(spec.name).name} ({sha}), save it as "
                f"{self.downloads / spec.name}, then run: {self.command()}")


def _obtain(
    name: str,
    facts: Mapping[str, Any],
    spec: ArchiveSpec,
    expected: str | None,
    downloads: Path,
    route: _Route,
    session: requests.Session | None,
    retry_wait: float,
    progress: bool,
    log: Log,
) -> tuple[Path, str, str | None]:
    """(path, SHA-256, source used) of a verified archive: the copy on disk when it verifies,
    else each source in order; a failed source is one log line, all failed is the manual
    route. A copy with an unexpected hash is moved aside, never deleted or used."""
    path = downloads / spec.name
    if path.is_file():
        digest = sha256_file(path)
        if expected is None or digest == expected:
            remove_asides(path)
            return path, digest, None
        aside = move_aside(path, path, digest)
        log(f"{path}: on disk but its SHA-256 {digest} != {expected}; moved aside to "
            f"{aside.name}, fetching it again")
    for source in spec.urls:
        local = _local(source)
        try:
            if local is not None:
                if not local.is_file():
                    raise SourceError(f"{local}: no such file")
                digest = sha256_file(local)
                if expected and digest != expected:
                    raise SourceError(f"{local}: SHA-256 {digest}, expected {expected}")
                remove_asides(path)
                return local, digest, str(local)
            if _gated(facts, source) and not _has_token(facts):
                raise SourceError(f"{source}: gated and no token "
                                  f"(${', $'.join(facts['auth_env'])} unset)")
            log(f"{name}: downloading {source}")
            digest = download(source, path, sha256=expected,
                              headers=_auth_headers(name, facts, source), session=session,
                              retry_wait=retry_wait, progress=progress, log=log)
            return path, digest, source
        except (SourceError, ChecksumError) as exc:
            log(f"{name}: source failed: {exc}")
    raise DatasetError(route.text(spec, expected, facts))


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
    in_place: bool = False,
    session: requests.Session | None = None,
    retry_wait: float = 2.0,
    progress: bool = False,
    log: Log = print,
) -> dict[str, Any]:
    """Fetch a dataset into root (the dataset's own directory); returns its manifest.

    source: a local copy instead of downloading: an archive file, a directory holding the
    archives under their names, or an extracted tree (decoded and counted in full first, then
    copied, or used in place: with in_place, root only holds links to it and the manifest,
    so a read-only tree on a shared file system can be adopted). downloads: where archives
    are kept (default: <root's parent>/downloads). Hashes come from params (pinned), else the
    checksum lock; an archive with neither is refused unless trust_first_download, which
    writes the hash it saw to the lock. Variants already in root are kept.
    """
    params = params if params is not None else load_params()
    facts = dataset_facts(name, params)
    if facts.get("generated"):
        raise DatasetError(f"{name}: generated locally, not fetched: run "
                           f"`omniad data demo --root {Path(root).absolute()}`")
    root = Path(root).absolute()
    root.parent.mkdir(parents=True, exist_ok=True)
    recover_tree(root, _complete, MANIFEST_NAME, log)
    manifest = read_manifest(root) if root.is_dir() else None
    src = Path(source).absolute() if source is not None else None
    if src is not None and not src.exists():
        raise DatasetError(f"{src}: --source does not exist")
    requested = list(dict.fromkeys(variants or []))
    if facts.get("variants") and not requested:
        requested = [facts["default_variant"]]
    ours = manifest is not None and manifest.get("dataset") == name
    kept = [v for v in (manifest or {}).get("variants", {}) if ours and v not in requested]
    order = list(facts.get("variants") or [])
    every = sorted(requested + kept, key=lambda v: order.index(v) if v in order else len(order))
    specs = archive_specs(name, params, url=url, variants=every or None)
    if src is not None and src.is_dir() and not any(
        (src / s.name).is_file() or (src / PurePosixPath(s.name).name).is_file() for s in specs
    ):
        return _adopt_tree(name, root, src, params, manifest, requested, in_place, log)
    if src is not None and src.is_file() and len(specs) > 1:
        # one zip/tar of the whole extracted tree (e.g. Real-IAD repacked by the user)
        specs = [ArchiveSpec(src.name, (), None, "")]
        kept, whole = [], True
    else:
        whole = False
    _check_replaceable(root, manifest, name)
    if (ours and manifest is not None and manifest.get("source") == "local tree" and src is None
            and url is None and not variants and _intact(root, manifest["files"])):
        log(f"{name}: {root} holds an adopted tree, recorded complete; nothing to fetch")
        return manifest

    locked = read_lock(name, params)
    recorded = {a["name"]: a["sha256"] for a in (manifest or {}).get("archives", [])}
    plan: list[tuple[ArchiveSpec, str | None, str]] = []
    for spec in specs:
        if spec.sha256:
            plan.append((spec, spec.sha256.lower(), "params"))
        elif spec.name in locked:
            plan.append((spec, locked[spec.name], "lock"))
        elif ours and spec.name in recorded:
            plan.append((spec, recorded[spec.name], "manifest"))
        else:
            plan.append((spec, None, "trusted-first-download"))
    unknown = [s.name for s, e, _ in plan if e is None]
    if unknown and not trust_first_download:
        more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
        raise DatasetError(
            f"{name}: no SHA-256 is known for {unknown[0]}{more} (neither pinned in params nor "
            f"in the checksum lock {lock_path(name, params)}); nothing was downloaded. Rerun "
            "with --trust-first-download to accept the files and write their hashes to that "
            "lock (commit it: every later fetch verifies against it)."
        )

    keep, groups = _reusable(root, manifest if ours else None, plan)
    if manifest is not None and ours and groups and keep == groups and \
            [(a["name"], a["sha256"]) for a in manifest["archives"]] == \
            [(s.name, e) for s, e, _ in plan]:
        log(f"{name}: {root} is already extracted from these verified archives (manifest up "
            "to date); nothing to download")
        return manifest

    downloads_dir = Path(downloads).absolute() if downloads else root.parent / "downloads"
    route = _Route(name, root, downloads_dir, requested if facts.get("variants") else [], params,
                   bool(unknown))
    needed = [(s, e, o) for s, e, o in plan if s.extract_to not in keep]
    if src is None and needed:  # a download dir we cannot write fails now, not per source
        downloads_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(downloads_dir, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "Permission denied (--downloads must be "
                                  "writable)", str(downloads_dir))
    if src is None and not _has_token(facts) and any(
        s.urls and all(_gated(facts, u) for u in s.urls) and not (downloads_dir / s.name).is_file()
        for s, _, _ in needed
    ):  # a gated dataset without a token: say how to get in before anything else
        raise DatasetError(_gated_help(name, facts))
    old_records = {a["name"]: a for a in (manifest or {}).get("archives", [])}
    records: list[dict[str, Any]] = []
    to_extract: list[tuple[ArchiveSpec, Path]] = []
    for spec, expected, origin in plan:
        if spec.extract_to in keep:
            records.append(old_records[spec.name])
            continue
        if src is not None:
            path = _find_in_source(src, spec, len(specs))
            digest = sha256_file(path)
            if expected and digest != expected:
                raise ChecksumError(f"{path}: SHA-256 mismatch: expected {expected}, got {digest}")
            used: str | None = None
        else:
            path, digest, used = _obtain(name, facts, spec, expected, downloads_dir, route,
                                         session, retry_wait, progress, log)
        records.append({"name": spec.name, "sha256": digest, "size": path.stat().st_size,
                        "extract_to": spec.extract_to, "sha256_origin": origin, "url": used,
                        "variant": spec.variant})
        to_extract.append((spec, path))

    extra: dict[str, Any] = {"archives": records}
    if facts.get("variants"):
        res = facts.get("resolutions") or {}
        extra["variants"] = {v: {"resolution": res.get(v)} for v in every}
    tmp = tmp_sibling(root, "tmp")
    try:
        for group in sorted(keep):
            log(f"{name}: keeping {group or 'the shared files'} from the current tree")
            _link_group(root, tmp, manifest or {}, group, groups)
        for spec, path in to_extract:
            log(f"{name}: extracting {path.name}")
            target = tmp.joinpath(*_safe_member(path, spec.extract_to or ".").parts)
            try:
                safe_extract(path, target)
            except ArchiveError:
                if spec.name in unknown and path == downloads_dir / spec.name:
                    # trusted but broken: never reused from disk, fetched again next time
                    log(f"{path}: moved aside to "
                        f"{move_aside(path, path, sha256_file(path)).name}")
                raise
        files = list_files(tmp)
        new = write_manifest(tmp, name, files, **extra)
        install_tree(tmp, root, MANIFEST_NAME)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"{name}: {len(files)} files in {root} (tree sha256 {new['tree_sha256'][:16]}...)")
    trusted = {r["name"]: r["sha256"] for r in records
               if r.get("sha256_origin") == "trusted-first-download"}
    if trusted and not whole:  # a repacked whole tree is not an archive anyone else fetches
        lock = add_to_lock(name, params, trusted)
        for arch, sha in trusted.items():
            log(f"WARNING: {name}: {arch} had no known SHA-256; trusted this first download "
                f"(--trust-first-download): sha256 {sha} is written to {lock}; commit that "
                "file to pin it")
    return new


def _adopt_tree(
    name: str,
    root: Path,
    src: Path,
    params: Params,
    manifest: dict | None,
    variants: list[str],
    in_place: bool,
    log: Log,
) -> dict[str, Any]:
    """Record an extracted tree after decoding and counting every file of it.

    Copied into root, or (in_place) linked: root then holds one symbolic link per top-level
    entry of src and the manifest of src's files, so src itself is never written to.
    """
    from omniad.data.check import check_dataset

    facts = dataset_facts(name, params)
    names = ", ".join(a["name"] for a in facts.get("archives", []))
    n_decoded = 0
    for opts in ([{"variant": v} for v in variants] or [{}]):
        try:
            report = check_dataset(name, src, params=params, use_manifest=False, **opts)
        except DatasetError as exc:
            raise DatasetError(f"{src}: --source holds neither the archives ({names}) nor a "
                               f"{name} tree ({exc})") from exc
        if not report.ok:
            raise DatasetError(f"{src}: --source is not a complete {name} tree "
                               f"({len(report.problems)} problems; first: {report.problems[0]}); "
                               f"`omniad data check {name} --root {src}` lists them all")
        n_decoded += report.n_files
    log(f"{name}: {src}: {n_decoded} files decoded and counted, counts as expected")
    extra: dict[str, Any] = {"archives": [], "source": "local tree"}
    if variants:
        res = facts.get("resolutions") or {}
        extra["variants"] = {v: {"resolution": res.get(v)} for v in variants}
    if src.resolve() == root.resolve():
        new = write_manifest(root, name, list_files(root), **extra)
        log(f"{name}: adopted {root} in place ({len(new['files'])} files recorded)")
        return new
    _check_replaceable(root, manifest, name)
    tmp = tmp_sibling(root, "tmp")
    try:
        if in_place:
            tmp.mkdir()
            for entry in sorted(src.iterdir()):
                if entry.name != MANIFEST_NAME:
                    os.symlink(entry, tmp / entry.name)
            files = list_files(src)
            extra["source_root"] = str(src)
        else:
            shutil.copytree(src, tmp, symlinks=True,
                            ignore=shutil.ignore_patterns(MANIFEST_NAME))
            files = list_files(tmp)
        new = write_manifest(tmp, name, files, **extra)
        install_tree(tmp, root, MANIFEST_NAME)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    how = f"linked {src} in place into" if in_place else f"copied {src} to"
    log(f"{name}: {how} {root} ({len(new['files'])} files recorded)")
    return new
