"""README "Add a method", followed to the letter: its model file and yaml, written into a
temporary package and params folder, give a method the factory builds and the engine trains."""

from __future__ import annotations

import contextlib
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from omniad.engine import optim as optim_builders
from omniad.grid import load_params
from omniad.methods import create_method, list_methods, method_class

REPO = Path(__file__).resolve().parent.parent


def readme_blocks() -> tuple[str, str]:
    """The section's python and yaml blocks, as a newcomer would copy them."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Add a method\n", 1)[1].split("\n## ", 1)[0]
    python = re.findall(r"```python\n(.*?)```", section, re.S)
    yml = re.findall(r"```yaml\n(.*?)```", section, re.S)
    assert len(python) == 1 and len(yml) == 1
    return python[0], yml[0]


@pytest.fixture
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The README's toy method in package ``toypkg`` (temp, on sys.path) and temp params."""
    code, spec = readme_blocks()
    pkg = tmp_path / "pkgs" / "toypkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "toy.py").write_text(code)
    params = tmp_path / "params"
    shutil.copytree(REPO / "params", params)
    spec = spec.replace("omniad.models.baselines.toy:Toy", "toypkg.toy:Toy")
    (params / "methods" / "toy.yaml").write_text(spec)
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    monkeypatch.setenv("OMNIAD_PARAMS", str(params))
    load_params.cache_clear()
    yield yaml.safe_load(spec)
    load_params.cache_clear()
    sys.modules.pop("toypkg.toy", None)
    sys.modules.pop("toypkg", None)


def test_the_toy_method_builds_and_trains_through_the_engine(toy) -> None:
    assert "toy" in list_methods()
    torch.manual_seed(0)
    model = create_method("toy", pretrained=False, **toy["protocol_overrides"]["demo"])
    assert type(model) is method_class("toy") and model.cfg.hidden == 8
    # the config class validates: a typo fails at build time, naming the key
    with pytest.raises(ValueError, match="hiddn"):
        create_method("toy", pretrained=False, hiddn=8)

    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    optimizers, schedulers = model.configure_optimizers(toy["optim"], 3, optim_builders)
    frozen = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    before = [p.detach().clone() for p in model.net.parameters()]
    model.train()
    losses = []
    for step in range(3):
        terms = model.optimization_step(images, step, optimizers, 5.0, contextlib.nullcontext)
        for s in schedulers:
            s.step()
        losses.append(float(terms["loss"]))
    with torch.no_grad():
        after = float(model.training_step(images, 3)["loss"])
    assert after < losses[0]  # three AdamW steps on the same batch lower the loss
    assert all(not torch.equal(a, b) for a, b in zip(before, model.net.parameters(), strict=True))
    assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in frozen.items())

    maps, scores = model.eval().predict(images)
    assert maps.shape == (4, 64, 64) and scores.shape == (4,)
    # the image score is the map's maximum, and the map is the error upsampled from 16x16
    assert (scores == maps.reshape(4, -1).max(axis=1)).all()
    with torch.no_grad():
        err = model.errors(images)
    assert torch.allclose(torch.from_numpy(maps[:, ::21, ::21]), err[:, ::5, ::5], atol=1e-6)


def test_the_factory_names_the_file_and_the_fault() -> None:
    from omniad.grid import ParamsError

    load_params.cache_clear()
    assert list_methods() == load_params().implemented()
    with pytest.raises(ParamsError, match=r"methods/diad\.yaml: method 'diad' is cited"):
        create_method("diad")
    with pytest.raises(ParamsError, match=r"no method 'nosuch' \(known: \[.*'omniad'"):
        method_class("nosuch")
