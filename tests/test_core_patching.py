"""The excitation context: every call form gated, the model restored, nothing else affected."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from excitation_pullbacks import (
    ByDepth,
    ByName,
    ByType,
    Gate,
    Neuron,
    PerChannel,
    calibrate,
    excitation,
    pullback,
)

from helpers import assert_model_unchanged, model_state
from reference import RefReLU, soft_pool_reference


class AllForms(nn.Module):
    """A tiny CNN that uses every ReLU and max-pool call form, a reused module and in-place ops."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 5, 3, padding=1)
        self.act = nn.ReLU(inplace=True)  # used twice
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = self.act(self.conv1(x))  # module, in place
        h = F.relu(h + 0.1)  # F.relu
        h = torch.relu_(self.conv2(h))  # torch.relu_
        h = self.pool(h)  # MaxPool2d module
        h = F.relu(self.conv3(h) - 0.05, inplace=True)  # F.relu(inplace=True)
        h = torch.relu(h * 1.5).relu()  # torch.relu, Tensor.relu
        h = (h - 0.02).relu_()  # Tensor.relu_
        h = F.max_pool2d(h, 2, ceil_mode=True)  # F.max_pool2d
        h, _ = F.max_pool2d(h, 2, return_indices=True)  # with indices
        h = self.act(torch.max_pool2d(h, 1))  # torch.max_pool2d; module reused
        return self.head(h.mean((2, 3)))


def _model():
    torch.manual_seed(0)
    return AllForms().double().eval()


def _x(n=2, size=12):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(4), dtype=torch.float64)


def _reference(model, x, targets, t=0.3):
    """Same network written with strike-through reference ops (autograd of smooth surrogates)."""
    relu = RefReLU(t)

    def pool(h, *args, **kw):
        soft = soft_pool_reference(h, *args, temperature=t, **kw)
        return F.max_pool2d(h, *args, **kw).detach() + soft - soft.detach()

    m = model
    x = x.clone().requires_grad_(True)
    h = relu(m.conv1(x))
    h = relu(h + 0.1)
    h = relu(m.conv2(h))
    h = pool(h, 3, 2, 1)
    h = relu(m.conv3(h) - 0.05)
    h = relu(relu(h * 1.5))
    h = relu(h - 0.02)
    h = pool(h, 2, ceil_mode=True)
    h = pool(h, 2)
    h = relu(pool(h, 1))
    m.head(h.mean((2, 3))).gather(1, targets[:, None]).sum().backward()
    return x.grad


def test_every_call_form_is_gated_exactly():
    model, x, t = _model(), _x(), torch.tensor([0, 2])
    with torch.no_grad():
        plain = model(x)
    with excitation(model) as report:
        assert torch.equal(model(x), plain)
    assert report.relu_calls == 8 and report.maxpool_calls == 4
    assert report.relu == {"act": 2, "<root>:relu": 6}
    assert report.maxpool == {"pool": 1, "<root>:max_pool2d": 3}
    torch.testing.assert_close(pullback(model, x, t), _reference(model, x, t), rtol=1e-10, atol=1e-12)


def test_model_restored_after_normal_exit_and_exception():
    model, x = _model(), _x()
    model.conv2.weight.requires_grad_(False)  # a user's own choice survives too
    before = model_state(model)
    pullback(model, x, 1)
    with excitation(model):
        model(x)
    assert_model_unchanged(model, before)

    class Boom(RuntimeError):
        pass

    with pytest.raises(Boom), excitation(model):
        model(x)
        raise Boom
    assert_model_unchanged(model, before)
    # an exception inside the forward itself (the mode must not leak)
    model.conv3.register_forward_hook(lambda *a: (_ for _ in ()).throw(Boom()))
    with pytest.raises(Boom):
        pullback(model, x, 1)
    model.conv3._forward_hooks.clear()
    assert_model_unchanged(model, before)


def test_other_models_and_code_outside_the_forward_untouched():
    model, other, x = _model(), copy.deepcopy(_model()), _x()
    xo = x.clone().requires_grad_(True)
    other(xo)[:, 1].sum().backward()
    vanilla = xo.grad
    with excitation(model) as report:
        model(x)
        xo = x.clone().requires_grad_(True)
        other(xo)[:, 1].sum().backward()  # another model, used inside the context
        torch.relu(x)  # a functional call outside any forward of the model
    assert torch.equal(xo.grad, vanilla)
    assert report.relu_calls == 8 and report.forwards == 1


def test_schedules_pick_the_site_gate():
    model, x, t = _model(), _x(), torch.tensor([0, 2])
    vanilla = pullback(model, x, t, temperature=0)
    everything_hard = ByName({"*": Gate("hard")})
    assert torch.equal(pullback(model, x, t, schedule=everything_hard), vanilla)
    soft = pullback(model, x, t)
    by_type = ByType(relu=Gate("sigmoid", 0.3), maxpool=Gate("softmax", 0.3))
    torch.testing.assert_close(pullback(model, x, t, schedule=by_type), soft)
    # depth: the same gate at every depth as a sequence, a mapping and a callable
    gates = [Gate("sigmoid", 0.3)] * 8
    for rules in (gates, {(0, 8): gates[0]}, {range(8): gates[0]}, lambda d: gates[0]):
        sched = ByDepth(rules, default=ByType(Gate("hard"), Gate("softmax", 0.3)))
        torch.testing.assert_close(pullback(model, x, t, schedule=sched), soft)
    # name patterns change only the sites they name
    seen = []
    only_act = ByName({"act": Gate("hard")}, default=ByType())
    from excitation_pullbacks.gating import Excitation

    with Excitation(model, only_act, observer=lambda site, z, g: seen.append((site.key, g.is_hard))):
        model(x)
    assert ("act#0", True) in seen and ("act#1", True) in seen and ("<root>:relu#0", False) in seen
    assert not torch.equal(pullback(model, x, t, schedule=only_act), soft)


def test_calibrated_per_channel_schedule_round_trip(tmp_path):
    model, x = _model(), _x(4)
    sched = calibrate(model, [x[:2], x[2:]], scale=0.3)
    assert set(sched.temperatures) >= {"act#0", "act#1", "<root>:relu#5"}
    assert sched.temperatures["act#0"].shape == (4,)
    # the std it reports is the std of the pre-activation of conv1, per channel
    z = model.conv1(x)
    torch.testing.assert_close(
        sched.temperatures["act#0"], 0.3 * z.transpose(0, 1).flatten(1).std(1, correction=0).float()
    )
    path = tmp_path / "temps.pt"
    sched.save(path)
    loaded = PerChannel.load(path, default=ByType())
    a = pullback(model, x, 1, schedule=sched.__class__(sched.temperatures, default=ByType()))
    torch.testing.assert_close(pullback(model, x, 1, schedule=loaded), a)
    with pytest.raises(ValueError, match="no temperatures for site"):
        pullback(
            nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 12 * 12, 2)).double(),
            x,
            1,
            schedule=PerChannel.load(path),
        )


def test_grid_shares_the_forward_and_equals_separate_pullbacks():
    model, x = _model(), _x()
    grid = pullback(model, x, [[0, 1, 2], [2, 2, 0]])
    assert grid.shape == (2, 3, 3, 12, 12)
    for k in range(3):
        torch.testing.assert_close(grid[:, k], pullback(model, x, grid.new_tensor([[0, 1, 2], [2, 2, 0]])[:, k].long()))
    calls = []
    model.conv1.register_forward_hook(lambda *a: calls.append(1))
    pullback(model, x, [[0, 1, 2], [2, 2, 0]])
    assert len(calls) == 1
    chunked = pullback(model, _x(5), [0, 1, 2, 0, 1], batch_size=2)
    torch.testing.assert_close(chunked, pullback(model, _x(5), [0, 1, 2, 0, 1]))


def test_hidden_neuron_target():
    model, x = _model(), _x()
    xr = x.clone().requires_grad_(True)
    feats = {}
    h = model.conv2(F.relu(model.act(model.conv1(xr)) + 0.1))
    h[:, 3].sum().backward()
    torch.testing.assert_close(pullback(model, x, Neuron("conv2", 3), temperature=0), xr.grad)
    xr.grad = None
    h = model.conv2(F.relu(model.act(model.conv1(xr)) + 0.1))
    h[:, 1, 2, 5].sum().backward()
    torch.testing.assert_close(pullback(model, x, Neuron("conv2", 1, (2, 5)), temperature=0), xr.grad)
    soft = pullback(model, x, Neuron("act", 0, call=0))
    assert soft.shape == x.shape and soft.abs().sum() > 0
    del feats


def test_lean_batchnorm_same_forward_and_input_gradient():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4).double().eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.requires_grad_(False)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bn, nn.ReLU(), nn.Flatten(), nn.LazyLinear(2)).double().eval()
    x = _x()
    model(x)
    from excitation_pullbacks import ByType
    from excitation_pullbacks.gating import Excitation

    xr = x.clone().requires_grad_(True)
    with Excitation(model, ByType(Gate("sigmoid", 0.3)), lean_batchnorm=True):
        out = model(xr)
    assert torch.equal(out, model(x))
    (lean,) = torch.autograd.grad(out[:, 1].sum(), xr)
    xr2 = x.clone().requires_grad_(True)
    with Excitation(model, ByType(Gate("sigmoid", 0.3))):
        out2 = model(xr2)
    (native,) = torch.autograd.grad(out2[:, 1].sum(), xr2)
    torch.testing.assert_close(lean, native, rtol=1e-12, atol=1e-14)
