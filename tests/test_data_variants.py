"""Real-IAD variants side by side, content-keyed cache, VisA per-object counts, and the
messages of bad input (each names its file; suggested commands are ones argparse accepts)."""

from __future__ import annotations

import errno
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omniad.data.cache import KEY_NAME, CachedDataset, build_cache
from omniad.data.check import check_dataset
from omniad.data.cli import main
from omniad.data.demo import make_demo
from omniad.data.fetch import fetch_dataset, safe_extract
from omniad.data.manifest import MANIFEST_NAME, list_files, read_manifest, write_manifest
from omniad.data.samples import ArchiveError, DatasetError

try:
    import data_fixtures as fx
except ImportError:  # tests/ became a package
    from tests import data_fixtures as fx

try:
    from test_data_sources import parses
except ImportError:
    from tests.test_data_sources import parses

isolated_checksums = fx.isolated_checksums  # autouse: locks go to tmp_path

SMALL = {"n_train": 3, "n_test_good": 2, "n_per_defect": 1, "size": 64}


def _quiet(msg: str) -> None:
    pass


def _both_variants() -> dict[str, bytes]:
    """The hub's files for realiad_256 and realiad_512 (one metadata zip for both)."""
    a = fx.realiad_archives(variant="realiad_256")
    b = fx.realiad_archives(variant="realiad_512")
    return a | {k: v for k, v in b.items() if k.startswith("realiad_512/")}


def _unzip_all(archives: dict[str, bytes], dest: Path) -> Path:
    for name, data in archives.items():
        prefix = name.rsplit("/", 1)[0] if "/" in name else ""
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            zf.extractall(dest / prefix)
    return dest


# --------------------------------------------------------------------------------------------
# Real-IAD variants
# --------------------------------------------------------------------------------------------


def test_two_real_iad_variants_coexist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archives = _both_variants()
    state = fx.ServerState(files={f"/{k}": v for k, v in archives.items()})
    monkeypatch.setenv("HF_TOKEN", "t")
    root = tmp_path / "real_iad"
    with fx.serve(state) as base:
        params = fx.realiad_params(base)
        fetch_dataset("real_iad", root, params, trust_first_download=True, retry_wait=0,
                      log=_quiet)
        n_first = len(state.requests)
        manifest = fetch_dataset("real_iad", root, params, variants=["realiad_512"],
                                 trust_first_download=True, retry_wait=0, log=_quiet)
    fetched_second = sorted(r["path"] for r in state.requests[n_first:])
    assert fetched_second == ["/realiad_512/audiojack.zip", "/realiad_512/pcb.zip"]
    assert manifest["variants"] == {"realiad_256": {"resolution": 24},
                                    "realiad_512": {"resolution": 48}}
    assert (root / "realiad_256").is_dir() and (root / "realiad_512").is_dir()
    assert {a["variant"] for a in manifest["archives"]} == {"", "realiad_256", "realiad_512"}
    for variant in ("realiad_256", "realiad_512"):
        report = check_dataset("real_iad", root, params=params, variant=variant)
        assert report.ok, report.problems
    assert read_manifest(root) == manifest and fx.leftovers(tmp_path) == []
    # both stay: a rerun asking for the default variant only changes nothing
    assert fetch_dataset("real_iad", root, params, log=_quiet) == manifest


def test_wrong_resolution_under_a_variant_name_is_refused(tmp_path: Path) -> None:
    params = fx.realiad_params(None)
    hub = _both_variants()
    # a user's tree whose realiad_256 folder really holds the 512 images
    swapped = {k.replace("realiad_512/", "realiad_256/"): v for k, v in hub.items()
               if not k.startswith("realiad_256/")}
    tree = _unzip_all(swapped, tmp_path / "mine")
    report = check_dataset("real_iad", tree, params=params)
    wrong = [p for p in report.problems if "longer side of 24 px" in p]
    assert len(wrong) == 40 and "image is 48x48" in wrong[0]  # every image, by decoding
    assert report.n_files == 50  # 40 images + 10 masks, all decoded
    with pytest.raises(DatasetError, match="not a complete real_iad tree"):
        fetch_dataset("real_iad", tmp_path / "r", params, source=tree, log=_quiet)
    assert not (tmp_path / "r").exists()
    # named right, it is adopted (decoded and counted first) with its variant recorded
    (tree / "realiad_256").rename(tree / "realiad_512")
    manifest = fetch_dataset("real_iad", tmp_path / "r", params, source=tree,
                             variants=["realiad_512"], log=_quiet)
    assert manifest["variants"] == {"realiad_512": {"resolution": 48}}
    report = check_dataset("real_iad", tmp_path / "r", params=params)  # default: 256
    assert any("variant realiad_256 was not fetched here" in p for p in report.problems)
    assert parses(report.problems[0].split("`")[1])


# --------------------------------------------------------------------------------------------
# cache keyed by content
# --------------------------------------------------------------------------------------------


def test_edited_source_image_rebuilds_the_cache(tmp_path: Path) -> None:
    root = make_demo(tmp_path / "demo", seed=0, **SMALL)
    logs: list[str] = []
    cache = build_cache("demo", root, 32, tmp_path / "c", log=logs.append)
    key1 = json.loads((cache / KEY_NAME).read_text())
    before = np.load(cache / "train/brick_images.npy")[1].copy()
    # edited in place; the manifest is not touched, so only the content can tell
    img = root / "brick/train/good/001.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(img)
    build_cache("demo", root, 32, tmp_path / "c", log=logs.append)
    key2 = json.loads((cache / KEY_NAME).read_text())
    assert any(f"changed since {cache} was built (first: {img})" in m for m in logs)
    assert key2["source_tree_sha256"] == key1["source_tree_sha256"]
    assert key2["content_sha256"] != key1["content_sha256"] and key2["sha256"] != key1["sha256"]
    after = np.load(cache / "train/brick_images.npy")[1]
    assert not np.array_equal(before, after) and (after == 200).all()
    build_cache("demo", root, 32, tmp_path / "c", log=logs.append)
    assert "reusing cache" in logs[-1]
    # replaced by another file of the same size: the hash, not the size, decides
    other = root / "brick/train/good/002.png"
    data = img.read_bytes()
    img.write_bytes(other.read_bytes())
    other.write_bytes(data)
    build_cache("demo", root, 32, tmp_path / "c", log=logs.append)
    assert "reusing cache" not in logs[-1]
    assert (np.load(cache / "train/brick_images.npy")[2] == 200).all()


# --------------------------------------------------------------------------------------------
# VisA per-object counts
# --------------------------------------------------------------------------------------------


def _visa_object_tree(root: Path, obj: str, n_train: int, n_good: int, n_bad: int) -> Path:
    """One VisA object in the real layout with the given 1cls.csv counts (tiny images)."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="JPEG")
    jpg = buf.getvalue()
    mask = fx.mask_bytes(8, 8, value=1)
    rows = ["object,split,label,image,mask"]
    for i in range(n_train + n_good):
        rel = f"{obj}/Data/Images/Normal/{i:04d}.JPG"
        rows.append(f"{obj},{'train' if i < n_train else 'test'},normal,{rel},")
        fx.write_tree(root, {rel: jpg})
    for i in range(n_bad):
        rel, mrel = f"{obj}/Data/Images/Anomaly/{i:03d}.JPG", f"{obj}/Data/Masks/Anomaly/{i:03d}.png"
        rows.append(f"{obj},test,anomaly,{rel},{mrel}")
        fx.write_tree(root, {rel: jpg, mrel: mask})
    fx.write_tree(root, {"split_csv/1cls.csv": ("\n".join(rows) + "\n").encode()})
    return root


def test_visa_per_object_counts_from_1cls_csv(tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    root = _visa_object_tree(tmp_path / "visa", "capsules", 542, 60, 100)
    args = ["check", "visa", "--root", str(root), "--categories", "capsules", "-q"]
    assert main(args) == 0
    out = capsys.readouterr().out
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in out.splitlines()}
    assert rows[("train", "capsules")] == ["542", "542", "0", "0", "ok"]
    assert rows[("test", "capsules")] == ["60", "60", "100", "100", "ok"]
    assert "802 files decoded: OK" in out
    bad = _visa_object_tree(tmp_path / "visa2", "pcb3", 905, 100, 100)  # pcb3 has 101
    assert main(["check", "visa", "--root", str(bad), "--categories", "pcb3", "-q"]) == 1
    assert "count mismatch for test/pcb3 normal: found 100, expected 101" in \
        capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# messages
# --------------------------------------------------------------------------------------------


@pytest.fixture
def mvtec(tmp_path: Path) -> Path:
    root = fx.write_tree(tmp_path / "mvtec", fx.mvtec_files())
    write_manifest(root, "mvtec_ad", list_files(root))
    return root


def test_corrupt_mask_names_its_file_and_is_not_counted_as_decoded(mvtec: Path) -> None:
    mask = mvtec / "cable/ground_truth/broken/000_mask.png"
    mask.write_bytes(b"garbage, not a png")
    report = check_dataset("mvtec_ad", mvtec, params=fx.mvtec_params())
    decode = [p for p in report.problems if "cannot decode" in p]
    assert decode == [f"{mask}: cannot decode mask: not an image file of a known format "
                      "(corrupt or not an image)"]
    assert "BytesIO" not in " ".join(report.problems)
    assert report.n_files == 10 + 6 + 6 - 1
    assert report.summary().endswith(f"{10 + 6 + 6 - 1} files decoded: FAILED (2 problems)")


def test_one_bad_file_does_not_zero_its_category(mvtec: Path) -> None:
    (mvtec / "bottle/train/good/notes.txt").write_text("stray")
    (mvtec / "cable/ground_truth/crack/000_mask.png").unlink()
    report = check_dataset("mvtec_ad", mvtec, params=fx.mvtec_params())
    assert report.counts["train"]["bottle"] == {"normal": 3, "anomaly": 0}
    assert report.counts["test"]["cable"] == {"normal": 2, "anomaly": 2}  # 3 - the unpaired
    assert any("notes.txt: unexpected file" in p for p in report.problems)
    assert any("crack/000.png: image without its mask" in p for p in report.problems)


def test_zip_errors_name_the_member(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = bytearray(fx.zip_bytes({"a/fine.txt": rng.bytes(5000), "a/bad.txt": rng.bytes(5000)}))
    at = data.find(b"a/bad.txt") + 2000  # inside bad.txt's (incompressible) data
    data[at:at + 8] = b"\xff" * 8
    (tmp_path / "c.zip").write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match="at member 'a/bad.txt'"):
        safe_extract(tmp_path / "c.zip", tmp_path / "out")


def test_check_compares_the_manifest_dataset(mvtec: Path) -> None:
    write_manifest(mvtec, "visa", list_files(mvtec))
    with pytest.raises(DatasetError, match="holds dataset 'visa'.*not 'mvtec_ad'"):
        check_dataset("mvtec_ad", mvtec, params=fx.mvtec_params())
    with pytest.raises(DatasetError, match="holds dataset 'visa'"):
        build_cache("mvtec_ad", mvtec, 16, mvtec.parent / "c", params=fx.mvtec_params())


def test_missing_root_says_it_does_not_exist(tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    absent = tmp_path / "nowhere"
    for cmd in ("check", "cache"):
        extra = ["--out", str(tmp_path / "c")] if cmd == "cache" else []
        assert main([cmd, "demo", "--root", str(absent), *extra, "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: {absent}: dataset root of demo does not exist"


def test_suggested_commands_are_accepted_by_the_parser(tmp_path: Path) -> None:
    demo = make_demo(tmp_path / "demo", seed=0, **SMALL)
    (demo / MANIFEST_NAME).unlink()
    with pytest.raises(DatasetError) as err:
        build_cache("demo", demo, 16, tmp_path / "c", log=_quiet)
    assert parses(str(err.value).split("`")[1])  # `omniad data demo --root ...`
    bare = fx.write_tree(tmp_path / "m", fx.mvtec_files())
    with pytest.raises(DatasetError) as err:
        build_cache("mvtec_ad", bare, 16, tmp_path / "c", params=fx.mvtec_params())
    assert parses(str(err.value).split("`")[1])
    with pytest.raises(DatasetError) as err:
        fetch_dataset("real_iad", tmp_path / "r", fx.realiad_params(None), log=_quiet)
    assert "--trust-first-download" in str(err.value)
    with pytest.raises(DatasetError) as err:
        fetch_dataset("demo", tmp_path / "d", log=_quiet)
    assert parses(str(err.value).split("`")[1])
    with pytest.raises(DatasetError) as err:
        CachedDataset(tmp_path, "train")
    assert parses(str(err.value).split("`")[1].replace("<dataset>", "demo")
                  .replace("<its root>", str(demo)))


def test_disk_full_is_one_line_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture) -> None:
    import omniad.data.fetch as fetch_mod

    archive = tmp_path / "a.tar.xz"
    archive.write_bytes(fx.tar_bytes(fx.mvtec_files()))

    def full(src: Path, dest: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(dest / "bottle"))

    monkeypatch.setattr(fetch_mod, "safe_extract", full)
    import yaml

    pfile = tmp_path / "d.yaml"
    pfile.write_text(yaml.safe_dump(fx.mvtec_params(None, fx.sha256(archive.read_bytes()))))
    rc = main(["fetch", "mvtec_ad", "--root", str(tmp_path / "m"), "--source", str(archive),
               "--params", str(pfile), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: ") and err.rstrip().endswith(": No space left on device")
    assert "/bottle" in err
    assert fx.leftovers(tmp_path) == [] and not (tmp_path / "m").exists()
    # the same for the cache, at the first array written
    demo = make_demo(tmp_path / "demo", seed=0, **SMALL)
    import omniad.data.cache as cache_mod

    def full_map(path: Path, **kw: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(cache_mod, "open_memmap", full_map)
    rc = main(["cache", "demo", "--root", str(demo), "--size", "16", "--out",
               str(tmp_path / "c"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "_images.npy: No space left on device" in err
    assert not (tmp_path / "c").exists()


def test_unusable_downloads_or_out_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")  # a directory cannot be made below a file (also as root)
    rc = main(["fetch", "mvtec_ad", "--root", str(tmp_path / "m"), "--downloads",
               str(blocker / "dl"), "--url", "http://127.0.0.1:9/x.tar.xz", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {blocker / 'dl'}: Not a directory")
    demo = make_demo(tmp_path / "demo", seed=0, **SMALL)
    rc = main(["cache", "demo", "--root", str(demo), "--size", "16", "--out",
               str(blocker / "c"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith(f"error: {blocker}")


def test_extracted_tree_used_in_place_is_never_written(tmp_path: Path) -> None:
    tree = fx.write_tree(tmp_path / "shared" / "mvtec", fx.mvtec_files())
    stamp = {p: p.stat().st_mtime_ns for p in tree.rglob("*")}
    params = fx.mvtec_params()
    root = tmp_path / "data" / "mvtec_ad"
    manifest = fetch_dataset("mvtec_ad", root, params, source=tree, in_place=True, log=_quiet)
    assert {p: p.stat().st_mtime_ns for p in tree.rglob("*")} == stamp  # nothing written
    assert manifest["source_root"] == str(tree) and (root / "bottle").is_symlink()
    assert {f["path"] for f in manifest["files"]} == set(fx.mvtec_files())
    assert check_dataset("mvtec_ad", root, params=params).ok  # hashes compared through links
    cache = build_cache("mvtec_ad", root, 16, tmp_path / "c", params=params, log=_quiet)
    assert (cache / KEY_NAME).is_file()
    # a rerun finds it complete; a changed file in the tree shows up in check
    assert fetch_dataset("mvtec_ad", root, params, log=_quiet) == manifest
    (tree / "bottle/train/good/000.png").write_bytes(fx.image_bytes(np.random.default_rng(9)))
    report = check_dataset("mvtec_ad", root, params=params)
    assert any("image changed since it was recorded" in p for p in report.problems)
