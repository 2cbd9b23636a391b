import pytest
import torch
import torchvision.models as tvm

from excitation_pullbacks import ImageNetInput


@pytest.fixture(scope="session")
def tv_models():
    """Random-weight torchvision classifiers in [-1, 1] wrappers, float64, eval mode, built once."""
    cache = {}

    def get(name: str):
        if name not in cache:
            torch.manual_seed(0)
            backbone = tvm.get_model(name, weights=None)
            # Random BN statistics so that pre-activations are not all centred alike.
            for m in backbone.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
                    m.weight.data.uniform_(0.5, 1.5)
                    m.bias.data.uniform_(-0.3, 0.3)
            cache[name] = ImageNetInput(backbone).double().eval()
        return cache[name]

    return get


@pytest.fixture
def images():
    """Two seeded float64 images in [-1, 1], 64 x 64 (VGG's 5 pools need >= 32)."""
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 64, 64, generator=g, dtype=torch.float64) * 2 - 1
