"""Deep-network rules (LayerNorm, GroupNorm, attention) in float64: forward bit for bit, the hard gate is the exact
gradient, and agreement with the independent reference (tests/reference_deep.py) on small torchvision models
built with the same code paths as vit_b_16, swin_t, swin_v2_t, maxvit_t and convnext_tiny."""

import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.maxvit import MaxVit
from torchvision.models.swin_transformer import (
    ShiftedWindowAttentionV2,
    SwinTransformer,
    SwinTransformerBlockV2,
)
from torchvision.models.vision_transformer import VisionTransformer

from excitation_pullbacks import Gate, GateOptions, excitation, preset, pullback
from excitation_pullbacks.models import randomize_zero_heads
from excitation_pullbacks.rules import frozen_group_norm, frozen_layer_norm, soft_attention, soft_softmax

from reference_deep import reference_pullback

GEN = torch.Generator().manual_seed(0)


@pytest.fixture(autouse=True)
def float64():
    """Every tensor and model of these tests in float64 (restored afterwards: other tests run in float32)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def _rand(*shape):
    return torch.randn(*shape, generator=GEN)


def _grads(fn, *inputs, weight):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    return out, torch.autograd.grad((out * weight).sum(), inputs, allow_unused=True, materialize_grads=True)


def test_frozen_layer_norm():
    x, w, b = _rand(2, 5, 8), _rand(8), _rand(8)
    weight = _rand(2, 5, 8)
    out, (gx,) = _grads(lambda x: frozen_layer_norm(x, (8,), w, b, 1e-5), x, weight=weight)
    assert torch.equal(out, F.layer_norm(x, (8,), w, b, 1e-5))
    rstd = torch.rsqrt(x.var(-1, keepdim=True, unbiased=False) + 1e-5)
    torch.testing.assert_close(gx, weight * w * rstd, rtol=1e-12, atol=1e-12)
    # weight / bias gradients (training) are the affine map's own
    _, (gw, gb) = _grads(lambda w, b: frozen_layer_norm(x, (8,), w, b, 1e-5), w, b, weight=weight)
    _, (ew, eb) = _grads(lambda w, b: F.layer_norm(x, (8,), w, b, 1e-5), w, b, weight=weight)
    torch.testing.assert_close((gw, gb), (ew, eb), rtol=1e-12, atol=1e-12)


def test_frozen_group_norm():
    x, w, b = _rand(2, 6, 4, 5), _rand(6), _rand(6)
    weight = _rand(2, 6, 4, 5)
    out, (gx,) = _grads(lambda x: frozen_group_norm(x, 3, w, b, 1e-5), x, weight=weight)
    assert torch.equal(out, F.group_norm(x, 3, w, b, 1e-5))
    xg = x.reshape(2, 3, -1)
    rstd = torch.rsqrt(xg.var(-1, keepdim=True, unbiased=False) + 1e-5).repeat_interleave(2, 1)[..., None]
    torch.testing.assert_close(gx, weight * w[:, None, None] * rstd, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mask", [None, "bool", "float", "causal"])
def test_soft_attention(mask):
    q, k, v = _rand(2, 3, 5, 4), _rand(2, 3, 5, 4), _rand(2, 3, 5, 6)
    weight = _rand(2, 3, 5, 6)
    attn_mask = {"bool": _rand(5, 5) > -0.5, "float": _rand(1, 3, 5, 5)}.get(mask)
    kw = dict(attn_mask=attn_mask, is_causal=mask == "causal")
    exact_out, exact = _grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **kw), q, k, v, weight=weight)
    # T = 1 through q, k, v: the exact gradient
    out, ours = _grads(lambda q, k, v: soft_attention(q, k, v, Gate("softmax", 1.0), **kw), q, k, v, weight=weight)
    assert torch.equal(out, exact_out)
    torch.testing.assert_close(ours, exact, rtol=1e-10, atol=1e-12)
    # hard: the native op
    _, hard = _grads(lambda q, k, v: soft_attention(q, k, v, Gate("hard"), **kw), q, k, v, weight=weight)
    assert all(torch.equal(a, b) for a, b in zip(hard, exact))
    # T = 0.5, both readings, against the reference written with autograd
    for detach in (False, True):
        gate = Gate("softmax", 0.5, detach=detach)
        scores = q @ k.transpose(-2, -1) / 2
        if mask == "causal":
            scores = scores.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
        elif attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf")) if mask == "bool" else scores + attn_mask

        def reference(q, k, v, scores=scores, detach=detach):
            s = q @ k.transpose(-2, -1) / 2  # the mask is a constant: its gradient path is that of s
            soft = (scores / 0.5).detach() + (s - s.detach())
            a = torch.softmax(scores / 0.5, -1).detach() if detach else torch.softmax(soft, -1)
            return a @ v

        _, ours = _grads(lambda q, k, v, g=gate: soft_attention(q, k, v, g, **kw), q, k, v, weight=weight)
        _, ref = _grads(reference, q, k, v, weight=weight)
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
        if detach:
            assert not ours[0].any() and not ours[1].any()


def test_soft_attention_grouped_query():
    q, k, v = _rand(2, 4, 5, 4), _rand(2, 2, 5, 4), _rand(2, 2, 5, 3)
    weight = _rand(2, 4, 5, 3)
    fn = partial(F.scaled_dot_product_attention, enable_gqa=True)
    _, exact = _grads(fn, q, k, v, weight=weight)
    _, ours = _grads(
        lambda q, k, v: soft_attention(q, k, v, Gate("softmax", 1.0), enable_gqa=True), q, k, v, weight=weight
    )
    torch.testing.assert_close(ours, exact, rtol=1e-10, atol=1e-12)


def test_soft_softmax():
    x, weight = _rand(2, 3, 5, 5), _rand(2, 3, 5, 5)
    out, exact = _grads(lambda x: torch.softmax(x, -1), x, weight=weight)
    got, ours = _grads(lambda x: soft_softmax(x, -1, Gate("softmax", 1.0)), x, weight=weight)
    assert torch.equal(got, out)
    torch.testing.assert_close(ours, exact, rtol=1e-12, atol=1e-13)
    _, soft = _grads(lambda x: soft_softmax(x, -1, Gate("softmax", 0.5)), x, weight=weight)
    _, ref = _grads(lambda x: torch.softmax((x / 0.5).detach() + x - x.detach(), -1), x, weight=weight)
    torch.testing.assert_close(soft, ref, rtol=1e-12, atol=1e-13)
    _, none = _grads(lambda x: soft_softmax(x, -1, Gate("softmax", 0.5, detach=True)), x, weight=weight)
    assert not none[0].any()


# -- small models with the code paths of the zoo ----------------------------------------------------------------

TINY = {
    "vit": lambda: VisionTransformer(32, 8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=7),
    "swin": lambda: SwinTransformer([4, 4], 16, [2, 1], [2, 4], [4, 4], num_classes=7),
    "swin_v2": lambda: SwinTransformer(
        [4, 4], 16, [2, 1], [2, 4], [4, 4], num_classes=7, block=SwinTransformerBlockV2,
        downsample_layer=tvm.swin_transformer.PatchMergingV2,
    ),
    "convnext": lambda: ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=7),
    "maxvit": lambda: MaxVit(
        (32, 32), stem_channels=8, partition_size=2, block_channels=[8, 16], block_layers=[1, 1], head_dim=4,
        stochastic_depth_prob=0.0, num_classes=7,
    ),
    "groupnorm": lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.SiLU(), nn.MaxPool2d(3, 2, 1), nn.Conv2d(8, 8, 3), nn.GELU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 7),
    ),
}  # fmt: skip
assert ShiftedWindowAttentionV2  # the swin_v2 block's attention (explicit, cosine)


def _semantic_reference_options(options: GateOptions) -> dict:
    return {
        "relu": (options.gate, options.temperature),
        "gelu": options.gelu_temperature,
        "silu": options.silu_temperature,
        "norm": options.norm == "frozen",
        "attention": (options.attention_temperature, options.attention_detach),
        "maxpool": (options.pool_temperature, bool(options.pool_detach)),
    }


def _tiny(name):
    torch.manual_seed(0)
    model = TINY[name]().double().eval()
    randomize_zero_heads(model, std=0.1)  # torchvision starts ViT's head at zero: give every layer a gradient
    return model


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("reading", ["qkv", "v"])
def test_semantic_pullback_equals_reference(name, reading):
    model = _tiny(name)
    x = _rand(2, 3, 32, 32)
    options = preset("semantic", attention_temperature=0.7, attention_detach=reading == "v")
    # forward bit for bit (with gradients on: without them nn.MultiheadAttention takes a fused fast path that
    # any torch function mode, and so the gating context, turns off)
    xr = x.clone().requires_grad_(True)
    plain = model(xr)
    with excitation(model, options) as report:
        gated = model(xr)
    assert torch.equal(gated, plain)
    ours = pullback(model, x, 3, options)
    ref, calls = reference_pullback(copy.deepcopy(model), x, 3, _semantic_reference_options(options))
    counts = {kind: report.calls(kind) for kind in report.sites}
    assert counts == calls, (counts, calls)  # the same call sites, kind by kind
    cos = F.cosine_similarity(ours.flatten(1), ref.flatten(1))
    assert (cos > 1 - 1e-10).all(), cos
    torch.testing.assert_close(ours, ref, rtol=1e-7, atol=1e-10 * ref.abs().max().item())


@pytest.mark.parametrize("name", list(TINY))
def test_hard_gates_are_the_exact_gradient(name):
    model = _tiny(name)
    x = _rand(2, 3, 32, 32)
    for p in model.parameters():  # as pullback runs the model (frozen: the same attention kernels)
        p.requires_grad_(False)
    xr = x.clone().requires_grad_(True)
    (exact,) = torch.autograd.grad(model(xr)[:, 3].sum(), xr)
    hard = GateOptions(temperature=0.0, gate="hard", norm="hard", attention_temperature=0.0)
    assert torch.equal(pullback(model, x, 3, hard), exact)
    # attention at T = 1 through q, k, v alone is the exact gradient too
    t1 = GateOptions(temperature=0.0, gate="hard", attention_temperature=1.0)
    assert torch.equal(pullback(model, x, 3, t1), exact)  # the native ops run: T = 1 is the exact gradient


def test_neuron_targets_of_transformer_blocks():
    """Neuron targets at a ViT block's class token (tokens layout) and a Swin stage's position (channels last)
    are the gradients of exactly those output entries."""
    from excitation_pullbacks import Neuron

    vit, swin = _tiny("vit"), _tiny("swin")
    x = _rand(2, 3, 32, 32)
    options = GateOptions(temperature=0.0, gate="hard")
    for model, neuron, pick in (
        (vit, Neuron("encoder.layers.encoder_layer_1", 5, token=0), lambda o: o[:, 0, 5]),
        (vit, Neuron("encoder.layers.encoder_layer_0", 3), lambda o: o[:, :, 3].sum(1)),
        (swin, Neuron("features.1", 2, position=(1, 0), layout="channels_last"), lambda o: o[:, 1, 0, 2]),
    ):
        outs = []
        layer = dict(model.named_modules())[neuron.layer]
        handle = layer.register_forward_hook(lambda m, a, o, outs=outs: outs.append(o))
        for p in model.parameters():
            p.requires_grad_(False)
        xr = x.clone().requires_grad_(True)
        model(xr)
        handle.remove()
        (exact,) = torch.autograd.grad(pick(outs[-1]).sum(), xr)
        assert torch.equal(pullback(model, x, neuron, options), exact)
    with pytest.raises(ValueError, match="token 99 is out of range"):
        pullback(vit, x, Neuron("encoder.layers.encoder_layer_1", 5, token=99), options)
