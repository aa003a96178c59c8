"""Whether an ablation difference is real: seed statistics, paired intervals, the paper's claims.

Method (stated in the report). For a row and the table's default row, the difference of a
metric is taken per (seed, category) pair, the two runs of a seed sharing the category, and
averaged over the categories of that seed: one difference per seed. The 95% interval is
Student's t over those seed-level differences (n - 1 degrees of freedom).

Why seeds, not a bootstrap over (seed, category) pairs: in the multi-class setting one model
per seed scores every category, so a seed's categories are not independent replicates of the
variant's effect; the seed is the unit that repeats. Resampling categories would treat a
fixed, correlated set as a sample and give intervals far too narrow, and a bootstrap over two
or three seeds has only a handful of distinct resamples. The t-interval with two or three
seeds is very wide (t(0.975, 1) = 12.7, t(0.975, 2) = 4.3): that is the honest answer. With
one seed there is no interval: the difference is undecided.

A claim of the paper is *reproduced* when our interval excludes zero on the paper's side,
*not reproduced* when it excludes zero on the other side, and *not decided by the data* when
it contains zero, when fewer than two seeds are paired, or when the ablation data is not the
paper's (the demo set cannot decide claims about MVTec-AD).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Literal

from scipy import stats as sps

from omniad.grid import Params
from omniad.report.aggregate import MEAN, Collection, paper_row

LEVEL = 0.95
Verdict = Literal["reproduced", "not reproduced", "undecided"]
VERDICTS: tuple[Verdict, ...] = ("reproduced", "not reproduced", "undecided")


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values with its two-sided t-interval (``lo``/``hi`` None when n < 2)."""

    mean: float | None
    lo: float | None
    hi: float | None
    n: int
    std: float | None = None  # sample std of the values (n - 1)

    @property
    def decided(self) -> bool:
        """The interval exists and excludes zero."""
        return self.lo is not None and self.hi is not None and (self.lo > 0 or self.hi < 0)

    @property
    def sign(self) -> int:
        """+1 / -1 when the interval lies above / below zero, 0 otherwise."""
        if not self.decided:
            return 0
        return 1 if self.lo > 0 else -1  # type: ignore[operator]


def t_interval(values: list[float], level: float = LEVEL) -> Interval:
    """Mean and Student-t interval ``mean +- t(1 - a/2, n - 1) * s / sqrt(n)`` of ``values``."""
    n = len(values)
    if n == 0:
        return Interval(None, None, None, 0)
    mean = math.fsum(values) / n
    if n < 2:
        return Interval(mean, None, None, n)
    sd = statistics.stdev(values)
    half = float(sps.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, sd)


def _by_seed(col: Collection, table: str, row: str, dataset: str) -> dict[int, Any]:
    return {r.run.seed: r for r in col.cell(table, row, dataset) if r.found}


def seed_differences(col: Collection, table: str, row: str, ref: str,
                     metric: str = "mad") -> dict[int, float]:
    """``row - ref`` per seed found in both: the mean over the categories both runs scored
    of the per-category difference (the mean row of metrics.json when neither lists any)."""
    ds = col.params.protocol(col.protocol).ablation_dataset
    a, b = _by_seed(col, table, row, ds), _by_seed(col, table, ref, ds)
    out = {}
    for seed in sorted(set(a) & set(b)):
        cats = sorted(set(a[seed].categories()) & set(b[seed].categories())) or [MEAN]
        diffs = [a[seed].pct(c)[metric] - b[seed].pct(c)[metric] for c in cats
                 if metric in a[seed].pct(c) and metric in b[seed].pct(c)]
        if diffs:
            out[seed] = math.fsum(diffs) / len(diffs)
    return out


def paired_interval(col: Collection, table: str, row: str, ref: str,
                    metric: str = "mad") -> Interval:
    return t_interval(list(seed_differences(col, table, row, ref, metric).values()))


def default_row(col: Collection, table: str) -> str | None:
    """The row of an ablation table that is Omni-AD's default variant."""
    ds = col.params.protocol(col.protocol).ablation_dataset
    return next((r for r in col.params.grid.tables[table].rows
                 if col.variant_of(table, r, ds) == "default"), None)


def paper_mad(entry: Any) -> float | None:
    """The paper's mAD of an ablation row: given (dict), or the mean of its seven metrics."""
    if isinstance(entry, dict):
        return entry.get("mad")
    if isinstance(entry, list | tuple) and len(entry) >= 7 and None not in entry[:7]:
        return (entry[7] if len(entry) > 7 and entry[7] is not None
                else math.fsum(entry[:7]) / 7)
    return None


# --------------------------------------------------------------------------------------------
# Claims.
# --------------------------------------------------------------------------------------------
def sign_verdict(paper_diff: float, ours: Interval, comparable: bool = True) -> Verdict:
    """The paper says ``row - default`` has the sign of ``paper_diff``; does our interval?"""
    if not comparable or not ours.decided:
        return "undecided"
    return "reproduced" if ours.sign == (1 if paper_diff > 0 else -1) else "not reproduced"


def best_verdict(best_minus_others: dict[str, Interval], comparable: bool = True) -> Verdict:
    """The paper's best row beats every other: reproduced when every interval of ``best -
    other`` lies above zero, not reproduced when one lies below, undecided otherwise."""
    if not comparable or not best_minus_others:
        return "undecided"
    signs = [iv.sign for iv in best_minus_others.values()]
    if any(s < 0 for s in signs):
        return "not reproduced"
    return "reproduced" if all(s > 0 for s in signs) else "undecided"


@dataclass
class Claim:
    """One claim of the paper about an ablation table and what our runs say about it."""

    table: str
    kind: Literal["best", "sign"]
    row: str  # the row the claim is about (the paper's best row for 'best')
    ref: str  # the default row ('sign'); for 'best': every other row
    paper_diff: float | None  # 'sign': paper's row - default (mAD points)
    ours: Interval | None  # 'sign': our paired interval of row - default
    ours_best: str | None  # 'best': our best row by mean mAD
    verdict: Verdict
    reason: str

    @property
    def text(self) -> str:
        if self.kind == "best":
            return f"{self.row} is the best row"
        return f"{self.row} {'above' if (self.paper_diff or 0) > 0 else 'below'} {self.ref}"


def comparable_to_paper(params: Params, protocol: str) -> bool:
    """Only runs on the paper's ablation dataset (params/paper.yaml) can test its claims."""
    return params.protocol(protocol).ablation_dataset == params.paper["ablation_dataset"]


def _reason(comparable: bool, iv: Interval | None, dataset: str, paper_dataset: str) -> str:
    if not comparable:
        return f"ablation data is {dataset}, the paper's is {paper_dataset}"
    if iv is None or iv.n < 2:
        return f"{0 if iv is None else iv.n} paired seed(s): no interval"
    return "interval excludes 0" if iv.decided else "interval contains 0"


def table_claims(col: Collection, table: str, metric: str = "mad") -> list[Claim]:
    """The paper's claims of one ablation table (best row; sign of each row vs the default),
    judged by our paired intervals. None for our own tables or rows without paper numbers."""
    params = col.params
    spec = params.grid.tables[table]
    proto = params.protocol(col.protocol)
    ref = default_row(col, table)
    if spec.kind != "ablation" or spec.source != "paper" or ref is None:
        return []
    excluded = set(proto.exclude_rows.get(table, []))
    rows = [r for r in spec.rows if r not in excluded]
    paper = {r: paper_mad(paper_row(params, table, r)) for r in rows}
    comparable = comparable_to_paper(params, col.protocol)
    ds, paper_ds = proto.ablation_dataset, params.paper["ablation_dataset"]
    out = []
    known = {r: v for r, v in paper.items() if v is not None}
    ours_mean = {r: st.mean for r in rows
                 if (st := col.stat(table, r, ds, metric)) is not None and st.mean is not None}
    ours_best = max(ours_mean, key=ours_mean.get) if ours_mean else None
    if len(known) > 1:
        top = max(known.values())
        bests = [r for r, v in known.items() if v == top]
        if len(bests) == 1:  # a tie at the top is no claim about a best row
            best = bests[0]
            ivs = {r: paired_interval(col, table, best, r, metric) for r in rows if r != best}
            worst = min(ivs.values(), key=lambda iv: iv.n, default=None)
            v = best_verdict(ivs, comparable)
            reason = _reason(comparable, worst, ds, paper_ds)
            if comparable and v == "undecided" and worst is not None and worst.n >= 2:
                reason = "some interval contains 0"
            out.append(Claim(table, "best", best, "others", None, None, ours_best, v, reason))
    for r in rows:
        if r == ref or paper.get(r) is None or paper.get(ref) is None:
            continue
        pd = round(paper[r] - paper[ref], 6)
        if round(pd, 1) == 0:  # the paper prints one decimal: a tie claims nothing
            continue
        iv = paired_interval(col, table, r, ref, metric)
        out.append(Claim(table, "sign", r, ref, pd, iv, None, sign_verdict(pd, iv, comparable),
                         _reason(comparable, iv, ds, paper_ds)))
    return out


def all_claims(col: Collection) -> list[Claim]:
    return [c for t in col.params.grid.table_order
            if col.params.grid.tables[t].kind == "ablation" for c in table_claims(col, t)]


def claim_counts(claims: list[Claim]) -> dict[Verdict, int]:
    return {v: sum(c.verdict == v for c in claims) for v in VERDICTS}


# --------------------------------------------------------------------------------------------
# Per-row statistics (the report's columns and results/<protocol>/stats.csv).
# --------------------------------------------------------------------------------------------
@dataclass
class RowStats:
    table: str
    row: str
    is_default: bool
    n: int
    mean: float | None
    std: float | None
    diff: Interval | None  # paired row - default (None for the default row)
    paper_diff: float | None


def row_stats(col: Collection, table: str, metric: str = "mad") -> list[RowStats]:
    params = col.params
    ds = params.protocol(col.protocol).ablation_dataset
    ref = default_row(col, table)
    spec = params.grid.tables[table]
    pref = paper_mad(paper_row(params, table, ref)) if ref else None
    out = []
    for r in spec.rows:
        st = col.stat(table, r, ds, metric)
        pr = paper_mad(paper_row(params, table, r)) if spec.source == "paper" else None
        out.append(RowStats(
            table, r, r == ref, st.n if st else 0, st.mean if st else None,
            st.std if st else None,
            paired_interval(col, table, r, ref, metric) if ref and r != ref else None,
            None if r == ref or pr is None or pref is None else pr - pref))
    return out


STATS_COLUMNS = ("table", "row", "default", "seeds", "mad_mean", "mad_std", "diff", "diff_lo",
                 "diff_hi", "diff_seeds", "excludes_zero", "paper_diff")


def stats_csv(col: Collection) -> str:
    """results/<protocol>/stats.csv: every ablation row's mAD over seeds and paired interval."""
    import csv
    import io

    def f(x: float | None) -> str:
        return "" if x is None else f"{x:.4f}"

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(STATS_COLUMNS)
    for t in col.params.grid.table_order:
        if col.params.grid.tables[t].kind != "ablation":
            continue
        for s in row_stats(col, t):
            d = s.diff
            w.writerow([t, s.row, int(s.is_default), s.n, f(s.mean), f(s.std),
                        f(d.mean if d else None), f(d.lo if d else None), f(d.hi if d else None),
                        d.n if d else "", int(d.decided) if d else "", f(s.paper_diff)])
    return buf.getvalue()

