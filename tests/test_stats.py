"""Paired intervals against textbook numbers, the seed/category pairing, and the claims logic
on constructed tables (the paper's ordering holds, is reversed, is undecided)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from omniad.grid import Run, load_params
from omniad.report.aggregate import METRICS, Collection, RunResult
from omniad.report.stats import (
    Interval,
    best_verdict,
    claim_counts,
    paired_interval,
    paper_mad,
    row_stats,
    seed_differences,
    sign_verdict,
    t_interval,
    table_claims,
)

# Student (1908) / Cushny & Peebles: extra hours of sleep, drug 2 - drug 1, ten patients.
# R: t.test(extra ~ group, data = sleep, paired = TRUE) -> mean 1.58, 95% CI 0.7001142 2.4598858
SLEEP_DIFF = [1.2, 2.4, 1.3, 1.3, 0.0, 1.0, 1.8, 0.8, 4.6, 1.4]


def test_t_interval_matches_students_sleep_data() -> None:
    iv = t_interval(SLEEP_DIFF)
    assert iv.n == 10 and iv.mean == pytest.approx(1.58)
    assert iv.lo == pytest.approx(0.7001142, abs=1e-6) and iv.hi == pytest.approx(2.4598858, abs=1e-6)
    assert iv.std == pytest.approx(1.229995, abs=1e-6) and iv.decided and iv.sign == 1


def test_two_seeds_use_t_with_one_degree_of_freedom() -> None:
    # by hand: mean 0.5, s = |1 - 0| / sqrt(2), half width t(0.975, 1) * s / sqrt(2) = 12.7062 / 2
    iv = t_interval([1.0, 0.0])
    assert iv.lo == pytest.approx(0.5 - 12.706204736 / 2, abs=1e-8)
    assert iv.hi == pytest.approx(0.5 + 12.706204736 / 2, abs=1e-8)
    assert not iv.decided and iv.sign == 0


def test_one_seed_has_no_interval() -> None:
    iv = t_interval([2.0])
    assert (iv.mean, iv.lo, iv.hi, iv.n, iv.decided) == (2.0, None, None, 1, False)
    assert t_interval([]).mean is None


# --------------------------------------------------------------------------------------------
# A constructed Table IV on MVTec-AD (protocol 'paper': the claims are decidable there).
# --------------------------------------------------------------------------------------------
CATS = ("bottle", "cable")
PAPER_T4 = {"16": 86.2, "36": 86.2, "64": 86.4, "100": 86.2}  # params/paper.yaml, 64 default


def _result(row: str, seed: int, per_cat: dict[str, float]) -> RunResult:
    variant = "default" if row == "64" else f"tokens-{row}"
    run = Run(protocol="paper", dataset="mvtec_ad", method="omniad", variant=variant, seed=seed)
    per = {c: dict.fromkeys(METRICS, v / 100) for c, v in per_cat.items()}
    mean = dict.fromkeys(METRICS, sum(per_cat.values()) / len(per_cat) / 100)
    metrics = {"mean": mean, "per_category": per}
    return RunResult(run, Path("/nonexistent"), metrics, [("table4", row)])


def _collection(values: dict[str, dict[int, tuple[float, float]]]) -> Collection:
    """values: row -> seed -> (bottle mAD, cable mAD) in percent."""
    col = Collection(load_params(), "paper", [])
    for row, seeds in values.items():
        for seed, vals in seeds.items():
            rr = _result(row, seed, dict(zip(CATS, vals, strict=True)))
            col.results.append(rr)
            col.cells.setdefault(("table4", row, "mvtec_ad"), []).append(rr)
    return col


def test_pairs_by_seed_and_category_against_brute_force() -> None:
    vals = {"64": {42: (90.0, 80.0), 43: (91.0, 83.0), 44: (88.0, 84.0)},
            "16": {42: (85.0, 81.0), 43: (80.0, 79.0), 44: (87.0, 86.0)}}
    col = _collection(vals)
    got = seed_differences(col, "table4", "16", "64")
    brute = {s: sum(a - b for a, b in zip(vals["16"][s], vals["64"][s], strict=True)) / 2
             for s in (42, 43, 44)}
    assert got == pytest.approx(brute)
    d = list(brute.values())  # (-2, -7.5, 0.5): t by hand
    m, s = sum(d) / 3, math.sqrt(sum((x - sum(d) / 3) ** 2 for x in d) / 2)
    iv = paired_interval(col, "table4", "16", "64")
    assert iv.mean == pytest.approx(m) and iv.std == pytest.approx(s)
    assert iv.hi - iv.mean == pytest.approx(4.302652729749464 * s / math.sqrt(3))
    # a seed only one side has is not paired
    col2 = _collection({**vals, "36": {42: (1.0, 1.0)}})
    assert seed_differences(col2, "table4", "36", "64") == {42: pytest.approx(-84.0)}
    rows = {r.row: r for r in row_stats(col, "table4")}
    assert rows["64"].is_default and rows["64"].diff is None and rows["64"].n == 3
    assert rows["16"].std == pytest.approx(
        __import__("statistics").stdev([83.0, 79.5, 86.5]))
    assert rows["16"].paper_diff == pytest.approx(-0.2)


def _table4(offset: float, spread: float, seeds: tuple[int, ...] = (42, 43, 44)
            ) -> Collection:
    """Default 64 at 90; the others at 90 + offset, seed s shifted by spread * (s - 43)."""
    vals = {"64": {s: (90.0 + 0.1 * (s - 43), 89.0) for s in seeds}}
    for row in ("16", "36", "100"):
        vals[row] = {s: (90.0 + offset + spread * (s - 43), 89.0 + offset) for s in seeds}
    return _collection(vals)


def test_claims_hold_when_the_papers_ordering_holds() -> None:
    claims = table_claims(_table4(offset=-2.0, spread=0.2), "table4")
    by = {(c.kind, c.row): c for c in claims}
    assert set(by) == {("best", "64"), ("sign", "16"), ("sign", "36"), ("sign", "100")}
    assert all(c.verdict == "reproduced" for c in claims), [(c.row, c.verdict) for c in claims]
    assert by[("sign", "16")].ours.hi < 0 and by[("best", "64")].ours_best == "64"
    assert claim_counts(claims) == {"reproduced": 4, "not reproduced": 0, "undecided": 0}


def test_claims_fail_when_the_ordering_is_reversed() -> None:
    claims = table_claims(_table4(offset=+2.0, spread=0.2), "table4")
    assert all(c.verdict == "not reproduced" for c in claims)
    assert next(c for c in claims if c.kind == "best").ours_best != "64"


def test_claims_undecided_when_seeds_disagree_or_are_too_few() -> None:
    noisy = table_claims(_table4(offset=-0.3, spread=3.0), "table4")  # interval spans 0
    assert {c.verdict for c in noisy} == {"undecided"}
    assert all(c.ours.lo < 0 < c.ours.hi for c in noisy if c.kind == "sign")
    one = table_claims(_table4(offset=-2.0, spread=0.0, seeds=(42,)), "table4")
    assert {c.verdict for c in one} == {"undecided"}
    assert all("no interval" in c.reason for c in one)


def test_other_data_cannot_decide_the_papers_claims() -> None:
    col = _table4(offset=-2.0, spread=0.2)
    col.protocol = "demo"  # ablations on the demo set: same numbers, no verdict
    for rr in col.results:
        rr.run = rr.run.model_copy(update={"protocol": "demo", "dataset": "demo"})
    col.cells = {(t, r, "demo"): v for (t, r, _), v in col.cells.items()}
    claims = table_claims(col, "table4")
    assert claims and {c.verdict for c in claims} == {"undecided"}
    assert all("demo" in c.reason for c in claims)


def test_verdict_rules() -> None:
    below = Interval(-1.0, -1.5, -0.5, 3)
    across = Interval(-1.0, -3.0, 1.0, 3)
    assert sign_verdict(-0.2, below) == "reproduced"
    assert sign_verdict(+0.2, below) == "not reproduced"
    assert sign_verdict(-0.2, across) == "undecided"
    assert sign_verdict(-0.2, below, comparable=False) == "undecided"
    above = Interval(1.0, 0.5, 1.5, 3)
    assert best_verdict({"a": above, "b": above}) == "reproduced"
    assert best_verdict({"a": above, "b": across}) == "undecided"
    assert best_verdict({"a": above, "b": below}) == "not reproduced"


def test_paper_mad_of_seven_metric_rows() -> None:
    params = load_params()
    assert paper_mad(params.paper["table2"]["q_kv"]) == pytest.approx(
        (99.0 + 99.7 + 98.3 + 97.9 + 56.8 + 59.9 + 93.4) / 7)
    assert paper_mad(params.paper["table4"][64]) == 86.4
    assert paper_mad(None) is None
