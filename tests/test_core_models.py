"""The engine on random-weight torchvision ResNet50, VGG11_BN and DenseNet121 (float64)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from excitation_pullbacks import ascent, excitation, pullback

from helpers import ARCHS, EXPECTED_CALLS
from reference import functional_relu, reference_pullback, swap

pytestmark = pytest.mark.slow
TARGETS = torch.tensor([3, 917])


def _cos(a, b):
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_bit_identical_and_call_counts(arch, tv_models, images):
    model = tv_models(arch)
    x = images.float()
    model.float()
    try:
        with torch.no_grad():
            plain = model(x)
        with excitation(model) as report:
            gated = model(x)
    finally:
        model.double()
    assert torch.equal(plain, gated.detach())
    relu, pool = EXPECTED_CALLS[arch]
    assert (report.relu_calls, report.maxpool_calls) == (relu, pool)
    if arch == "resnet50":  # Bottleneck.relu is one module called three times
        assert report.relu["backbone.layer1.0.relu"] == 3 and len(report.relu) == 17
    if arch == "densenet121":  # the functional F.relu in DenseNet.forward
        assert report.relu["backbone:relu"] == 1


@pytest.mark.parametrize("arch", ARCHS)
def test_matches_independent_reference(arch, tv_models, images):
    model = tv_models(arch)
    ours = pullback(model, images, TARGETS, temperature=0.3)
    ref = reference_pullback(model, images, TARGETS, temperature=0.3)
    assert (_cos(ours, ref) >= 0.9999).all(), _cos(ours, ref)
    vanilla = pullback(model, images, TARGETS, temperature=0)
    assert (_cos(ours, vanilla) < 0.999).all()  # the gates did change something


@pytest.mark.parametrize("arch", ARCHS)
def test_hard_gate_is_vanilla_gradient(arch, tv_models, images):
    model = tv_models(arch)
    x = images.clone().requires_grad_(True)
    model(x).gather(1, TARGETS[:, None]).sum().backward()
    assert torch.equal(pullback(model, images, TARGETS, temperature=0), x.grad)
    assert torch.equal(pullback(model, images, TARGETS, gate="hard"), x.grad)


class _OpenGate(nn.Module):
    """relu forward, identity gradient: the gate fixed at 1 (strike-through)."""

    def forward(self, z, inplace=False):
        return torch.clamp_min(z, 0).detach() + z - z.detach()


@pytest.mark.parametrize("arch", ARCHS)
def test_none_gate_is_all_gates_open(arch, tv_models, images):
    model = tv_models(arch)
    ours = pullback(model, images, TARGETS, gate="none", pool_temperature=0)
    opened = swap(model, relu=_OpenGate)
    x = images.clone().requires_grad_(True)
    with functional_relu(_OpenGate()):
        out = opened(x)
    out.gather(1, TARGETS[:, None]).sum().backward()
    torch.testing.assert_close(ours, x.grad, rtol=1e-9, atol=1e-9 * x.grad.abs().max().item())


@pytest.mark.parametrize("arch", ["resnet50", "densenet121"])
def test_grid_and_ascent_on_real_architecture(arch, tv_models, images):
    model = tv_models(arch)
    grid = pullback(model, images, [[3, 917, 5], [1, 2, 3]])
    assert grid.shape == (2, 3, 3, 64, 64)
    torch.testing.assert_close(grid[:, 1], pullback(model, images, [917, 2]))
    final = ascent(model, images, TARGETS, steps=2, step_size=5.0, eps=6.0)
    delta = (final - images).flatten(1).norm(dim=1)
    assert (delta <= 6.0 + 1e-9).all() and final.abs().max() <= 1
    with torch.no_grad():
        before = model(images).gather(1, TARGETS[:, None])
        after = model(final).gather(1, TARGETS[:, None])
    assert (after > before).all()
