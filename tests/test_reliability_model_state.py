"""The core never changes the user's model (parameters, buffers, requires_grad and training flags), and the
forward pass is the model's own (train-mode BatchNorm uses the batch's statistics)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from excitation_pullbacks import ascent, pullback
from excitation_pullbacks.attribution import ExcitationPullback
from excitation_pullbacks.baselines import explainer
from excitation_pullbacks.metrics import ascent_scores, deletion, insertion

from helpers import assert_model_unchanged, model_state


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_nothing_changes_the_model(tiny_net, mode):
    tiny_net.train(mode == "train")
    tiny_net[2].training = mode != "train"  # a flag out of line with the rest stays out of line
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    t = torch.tensor([0, 1, 2, 0])
    before = model_state(tiny_net)
    with pytest.warns(UserWarning, match="training mode") if mode == "train" else warnings.catch_warnings():
        if mode == "eval":
            warnings.simplefilter("error")  # no warning in eval mode
        pullback(tiny_net, x, t)
    ascent(tiny_net, x, t, steps=3, step_size=1.0, eps=5.0)
    deletion(tiny_net, x, x, t, steps=4)
    insertion(tiny_net, x, x, t, steps=4)
    ascent_scores(tiny_net, x, x.flip(0), t)
    ExcitationPullback(tiny_net).attribute(x, target=t)
    for method in ("vanilla", "smoothgrad", "integrated_gradients"):
        explainer(method, smoothgrad_samples=2, ig_steps=2)(tiny_net, x, t)
    assert_model_unchanged(tiny_net, before)


def test_train_mode_uses_batch_statistics(tiny_net):
    """The forward pass is the model's own: in train mode BatchNorm normalises with the batch's statistics, so
    the vanilla pullback (T = 0) is the input gradient of the train-mode model."""
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    t = torch.tensor([0, 1, 2, 0])
    tiny_net.train()
    with pytest.warns(UserWarning, match="training mode"):
        got = pullback(tiny_net, x, t, temperature=0)
    reference = copy.deepcopy(tiny_net).train()
    xr = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(reference(xr).gather(1, t[:, None]).sum(), xr)
    torch.testing.assert_close(got, expected)
    tiny_net.eval()
    assert not torch.allclose(pullback(tiny_net, x, t, temperature=0), got)


def test_preserved_model_with_shared_parameters_and_freeze():
    """preserved_model(freeze=True): every parameter frozen inside the block (also one shared by two modules),
    each flag, training flag and buffer restored after it, also after an exception."""
    from excitation_pullbacks.state import preserved_model

    shared = torch.nn.Linear(4, 4)
    net = torch.nn.Sequential(shared, torch.nn.BatchNorm1d(4), shared, torch.nn.Linear(4, 2))
    net[3].weight.requires_grad_(False)
    net[1].eval()
    before = model_state(net)
    with pytest.raises(KeyError), preserved_model(net, freeze=True):
        assert not any(p.requires_grad for p in net.parameters())
        net.train()
        net(torch.rand(3, 4))  # updates the running statistics
        net[1].running_mean = torch.ones(4)  # a buffer object replaced
        raise KeyError
    assert_model_unchanged(net, before)
