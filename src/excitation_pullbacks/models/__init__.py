"""Models: the [-1, 1] ImageNet wrapper and torchvision loading (:mod:`.imagenet`), the digits CNN that ships
with the package and its data (:mod:`.digits`), checkpoints (:mod:`.checkpoint`), and ``build_model`` by name
(:mod:`.build`)."""

from .build import DIGITS_CNN, DIGITS_WEIGHTS, build_model
from .checkpoint import load_checkpoint, save_state_dict
from .digits import DigitsCNN, digits_images, load_digits_cnn
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
    "save_state_dict",
    "torchvision_model",
]
