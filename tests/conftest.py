import pytest
import torch
import torchvision.models as tvm
from torch import nn

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
def tiny_net():
    """A small conv net with BatchNorm (one with a cumulative average), ReLU (one in-place) and max-pool, a
    shifted running mean and one frozen weight: a model whose every state a call could change."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4, momentum=None),  # cumulative average: also counts batches
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    net[1].running_mean.uniform_(-0.5, 0.5)
    net[0].weight.requires_grad_(False)  # a mixed set of flags must come back as it was
    return net


@pytest.fixture
def images():
    """Two seeded float64 images in [-1, 1], 64 x 64 (VGG's 5 pools need >= 32)."""
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 64, 64, generator=g, dtype=torch.float64) * 2 - 1


@pytest.fixture(scope="module")
def served_app(tmp_path_factory):
    """The explorer with the shipped digits CNN on the CPU and a gallery of one test image per digit, served on a
    free local port: ``(url, the gallery's image files in digit order)``."""
    pytest.importorskip("gradio")
    from excitation_pullbacks.app.images import digits_folder, list_images
    from excitation_pullbacks.app.models import ModelSpec
    from excitation_pullbacks.app.page import build_demo

    from helpers import serving

    folder = digits_folder(tmp_path_factory.mktemp("digits"), per_class=1)
    demo = build_demo(
        ModelSpec("digits_cnn", "DEFAULT"), device="cpu", images=folder, work_dir=tmp_path_factory.mktemp("work")
    )
    with serving(demo) as url:
        yield url, list_images(folder)
