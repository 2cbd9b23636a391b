"""Zero-initialised heads: torchvision's ViT head starts at zero, so every logit is a constant and every
pullback 0; ``randomize_zero_heads`` draws it, ``build_model`` does so for random weights, and the figures
task says in one warning line when every map of a batch is 0."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torchvision.models import VisionTransformer

from excitation_pullbacks import build_model, preset, pullback
from excitation_pullbacks.models import load_digits_cnn, randomize_zero_heads, zero_heads
from excitation_pullbacks.pipeline.run import run
from excitation_pullbacks.pipeline.zero_maps import zero_message

from helpers import compose_config


def _tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(16, 8, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16, num_classes=5).eval()


def test_randomize_zero_heads_draws_only_the_zero_layers():
    model = _tiny_vit()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert zero_heads(model) == ["heads.head"]
    assert not pullback(model, x, 1, preset("semantic")).any()  # the silent failure: every map exactly 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert randomize_zero_heads(model, torch.Generator().manual_seed(3)) == ["heads.head"]
    after = model.state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])] == ["heads.head.weight"]
    assert not after["heads.head.bias"].any()
    expected = torch.randn(5, 8, generator=torch.Generator().manual_seed(3)) * 0.02
    assert torch.equal(after["heads.head.weight"], expected)
    assert randomize_zero_heads(model) == []  # nothing left at zero
    assert pullback(model, x, 1, preset("semantic")).abs().sum() > 0
    with pytest.raises(ValueError, match="std must be > 0"):
        randomize_zero_heads(model, std=0.0)


def test_random_weights_build_a_vit_whose_logits_depend_on_the_input():
    torch.manual_seed(1)
    a = build_model("vit_b_16", None)
    torch.manual_seed(1)
    b = build_model("vit_b_16", None)
    head = a.backbone.heads.head.weight
    assert zero_heads(a) == [] and torch.equal(head, b.backbone.heads.head.weight)  # seeded like the rest
    assert 0.015 < float(head.detach().std()) < 0.025
    with torch.no_grad():
        logits = a(torch.rand(2, 3, 224, 224) * 2 - 1)
    assert not torch.equal(logits[0], logits[1])


def test_zero_message_without_a_zero_head():
    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return self.bias + 0 * x.flatten(1)[:, :1]

    assert zero_message(torch.ones(2, 3), Constant()) is None
    message = zero_message(torch.zeros(2, 3), Constant())
    assert message.startswith("every pullback of this batch is 0 (Constant): the model's output does not depend")
    assert "\n" not in message


TASKS = {
    "figures": ["experiment=digits", "ascent=none", "figures=[fig2]", "targets.rows=[0,3]", "batch_size=1"],
    "evaluate": [
        "experiment=evaluate_digits",
        "evaluate.methods=[excitation]",
        "temperatures=[0.3]",
        "evaluate.num_images=2",
        "batch_size=1",
        "evaluate.perturbation_steps=2",
        "evaluate.randomization_images=0",
        "evaluate.ascent_methods=[]",
    ],
}


@pytest.mark.parametrize("task", list(TASKS))
def test_tasks_warn_once_when_every_pullback_is_zero(tmp_path, caplog, task):
    model = load_digits_cnn()
    with torch.no_grad():
        model.classifier.weight.zero_()  # a checkpoint with a zero-initialised head
    torch.save(model.state_dict(), tmp_path / "zero_head.pt")
    cfg = compose_config(
        *TASKS[task],  # two batches of one image: one warning line
        "logger=none",
        f"model.checkpoint={tmp_path / 'zero_head.pt'}",
        f"output_dir={tmp_path / 'out'}",
    )
    with caplog.at_level(logging.WARNING):
        run(cfg)
    lines = [r.getMessage() for r in caplog.records if "of this batch is 0" in r.getMessage()]
    expected = (
        "every pullback of this batch is 0 (DigitsCNN): the model's output does not depend on the input (its layer "
        "classifier has all-zero weights: a zero-initialised head, as torchvision's ViTs start with; load trained "
        "weights, or give it random ones (excitation_pullbacks.models.randomize_zero_heads))"
    )
    assert lines == [expected]
