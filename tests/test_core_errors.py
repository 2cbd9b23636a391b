"""Bad input ends in one clear error; ungated nonlinearities are named in a warning."""

import math
import warnings

import pytest
import torch
from torch import nn

from excitation_pullbacks import (
    Gate,
    Neuron,
    UngatedActivationWarning,
    ascent,
    excitation,
    make_schedule,
    path_kernel,
    pullback,
)


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.LazyLinear(5)).eval()


@pytest.fixture
def model_and_images():
    m = cnn()
    x = torch.rand(2, 3, 10, 10) * 2 - 1
    m(x)  # materialise the lazy layer
    return m, x


@pytest.mark.parametrize(
    "images, targets, kwargs, match",
    [
        (torch.rand(3, 10, 10), 0, {}, r"shape \(N, C, H, W\)"),
        (torch.rand(2, 1, 10, 10), 0, {}, "1 channels but the model's first convolution takes 3"),
        (torch.rand(2, 3, 10, 10), 5, {}, "target class 5 is out of range for a model with 5 outputs"),
        (torch.rand(2, 3, 10, 10), [0, -1], {}, "target class -1 is out of range"),
        (torch.rand(2, 3, 10, 10), [0, 1, 2], {}, r"shape \(N,\) or \(N, K\) with N = 2"),
        (torch.rand(2, 3, 10, 10), [0.5, 1.0], {}, "must be integers"),
        (torch.rand(2, 3, 10, 10), 0, {"temperature": -0.1}, "temperature must be >= 0 and not NaN"),
        (torch.rand(2, 3, 10, 10), 0, {"temperature": math.nan}, "temperature must be >= 0 and not NaN"),
        (torch.rand(2, 3, 10, 10), 0, {"pool_temperature": -1.0}, "temperature must be >= 0"),
        (torch.rand(2, 3, 10, 10), 0, {"gate": "tanh"}, "unknown gate shape 'tanh'"),
        (torch.rand(2, 3, 10, 10), Neuron("conv9", 0), {}, r"unknown layer name 'conv9'"),
        (torch.rand(2, 3, 10, 10), Neuron("0", 7), {}, "channel 7 is out of range"),
        (torch.rand(2, 3, 10, 10), Neuron("0", 0, call=1), {}, "called 1 times; call 1 does not exist"),
        (torch.full((2, 3, 10, 10), math.nan), 0, {}, "NaN or infinite"),
        (torch.zeros(2, 3, 10, 10, dtype=torch.long), 0, {}, "floating-point"),
    ],
)
def test_bad_input_one_clear_error(model_and_images, images, targets, kwargs, match):
    model, _ = model_and_images
    with pytest.raises(ValueError, match=match) as info:
        pullback(model, images, targets, **kwargs)
    assert "\n" not in str(info.value)


def test_unknown_layer_suggests_close_names(model_and_images):
    model, x = model_and_images
    with pytest.raises(ValueError, match=r"^unknown layer name 'zzz'$"):
        pullback(model, x, Neuron("zzz", 0))
    seq = nn.Sequential()
    seq.add_module("features", cnn())
    seq(x)
    with pytest.raises(ValueError, match=r"; did you mean features\.\d"):
        pullback(seq, x, Neuron("features.l", 0))


def test_model_without_relu_or_maxpool():
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 8 * 8, 3)).eval()
    x = torch.rand(2, 3, 10, 10)
    for call in (lambda: pullback(model, x, 0), lambda: ascent(model, x, 0, steps=1), lambda: path_kernel(model, x)):
        with pytest.raises(ValueError, match="no call that a rule covers|no ReLU, SiLU or GELU call"):
            call()


def test_ascent_bad_arguments(model_and_images):
    model, x = model_and_images
    with pytest.raises(ValueError, match="steps >= 0"):
        ascent(model, x, 0, steps=-1)
    with pytest.raises(ValueError, match="unknown layer name"):
        ascent(model, x, Neuron("zzz", 0))


@pytest.mark.parametrize("act, name", [(nn.Hardswish(), "Hardswish"), (nn.Mish(), "Mish")])
def test_ungated_activation_modules_warn(act, name):
    model = nn.Sequential(nn.Conv2d(3, 2, 3), act, nn.ReLU(), nn.Flatten(), nn.Linear(2 * 8 * 8, 3)).eval()
    with pytest.warns(UngatedActivationWarning, match=name):
        pullback(model, torch.rand(1, 3, 10, 10), 0)


def test_ungated_functional_call_warns():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3)

        def forward(self, x):
            return torch.nn.functional.mish(self.conv(x)).relu().mean((2, 3))

    m = M()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with excitation(m):
            M()(torch.rand(1, 3, 8, 8))  # another instance: not this context's model, so nothing to report
    with excitation(m) as report, pytest.warns(UngatedActivationWarning, match="<root>:mish"):
        m(torch.rand(1, 3, 8, 8))
    assert report.ungated == {"<root>:mish": 1} and report.relu_calls == 1


def test_schedule_argument_types():
    with pytest.raises(TypeError, match="schedule"):  # the former make_schedule(schedule=) is gone (0.x)
        make_schedule(schedule=lambda site: Gate())
    with pytest.raises(ValueError, match="max-pool gate"):
        make_schedule(gate="softmax")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_finiteness_check_is_exact(dtype):
    """Finite images whose sum overflows pass; one NaN or infinity anywhere, also among such values, fails."""
    from excitation_pullbacks.checks import check_images

    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU())
    big = torch.full((2, 3, 8, 8), torch.finfo(dtype).max, dtype=dtype)
    check_images(model, big)
    check_images(model, -big)
    for x in (big, torch.rand(2, 3, 8, 8).to(dtype)):
        for bad in (math.nan, math.inf, -math.inf):
            y = x.clone()
            y[1, 2, 3, 4] = bad
            with pytest.raises(ValueError, match="NaN or infinite"):
                check_images(model, y)
