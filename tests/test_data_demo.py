"""The demo set: deterministic bytes, exact masks, MVTec layout that passes `check demo`."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omniad.data.check import check_dataset
from omniad.data.cli import main
from omniad.data.demo import RECIPES, make_demo, render
from omniad.data.manifest import MANIFEST_NAME, read_manifest
from omniad.data.readers import read_samples
from omniad.data.samples import DatasetError

SMALL = {"n_train": 4, "n_test_good": 2, "n_per_defect": 2, "size": 64}


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path) -> None:
    a = make_demo(tmp_path / "a", seed=3, **SMALL)
    b = make_demo(tmp_path / "b", seed=3, **SMALL)
    c = make_demo(tmp_path / "c", seed=4, **SMALL)
    assert _digests(a) == _digests(b)
    da, dc = _digests(a), _digests(c)
    assert da.keys() == dc.keys()
    assert da["brick/train/good/000.png"] != dc["brick/train/good/000.png"]


def test_layout_counts_and_manifest(tmp_path: Path) -> None:
    root = make_demo(tmp_path / "demo", seed=0, **SMALL)
    manifest = read_manifest(root)
    assert manifest is not None and manifest["dataset"] == "demo"
    per_cat = manifest["expected"]["per_category"]
    assert set(per_cat) == set(RECIPES) and len(RECIPES) >= 4
    kinds = {r.kind for r in RECIPES.values()}
    assert kinds == {"texture", "object"}
    assert all(len(r.defects) >= 3 for r in RECIPES.values())
    test = read_samples("demo", root, "test")
    assert len(test) == sum(c["test_normal"] + c["test_anomaly"] for c in per_cat.values())
    for s in test:
        if s.label:
            assert s.mask.name == s.image.stem + "_mask.png"
            m = np.array(Image.open(s.mask))
            assert m.dtype == np.uint8 and set(np.unique(m)) == {0, 255}
    assert Image.open(test[0].image).size == (64, 64)


@pytest.mark.parametrize("category", list(RECIPES))
def test_masks_are_exactly_the_changed_pixels(category: str) -> None:
    for defect in RECIPES[category].defects:
        for i in range(3):
            clean, img, mask = render(category, 0, "test", defect, i, 128)
            changed = (clean != img).any(axis=-1)
            assert mask is not None and mask.any()
            assert not (changed & ~mask).any()  # nothing outside the mask changed
            assert changed[mask].mean() > 0.9  # and (nearly) every masked pixel did
            # obvious to a person: a large mean change under the mask
            diff = np.abs(clean.astype(int) - img.astype(int)).max(axis=-1)
            assert diff[mask].mean() > 25, (category, defect, i)


def test_check_demo_passes_and_catches_faults(tmp_path: Path) -> None:
    root = make_demo(tmp_path / "demo", seed=0, **SMALL)
    report = check_dataset("demo", root)
    assert report.ok, report.problems
    assert report.expected["test/coins"] == {"test_normal": 2, "test_anomaly": 6}
    (root / "coins/test/hole/001.png").unlink()
    report = check_dataset("demo", root)
    assert any("mask without its image" in p for p in report.problems)


def test_refuses_to_overwrite_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not a demo set"):
        make_demo(tmp_path / "x", **SMALL)
    assert (tmp_path / "x" / "keep.txt").exists()


def test_cli_demo_then_check(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "demo"
    assert main(["demo", "--root", str(root), "--seed", "0"]) == 0
    assert (root / MANIFEST_NAME).is_file()
    assert main(["check", "demo", "--root", str(root), "-q"]) == 0
    out = capsys.readouterr().out
    assert "demo at" in out and "OK" in out
    n = len(read_samples("demo", root, "train"))
    assert 24 <= n // len(RECIPES) <= 40
