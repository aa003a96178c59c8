"""Pin TODAY's numbers of every implemented method, so refactors can prove they change none.

This file records what the code computes now, not what is right: each entry of
``models.json`` is one method built as the demo builds it (demo overrides, ``pretrained:
False``, seed 0), fingerprinted by its sorted state_dict keys with a float64 sum per tensor
(parameter init and RNG order), one ``training_step`` loss, one optimisation step through the
method's own ``configure_optimizers`` / ``optimization_step`` and the loss after it, and the
float64 sums of ``predict``'s maps and scores. CPU float code with one thread is deterministic,
so ``tests/test_models_golden.py`` compares with ``==``. Regenerate ONLY for an intended
numeric change (and say so in the commit):

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python tests/golden/make_models_golden.py
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from omniad.engine import optim as optim_builders

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
GOLDEN = HERE / "models.json"
SIZE, BATCH = 64, 2


def method_specs() -> dict[str, dict[str, Any]]:
    """Implemented methods straight from params/methods (read with yaml: independent of grid)."""
    specs = {}
    for f in sorted((REPO / "params" / "methods").glob("*.yaml")):
        spec = yaml.safe_load(f.read_text())
        if spec.get("status") == "implemented":
            specs[f.stem] = spec
    return specs


def _sum(t: torch.Tensor) -> float:
    return t.detach().double().sum().item()


def fingerprint(spec: dict[str, Any]) -> dict[str, Any]:
    """The numbers one method computes today (see the module docstring)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        module, _, attr = spec["builder"].partition(":")
        cls = getattr(importlib.import_module(module), attr)
        model_cfg = {**spec.get("model", {}), **spec.get("protocol_overrides", {}).get("demo", {}),
                     "pretrained": False}
        torch.manual_seed(0)
        model = cls(**model_cfg)
        state = model.state_dict()
        out: dict[str, Any] = {"state": {k: _sum(v) for k, v in sorted(state.items())}}
        gen = torch.Generator().manual_seed(1)
        images = torch.randn(BATCH, 3, SIZE, SIZE, generator=gen)
        model.train()
        optim = dict(spec["optim"])
        opts, scheds = model.configure_optimizers(optim, 10, optim_builders)  # DeSTSeg: fixes its phase split
        torch.manual_seed(2)
        out["loss0"] = _sum(model.training_step(images, 0)["loss"])
        torch.manual_seed(3)
        terms = model.optimization_step(images, 0, opts, optim.get("clip_grad"),
                                        contextlib.nullcontext)
        out["step0_loss"] = _sum(terms["loss"])
        for s in scheds:
            s.step()
        torch.manual_seed(4)
        out["loss1"] = _sum(model.training_step(images, 1)["loss"])
        out["after_step"] = sum(_sum(p) for p in model.parameters())
        model.eval()
        torch.manual_seed(5)
        maps, scores = model.predict(images)
        out["maps"] = float(maps.astype("float64").sum())
        out["scores"] = float(scores.astype("float64").sum())
        out["maps_shape"] = list(maps.shape)
        return out
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    names = sys.argv[1:] or list(method_specs())
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    specs = method_specs()
    for name in names:
        golden[name] = fingerprint(specs[name])
        print(name, golden[name]["loss0"], golden[name]["loss1"], golden[name]["maps"])
    GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
