"""The rule registry: a new layer type is one file (tests/toy_rule.py) plus one registration."""

import re

import pytest
import torch
from torch import nn

from excitation_pullbacks import ByType, Gate, UngatedActivationWarning, excitation, pullback, register
from excitation_pullbacks.rules import Call, rule_for, rules, unregister

from toy_rule import LeakyReLU


def _model():
    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.LeakyReLU(0.1), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
        )
        .double()
        .eval()
    )


class _Reference(nn.Module):
    """LeakyReLU written independently as a straight-through sum: forward exact, backward the soft gate."""

    def __init__(self, slope, t):
        super().__init__()
        self.slope, self.t = slope, t

    def forward(self, z):
        gate = (self.slope + (1 - self.slope) * torch.sigmoid(z / self.t)).detach()
        return (z * gate) - (z * gate).detach() + nn.functional.leaky_relu(z, self.slope).detach()


def test_toy_rule_in_one_file_is_used_by_pullbacks():
    model = _model()
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    schedule = ByType(relu=Gate("hard"), other={"leaky_relu": Gate("sigmoid", 0.4)})
    with pytest.warns(UngatedActivationWarning, match="LeakyReLU"):
        before = pullback(model, x, 2, schedule)  # no rule yet: the exact gradient, and a warning
    rule = register(LeakyReLU())
    try:
        assert rule_for(nn.functional.leaky_relu) is rule and rule in rules()
        with excitation(model, schedule) as report, torch.no_grad():
            out = model(x)
        assert report.of("leaky_relu") == {"1": 1} and not report.ungated
        with torch.no_grad():
            assert torch.equal(out, model(x))  # forward bit for bit
        ours = pullback(model, x, 2, schedule)
    finally:
        unregister(rule)
    assert rule_for(nn.functional.leaky_relu) is None
    reference = nn.Sequential(*[_Reference(0.1, 0.4) if isinstance(m, nn.LeakyReLU) else m for m in model])
    xr = x.clone().requires_grad_(True)
    reference(xr)[:, 2].sum().backward()
    torch.testing.assert_close(ours, xr.grad, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(ours, before)


def test_a_callable_has_one_rule():
    with pytest.raises(ValueError, match="already handled"):
        register(type("Twice", (LeakyReLU,), {"functions": {torch.relu: None}})())


def test_calls_are_bound_by_their_signatures():
    """Arguments are read by name whatever the call's spelling: positional, keyword or a builtin's stub."""
    pool = rule_for(nn.functional.max_pool2d)
    x = torch.zeros(1, 1, 4, 4)
    for args, kwargs in (((x, 3, 1, 1), {}), ((x,), {"kernel_size": 3, "padding": 1, "stride": 1})):
        call = pool.bind(nn.functional.max_pool2d, args, kwargs)
        assert (call["kernel_size"], call["stride"], call["padding"], call["ceil_mode"]) == (3, 1, 1, False)
    call = pool.bind(torch.max_pool2d, (x, [2, 2]), {})
    assert call["kernel_size"] == [2, 2] and call["dilation"] == 1
    relu = rule_for(torch.relu_)
    assert isinstance(relu.bind(torch.relu_, (x,), {}), Call)
    gelu = rule_for(nn.functional.gelu)
    assert gelu.bind(nn.functional.gelu, (x,), {"approximate": "tanh"})["approximate"] == "tanh"


def _signature_examples(a, b=2, /, c=3, *rest, d, e=5, **more):
    pass


@pytest.mark.parametrize(
    "args, kwargs",
    [
        ((1,), {"d": 4}),
        ((1, 2, 3, 6, 7), {"d": 4, "x": 8}),
        ((1,), {"c": 0, "d": 4, "b": 9}),  # b positional only: into **more
        ((), {"d": 4}),  # missing a
        ((1, 2, 3), {"c": 0, "d": 4}),  # c twice
        ((1, 2, 3), {}),  # too many for two parameters
        ((1,), {"d": 4, "alpha": 0.5, "other": 2}),
    ],
)
def test_binder_matches_signature_bind(args, kwargs):
    """The traceable binder gives Signature.bind's arguments (defaults applied), or its TypeError."""
    import inspect

    from excitation_pullbacks.rules.base import Binder

    def stub(input, other, *, alpha=1):
        pass

    for fn in (_signature_examples, stub, nn.functional.max_pool2d, nn.functional.batch_norm):
        sig = inspect.signature(fn)
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as err:
            with pytest.raises(TypeError, match=f"^{re.escape(str(err))}$"):
                Binder(sig).bind(args, kwargs)
            continue
        bound.apply_defaults()
        got = Binder(sig).bind(args, kwargs)
        assert got == dict(bound.arguments) and list(got) == list(bound.arguments)
