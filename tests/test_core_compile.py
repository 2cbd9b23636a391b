"""The engine on models wrapped by torch.compile: same pullbacks as eager, every gate counted, model restored.

The fast tests compile with the ``aot_eager`` backend (Dynamo tracing and AOTAutograd, no code generation), so
they check the tracing of the gating itself in seconds; one slow test uses the default (inductor) backend.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from excitation_pullbacks import Neuron, ascent, excitation, pullback

from helpers import assert_model_unchanged, model_state


class Net(nn.Module):
    """BatchNorm, an in-place ReLU module, a functional ReLU, overlapping and tiling max-pools."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.conv2 = nn.Conv2d(4, 6, 3)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        x = self.pool(self.relu(self.bn(self.conv1(x))))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.head(x.mean((2, 3)))


def net(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    model = Net().to(dtype).eval()
    model.bn.running_mean.uniform_(-0.2, 0.2)
    model.bn.running_var.uniform_(0.5, 1.5)
    return model


def _x(dtype=torch.float64):
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=dtype) * 2 - 1


def _vanilla(model, x, t):
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xr).gather(1, t[:, None]).sum(), xr)
    return g


@pytest.mark.slow
def test_compiled_pullback_equals_eager():
    model, x, t = net(), _x(), torch.tensor([1, 3])
    compiled = torch.compile(model, backend="aot_eager")
    compiled(x)  # a graph traced without the engine must not be replayed inside it ...
    before, forward = model_state(compiled), compiled.forward
    for options in ({}, {"temperature": 0.5, "pool_detach": True}, {"compat": "author"}):
        got = pullback(compiled, x, t, **options)
        torch.testing.assert_close(got, pullback(model, x, t, **options), rtol=1e-12, atol=1e-12)
    neuron = Neuron("conv2", 2)
    torch.testing.assert_close(pullback(compiled, x, neuron), pullback(model, x, neuron), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ascent(compiled, x, t, steps=2), ascent(model, x, t, steps=2), rtol=1e-12, atol=1e-12)
    # ... nor one traced with it outside: the compiled model still gives the vanilla gradient
    torch.testing.assert_close(_vanilla(compiled, x, t), _vanilla(model, x, t), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(_vanilla(model, x, t), pullback(model, x, t))
    assert_model_unchanged(compiled, before)
    assert compiled.forward is forward


def test_report_counts_every_gate_under_compile():
    model, x = net(), _x()
    compiled = torch.compile(model, backend="aot_eager")
    with excitation(model) as eager_report:
        model(x)
    for _ in range(2):  # a second call replays the compiled graphs: the counts must come again
        with excitation(compiled) as report:
            out = compiled(x)
        assert report.relu == eager_report.relu == {"relu": 1, "<root>:relu": 1}
        assert report.maxpool == eager_report.maxpool == {"pool": 1, "<root>:max_pool2d": 1}
        assert report.forwards == 1
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)


def test_model_restored_after_exception_under_compile():
    model = net()
    compiled = torch.compile(model, backend="aot_eager")
    forward = compiled.forward
    before = model_state(compiled)
    with pytest.raises(ValueError, match="out of range"):
        pullback(compiled, _x(), 7)  # after the compiled forward: the class check
    with pytest.raises(RuntimeError):
        pullback(compiled, torch.rand(2, 3, 4, 4, dtype=torch.float64), 0)  # inside it: too small for conv2
    assert_model_unchanged(compiled, before)
    assert compiled.forward is forward
    torch.testing.assert_close(pullback(compiled, _x(), 1), pullback(model, _x(), 1), rtol=1e-12, atol=1e-12)


#: Inductor reorders and fuses float32 arithmetic: compiled and eager pullbacks agree to this (relative to
#: the largest entry of the eager pullback).
COMPILE_RTOL = 1e-4


@pytest.mark.slow
def test_inductor_pullback_within_tolerance():
    model, x, t = net(torch.float32), _x(torch.float32), torch.tensor([1, 3])
    compiled = torch.compile(model)
    ref = pullback(model, x, t)
    got = pullback(compiled, x, t)
    assert (got - ref).abs().max() <= COMPILE_RTOL * ref.abs().max()
    # K targets: K backward passes through one compiled forward (retain_graph) - no donated-buffer refusal
    grid = torch.tensor([[1, 3], [3, 0]])
    ref, got = pullback(model, x, grid), pullback(compiled, x, grid)
    assert got.shape == (2, 2, 3, 16, 16) and (got - ref).abs().max() <= COMPILE_RTOL * ref.abs().max()
    with excitation(compiled) as report:
        compiled(x)
    assert report.relu_calls == 2 and report.maxpool_calls == 2


class _Counting:
    """A torch.compile backend that runs each graph as it is and counts the graphs it compiled and the calls
    that ran through one (a graph break makes a forward run several graphs; a model past the recompile limit
    runs none)."""

    def __init__(self):
        self.graphs = self.runs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1

        def run(*args):
            self.runs += 1
            return gm.forward(*args)

        return run


def test_compiled_resnet_one_graph_per_batch_size():
    """The gating traces into the model's graph: each pullback of a compiled ResNet18 runs one graph (no graph
    break in the gating), repeated calls replay it, and a new batch size compiles once more at most (after
    which torch.compile marks the batch dynamic)."""
    from torchvision.models import resnet18

    backend = _Counting()
    torch.manual_seed(0)
    model = resnet18(num_classes=10).eval()
    compiled = torch.compile(model, backend=backend)
    x, t = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 3, 5])
    new = []
    for n in (2, 2, 2, 3, 3):
        graphs = backend.graphs
        got = pullback(compiled, x[:n], t[:n], temperature=0.3)
        new.append(backend.graphs - graphs)
    assert new[0] == 1 and new[1:3] == [0, 0] and new[3] <= 1 and new[4] == 0
    assert backend.runs == 5
    torch.testing.assert_close(got, pullback(model, x, t, temperature=0.3), rtol=COMPILE_RTOL, atol=1e-8)


def test_compiled_models_side_by_side_keep_their_graphs():
    """Each compiled model's gated calls have a graph cache (and recompile budget) of their own: nine models
    at two batch sizes all run compiled, past torch.compile's default recompile limit of one cache (8)."""
    backend = _Counting()
    models = []
    for seed in range(9):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 49, 5))
        models.append(torch.compile(model.double().eval(), backend=backend))
    for n in (2, 3, 2, 3):
        for compiled in models:
            x = _x()[:1].expand(n, -1, -1, -1)
            torch.testing.assert_close(pullback(compiled, x, 1), pullback(compiled._orig_mod, x, 1), rtol=0, atol=0)
    assert backend.runs == 4 * 9 and backend.graphs <= 2 * 9


def test_compiled_temperature_sweep_recompiles_once():
    """A new temperature on a compiled model compiles once more at most (torch.compile then takes T as a
    symbolic number, which the gates trace without a graph break); each pullback runs one graph."""
    torch._dynamo.reset()  # what earlier compiles in this process learnt (dynamic sizes) would count here
    backend = _Counting()
    model, x, t = net(), _x(), torch.tensor([1, 3])
    compiled = torch.compile(model, backend=backend)
    for temperature in (0.3, 0.5, 0.7, 0.7, 0.9):
        got = pullback(compiled, x, t, temperature=temperature)
        torch.testing.assert_close(got, pullback(model, x, t, temperature=temperature), rtol=1e-12, atol=1e-12)
    assert backend.graphs <= 2 and backend.runs == 5


class _SmoothNet(nn.Module):
    """SiLU and GELU sites, whose default gate is their own (``own``: sigmoid / Phi at the site's T)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        return self.head(F.gelu(F.silu(self.conv(x))).mean((2, 3)))


def test_compiled_own_gate_takes_a_symbolic_temperature():
    """After a second temperature torch.compile passes T as a symbolic number; the ``own`` gate resolves it at
    each SiLU / GELU site without a graph break (before: one per site and temperature), and the pullbacks are
    eager's."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    backend = _Counting()
    model, x, t = _SmoothNet().to(torch.float64).eval(), _x(), torch.tensor([1, 3])
    compiled = torch.compile(model, backend=backend)
    for temperature in (0.3, 0.5, 0.7, 0.9):
        got = pullback(compiled, x, t, smooth_temperature=temperature)
        torch.testing.assert_close(got, pullback(model, x, t, smooth_temperature=temperature), rtol=1e-12, atol=1e-12)
    assert backend.graphs <= 2 and backend.runs == 4
