"""Model selection: the final model (our headline) and the released trainers' "(Max)" columns.

The released Omni-AD trainer (and ADer's) evaluates every few epochs and logs, per metric, the
maximum over every evaluation so far: selection on the test set. It keeps one record per
(category, metric) and one for the mean row ("Avg"), each maximised on its own, so a category's
AU-ROC and its AU-PRO may come from different epochs, and the mean row's maximum is the
maximum of the mean over categories, not the mean of the per-category maxima.

The final model's evaluation counts as one of the evaluations: the released trainer tests at
every multiple of ``test_per_epoch`` and at the last epoch (``test_start_epoch = epoch_full``),
so its maximum always includes the final model. Periodic evaluations here run after every
``evaluate_every`` epochs except the last, whose evaluation is ``omniad evaluate``'s.

mAD under this selection is the mean of the seven maxima, as the paper's mAD is the mean of the
seven columns the trainer reported (each its own maximum), not the maximum of per-epoch mAD.
"""

from __future__ import annotations

from typing import Any, Literal

from omniad.metrics import METRIC_KEYS

SEVEN = tuple(k for k in METRIC_KEYS if k != "mad")

Selection = Literal["final", "released-max"]
SELECTIONS: tuple[str, ...] = ("final", "released-max")


def _max_of(records: list[dict[str, float]]) -> dict[str, float]:
    keys = dict.fromkeys(k for r in records for k in r)
    out = {k: max(r[k] for r in records if r.get(k) is not None) for k in keys
           if any(r.get(k) is not None for r in records)}
    if "mad" in out and all(k in out for k in SEVEN):
        out["mad"] = sum(out[k] for k in SEVEN) / len(SEVEN)  # mean of the reported maxima
    return out


def released_max(evaluations: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (category, metric) and per mean-row metric, the maximum over the evaluations, with
    the epoch each maximum came from (the first such epoch, as ``list.index`` in the trainer)."""
    if not evaluations:
        raise ValueError("released_max: no evaluations")
    cats = dict.fromkeys(c for e in evaluations for c in e["per_category"])
    out = {"mean": _max_of([e["mean"] for e in evaluations]),
           "per_category": {c: _max_of([e["per_category"][c] for e in evaluations
                                        if c in e["per_category"]]) for c in cats}}
    out["epoch_of_max"] = {k: next((e["epoch"] for e in evaluations if e["mean"].get(k) == v),
                                   None)  # None: mAD, derived from the maxima
                           for k, v in out["mean"].items()}
    out["epochs"] = [e["epoch"] for e in evaluations]
    return out


def selected(metrics: dict[str, Any], selection: str) -> dict[str, Any]:
    """``{"mean", "per_category"}`` of a metrics.json under a selection; released-max falls
    back to the final model when the run has no evaluations recorded (one evaluation: the
    final one)."""
    if selection == "final":
        return metrics
    if selection == "released-max":
        return metrics.get("released_max") or metrics
    raise ValueError(f"selection {selection!r} is not one of {', '.join(SELECTIONS)}")
