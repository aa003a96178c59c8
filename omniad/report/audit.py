"""The reproduction audit: every known difference between the paper and the released code,
what this project does about it, and the switch that covers it.

The facts are data (:data:`FACTS`); text in backticks is set in typewriter. What the current
protocol actually uses is read from params/ and the runs (:func:`audit_context`), never typed.
"""

from __future__ import annotations

import re
from typing import Any

from omniad.grid import Params
from omniad.report.aggregate import Collection, paper_row
from omniad.report.latex import TeX, escape, num, render
from omniad.report.tables import dataset_name, paper_reference_dataset

RELEASED = "easyoo/Omni-AD @ d85c5f4"

FACTS: list[dict[str, str]] = [
    {"id": "a", "topic": "Training epochs",
     "paper": "500 epochs (Implementation Details).",
     "released": "Configs train 1000 epochs on MVTec-AD and VisA, 100 on Real-IAD.",
     "ours": "Both, as protocols: `paper` trains 500 epochs everywhere, `released` the "
             "configs' 1000 / 1000 / 100.",
     "switch": "protocol `paper` | `released` (params/protocols.yaml, `epochs`)"},
    {"id": "b", "topic": "FFN after each attention",
     "paper": "Each MHA is “just a plain self-attention module”; no FFN is mentioned; "
              "29.9M parameters.",
     "released": "Each MHA ends in a Linear-SiLU-Linear FFN created anew, randomly "
                 "initialised, on every forward pass and never trained; its weights are not "
                 "in the 29.9M.",
     "ours": "Released behaviour by default; a trained FFN or none as ablations.",
     "switch": "model `ffn: resampled | learned | none` (default `resampled`)"},
    {"id": "c", "topic": "Positional bias in attention",
     "paper": "Not mentioned.",
     "released": "A learnable positional bias (zero-initialised) is added to the attention "
                 "weights after the softmax.",
     "ours": "As released.",
     "switch": "none (as released)"},
    {"id": "d", "topic": "Global-branch residuals",
     "paper": "One residual connection per MHA.",
     "released": "global = A2 + A1_up + 2x: the input x is added twice.",
     "ours": "As released.",
     "switch": "none (as released)"},
    {"id": "e", "topic": "Anomaly map scaling and smoothing",
     "paper": "Cosine similarities combined over stages 2-4; nothing more said.",
     "released": "Sum of (1 - cosine) over the three scales divided by 9, then a Gaussian "
                 "filter with sigma 4 per image.",
     "ours": "As released (the divisor does not change any metric; sigma does).",
     "switch": "model `map_divisor` (9), `map_sigma` (4)"},
    {"id": "f", "topic": "Table II, “learnable query only”",
     "paper": "Does not say what the second attention becomes.",
     "released": "No configuration for this row.",
     "ours": "Read as (learnable query, plain self-attention).",
     "switch": "params/grid.yaml `table2.q: attention: [q, self]`"},
    {"id": "g", "topic": "Reported epoch (model selection)",
     "paper": "Not said whether the last or the best epoch is reported.",
     "released": "Evaluates on the test set every 20 epochs and at the last, and logs per "
                 "metric the maximum over all evaluations so far (per category and for the mean "
                 "row, each on its own): selection on the test set.",
     "ours": "Headline: the final model, for every method. The released-style maximum is "
             "computed from the same periodic evaluations (which leave training bit-identical) "
             "and shown beside it in the selection section.",
     "switch": "protocol `evaluate_every`; `omniad report --selection final | released-max`"},
    {"id": "k", "topic": "Weight decay of the attention biases",
     "paper": "Not mentioned.",
     "released": "The optimizer exempts 1-D parameters and names ending in `.bias`; the 4-D "
                 "attention position biases are named `pe1` / `pe2`, so they are decayed "
                 "(56 tensors).",
     "ours": "As released: named `pe`, decayed.",
     "switch": "none (as released)"},
    {"id": "l", "topic": "Feature jitter at test time",
     "paper": "Jitter in training only.",
     "released": "The jitter is also called in eval, with scale 0: it adds nothing but still "
                 "draws `randn(B, N, C)`, which shifts the random FFN weights drawn after it.",
     "ours": "As released: the same draw, so a seeded evaluation reproduces the released one.",
     "switch": "none (as released)"},
    {"id": "h", "topic": "ResNet50 / WideResNet50 encoders (Table VII)",
     "paper": "468M / 114G and 484M / 121G, no widths given.",
     "released": "Cannot build them: neck and decoder widths are fixed for ResNet18/34.",
     "ours": "A derived construction, matched by counts, not by released code: every channel "
             "constant of the released neck scaled by c1/64, the Bottlenecks' width per group "
             "included (inner width 2048 for c1 = 256); decoder dims (2 c3, c3, c2, c1). "
             "ResNet18/34 keep the released neck exactly (see the complexity table).",
     "switch": "model `backbone` (params/grid.yaml, table7)"},
    {"id": "i", "topic": "Metrics",
     "paper": "AU-ROC, AP, F1-max (image, pixel), AU-PRO, mAD; no computation details.",
     "released": "ADer's evaluation: pixel metrics binned between each class's min and max, "
                 "pixel F1-max on a 0.05 grid, AU-PRO from 100 thresholds with a min-max "
                 "rescaled FPR axis.",
     "ours": "Exact metrics (every threshold; AU-PRO up to FPR 0.3, normalised), the same for "
             "every method.",
     "switch": "none in the pipeline (omniad/metrics.py); benchmarks/metrics.py re-implements "
               "the released evaluation for comparison"},
    {"id": "j", "topic": "Demo protocol",
     "paper": "Pretrained ResNet34, 256 x 256 images, MVTec-AD / VisA / Real-IAD.",
     "released": "Same as the paper.",
     "ours": "Runs on CPU in minutes on an embedded synthetic set: no pretrained weights can be "
             "fetched offline, so the encoder is random, and images are small. The random "
             "encoder's BatchNorm statistics are estimated from the training images before "
             "training (with its init statistics its deep stages fade to almost nothing). Its "
             "numbers check the pipeline, not the paper.",
     "switch": "protocol `demo` (params/protocols.yaml: `pretrained: false`, `image_size`, "
               "`random_encoder_bn: train | init`)"},
]


def markup(text: str) -> TeX:
    """Escape plain text; `backticked` parts in typewriter."""
    parts = re.split(r"`([^`]*)`", text)
    return TeX("".join(rf"\texttt{{{escape(p)}}}" if i % 2 else escape(p)
                       for i, p in enumerate(parts)))


def _ablation_model(params: Params, protocol: str) -> dict[str, Any]:
    """The ablation method's model config for this protocol (class defaults, its yaml,
    overrides): the facts above are about Omni-AD, the method params/grid.yaml ablates."""
    spec = params.methods.get(params.grid.ablation_method)
    if spec is None:
        return {}
    base: dict[str, Any] = {}
    if spec.builder:
        from omniad.methods import method_class

        base = method_class(params.grid.ablation_method, params).config_class().model_dump()
    return {**base, **spec.model, **spec.protocol_overrides.get(protocol, {})}


def encoder_weights(col: Collection) -> list[str]:
    return sorted({str(r.meta.get("encoder_weights")) for r in col.found
                   if r.meta.get("encoder_weights") is not None})


def caveats(col: Collection) -> list[TeX]:
    """Why this protocol's numbers are not the paper's setting (empty for the real protocols)."""
    proto = col.params.protocol(col.protocol)
    out = []
    weights = encoder_weights(col)
    if not proto.pretrained or "random" in weights:
        seen = f" (runs: {', '.join(weights)})" if weights else ""
        bn = ("its BatchNorm statistics estimated from the training images"
              if proto.random_encoder_bn == "train" else "its BatchNorm statistics left at init")
        out.append(TeX("Randomly initialised encoder, " + bn + ": no pretrained weights can be "
                       f"fetched offline{escape(seen)}."))
    setup = col.params.paper["setup"]
    if proto.image_size != setup["image_size"]:
        out.append(TeX(rf"Images of {proto.image_size}$\times${proto.image_size}\,px, not "
                       rf"{setup['image_size']}$\times${setup['image_size']}."))
    short = {d: e for d, e in proto.epochs.items() if e < 100}
    if short:
        out.append(TeX("Few epochs: " + escape(", ".join(f"{d} {e}" for d, e in short.items()))
                       + f" (paper: {setup['epochs']})."))
    paper_sets = set(col.params.paper.get("table1") or {})
    other = [d for d in proto.datasets if d not in paper_sets]
    if other:
        ref = dataset_name(paper_reference_dataset(col.params))
        out.append(TeX(escape(", ".join(other)) + ": not a dataset of the paper; tables set it "
                       f"beside the paper's {escape(ref)} numbers for orientation only."))
    if out:
        out.append(TeX("These numbers check that the pipeline runs end to end; they say nothing "
                       "about the paper's claims."))
    return out


def _now(fact: str, col: Collection, complexity: list[dict]) -> TeX | None:
    params, protocol = col.params, col.protocol
    proto = params.protocol(protocol)
    model = _ablation_model(params, protocol)
    if fact == "a":
        eps = ", ".join(f"{d} {e}" for d, e in proto.epochs.items())
        return escape(f"{protocol}: {eps} epochs.")
    if fact == "b" and "ffn" in model:
        return markup(f"`ffn: {model['ffn']}`.")
    if fact == "e" and "map_divisor" in model:
        return markup(f"`map_divisor: {model['map_divisor']:g}`, `map_sigma: {model['map_sigma']:g}`.")
    if fact == "f":
        row = params.grid.tables.get("table2")
        if row and "q" in row.rows:
            att = row.rows["q"].get("attention")
            return markup(f"`attention: [{', '.join(map(str, att))}]`.") if att else None
    if fact == "h":
        parts = []
        for r in complexity:
            if r.get("table") == "table7" and str(r.get("row")) in ("resnet50", "wide_resnet50"):
                paper = paper_row(params, "table7", str(r["row"])) or {}
                parts.append(f"{r['row']}: {num(r.get('params_m'), 1)}M / {num(r.get('flops_g'), 1)}G "
                             f"vs the paper's {num(paper.get('params_m'), 0)}M / "
                             f"{num(paper.get('flops_g'), 0)}G")
        return escape("; ".join(parts) + ".") if parts else None
    if fact == "g":
        every = proto.evaluate_every
        return escape(f"{protocol}: evaluations every {every} epochs and at the last; the tables "
                      f"show the {'final model' if col.selection == 'final' else 'released-style maximum'}."
                      if every else f"{protocol}: the final evaluation only.")
    if fact == "j":
        weights = encoder_weights(col)
        return escape(f"{protocol}: encoder weights {', '.join(weights) or 'n/a (no runs yet)'}, "
                      f"{proto.image_size} px images.")
    return None


def applies(fact: str, col: Collection) -> bool:
    """Fact (j) only where the demo caveats hold."""
    return fact != "j" or col.protocol == "demo" or bool(caveats(col))


def reference_rows(col: Collection) -> list[dict[str, TeX]]:
    """Which reference each implemented method follows, per topic (methods' ``follows``)."""
    rows = []
    for spec in col.params.methods.values():
        for topic, text in spec.follows.items():
            rows.append({"method": escape(spec.label), "topic": escape(topic.replace("_", " ")),
                         "text": markup(text)})
    return rows


def schedule_rows(col: Collection) -> list[TeX]:
    """This protocol's per-method schedules (protocols.yaml ``methods``)."""
    proto = col.params.protocol(col.protocol)
    out = []
    for m, s in proto.methods.items():
        parts = []
        if s.epochs:
            parts.append("epochs " + ", ".join(f"{d} {e}" for d, e in s.epochs.items()))
        if s.batch_size:
            parts.append(f"batch {s.batch_size}")
        if s.evaluate_every is not None:
            parts.append(f"evaluation every {s.evaluate_every}")
        label = col.params.methods[m].label if m in col.params.methods else m
        out.append(escape(f"{label}: {'; '.join(parts)}" + (f" ({s.source})" if s.source else "")))
    return out


def audit_context(col: Collection, complexity: list[dict]) -> dict[str, Any]:
    rows = []
    for f in FACTS:
        if not applies(f["id"], col):
            continue
        now = _now(f["id"], col, complexity)
        rows.append({"id": f"({f['id']})", "topic": markup(f["topic"]), "paper": markup(f["paper"]),
                     "released": markup(f["released"]), "ours": markup(f["ours"]),
                     "switch": markup(f["switch"]), "now": now})
    return {"rows": rows, "released": RELEASED, "protocol": col.protocol,
            "references": reference_rows(col), "schedules": schedule_rows(col)}


def render_audit(col: Collection, complexity: list[dict]) -> str:
    return render("audit.tex.j2", **audit_context(col, complexity))
