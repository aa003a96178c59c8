"""`omniad grid cost`: GPU-hours from measured images/s x training images x epochs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from omniad.grid import load_params
from omniad.gridcost import estimate


@pytest.fixture
def results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("OMNIAD_RESULTS", str(tmp_path / "results"))
    return tmp_path / "results"


def _write_metrics(results: Path, key: str, ips: float) -> None:
    proto, ds, method, variant, seed = key.split("/")
    d = results / proto / "runs" / ds / method / variant / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"run": key, "meta": {"train_images_per_s": ips}}))


def test_user_images_per_s_prices_the_paper_grid(results) -> None:
    rows = estimate(load_params(), "paper", images_per_s=500.0)
    by = {r["run"]: r for r in rows}
    r = by["paper/mvtec_ad/omniad/default/42"]
    assert r["images"] == 3629 and r["epochs"] == 500
    assert r["gpu_hours"] == pytest.approx(3629 * 500 / 500 / 3600)
    assert by["paper/real_iad/omniad/default/42"]["gpu_hours"] == pytest.approx(
        36465 * 500 / 500 / 3600)
    assert all(r["source"] == "--images-per-s" for r in rows)


def test_measurements_win_over_the_user_value_and_say_so(results, tmp_path) -> None:
    _write_metrics(results, "paper/mvtec_ad/omniad/default/42", 900.0)
    _write_metrics(results, "paper/visa/mambaad/default/42", 300.0)
    bench = tmp_path / "throughput.json"
    bench.write_text(json.dumps({"device": "cuda", "gpu": "H200", "size": 128, "methods": {
        "rd4ad": {"ours_images_per_s": 800.0}}}))
    by = {r["run"]: r for r in estimate(load_params(), "paper", bench, images_per_s=100.0)}
    assert by["paper/mvtec_ad/omniad/default/42"]["images_per_s"] == 900.0
    assert by["paper/mvtec_ad/omniad/default/42"]["source"] == "this run's metrics.json"
    # the same method's other runs: the mean of its recorded runs (one, here)
    assert by["paper/mvtec_ad/omniad/tokens-16/42"]["images_per_s"] == 900.0
    assert by["paper/real_iad/mambaad/default/42"]["images_per_s"] == 300.0
    # the benchmark at 128 px, scaled by pixels to 256 px: a quarter
    assert by["paper/visa/rd4ad/default/42"]["images_per_s"] == pytest.approx(200.0)
    assert "H200" in by["paper/visa/rd4ad/default/42"]["source"]
    assert by["paper/visa/uniad/default/42"]["source"] == "--images-per-s"
    # a CPU measurement never prices the paper's GPU jobs
    bench.write_text(json.dumps({"device": "cpu", "size": 64, "methods": {
        "rd4ad": {"ours_images_per_s": 5.0}}}))
    by = {r["run"]: r for r in estimate(load_params(), "paper", bench, images_per_s=100.0)}
    assert by["paper/visa/rd4ad/default/42"]["source"] == "--images-per-s"


def test_no_measurement_is_unknown_not_guessed(results, capsys) -> None:
    import argparse

    from omniad.gridcost import cli

    rows = estimate(load_params(), "paper")
    assert all(r["gpu_hours"] is None and r["source"] == "unknown" for r in rows)
    cli(argparse.Namespace(protocol="paper", throughput=None, images_per_s=None, summary=True))
    out = capsys.readouterr().out
    # every run of the grid unpriced (its count is tested in test_grid)
    assert "0.0 GPU-hours for 0 priced runs" in out and f"{len(rows)} unpriced" in out
