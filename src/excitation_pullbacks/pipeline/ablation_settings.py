"""One-at-a-time ablation settings: which parameter a job changes, read by the ``ablation`` resolver.

A job's ``ablation.setting`` is ``default`` or ``<parameter>@<value>`` (``T@0.3``, ``K@10``, ``alpha@5``): the
parameter named takes that value, every other one its default (``ablation.defaults``). Config keys that a
parameter sets read it through the resolver, ``gate.temperature: ${ablation:T}``, so the job's resolved
config (config.yaml, the manifest, W&B) holds the values the job ran with; ``${ablation:methods}`` is the
methods the job scores: ``ablation.methods[<parameter>]``, and for the default every method of any of them.
"""

from __future__ import annotations

import yaml
from omegaconf import DictConfig

__all__ = ["DEFAULT", "METHODS", "ablation_value", "parse_setting"]

#: The setting of the job every other one is compared with.
DEFAULT = "default"
#: The resolver argument that asks for the job's methods instead of a parameter's value.
METHODS = "methods"


def parse_setting(setting: str, parameters) -> tuple[str, object] | None:
    """``default`` -> None; ``<parameter>@<value>`` -> (parameter, value parsed as YAML). Raises ValueError
    for another form or a parameter not among ``parameters``."""
    setting = str(setting)
    if setting == DEFAULT:
        return None
    name, sep, text = setting.partition("@")
    if not sep or not text or name not in parameters:
        raise ValueError(
            f"ablation.setting must be {DEFAULT} or <parameter>@<value> with a parameter among "
            f"{', '.join(map(str, parameters))}; got {setting!r}"
        )
    value = yaml.safe_load(text)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"ablation.setting {setting!r}: the value must be a number")  # noqa: TRY004 (input)
    return name, value


def ablation_value(name: str, *, _root_: DictConfig):
    """The resolver ``${ablation:<parameter>}``: the parameter's value in this job (the setting's value when the
    setting names it, else ``ablation.defaults[<parameter>]``, integers kept integers); ``${ablation:methods}``:
    the methods this job scores."""
    ab = _root_.ablation
    parsed = parse_setting(ab.setting, ab.defaults)
    if name == METHODS:
        if parsed is None:
            return list(dict.fromkeys(str(m) for p in ab.defaults for m in ab.methods[p]))
        return [str(m) for m in ab.methods[parsed[0]]]
    if name not in ab.defaults:
        raise ValueError(f"${{ablation:{name}}}: no such parameter in ablation.defaults ({', '.join(ab.defaults)})")
    default = ab.defaults[name]
    if parsed is None or parsed[0] != name:
        return default
    value = parsed[1]
    if isinstance(default, int) and not isinstance(default, bool):
        if float(value) != int(value):
            raise ValueError(f"ablation.setting {ab.setting!r}: {name} takes whole numbers")
        return int(value)
    return float(value)
