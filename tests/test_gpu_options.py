"""GPU options (bf16 autocast, channels_last, torch.compile), checked for correctness on CPU.

They pay on CUDA (benchmarks/train_throughput.py); here each must leave the loss where the
released fp32 loop puts it: equal where the math is unchanged, within bf16 rounding for bf16.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from omniad.engine.runtime import Runtime


def _tiny_omniad() -> torch.nn.Module:
    from omniad.models.omniad import OmniAD

    torch.manual_seed(0)
    model = OmniAD(depths=[1, 1, 1, 1], pretrained=False)
    model.train()
    return model


def _step(model: torch.nn.Module, rt: Runtime, images: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(1)  # jitter and the released per-forward FFNs draw from it
    with rt.autocast():
        return model.training_step(images, 0)["loss"]


IMAGES = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(3))
CPU = torch.device("cpu")


def test_bf16_autocast_on_cpu_stays_within_bf16_rounding() -> None:
    ref = _step(_tiny_omniad(), Runtime(CPU, 0), IMAGES)
    loss = _step(_tiny_omniad(), Runtime(CPU, 0, bf16=True), IMAGES)
    assert loss.dtype == torch.float32  # mse_loss autocasts to fp32
    assert not torch.equal(loss, ref)  # it did run in bf16 ...
    torch.testing.assert_close(loss, ref, rtol=3e-2, atol=0)  # ... bf16 keeps 8 bits


def test_channels_last_gives_the_same_loss_and_gradients() -> None:
    ref_model, model = _tiny_omniad(), _tiny_omniad()
    ref = _step(ref_model, Runtime(CPU, 0), IMAGES)
    model.to(memory_format=torch.channels_last)
    loss = _step(model, Runtime(CPU, 0, channels_last=True),
                 IMAGES.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)  # other conv kernels' rounding
    ref.backward()
    loss.backward()
    for (name, a), b in zip(ref_model.named_parameters(), model.parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-6, msg=name)


@pytest.mark.slow
def test_compile_aot_eager_gives_the_same_loss() -> None:
    """aot_eager traces fwd+bwd as torch.compile does, without a C++ toolchain: same math."""
    ref_model, model = _tiny_omniad(), _tiny_omniad()
    ref = _step(ref_model, Runtime(CPU, 0), IMAGES)
    rt = Runtime(CPU, 0, compile="aot_eager")
    rt.compile_modules(model)
    loss = _step(model, rt, IMAGES)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    assert model.state_dict().keys() == ref_model.state_dict().keys()  # checkpoints unchanged
    ref.backward()
    loss.backward()
    grads = [(a.grad, b.grad) for a, b in zip(ref_model.parameters(), model.parameters(),
                                              strict=True) if a.grad is not None]
    assert grads and all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in grads)


@pytest.mark.slow
def test_compile_inductor_works_on_this_machine() -> None:
    """Inductor needs a C++ compiler on CPU: a small trained module through compile_modules."""

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GELU(),
                                            torch.nn.Conv2d(8, 4, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(x)

    torch.manual_seed(0)
    eager, compiled = Tiny(), Tiny()
    compiled.load_state_dict(eager.state_dict())
    Runtime(CPU, 0, compile="inductor").compile_modules(compiled)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_protocol_options_reach_the_training_loop(tiny_env, tmp_path) -> None:
    """bf16 + channels_last + compile (aot_eager) set in params/ train a run end to end,
    recorded in its config (hence its hash) and its runtime description."""
    from omniad.engine.runner import evaluate_run, train_run
    from omniad.grid import load_params

    path = Path(tiny_env["OMNIAD_PARAMS"]) / "protocols.yaml"
    protos = yaml.safe_load(path.read_text())
    protos["protocols"]["tiny"].update(epochs={"demo": 1}, bf16=True, channels_last=True,
                                       compile=True, compile_backend="aot_eager",
                                       feature_cache="float32")
    path.write_text(yaml.safe_dump(protos, sort_keys=False))
    load_params.cache_clear()
    from omniad.engine.features import build_features
    from omniad.grid import parse_run_key, resolve_run

    key = "tiny/demo/omniad/default/42"
    build_features(resolve_run(load_params(), parse_run_key(key)), "cpu", log=lambda *_: None)
    run_dir = train_run(key, device="cpu")
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["gpu_options"] == {"bf16": True, "channels_last": True, "compile": "aot_eager"}
    train = json.loads((run_dir / "train.json").read_text())
    assert train["final_loss"] == train["final_loss"]  # trained, not NaN
    out = evaluate_run(key, device="cpu", track=False)
    assert out["meta"]["runtime"]["bf16"] and out["meta"]["runtime"]["compile"] == "aot_eager"
    assert 0.0 <= out["mean"]["image_auroc"] <= 1.0
