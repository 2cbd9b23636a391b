"""The ``variants`` config node as pullback-variant explain functions (the figures task's ``variants`` figure)."""

from __future__ import annotations

from excitation_pullbacks.explain import Explain
from excitation_pullbacks.schedules import Schedule
from excitation_pullbacks.variants import make_variant

from .errors import PipelineError
from .picklable import Rebuilt

__all__ = ["variant_explainers", "variant_names", "variant_options", "variant_title"]


def _plain(value):
    """An enum member of the structured config as its value (plain values as they are)."""
    return getattr(value, "value", value)


def variant_names(v) -> list[str]:
    """The variants ``v.methods`` names, in order, as plain strings."""
    return [str(_plain(m)) for m in v.methods]


def variant_options(v, name: str) -> dict:
    """The keyword options of variant ``name`` from the ``variants`` config node ``v`` (no gates)."""
    noisy = dict(seed=v.seed, draws_per_pass=int(v.draws_per_pass), batch_size=v.batch_size)
    if name == "pullback_ascent":
        eps = None if v.ascent_eps is None else float(v.ascent_eps)
        return dict(steps=int(v.ascent_steps), step_size=float(v.ascent_step_size), eps=eps, clip=bool(v.ascent_clip))
    if name == "smooth_pullback":
        return dict(samples=int(v.smooth_samples), noise=float(v.smooth_noise), **noisy)
    if name == "fusion_pullback":
        return dict(
            weight_samples=int(v.fusion_weight_samples),
            input_samples=int(v.fusion_input_samples),
            weight_noise=float(v.fusion_weight_noise),
            weight_noise_type=str(_plain(v.fusion_weight_noise_type)),
            noise=float(v.fusion_noise),
            **noisy,
        )
    return dict(batch_size=v.batch_size)  # soft_pullback


def variant_explainers(v, schedule: Schedule | None = None) -> dict[str, Explain]:
    """{variant name: explain function} of ``v.methods`` at the gate ``schedule`` (None: the variants'
    default preset; what validation builds); a bad option -> PipelineError naming it."""
    names = variant_names(v)
    if len(set(names)) != len(names):
        raise PipelineError(f"variants.methods names a variant twice: {names}")
    out = {}
    for name in names:
        try:
            out[name] = Rebuilt(
                make_variant, name, times_input=bool(v.times_input), schedule=schedule, **variant_options(v, name)
            )
        except ValueError as err:
            raise PipelineError(f"variants ({name}): {err}") from None
    return out


def variant_title(v, name: str, temperature: str) -> str:
    """A short panel title for variant ``name`` with its main options, at gate temperature ``temperature``."""
    if name == "pullback_ascent":
        clip = ", clamped" if v.ascent_clip else ""
        what = f"PullbackAscent, K = {v.ascent_steps}, step {v.ascent_step_size:g}{clip}"
    elif name == "smooth_pullback":
        what = f"SmoothPullback, {v.smooth_samples} x std {v.smooth_noise:g}"
    elif name == "fusion_pullback":
        what = f"FusionPullback, {v.fusion_weight_samples} x {v.fusion_input_samples} draws"
    else:
        what = "SoftPullback"
    return f"{'input x ' if v.times_input else ''}{what} (T = {temperature})"
