"""RD4AD, UniAD, RLR: official sizes, the attention masks, the interface, and learning on the demo set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from omniad.complexity import count_flops, count_params
from omniad.engine import optim as optim_builders
from omniad.models.baselines.rd4ad import RD4AD
from omniad.models.baselines.rlr import RLR, ReferenceLayer, mca_mask, nsa_mask
from omniad.models.baselines.uniad import UniAD, neighbour_mask


def n_trainable(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def clipped_window(h: int, w: int, k: int, r: int, c: int) -> set[int]:
    """Token indices of the k x k window around (r, c), clipped at the borders (reference)."""
    half = k // 2
    return {i * w + j for i in range(max(0, r - half), min(h, r + half + 1))
            for j in range(max(0, c - half), min(w, c + half + 1))}


# --------------------------------------------------------------------------------------------
# Official sizes (parameters: to 0.1M; FLOPs: fvcore at 1x3x256x256, within 1%).
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("form", "params_m", "flops_g"), [("ader", 80.6, 28.4), ("official", 117.1, 30.5)])
def test_rd4ad_official_sizes(form: str, params_m: float, flops_g: float) -> None:
    model = RD4AD(pretrained=False, form=form)
    assert abs(count_params(model) / 1e6 - params_m) < 0.05
    assert abs(count_flops(model) / 1e9 / flops_g - 1) < 0.01


def test_rd4ad_official_form_only_adds_the_wider_ocbe_and_the_unused_conv() -> None:
    ader, official = RD4AD(pretrained=False), RD4AD(pretrained=False, form="official")
    unused = sum(p.numel() for p in official.ocbe.unused.parameters())
    assert unused == 4096 * 2048 + 2 * 2048
    assert not hasattr(ader.ocbe, "unused")
    assert count_params(ader.teacher) == count_params(official.teacher)
    assert count_params(ader.student) == count_params(official.student)
    official.train().training_step(torch.randn(2, 3, 64, 64), 0)["loss"].backward()
    assert all(p.grad is None for p in official.ocbe.unused.parameters())


def test_uniad_official_sizes() -> None:
    model = UniAD(pretrained=False)
    assert abs(count_params(model) / 1e6 - 24.5) < 0.05
    assert abs(count_params(model.encoder) / 1e6 - 16.7) < 0.05
    assert abs(n_trainable(model) / 1e6 - 7.8) < 0.05
    assert abs(count_flops(model) / 1e9 / 3.36 - 1) < 0.01


def test_rlr_official_sizes() -> None:
    model = RLR(pretrained=False)
    assert abs(count_params(model) / 1e6 - 60.9) < 0.05
    assert abs(n_trainable(model) / 1e6 - 21.5) < 0.05
    assert [lvl.reference.shape for lvl in model.levels] == [(1, 1024, 72), (1, 256, 200)]
    assert abs(count_flops(model) / 1e9 / 13.9 - 1) < 0.01


# --------------------------------------------------------------------------------------------
# Interface: forward/backward and predict at 64 px on CPU.
# --------------------------------------------------------------------------------------------
SMALL = {
    "rd4ad": lambda: RD4AD(pretrained=False, map_sigma=1.0),
    "rd4ad-official": lambda: RD4AD(pretrained=False, form="official", map_sigma=1.0),
    "uniad": lambda: UniAD(pretrained=False, image_size=64),
    "uniad-resnet18": lambda: UniAD(pretrained=False, image_size=64, backbone="resnet18"),
    "rlr": lambda: RLR(pretrained=False, image_size=64, windows=(5, 3), map_sigma=1.0),
}


@pytest.mark.parametrize("name", list(SMALL))
def test_trains_and_predicts_at_64px(name: str) -> None:
    torch.manual_seed(0)
    model = SMALL[name]().train()
    frozen = model.teacher if name.startswith("rd4ad") else model.encoder
    loss = model.training_step(torch.randn(2, 3, 64, 64), 0)["loss"]
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert not frozen.body.training
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > 0.9 * len(grads)
    maps, scores = model.eval().predict(torch.randn(3, 3, 64, 64))
    assert maps.shape == (3, 64, 64) and maps.dtype == np.float32
    assert scores.shape == (3,) and np.isfinite(maps).all() and np.isfinite(scores).all()


def test_uniad_fuses_at_stride_16_only() -> None:
    assert sum(UniAD(pretrained=False, image_size=64, backbone="resnet18").encoder.channels) == 448
    with pytest.raises(ValueError, match="stride 16"):
        UniAD(pretrained=False, image_size=64, backbone="resnet18", out_indices=(1, 2))


def test_inputs_of_another_size_are_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="image_size"):
        UniAD(pretrained=False, image_size=64)(torch.randn(1, 3, 128, 128))
    with pytest.raises(ValueError, match="image_size"):
        RLR(pretrained=False, image_size=64, windows=(3, 3))(torch.randn(1, 3, 128, 128))


# --------------------------------------------------------------------------------------------
# UniAD: the neighbour mask.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("g", "k"), [(16, 9), (14, 7), (4, 3)])
def test_uniad_mask_hides_exactly_the_clipped_window(g: int, k: int) -> None:
    mask = neighbour_mask(g, g, k)
    assert mask.shape == (g * g, g * g) and mask.dtype == torch.bool
    for r, c in [(0, 0), (g // 2, g // 2), (g - 1, 1), (1, g - 2), (g - 1, g - 1)]:
        hidden = set(torch.nonzero(mask[r * g + c]).flatten().tolist())
        assert hidden == clipped_window(g, g, k, r, c)
    assert not mask.all(dim=1).any()  # every query keeps some key


def test_uniad_window_and_pool_follow_ader_rule_and_reject_bad_sizes() -> None:
    assert [UniAD.config_class(image_size=s).window_size for s in (256, 224, 64)] == [9, 7, 3]
    assert [UniAD.config_class(image_size=s).pool_size for s in (256, 64)] == [16, 4]
    model = UniAD(pretrained=False, image_size=64)
    assert torch.equal(model.transformer.mask, neighbour_mask(4, 4, 3))
    for bad in ({"window": 4}, {"window": 16}, {"image_size": 100}):
        with pytest.raises(ValidationError):
            UniAD.config_class(**bad)


def test_uniad_attention_ignores_the_hidden_keys() -> None:
    """Perturbing a token inside query i's window leaves i's attention output unchanged."""
    torch.manual_seed(0)
    model = UniAD(pretrained=False, image_size=128, dropout=0.0).eval()  # 8x8 grid, 5x5 window
    layer, pos, mask = model.transformer.encoder[0], model.transformer.pos()[None], model.transformer.mask
    g, i = 8, 3 * 8 + 3
    src = torch.randn(1, g * g, 256)

    def attn(s: torch.Tensor) -> torch.Tensor:
        return layer.attn(s + pos, s + pos, s, attn_mask=mask)[0][0, i]

    inside, outside = src.clone(), src.clone()
    inside[0, 5 * 8 + 5] += 10.0  # (5, 5): within 2 cells of (3, 3)
    outside[0, 7 * 8 + 7] += 10.0
    with torch.no_grad():
        assert torch.allclose(attn(inside), attn(src), atol=1e-5)
        assert not torch.allclose(attn(outside), attn(src), atol=1e-3)


# --------------------------------------------------------------------------------------------
# RLR: what MCA and NSA see.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("g", "k"), [(16, 5), (32, 7), (4, 3)])
def test_rlr_masks_split_keys_into_window_and_rest(g: int, k: int) -> None:
    mca, nsa = mca_mask(g, g, k), nsa_mask(g, g, k)
    assert torch.equal(mca, ~nsa)
    everything = set(range(g * g))
    for r, c in [(0, 0), (g // 2, g // 3), (g - 1, g - 1), (0, g - 1)]:
        window = clipped_window(g, g, k, r, c)
        assert set(torch.nonzero(~mca[r * g + c]).flatten().tolist()) == window  # MCA sees the window
        assert set(torch.nonzero(~nsa[r * g + c]).flatten().tolist()) == everything - window
    assert not mca.all(dim=1).any() and not nsa.all(dim=1).any()


def test_rlr_official_windows_and_validation() -> None:
    cfg = RLR.config_class()
    assert (cfg.grids, cfg.widths, cfg.window_sizes) == ([32, 16], [256, 512], [7, 5])
    for bad in ({"image_size": 64}, {"image_size": 64, "windows": (3,)},
                {"image_size": 64, "windows": (8, 3)}, {"image_size": 64, "windows": (3, 5)}):
        with pytest.raises(ValidationError):
            RLR.config_class(**bad)


def test_rlr_attentions_see_exactly_their_keys() -> None:
    """Perturbing a key/value a query must not see leaves its output unchanged; others change it."""
    torch.manual_seed(0)
    g, k, d = 8, 3, 32
    layer = ReferenceLayer(d, heads=4, ffn_dim=4 * d).eval()
    mca, nsa = mca_mask(g, g, k), nsa_mask(g, g, k)
    x, ref = torch.randn(1, g * g, d), torch.randn(1, g * g, d)
    i, near, far = 3 * g + 3, 4 * g + 2, 7 * g + 6  # near is in i's 3x3 window, far is not

    def outs(x_: torch.Tensor, ref_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            a, b = layer.attend(x_, ref_, mca, nsa)
        return a[0, i], b[0, i]

    def bump(t: torch.Tensor, j: int) -> torch.Tensor:
        t = t.clone()
        t[0, j] += 5.0
        return t

    base_mca, base_nsa = outs(x, ref)
    # MCA (k = v = reference): a reference token outside the window is invisible to it ...
    mca_far, nsa_far = outs(x, bump(ref, far))
    assert torch.allclose(mca_far, base_mca, atol=1e-5)
    assert not torch.allclose(nsa_far, base_nsa, atol=1e-3)  # ... but NSA uses it as a key
    mca_near, _ = outs(x, bump(ref, near))
    assert not torch.allclose(mca_near, base_mca, atol=1e-3)
    # NSA (k = reference, v = x): a neighbour's value and key are invisible to it
    _, nsa_near_v = outs(bump(x, near), ref)
    _, nsa_near_k = outs(x, bump(ref, near))
    assert torch.allclose(nsa_near_v, base_nsa, atol=1e-5)
    assert torch.allclose(nsa_near_k, base_nsa, atol=1e-5)
    _, nsa_far_v = outs(bump(x, far), ref)
    assert not torch.allclose(nsa_far_v, base_nsa, atol=1e-3)


def test_rlr_layer_has_no_residual_from_its_input() -> None:
    """x = LN(2 MCA + NSA): with both attentions zeroed the first norm sees zeros only."""
    layer = ReferenceLayer(16, heads=2, ffn_dim=64).eval()
    for attn in (layer.mca, layer.nsa):
        torch.nn.init.zeros_(attn.out_proj.weight)
        torch.nn.init.zeros_(attn.out_proj.bias)
    x = torch.randn(1, 16, 16)
    mca, nsa = mca_mask(4, 4, 3), nsa_mask(4, 4, 3)
    with torch.no_grad():
        a = layer(x, torch.randn(1, 16, 16), mca, nsa)
        b = layer(10 * torch.randn(1, 16, 16), torch.randn(1, 16, 16), mca, nsa)
    assert torch.allclose(a, b)


# --------------------------------------------------------------------------------------------
# params/: every method resolves for the demo protocol and builds from its own file.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["rd4ad", "uniad", "rlr"])
def test_params_file_builds_the_demo_model(method: str) -> None:
    from omniad.grid import Run, load_params, resolve_run
    from omniad.methods import create_method

    params = load_params()
    cfg = resolve_run(params, Run(protocol="demo", dataset="demo", method=method,
                                  variant="default", seed=42))
    model = create_method(method, **cfg.model).eval()
    size = cfg.image_size
    maps, scores = model.predict(torch.randn(2, 3, size, size))
    assert maps.shape == (2, size, size) and scores.shape == (2,)
    opts, scheds = model.configure_optimizers(cfg.optim.to_dict(), 10, optim_builders)
    assert len(opts) == len(scheds) == 1
    assert all(p.requires_grad for g in opts[0].param_groups for p in g["params"])


# Learning: RD4AD, UniAD and RLR beat chance in the demo DAG itself (tests/test_demo_dag.py).
