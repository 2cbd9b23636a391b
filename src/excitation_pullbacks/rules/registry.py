"""The rule registry: which rule handles which torch callable.

The gating context dispatches every intercepted call through :func:`rule_for`. A new layer type is one file
with a :class:`~excitation_pullbacks.rules.base.Rule` subclass and one :func:`register` call (the built-in
families are registered by ``rules/__init__.py``).
"""

from __future__ import annotations

from collections.abc import Callable

from .base import Rule, binder

__all__ = ["register", "rule_for", "rules", "unregister"]

_RULES: list[Rule] = []
_BY_FUNCTION: dict[Callable, Rule] = {}


def register(rule: Rule) -> Rule:
    """Add ``rule`` (an instance); its callables must not be handled by another registered rule. Returns it."""
    taken = [f for f in rule.functions if f in _BY_FUNCTION and _BY_FUNCTION[f] is not rule]
    if taken:
        names = ", ".join(getattr(f, "__qualname__", repr(f)) for f in taken)
        raise ValueError(f"{names} already handled by {_BY_FUNCTION[taken[0]]!r}")
    for func, stub in rule.functions.items():
        binder(func, stub)  # read now: torch.compile cannot trace inspect.signature inside a graph
    if rule not in _RULES:
        _RULES.append(rule)
    for func in rule.functions:
        _BY_FUNCTION[func] = rule
    return rule


def unregister(rule: Rule) -> None:
    """Remove ``rule`` (e.g. a test's toy rule)."""
    if rule in _RULES:
        _RULES.remove(rule)
    for func in [f for f, r in _BY_FUNCTION.items() if r is rule]:
        del _BY_FUNCTION[func]


def rule_for(func: Callable) -> Rule | None:
    """The registered rule for a torch callable, or None."""
    return _BY_FUNCTION.get(func)


def rules() -> tuple[Rule, ...]:
    """The registered rules in registration order."""
    return tuple(_RULES)
