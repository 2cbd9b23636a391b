"""Models: the [-1, 1] ImageNet wrapper and torchvision loading (:mod:`.imagenet`), the digits CNN that ships
with the package and its data (:mod:`.digits`), checkpoints (:mod:`.checkpoint`), and ``build_model`` by name
(:mod:`.build`)."""

from .build import DIGITS_CNN, DIGITS_WEIGHTS, build_model
from .checkpoint import load_checkpoint, save_state_dict
from .digits import DigitsCNN, digits_images, load_digits_cnn
from .imagenet import IMAGENET_MEAN, IMAGENET_STD, ImageNetInput, WeightsUnavailableError, torchvision_model

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "ImageNetInput", "build_model", "WeightsUnavailableError", "torchvision_model",
    "DIGITS_CNN", "DIGITS_WEIGHTS", "DigitsCNN", "digits_images", "load_digits_cnn", "load_checkpoint",
    "save_state_dict",
]
