"""Figures of the report (matplotlib, Agg, no pyplot state), each written as PDF and PNG.

* ``qualitative_<dataset>``: like the paper's Figure 3: per category the image, the ground
  truth and each method's anomaly map (overlaid); a second figure per ablation variant;
* ``ablation_axes``: mAD against tokens / depths / backbone, ours and the paper's, each point
  annotated with its params and FLOPs;
* ``per_category_<dataset>``: per-category mAD and image AU-ROC of the Table I methods;
* ``training_<dataset>``: training loss per epoch of every finished run.

Outputs are byte-reproducible: no creation dates, fixed SVG hash salt, sorted inputs.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg  # the Agg renderer, without pyplot
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from omniad.report.aggregate import MEAN, Collection, RunResult, axis_rows, axis_tables
from omniad.report.latex import write_atomic
from omniad.report.stats import LEVEL, row_stats, t_interval
from omniad.report.tables import dataset_name, roman

RC = {"svg.hashsalt": "omniad-report", "font.size": 8, "axes.titlesize": 9,
      "axes.labelsize": 8, "legend.fontsize": 7, "xtick.labelsize": 7, "ytick.labelsize": 7,
      "figure.dpi": 100, "savefig.dpi": 150}
OURS, PAPER = "#1f77b4", "#d62728"


@dataclass
class FigureFile:
    """A written figure: ``stem`` relative to the figures folder (``.pdf`` and ``.png``)."""

    stem: str
    caption: str  # plain text (escaped by the template)


def save(fig: Figure, folder: Path, stem: str) -> list[Path]:
    FigureCanvasAgg(fig)
    out = []
    for fmt, meta in (("pdf", {"CreationDate": None, "ModDate": None}), ("png", {"Software": None})):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, metadata=meta, bbox_inches="tight", pad_inches=0.05)
        out.append(write_atomic(folder / f"{stem}.{fmt}", buf.getvalue()))
    return out


def _first_found(seeds: list[RunResult]) -> RunResult | None:
    return next((r for r in seeds if r.found), None)


# --------------------------------------------------------------------------------------------
# (a) Qualitative grid.
# --------------------------------------------------------------------------------------------
def _load_samples(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """category -> (image, mask, map) of its first sample."""
    with np.load(path, allow_pickle=False) as z:
        cats = [str(c) for c in z["category"]]
        out = {}
        for i, c in enumerate(cats):
            if c not in out:
                out[c] = (z["image"][i], z["mask"][i].astype(bool), z["map"][i].astype(np.float32))
    return out


def qualitative(entries: list[tuple[str, Path]], title: str) -> Figure | None:
    """Columns = categories; rows = image, ground truth, one anomaly map per entry.

    Each entry's maps share one colour scale (its min and max over the shown samples), so a
    weak map looks weak rather than being stretched per image.
    """
    loaded = [(label, _load_samples(p)) for label, p in entries]
    loaded = [(label, s) for label, s in loaded if s]
    if not loaded:
        return None
    cats = sorted({c for _, s in loaded for c in s})
    ref = loaded[0][1]
    n_rows, n_cols = 2 + len(loaded), len(cats)
    fig = Figure(figsize=(0.9 + 1.15 * n_cols, 0.3 + 1.15 * n_rows))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    scales = {}
    for label, s in loaded:
        allmaps = np.concatenate([m.ravel() for _, _, m in s.values()])
        scales[label] = (float(allmaps.min()), float(allmaps.max()) or 1.0)
    for j, cat in enumerate(cats):
        base = ref.get(cat) or next(s[cat] for _, s in loaded if cat in s)
        axes[0, j].imshow(base[0], interpolation="nearest")
        axes[0, j].set_title(cat, fontsize=7)
        axes[1, j].imshow(base[1], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        for i, (label, s) in enumerate(loaded, start=2):
            ax = axes[i, j]
            if cat not in s:
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes)
                continue
            img, _, amap = s[cat]
            lo, hi = scales[label]
            ax.imshow(img, interpolation="nearest")
            ax.imshow(amap, cmap="jet", alpha=0.5, vmin=lo, vmax=hi if hi > lo else lo + 1e-6,
                      interpolation="bilinear")
    for i, name in enumerate(["Image", "Ground truth", *[lbl for lbl, _ in loaded]]):
        axes[i, 0].set_ylabel(name, fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(wspace=0.04, hspace=0.08)
    return fig


def qualitative_entries(col: Collection, dataset: str) -> list[tuple[str, Path]]:
    """Table I methods (default variants) on ``dataset`` that left samples, in methods order."""
    params = col.params
    out = []
    for table in params.grid.table_order:
        if params.grid.tables[table].kind != "methods":
            continue
        for m in params.implemented():
            rr = _first_found(col.cell(table, m, dataset))
            if rr is not None and rr.samples is not None:
                out.append((params.methods[m].label, rr.samples))
        break
    return out


def variant_entries(col: Collection) -> list[tuple[str, Path]]:
    """Every variant of the ablation method on the ablation dataset that left samples (first
    seed each)."""
    ds = col.params.protocol(col.protocol).ablation_dataset
    method = col.params.grid.ablation_method
    seen, out = set(), []
    for rr in col.results:
        r = rr.run
        if r.dataset != ds or r.method != method or r.variant in seen or rr.samples is None:
            continue
        seen.add(r.variant)
        label = "default" if r.variant == "default" else "; ".join(
            f"{t.replace('table', 'T')} {row}" for t, row in rr.cells) or r.variant
        out.append((label, rr.samples))
    return out


# --------------------------------------------------------------------------------------------
# (b) mAD along the axes of Tables IV, VI, VII.
# --------------------------------------------------------------------------------------------
def _cost(p: float | None, f: float | None) -> str:
    if p is None and f is None:
        return ""
    ps = "?" if p is None else f"{p:.1f}M"
    fs = "?" if f is None else f"{f:.1f}G"
    return f"{ps}\n{fs}"


def ablation_axes(col: Collection, costs: dict[tuple[str, str], dict]) -> Figure | None:
    params = col.params
    tables = axis_tables(params)
    if not tables:
        return None
    fig = Figure(figsize=(3.4 * len(tables), 3.3))
    axes = fig.subplots(1, len(tables), squeeze=False)[0]
    for ax, table in zip(axes, tables, strict=True):
        rows = axis_rows(col, table, costs)
        x = np.arange(len(rows))
        ours = [r["mad"] for r in rows]
        paper = [r["paper_mad"] for r in rows]
        xo = [i for i, v in zip(x, ours, strict=True) if v is not None]
        if xo:  # the t-interval of the mean over seeds (none with one seed)
            ivs = [t_interval(rows[i]["mad_values"]) for i in xo]
            err = [[0.0 if iv.lo is None else iv.mean - iv.lo for iv in ivs],
                   [0.0 if iv.hi is None else iv.hi - iv.mean for iv in ivs]]
            ax.errorbar(xo, [ours[i] for i in xo], yerr=err, color=OURS, marker="o", ms=4,
                        lw=1.2, capsize=2, label=f"ours ({round(100 * LEVEL)}% interval)")
        xp = [i for i, v in zip(x, paper, strict=True) if v is not None]
        if xp:
            ax.plot(xp, [paper[i] for i in xp], color=PAPER, marker="s", ms=4, lw=1.2,
                    ls="--", label="paper")
        for i, r in enumerate(rows):
            if r["mad"] is not None:
                ax.annotate(_cost(r["params_m"], r["flops_g"]), (i, r["mad"]), fontsize=5.5,
                            color=OURS, xytext=(0, -5), textcoords="offset points",
                            ha="center", va="top")
            elif r["status"] == "excluded":
                ax.annotate("not run", (i, 0.02), xycoords=("data", "axes fraction"),
                            fontsize=6, color="gray", ha="center")
            if r["paper_mad"] is not None:
                ax.annotate(_cost(r["paper_params_m"], r["paper_flops_g"]), (i, r["paper_mad"]),
                            fontsize=5.5, color=PAPER, xytext=(0, 5), textcoords="offset points",
                            ha="center", va="bottom")
        ax.set_xticks(x, [r["value"] for r in rows], rotation=20 if len(rows) > 3 else 0)
        ax.set_xlim(-0.6, len(rows) - 0.4)
        vals = [v for v in ours + paper if v is not None]
        if xo:
            vals += [v for lo, hi, m in zip(*err, [ours[i] for i in xo], strict=True)
                     for v in (m - lo, m + hi)]
        if vals:
            lo, hi = min(vals), max(vals)
            pad = max(2.0, 0.25 * (hi - lo))
            ax.set_ylim(lo - pad, hi + pad)
        spec = params.grid.tables[table]
        ax.set_title(f"{spec.axis or table} ({table.replace('table', 'Table ')})")
        ax.set_ylabel("mAD (%)")
        ax.grid(alpha=0.3, lw=0.5)
        ax.legend(loc="best", frameon=False)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# (b') Forest plot of the paired differences to each ablation table's default.
# --------------------------------------------------------------------------------------------
def forest(col: Collection) -> Figure | None:
    """One panel per ablation table, one line per variant: our paired difference to the
    default row with its t-interval (blue), the paper's difference (red square), zero dashed."""
    params = col.params
    panels = []
    for t in params.grid.table_order:
        if params.grid.tables[t].kind != "ablation":
            continue
        rows = [s for s in row_stats(col, t) if not s.is_default and s.diff is not None
                and s.diff.mean is not None]
        if rows:
            panels.append((t, rows))
    if not panels:
        return None
    ncols = 2 if len(panels) > 1 else 1
    nrows = -(-len(panels) // ncols)
    heights = [max(len(r) for _, r in panels[i * ncols:(i + 1) * ncols]) + 1.2
               for i in range(nrows)]
    fig = Figure(figsize=(7.0 if ncols == 2 else 3.8, 0.28 * sum(heights) + 0.5 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False, gridspec_kw={"height_ratios": heights})
    for ax in axes.ravel()[len(panels):]:
        ax.set_visible(False)
    for ax, (t, rows) in zip(axes.ravel(), panels, strict=False):
        y = np.arange(len(rows))[::-1]
        for yi, s in zip(y, rows, strict=True):
            iv = s.diff
            if iv.lo is not None:
                ax.plot([iv.lo, iv.hi], [yi, yi], color=OURS, lw=1.4, solid_capstyle="butt")
            ax.plot(iv.mean, yi, "o", color=OURS, ms=4, mfc=OURS if iv.decided else "white")
            if s.paper_diff is not None:
                ax.plot(s.paper_diff, yi, "s", color=PAPER, ms=3.5)
        ax.axvline(0.0, color="black", lw=0.8, ls="--")
        ax.set_yticks(y, [s.row for s in rows])
        ax.set_ylim(-0.7, len(rows) - 0.3)
        spec = params.grid.tables[t]
        name = f"Table {roman(params, t)}"
        ax.set_title(f"{name}{' (ours)' if spec.source == 'ours' else ''}: {spec.axis or ''}",
                     fontsize=8)
        ax.set_xlabel("mAD difference to the default (points)", fontsize=7)
        ax.grid(axis="x", alpha=0.3, lw=0.5)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# (c) Per-category bars.
# --------------------------------------------------------------------------------------------
def per_category(col: Collection, dataset: str) -> Figure | None:
    params = col.params
    table = next((t for t in params.grid.table_order
                  if params.grid.tables[t].kind == "methods"), None)
    if table is None:
        return None
    methods = []
    for m in params.implemented():
        found = [r for r in col.cell(table, m, dataset) if r.found]
        if found:
            methods.append((params.methods[m].label, found))
    if not methods:
        return None
    cats = sorted({c for _, rs in methods for r in rs for c in r.categories()}) + [MEAN]
    metrics = (("mad", "mAD (%)"), ("image_auroc", "image AU-ROC (%)"))
    fig = Figure(figsize=(max(4.5, 0.55 * len(cats) * max(1, len(methods)) ** 0.5 + 1.5), 4.6))
    axes = fig.subplots(2, 1, sharex=True)
    width = 0.8 / len(methods)
    x = np.arange(len(cats))
    for ax, (metric, label) in zip(axes, metrics, strict=True):
        for k, (name, runs) in enumerate(methods):
            means, stds = [], []
            for c in cats:
                v = [r.pct(c)[metric] for r in runs
                     if (c == MEAN or c in r.categories()) and metric in r.pct(c)]
                means.append(float(np.mean(v)) if v else np.nan)
                stds.append(float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
            ax.bar(x - 0.4 + width * (k + 0.5), means, width,
                   yerr=stds if any(stds) else None, capsize=1.5, label=name, color=f"C{k}",
                   error_kw={"lw": 0.6})
        ax.set_ylabel(label)
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3, lw=0.5)
        ax.axvline(len(cats) - 1.5, color="gray", lw=0.6, ls=":")
    axes[0].legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncols=min(5, len(methods)),
                   frameon=False)
    axes[1].set_xticks(x, cats, rotation=45, ha="right")
    fig.suptitle(f"{dataset_name(dataset)}: per-category results (ours)", fontsize=9)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# (d) Training curves.
# --------------------------------------------------------------------------------------------
def training(col: Collection, dataset: str) -> Figure | None:
    curves = []
    for rr in col.results:
        if rr.run.dataset != dataset or rr.history is None:
            continue
        hist = json.loads(rr.history.read_text()).get("epochs") or []
        pts = [(e["epoch"], e["loss"]) for e in hist if e.get("loss") is not None]
        if pts:
            name = f"{rr.run.method}/{rr.run.variant}" + (
                f"/seed{rr.run.seed}" if len(col.params.protocol(col.protocol).all_seeds) > 1 else "")
            curves.append((name, pts))
    if not curves:
        return None
    fig = Figure(figsize=(6.2, 3.0))
    ax = fig.subplots()
    for k, (name, pts) in enumerate(curves):
        e, loss = zip(*pts, strict=True)
        ax.plot(e, loss, marker="o" if len(pts) < 12 else None, ms=2.5, lw=1.0, label=name,
                color=f"C{k % 10}", ls="-" if k < 10 else "--")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_title(f"{dataset_name(dataset)}: training loss")
    ax.grid(alpha=0.3, lw=0.5)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, fontsize=6)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
def make_figures(col: Collection, costs: dict[tuple[str, str], dict], folder: Path
                 ) -> list[FigureFile]:
    """Write every figure that has data; return them in the report's order."""
    proto = col.params.protocol(col.protocol)
    made: list[FigureFile] = []
    with matplotlib.rc_context(RC):
        for ds in proto.datasets:
            entries = qualitative_entries(col, ds)
            fig = qualitative(entries, f"{dataset_name(ds)}: anomaly maps")
            if fig is not None:
                save(fig, folder, f"qualitative_{ds}")
                made.append(FigureFile(
                    f"qualitative_{ds}",
                    f"{dataset_name(ds)}: first anomalous test image of each category, its ground "
                    f"truth and the anomaly map of each method (overlay; one colour scale per "
                    f"method), as in the paper's Figure 3."))
        variants = variant_entries(col)
        if len(variants) > 1:
            ds = proto.ablation_dataset
            fig = qualitative(variants, f"{dataset_name(ds)}: anomaly maps of the ablation variants")
            save(fig, folder, f"qualitative_{ds}_variants")
            made.append(FigureFile(f"qualitative_{ds}_variants",
                                   f"{dataset_name(ds)}: anomaly maps of every Omni-AD variant "
                                   f"of the ablation tables."))
        fig = ablation_axes(col, costs)
        if fig is not None:
            save(fig, folder, "ablation_axes")
            made.append(FigureFile("ablation_axes",
                                   "mAD against the number of tokens, the decoder depths and the "
                                   "encoder (Tables IV, VI, VII): ours (blue, mean over seeds and "
                                   "its 95% t-interval) and the paper's (red), each point labelled with its "
                                   "params (M) and FLOPs (G)."))
        fig = forest(col)
        if fig is not None:
            save(fig, folder, "ablation_forest")
            made.append(FigureFile(
                "ablation_forest",
                f"Paired mAD differences to each ablation table's default row, paired by seed "
                f"and category: ours (blue dot, mean over seeds; line, the "
                f"{round(100 * LEVEL)}% t-interval over seeds, none with one seed; filled when "
                f"the interval excludes zero) and the paper's (red square). Dashed: zero."))
        for ds in proto.datasets:
            fig = per_category(col, ds)
            if fig is not None:
                save(fig, folder, f"per_category_{ds}")
                made.append(FigureFile(f"per_category_{ds}",
                                       f"{dataset_name(ds)}: per-category mAD and image AU-ROC of "
                                       f"the Table I methods run here (dotted line: mean over "
                                       f"categories to its right)."))
        for ds in proto.datasets:
            fig = training(col, ds)
            if fig is not None:
                save(fig, folder, f"training_{ds}")
                made.append(FigureFile(f"training_{ds}",
                                       f"{dataset_name(ds)}: training loss per epoch of every "
                                       f"finished run."))
    return made
