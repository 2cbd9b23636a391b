"""The Captum baselines beside the vanilla ones: shapes on the digits CNN, exact values where theory gives
them (bias-free ReLU networks), agreement with independent computations, the Grad-CAM layer finder, the
method registry and the config group."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from excitation_pullbacks import ascent
from excitation_pullbacks.baselines import (
    BASELINES,
    REGISTRY,
    BaselineOptions,
    explainer,
    gradcam_layer,
    register_method,
)
from excitation_pullbacks.models import digits_images, load_digits_cnn

from helpers import assert_model_unchanged, compose_config, model_state


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: one intra-op thread (several threads on a busy machine only wait for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


NEW = ("gradient_shap", "deeplift", "gradcam", "guided_gradcam", "fusiongrad", "gradient_ascent")
FAST = dict(fusiongrad_models=2, fusiongrad_samples=2, gradient_ascent_steps=2, gradient_shap_samples=3)


@pytest.fixture(scope="module")
def digits():
    model = load_digits_cnn().double().eval()
    x, y = digits_images("test", size=32)
    return model, x[:3].double(), y[:3]


def grad(model, x, t):
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(model(x).gather(1, t[:, None]).sum(), x)
    return g


def bias_free_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(48, 20, bias=False), nn.ReLU(), nn.Linear(20, 12, bias=False), nn.ReLU(),
        nn.Linear(12, 4, bias=False), nn.Unflatten(1, (4,)),
    ).double().eval()  # fmt: skip


@pytest.mark.parametrize("method", NEW)
def test_new_baselines_run_on_digits_with_the_image_shape(digits, method):
    model, x, y = digits
    before = model_state(model)
    maps = explainer(method, **FAST)(model, x, y)
    assert maps.shape == x.shape and maps.dtype == x.dtype and torch.isfinite(maps).all()
    assert maps.abs().sum() > 0
    assert_model_unchanged(model, before)


def test_deeplift_and_gradient_shap_of_a_bias_free_relu_net_are_input_times_gradient():
    """Bias-free ReLU net, reference 0: DeepLift's Rescale multipliers are the gates 1[z > 0], so DeepLift =
    x * grad f(x) and sums to f(x); the gradient is the same at every a * x (a > 0), so GradientShap from 0 is
    x * grad f(x) whatever its random path points."""
    net = bias_free_mlp()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 3, 0])
    expected = x * grad(net, x, t)
    deeplift = explainer("deeplift")(net, x, t)
    torch.testing.assert_close(deeplift, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(deeplift.sum((1, 2, 3)), net(x).gather(1, t[:, None])[:, 0].detach())
    shap = explainer("gradient_shap", gradient_shap_samples=7)(net, x, t)
    torch.testing.assert_close(shap, expected, rtol=1e-10, atol=1e-12)


def test_deeplift_splits_resnet_reused_relus_and_sums_to_the_logit_difference():
    """torchvision's BasicBlock calls one ReLU module twice, which Captum's DeepLift refuses; on the split copy
    the attributions sum to f(x) - f(0) (DeepLift's summation-to-delta) and the model itself is unchanged."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=6).double().eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = torch.tensor([1, 4])
    before = model_state(model)
    maps = explainer("deeplift")(model, x, t)
    with torch.no_grad():
        delta = (model(x) - model(torch.zeros_like(x))).gather(1, t[:, None])[:, 0]
    torch.testing.assert_close(maps.sum((1, 2, 3)), delta, rtol=1e-6, atol=1e-8)
    assert_model_unchanged(model, before)


def test_gradcam_layer_is_the_last_convolutional_block(digits):
    assert gradcam_layer(digits[0], digits[1]) == "features"
    x = torch.zeros(1, 3, 64, 64)
    for name, expected in [("resnet18", "layer4"), ("vgg11", "features")]:
        model = torchvision.models.get_model(name, weights=None, num_classes=3).eval()
        assert gradcam_layer(model, x) == expected
    with pytest.raises(ValueError, match="spatial"):
        gradcam_layer(bias_free_mlp(), torch.zeros(1, 3, 4, 4, dtype=torch.float64))


def test_gradcam_equals_its_definition(digits):
    """Grad-CAM: ReLU(sum_c mean_hw(d y / d A_c) A_c) at the block's output A, upsampled bilinearly."""
    model, x, y = digits
    feats = {}
    handle = model.features.register_forward_hook(lambda m, a, o: feats.__setitem__("a", o))
    try:
        xr = x.detach().requires_grad_(True)
        out = model(xr).gather(1, y[:, None]).sum()
        (ga,) = torch.autograd.grad(out, feats["a"])
    finally:
        handle.remove()
    cam = (ga.mean((2, 3), keepdim=True) * feats["a"]).sum(1, keepdim=True).clamp_min(0).detach()
    cam = nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
    torch.testing.assert_close(explainer("gradcam")(model, x, y), cam.expand_as(x))
    named = explainer("gradcam", gradcam_layer="features.10", gradcam_relu=False)(model, x, y)
    assert named.shape == x.shape and (named < 0).any()  # another layer, negative evidence kept
    with pytest.raises(ValueError, match="not a module"):
        explainer("gradcam", gradcam_layer="nope")(model, x, y)


def test_fusiongrad_without_noise_is_the_gradient_and_with_noise_is_random(digits):
    model, x, y = digits
    plain = explainer("fusiongrad", fusiongrad_weight_noise=0.0, fusiongrad_noise=0.0, **FAST)(model, x, y)
    torch.testing.assert_close(plain, grad(model, x, y))
    torch.manual_seed(0)
    a = explainer("fusiongrad", **FAST)(model, x, y)
    torch.manual_seed(0)
    b = explainer("fusiongrad", **dict(FAST, batch_size=3))(model, x, y)  # one noisy input per forward pass
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, plain)
    with pytest.raises(ValueError, match="fusiongrad"):
        explainer("fusiongrad", fusiongrad_noise_type="both")


def test_gradient_ascent_is_the_image_change_of_vanilla_ascent(digits):
    model, x, y = digits
    change = explainer("gradient_ascent", gradient_ascent_steps=3, gradient_ascent_step_size=2.0)(model, x, y)
    end = ascent(model, x, y, vanilla=True, steps=3, step_size=2.0, eps=math.inf, bounds=None)
    torch.testing.assert_close(change, end - x)
    one = explainer("gradient_ascent", gradient_ascent_steps=1, gradient_ascent_step_size=2.0)(model, x, y)
    g = grad(model, x, y)
    torch.testing.assert_close(one, 2.0 * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1))
    clipped = explainer("gradient_ascent", gradient_ascent_step_size=50.0, gradient_ascent_clip=True)(model, x, y)
    assert ((x + clipped).abs() <= 1 + 1e-12).all()


def test_registry_takes_a_new_method_and_options_are_checked(digits):
    model, x, y = digits
    register_method("doubled", lambda options, schedule: lambda m, xx, t: 2 * grad(m, xx, t))
    try:
        torch.testing.assert_close(explainer("doubled")(model, x, y), 2 * grad(model, x, y))
    finally:
        REGISTRY.pop("doubled")
    assert set(NEW) <= set(BASELINES)
    with pytest.raises(ValueError, match="unknown attribution method"):
        explainer("doubled")
    with pytest.raises(ValueError, match="smoothgrad"):
        BaselineOptions(smoothgrad_samples=0)


def test_baselines_config_holds_every_option():
    cfg = compose_config("baselines.gradcam_layer=features", "baselines.fusiongrad_models=3")
    b = cfg.baselines
    options = {k: b[k] for k in b if k != "methods"}
    assert set(options) == set(BaselineOptions.__dataclass_fields__) - {"value_range"}
    assert BaselineOptions(**options).gradcam_layer == "features"
    with pytest.raises(Exception, match="fusiongrad_models"):
        compose_config("baselines.fusiongrad_models=many")
