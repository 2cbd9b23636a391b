"""build_model(..., num_classes=N): a classifier head for N classes, pretrained weights kept for the rest (read
from torch's hub cache, where torchvision looks for downloaded weights), and checkpoints of N-class models."""

from __future__ import annotations

import pytest
import torch
import torchvision.models as tvm
from torch import nn

from excitation_pullbacks.models import build_model, save_state_dict
from excitation_pullbacks.models.digits import CHECKPOINT


def cache_weights(monkeypatch, tmp_path, weights, model: nn.Module) -> dict:
    """``model``'s state dict written where torchvision reads ``weights`` once downloaded (TORCH_HOME's hub
    cache, file name from the weights' URL); returns it."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = tmp_path / "torch" / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[-1]
    path.parent.mkdir(parents=True)
    state = model.state_dict()
    torch.save(state, path)
    return state


def test_fine_tuning_keeps_the_weights_but_for_a_new_head(monkeypatch, tmp_path):
    # SqueezeNet: small, and its head is a 1x1 convolution, not a Linear layer
    torch.manual_seed(5)
    pretrained = cache_weights(monkeypatch, tmp_path, tvm.SqueezeNet1_1_Weights.IMAGENET1K_V1, tvm.squeezenet1_1())
    model = build_model("squeezenet1_1", "IMAGENET1K_V1", num_classes=3)
    state = model.backbone.state_dict()
    assert state["classifier.1.weight"].shape == (3, 512, 1, 1) and state["classifier.1.bias"].shape == (3,)
    assert all(torch.equal(state[k], v) for k, v in pretrained.items() if not k.startswith("classifier.1."))
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 3)
    # the weights' own class count: the model as the weights give it
    full = build_model("squeezenet1_1", "IMAGENET1K_V1", num_classes=1000).backbone.state_dict()
    assert all(torch.equal(full[k], v) for k, v in pretrained.items())


def test_weights_that_leave_more_than_a_head_unset_are_refused(monkeypatch, tmp_path):
    # GoogLeNet's weights hold auxiliary heads its pretrained model drops, a fresh model keeps: no one head
    cache_weights(
        monkeypatch, tmp_path, tvm.GoogLeNet_Weights.IMAGENET1K_V1, tvm.googlenet(aux_logits=True, init_weights=False)
    )
    with pytest.raises(ValueError, match="googlenet has no classifier head to replace"):
        build_model("googlenet", "IMAGENET1K_V1", num_classes=3)


def test_checkpoints_of_n_class_models_load_with_num_classes(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet18", None, num_classes=4, wrap=False)
    path = save_state_dict(model, tmp_path / "m.pt")
    loaded = build_model("resnet18", None, checkpoint=path, num_classes=4, wrap=False)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="fc.weight"):  # the 1000-class model does not fit it
        build_model("resnet18", None, checkpoint=path)
    digits = build_model("digits_cnn", "DEFAULT", num_classes=3)  # the committed weights, a fresh 3-class head
    committed = torch.load(CHECKPOINT, weights_only=True)
    assert digits.classifier.out_features == 3
    assert all(torch.equal(digits.state_dict()[k], v) for k, v in committed.items() if not k.startswith("classifier"))
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        build_model("resnet18", None, num_classes=0)
