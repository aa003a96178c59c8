"""Issue 14: periodic evaluation that does not perturb training, the released-style selection,
per-method protocol schedules, and the divergences from the official code (each test fails on
the old behaviour)."""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import pytest
import torch

from omniad.engine import optim as optim_builders
from omniad.engine.optim import build_scheduler, param_groups
from omniad.grid import Params, ParamsError, load_params
from omniad.selection import released_max

KEY = "tiny/demo/omniad/default/42"


# --------------------------------------------------------------------------------------------
# Periodic evaluation.
# --------------------------------------------------------------------------------------------
def _tiny_setup(tiny_env):
    from omniad.data.cache import CachedDataset
    from omniad.engine.runtime import Runtime
    from omniad.grid import cache_dir, config_hash, parse_run_key, resolve_run

    cfg = resolve_run(load_params(), parse_run_key(KEY))
    rt = Runtime.create("cpu", 0, False, False, config_hash(cfg))
    cache = cache_dir("demo", cfg.image_size)
    return (cfg, rt, CachedDataset(cache, "train", cfg.categories),
            CachedDataset(cache, "test", cfg.categories))


def test_periodic_evaluation_leaves_the_final_weights_bit_identical(tiny_env, tmp_path) -> None:
    from omniad.engine.evaluate import evaluate, periodic_evaluator
    from omniad.engine.runner import build_model
    from omniad.engine.train import train

    cfg, rt, train_ds, test_ds = _tiny_setup(tiny_env)
    assert cfg.epochs == 3 and cfg.evaluate_every == 1

    # not vacuous: an evaluation draws random numbers (re-drawn FFNs, the eval jitter)
    probe = build_model(cfg)
    before = torch.get_rng_state()
    evaluate(probe, test_ds, cfg, rt)
    assert not torch.equal(before, torch.get_rng_state())

    out = {}
    for every in (0, 1):
        c = cfg.model_copy(update={"evaluate_every": every})
        model = build_model(c)
        ev = periodic_evaluator(test_ds, c, rt) if every else None
        d = tmp_path / f"every{every}"
        train(model, train_ds, c, d, rt, ev)
        out[every] = (torch.load(d / "model.pt", weights_only=False)["model"],
                      json.loads((d / "history.json").read_text()))
    a, b = out[0][0], out[1][0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert out[0][1]["epochs"] == out[1][1]["epochs"]
    assert out[0][1]["evaluations"] == []
    evals = out[1][1]["evaluations"]
    assert [e["epoch"] for e in evals] == [1, 2]  # not the last: `omniad evaluate` does it
    assert set(evals[0]["per_category"]) == {"brick", "gravel", "coffee", "coins"}
    assert 0 <= evals[1]["mean"]["mad"] <= 1


SEVEN = ["image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max",
         "pixel_aupro"]


def _brute_force_max(evaluations: list[dict]) -> dict:
    """Each reported column its own maximum; mAD the mean of the seven reported maxima."""
    def best(rows: list[dict]) -> dict:
        out = {k: max(r[k] for r in rows) for k in rows[0]}
        if "mad" in out and all(k in out for k in SEVEN):
            out["mad"] = sum(out[k] for k in SEVEN) / 7
        return out

    cats = {c for e in evaluations for c in e["per_category"]}
    return {"mean": best([e["mean"] for e in evaluations]),
            "per_category": {c: best([e["per_category"][c] for e in evaluations]) for c in cats}}


def test_released_max_equals_a_brute_force_maximum() -> None:
    rng = random.Random(7)
    keys = [*SEVEN, "mad"]
    evaluations = []
    for epoch in (20, 40, 60, 80, 100):
        per = {c: {k: rng.random() for k in SEVEN} for c in ("a", "b", "c")}
        for c in per:
            per[c]["mad"] = sum(per[c].values()) / 7
        mean = {k: sum(per[c][k] for c in per) / 3 for k in keys}
        evaluations.append({"epoch": epoch, "mean": mean, "per_category": per})
    got = released_max(evaluations)
    want = _brute_force_max(evaluations)
    assert got["mean"] == want["mean"] and got["per_category"] == want["per_category"]
    assert got["epochs"] == [20, 40, 60, 80, 100]
    for k in SEVEN:
        epoch = got["epoch_of_max"][k]
        assert next(e for e in evaluations if e["epoch"] == epoch)["mean"][k] == got["mean"][k]
    assert got["epoch_of_max"]["mad"] is None
    # mAD: the mean of the seven reported maxima, at least the best epoch's mAD
    assert got["mean"]["mad"] == sum(got["mean"][k] for k in SEVEN) / 7
    assert got["mean"]["mad"] >= max(e["mean"]["mad"] for e in evaluations)
    # the mean row's maximum is the max of the mean, not the mean of the per-category maxima
    mean_of_max = {k: sum(got["per_category"][c][k] for c in "abc") / 3 for k in keys}
    assert all(got["mean"][k] <= mean_of_max[k] for k in keys)
    assert any(got["mean"][k] < mean_of_max[k] for k in keys)


def test_a_run_records_its_evaluations_and_their_maximum(tiny_env) -> None:
    from omniad.engine.runner import evaluate_run, train_run

    train_run(KEY)
    out = evaluate_run(KEY, track=False)
    assert [e["epoch"] for e in out["evaluations"]] == [1, 2, 3]
    assert out["evaluations"][-1]["mean"] == out["mean"]  # the final evaluation counts
    want = _brute_force_max(out["evaluations"])
    assert out["released_max"]["mean"] == want["mean"]
    assert out["released_max"]["per_category"] == want["per_category"]
    on_disk = json.loads((Path(tiny_env["OMNIAD_RESULTS"]) /
                          "tiny/runs/demo/omniad/default/seed42/metrics.json").read_text())
    assert on_disk["released_max"] == json.loads(json.dumps(out["released_max"]))


def test_mlflow_steps_of_the_evaluations() -> None:
    from omniad.tracking import evaluation_metrics

    metrics = {"evaluations": [{"epoch": 2, "mean": {"mad": 0.5}},
                               {"epoch": 4, "mean": {"mad": 0.4}}],
               "released_max": {"mean": {"mad": 0.5}}}
    ms = evaluation_metrics(metrics, 0)
    assert [(m.key, m.value, m.step) for m in ms] == [
        ("eval.mad", 0.5, 2), ("eval.mad", 0.4, 4), ("released_max.mad", 0.5, 0)]


# --------------------------------------------------------------------------------------------
# Protocols: per-method schedules, ader.
# --------------------------------------------------------------------------------------------
def _cfg(protocol: str, dataset: str, method: str) -> dict:
    from omniad.grid import Run, resolve_run

    params = load_params()
    return resolve_run(params, Run(protocol=protocol, dataset=dataset, method=method,
                                   variant="default", seed=42))


@pytest.mark.parametrize(("protocol", "dataset", "method", "epochs", "batch", "every"), [
    ("paper", "mvtec_ad", "omniad", 500, 16, 20),
    ("released", "mvtec_ad", "omniad", 1000, 16, 20),
    ("ader", "mvtec_ad", "rd4ad", 100, 16, 10),
    ("ader", "visa", "uniad", 100, 8, 10),
    ("ader", "real_iad", "simplenet", 100, 32, 10),
    ("ader", "mvtec_ad", "destseg", 100, 32, 10),
    ("ader", "mvtec_ad", "mambaad", 100, 16, 10),
    ("ader", "mvtec_ad", "omniad", 1000, 16, 20),
    ("ader", "real_iad", "omniad", 100, 16, 20),
    ("ader", "mvtec_ad", "rlr", 200, 4, 1),
    ("demo", "demo", "omniad", 2, 16, 2),
    ("demo", "demo", "uniad", 4, 8, 2),
    ("demo", "demo", "destseg", 6, 8, 2),
])
def test_protocol_schedules(monkeypatch, protocol, dataset, method, epochs, batch, every) -> None:
    monkeypatch.delenv("OMNIAD_PARAMS", raising=False)
    load_params.cache_clear()
    cfg = _cfg(protocol, dataset, method)
    assert (cfg.epochs, cfg.batch_size, cfg.evaluate_every) == (epochs, batch, every)


def test_a_schedule_for_an_unknown_method_is_refused(tmp_path) -> None:
    import shutil

    import yaml
    from conftest import REPO

    shutil.copytree(REPO / "params", tmp_path / "p")
    protos = yaml.safe_load((tmp_path / "p/protocols.yaml").read_text())
    protos["protocols"]["demo"]["methods"] = {"nosuch": {"batch_size": 4}}
    (tmp_path / "p/protocols.yaml").write_text(yaml.safe_dump(protos))
    with pytest.raises(ParamsError, match="demo.methods: unknown method 'nosuch'"):
        Params(tmp_path / "p")


# --------------------------------------------------------------------------------------------
# Divergences from the official code.
# --------------------------------------------------------------------------------------------
def test_omniad_attention_biases_are_weight_decayed_as_released() -> None:
    from omniad.models.omniad import OmniAD, TokenAttention

    model = OmniAD(pretrained=False)
    no_decay, decay = param_groups(model, 1e-4, no_decay_1d=True)
    decayed = {id(p) for p in decay["params"]}
    biases = [m.pe for m in model.modules() if isinstance(m, TokenAttention) and hasattr(m, "pe")]
    assert len(biases) == 2 * sum(model.cfg.depths) == 56
    assert all(p.ndim == 4 and id(p) in decayed for p in biases)
    names = [n for n, p in model.named_parameters() if p.ndim == 4 and id(p) in decayed
             and ".global_branch." in n]
    assert len(names) == 56 and all(n.endswith(".pe") for n in names)


def test_omniad_eval_draws_the_jitter_noise_as_released() -> None:
    """The released forward in eval: encoder, neck, randn(B, N, C) (scale 0), decoder."""
    from omniad.models.omniad import OmniAD

    model = OmniAD(pretrained=False, depths=(1, 1, 1, 1)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.manual_seed(3)
        ours = model(x)[1]
        torch.manual_seed(3)
        z = model.neck(model.encoder(x))
        b, c, h, w = z.shape
        torch.randn((b, h * w, c))  # drawn, multiplied by scale 0
        released = model.decoder(z)
        torch.manual_seed(3)
        no_draw = model.decoder(model.neck(model.encoder(x)))  # the old behaviour
    assert all(torch.equal(a, r) for a, r in zip(ours, released, strict=True))
    assert not all(torch.equal(a, r) for a, r in zip(ours, no_draw, strict=True))
    # the values are untouched: with a deterministic (learned) FFN the draw changes nothing
    learned = OmniAD(pretrained=False, depths=(1, 1, 1, 1), ffn="learned").eval()
    with torch.no_grad():
        plain = learned.decoder(learned.neck(learned.encoder(x)))
        assert all(torch.equal(a, r) for a, r in zip(learned(x)[1], plain, strict=True))


def test_mambaad_loads_the_same_encoder_file_as_omniad() -> None:
    from omniad.models.baselines.mambaad import MambaADConfig
    from omniad.models.omniad import OmniADConfig

    assert MambaADConfig().pretrained == OmniADConfig().pretrained == "resnet34.bt_in1k"


def test_pretrained_tags_are_the_files_the_references_loaded(monkeypatch) -> None:
    from omniad.models.baselines.rd4ad import RD4ADConfig

    monkeypatch.delenv("OMNIAD_PARAMS", raising=False)
    load_params.cache_clear()
    params = load_params()
    rows = params.grid.tables["table7"].rows
    assert rows["resnet18"]["pretrained"] == "resnet18.tv_in1k"  # resnet18-5c106cde.pth (tv)
    assert rows["resnet50"]["pretrained"] == "resnet50.a1_in1k"  # timm 0.8's default
    assert rows["wide_resnet50"]["pretrained"] == "wide_resnet50_2.racm_in1k"
    assert RD4ADConfig().pretrained == "wide_resnet50_2.racm_in1k"  # ADer's multi-class RD4AD
    assert params.methods["rd4ad"].model["pretrained"] == "wide_resnet50_2.racm_in1k"
    for m in params.implemented():  # every method says which file it follows
        assert "pretrained" in params.methods[m].follows, m


def _lrs_after(opts, optim: dict, total: int, steps: int) -> list[float]:
    scheds = [build_scheduler(o, optim, total) for o in opts]
    for _ in range(steps):
        for o in opts:
            o.step()
        for s in scheds:
            s.step()
    return [g["lr"] for o in opts for g in o.param_groups]


def test_simplenet_constant_lr_separate_clipping_and_no_decay_on_biases_and_bn(monkeypatch) -> None:
    from omniad.models.baselines.simplenet import SimpleNet

    monkeypatch.delenv("OMNIAD_PARAMS", raising=False)
    load_params.cache_clear()
    optim = load_params().methods["simplenet"].optim.to_dict()
    model = SimpleNet(pretrained=False, hold_full_backbone=False)
    opts, _ = model.configure_optimizers(optim, 10, optim_builders)
    start = [g["lr"] for o in opts for g in o.param_groups]
    assert _lrs_after(opts, optim, 10, 9) == start  # no x0.1 at 80%
    # clipped separately: adaptor and discriminator, each to norm 5
    groups = model.clip_groups()
    assert [{id(p) for p in g} for g in groups] == [
        {id(p) for p in model.adaptor.parameters()}, {id(p) for p in model.discriminator.parameters()}]
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0) if p.requires_grad else None
    for g in groups:
        torch.nn.utils.clip_grad_norm_(g, optim["clip_grad"])
    norms = [torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in g])).item()
             for g in groups]
    assert norms == pytest.approx([5.0, 5.0], rel=1e-2)  # jointly: each part below 5
    assert sum(n * n for n in norms) ** 0.5 == pytest.approx(50 ** 0.5, rel=1e-2)
    # weight decay: biases and BatchNorm exempt in both optimizers
    for o in opts:
        for group in o.param_groups:
            for p in group["params"]:
                assert (group["weight_decay"] == 0.0) == (p.ndim <= 1)
    bn = model.discriminator[1] if isinstance(model.discriminator, torch.nn.Sequential) else None
    if bn is not None and isinstance(bn, torch.nn.BatchNorm1d):
        exempt = {id(p) for o in opts for g in o.param_groups if g["weight_decay"] == 0
                  for p in g["params"]}
        assert id(bn.weight) in exempt


def test_destseg_constant_lr_and_student_biases_and_bn_not_decayed(monkeypatch) -> None:
    from omniad.models.baselines.destseg import DeSTSeg

    monkeypatch.delenv("OMNIAD_PARAMS", raising=False)
    load_params.cache_clear()
    optim = load_params().methods["destseg"].optim.to_dict()
    model = DeSTSeg(pretrained=False, textures="package")
    opts, _ = model.configure_optimizers(optim, 10, optim_builders)
    start = [g["lr"] for o in opts for g in o.param_groups]
    assert _lrs_after(opts, optim, 10, 9) == start
    student = opts[0]
    exempt = {id(p) for g in student.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    bns = [m for m in model.student.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(id(m.weight) in exempt and id(m.bias) in exempt for m in bns)
    convs = [m for m in model.student.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(id(m.weight) not in exempt for m in convs)
    assert {g["weight_decay"] for g in student.param_groups} == {0.0, 1e-4}


def _rlr() -> torch.nn.Module:
    from omniad.models.baselines.rlr import RLR

    return RLR(pretrained=False, image_size=64, windows=(5, 3), layers=1)


def test_rlr_released_stepping_is_the_official_per_level_loop() -> None:
    """Official (torch 1.12.1): per level zero_grad (zeros, not None) / backward / step on one
    Adam. Reference written out here; the old behaviour (one step on the sum) differs."""
    from omniad.models.baselines.rlr import level_loss

    torch.manual_seed(0)
    ours = _rlr().train()
    assert ours.cfg.stepping == "per_level"
    ref = _rlr().train()
    ref.load_state_dict(ours.state_dict())
    images = [torch.randn(2, 3, 64, 64) for _ in range(3)]
    optim = {"name": "adam", "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8}
    opts, _ = ours.configure_optimizers(optim, 3, optim_builders)
    ref_opt = torch.optim.Adam([p for p in ref.parameters() if p.requires_grad], lr=1e-3)
    torch.manual_seed(1)
    for step, x in enumerate(images):
        ours.optimization_step(x, step, opts, None, contextlib.nullcontext)
    torch.manual_seed(1)
    for x in images:
        with torch.no_grad():
            targets = ref.targets(x)
        for net, t in zip(ref.levels, targets, strict=True):
            loss = level_loss(net(ref.jitter(t)), t)
            ref_opt.zero_grad(set_to_none=False)
            loss.backward()
            ref_opt.step()
    a, b = ours.state_dict(), ref.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = {int(s["step"]) for s in opts[0].state.values()}
    assert steps == {2 * 3, 2 * 3 - 1}  # level 0: 2 per iteration; level 1 skips the first
    # the torch >= 2 behaviour: one step per iteration
    from omniad.models.baselines.rlr import RLR

    summed = RLR(pretrained=False, image_size=64, windows=(5, 3), layers=1, stepping="summed")
    opts2, _ = summed.configure_optimizers(optim, 3, optim_builders)
    summed.train().optimization_step(images[0], 0, opts2, None, contextlib.nullcontext)
    assert {int(s["step"]) for s in opts2[0].state.values()} == {1}


def test_hilbert_order_is_the_official_one_for_grids_2_to_64() -> None:
    """The official SCANS: ``decode(arange(n*n), 2, bits)`` from the ``hilbert`` package
    (numpy-hilbert-curve), flattened as loc[0] + loc[1] * n; identical, not a reflection."""
    import numpy as np

    import omniad.models.layers.scan_orders as orders

    hilbert = pytest.importorskip("hilbert")
    for bits in range(1, 7):
        n = 2 ** bits
        locs = hilbert.decode(np.arange(n * n), 2, bits)
        official = locs[:, 0].astype(np.int64) + locs[:, 1].astype(np.int64) * n
        assert np.array_equal(official, orders.hilbert_order(n)), n
    assert "identical" in orders.__doc__ and "reflection" not in orders.__doc__
