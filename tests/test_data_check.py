"""check: decodes everything, compares sizes, hashes and counts; CLI exits non-zero on faults."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omniad.data.check import check_dataset
from omniad.data.cli import main
from omniad.data.fetch import fetch_dataset
from omniad.data.params import override
from omniad.data.samples import DatasetError

try:
    import data_fixtures as fx
except ImportError:  # tests/ became a package
    from tests import data_fixtures as fx

isolated_checksums = fx.isolated_checksums  # autouse: locks go to tmp_path


def _params_file(tmp_path: Path, params: dict) -> Path:
    import yaml

    path = tmp_path / "datasets.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture
def mvtec(tmp_path: Path) -> Path:
    """An MVTec-layout tree recorded in place (so it has a manifest)."""
    root = fx.write_tree(tmp_path / "mvtec", fx.mvtec_files())
    fetch_dataset("mvtec_ad", root, fx.mvtec_params(), source=root, log=lambda m: None)
    return root


def test_clean_tree_passes(mvtec: Path) -> None:
    report = check_dataset("mvtec_ad", mvtec, params=fx.mvtec_params())
    assert report.ok and report.problems == [] and report.warnings == []
    assert report.n_files == 10 + 6 + 6
    assert "MISMATCH" not in report.table()


def test_undecodable_image_is_reported(mvtec: Path) -> None:
    path = mvtec / "bottle/train/good/001.png"
    path.write_bytes(path.read_bytes()[:200])  # header intact, pixel data truncated
    report = check_dataset("mvtec_ad", mvtec, params=fx.mvtec_params())
    assert not report.ok
    assert any(p.startswith(f"{path}: cannot decode image") for p in report.problems)
    assert any(f"{path}: image changed since it was recorded" in p for p in report.problems)
    with pytest.raises(DatasetError, match="failed its check"):
        report.raise_for_problems()


def test_mask_size_mismatch_is_reported(mvtec: Path) -> None:
    mask = mvtec / "cable/ground_truth/broken/001_mask.png"
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(mask)
    report = check_dataset("mvtec_ad", mvtec, params=fx.mvtec_params())
    assert any(p.startswith(f"{mask}: mask size 12x10 differs from image size 40x32")
               for p in report.problems)


def test_pairing_faults_and_counts_are_reported(mvtec: Path) -> None:
    (mvtec / "bottle/ground_truth/crack/000_mask.png").unlink()
    report = check_dataset("mvtec_ad", mvtec, params=fx.mvtec_params())
    assert any("image without its mask" in p for p in report.problems)
    assert any("count mismatch for test/bottle" in p for p in report.problems)
    assert "MISMATCH" in report.table()


def test_expected_counts_come_from_params(mvtec: Path) -> None:
    params = fx.mvtec_params()
    params["datasets"]["mvtec_ad"]["expected"]["per_category"]["cable"]["train_normal"] = 4
    report = check_dataset("mvtec_ad", mvtec, params=params)
    assert report.problems == [f"{mvtec}: count mismatch for train/cable normal: found 3, "
                               "expected 4"]
    # a category subset skips the totals but keeps per-category expectations
    sub = check_dataset("mvtec_ad", mvtec, categories=["bottle"], params=params)
    assert sub.ok and "train/(total)" not in sub.expected


def test_empty_anomalous_mask_is_a_warning(mvtec: Path) -> None:
    mask = mvtec / "cable/ground_truth/crack/000_mask.png"
    Image.fromarray(np.zeros((32, 40), np.uint8)).save(mask)
    fetch_dataset("mvtec_ad", mvtec, fx.mvtec_params(), source=mvtec, log=lambda m: None)
    report = check_dataset("mvtec_ad", mvtec, params=fx.mvtec_params())
    assert report.ok and any("empty mask" in w for w in report.warnings)


def test_unknown_category_and_missing_root_raise(tmp_path: Path, mvtec: Path) -> None:
    with pytest.raises(DatasetError, match="unknown category"):
        check_dataset("mvtec_ad", mvtec, categories=["nope"], params=fx.mvtec_params())
    with pytest.raises(DatasetError, match="does not exist"):
        check_dataset("mvtec_ad", tmp_path / "absent", params=fx.mvtec_params())


def test_cli_check_exit_codes(tmp_path: Path, mvtec: Path, capsys: pytest.CaptureFixture) -> None:
    params_file = _params_file(tmp_path, fx.mvtec_params())
    args = ["check", "mvtec_ad", "--root", str(mvtec), "--params", str(params_file), "-q"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "bottle" in out and ": OK" in out
    (mvtec / "bottle/test/good/000.png").write_bytes(b"not a png")
    assert main(args) == 1
    assert "ERROR" in capsys.readouterr().out
    assert main([*args, "--categories", "nope"]) == 2
    assert "unknown category" in capsys.readouterr().err


def test_cli_fetch_reports_trust(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    archive = fx.tar_bytes(fx.dtd_files(), mode="w:gz")
    state = fx.ServerState(files={"/dtd.tgz": archive})
    with fx.serve(state) as base:
        params_file = _params_file(tmp_path, override(fx.dtd_params(), "dtd"))
        root = tmp_path / "dtd"
        args = ["fetch", "dtd", "--root", str(root), "--url", f"{base}/dtd.tgz",
                "--params", str(params_file), "-q"]
        assert main(args) == 2
        assert "--trust-first-download" in capsys.readouterr().err
        assert main([*args, "--trust-first-download"]) == 0
    out = capsys.readouterr().out
    assert f"sha256 {fx.sha256(archive)} is written to" in out and "ready at" in out
    assert main(["check", "dtd", "--root", str(root), "--params", str(params_file), "-q"]) == 0
