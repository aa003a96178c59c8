"""Omni-AD: exact released counts, every switch trains, switch semantics hold."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from omniad.models.omniad import OmniAD, OmniADConfig, TokenAttention

# Official counts (fvcore on the released code, encoder included; DESIGN.md).
OFFICIAL_PARAMS_M = {
    "default": ({}, 29.927),
    "tokens16": ({"tokens": 16}, 29.383),
    "tokens36": ({"tokens": 36}, 29.610),
    "tokens100": ({"tokens": 100}, 30.335),
    "d2222": ({"depths": (2, 2, 2, 2)}, 19.018),
    "d3663": ({"depths": (3, 6, 6, 3)}, 26.525),
    "d6-12-11-9": ({"depths": (6, 12, 11, 9)}, 42.696),
    "resnet18": ({"backbone": "resnet18"}, 24.539),
}


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("key", list(OFFICIAL_PARAMS_M))
def test_official_parameter_counts(key: str) -> None:
    overrides, expected = OFFICIAL_PARAMS_M[key]
    model = OmniAD(pretrained=False, **overrides)
    assert abs(n_params(model) / 1e6 - expected) < 5e-4


def test_default_is_exactly_29_927m_and_released_flops() -> None:
    from omniad.complexity import count_flops

    model = OmniAD(pretrained=False)
    assert n_params(model) == 29_926_912
    assert abs(count_flops(model, 256) / 1e9 - 11.157) < 5e-4


SWITCHES = (
    [{"branches": b} for b in ("global", "local")]
    + [{"attention": a} for a in itertools.product(("self", "q", "kv"), repeat=2)]
    + [{"ffn": f} for f in ("learned", "none")]
    + [{"tokens": 16}, {"depths": (1, 1, 1, 1)}, {"backbone": "resnet18"}]
)


@pytest.mark.parametrize("overrides", SWITCHES, ids=lambda o: "-".join(map(str, o.values())))
def test_every_switch_runs_forward_and_backward(overrides: dict) -> None:
    torch.manual_seed(0)
    depths = overrides.pop("depths", (1, 1, 1, 1))
    model = OmniAD(pretrained=False, depths=depths, **overrides).train()
    out = model.training_step(torch.randn(2, 3, 64, 64), 0)
    out["loss"].backward()
    grads = [p.grad for p in model.decoder.parameters() if p.requires_grad]
    assert torch.isfinite(out["loss"]) and any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in model.encoder.parameters())


def test_encoder_stays_frozen_in_eval_mode() -> None:
    model = OmniAD(pretrained=False, depths=(1, 1, 1, 1)).train()
    assert not model.encoder.body.training and model.decoder.training
    assert not any(p.requires_grad for p in model.encoder.parameters())


def test_branch_switches_drop_the_other_branch_parameters() -> None:
    glob = OmniAD(pretrained=False, branches="global")
    loc = OmniAD(pretrained=False, branches="local")
    assert not any("local_branch" in n for n, _ in glob.named_parameters())
    assert any("global_branch" in n for n, _ in glob.named_parameters())
    assert not any("global_branch" in n for n, _ in loc.named_parameters())
    assert any("local_branch" in n for n, _ in loc.named_parameters())


def _randomise_tokens(model: OmniAD) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".tokens") or name.endswith(".pe"):
                p.normal_()


def test_resampled_ffn_registers_nothing_and_is_random_once_tokens_move() -> None:
    torch.manual_seed(0)
    model = OmniAD(pretrained=False, depths=(1, 1, 1, 1)).eval()
    assert not any("ffn" in n for n, _ in model.named_parameters())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = model(x)[1][0], model(x)[1][0]
    _randomise_tokens(model)
    with torch.no_grad():
        c, d = model(x)[1][0], model(x)[1][0]
    assert (c - d).abs().max() > 1e-3  # moved tokens: each call's fresh FFN shows
    # zero tokens: every slot's output is constant over positions, which the block's
    # InstanceNorm removes, so the fresh FFN draws change nothing but rounding
    assert not torch.equal(a, b) and torch.allclose(a, b, atol=1e-5)
    learned = OmniAD(pretrained=False, depths=(1, 1, 1, 1), ffn="learned")
    assert n_params(learned) > n_params(model)


def test_learned_ffn_is_deterministic_under_a_seed() -> None:
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        model = OmniAD(pretrained=False, depths=(1, 1, 1, 1), ffn="learned").eval()
        _randomise_tokens(model)
        with torch.no_grad():
            outs.append(model(torch.ones(1, 3, 64, 64))[1])
    with torch.no_grad():
        again = model(torch.ones(1, 3, 64, 64))[1]
    for x, y, z in zip(outs[0], outs[1], again, strict=True):
        assert torch.equal(x, y) and torch.equal(y, z)


def _attention_by_hand(slot: TokenAttention, x: torch.Tensor, ffn: tuple | None) -> torch.Tensor:
    """One slot from the module docstring's formulas, with einsum on the slot's own weights.

    ``ffn``: None (``ffn: none``) or the (w1, b1, w2, b2) of the Linear-SiLU-Linear."""
    b, h, w, c = x.shape
    heads, d = slot.heads, c // slot.heads
    seq = x.reshape(b, h * w, c)
    tok = slot.tokens.expand(b, -1, -1) if slot.mode != "self" else None
    q_in = tok if slot.mode == "q" else seq
    kv_in = tok if slot.mode == "kv" else seq
    q = (q_in @ slot.q.weight.T + slot.q.bias).reshape(b, -1, heads, d)
    kv = kv_in @ slot.kv.weight.T + slot.kv.bias
    k, v = kv[..., :c].reshape(b, -1, heads, d), kv[..., c:].reshape(b, -1, heads, d)
    attn = torch.softmax(torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d), dim=-1)
    if slot.mode != "self":
        attn = attn + slot.pe  # added after the softmax, as released
    out = torch.einsum("bhij,bjhd->bihd", attn, v).reshape(b, -1, c)
    if ffn is not None:
        w1, b1, w2, b2 = ffn
        out = F.silu(out @ w1.T + b1) @ w2.T + b2
    if slot.mode == "q":
        t = math.isqrt(slot.n_tokens)
        grid = out.reshape(b, t, t, c)
        rows = torch.arange(h) * t // h  # nearest: source index floor(i * t / h)
        cols = torch.arange(w) * t // w
        return grid[:, rows][:, :, cols]
    return out.reshape(b, h, w, c)


def _learned(slot: TokenAttention) -> tuple:
    return (slot.ffn[0].weight, slot.ffn[0].bias, slot.ffn[2].weight, slot.ffn[2].bias)


@pytest.mark.parametrize("mode", ["q", "kv", "self"])
@pytest.mark.parametrize("ffn", ["learned", "resampled", "none"])
def test_attention_slot_equals_the_formulas_by_hand(mode: str, ffn: str) -> None:
    torch.manual_seed(0)
    slot = TokenAttention(32, 4, mode, 16, ffn).double()  # float64: differences are the code's
    with torch.no_grad():
        for p in slot.parameters():
            p.normal_(0, 0.5)  # tokens, pe and biases non-zero: every term shows
        x = torch.randn(2, 6, 6, 32, dtype=torch.float64)
        torch.manual_seed(7)
        got = slot(x)
        if ffn == "resampled":  # the released draw: fc1 then fc2, default init, same seed
            torch.manual_seed(7)
            fc1, fc2 = torch.nn.Linear(32, 32), torch.nn.Linear(32, 32)
            weights = tuple(t.double() for t in (fc1.weight, fc1.bias, fc2.weight, fc2.bias))
        else:
            weights = _learned(slot) if ffn == "learned" else None
        want = _attention_by_hand(slot, x, weights)
    assert got.shape == want.shape == x.shape
    assert torch.allclose(got, want, atol=1e-10, rtol=1e-10), (got - want).abs().max()


def _block_by_hand(block, x: torch.Tensor) -> torch.Tensor:
    """x + l2(SiLU(IN(l(global + local)))): global a1 = A1(x) + x, A2(a1) + a1 + x."""
    g = block.global_branch
    a1 = _attention_by_hand(g.attn1, x, _learned(g.attn1)) + x
    glob = _attention_by_hand(g.attn2, a1, _learned(g.attn2)) + a1 + x
    loc = block.local_branch(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    y = (glob + loc) @ block.l.weight.T + block.l.bias
    mu, var = y.mean(dim=(1, 2), keepdim=True), y.var(dim=(1, 2), unbiased=False, keepdim=True)
    y = (y - mu) / torch.sqrt(var + 1e-5)  # non-affine InstanceNorm over H, W
    return x + F.silu(y) @ block.l2.weight.T + block.l2.bias


def test_decoder_outputs_equal_the_blocks_by_hand_at_the_encoder_scales() -> None:
    torch.manual_seed(0)
    model = OmniAD(pretrained=False, depths=(1, 1, 1, 1), ffn="learned").eval().double()
    _randomise_tokens(model)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        ft, fs = model(x)
        feats = model.encoder(x)
        h = model.neck(feats).permute(0, 2, 3, 1)  # eval: jitter at scale 0 changes nothing
        want = []
        for i in range(4):
            if i:
                h = model.decoder.ups[i](h)
            h = _block_by_hand(model.decoder.stages[i][0], h)
            if i:
                want.insert(0, h.permute(0, 3, 1, 2))
    assert [t.shape[1] for t in ft] == [64, 128, 256]
    assert [t.shape for t in ft] == [s.shape for s in fs] == [w.shape for w in want]
    for t, f in zip(ft, feats, strict=True):
        assert torch.equal(t, f)
    for s, w in zip(fs, want, strict=True):
        assert torch.allclose(s, w, atol=1e-9, rtol=1e-9), (s - w).abs().max()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("tokens", 50, "perfect square"),
        ("depths", (3, 0, 9, 7), "positive"),
        ("branches", "neither", "both"),
        ("attention", ("q", "v"), "attention"),
        ("backbone", "vgg16", "resnet34"),
        ("ffn", "fresh", "resampled"),
    ],
)
def test_invalid_config_names_field_and_allowed_values(field: str, value, message: str) -> None:
    with pytest.raises(ValidationError) as err:
        OmniADConfig(**{field: value})
    text = str(err.value)
    assert field in text and message in text


def test_unknown_field_is_rejected() -> None:
    with pytest.raises(ValidationError, match="tokenz"):
        OmniADConfig(tokenz=64)


def test_missing_pretrained_weights_say_how_to_fetch(tmp_path, monkeypatch) -> None:
    from omniad.models.encoder import WeightsNotFoundError

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match="omniad weights fetch resnet34.bt_in1k"):
        OmniAD(depths=(1, 1, 1, 1))
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        OmniAD(depths=(1, 1, 1, 1), pretrained=str(tmp_path / "nope.pth"))


def test_local_weights_file_is_loaded(tmp_path) -> None:
    import timm

    ref = timm.create_model("resnet18", pretrained=False)
    torch.nn.init.constant_(ref.conv1.weight, 0.125)
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    model = OmniAD(backbone="resnet18", pretrained=str(path), depths=(1, 1, 1, 1))
    assert torch.all(model.encoder.body.conv1.weight == 0.125)


def test_weights_check_reports_missing_tags(tmp_path, monkeypatch, capsys) -> None:
    import huggingface_hub.constants as hc

    from omniad.cli import main

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    assert main(["weights", "check", "resnet34.bt_in1k"]) == 1
    assert "MISSING (omniad weights fetch resnet34.bt_in1k)" in capsys.readouterr().out


def test_weights_fetch_installs_into_the_cache_timm_reads(tmp_path, monkeypatch) -> None:
    """fetch() goes through huggingface_hub; here its download is a local file."""
    import huggingface_hub
    import timm

    import omniad.weights as weights

    ref = timm.create_model("resnet18", pretrained=False)
    torch.nn.init.constant_(ref.conv1.weight, 0.25)
    path = tmp_path / "model.safetensors"
    from safetensors.torch import save_file

    save_file(ref.state_dict(), str(path))
    seen = {}

    def fake_download(repo_id: str, filename: str) -> str:
        seen["repo"], seen["file"] = repo_id, filename
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert weights.fetch("resnet18.tv_in1k") == str(path)
    assert seen == {"repo": "timm/resnet18.tv_in1k", "file": "model.safetensors"}
