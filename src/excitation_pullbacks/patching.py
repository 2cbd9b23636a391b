"""Deprecated alias of :mod:`excitation_pullbacks.gating` (the ``excitation(model)`` context and its Report)."""

import warnings

from .gating import Excitation, Report, UngatedActivationWarning, excitation

__all__ = ["Excitation", "Report", "UngatedActivationWarning", "excitation"]

warnings.warn(
    "excitation_pullbacks.patching is deprecated: import from excitation_pullbacks.gating (or the package)",
    DeprecationWarning,
    stacklevel=2,
)
