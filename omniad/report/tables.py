"""The paper's Tables I-VII with our numbers, the paper's beside them, and the complexity table.

Layout (booktabs): every entry takes two lines, ours first and, in small grey type below,
the paper's value with the difference ``ours - paper`` in brackets (relative, in percent, for
params and FLOPs). Best of *our* values per column is bold, second underlined (metrics only;
params/FLOPs are costs, not scores). Cited methods (status ``cited``) show the paper's numbers
in grey italics with a dagger; planned methods show "--" with a double dagger; rows a protocol
excludes say "not run in this protocol"; runs not finished yet show "--".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from omniad.grid import Run, tables_of
from omniad.report.aggregate import METRICS, Collection, Stat, axis_tables, axis_value, paper_row
from omniad.report.latex import DASH, TeX, escape, num, render, signed
from omniad.report.stats import LEVEL, Claim, Interval, row_stats, table_claims

ROMAN = ("I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X")
DATASET_NAMES = {"mvtec_ad": "MVTec-AD", "visa": "VisA", "real_iad": "Real-IAD", "demo": "Demo set"}
METRIC_HEADER = {
    "image_auroc": "AU-ROC", "image_ap": "AP", "image_f1max": r"F1\textsubscript{max}",
    "pixel_auroc": "AU-ROC", "pixel_ap": "AP", "pixel_f1max": r"F1\textsubscript{max}",
    "pixel_aupro": "AU-PRO", "mad": "mAD",
}
SEVEN = METRICS[:7]

MARK_CITED = TeX(r"\textsuperscript{\dag}")
MARK_PLANNED = TeX(r"\textsuperscript{\ddag}")
MARK_PARTIAL = TeX(r"\textsuperscript{*}")
NOTE_CITED = TeX(r"\textsuperscript{\dag}\,cited, not run: the paper's numbers, in grey italics.")
NOTE_PLANNED = TeX(r"\textsuperscript{\ddag}\,not yet implemented here: only the paper's numbers "
                   r"(grey line).")
NOTE_PARTIAL = TeX(r"\textsuperscript{*}\,mean over the seeds found so far (some still missing).")
NOTE_MISSING = TeX(r"--\,: run not finished (no metrics.json yet).")
NOTE_NOT_REPORTED = TeX(r"\paperval{--}\,: not reported in the paper.")
MARK_SIG = TeX(r"\sigmark")
NOTE_DIFF = TeX(
    rf"$\Delta$\,mAD: ours minus the default row, paired by seed and category; below it, "
    rf"the {round(100 * LEVEL)}\% t-interval over the seed-level differences (no interval with "
    r"one seed). \sigmark\,: the interval excludes 0.")
NOTE_CLAIM = TeX(
    r"Claim: the paper's ordering against ours (mAD), the paper's difference to the default "
    r"below it (p.); \emph{best} on the paper's best row "
    r"(it beats every other row), $<$ / $>$ on a row the paper puts below / above the default. "
    r"yes: our interval agrees; no: it excludes 0 on the other side; ?: not decided by the "
    r"data (interval contains 0, fewer than two seeds, or not the paper's data).")
VERDICT_TEXT = {"reproduced": "yes", "not reproduced": r"\textbf{no}", "undecided": "?"}


def dataset_name(ds: str) -> str:
    return DATASET_NAMES.get(ds, ds)


def roman(params, table: str) -> str:
    i = params.grid.table_order.index(table)
    return ROMAN[i] if i < len(ROMAN) else str(i + 1)


# --------------------------------------------------------------------------------------------
# Cells.
# --------------------------------------------------------------------------------------------
@dataclass
class Cell:
    """Our value of one column (``shown`` is its printed text, used for ranking)."""

    shown: str | None = None
    raw: float | None = None  # unrounded (relative differences use it)
    std: str | None = None
    partial: bool = False
    rank: int = 0  # 1 best, 2 second
    override: TeX | None = None  # printed instead (cited values, 'not run', costs)

    @classmethod
    def of(cls, st: Stat | None, digits: int = 1) -> Cell:
        if st is None or st.mean is None:
            return cls()
        return cls(num(st.mean, digits), st.mean,
                   num(st.std, digits) if st.std is not None else None, st.partial)

    def tex(self) -> TeX:
        if self.override is not None:
            return self.override
        if self.shown is None:
            return DASH
        body = self.shown
        if self.rank == 1:
            body = rf"\best{{{body}}}"
        elif self.rank == 2:
            body = rf"\second{{{body}}}"
        if self.std is not None:
            body += rf"\pmstd{{{self.std}}}"
        if self.partial:
            body += MARK_PARTIAL
        return TeX(body)


def paper_cell(paper: float | None, ours: Cell, relative: bool = False) -> TeX:
    """Grey small text: the paper's value and (ours - paper), or just the paper's value.

    Absolute differences are taken between the printed values (so they add up on the page);
    relative ones (params, FLOPs) from our unrounded value.
    """
    if paper is None:
        return TeX(r"\paperval{--}")
    text = num(float(paper), 1)
    if ours.shown is not None:
        if relative:
            raw = ours.raw if ours.raw is not None else float(ours.shown)
            diff = signed(100.0 * (raw / float(paper) - 1.0), 1, r"\%")
        else:
            diff = signed(float(ours.shown) - float(text), 1)
        text = f"{text} ({diff})"
    return TeX(rf"\paperval{{{text}}}")


def rank_column(cells: list[Cell]) -> None:
    """Bold the best, underline the second best printed value (higher is better).

    Only when at least two values are there; ties share the rank.
    """
    vals = sorted({float(c.shown) for c in cells if c.shown is not None and c.override is None},
                  reverse=True)
    if len([c for c in cells if c.shown is not None and c.override is None]) < 2:
        return
    for c in cells:
        if c.shown is None or c.override is not None:
            continue
        v = float(c.shown)
        c.rank = 1 if v == vals[0] else 2 if len(vals) > 1 and v == vals[1] else 0


def line(cells: list[Any]) -> TeX:
    return TeX(" & ".join(escape(c) for c in cells) + r" \\")


# --------------------------------------------------------------------------------------------
# The table model the template renders.
# --------------------------------------------------------------------------------------------
@dataclass
class Entry:
    """One row of the paper's table: a first line (ours) and optionally a paper line."""

    label: TeX
    pre: list[TeX]  # extra leading cells (venue, setting)
    ours: list[Cell]
    paper: list[TeX] | None
    span_text: TeX | None = None  # replaces every 'ours' cell in one \multicolumn
    span_from: int = 0  # index of the first 'ours' column covered by span_text
    missing: bool = False  # some run of this row has not finished
    lead: TeX = TeX(r"\paperval{paper (diff.)}")  # first cell of the second line

    def lines(self) -> list[TeX]:
        first: list[Any] = [self.label, *self.pre]
        if self.span_text is not None:
            head = [c.tex() for c in self.ours[:self.span_from]]
            n = len(self.ours) - self.span_from
            first += [*head, TeX(rf"\multicolumn{{{n}}}{{c}}{{{self.span_text}}}")]
        else:
            first += [c.tex() for c in self.ours]
        out = [line(first)]
        if self.paper is not None:
            lead = [self.lead, *[TeX("")] * len(self.pre)]
            out.append(line([*lead, *self.paper]))
        return out


@dataclass
class Block:
    title: TeX | None
    entries: list[Entry] = field(default_factory=list)


@dataclass
class TableModel:
    name: str
    caption: TeX
    colspec: TeX
    header: list[TeX]
    tabcolsep: str = "3.5pt"
    fit: bool = False  # scale the tabular down to the line width (wide seven-metric tables)
    groups: list[tuple[TeX, int, int]] = field(default_factory=list)  # text, first col, last col
    blocks: list[Block] = field(default_factory=list)
    notes: list[TeX] = field(default_factory=list)

    @property
    def ncols(self) -> int:
        return len(self.header)

    def context(self) -> dict[str, Any]:
        groups = []
        if self.groups:
            cells, col = [], 1
            for text, a, b in self.groups:
                cells += [TeX("")] * (a - col)
                cells.append(TeX(rf"\multicolumn{{{b - a + 1}}}{{c}}{{{text}}}"))
                col = b + 1
            cells += [TeX("")] * (self.ncols - col + 1)
            groups = [TeX(" & ".join(cells) + r" \\"),
                      TeX(" ".join(rf"\cmidrule(lr){{{a}-{b}}}" for _, a, b in self.groups))]
        blocks = [{"title": TeX(rf"\multicolumn{{{self.ncols}}}{{@{{}}l}}{{\textbf{{{b.title}}}}} \\")
                   if b.title is not None else None,
                   "entries": [e.lines() for e in b.entries]} for b in self.blocks]
        label = TeX("tab:" + re.sub(r"[^A-Za-z0-9:.-]", "", self.name))
        return {"label": label, "caption": self.caption, "colspec": self.colspec,
                "tabcolsep": TeX(self.tabcolsep), "fit": self.fit,
                "groups": groups, "header": line(self.header), "blocks": blocks,
                "notes": self.notes}

    def render(self) -> str:
        return render("table.tex.j2", **self.context())


def _notes(entries: list[Entry], extra: list[TeX] = ()) -> list[TeX]:
    text = "".join(str(t) for e in entries for t in e.lines())
    notes = []
    if MARK_CITED in text:
        notes.append(NOTE_CITED)
    if MARK_PLANNED in text:
        notes.append(NOTE_PLANNED)
    if MARK_PARTIAL in text:
        notes.append(NOTE_PARTIAL)
    if any(e.missing for e in entries):
        notes.append(NOTE_MISSING)
    if r"\paperval{--}" in text:
        notes.append(NOTE_NOT_REPORTED)
    return [*notes, *extra]


LEGEND = (r"First line: ours; second line (grey): the paper's value and, in brackets, ours "
          r"$-$ paper. Best of ours per column in bold, second underlined.")


def _proto_phrase(col: Collection, kind: str = "methods") -> str:
    proto = col.params.protocol(col.protocol)
    seeds = len(proto.seeds_for(kind))
    chosen = ("final model" if col.selection == "final" else
              "released-style maximum over the evaluations (selection on the test set)")
    return (rf"Ours: protocol \texttt{{{escape(col.protocol)}}}, {proto.image_size}\,px, "
            rf"{seeds} seed{'s' if seeds > 1 else ''}"
            + (r" (mean $\pm$ std)" if seeds > 1 else "") + f", {chosen}.")


# --------------------------------------------------------------------------------------------
# Table I.
# --------------------------------------------------------------------------------------------
def _method_by_label(params) -> dict[str, str]:
    return {spec.label: key for key, spec in params.methods.items()}


def paper_reference_dataset(params) -> str:
    """The paper's ablation dataset (params/paper.yaml): a dataset the paper lacks (the demo
    set) is set beside the paper's numbers on it, with a note."""
    return params.paper["ablation_dataset"]


def table_methods(col: Collection, table: str) -> TableModel:
    params = col.params
    proto = params.protocol(col.protocol)
    paper_t1 = params.paper.get(table) or {}
    by_label = _method_by_label(params)
    header = [TeX("Method"), TeX("Venue"), *[TeX(METRIC_HEADER[m]) for m in METRICS]]
    model = TableModel(
        name=table, colspec=TeX("@{}ll" + "r" * len(METRICS) + "@{}"), header=header,
        groups=[(TeX("Image-level"), 3, 5), (TeX("Pixel-level"), 6, 9)],
        caption=TeX(""), tabcolsep="2.5pt")
    stand_in = []
    all_entries: list[Entry] = []
    for ds in proto.datasets:
        ref = ds if ds in paper_t1 else paper_reference_dataset(params)
        title = escape(dataset_name(ds))
        if ref != ds:
            stand_in.append(ds)
            title = TeX(f"{title} {{\\normalfont\\scriptsize (paper: {escape(dataset_name(ref))})}}")
        block = Block(title)
        paper_rows = paper_t1.get(ref) or {}
        order: list[tuple[str | None, str]] = [(by_label.get(lbl), lbl) for lbl in paper_rows]
        order += [(m, params.methods[m].label) for m in params.implemented()
                  if m not in {k for k, _ in order}]
        implemented_entries = []
        for key, label in order:
            spec = params.methods.get(key) if key else None
            pv = (paper_rows.get(label) or {}).get("values") or [None] * len(METRICS)
            venue = escape(spec.venue if spec else (paper_rows.get(label) or {}).get("venue", "-"))
            status = spec.status if spec else "cited"
            if status == "implemented":
                ours = [Cell.of(col.stat(table, key, ds, m)) for m in METRICS]
                e = Entry(escape(label), [venue], ours,
                          [paper_cell(p, c) for p, c in zip(pv, ours, strict=True)],
                          missing=any(c.shown is None for c in ours))
                implemented_entries.append(e)
            elif status == "cited":
                ours = [Cell(override=TeX(rf"\citedval{{{num(p, 1)}}}") if p is not None else DASH)
                        for p in pv]
                e = Entry(TeX(escape(label) + MARK_CITED), [venue], ours, None)
            else:
                e = Entry(TeX(escape(label) + MARK_PLANNED), [venue], [Cell() for _ in METRICS],
                          [paper_cell(p, Cell()) for p in pv])
            block.entries.append(e)
        for j in range(len(METRICS)):
            rank_column([e.ours[j] for e in implemented_entries])
        model.blocks.append(block)
        all_entries += block.entries
    extra = []
    if stand_in:
        names = ", ".join(escape(dataset_name(d)) for d in stand_in)
        extra.append(TeX(f"{names}: not in the paper; set beside the paper's "
                         f"{escape(dataset_name(paper_reference_dataset(params)))} numbers for orientation "
                         "only (different data)."))
    model.notes = _notes(all_entries, extra)
    model.caption = TeX(
        rf"Paper's Table {roman(params, table)}: {escape(params.grid.tables[table].title)}. "
        + _proto_phrase(col) + " " + LEGEND)
    return model


# --------------------------------------------------------------------------------------------
# Ablation tables (II-VII).
# --------------------------------------------------------------------------------------------
def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def _setting(overrides: dict[str, Any], axis: str | None, row: str) -> str:
    v = overrides.get(axis) if axis else None
    if isinstance(v, list | tuple) and axis == "attention":
        return "(" + ", ".join(str(x) for x in v) + ")"
    return axis_value(overrides, axis, row)


def table_ablation(col: Collection, table: str,
                   costs: dict[tuple[str, str], dict] | None = None) -> TableModel:
    params = col.params
    proto = params.protocol(col.protocol)
    spec = params.grid.tables[table]
    ds = proto.ablation_dataset
    excluded = set(proto.exclude_rows.get(table, []))
    with_costs = table in axis_tables(params)
    costs = costs or {}
    settings = {r: _setting(o, spec.axis, r) for r, o in spec.rows.items()}
    show_setting = any(_norm(settings[r]) != _norm(r) for r in spec.rows)
    pre_header = [TeX(escape(spec.axis or "setting"))] if show_setting else []
    if with_costs:
        cols = ["params_m", "flops_g", "mad"]
        header = [TeX("Variant"), *pre_header, TeX("Params (M)"), TeX("FLOPs (G)"), TeX("mAD")]
        groups = []
    else:
        cols = list(SEVEN)
        header = [TeX("Variant"), *pre_header, *[TeX(METRIC_HEADER[m]) for m in cols]]
        off = 2 + len(pre_header)
        groups = [(TeX("Image-level"), off, off + 2), (TeX("Pixel-level"), off + 3, off + 6)]
    ours_table = spec.source == "ours"
    stats = {s.row: s for s in row_stats(col, table)}
    claims = _claims_by_row(table_claims(col, table))
    header += [TeX(r"$\Delta$\,mAD")] + ([] if ours_table else [TeX("Claim")])
    model = TableModel(name=table, caption=TeX(""), header=header, groups=groups,
                       tabcolsep="3.5pt" if with_costs else "2pt",
                       fit=not with_costs,
                       colspec=TeX("@{}l" + "l" * len(pre_header) + "r" * len(cols) + "r"
                                   + ("" if ours_table else "l") + "@{}"))
    block = Block(None)
    for row in spec.rows:
        paper = paper_row(params, table, row)
        label = escape(row)
        if col.variant_of(table, row, ds) == "default":
            label = TeX(label + r" {\scriptsize\color{gray}(default)}")
        pre = [escape(settings[row])] if show_setting else []
        if with_costs:
            paper = paper or {}
            cost = costs.get((table, row), {})
            ours = [Cell(num(cost.get("params_m"), 1), cost.get("params_m")),
                    Cell(num(cost.get("flops_g"), 1), cost.get("flops_g")),
                    Cell.of(col.stat(table, row, ds, "mad"))]
            pv = [paper.get("params_m"), paper.get("flops_g"), paper.get("mad")]
            rel = [True, True, False]
        else:
            ours = [Cell.of(col.stat(table, row, ds, m)) for m in cols]
            pv = list(paper) if paper else [None] * len(cols)
            rel = [False] * len(cols)
        n_metric = len(ours)
        st = stats[row]
        ours += [diff_cell(st.diff)] + ([] if ours_table else [claim_cell(claims.get(row))])
        e = Entry(label, pre, ours, None, missing=any(c.shown is None for c in ours[:n_metric]))
        if row in excluded:
            first = len(cols) - 1 if with_costs else 0
            e.span_text, e.span_from = TeX(r"\textit{not run in this protocol}"), first
            for c in ours[first:]:
                c.shown = None
            e.missing = False
        below = diff_below(st.diff)
        if not ours_table:
            paper_d = (TeX(r"\paperval{p.\," + signed(st.paper_diff, 1) + "}")
                       if st.paper_diff is not None else TeX(""))
            e.paper = [*(paper_cell(p, c, r) for p, c, r in zip(pv, ours, rel, strict=False)),
                       below, paper_d]
        elif below:  # our own table: no paper numbers, only the interval under the difference
            e.paper, e.lead = [*[TeX("")] * n_metric, below], TeX("")
        block.entries.append(e)
    for j, key in enumerate(cols):
        if key in METRICS:
            rank_column([e.ours[j] for e in block.entries if e.span_text is None])
    model.blocks.append(block)
    extra = []
    paper_ds = paper_reference_dataset(col.params)
    if ds != paper_ds:
        extra.append(TeX(f"Ours on {escape(dataset_name(ds))}; the paper's ablations are on "
                         f"{escape(dataset_name(paper_ds))}."))
    if with_costs:
        size = col.params.paper["setup"]["image_size"]
        extra.append(TeX(rf"Params/FLOPs: ours counted with fvcore at {size}$\times${size} (one "
                         r"multiply-add = one FLOP, encoder included); brackets: relative "
                         r"difference to the paper. Ranking marks the mAD column only."))
    if excluded:
        extra.append(TeX(r"\textit{not run in this protocol}: listed in this protocol's "
                         r"\texttt{exclude\_rows} (params/protocols.yaml)."))
    extra.append(NOTE_DIFF)
    if not ours_table:
        extra.append(NOTE_CLAIM)
    model.notes = _notes(block.entries, extra)
    if ours_table:
        model.caption = TeX(rf"Our Table {roman(params, table)} (not in the paper; no paper "
                            rf"numbers): {escape(spec.title)}. " + _proto_phrase(col, "ablation")
                            + r" Best of ours per column in bold, second underlined.")
    else:
        model.caption = TeX(rf"Paper's Table {roman(params, table)}: {escape(spec.title)}. "
                            + _proto_phrase(col, "ablation") + " " + LEGEND)
    return model


def _claims_by_row(claims: list[Claim]) -> dict[str, Claim]:
    """The claim shown on each row: the sign claim of a row, the 'best' claim on the paper's
    best row (which is the default row in every paper table)."""
    out = {c.row: c for c in claims if c.kind == "sign"}
    out.update({c.row: c for c in claims if c.kind == "best"})
    return out


def diff_cell(iv: Interval | None) -> Cell:
    """Our paired difference to the default, marked when its interval excludes zero."""
    if iv is None or iv.mean is None:
        return Cell(override=DASH if iv is not None else TeX(r"\paperval{(ref.)}"))
    return Cell(override=TeX(signed(iv.mean, 1) + (MARK_SIG if iv.decided else "")))


def diff_below(iv: Interval | None) -> TeX:
    """The second line under our difference: its interval (none with one seed)."""
    if iv is None or iv.lo is None:
        return TeX("")
    return TeX(rf"\paperval{{[{signed(iv.lo, 1)}, {signed(iv.hi, 1)}]}}")


def claim_cell(claim: Claim | None) -> Cell:
    if claim is None:
        return Cell(override=TeX(""))
    what = r"\emph{best}" if claim.kind == "best" else (
        "$>$" if (claim.paper_diff or 0) > 0 else "$<$")
    return Cell(override=TeX(f"{what}: {VERDICT_TEXT[claim.verdict]}"))


def render_table(col: Collection, table: str,
                 costs: dict[tuple[str, str], dict] | None = None) -> str:
    kind = col.params.grid.tables[table].kind
    model = table_methods(col, table) if kind == "methods" else table_ablation(col, table, costs)
    return model.render()


# --------------------------------------------------------------------------------------------
# Complexity.
# --------------------------------------------------------------------------------------------
def default_paper_costs(params, protocol: str) -> dict:
    """The paper's params/FLOPs of Omni-AD's default: from the first ablation row that *is*
    the default variant (found through :func:`omniad.grid.tables_of`)."""
    proto = params.protocol(protocol)
    run = Run(protocol=protocol, dataset=proto.ablation_dataset, method=params.grid.ablation_method,
              variant="default", seed=proto.seeds_for("ablation")[0])
    for table, row in tables_of(params, run):
        entry = paper_row(params, table, row)
        if isinstance(entry, dict) and entry.get("params_m") is not None:
            return entry
    return {}


def complexity_context(params, protocol: str, rows: list[dict], problem: str | None
                       ) -> dict[str, Any]:
    """Params/FLOPs of every variant vs the paper (paper numbers read from paper.yaml)."""
    out = []
    default_paper = default_paper_costs(params, protocol)
    for r in rows:
        table, row = r["table"], str(r["row"])
        if table == "default":
            paper = default_paper
            name = TeX(escape(params.methods[params.grid.ablation_method].label) + " (default)")
            tname = TeX("--")
        else:
            paper = paper_row(params, table, row) or {}
            name = escape(row)
            tname = TeX(roman(params, table)) if table in params.grid.table_order else escape(table)
        pm, fg = r.get("params_m"), r.get("flops_g")
        ppm, pfg = paper.get("params_m"), paper.get("flops_g")

        def rel(ours: float | None, theirs: float | None) -> TeX:
            if ours is None or theirs is None:
                return DASH
            return signed(100.0 * (ours / theirs - 1.0), 1, r"\%")

        out.append({"table": tname, "row": name,
                    "params": escape(num(pm, 1) or "--"), "paper_params": escape(num(ppm, 1) or "--"),
                    "params_diff": rel(pm, ppm),
                    "flops": escape(num(fg, 1) or "--"), "paper_flops": escape(num(pfg, 1) or "--"),
                    "flops_diff": rel(fg, pfg)})
    from omniad.complexity import cost_tables

    return {"rows": out, "problem": problem, "image_size": params.paper["setup"]["image_size"],
            "paper_default_params": escape(num(default_paper.get("params_m"), 1) or "--"),
            "tables": ", ".join(roman(params, t) for t in cost_tables(params))}


def render_complexity(params, protocol: str, rows: list[dict], problem: str | None) -> str:
    return render("complexity.tex.j2", **complexity_context(params, protocol, rows, problem))
