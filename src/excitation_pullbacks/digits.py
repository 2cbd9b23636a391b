"""The digits CNN and its data, at their former import path: an alias of :mod:`excitation_pullbacks.models.digits`
(training: ``scripts/train_digits.py``)."""

from .models.checkpoint import save_state_dict
from .models.digits import CHECKPOINT, SPLIT_SEED, TEST_FRACTION, DigitsCNN, digits_images, load_digits_cnn

__all__ = [
    "CHECKPOINT",
    "SPLIT_SEED",
    "TEST_FRACTION",
    "DigitsCNN",
    "digits_images",
    "load_digits_cnn",
    "save_state_dict",
]
