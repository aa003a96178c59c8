"""Feature cache: training from cached encoder features equals training from images."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from omniad.engine import PREEMPTED_EXIT

KEY = "tiny/demo/omniad/default/42"


def _set_protocol(env: dict[str, str], **fields: object) -> None:
    path = Path(env["OMNIAD_PARAMS"]) / "protocols.yaml"
    protos = yaml.safe_load(path.read_text())
    protos["protocols"]["tiny"].update(fields)
    path.write_text(yaml.safe_dump(protos, sort_keys=False))
    from omniad.grid import load_params

    load_params.cache_clear()


def _train(env: dict[str, str], results: Path, key: str = KEY) -> tuple[dict, list[dict]]:
    from omniad.engine.runner import train_run

    os.environ["OMNIAD_RESULTS"] = str(results)
    run_dir = train_run(key, device="cpu")
    model = torch.load(run_dir / "model.pt", weights_only=False)["model"]
    history = json.loads((run_dir / "history.json").read_text())["epochs"]
    return model, history


def _build(key: str = KEY) -> Path:
    from omniad.engine.features import build_features
    from omniad.grid import load_params, parse_run_key, resolve_run

    return build_features(resolve_run(load_params(), parse_run_key(key)), "cpu",
                          log=lambda *_: None)


@pytest.fixture
def two_epochs(tiny_env: dict[str, str]) -> dict[str, str]:
    _set_protocol(tiny_env, epochs={"demo": 2})
    return tiny_env


def test_cached_fp32_features_train_bit_identical_to_images(two_epochs, tmp_path) -> None:
    ref_model, ref_hist = _train(two_epochs, tmp_path / "images")
    _set_protocol(two_epochs, feature_cache="float32")
    folder = _build()
    meta = json.loads((folder / "features.json").read_text())
    assert meta["key"]["init_seed"] == 42 and meta["key"]["encoder_bn"] == "train"
    # the random encoder calibrated in the cache is the run's: same init, same statistics
    assert meta["init_fingerprint"] != meta["state_fingerprint"]
    model, hist = _train(two_epochs, tmp_path / "cached")
    assert hist == ref_hist and len(hist) == 2  # every epoch's mean loss, bit for bit
    assert model.keys() == ref_model.keys()
    diff = [k for k in model if not torch.equal(model[k], ref_model[k])]
    assert diff == []  # decoder, neck, and the encoder (loaded from the cache) alike


def test_cached_features_equal_the_models_encoder_output(two_epochs, tmp_path) -> None:
    """Rows of the cache are the run's encoder output on the training images, in order."""
    from omniad.data.cache import CachedDataset
    from omniad.engine.features import FeatureCache
    from omniad.engine.runner import build_model
    from omniad.grid import cache_dir, load_params, parse_run_key, resolve_run

    _set_protocol(two_epochs, feature_cache="float16")
    _build()
    cfg = resolve_run(load_params(), parse_run_key(KEY))
    ds = CachedDataset(cache_dir("demo", cfg.image_size), "train", cfg.categories)
    cache = FeatureCache(cfg, len(ds))
    model = build_model(cfg)
    cache.attach(model, fresh=True)
    idx = [0, 7, len(ds) - 1]
    want = model.encoder(torch.stack([ds[i]["image"] for i in idx]))
    got = [torch.stack([cache.dataset[i]["features"][s] for i in idx]) for s in range(3)]
    for w, g in zip(want, got, strict=True):
        assert g.dtype == torch.float32 and g.shape == w.shape
        # float16 storage: relative rounding 2^-11 of each value
        torch.testing.assert_close(g, w, rtol=2 ** -10, atol=1e-6)
        assert not torch.equal(g, w)


@pytest.mark.slow
def test_float16_cache_moves_the_loss_little(two_epochs, tmp_path) -> None:
    ref_model, ref_hist = _train(two_epochs, tmp_path / "images")
    _set_protocol(two_epochs, feature_cache="float16")
    _build()
    _, hist = _train(two_epochs, tmp_path / "fp16")
    rel = [abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(hist, ref_hist, strict=True)]
    assert 0 < max(rel) < 1e-2, rel


def test_resume_from_feature_cache_is_bit_identical(two_epochs, tmp_path, monkeypatch) -> None:
    from omniad.engine import progress

    _set_protocol(two_epochs, feature_cache="float32")
    _build()
    ref_model, ref_hist = _train(two_epochs, tmp_path / "ref")
    real = progress.Progress.update

    def interrupt(self, done: int, text: str = "") -> None:
        real(self, done, text)
        if done == 20:  # mid epoch 2 (128 training images, batch 8: 16 steps per epoch)
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(progress.Progress, "update", interrupt)
    with pytest.raises(SystemExit) as stop:
        _train(two_epochs, tmp_path / "resumed")
    assert stop.value.code == PREEMPTED_EXIT
    monkeypatch.setattr(progress.Progress, "update", real)
    model, hist = _train(two_epochs, tmp_path / "resumed")
    assert hist == ref_hist
    assert all(torch.equal(model[k], ref_model[k]) for k in ref_model)


def test_different_encoder_state_never_shares_features(two_epochs, tmp_path) -> None:
    from omniad.engine.features import FeatureCache, FeatureCacheError
    from omniad.engine.runner import build_model
    from omniad.grid import feature_key, features_dir, load_params, parse_run_key, resolve_run

    _set_protocol(two_epochs, feature_cache="float32")
    params = load_params()
    cfg = resolve_run(params, parse_run_key(KEY))
    key = feature_key(cfg)
    # another seed -> another random init -> another cache; calibration and precision too
    other_seed = cfg.model_copy(update={"seed": 7})
    assert features_dir(feature_key(other_seed)) != features_dir(key)
    assert features_dir(feature_key(cfg.model_copy(update={"encoder_bn": "init"}))) != features_dir(key)
    assert features_dir(feature_key(cfg.model_copy(update={"feature_cache": "float16"}))) != features_dir(key)
    # every Omni-AD variant (tokens, depths...) shares its encoder's features
    assert feature_key(cfg.model_copy(update={"model": {**cfg.model, "tokens": 16}})) == key
    # DeSTSeg's teacher also sees augmented images: it reads images
    assert feature_key(cfg.model_copy(
        update={"builder": "omniad.models.baselines.destseg:DeSTSeg"})) is None
    # a model whose encoder is not the cached one (other init) is refused, not fed
    _build()
    n = json.loads((features_dir(key) / "features.json").read_text())["images"]
    cache = FeatureCache(cfg, n)
    wrong = build_model(cfg.model_copy(update={"seed": 7}))
    with pytest.raises(FeatureCacheError, match="not the encoder these features came from"):
        cache.attach(wrong, fresh=True)


def test_fed_backbone_refuses_a_second_call() -> None:
    from omniad.models.encoder import FrozenEncoder

    enc = FrozenEncoder("resnet18", (1, 2, 3), pretrained=False)
    x = torch.zeros(2, 3, 32, 32)
    feats = enc(x)
    with enc.feed(feats):
        assert enc(torch.empty(2, 3, 32, 32, device="meta")) is not None
        with pytest.raises(RuntimeError, match="not cacheable"):
            enc(x)
    assert all(torch.equal(a, b) for a, b in zip(enc(x), feats, strict=True))


@pytest.mark.parametrize("method", ["mambaad", "rd4ad", "uniad", "rlr", "simplenet"])
def test_every_cacheable_method_steps_on_fed_features(method, tiny_env) -> None:
    """One training step from fed features equals one from images (loss and gradients)."""
    from omniad.engine.runner import build_model
    from omniad.grid import Run, load_params, resolve_run

    params = load_params()
    run = Run(protocol="demo", dataset="demo", method=method, variant="default", seed=42)
    cfg = resolve_run(params, run)
    size = cfg.image_size
    images = torch.randn(4, 3, size, size)
    losses, grads = [], []
    for fed in (False, True):
        model = build_model(cfg)
        model.train()
        bb = getattr(model, model.cached_backbone)
        torch.manual_seed(0)
        if fed:
            feats = bb(images)
            torch.manual_seed(0)
            with bb.feed(feats):
                loss = model.training_step(torch.empty_like(images, device="meta"), 0)["loss"]
        else:
            loss = model.training_step(images, 0)["loss"]
        loss.backward()
        losses.append(loss.detach())
        grads.append(np.concatenate([p.grad.flatten().numpy() for p in model.parameters()
                                     if p.grad is not None]))
    assert torch.equal(losses[0], losses[1])
    assert np.array_equal(grads[0], grads[1])
