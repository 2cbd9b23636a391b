"""The core's torch files (a model's state dict, a calibrated per-channel schedule) are saved atomically: a save
that fails part-way leaves neither a half-written file nor a temporary one, and an older file as it was."""

from __future__ import annotations

import errno
import pickle

import pytest
import torch
from torch import nn

from excitation_pullbacks.models.checkpoint import save_state_dict
from excitation_pullbacks.saving import save_atomic
from excitation_pullbacks.schedules import PerChannel


class Unpicklable(nn.Linear):
    """A layer whose extra state cannot be pickled: torch.save fails after writing its weights."""

    fail = True

    def get_extra_state(self):
        return (lambda: None) if self.fail else {}

    def set_extra_state(self, state):
        pass


def test_a_failed_state_dict_save_leaves_nothing_and_keeps_the_old_file(tmp_path):
    model = nn.Sequential(nn.Linear(40, 40), Unpicklable(200, 200))
    target = tmp_path / "model.pt"
    Unpicklable.fail = False
    save_state_dict(model, target)
    before = target.read_bytes()
    Unpicklable.fail = True
    with torch.no_grad():
        model[0].weight.add_(1)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        save_state_dict(model, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"] and target.read_bytes() == before
    saved = torch.load(target, weights_only=True)
    assert torch.equal(saved["0.weight"] + 1, model[0].weight)  # still the first save's weights


def test_a_failed_schedule_save_leaves_nothing(tmp_path):
    schedule = PerChannel({"conv1": torch.rand(64)}, meta={"note": lambda: None})
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        schedule.save(tmp_path / "calibration.pt")
    assert list(tmp_path.iterdir()) == []
    PerChannel({"conv1": torch.rand(64)}).save(tmp_path / "calibration.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration.pt"]


def test_a_write_error_names_the_target(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "x.pt"
    real_open = open

    class Full:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, b):
            self.written += len(b)
            if self.written > 1000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr("builtins.open", lambda p, mode="r", *a, **k: Full(real_open(p, mode, *a, **k)))
    with pytest.raises(OSError) as info:
        save_atomic({"x": torch.randn(5000)}, target)
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert list((tmp_path / "sub").iterdir()) == []
