"""Code fingerprints: an edit reruns exactly the runs whose code it touches."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from omniad import codehash

PACKAGE = Path(codehash.__file__).resolve().parent
RD4AD, MAMBAAD = "omniad.models.baselines.rd4ad:RD4AD", "omniad.models.baselines.mambaad:MambaAD"


@pytest.fixture
def package_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "omniad"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(codehash, "ROOT", root)
    _clear()
    yield root
    _clear()


def _clear() -> None:
    for f in (codehash._source, codehash._imports, codehash.fingerprint):
        f.cache_clear()


def test_closures_follow_static_imports_only_within_the_package() -> None:
    train = codehash.closure("omniad.models.omniad", *codehash.TRAIN_ENTRY)
    assert {"omniad.models.omniad", "omniad.models.encoder", "omniad.models.base",
            "omniad.engine.train", "omniad.data.cache", "omniad"} <= set(train)
    assert "omniad.metrics" not in train and "omniad.models.baselines.rd4ad" not in train
    # MambaAD shares Omni-AD's decoder pieces, and lives in a package whose __init__ runs
    mamba = codehash.closure("omniad.models.baselines.mambaad")
    assert {"omniad.models.omniad", "omniad.models.baselines"} <= set(mamba)
    assert {"omniad.metrics", "omniad.anomaly_map"} <= set(codehash.closure(*codehash.EVALUATE_ENTRY))


def test_an_edit_changes_the_hashes_of_the_runs_that_execute_it(package_copy: Path) -> None:
    before = {b: (codehash.train_code(b), codehash.evaluate_code(b)) for b in (RD4AD, MAMBAAD)}
    mamba = package_copy / "models/baselines/mambaad.py"
    mamba.write_text(mamba.read_text() + "\n# an edit\n")
    _clear()
    assert codehash.train_code(MAMBAAD) != before[MAMBAAD][0]
    assert codehash.evaluate_code(MAMBAAD) != before[MAMBAAD][1]
    assert (codehash.train_code(RD4AD), codehash.evaluate_code(RD4AD)) == before[RD4AD]

    metrics = package_copy / "metrics.py"
    metrics.write_text(metrics.read_text() + "\n# an edit\n")
    _clear()
    assert codehash.train_code(RD4AD) == before[RD4AD][0]  # metrics: re-evaluate, no retraining
    assert codehash.evaluate_code(RD4AD) != before[RD4AD][1]


def test_the_run_config_carries_the_training_code_hash() -> None:
    from omniad.grid import Run, config_hash, load_params, resolve_run

    cfg = resolve_run(load_params(), Run(protocol="demo", dataset="demo", method="rd4ad",
                                         variant="default", seed=42))
    assert cfg.code == codehash.train_code(RD4AD)
    assert config_hash(cfg) != config_hash(cfg.model_copy(update={"code": "0" * 16}))
