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
    for f in (codehash._source, codehash._imports, codehash._normalised, codehash.fingerprint):
        f.cache_clear()


def test_closures_follow_static_imports_only_within_the_package() -> None:
    train = codehash.closure("omniad.models.omniad", *codehash.TRAIN_ENTRY)
    assert {"omniad.models.omniad", "omniad.models.encoder", "omniad.models.base",
            "omniad.engine.train", "omniad.data.cache", "omniad"} <= set(train)
    assert "omniad.metrics" not in train and "omniad.models.baselines.rd4ad" not in train
    # MambaAD shares the layers (not Omni-AD's module: an Omni-AD edit does not retrain it),
    # and lives in a package whose __init__ runs
    mamba = codehash.closure("omniad.models.baselines.mambaad")
    assert {"omniad.models.layers.neck", "omniad.models.layers.selective_scan",
            "omniad.models.baselines"} <= set(mamba)
    assert "omniad.models.omniad" not in mamba
    assert {"omniad.metrics", "omniad.anomaly_map"} <= set(codehash.closure(*codehash.EVALUATE_ENTRY))


def test_an_edit_changes_the_hashes_of_the_runs_that_execute_it(package_copy: Path) -> None:
    before = {b: (codehash.train_code(b), codehash.evaluate_code(b)) for b in (RD4AD, MAMBAAD)}
    mamba = package_copy / "models/baselines/mambaad.py"
    mamba.write_text(mamba.read_text() + "\nEDITED = 1\n")
    _clear()
    assert codehash.train_code(MAMBAAD) != before[MAMBAAD][0]
    assert codehash.evaluate_code(MAMBAAD) != before[MAMBAAD][1]
    assert (codehash.train_code(RD4AD), codehash.evaluate_code(RD4AD)) == before[RD4AD]

    metrics = package_copy / "metrics.py"
    metrics.write_text(metrics.read_text() + "\nEDITED = 1\n")
    _clear()
    assert codehash.train_code(RD4AD) == before[RD4AD][0]  # metrics: re-evaluate, no retraining
    assert codehash.evaluate_code(RD4AD) != before[RD4AD][1]


def test_the_run_config_carries_the_training_code_hash() -> None:
    from omniad.grid import Run, config_hash, load_params, resolve_run

    cfg = resolve_run(load_params(), Run(protocol="demo", dataset="demo", method="rd4ad",
                                         variant="default", seed=42))
    assert cfg.code == codehash.train_code(RD4AD)
    assert config_hash(cfg) != config_hash(cfg.model_copy(update={"code": "0" * 16}))


def test_comments_docstrings_and_blank_lines_do_not_count_code_does() -> None:
    base = 'def f(x):\n    return x + 1\n'
    noted = ('"""Module doc."""\n# a comment\n\n'
             'def f(x):  # why\n    """Doc,\n    two lines."""\n\n    return x+1\n')
    assert codehash.normalised_source(base) == codehash.normalised_source(noted)
    for edit in ('def f(x):\n    return x + 2\n', 'def f(x):\n    return "x + 1"\n',
                 'def f(y):\n    return y + 1\n', 'def f(x):\n    pass\n    return x + 1\n'):
        assert codehash.normalised_source(edit) != codehash.normalised_source(base), edit
    # a string that is not a docstring is code
    assert (codehash.normalised_source('X = "a"\n')
            != codehash.normalised_source('X = "b"\n'))


def test_a_comment_or_docstring_edit_keeps_the_hash_a_code_edit_changes_it(
        package_copy: Path) -> None:
    omni = "omniad.models.omniad:OmniAD"
    before = codehash.train_code(omni)
    model = package_copy / "models/omniad.py"
    text = model.read_text()
    doc = text.index('"""') + 3
    model.write_text(text[:doc] + "An edited docstring. " + text[doc:]
                     + "\n# a comment\n\n\n")
    _clear()
    assert codehash.train_code(omni) == before
    model.write_text(text.replace("\ndef ", "\ndef _unused():\n    return 0\n\n\ndef ", 1))
    _clear()
    assert codehash.train_code(omni) != before


def test_a_grid_edit_changes_no_code_hash(package_copy: Path) -> None:
    """grid.py reaches a run only through its resolved config (hashed apart): an edit of it
    must not retrain the whole grid (runtime.py used to import it for REPO)."""
    before = {b: (codehash.train_code(b), codehash.evaluate_code(b)) for b in (RD4AD, MAMBAAD)}
    assert not any("omniad.grid" in codehash.closure(codehash.builder_module(b), *entry)
                   for b in (RD4AD, MAMBAAD)
                   for entry in (codehash.TRAIN_ENTRY, codehash.EVALUATE_ENTRY))
    grid = package_copy / "grid.py"
    grid.write_text(grid.read_text() + "\nEDITED = 1\n")
    runtime = package_copy / "engine/runtime.py"
    runtime.write_text(runtime.read_text() + "\nEDITED = 1\n")
    _clear()
    assert all(codehash.train_code(b) != before[b][0] for b in (RD4AD, MAMBAAD))  # runtime runs
    runtime.write_text(runtime.read_text().replace("\nEDITED = 1\n", ""))
    _clear()
    assert {b: (codehash.train_code(b), codehash.evaluate_code(b))
            for b in (RD4AD, MAMBAAD)} == before


def test_the_complexity_cache_key_follows_code_not_comments(package_copy: Path) -> None:
    """report/costs.py keys its params/FLOPs cache with this module's hash, not its own."""
    from omniad.grid import load_params
    from omniad.report.costs import cache_key

    params = load_params()
    before = cache_key(params)
    model = package_copy / "models/omniad.py"
    text = model.read_text()
    model.write_text(text + "\n# a comment edit\n")
    _clear()
    assert cache_key(params) == before
    model.write_text(text + "\nEDITED = 1\n")
    _clear()
    assert cache_key(params) != before
