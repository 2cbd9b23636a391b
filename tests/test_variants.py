"""The pullback variants as attribution methods: each against the computation it is defined by, written out
here (the pullback, the ascent trajectory, a seeded noise loop, a perturbed copy of the model)."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision.models as tvm

from excitation_pullbacks import (
    VARIANTS,
    ascent,
    build_model,
    fusion_pullback,
    input_times,
    make_variant,
    preset,
    pullback,
    pullback_ascent,
    smooth_pullback,
    soft_pullback,
)
from excitation_pullbacks.models.digits import digits_images

from helpers import assert_model_unchanged, model_state

TARGETS = torch.tensor([0, 2])


@pytest.fixture
def net(tiny_net):
    return tiny_net.double().eval()


def _randn_stream(seed: int):
    g = torch.Generator().manual_seed(seed)
    return lambda like: torch.randn(like.shape, generator=g, dtype=like.dtype)


@pytest.mark.parametrize("schedule", [None, "paper", 0.3, preset("vanilla")])
def test_soft_pullback_is_the_pullback(net, images, schedule):
    expected_schedule = (
        preset("semantic") if schedule is None else preset(schedule) if schedule == "paper" else schedule
    )
    maps = soft_pullback(schedule)(net, images, TARGETS)
    assert torch.equal(maps, pullback(net, images, TARGETS, expected_schedule))


def test_gate_keywords_change_the_semantic_preset(net, images):
    maps = soft_pullback(temperature=0.2, pool_temperature=0.1)(net, images, TARGETS)
    expected = pullback(net, images, TARGETS, preset("semantic", temperature=0.2, pool_temperature=0.1))
    assert torch.equal(maps, expected)
    assert not torch.equal(maps, soft_pullback()(net, images, TARGETS))


@pytest.mark.parametrize("clip", [True, False])
def test_pullback_ascent_is_the_ascent_step_sum(net, images, clip):
    schedule = preset("semantic")
    maps = pullback_ascent(schedule, steps=5, step_size=20, clip=clip)(net, images, TARGETS)
    _, trajectory = ascent(
        net, images, TARGETS, schedule, steps=5, step_size=20, eps=float("inf"), bounds=None, return_trajectory=True
    )
    last = trajectory[-1].clamp(-1, 1) if clip else trajectory[-1]
    torch.testing.assert_close(maps, last - trajectory[0], rtol=0, atol=0)
    # the author's loop: normalised steps of 20 along the pullback, no projection, clamped once after the last
    x = images.clone()
    for _ in range(5):
        g = pullback(net, x, TARGETS, schedule)
        x = x + 20 * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert x.abs().max() > 1  # steps of 20 leave [-1, 1]: clipping matters
    torch.testing.assert_close(maps, (x.clamp(-1, 1) if clip else x) - images, rtol=0, atol=1e-10)
    inside = ((images + maps).abs() <= 1 + 1e-12).all()
    assert bool(inside) == clip


def test_pullback_ascent_with_eps_projects_onto_the_ball(net, images):
    maps = pullback_ascent(steps=3, step_size=2.0, eps=1.5, clip=False)(net, images, TARGETS)
    expected = ascent(net, images, TARGETS, preset("semantic"), steps=3, step_size=2.0, eps=1.5, bounds=None)
    torch.testing.assert_close(maps, expected - images, rtol=0, atol=0)
    torch.testing.assert_close(maps.flatten(1).norm(dim=1), torch.full((2,), 1.5, dtype=torch.float64))


def test_smooth_pullback_without_noise_is_the_pullback(net, images):
    maps = smooth_pullback(samples=4, noise=0.0)(net, images, TARGETS)
    torch.testing.assert_close(maps, pullback(net, images, TARGETS, preset("semantic")), rtol=1e-14, atol=0)


@pytest.mark.parametrize("bounds", [None, (-1.0, 1.0)])
def test_smooth_pullback_is_the_seeded_noise_average(net, images, bounds):
    explain = smooth_pullback(samples=6, noise=0.15, seed=3, bounds=bounds)
    maps = explain(net, images, TARGETS)
    assert torch.equal(maps, explain(net, images, TARGETS))  # reproducible
    draw = _randn_stream(3)
    expected = torch.zeros_like(images)
    for _ in range(6):
        noisy = images + 0.15 * draw(images)
        expected += pullback(net, noisy if bounds is None else noisy.clamp(*bounds), TARGETS, preset("semantic"))
    torch.testing.assert_close(maps, expected / 6, rtol=0, atol=1e-14)
    assert not torch.equal(maps, smooth_pullback(samples=6, noise=0.15, seed=4)(net, images, TARGETS))


def test_several_draws_per_pass_change_only_the_speed(net, images):
    one = smooth_pullback(samples=6, seed=2)(net, images, TARGETS)
    several = smooth_pullback(samples=6, seed=2, draws_per_pass=4, batch_size=3)(net, images, TARGETS)
    torch.testing.assert_close(several, one, rtol=0, atol=1e-14)
    options = {"weight_samples": 2, "input_samples": 3, "seed": 2}
    fused = fusion_pullback(**options, draws_per_pass=2)(net, images, TARGETS)
    torch.testing.assert_close(fused, fusion_pullback(**options)(net, images, TARGETS), rtol=0, atol=1e-14)


def test_smooth_pullback_defaults_are_the_authors():
    # SmoothPullback: 50 draws of N(0, 0.15^2) noise, no clamp (lib/attributions.py smoothgrad_explainer)
    explain = smooth_pullback(seed=0)
    calls = []
    model = build_model("digits_cnn")
    x, _ = digits_images("test", 16)
    x, t = x[:1], torch.tensor([0])

    def counting_hook(module, args, out):
        calls.append(args[0].detach().clone())

    handle = model.grey.register_forward_hook(counting_hook)
    try:
        explain(model, x, t)
    finally:
        handle.remove()
    assert len(calls) == 50
    noise = torch.stack(calls) - x
    assert abs(noise.std().item() - 0.15) < 0.005 and abs(noise.mean().item()) < 0.005
    assert torch.stack(calls).abs().amax() > 1  # no clamp to [-1, 1]


def test_fusion_pullback_leaves_the_model_bit_identical(net, images):
    before = model_state(net)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    maps = fusion_pullback(weight_samples=2, input_samples=2, seed=0)(net, images, TARGETS)
    assert maps.shape == images.shape and torch.isfinite(maps).all()
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())
    assert_model_unchanged(net, before)


def test_fusion_pullback_without_noise_is_the_pullback(net, images):
    maps = fusion_pullback(weight_samples=2, input_samples=2, weight_noise=0.0, noise=0.0)(net, images, TARGETS)
    torch.testing.assert_close(maps, pullback(net, images, TARGETS, preset("semantic")), rtol=1e-14, atol=0)


def test_fusion_pullback_without_weight_noise_is_the_smooth_pullback(net, images):
    fusion = fusion_pullback(weight_samples=2, input_samples=3, weight_noise=0.0, seed=5)(net, images, TARGETS)
    smooth = smooth_pullback(samples=6, seed=5)(net, images, TARGETS)
    assert torch.equal(fusion, smooth)


@pytest.mark.parametrize("kind", ["multiplicative", "additive"])
def test_fusion_pullback_is_the_seeded_weight_and_input_noise_average(net, images, kind):
    maps = fusion_pullback(
        weight_samples=2, input_samples=3, weight_noise=0.1, weight_noise_type=kind, noise=0.15, seed=7
    )(net, images, TARGETS)
    draw = _randn_stream(7)
    perturbed = copy.deepcopy(net)
    expected = torch.zeros_like(images)
    for _ in range(2):
        with torch.no_grad():
            for p, original in zip(perturbed.parameters(), net.parameters()):
                u = draw(original)
                p.copy_(original * (1 + 0.1 * u) if kind == "multiplicative" else original + 0.1 * u)
        for _ in range(3):
            expected += pullback(perturbed, images + 0.15 * draw(images), TARGETS, preset("semantic"))
    torch.testing.assert_close(maps, expected / 6, rtol=0, atol=1e-14)
    smooth = smooth_pullback(samples=6, seed=7)(net, images, TARGETS)
    assert not torch.allclose(maps, smooth)  # the weights were perturbed


def test_input_times_is_the_hadamard_map(net, images):
    for explain in (soft_pullback(), pullback_ascent(steps=2), smooth_pullback(samples=2, seed=0)):
        assert torch.equal(input_times(explain)(net, images, TARGETS), images * explain(net, images, TARGETS))


def _tiny_vit():
    torch.manual_seed(0)
    vit = tvm.VisionTransformer(
        image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16, num_classes=3
    )
    return vit.double().eval()


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("times_input", [False, True])
def test_every_variant_leaves_the_model_as_it_was(net, images, name, times_input):
    options = {
        "soft_pullback": {},
        "pullback_ascent": {"steps": 2},
        "smooth_pullback": {"samples": 2, "seed": 0},
        "fusion_pullback": {"weight_samples": 2, "input_samples": 1, "seed": 0},
    }[name]
    explain = make_variant(name, times_input=times_input, **options)
    for model, x in ((net, images), (_tiny_vit(), images[:, :, :16, :16])):
        before = model_state(model)
        maps = explain(model, x, TARGETS)
        assert maps.shape == x.shape and maps.dtype == x.dtype and not maps.requires_grad
        assert torch.isfinite(maps).all()
        assert_model_unchanged(model, before)


def test_make_variant_options_and_errors(net, images):
    maps = make_variant("smooth_pullback", samples=3, seed=1, temperature=0.5)(net, images, TARGETS)
    assert torch.equal(maps, smooth_pullback(samples=3, seed=1, temperature=0.5)(net, images, TARGETS))
    with pytest.raises(ValueError, match="unknown pullback variant 'smoothgrad'; choose one of soft_pullback"):
        make_variant("smoothgrad")
    with pytest.raises(ValueError, match="unknown gate preset"):
        soft_pullback("semantik")
    with pytest.raises(TypeError, match="unexpected gate keyword"):
        smooth_pullback(sample=3)
    for factory, bad in [
        (smooth_pullback, {"samples": 0}),
        (smooth_pullback, {"noise": -0.1}),
        (smooth_pullback, {"bounds": (1.0, -1.0)}),
        (pullback_ascent, {"steps": -1}),
        (pullback_ascent, {"step_size": float("nan")}),
        (fusion_pullback, {"weight_noise_type": "gaussian"}),
        (fusion_pullback, {"input_samples": 0}),
        (fusion_pullback, {"draws_per_pass": 0}),
    ]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            factory(**bad)


def test_pullback_ascent_raises_the_target_logit_of_the_trained_digits_cnn():
    model = build_model("digits_cnn")
    x, labels = digits_images("test", 32)
    x, labels = x[:8], labels[:8]
    target = (labels + 1) % 10  # another class than the digit shown
    maps = pullback_ascent()(model, x, target)
    with torch.no_grad():
        before = model(x).gather(1, target[:, None])
        after = model(x + maps).gather(1, target[:, None])
    assert (after > before).all()
    assert ((x + maps).abs() <= 1 + 1e-6).all()
