"""The public surface: the one schedule argument, ascent bounds, checkpoint errors, and the former import paths."""

import importlib
import warnings

import pytest
import torch
from torch import nn

from excitation_pullbacks import ByType, Gate, as_schedule, ascent, make_schedule, pullback
from excitation_pullbacks.models import DigitsCNN, load_checkpoint, save_state_dict


def _net():
    torch.manual_seed(0)
    return (
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
        .double()
        .eval()
    )


def _x(n=3):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1


# --- as_schedule ------------------------------------------------------------------------------------------


def test_as_schedule_forms():
    s = ByType(Gate("normal_cdf", 0.5))
    assert as_schedule(s) is s
    for none in (as_schedule(), as_schedule(None)):
        assert isinstance(none, ByType) and none.relu.temperature == 0.3 and none.relu.shape == "sigmoid"
        assert none.maxpool.shape == "softmax" and none.maxpool.temperature == 0.3
    num = as_schedule(0.5)
    assert repr(num) == repr(make_schedule(temperature=0.5)) and num.relu.temperature == 0.5
    assert repr(as_schedule(0.5, gate="normal_cdf")) == repr(make_schedule(temperature=0.5, gate="normal_cdf"))
    assert as_schedule(temperature=0.0, gate="hard").is_hard


def test_as_schedule_errors():
    with pytest.raises(ValueError, match="either a Schedule or the gate keywords"):
        as_schedule(make_schedule(), temperature=0.3)
    with pytest.raises(ValueError, match="either as the schedule argument or as temperature"):
        as_schedule(0.3, temperature=0.5)
    with pytest.raises(TypeError, match="tempreature.*temperature, gate, pool_temperature"):
        as_schedule(tempreature=0.3)
    for bad in (True, "0.3", [0.3], torch.ones(3)):
        with pytest.raises(TypeError):
            as_schedule(bad)
    with pytest.raises(ValueError, match=">= 0"):
        as_schedule(-1.0)


def test_one_schedule_argument_in_every_core_function():
    from excitation_pullbacks import ExcitationPullback, excitation, path_kernel
    from excitation_pullbacks.baselines import explainer

    net, x, t = _net(), _x(), torch.tensor([0, 1, 2])
    ref = pullback(net, x, t, temperature=0.5)
    sched = make_schedule(temperature=0.5)
    assert torch.equal(pullback(net, x, t, 0.5), ref)
    assert torch.equal(pullback(net, x, t, schedule=sched), ref)
    assert torch.equal(ExcitationPullback(net, 0.5).attribute(x, target=t), ref)
    assert torch.equal(explainer("excitation", sched)(net, x, t), ref)
    assert torch.equal(explainer("excitation", temperature=0.5)(net, x, t), ref)
    assert torch.equal(path_kernel(net, x, 0.5), path_kernel(net, x, temperature=0.5))
    assert torch.equal(
        ascent(net, x, t, 0.5, steps=2, step_size=0.1), ascent(net, x, t, steps=2, step_size=0.1, temperature=0.5)
    )
    assert repr(excitation(net, 0.5).schedule) == repr(sched)  # Gates compare by identity
    for call in (
        lambda: pullback(net, x, t, temprature=0.5),
        lambda: ascent(net, x, t, step=2),
        lambda: excitation(net, temp=0.5),
        lambda: path_kernel(net, x, gates="hard"),
        lambda: explainer("vanilla", temprature=0.5),
        lambda: ExcitationPullback(net, T=0.5),
    ):
        with pytest.raises(TypeError, match="schedule shorthands are temperature"):
            call()
    # the earlier spelling "a Schedule and gate keywords, the Schedule wins" still runs, with a warning
    with pytest.warns(DeprecationWarning, match="beside a Schedule are ignored"):
        legacy = explainer("excitation", temperature=0.3, schedule=sched)
    assert torch.equal(legacy(net, x, t), ref)


# --- ascent bounds ----------------------------------------------------------------------------------------


def test_ascent_bounds():
    net, x, t = _net(), _x(), torch.tensor([0, 1, 2])
    free = ascent(net, x, t, steps=3, step_size=5.0, eps=50.0, bounds=None)
    assert free.abs().max() > 1.0  # steps of L2 length 5 leave [-1, 1]
    default = ascent(net, x, t, steps=3, step_size=5.0, eps=50.0)
    assert default.min() >= -1.0 and default.max() <= 1.0 and (default.abs() == 1.0).any()
    box = ascent(net, x, t, steps=3, step_size=5.0, eps=50.0, bounds=(-0.5, 2.0))
    assert box.min() >= -0.5 and box.max() <= 2.0 and (box == -0.5).any() and (box > 1.0).any()
    # one step: the clamp is the only difference to the unbounded step
    one_free = ascent(net, x, t, steps=1, step_size=5.0, eps=50.0, bounds=None)
    assert torch.equal(
        ascent(net, x, t, steps=1, step_size=5.0, eps=50.0, bounds=(-0.5, 2.0)), one_free.clamp(-0.5, 2.0)
    )
    with pytest.raises(ValueError, match="bounds"):
        ascent(net, x, t, bounds=(1.0, -1.0))


# --- checkpoints ------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_and_lightning_layout(tmp_path):
    model = DigitsCNN()
    path = save_state_dict(model, tmp_path / "a.pt")
    other = load_checkpoint(DigitsCNN(channels=(16, 32, 64)), path)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in model.state_dict().items())
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, tmp_path / "b.pt")
    load_checkpoint(DigitsCNN(), tmp_path / "b.pt")


def test_checkpoint_errors(tmp_path):
    path = save_state_dict(DigitsCNN(), tmp_path / "good.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(DigitsCNN(), tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file at all" * 10)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    for bad in (corrupt, truncated):
        with pytest.raises(ValueError, match="corrupt|truncated") as err:
            load_checkpoint(DigitsCNN(), bad)
        assert "weights_only=False" not in str(err.value)
    pickled = tmp_path / "pickled.pt"
    torch.save(DigitsCNN(), pickled)  # a whole module, not a state dict
    with pytest.raises(ValueError, match="state_dict") as err:
        load_checkpoint(DigitsCNN(), pickled)
    assert "weights_only=False" not in str(err.value)
    with pytest.raises(ValueError, match="does not fit DigitsCNN.*missing.*unexpected"):
        load_checkpoint(DigitsCNN(), save_state_dict(_net(), tmp_path / "other.pt"))
    with pytest.raises(ValueError, match="does not fit DigitsCNN.*another shape"):
        load_checkpoint(DigitsCNN(), save_state_dict(DigitsCNN(channels=(8, 16, 32)), tmp_path / "narrow.pt"))
    with pytest.raises(ValueError, match="does not fit"):
        from excitation_pullbacks import build_model

        build_model("digits_cnn", checkpoint=tmp_path / "other.pt")


# --- former import paths ----------------------------------------------------------------------------------


def test_former_import_paths():
    from excitation_pullbacks import metrics
    from excitation_pullbacks.ascent import ascent as moved

    assert importlib.import_module("excitation_pullbacks").ascent is moved
    for name in (
        "deletion",
        "insertion",
        "randomization_check",
        "ascent_scores",
        "transfer",
        "spearman",
        "ssim",
        "high_frequency_energy",
        "total_variation",
        "gaussian_blur",
        "Explain",
    ):
        assert callable(getattr(metrics, name)) or name == "Explain"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.import_module("excitation_pullbacks.models")
