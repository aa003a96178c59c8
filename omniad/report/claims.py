"""The report's section on the paper's ablation claims: counts, and one line per claim."""

from __future__ import annotations

from omniad.report.aggregate import Collection
from omniad.report.latex import DASH, TeX, escape, render, signed
from omniad.report.stats import LEVEL, all_claims, claim_counts, comparable_to_paper
from omniad.report.tables import dataset_name, roman

VERDICT_NAMES = {"reproduced": "reproduced", "not reproduced": r"\textbf{not reproduced}",
                 "undecided": "not decided"}


def claims_context(col: Collection) -> dict:
    params = col.params
    proto = params.protocol(col.protocol)
    claims = all_claims(col)
    rows = []
    for c in claims:
        iv = c.ours
        if c.kind == "best":
            ours = escape(f"ours best: {c.ours_best}" if c.ours_best else "--")
            interval = TeX("vs every other row")
        else:
            ours = signed(iv.mean, 1) if iv and iv.mean is not None else DASH
            interval = (TeX(f"[{signed(iv.lo, 1)}, {signed(iv.hi, 1)}]")
                        if iv and iv.lo is not None else DASH)
        rows.append({"table": TeX(roman(params, c.table)), "text": escape(c.text),
                     "paper": signed(c.paper_diff, 1) if c.paper_diff is not None else DASH,
                     "ours": ours, "interval": interval,
                     "verdict": TeX(VERDICT_NAMES[c.verdict]), "reason": escape(c.reason)})
    comparable = comparable_to_paper(params, col.protocol)
    demo_note = ("" if comparable or proto.pretrained else
                 "a random encoder, minutes of training on a CPU")
    return {"level": round(100 * LEVEL), "claims": rows, "counts": claim_counts(claims),
            "comparable": comparable, "dataset": escape(dataset_name(proto.ablation_dataset)),
            "demo_note": escape(demo_note)}


def render_claims(col: Collection) -> str:
    return render("claims.tex.j2", **claims_context(col))
