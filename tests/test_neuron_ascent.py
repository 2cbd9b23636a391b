"""Ascent toward a hidden neuron (``Neuron`` targets): each step follows the neuron's pullback."""

import pytest
import torch

from excitation_pullbacks import Neuron, ascent, make_schedule, pullback
from excitation_pullbacks.models.digits import DigitsCNN
from excitation_pullbacks.pipeline.neurons import fig_neurons, neuron_views
from excitation_pullbacks.pipeline.schedules import GateSetting


def _model():
    torch.manual_seed(0)
    return DigitsCNN().double().eval()


def _images():
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1


@pytest.mark.parametrize("neuron", [Neuron("features.6", 3, (4, 4)), Neuron("features.10", 7)])
@pytest.mark.parametrize("temperature", [0.0, 0.3])
def test_first_step_is_the_normalised_neuron_pullback(neuron, temperature):
    model, x = _model(), _images()
    final = ascent(model, x, neuron, temperature, steps=1, step_size=0.5, eps=10.0, bounds=None)
    g = pullback(model, x, neuron, temperature)
    expected = x + 0.5 * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(final, expected, rtol=0, atol=1e-12)


def test_ascent_raises_the_neuron():
    model, x, neuron = _model(), _images(), Neuron("features.9", 7)
    hook_out = []
    handle = model.features[9].register_forward_hook(lambda m, a, o: hook_out.append(o[:, 7].sum((1, 2))))
    with torch.no_grad():
        model(x)
        model(ascent(model, x, neuron, 0.3, steps=5, step_size=0.2, eps=2.0))
    handle.remove()
    assert (hook_out[-1] > hook_out[0]).all()  # the first and last forward: x0 and the result


def test_neuron_ascent_refuses_a_direction():
    with pytest.raises(ValueError, match="Neuron"):
        ascent(_model(), _images(), Neuron("features.6", 0), direction=lambda x, t: x)


def test_neuron_views_and_their_figure():
    model, x = _model().float(), _images().float()
    neurons = [Neuron("features.10", 0), Neuron("features.10", 5)]
    setting = GateSetting("0.3", 0.3, make_schedule(temperature=0.3))
    views = neuron_views(model, x, neurons, setting, steps=1, step_size=0.5, eps=1.0)
    assert views["neuron_excitation"].shape == views["neuron_exc_ascent"].shape == (3, 2, 3, 32, 32)
    torch.testing.assert_close(views["neuron_vanilla"][:, 1], pullback(model, x, neurons[1], 0.0))
    image = fig_neurons(x, views, ["channel 0", "channel 5"], layer="features.10", temperature="0.3")
    assert image.size[0] > 3 * 32 and image.size[1] > 4 * 3 * 32
