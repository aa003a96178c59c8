"""Readers: categories from params, pairing by name, and an error naming the file for faults."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from omniad.data.demo import RECIPES
from omniad.data.fetch import safe_extract
from omniad.data.params import COUNT_KEYS, load_params, override, resolve_categories
from omniad.data.readers import camera_view, read_samples
from omniad.data.samples import DatasetError, Sample

try:
    import data_fixtures as fx
except ImportError:  # tests/ became a package
    from tests import data_fixtures as fx

isolated_checksums = fx.isolated_checksums  # autouse: locks go to tmp_path


@pytest.fixture
def mvtec(tmp_path: Path) -> Path:
    return fx.write_tree(tmp_path / "mvtec", fx.mvtec_files())


def test_params_facts_are_consistent() -> None:
    params = load_params()
    ds = params["datasets"]
    assert [len(ds[n]["categories"]) for n in ("mvtec_ad", "visa", "real_iad", "dtd")] == [
        15, 12, 30, 47]
    for name in ("mvtec_ad", "visa", "real_iad", "dtd"):
        for arch in ds[name]["archives"]:
            assert set(arch) >= {"name", "sha256", "extract_to"}
    per_cat = ds["mvtec_ad"]["expected"]["per_category"]
    totals = ds["mvtec_ad"]["expected"]["totals"]
    for key in ("train_normal", "test_normal", "test_anomaly"):
        assert sum(c[key] for c in per_cat.values()) == totals[key]
    assert ds["visa"]["expected"]["totals"]["train_normal"] + ds["visa"]["expected"][
        "totals"]["test_normal"] == 9621
    rt = ds["real_iad"]["expected"]["totals"]
    assert (rt["train_normal"], rt["test_normal"] + rt["test_anomaly"]) == (36465, 114585)
    # DTD's published hash is pinned; VisA's per-object columns sum to its totals
    assert ds["dtd"]["archives"][0]["sha256"] == (
        "e42855a52a4950a3b59612834602aa253914755c95b0cff9ead6d07395f8e205")
    visa = ds["visa"]["expected"]
    for key in ("train_normal", "test_normal", "test_anomaly"):
        assert sum(c[key] for c in visa["per_category"].values()) == visa["totals"][key]
    assert ds["demo"]["categories"] == list(RECIPES)
    assert set(COUNT_KEYS) >= set(totals)


def test_params_path_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = override(load_params(), "demo", categories=["brick"])
    (tmp_path / "datasets.yaml").write_text(yaml.safe_dump(doc))
    monkeypatch.delenv("OMNIAD_DATASETS_PARAMS", raising=False)
    monkeypatch.setenv("OMNIAD_PARAMS", str(tmp_path))
    assert load_params()["datasets"]["demo"]["categories"] == ["brick"]
    monkeypatch.setenv("OMNIAD_DATASETS_PARAMS", str(tmp_path / "absent.yaml"))
    with pytest.raises(DatasetError, match="absent.yaml: cannot read"):
        load_params()


def test_params_reject_bad_structure() -> None:
    with pytest.raises(DatasetError, match="not a SHA-256"):
        override(load_params(), "dtd", archives=[{"name": "x", "sha256": "abc"}])
    with pytest.raises(DatasetError, match="unknown category"):
        override(load_params(), "visa", expected={"per_category": {"nope": {}}})


def test_mvtec_reader_pairs_by_name(mvtec: Path) -> None:
    params = fx.mvtec_params()
    train = read_samples("mvtec_ad", mvtec, "train", params=params)
    test = read_samples("mvtec_ad", mvtec, "test", params=params)
    assert len(train) == 6 and all(s.label == 0 and s.mask is None for s in train)
    assert [s.category for s in test] == ["bottle"] * 5 + ["cable"] * 5
    assert [s.defect for s in test[:5]] == ["good", "good", "broken", "broken", "crack"]
    for s in test:
        assert s.label == (s.defect != "good")
        if s.label:
            assert s.mask == mvtec / s.category / "ground_truth" / s.defect / (
                s.image.stem + "_mask.png")
    assert isinstance(test[0], Sample) and test[0].split == "test"
    only = read_samples("mvtec_ad", mvtec, "test", ["cable"], params=params)
    assert {s.category for s in only} == {"cable"}


def test_pairing_survives_a_missing_middle_file(mvtec: Path) -> None:
    """Position-based pairing would shift every mask after a gap; name-based does not."""
    params = fx.mvtec_params()
    (mvtec / "bottle/test/broken/000.png").unlink()
    (mvtec / "bottle/ground_truth/broken/000_mask.png").unlink()
    test = read_samples("mvtec_ad", mvtec, "test", ["bottle"], params=params)
    broken = [s for s in test if s.defect == "broken"]
    assert [(s.image.name, s.mask.name) for s in broken] == [("001.png", "001_mask.png")]


def test_image_without_mask(mvtec: Path) -> None:
    (mvtec / "cable/ground_truth/crack/000_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"cable/test/crack/000.png: image without its mask"):
        read_samples("mvtec_ad", mvtec, "test", params=fx.mvtec_params())


def test_mask_without_image(mvtec: Path) -> None:
    (mvtec / "cable/test/broken/001.png").unlink()
    with pytest.raises(DatasetError, match=r"001_mask.png: mask without its image"):
        read_samples("mvtec_ad", mvtec, "test", params=fx.mvtec_params())


def test_masks_of_a_missing_defect_dir(mvtec: Path) -> None:
    shutil.rmtree(mvtec / "cable/test/crack")
    with pytest.raises(DatasetError, match="masks without images"):
        read_samples("mvtec_ad", mvtec, "test", params=fx.mvtec_params())


def test_unknown_category(mvtec: Path) -> None:
    with pytest.raises(DatasetError, match="unknown category 'bottel'"):
        read_samples("mvtec_ad", mvtec, "test", ["bottel"], params=fx.mvtec_params())
    with pytest.raises(DatasetError, match="unknown dataset"):
        read_samples("mvtec", mvtec, "test")
    facts = load_params()["datasets"]["mvtec_ad"]
    assert resolve_categories("mvtec_ad", facts, ["zipper", "bottle"]) == ["bottle", "zipper"]


def test_empty_split(mvtec: Path) -> None:
    for p in (mvtec / "bottle/train/good").iterdir():
        p.unlink()
    with pytest.raises(DatasetError, match="empty split: mvtec_ad/bottle has no train images"):
        read_samples("mvtec_ad", mvtec, "train", params=fx.mvtec_params())


def test_stray_files_and_missing_dirs_are_named(mvtec: Path) -> None:
    params = fx.mvtec_params()
    (mvtec / "bottle/train/good/notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="notes.txt: unexpected file"):
        read_samples("mvtec_ad", mvtec, "train", params=params)
    (mvtec / "bottle/train/good/notes.txt").unlink()
    (mvtec / "bottle/train/good/.DS_Store").write_text("x")  # hidden files are ignored
    assert len(read_samples("mvtec_ad", mvtec, "train", params=params)) == 6
    shutil.rmtree(mvtec / "cable")
    with pytest.raises(DatasetError, match="cable: missing category directory"):
        read_samples("mvtec_ad", mvtec, "train", params=params)
    with pytest.raises(DatasetError, match="unknown split"):
        read_samples("mvtec_ad", mvtec, "val", params=params)


def test_visa_reader(tmp_path: Path) -> None:
    root = fx.write_tree(tmp_path / "visa", fx.visa_files())
    params = fx.visa_params()
    train = read_samples("visa", root, "train", params=params)
    test = read_samples("visa", root, "test", params=params)
    assert len(train) == 6 and len(test) == 6
    assert {s.defect for s in test} == {"good", "anomaly"}
    csv_path = root / "split_csv/1cls.csv"
    text = csv_path.read_text()
    csv_path.write_text(text.replace("candle/Data/Masks/Anomaly/001.png", ""))
    with pytest.raises(DatasetError, match="001.JPG: image without its mask"):
        read_samples("visa", root, "test", params=params)
    csv_path.write_text(text.replace("Masks/Anomaly/001.png", "Masks/Anomaly/000.png", 1))
    with pytest.raises(DatasetError, match="does not match image 001.JPG by name"):
        read_samples("visa", root, "test", params=params)
    csv_path.write_text(text.replace("candle/Data/Images/Normal/0000.JPG", "../x.JPG"))
    with pytest.raises(DatasetError, match="must be relative"):
        read_samples("visa", root, "train", params=params)
    csv_path.write_text(text + "candel,test,normal,x.JPG,\n")
    with pytest.raises(DatasetError, match="unknown object 'candel'"):
        read_samples("visa", root, "train", params=params)


def test_real_iad_reader_variants_and_views(tmp_path: Path) -> None:
    root = tmp_path / "r"
    for name, data in fx.realiad_archives().items():
        arch = tmp_path / "a" / name
        arch.parent.mkdir(parents=True, exist_ok=True)
        arch.write_bytes(data)
        safe_extract(arch, root / (name.split("/")[0] if "/" in name else ""))
    params = fx.realiad_params()
    assert len(read_samples("real_iad", root, "train", params=params)) == 20
    c2 = read_samples("real_iad", root, "test", params=params, views=[2])
    assert [camera_view(s.image) for s in c2] == [2, 2, 2, 2]
    assert all(s.mask.stem == s.image.stem for s in c2 if s.label)
    with pytest.raises(DatasetError, match="unknown camera view"):
        read_samples("real_iad", root, "test", params=params, views=["C9"])
    with pytest.raises(DatasetError, match="unknown resolution variant"):
        read_samples("real_iad", root, "test", params=params, variant="realiad_64")
    with pytest.raises(DatasetError, match="does not exist"):  # variant not extracted
        read_samples("real_iad", root, "test", params=params, variant="realiad_512")
    jpath = root / "realiad_jsons/pcb.json"
    doc = json.loads(jpath.read_text())
    doc["test"][-1]["mask_path"] = None
    jpath.write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match="image without its mask"):
        read_samples("real_iad", root, "test", params=params)


def test_dtd_reader(tmp_path: Path) -> None:
    root = fx.write_tree(tmp_path / "dtd", fx.dtd_files())
    params = fx.dtd_params()
    samples = read_samples("dtd", root, "train", params=params)
    assert [s.category for s in samples] == ["banded"] * 3 + ["zigzagged"] * 3
    with pytest.raises(DatasetError, match="only a train split"):
        read_samples("dtd", root, "test", params=params)


def test_sample_is_frozen_and_validated(tmp_path: Path) -> None:
    s = Sample(tmp_path / "a.png", None, 0, "bottle", "good", "train")
    with pytest.raises(AttributeError):
        s.label = 1  # type: ignore[misc]
    with pytest.raises(DatasetError):
        Sample(tmp_path / "a.png", None, 2, "bottle", "good", "train")
