"""The resized cache: contents, item format, key-based reuse/rebuild, atomicity on bad input."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode

from omniad.data.cache import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INDEX_NAME,
    KEY_NAME,
    CachedDataset,
    build_cache,
    load_sample,
)
from omniad.data.cli import main
from omniad.data.demo import make_demo
from omniad.data.fetch import fetch_dataset
from omniad.data.manifest import list_files, write_manifest
from omniad.data.samples import DatasetError, Sample

try:
    import data_fixtures as fx
except ImportError:  # tests/ became a package
    from tests import data_fixtures as fx

isolated_checksums = fx.isolated_checksums  # autouse: locks go to tmp_path

SMALL = {"n_train": 3, "n_test_good": 2, "n_per_defect": 1, "size": 64}


def _quiet(msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo(tmp_path_factory.mktemp("d") / "demo", seed=0, **SMALL)


def test_arrays_and_index(small_demo: Path, tmp_path: Path) -> None:
    cache = build_cache("demo", small_demo, 32, tmp_path / "c", log=_quiet)
    index = json.loads((cache / INDEX_NAME).read_text())
    coins = index["splits"]["test"]["categories"]["coins"]
    images = np.load(cache / coins["images"], mmap_mode="r")
    masks = np.load(cache / coins["masks"], mmap_mode="r")
    assert images.shape == (5, 32, 32, 3) and images.dtype == np.uint8
    assert masks.shape == (5, 32, 32) and set(np.unique(masks)) <= {0, 1}
    rec = [r for r in index["splits"]["test"]["samples"] if r["category"] == "coins"]
    assert [r["defect"] for r in rec] == ["good", "good", "hole", "scratch", "stain"]
    assert rec[2]["path"] == "coins/test/hole/000.png" and rec[2]["label"] == 1
    # the stored pixels are exactly the documented resize of the decoded file
    src = np.array(Image.open(small_demo / rec[2]["path"]).convert("RGB"))
    want = TF.resize(torch.from_numpy(src).permute(2, 0, 1), [32, 32],
                     interpolation=InterpolationMode.BILINEAR, antialias=True)
    assert np.array_equal(images[2], want.permute(1, 2, 0).numpy())
    assert masks[2].sum() > 0 and masks[0].sum() == 0


def test_item_format_and_normalisation(small_demo: Path, tmp_path: Path) -> None:
    cache = build_cache("demo", small_demo, 32, tmp_path / "c", log=_quiet)
    ds = CachedDataset(cache, "test", categories=["brick", "coffee"])
    assert len(ds) == 10 and ds.categories == ["brick", "coffee"]
    item = ds[7]
    assert set(item) == {"image", "mask", "label", "category", "defect", "index"}
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 32, 32)
    assert item["image"].is_contiguous()
    assert item["mask"].dtype == torch.float32 and item["mask"].shape == (1, 32, 32)
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert (item["category"], item["index"], type(item["label"])) == ("coffee", 7, int)
    raw = np.load(cache / "test/coffee_images.npy")[2].astype(np.float32) / 255
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    expect = ((raw - mean) / std).transpose(2, 0, 1)
    assert np.allclose(item["image"].numpy(), expect, atol=1e-5)
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["category"][0] == "brick"
    with pytest.raises(DatasetError, match="unknown categories"):
        CachedDataset(cache, "test", categories=["tile"])


def test_dataloader_workers_reopen_maps(small_demo: Path, tmp_path: Path) -> None:
    cache = build_cache("demo", small_demo, 32, tmp_path / "c", log=_quiet)
    ds = CachedDataset(cache, "train")
    first = ds[0]  # opens maps in this process; pickling (spawn workers) must not carry them
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._arrays == {} and len(pickle.dumps(ds)) < 20_000
    assert torch.equal(clone[0]["image"], first["image"])
    loader = DataLoader(ds, batch_size=6, num_workers=2)
    labels = torch.cat([b["label"] for b in loader])
    assert labels.tolist() == [0] * 12


def test_reused_when_unchanged_rebuilt_when_source_changes(tmp_path: Path) -> None:
    root = make_demo(tmp_path / "demo", seed=0, **SMALL)
    logs: list[str] = []
    cache = build_cache("demo", root, 32, tmp_path / "c", log=logs.append)
    key1 = json.loads((cache / KEY_NAME).read_text())
    stamp = (cache / "train/brick_images.npy").stat().st_mtime_ns
    build_cache("demo", root, 32, tmp_path / "c", log=logs.append)
    assert "reusing cache" in logs[-1]
    assert (cache / "train/brick_images.npy").stat().st_mtime_ns == stamp
    make_demo(root, seed=1, **SMALL)  # new source tree -> new manifest hash
    build_cache("demo", root, 32, tmp_path / "c", log=logs.append)
    key2 = json.loads((cache / KEY_NAME).read_text())
    assert "cached" in logs[-1] and key2["sha256"] != key1["sha256"]
    assert key2["source_tree_sha256"] != key1["source_tree_sha256"]
    build_cache("demo", root, 16, tmp_path / "c", log=logs.append)  # other size: rebuilt
    assert CachedDataset(tmp_path / "c", "train")[0]["image"].shape == (3, 16, 16)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_threaded_build_equals_serial(small_demo: Path, tmp_path: Path) -> None:
    a = build_cache("demo", small_demo, 24, tmp_path / "a", workers=1, log=_quiet)
    b = build_cache("demo", small_demo, 24, tmp_path / "b", workers=2, log=_quiet)
    for rel in ("train/gravel_images.npy", "test/coffee_masks.npy"):
        assert np.array_equal(np.load(a / rel), np.load(b / rel))


def test_bad_input_leaves_no_cache(tmp_path: Path) -> None:
    root = fx.write_tree(tmp_path / "m", fx.mvtec_files())
    params = fx.mvtec_params()
    mask = root / "cable/ground_truth/broken/000_mask.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(mask)
    with pytest.raises(DatasetError, match="000_mask.png: mask size 8x8 differs"):
        fetch_dataset("mvtec_ad", root, params, source=root, log=_quiet)  # adoption checks
    write_manifest(root, "mvtec_ad", list_files(root))  # recorded anyway, by hand
    with pytest.raises(DatasetError, match="000_mask.png: mask size 8x8 differs"):
        build_cache("mvtec_ad", root, 16, tmp_path / "c", params=params, log=_quiet)
    assert not (tmp_path / "c").exists() and fx.leftovers(tmp_path) == []
    img = root / "bottle/test/good/001.png"
    img.write_bytes(b"\x89PNG garbage")
    write_manifest(root, "mvtec_ad", list_files(root))
    with pytest.raises(DatasetError, match="001.png: cannot decode image"):
        build_cache("mvtec_ad", root, 16, tmp_path / "c", params=params, workers=2, log=_quiet)
    assert not (tmp_path / "c").exists() and fx.leftovers(tmp_path) == []


def test_needs_a_manifest_and_refuses_foreign_dirs(small_demo: Path, tmp_path: Path) -> None:
    bare = fx.write_tree(tmp_path / "m", fx.mvtec_files())
    with pytest.raises(DatasetError, match="no omniad_manifest.json"):
        build_cache("mvtec_ad", bare, 16, tmp_path / "c", params=fx.mvtec_params(), log=_quiet)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(DatasetError, match="not an omniad cache"):
        build_cache("demo", small_demo, 16, foreign, log=_quiet)
    assert (foreign / "keep.txt").exists()
    with pytest.raises(DatasetError, match="not a complete cache"):
        CachedDataset(foreign, "train")


def test_mask_resize_modes(tmp_path: Path) -> None:
    img = tmp_path / "i.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(img)
    m = np.zeros((64, 64), np.uint8)
    m[0:2, 0:2] = 255  # a 2x2 speck: gone at 16 px with bilinear + 0.5, kept by nearest
    m[20:52, 20:52] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    s = Sample(img, tmp_path / "m.png", 1, "x", "d", "test")
    _, bil = load_sample(s, 16, "bilinear_threshold")
    _, near = load_sample(s, 16, "nearest")
    assert bil[0, 0] == 0 and near[0, 0] == 1
    assert bil[5:13, 5:13].all() and near[5:13, 5:13].all()
    assert bil.dtype == np.uint8 and set(np.unique(bil)) == {0, 1}


def test_cli_cache(small_demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["cache", "demo", "--root", str(small_demo), "--size", "32", "--out",
            str(tmp_path / "c"), "-q"]
    assert main(args) == 0 and main(args) == 0
    assert "reusing cache" in capsys.readouterr().out
    assert len(CachedDataset(tmp_path / "c", "test", ["gravel"])) == 5
    assert main([*args, "--categories", "tile"]) == 2
    assert "unknown category 'tile'" in capsys.readouterr().err
