"""ReplayedPullback: the traced gated forward and backward give the engine's own numbers, follow the model's
current parameters and structure, leave the model as it was, and hand what it cannot trace to pullback."""

import copy

import pytest
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx
from torchvision.models.vision_transformer import VisionTransformer

from excitation_pullbacks import preset, pullback
from excitation_pullbacks.models.digits import DigitsCNN
from excitation_pullbacks.pullback import Neuron
from excitation_pullbacks.replay import ReplayedPullback, _accumulate_in_place
from excitation_pullbacks.rules import batch_norm_kernel, gate_kernel, pool_kernel

from helpers import assert_model_unchanged, model_state


def _digits(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = DigitsCNN().to(dtype).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model


def _images(n=1, dtype=torch.float32, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=g) * 2 - 1).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("schedule", [0.3, 0.05, 0.0])
def test_replay_is_pullback_bit_for_bit(dtype, schedule):
    model = _digits(dtype)
    x = _images(2, dtype)
    replay = ReplayedPullback(model, schedule)
    for targets in ([3, 7], [0, 9]):  # a second call replays the graph traced by the first
        got = replay(x, targets)
        assert replay.replayed, replay.reason
        assert torch.equal(got, pullback(model, x, targets, schedule))
    assert len(replay._graphs) == 1


def test_hard_gates_replay_the_vanilla_gradient():
    model = _digits()
    x = _images(1)
    xg = x.clone().requires_grad_(True)
    (vanilla,) = torch.autograd.grad(model(xg)[:, 4].sum(), xg)
    assert torch.equal(ReplayedPullback(model, temperature=0)(x, 4), vanilla)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_resnet_replays_pullback_bit_for_bit(tv_models, dtype):
    """Bottlenecks: BatchNorm + residual + in-place ReLU (the fused kernel with an addend), a padded 3 x 3 pool."""
    model = copy.deepcopy(tv_models("resnet18")).to(dtype)
    x = _images(1, dtype, size=64)
    replay = ReplayedPullback(model, 0.3)
    replay(x, 1)
    before = batch_norm_kernel.calls, pool_kernel.calls
    got = replay(x, 5)
    assert replay.replayed, replay.reason
    if pool_kernel.available():  # the replayed graph calls the kernels themselves
        assert batch_norm_kernel.calls - before[0] >= 8 and pool_kernel.calls - before[1] == 1
    assert torch.equal(got, pullback(model, x, 5, 0.3))
    (graph,) = replay._graphs.values()
    order = [str(n.target) for n in graph.run.graph.nodes if n.op in ("call_function", "call_method")]
    backward = order[order.index("begin") :]
    assert backward.count("aten.add_.Tensor") == 8  # each residual join's gradient sum in place, as autograd does


def test_forward_runs_unflushed_and_backward_flushed():
    """Call-site order in the graph: every forward convolution before ``scope.begin()`` (run as it is), every
    convolution backward between it and ``scope.end()`` (run free of subnormals)."""
    replay = ReplayedPullback(_digits(), 0.3)
    replay(_images(1), 3)
    (graph,) = replay._graphs.values()
    order = [str(n.target) for n in graph.run.graph.nodes if n.op in ("call_function", "call_method")]
    begin, end = order.index("begin"), order.index("end")
    forward = [i for i, name in enumerate(order) if name == "aten.convolution.default"]
    backward = [i for i, name in enumerate(order) if name == "aten.convolution_backward.default"]
    assert len(forward) == len(backward) == 4
    assert max(forward) < begin < min(backward) and max(backward) < end == len(order) - 1


def test_a_graph_that_raises_leaves_the_float_state_as_it_was(monkeypatch):
    """An error inside the replayed backward (here: the pool kernel's) ends its flush all the same."""
    replay = ReplayedPullback(_digits(), 0.3)
    x = _images(1)
    replay(x, 3)

    def fails(*args):
        raise MemoryError("soft-pool kernel: out of memory for its row buffers")

    (graph,) = replay._graphs.values()
    for node in graph.run.graph.nodes:
        if node.target is pool_kernel.run:
            node.target = fails
    graph.run.recompile()
    with pytest.raises(MemoryError) as info:
        replay(x, 3)
    if pool_kernel.available():  # while the traceback (and the replay's frame) lives: no clean-up by collection
        assert not pool_kernel.denormals_flushed()
    assert info.traceback


def test_replay_leaves_the_model_and_the_float_state_as_they_were(tiny_net):
    model = tiny_net.eval()
    before = model_state(model)
    flushed = torch.set_flush_denormal(True)
    try:
        replay = ReplayedPullback(model, 0.3)
        replay(_images(1, size=16), 1)
        replay(_images(1, size=16, seed=2), 2)
        assert replay.replayed, replay.reason
        if pool_kernel.available() and flushed:
            assert pool_kernel.denormals_flushed()
    finally:
        torch.set_flush_denormal(False)
    if pool_kernel.available():
        assert not pool_kernel.denormals_flushed()
    assert_model_unchanged(model, before)


def test_replay_reads_the_current_parameters_and_retraces_a_changed_model():
    model = _digits()
    x = _images(1)
    replay = ReplayedPullback(model, 0.3)
    replay(x, 2)
    with torch.no_grad():
        model.features[0].weight.mul_(-1.5)  # in place: the same graph, new values
    assert torch.equal(replay(x, 2), pullback(model, x, 2, 0.3))
    assert len(replay._graphs) == 1
    model.features[3] = nn.MaxPool2d(2, stride=1)  # a new module: traced anew
    model.pool = nn.AdaptiveAvgPool2d(4)
    assert torch.equal(replay(x, 2), pullback(model, x, 2, 0.3))
    model.classifier.weight = nn.Parameter(torch.randn_like(model.classifier.weight))  # a new parameter object
    assert torch.equal(replay(x, 2), pullback(model, x, 2, 0.3))
    replay(_images(2), [1, 2])  # another batch size: another graph
    assert len(replay._graphs) == 4 and replay.replayed


class _Branches(nn.Module):
    """A forward that branches on a tensor's value: no graph can stand for it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        if h.mean() > 0.5:
            h = h * 2
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize(
    ("make", "targets", "reason"),
    [
        (lambda: _Branches().eval(), 1, "cannot be traced"),
        (lambda: _digits().train(), 1, "train mode"),
        (lambda: _hooked(_digits()), 1, "hooks of its own"),
        (lambda: _digits(), Neuron("features.6", 3), "neuron"),
        (lambda: _digits(), [[1, 2]], "several classes"),
    ],
)
def test_what_cannot_be_replayed_runs_through_pullback(make, targets, reason):
    torch.manual_seed(0)
    model = make()
    x = _images(1)
    replay = ReplayedPullback(model, 0.3)
    got = replay(x, targets)
    assert not replay.replayed and reason in replay.reason
    assert torch.equal(got, pullback(model, x, targets, 0.3))


def _hooked(model):
    model.features[2].register_forward_hook(lambda m, a, o: None)
    return model


def test_bad_inputs_fail_as_pullback_does():
    model = _digits()
    replay = ReplayedPullback(model, 0.3)
    x = _images(1)
    replay(x, 1)
    with pytest.raises(ValueError, match="out of range"):
        replay(x, 10)
    with pytest.raises(ValueError, match="NaN or infinite"):
        replay(torch.full_like(x, float("nan")), 1)
    with pytest.raises(ValueError, match="channels"):
        replay(x[:, :2], 1)
    with pytest.raises(ValueError, match="tensor"):
        replay([[0.0]], 1)


def test_a_vision_transformer_replays_the_semantic_pullback_bit_for_bit():
    """LayerNorm, attention and GELU rules; the GELU gate's kernel runs inside the graph."""
    torch.manual_seed(0)
    model = VisionTransformer(32, 8, 2, 2, 32, 64, num_classes=5).eval()
    x = _images(1)
    replay = ReplayedPullback(model, preset("semantic"))
    replay(x, 1)
    before = gate_kernel.calls
    got = replay(x, 2)
    assert replay.replayed, replay.reason
    if pool_kernel.available():
        assert gate_kernel.calls - before == 2  # one MLP GELU per block
    assert torch.equal(got, pullback(model, x, 2, preset("semantic")))


@pytest.mark.parametrize(
    ("body", "in_place"),
    [
        (lambda x, y: ((a := x * 2) * 3, a + y), True),  # a read before the sum only: its buffer takes the sum
        (lambda x, y: ((a := x * 2) + y, a.sum()), False),  # a read after the sum
        (lambda x, y: ((a := x * 2).view(-1), a + y), False),  # a view of a lives on
        (lambda x, y: (x + y,), False),  # x is an input, not a buffer of the graph's own
    ],
)
def test_a_gradient_sum_goes_in_place_only_where_nothing_reads_its_buffer_after(body, in_place):
    traced = make_fx(body)(torch.randn(3), torch.randn(3))
    nodes = list(traced.graph.nodes)
    _accumulate_in_place(nodes, 0)
    targets = [str(n.target) for n in nodes if "add" in str(n.target)]
    assert targets == ["aten.add_.Tensor" if in_place else "aten.add.Tensor"]
