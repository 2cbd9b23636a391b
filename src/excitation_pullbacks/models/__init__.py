"""Models: the [-1, 1] ImageNet wrapper and torchvision loading (:mod:`.imagenet`), the digits CNN that ships
with the package and its data (:mod:`.digits`), checkpoints (:mod:`.checkpoint`), and ``build_model`` by name
(:mod:`.build`), zero-initialised heads (:mod:`.heads`)."""

from .build import DIGITS_CNN, DIGITS_WEIGHTS, build_model
from .checkpoint import load_checkpoint, save_state_dict
from .digits import DigitsCNN, digits_images, load_digits_cnn
from .heads import randomize_zero_heads, zero_heads
from .imagenet import IMAGENET_MEAN, IMAGENET_STD, ImageNetInput, WeightsUnavailableError, torchvision_model

__all__ = [
    "DIGITS_CNN",
    "DIGITS_WEIGHTS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DigitsCNN",
    "ImageNetInput",
    "WeightsUnavailableError",
    "build_model",
    "digits_images",
    "load_checkpoint",
    "load_digits_cnn",
    "randomize_zero_heads",
    "save_state_dict",
    "torchvision_model",
    "zero_heads",
]
