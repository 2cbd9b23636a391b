"""timm classifiers through build_model("timm/<name>"): the semantic pullback's sites, and one line offline."""

import pytest
import torch

from excitation_pullbacks import build_model, excitation, preset, pullback
from excitation_pullbacks.models.imagenet import WeightsUnavailableError

pytest.importorskip("timm")


def test_timm_vit_is_gated_and_pulled_back():
    torch.manual_seed(0)
    model = build_model("timm/vit_tiny_patch16_224", weights=None)  # fused attention, LayerNorm, GELU
    x = torch.rand(1, 3, 224, 224) * 2 - 1
    xr = x.clone().requires_grad_(True)
    with excitation(model, preset("semantic")) as report:
        gated = model(xr)
    assert torch.equal(gated, model(xr))
    assert (report.calls("attention"), report.calls("norm"), report.calls("gelu")) == (12, 25, 12)
    assert pullback(model, x, 3, preset("semantic")).shape == x.shape


def test_unknown_and_unreachable_timm_weights_are_one_line():
    with pytest.raises(ValueError, match="unknown timm model"):
        build_model("timm/no_such_net", weights=None)
    try:
        build_model("timm/deit_tiny_patch16_224")  # weights from the Hub: only where a cache or a network has them
    except WeightsUnavailableError as err:
        assert "\n" not in str(err) and "weights=null" in str(err)
