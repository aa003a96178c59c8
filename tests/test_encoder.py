"""Frozen encoders: offline weight resolution and the random encoders' BatchNorm calibration."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from omniad.models.encoder import (
    FrozenEncoder,
    WeightsNotFoundError,
    calibrate_random_backbones,
    resolve_weights,
)


def _batches(n: int, size: int = 64, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(4, 3, size, size, generator=g) * 2 - 1 for _ in range(n)]


def test_calibrated_statistics_are_the_exact_moments_of_each_layer_input() -> None:
    torch.manual_seed(0)
    enc = FrozenEncoder("resnet18", (1, 2, 3), pretrained=False)
    x = _batches(1, seed=2)[0]
    assert calibrate_random_backbones(enc, x) == 1
    assert enc.body.bn1.momentum == 0.1 and not enc.body.training  # restored
    b = enc.body
    with torch.no_grad():  # independent reference: layer inputs recomputed in eval mode
        c1 = b.conv1(x)
        first = b.layer1[0].conv1(b.maxpool(b.act1(b.bn1(c1))))
    # (to 1e-3: training mode normalises by the biased variance, eval mode by the stored
    # unbiased one, a factor 1 + 1/4095 here, which reaches the second layer's input)
    for bn, inp in ((b.bn1, c1), (b.layer1[0].bn1, first)):
        assert torch.allclose(bn.running_mean, inp.mean((0, 2, 3)), rtol=1e-3, atol=1e-4)
        assert torch.allclose(bn.running_var, inp.var((0, 2, 3), unbiased=True), rtol=1e-3)
    # hence every normalised channel has mean 0 and variance 1 over the images, in eval mode
    out = b.bn1(c1)
    assert out.mean((0, 2, 3)).abs().max() < 1e-4 and (out.var((0, 2, 3)) - 1).abs().max() < 1e-3


def test_calibration_keeps_a_random_efficientnet_deep_stages_alive() -> None:
    torch.manual_seed(0)
    enc = FrozenEncoder("tf_efficientnet_b4", (1, 2, 3), pretrained=False)
    x = _batches(1, seed=1)[0]
    before = [float(f.pow(2).mean().sqrt()) for f in enc(x)]
    calibrate_random_backbones(enc, torch.cat(_batches(4)))
    after = [float(f.pow(2).mean().sqrt()) for f in enc(x)]
    assert before[-1] < 0.05  # init statistics: the deepest stage fades out
    assert all(0.3 < a < 10.0 for a in after), after  # every stage at unit-ish scale


def test_calibration_draws_no_random_numbers_and_leaves_pretrained_backbones_alone() -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": FrozenEncoder("resnet18", (1, 2), pretrained=False),
                           "b": FrozenEncoder("resnet18", (1, 2), pretrained=False)})
    model["b"].pretrained = "resnet18.tv_in1k"  # stands for loaded weights
    frozen = {k: v.clone() for k, v in model["b"].state_dict().items()}
    rng = torch.get_rng_state()
    assert calibrate_random_backbones(model, _batches(1)[0]) == 1
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(frozen[k], v) for k, v in model["b"].state_dict().items())
    assert not torch.equal(model["a"].body.bn1.running_mean, torch.zeros(64))


def test_training_mode_never_reaches_the_frozen_body() -> None:
    enc = FrozenEncoder("resnet18", (1,), pretrained=False)
    nn.Sequential(enc).train()
    assert not enc.body.training and not any(p.requires_grad for p in enc.parameters())


def test_missing_weights_name_the_tag_and_the_way_to_get_them(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("omniad.models.encoder._cached_hub_file", lambda _hub: None)
    with pytest.raises(WeightsNotFoundError, match="resnet18.tv_in1k.*omniad weights fetch"):
        resolve_weights("resnet18", True)
    with pytest.raises(ValueError, match="does not belong to backbone"):
        resolve_weights("resnet18", "resnet34.bt_in1k")
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        resolve_weights("resnet18", str(tmp_path / "none.safetensors"))
