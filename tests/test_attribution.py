"""Captum-style interface and the Captum baselines: agreement with the core and with independent references."""

import numpy as np
import pytest
import torch
from captum.attr import NoiseTunnel, Saliency
from torch import nn

from excitation_pullbacks import ascent, pullback
from excitation_pullbacks.attribution import ExcitationPullback, quantus_explain
from excitation_pullbacks.baselines import METHODS, as_direction, explainer

from helpers import assert_model_unchanged, model_state


def small_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 5),
    )
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 1.5)
    return net.double().eval()


@pytest.fixture
def net():
    return small_net()


@pytest.fixture
def x():
    return torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2 - 1


def test_excitation_pullback_is_pullback(net, x):
    t = torch.tensor([0, 3, 4])
    expected = pullback(net, x, t, temperature=0.2, pool_detach=True)
    ep = ExcitationPullback(net, temperature=0.2, pool_detach=True)
    assert torch.equal(ep.attribute(x, target=t), expected)
    assert torch.equal(ep.attribute(x, target=[0, 3, 4]), expected)
    assert torch.equal(ep.attribute(x, target=[(0,), (3,), (4,)]), expected)
    (as_tuple,) = ep.attribute((x,), target=t)
    assert torch.equal(as_tuple, expected)
    assert torch.equal(ep.attribute(x, target=2), pullback(net, x, 2, temperature=0.2, pool_detach=True))


def test_zero_temperature_is_captum_saliency(net, x):
    t = torch.tensor([1, 2, 0])
    ours = ExcitationPullback(net, temperature=0.0).attribute(x, target=t)
    theirs = Saliency(net).attribute(x.clone().requires_grad_(True), target=t, abs=False)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-15)


def test_noise_tunnel_composes(net, x):
    t = torch.tensor([1, 2, 0])
    ep = ExcitationPullback(net)
    zero_noise = NoiseTunnel(ep).attribute(x, target=t, nt_type="smoothgrad", nt_samples=3, stdevs=0.0)
    torch.testing.assert_close(zero_noise, pullback(net, x, t), rtol=1e-12, atol=1e-15)
    noisy = NoiseTunnel(ep).attribute(x, target=t, nt_type="smoothgrad", nt_samples=4, stdevs=0.2)
    assert noisy.shape == x.shape and torch.isfinite(noisy).all()


def test_bad_targets_and_inputs(net, x):
    ep = ExcitationPullback(net)
    with pytest.raises(ValueError, match="target is required"):
        ep.attribute(x)
    with pytest.raises(ValueError, match="1 or 3 class indices"):
        ep.attribute(x, target=[1, 2])
    with pytest.raises(ValueError, match="one input tensor"):
        ep.attribute((x, x), target=1)
    with pytest.raises(ValueError, match="additional_forward_args"):
        ep.attribute(x, target=1, additional_forward_args=(1,))
    with pytest.raises(ValueError, match="nn.Module"):
        ExcitationPullback(lambda v: net(v))


def test_quantus_explain_func(net, x):
    import quantus

    t = np.array([0, 1, 2])
    maps = quantus_explain(net.float(), x.float().numpy(), t, temperature=0.3)
    expected = pullback(net, x.float(), torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-7)
    scores = quantus.Sparseness(disable_warnings=True, display_progressbar=False)(
        model=net,
        x_batch=x.float().numpy(),
        y_batch=t,
        a_batch=None,
        explain_func=quantus_explain,
        explain_func_kwargs={"temperature": 0.3},
        device="cpu",
    )
    assert len(scores) == 3 and np.isfinite(scores).all()


class _GuidedReLU(torch.autograd.Function):
    """Reference guided backprop: ReLU's gate and the incoming gradient clipped at zero."""

    @staticmethod
    def forward(ctx, z):
        ctx.save_for_backward(z)
        return z.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        return g.clamp(min=0) * (z > 0)


class _Guided(nn.Module):
    def forward(self, z):
        return _GuidedReLU.apply(z)


def _input_grad(model, x, t):
    xr = x.clone().requires_grad_(True)
    return torch.autograd.grad(model(xr).gather(1, t[:, None]).sum(), xr)[0]


def test_baselines_against_independent_references(net, x):
    t = torch.tensor([4, 0, 2])
    before = model_state(net)
    grad = _input_grad(net, x, t)
    torch.testing.assert_close(explainer("vanilla")(net, x, t), grad, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(
        explainer("smoothgrad", smoothgrad_noise=0.0, smoothgrad_samples=2)(net, x, t), grad, rtol=1e-12, atol=1e-15
    )
    guided = nn.Sequential(*[(_Guided() if isinstance(m, nn.ReLU) else m) for m in net])
    torch.testing.assert_close(
        explainer("guided_backprop")(net, x, t), _input_grad(guided, x, t), rtol=1e-12, atol=1e-15
    )
    # Integrated gradients: completeness, sum of attributions = f(x) - f(baseline)
    ig = explainer("integrated_gradients", ig_steps=200, ig_baseline=-1.0)(net, x, t)
    with torch.no_grad():
        gap = (net(x) - net(torch.full_like(x, -1.0))).gather(1, t[:, None]).squeeze(1)
    torch.testing.assert_close(ig.flatten(1).sum(1), gap, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(
        explainer("excitation", temperature=0.5)(net, x, t), pullback(net, x, t, temperature=0.5), rtol=0, atol=0
    )
    assert_model_unchanged(net, before)


def test_explainers_leave_model_unchanged_after_errors(net, x):
    before = model_state(net)
    for method in METHODS:
        with pytest.raises((ValueError, IndexError, RuntimeError)):
            explainer(method, smoothgrad_samples=2, ig_steps=2)(net, x, torch.tensor([0, 1, 99]))
        assert_model_unchanged(net, before)
    with pytest.raises(ValueError, match="unknown attribution method"):
        explainer("lrp")


def test_ascent_along_a_baseline(net, x):
    t = torch.tensor([1, 2, 3])
    ours = ascent(net, x, t, steps=3, step_size=0.5, eps=1.0, direction=as_direction(net, explainer("vanilla")))
    torch.testing.assert_close(
        ours, ascent(net, x, t, steps=3, step_size=0.5, eps=1.0, vanilla=True), rtol=1e-12, atol=1e-12
    )
    sg = ascent(
        net,
        x,
        t,
        steps=2,
        step_size=0.5,
        eps=1.0,
        direction=as_direction(net, explainer("smoothgrad", smoothgrad_samples=3)),
    )
    assert ((sg - x).flatten(1).norm(dim=1) <= 1.0 + 1e-9).all()
    with pytest.raises(ValueError, match="not both"):
        ascent(net, x, t, steps=1, vanilla=True, direction=as_direction(net, explainer("vanilla")))
