"""Typed configs that fail early, the optimizer built from them, the command line as a Unix tool.

A params typo must stop `omniad grid check` with one line naming the file, the key path and
the nearest valid key; the typed optim block must build the very optimizers and schedules the
released protocols use; `omniad ... | head` must end quietly.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

from omniad.engine.optim import build_optimizer, build_scheduler, param_groups
from omniad.grid import ParamsError, Run, config_hash, load_params, resolve_run
from omniad.optim_config import OptimConfig
from omniad.params_errors import explain

REPO = Path(__file__).resolve().parent.parent


def _omniad(args: list[str], cwd: Path, params: Path | None = None,
            **kw: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if params is not None:
        env["OMNIAD_PARAMS"] = str(params)
    return subprocess.run([sys.executable, "-m", "omniad.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, **kw)


# --------------------------------------------------------------------------------------------
# A typo in any params file fails `omniad grid check`: file, key path, nearest valid key.
# --------------------------------------------------------------------------------------------
TYPOS = {  # file: (text in params/, the typo, the one line `grid check` must print)
    "optim": ("methods/omniad.yaml", "  weight_decay: 1.0e-4 ", "  weight_deacy: 1.0e-4 ",
              "params/methods/omniad.yaml: optim.weight_deacy: unknown key "
              "(did you mean 'weight_decay'?)"),
    "model": ("methods/omniad.yaml", "model: {}", "model: {map_sigmaa: 2.0}",
              "params/methods/omniad.yaml: model.map_sigmaa: unknown key "
              "(did you mean 'map_sigma'?)"),
    "protocol": ("protocols.yaml", "    evaluate_every: 2 ", "    evaluate_evry: 2 ",
                 "params/protocols.yaml: protocols.demo.evaluate_evry: unknown key "
                 "(did you mean 'evaluate_every'?)"),
    "grid": ("grid.yaml", '    title: "Decoder depths"', '    titel: "Decoder depths"',
             "params/grid.yaml: tables.table6.titel: unknown key (did you mean 'title'?)"),
}


@pytest.mark.parametrize("kind", list(TYPOS))
def test_a_typo_fails_grid_check_naming_file_key_and_nearest_valid_key(kind: str,
                                                                       tmp_path: Path) -> None:
    name, good, bad, line = TYPOS[kind]
    params = tmp_path / "params"
    shutil.copytree(REPO / "params", params)
    text = (params / name).read_text()
    assert text.count(good) == 1, good  # the typo lands where meant
    (params / name).write_text(text.replace(good, bad))
    out = _omniad(["grid", "check"], cwd=tmp_path, params=params)
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr == line + "\n"  # one line, no traceback


def test_grid_check_passes_on_the_real_params(tmp_path: Path) -> None:
    out = _omniad(["grid", "check"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("params/ valid:")


def test_a_typo_in_an_ablation_row_and_a_bad_value_are_named(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    params = tmp_path / "params"
    shutil.copytree(REPO / "params", params)
    monkeypatch.chdir(tmp_path)
    grid = (params / "grid.yaml").read_text()
    (params / "grid.yaml").write_text(grid.replace('"16":  {tokens: 16}', '"16":  {tokenz: 16}'))
    with pytest.raises(ParamsError) as err:
        load_params(params)
    assert str(err.value) == ("params/grid.yaml: tables.table4.rows.16.tokenz: unknown key "
                              "(did you mean 'tokens'?)")
    (params / "grid.yaml").write_text(grid)
    omni = (params / "methods/omniad.yaml").read_text()
    (params / "methods/omniad.yaml").write_text(
        omni.replace("schedule: {name: step, at: 0.8", "schedule: {name: step, at: 1.8"))
    with pytest.raises(ParamsError) as err:
        load_params(params)
    assert str(err.value) == ("params/methods/omniad.yaml: optim.schedule.at: Input should be "
                              "less than or equal to 1 (got 1.8)")
    load_params.cache_clear()


@pytest.mark.parametrize("edit, line", [
    (("protocols.yaml", "      mambaad: {epochs: {demo: 5}}", "      mambaadd: {epochs: {demo: 5}}"),
     "params/protocols.yaml: protocols.demo.methods: unknown method 'mambaadd' "
     "(did you mean 'mambaad'?)"),
    (("methods/rd4ad.yaml", "  demo:\n", "  dmeo:\n"),
     "params/methods/rd4ad.yaml: protocol_overrides: unknown protocol 'dmeo' "
     "(did you mean 'demo'?)"),
    (("protocols.yaml", "\ndefault: demo", "\ndefualt: demo"),
     "params/protocols.yaml: defualt: unknown key (did you mean 'default'?)"),
    (("grid.yaml", "table_order: [table1,", "table_order: [tabel1,"),
     "params/grid.yaml: table_order: unknown table 'tabel1' (did you mean 'table1'?)"),
])
def test_a_misspelt_reference_is_named_with_the_nearest_name(
        edit: tuple[str, str, str], line: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    name, good, bad = edit
    params = tmp_path / "params"
    shutil.copytree(REPO / "params", params)
    text = (params / name).read_text()
    assert text.count(good) == 1, good
    (params / name).write_text(text.replace(good, bad))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParamsError) as err:
        load_params(params)
    assert str(err.value) == line


def test_explain_finds_the_nearest_key_in_a_nested_block() -> None:
    block = {"lr": 1e-3, "adaptor": {"lr": 1e-4, "weight_deacy": 0.01}}
    with pytest.raises(ValidationError) as err:
        OptimConfig.model_validate(block)
    assert explain(err.value, "x.yaml", OptimConfig, "optim") == (
        "x.yaml: optim.adaptor.weight_deacy: unknown key (did you mean 'weight_decay'?)")
    with pytest.raises(ValidationError) as err:  # no close key: no guess
        OptimConfig.model_validate({"lr": 1e-3, "zzz": 1})
    assert explain(err.value, "x.yaml", OptimConfig) == "x.yaml: zzz: unknown key"


def test_a_union_value_fails_once_at_its_key() -> None:
    from omniad.grid import Protocol

    block = {"datasets": ["demo"], "ablation_dataset": "demo", "image_size": 64,
             "epochs": {"demo": 2}, "workers": "autox"}
    with pytest.raises(ValidationError) as err:
        Protocol.model_validate(block)
    assert explain(err.value, "p.yaml", Protocol, "protocols.demo") == (
        "p.yaml: protocols.demo.workers: Input should be a valid integer, unable to parse string "
        "as an integer or Input should be 'auto' (got 'autox')")


@pytest.mark.parametrize("block, fault", [
    ({"lr": 0.0}, "lr"),
    ({"lr": 1e-3, "betas": [0.9, 1.5]}, "betas"),
    ({"lr": 1e-3, "name": "lamb"}, "name"),
    ({"lr": 1e-3, "schedule": {"name": "constant", "at": 0.5}}, "'at' and 'gamma'"),
    ({"lr": 1e-3, "schedule": {"name": "cosine"}}, "schedule.name"),
    ({"lr": 1e-3, "clip_grad": -1.0}, "clip_grad"),
])
def test_optim_values_are_checked(block: dict, fault: str) -> None:
    with pytest.raises(ValidationError, match=fault.split(".")[-1]):
        OptimConfig.model_validate(block)


# --------------------------------------------------------------------------------------------
# resolve_run: a typed, frozen run config; the recorded dict and its hash as before.
# --------------------------------------------------------------------------------------------
# The dict one demo run records and hashes, as resolve_run returned it when it was a plain dict
# (commit 151d58b), with the two code fingerprints left out (they follow the source), and the
# one params change since: the demo trains RD4AD 2 epochs, not 4 (hash 037fe9979d6fdc43 then).
PINNED_RD4AD = {
    "run": "demo/demo/rd4ad/default/42", "protocol": "demo", "dataset": "demo",
    "method": "rd4ad", "builder": "omniad.models.baselines.rd4ad:RD4AD",
    "variant": "default", "seed": 42,
    "model": {"backbone": "wide_resnet50_2", "pretrained": False, "form": "ader",
              "map_sigma": 1.0},
    "image_size": 64, "encoder_bn": "train", "epochs": 2, "evaluate_every": 2,
    "batch_size": 16, "eval_batch_size": 16, "checkpoint_every": 2, "feature_cache": "float32",
    "gpu_options": {"bf16": False, "channels_last": False, "compile": False},
    "workers": 0,
    "optim": {"name": "adam", "lr": 0.005, "lr_batch": 16, "betas": [0.5, 0.999], "eps": 1e-08,
              "weight_decay": 0.0, "no_decay_1d": False, "clip_grad": 5.0,
              "schedule": {"name": "step", "at": 0.8, "gamma": 0.1}},
    "categories": ["brick", "gravel", "coffee", "coins"],
}
# config_hash of PINNED_RD4AD with code = "c" * 16 and periodic_eval_code = "e" * 16
PINNED_HASH = "51e1cb891ca418ab"


def test_the_config_hash_of_a_demo_run_is_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    from omniad import codehash

    monkeypatch.delenv("OMNIAD_PARAMS", raising=False)
    load_params.cache_clear()
    cfg = resolve_run(load_params(), Run(protocol="demo", dataset="demo", method="rd4ad",
                                         variant="default", seed=42))
    with pytest.raises(ValidationError):  # frozen
        cfg.epochs = 5
    recorded = cfg.as_dict()
    builder = PINNED_RD4AD["builder"]
    assert recorded["code"] == codehash.train_code(builder)
    assert recorded["periodic_eval_code"] == codehash.evaluate_code(builder)
    # the same keys in the same order (config.json and metrics.json are written unsorted)
    order = [*PINNED_RD4AD][:5] + ["builder", "code"] + [*PINNED_RD4AD][5:]
    assert [k for k in recorded if k != "periodic_eval_code"] == [
        k for k in dict.fromkeys(order) if k != "periodic_eval_code"]
    assert json.dumps({k: v for k, v in recorded.items()
                       if k not in ("code", "periodic_eval_code")}, sort_keys=True) == \
        json.dumps(PINNED_RD4AD, sort_keys=True)
    # the hash: sha256 of the sorted JSON, 16 hex digits, from the recorded dict
    digest = hashlib.sha256(json.dumps(recorded, sort_keys=True).encode()).hexdigest()[:16]
    assert config_hash(cfg) == config_hash(recorded) == digest
    fixed = cfg.model_copy(update={"code": "c" * 16, "periodic_eval_code": "e" * 16})
    assert config_hash(fixed) == PINNED_HASH


# --------------------------------------------------------------------------------------------
# engine/optim.py: groups, the lr step, lr scaling, every method's configure path.
# --------------------------------------------------------------------------------------------
def test_no_decay_groups_exempt_1d_and_biases_but_decay_omniads_4d_pe(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from omniad.models.omniad import OmniAD

    monkeypatch.delenv("OMNIAD_PARAMS", raising=False)
    load_params.cache_clear()
    optim = load_params().methods["omniad"].optim
    model = OmniAD(pretrained=False, depths=[1, 1, 1, 1])
    opt = build_optimizer(model, optim)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    exempt = {id(p) for n, p in trainable if p.ndim <= 1 or n.endswith(".bias")}
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 1e-4]
    assert {id(p) for p in opt.param_groups[0]["params"]} == exempt
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(p) for _, p in trainable} - exempt
    # parameters in named_parameters order within each group (optimizer state order)
    assert [id(p) for p in opt.param_groups[1]["params"]] == [
        id(p) for _, p in trainable if id(p) not in exempt]
    pes = [p for n, p in trainable if n.endswith(".pe")]
    assert pes and all(p.ndim == 4 for p in pes)
    assert all(id(p) not in exempt for p in pes)  # released: pe1 / pe2 decayed
    assert isinstance(opt, torch.optim.AdamW)
    assert all(g["lr"] == 1e-3 and g["betas"] == (0.9, 0.999) and g["eps"] == 1e-8
               for g in opt.param_groups)
    # without no_decay_1d every parameter is decayed
    groups = param_groups(model, 0.5, False)
    assert groups[0]["params"] == [] and len(groups[1]["params"]) == len(trainable)


@pytest.mark.parametrize("total, milestone", [(10, 8), (7, 5), (1, 1)])
def test_the_lr_steps_by_gamma_at_the_at_fraction_of_iterations(total: int, milestone: int) -> None:
    cfg = OptimConfig(lr=1e-3, schedule={"name": "step", "at": 0.8, "gamma": 0.1})
    opt = build_optimizer(torch.nn.Linear(2, 2), cfg)
    sched = build_scheduler(opt, cfg, total)
    lrs = []
    for _ in range(total + 1):
        lrs.append(opt.param_groups[0]["lr"])  # the lr iteration i trains with
        opt.step()
        sched.step()
    assert lrs == [1e-3] * milestone + [1e-3 * 0.1] * (total + 1 - milestone)
    constant = OptimConfig(lr=1e-3)
    opt = build_optimizer(torch.nn.Linear(2, 2), constant)
    sched = build_scheduler(opt, constant, 5)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == 1e-3


def test_lr_scales_by_batch_over_lr_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = tmp_path / "params"
    shutil.copytree(REPO / "params", params)
    protos = yaml.safe_load((params / "protocols.yaml").read_text())
    protos["protocols"]["demo"]["methods"]["omniad"] = {"batch_size": 8}
    (params / "protocols.yaml").write_text(yaml.safe_dump(protos, sort_keys=False))
    monkeypatch.setenv("OMNIAD_PARAMS", str(params))
    load_params.cache_clear()
    p = load_params()
    assert p.methods["omniad"].optim.lr == 1e-3 and p.methods["omniad"].optim.lr_batch == 16
    cfg = resolve_run(p, Run(protocol="demo", dataset="demo", method="omniad", variant="default",
                             seed=42))
    assert cfg.batch_size == 8 and cfg.optim.lr == 5e-4  # lr / 2
    opt = build_optimizer(torch.nn.Linear(2, 2), cfg.optim)
    assert [g["lr"] for g in opt.param_groups] == [5e-4, 5e-4]
    # no lr_batch: the lr is taken as it is, whatever the batch
    rlr = resolve_run(p, Run(protocol="demo", dataset="demo", method="rlr", variant="default",
                             seed=42))
    assert rlr.optim.lr_batch is None and rlr.optim.lr == p.methods["rlr"].optim.lr
    load_params.cache_clear()


def test_build_optimizer_matches_the_dict_it_replaced() -> None:
    """The same optimizer as the untyped reader built (its rules spelled out here)."""
    block = {"name": "sgd", "lr": 0.4, "momentum": 0.9, "weight_decay": 1e-4, "no_decay_1d": True}
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    ours = build_optimizer(net, block)  # a plain dict (a method's own block) is validated too
    ref = torch.optim.SGD([{"params": [net[0].bias, net[1].weight, net[1].bias], "weight_decay": 0.0},
                           {"params": [net[0].weight], "weight_decay": 1e-4}], lr=0.4, momentum=0.9)
    assert ours.state_dict() == ref.state_dict()
    assert [[id(p) for p in g["params"]] for g in ours.param_groups] == \
        [[id(p) for p in g["params"]] for g in ref.param_groups]
    with pytest.raises(ValidationError, match="weight_deacy"):
        build_optimizer(net, {"lr": 1e-3, "weight_deacy": 1e-4})


def test_every_implemented_method_configures_its_optimizers(monkeypatch: pytest.MonkeyPatch) -> None:
    from omniad.engine import optim as optim_builders
    from omniad.methods import create_method

    monkeypatch.delenv("OMNIAD_PARAMS", raising=False)
    load_params.cache_clear()
    params = load_params()
    assert len(params.implemented()) == 7
    for method in params.implemented():
        cfg = resolve_run(params, Run(protocol="demo", dataset="demo", method=method,
                                      variant="default", seed=42))
        model = create_method(method, **cfg.model)
        opts, scheds = model.configure_optimizers(cfg.optim.to_dict(), 10, optim_builders)
        assert len(opts) == len(scheds) >= 1, method
        assert opts[0].param_groups[-1]["lr"] == cfg.optim.lr, method
        trained = {id(p) for p in model.parameters() if p.requires_grad}
        stepped = {id(p) for o in opts for g in o.param_groups for p in g["params"]}
        assert stepped == trained, method


# --------------------------------------------------------------------------------------------
# The command line as a Unix tool.
# --------------------------------------------------------------------------------------------
def _actions(parser: argparse.ArgumentParser, path: str) -> list[tuple[str, argparse.Action]]:
    assert parser.format_help().startswith("usage:")  # every help text formats (no stray %)
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                out.append((f"{path} {name}", argparse.Action([], name, help=helps.get(name))))
                out += _actions(sub, f"{path} {name}")
        else:
            out.append((f"{path} {action.dest}", action))
    return out


def test_every_subcommand_and_option_has_help() -> None:
    from omniad.cli import build_parser

    actions = _actions(build_parser(), "omniad")
    assert len(actions) > 60  # the walk reaches the data sub-commands' options
    missing = [path for path, a in actions if not (a.help or "").strip()]
    assert missing == []


def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    # the reader is gone before the first write: the write must fail, quietly
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "omniad.cli", "grid", "runs", "--protocol",
                             "paper"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    assert (proc.returncode, err.decode()) == (0, "")
    # and as a person types it
    out = subprocess.run(f"{sys.executable} -m omniad.cli grid runs --protocol paper | head -1",
                         shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert (out.returncode, out.stderr) == (0, "")
    assert out.stdout == "paper/mvtec_ad/rd4ad/default/42\n"
