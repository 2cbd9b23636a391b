"""Shared test helpers: the torchvision architectures and their call counts, and one check that a model is
left exactly as it was (no leaked hooks or torch-function modes, same parameters, flags and modes)."""

import torch
from torch import nn

ARCHS = ["resnet50", "vgg11_bn", "densenet121"]
# Per forward pass, as a complete implementation must gate them (see DESIGN: call sites).
EXPECTED_CALLS = {"resnet50": (49, 1), "vgg11_bn": (10, 5), "densenet121": (121, 1)}


def model_state(model: nn.Module) -> dict:
    """Everything a gating context or a pullback could leave changed in ``model`` (and in torch)."""
    return {
        "modules": [(n, id(m)) for n, m in model.named_modules()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "flags": [p.requires_grad for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "inplace": [getattr(m, "inplace", None) for m in model.modules()],
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                     for m in model.modules()),
        "modes": torch._C._len_torch_function_stack(),
    }


def assert_model_unchanged(model: nn.Module, before: dict) -> None:
    """Assert ``model`` is as :func:`model_state` recorded it in ``before``, and holds no hooks at all."""
    after = model_state(model)
    assert after["hooks"] == 0, "hooks left on the model"
    assert {k: v for k, v in after.items() if k != "state"} == {k: v for k, v in before.items() if k != "state"}
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], before["state"][k]) for k in before["state"])
