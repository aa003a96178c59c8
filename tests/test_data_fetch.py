"""fetch -> verify -> check -> cache -> load, against archives served from 127.0.0.1."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from omniad.data.cache import CachedDataset, build_cache
from omniad.data.check import check_dataset
from omniad.data.fetch import download, fetch_dataset, safe_extract
from omniad.data.manifest import MANIFEST_NAME, read_manifest, sha256_file
from omniad.data.readers import read_samples
from omniad.data.samples import ArchiveError, ChecksumError, DatasetError

try:
    import data_fixtures as fx
except ImportError:  # tests/ became a package
    from tests import data_fixtures as fx

isolated_checksums = fx.isolated_checksums  # autouse: locks go to tmp_path

MVTEC = "mvtec_anomaly_detection.tar.xz"


@pytest.fixture(scope="module")
def mvtec_archive() -> bytes:
    return fx.tar_bytes(fx.mvtec_files())


def _quiet(msg: str) -> None:
    pass


def test_mvtec_end_to_end(tmp_path: Path, mvtec_archive: bytes) -> None:
    state = fx.ServerState(files={f"/{MVTEC}": mvtec_archive})
    root = tmp_path / "mvtec_ad"
    with fx.serve(state) as base:
        params = fx.mvtec_params(f"{base}/{MVTEC}", fx.sha256(mvtec_archive))
        manifest = fetch_dataset("mvtec_ad", root, params, retry_wait=0, log=_quiet)
    assert (tmp_path / "downloads" / MVTEC).is_file()
    assert not list((tmp_path / "downloads").glob("*.part"))
    assert manifest == read_manifest(root)
    assert manifest["archives"][0]["sha256"] == fx.sha256(mvtec_archive)
    files = {f["path"]: f for f in manifest["files"]}
    assert set(files) == set(fx.mvtec_files())
    entry = files["bottle/ground_truth/broken/000_mask.png"]
    assert entry["sha256"] == sha256_file(root / entry["path"])
    assert fx.leftovers(tmp_path) == []

    report = check_dataset("mvtec_ad", root, params=params, workers=2)
    assert report.ok, report.problems
    assert report.counts["test"]["cable"] == {"normal": 2, "anomaly": 3}
    assert "(total)" in report.table()

    cache = build_cache("mvtec_ad", root, 16, tmp_path / "cache", params=params, log=_quiet)
    ds = CachedDataset(cache, "test")
    assert len(ds) == 10
    item = ds[len(ds) - 1]
    assert item["image"].shape == (3, 16, 16) and item["mask"].shape == (1, 16, 16)
    assert (item["category"], item["label"]) == ("cable", 1)

    # a second fetch re-hashes the archive on disk, downloads nothing, keeps the tree
    with fx.serve(state) as base:
        n_before = len(state.requests)
        again = fetch_dataset("mvtec_ad", root, params, retry_wait=0, log=_quiet)
    assert len(state.requests) == n_before and again == manifest


def test_corrupted_archive_is_rejected_and_leaves_nothing(
    tmp_path: Path, mvtec_archive: bytes
) -> None:
    bad = bytearray(mvtec_archive)
    bad[len(bad) // 2] ^= 0xFF
    state = fx.ServerState(files={f"/{MVTEC}": bytes(bad)})
    root = tmp_path / "mvtec_ad"
    logs: list[str] = []
    with fx.serve(state) as base:
        params = fx.mvtec_params(f"{base}/{MVTEC}", fx.sha256(mvtec_archive))
        with pytest.raises(DatasetError, match="Manual route"):
            fetch_dataset("mvtec_ad", root, params, retry_wait=0, log=logs.append)
    assert any("SHA-256 mismatch" in m and "moved aside" in m for m in logs)
    assert not root.exists()
    # no .part and no archive: the bad download is only kept aside, never used
    aside = f"{MVTEC}.unverified-{fx.sha256(bytes(bad))[:12]}"
    assert [p.name for p in (tmp_path / "downloads").iterdir()] == [aside]
    assert fx.leftovers(tmp_path) == []


def test_archive_on_disk_is_verified_every_time(tmp_path: Path, mvtec_archive: bytes) -> None:
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / MVTEC).write_bytes(mvtec_archive[:-10] + b"0123456789")  # same size, wrong
    state = fx.ServerState(files={f"/{MVTEC}": mvtec_archive})
    logs: list[str] = []
    with fx.serve(state) as base:
        params = fx.mvtec_params(f"{base}/{MVTEC}", fx.sha256(mvtec_archive))
        fetch_dataset("mvtec_ad", tmp_path / "mvtec_ad", params, retry_wait=0, log=logs.append)
    assert len(state.requests) == 1  # the bad file was not trusted because it existed
    assert any("moved aside" in m for m in logs)
    assert sha256_file(downloads / MVTEC) == fx.sha256(mvtec_archive)
    assert [p.name for p in downloads.iterdir()] == [MVTEC]  # aside copy gone once verified


def test_interrupted_download_resumes_with_range(tmp_path: Path, mvtec_archive: bytes) -> None:
    half = len(mvtec_archive) // 2
    state = fx.ServerState(files={f"/{MVTEC}": mvtec_archive}, drop_after=[half])
    logs: list[str] = []
    with fx.serve(state) as base:
        params = fx.mvtec_params(f"{base}/{MVTEC}", fx.sha256(mvtec_archive))
        fetch_dataset("mvtec_ad", tmp_path / "mvtec_ad", params, retry_wait=0, log=logs.append)
    ranges = [r["range"] for r in state.requests]
    assert len(ranges) == 2 and ranges[0] is None
    resumed_at = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= half  # kept what arrived (whole chunks), asked for the rest
    assert any("resuming from byte" in m for m in logs)
    assert read_manifest(tmp_path / "mvtec_ad") is not None


def test_existing_part_file_is_resumed(tmp_path: Path, mvtec_archive: bytes) -> None:
    third = len(mvtec_archive) // 3
    dest = tmp_path / "dl" / "a.tar.xz"
    dest.parent.mkdir()
    dest.with_name("a.tar.xz.part").write_bytes(mvtec_archive[:third])
    state = fx.ServerState(files={"/a": mvtec_archive})
    with fx.serve(state) as base:
        digest = download(f"{base}/a", dest, sha256=fx.sha256(mvtec_archive), log=_quiet)
    assert digest == fx.sha256(mvtec_archive) and dest.read_bytes() == mvtec_archive
    assert [r["range"] for r in state.requests] == [f"bytes={third}-"]


def test_server_ignoring_range_restarts_cleanly(tmp_path: Path, mvtec_archive: bytes) -> None:
    dest = tmp_path / "a.tar.xz"
    dest.with_name("a.tar.xz.part").write_bytes(mvtec_archive[:100])
    state = fx.ServerState(files={"/a": mvtec_archive}, honour_range=False)
    with fx.serve(state) as base:
        download(f"{base}/a", dest, sha256=fx.sha256(mvtec_archive), log=_quiet)
    assert dest.read_bytes() == mvtec_archive  # 200 reply: truncated, not appended


def test_corrupt_part_file_is_deleted_not_trusted(tmp_path: Path, mvtec_archive: bytes) -> None:
    dest = tmp_path / "a.tar.xz"
    part = dest.with_name("a.tar.xz.part")
    part.write_bytes(b"\0" * 1000)  # garbage prefix from some earlier run
    state = fx.ServerState(files={"/a": mvtec_archive})
    with fx.serve(state) as base:
        with pytest.raises(ChecksumError):
            download(f"{base}/a", dest, sha256=fx.sha256(mvtec_archive), log=_quiet)
        assert not part.exists() and not dest.exists()
        download(f"{base}/a", dest, sha256=fx.sha256(mvtec_archive), log=_quiet)
    assert dest.read_bytes() == mvtec_archive


def test_download_gives_up_after_attempts(tmp_path: Path, mvtec_archive: bytes) -> None:
    state = fx.ServerState(files={"/a": mvtec_archive}, drop_after=[70_000] * 3)
    with fx.serve(state) as base:
        with pytest.raises(DatasetError, match="failed after 3 attempts"):
            download(f"{base}/a", tmp_path / "a", attempts=3, retry_wait=0, chunk_size=1 << 16,
                     log=_quiet)
    assert (tmp_path / "a.part").stat().st_size == 3 << 16  # kept for a later resume
    assert [r["range"] for r in state.requests] == [None, "bytes=65536-", "bytes=131072-"]
    assert not (tmp_path / "a").exists()


def test_truncated_archive_is_rejected(tmp_path: Path, mvtec_archive: bytes) -> None:
    cut = mvtec_archive[: int(len(mvtec_archive) * 0.6)]
    state = fx.ServerState(files={f"/{MVTEC}": cut})
    root = tmp_path / "mvtec_ad"
    with fx.serve(state) as base:
        params = fx.mvtec_params(f"{base}/{MVTEC}", None)  # hash unknown: only trust helps
        with pytest.raises(ArchiveError, match="truncated or corrupt"):
            fetch_dataset("mvtec_ad", root, params, trust_first_download=True, retry_wait=0,
                          log=_quiet)
    assert not root.exists() and fx.leftovers(tmp_path) == []


def test_source_archive_file_is_verified(tmp_path: Path, mvtec_archive: bytes) -> None:
    src = tmp_path / "mine.tar.xz"
    src.write_bytes(mvtec_archive)
    params = fx.mvtec_params(None, fx.sha256(mvtec_archive))
    manifest = fetch_dataset("mvtec_ad", tmp_path / "m", params, source=src, log=_quiet)
    assert manifest["archives"][0]["url"] is None
    src.write_bytes(mvtec_archive + b"x")
    with pytest.raises(ChecksumError, match="mine.tar.xz"):
        fetch_dataset("mvtec_ad", tmp_path / "m2", params, source=src, log=_quiet)
    assert not (tmp_path / "m2").exists()


def test_adopt_extracted_tree_in_place(tmp_path: Path) -> None:
    root = fx.write_tree(tmp_path / "m", fx.mvtec_files())
    params = fx.mvtec_params()
    manifest = fetch_dataset("mvtec_ad", root, params, source=root, log=_quiet)
    assert manifest["source"] == "local tree" and (root / MANIFEST_NAME).is_file()
    assert check_dataset("mvtec_ad", root, params=params).ok


def test_foreign_root_is_not_replaced(tmp_path: Path, mvtec_archive: bytes) -> None:
    root = tmp_path / "m"
    root.mkdir()
    (root / "precious.txt").write_text("mine")
    src = tmp_path / "a.tar.xz"
    src.write_bytes(mvtec_archive)
    with pytest.raises(DatasetError, match="not fetched by omniad"):
        fetch_dataset("mvtec_ad", root, fx.mvtec_params(None, fx.sha256(mvtec_archive)),
                      source=src, log=_quiet)
    assert (root / "precious.txt").read_text() == "mine"
    dtd = fx.write_tree(tmp_path / "dtd", fx.dtd_files())
    fetch_dataset("dtd", dtd, fx.dtd_params(), source=dtd, log=_quiet)
    with pytest.raises(DatasetError, match="holds dataset 'dtd', not 'mvtec_ad'"):
        fetch_dataset("mvtec_ad", dtd, fx.mvtec_params(None, fx.sha256(mvtec_archive)),
                      source=src, log=_quiet)
    assert read_manifest(dtd)["dataset"] == "dtd"


def test_visa_tar_end_to_end(tmp_path: Path) -> None:
    archive = fx.tar_bytes(fx.visa_files(), mode="w")
    state = fx.ServerState(files={"/VisA_20220922.tar": archive})
    root = tmp_path / "visa"
    with fx.serve(state) as base:
        params = fx.visa_params(f"{base}/VisA_20220922.tar", fx.sha256(archive))
        fetch_dataset("visa", root, params, retry_wait=0, log=_quiet)
    report = check_dataset("visa", root, params=params)
    assert report.ok, report.problems
    test = read_samples("visa", root, "test", params=params)
    assert [s.label for s in test].count(1) == 4
    assert all(s.mask is not None and s.mask.stem == s.image.stem for s in test if s.label)
    cache = build_cache("visa", root, 16, tmp_path / "c", params=params, log=_quiet)
    masks = [CachedDataset(cache, "test")[i]["mask"] for i in range(6)]
    assert sum(float(m.sum()) > 0 for m in masks) == 4  # mask value 1 counts as anomalous


def test_real_iad_zip_with_token_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archives = fx.realiad_archives()
    state = fx.ServerState(files={f"/{k}": v for k, v in archives.items()}, token="sekret")
    root = tmp_path / "real_iad"
    monkeypatch.setenv("HF_TOKEN", "sekret")
    logs: list[str] = []
    with fx.serve(state) as base:
        params = fx.realiad_params(base)
        with pytest.raises(DatasetError, match="--trust-first-download"):
            fetch_dataset("real_iad", root, params, retry_wait=0, log=_quiet)
        assert state.requests == []  # refused before downloading anything
        manifest = fetch_dataset("real_iad", root, params, trust_first_download=True,
                                 retry_wait=0, log=logs.append)
    assert {r["auth"] for r in state.requests} == {"Bearer sekret"}
    assert len(manifest["archives"]) == 3
    assert sum("trusted this first download" in m for m in logs) == 3
    assert all(a["sha256_origin"] == "trusted-first-download" for a in manifest["archives"])

    report = check_dataset("real_iad", root, params=params)
    assert report.ok, report.problems
    views = read_samples("real_iad", root, "test", params=params, views=["C1", 3])
    assert len(views) == 8 and {s.defect for s in views} == {"good", "AK"}
    cache = build_cache("real_iad", root, 16, tmp_path / "c", params=params, log=_quiet)
    assert len(CachedDataset(cache, "train")) == 20
    some = build_cache("real_iad", root, 16, tmp_path / "c13", params=params, log=_quiet,
                       views=["C1", 3])
    assert len(CachedDataset(some, "test")) == 8

    # the lock now pins the archives: no trust flag needed, a tampered one fails
    assert set(fx.read_lock_file(tmp_path / "checksums" / "real_iad.sha256")) == set(archives)
    fetch_dataset("real_iad", root, params, log=_quiet)
    zip_path = tmp_path / "downloads" / "realiad_256" / "pcb.zip"
    zip_path.write_bytes(zip_path.read_bytes() + b"junk")
    next((root / "realiad_256" / "pcb").rglob("*.jpg")).unlink()  # so the archive is needed
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(DatasetError, match="HF_TOKEN"):  # re-download needs the token
        fetch_dataset("real_iad", root, params, log=_quiet)


def test_gated_without_token_or_source_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    params = fx.realiad_params("https://127.0.0.1:9/none")
    with pytest.raises(DatasetError) as err:
        fetch_dataset("real_iad", tmp_path / "r", params, trust_first_download=True, log=_quiet)
    msg = str(err.value)
    assert "export HF_TOKEN=" in msg and "--source" in msg and "accept" in msg


def test_real_iad_from_source_dir_and_zip(tmp_path: Path) -> None:
    src = fx.write_tree(tmp_path / "hub", fx.realiad_archives())
    params = fx.realiad_params(None)
    fetch_dataset("real_iad", tmp_path / "r1", params, source=src, trust_first_download=True,
                  log=_quiet)
    assert check_dataset("real_iad", tmp_path / "r1", params=params).ok
    # one zip of the whole extracted tree
    tree = {p.relative_to(tmp_path / "r1").as_posix(): p.read_bytes()
            for p in (tmp_path / "r1").rglob("*") if p.is_file() and p.name != MANIFEST_NAME}
    whole = tmp_path / "whole.zip"
    whole.write_bytes(fx.zip_bytes(tree))
    fetch_dataset("real_iad", tmp_path / "r2", params, source=whole, trust_first_download=True,
                  log=_quiet)
    assert check_dataset("real_iad", tmp_path / "r2", params=params).ok


def test_dtd_unknown_hash_needs_trust_then_pins(tmp_path: Path) -> None:
    archive = fx.tar_bytes(fx.dtd_files(), mode="w:gz")
    state = fx.ServerState(files={"/dtd-r1.0.1.tar.gz": archive})
    root = tmp_path / "dtd"
    logs: list[str] = []
    with fx.serve(state) as base:
        params = fx.dtd_params(f"{base}/dtd-r1.0.1.tar.gz")
        with pytest.raises(DatasetError, match="no SHA-256 is known"):
            fetch_dataset("dtd", root, params, log=_quiet)
        assert state.requests == [] and not root.exists()
        manifest = fetch_dataset("dtd", root, params, trust_first_download=True, retry_wait=0,
                                 log=logs.append)
        assert manifest["archives"][0]["sha256"] == fx.sha256(archive)
        assert any(fx.sha256(archive) in m and "--trust-first-download" in m for m in logs)
        assert fx.read_lock_file(tmp_path / "checksums" / "dtd.sha256") == {
            "dtd-r1.0.1.tar.gz": fx.sha256(archive)}
        # a complete verified tree: nothing to download, even with the archive gone
        (tmp_path / "downloads" / "dtd-r1.0.1.tar.gz").write_bytes(b"tampered")
        fetch_dataset("dtd", root, params, retry_wait=0, log=_quiet)
        assert len(state.requests) == 1
        # locked now: the archive on disk is checked against the lock when it is needed
        next((root / "dtd/images/banded").iterdir()).unlink()
        again = fetch_dataset("dtd", root, params, retry_wait=0, log=_quiet)
        assert len(state.requests) == 2  # re-downloaded, not trusted
        assert again["archives"][0]["sha256_origin"] == "lock"
    assert len(read_samples("dtd", root, "train", params=params)) == 6
    assert check_dataset("dtd", root, params=params).ok


# --------------------------------------------------------------------------------------------
# unsafe archives
# --------------------------------------------------------------------------------------------


def _tar_with(member: tarfile.TarInfo, tmp_path: Path) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.addfile(member, io.BytesIO(b"x" * member.size) if member.isreg() else None)
    path = tmp_path / "evil.tar"
    path.write_bytes(buf.getvalue())
    return path


@pytest.mark.parametrize("name,kind,link,match", [
    ("../evil.txt", tarfile.REGTYPE, "", "'..'"),
    ("/abs/evil.txt", tarfile.REGTYPE, "", "absolute"),
    ("a/link", tarfile.SYMTYPE, "/etc/passwd", "absolute"),
    ("a/link", tarfile.SYMTYPE, "../../outside", "outside"),
    ("a/hard", tarfile.LNKTYPE, "../outside", "outside"),
    ("dev", tarfile.CHRTYPE, "", "device"),
])
def test_unsafe_tar_members_are_rejected(
    tmp_path: Path, name: str, kind: bytes, link: str, match: str
) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = 1 if kind == tarfile.REGTYPE else 0
    with pytest.raises(ArchiveError, match=match):
        safe_extract(_tar_with(info, tmp_path), tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "outside").exists()


def test_safe_links_inside_are_kept(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        data = tarfile.TarInfo("a/file.txt")
        data.size = 2
        tf.addfile(data, io.BytesIO(b"hi"))
        sym = tarfile.TarInfo("a/b/link")
        sym.type, sym.linkname = tarfile.SYMTYPE, "../file.txt"
        tf.addfile(sym)
    (tmp_path / "ok.tar").write_bytes(buf.getvalue())
    safe_extract(tmp_path / "ok.tar", tmp_path / "out")
    assert (tmp_path / "out/a/b/link").read_text() == "hi"


@pytest.mark.parametrize("name", ["../evil.txt", "/abs.txt", "a/../../evil.txt"])
def test_unsafe_zip_members_are_rejected(tmp_path: Path, name: str) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("fine.txt", "ok")
        zf.writestr(zipfile.ZipInfo(name), "evil")
    (tmp_path / "evil.zip").write_bytes(buf.getvalue())
    with pytest.raises(ArchiveError):
        safe_extract(tmp_path / "evil.zip", tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()


def test_zip_symlink_outside_is_rejected(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("link")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "../../etc")
    (tmp_path / "l.zip").write_bytes(buf.getvalue())
    with pytest.raises(ArchiveError, match="outside"):
        safe_extract(tmp_path / "l.zip", tmp_path / "out")


def test_truncated_zip_is_rejected(tmp_path: Path) -> None:
    data = fx.zip_bytes({"a.txt": b"a" * 1000})
    (tmp_path / "t.zip").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArchiveError, match="truncated or corrupt zip"):
        safe_extract(tmp_path / "t.zip", tmp_path / "out")


def test_manifest_is_valid_json_with_digest(tmp_path: Path) -> None:
    root = fx.write_tree(tmp_path / "m", fx.mvtec_files())
    fetch_dataset("mvtec_ad", root, fx.mvtec_params(), source=root, log=_quiet)
    doc = json.loads((root / MANIFEST_NAME).read_text())
    doc["files"][0]["sha256"] = "0" * 64
    (root / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match="does not match its tree_sha256"):
        read_manifest(root)


def test_mirror_from_environment_and_url_override(
    tmp_path: Path, mvtec_archive: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = fx.ServerState(files={f"/mirror/{MVTEC}": mvtec_archive, "/x.tar.xz": mvtec_archive})
    with fx.serve(state) as base:
        params = fx.mvtec_params("https://invalid.example/never", fx.sha256(mvtec_archive))
        monkeypatch.setenv("OMNIAD_DATA_MIRROR", f"{base}/mirror/")
        fetch_dataset("mvtec_ad", tmp_path / "a", params, retry_wait=0, log=_quiet)
        fetch_dataset("mvtec_ad", tmp_path / "b", params, url=f"{base}/x.tar.xz",
                      downloads=tmp_path / "dl2", retry_wait=0, log=_quiet)
    assert [r["path"] for r in state.requests] == [f"/mirror/{MVTEC}", "/x.tar.xz"]
