"""Randomisation checks: do the maps depend on the weights (cascading model-parameter randomization, Adebayo
et al. 2018) and on the explained class (random logit, Sixt et al. 2020)?"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..checks import class_targets
from ..explain import Explain
from ..state import preserved_model
from ..stopping import ShouldStop, check_stop
from .similarity import pearson, spearman, ssim

__all__ = ["RandomizationResult", "random_logit", "randomization_check", "randomization_layers"]


def _minmax(v: Tensor) -> Tensor:
    lo = v.flatten(1).min(1).values.view(-1, *(1,) * (v.dim() - 1))
    hi = v.flatten(1).max(1).values.view(-1, *(1,) * (v.dim() - 1))
    return (v - lo) / (hi - lo).clamp_min(torch.finfo(v.dtype).tiny)


@dataclass
class RandomizationResult:
    """Cascading randomization: ``layers`` (L,) in the order randomised (top first, each step keeps the
    earlier ones randomised); ``spearman`` and ``ssim`` (L, N) similarity of each step's maps to the original
    maps (None when not requested); ``original`` (N, C, H, W) the maps of the unmodified model.
    Lower similarity after randomization: the method depends on the parameters (passes the check)."""

    layers: list[str]
    spearman: Tensor | None
    ssim: Tensor | None
    original: Tensor


def _parameterised_layers(model: nn.Module, x: Tensor, batchnorm: str) -> list[str]:
    """Names of modules holding parameters of their own, in the order of their first forward call."""
    named = [(name, m) for name, m in model.named_modules() if _own_parameters(m)]
    if batchnorm == "skip":
        named = [(name, m) for name, m in named if not isinstance(m, nn.modules.batchnorm._NormBase)]
    called: list[str] = []
    handles = [m.register_forward_hook(lambda mod, a, o, name=name: called.append(name)) for name, m in named]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for hd in handles:
            hd.remove()
    seen: list[str] = []
    for name in called:
        if name not in seen:
            seen.append(name)
    return seen


def randomization_layers(
    model: nn.Module, x: Tensor, *, layers: int | Sequence[str] | None = None, batchnorm: str = "skip"
) -> list[str]:
    """The layer names :func:`randomization_check` randomises, in its order (top first). x: (N, C, H, W), one
    image is run to order the layers by their first call; layers and batchnorm as there."""
    if batchnorm not in ("skip", "reset"):
        raise ValueError(f"batchnorm must be skip or reset, got {batchnorm!r}")
    available = _parameterised_layers(model, x.detach(), batchnorm)
    if layers is None:
        return available[::-1]
    if isinstance(layers, int):
        if layers < 0:
            raise ValueError(f"layers must be >= 0, got {layers}")
        return available[::-1][:layers]
    names = list(layers)
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        raise ValueError(f"unknown layer names {missing}; parameterised layers: {available}")
    return names


def _own_parameters(m: nn.Module) -> bool:
    return any(True for _ in m.parameters(recurse=False))


def _reinitialise(module: nn.Module, batchnorm: str) -> None:
    """Re-initialise every module under ``module`` (itself included) that holds parameters of its own."""
    for m in module.modules():
        if not _own_parameters(m):
            continue
        if isinstance(m, nn.modules.batchnorm._NormBase):
            if batchnorm == "reset":
                m.reset_parameters()
        elif hasattr(m, "reset_parameters"):
            m.reset_parameters()
        else:
            with torch.no_grad():
                for p in m.parameters(recurse=False):
                    std = float(p.std()) if p.numel() > 1 else 0.0
                    p.normal_(0.0, std if std > 0 else 1.0)


def _similarities(ref_abs: Tensor, ref_unit: Tensor, maps: Tensor, which: Sequence[str]) -> dict[str, Tensor]:
    m = maps.abs().sum(1)
    out = {}
    if "spearman" in which:
        out["spearman"] = spearman(ref_abs, m)
    if "ssim" in which:
        out["ssim"] = ssim(ref_unit, _minmax(m), data_range=1.0)
    return out


def randomization_check(
    model: nn.Module,
    x: Tensor,
    target,
    explain: Explain,
    *,
    layers: int | Sequence[str] | None = None,
    similarity: Sequence[str] = ("spearman", "ssim"),
    seed: int = 0,
    batchnorm: str = "skip",
    should_stop: ShouldStop = None,
) -> RandomizationResult:
    """Cascading model-parameter randomization (Adebayo et al. 2018), from the output layer to the input.

    model: images -> logits; x: (N, C, H, W); target: (N,); explain(model, x, target) -> (N, C, H, W).
    Works on a deep copy: the user's model is never modified. The parameterised layers (modules holding
    parameters of their own) are ordered by their first call in a forward pass on x[:1] and re-initialised
    one at a time from the last called towards the input, cumulatively; after each step the maps are
    recomputed. layers: None (all), an int k (the top k), or module names in the order to randomise (a
    block's name re-initialises every parameterised module in it at once).
    Re-initialisation: the module's ``reset_parameters()`` (PyTorch's default init, e.g. Kaiming-uniform
    for Conv/Linear) with the RNG seeded by ``seed + step`` (the caller's RNG state is left as it was);
    a module without it gets N(0, s^2) draws, s its parameter's std (1 if 0).
    batchnorm: ``skip`` (default: BatchNorm layers stay as trained, affine parameters and running
    statistics, so the cascade walks the conv / linear layers) or ``reset`` (BatchNorm layers are steps
    too: ``reset_parameters()`` sets weight 1, bias 0, running mean 0, running var 1). Quantus's
    ``ModelParameterRandomisation`` resets every module with ``reset_parameters`` (BatchNorm included, as
    ``reset``) in reverse registration order, reseeding the global RNG with the same seed at each step.
    similarity: any of ``spearman`` (:func:`spearman` of the absolute channel-summed maps) and ``ssim``
    (:func:`ssim` of the absolute channel-summed maps, each min-max scaled to [0, 1]).
    should_stop: called before each step; True ends the call with :class:`~excitation_pullbacks.stopping.Stopped`.
    Returns a :class:`RandomizationResult` with (L, N) tensors. **Lower** similarity after randomization
    means the maps depend on the parameters (the method passes the check); high similarity fails it.
    """
    which = tuple(similarity)
    unknown = set(which) - {"spearman", "ssim"}
    if unknown or not which:
        raise ValueError(f"similarity must be a non-empty subset of spearman, ssim; got {which}")
    if batchnorm not in ("skip", "reset"):
        raise ValueError(f"batchnorm must be skip or reset, got {batchnorm!r}")
    t = class_targets(target, x.shape[0], x.device, grid=False)
    x = x.detach()
    work = copy.deepcopy(model)
    names = randomization_layers(work, x, layers=layers, batchnorm=batchnorm)
    modules = dict(work.named_modules())
    original = explain(work, x, t).detach()
    ref_abs = original.abs().sum(1)
    ref_unit = _minmax(ref_abs)
    rows: dict[str, list[Tensor]] = {k: [] for k in which}
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    for step, name in enumerate(names):
        check_stop(should_stop)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed + step)
            _reinitialise(modules[name], batchnorm)
        maps = explain(work, x, t).detach()
        for k, v in _similarities(ref_abs, ref_unit, maps, which).items():
            rows[k].append(v)
    n = x.shape[0]

    def stack(k: str) -> Tensor | None:
        if k not in rows:
            return None
        return torch.stack(rows[k]) if rows[k] else torch.empty(0, n, device=x.device)

    return RandomizationResult(layers=names, spearman=stack("spearman"), ssim=stack("ssim"), original=original)


def random_logit(
    model: nn.Module,
    x: Tensor,
    target,
    explain: Explain,
    maps: Tensor | None = None,
    *,
    num_classes: int | None = None,
    seed: int = 42,
    off_targets: Tensor | None = None,
    similarity: str = "pearson",
) -> Tensor:
    """Random logit (Sixt et al. 2020), as Quantus ``RandomLogit``. **Lower is better** (the maps change
    with the explained class).

    x: (N, C, H, W); target: (N,); explain(model, x, target) -> (N, C', H, W); maps: the maps of the
    targets (None: computed). Each image is explained again for a class drawn uniformly from the
    ``num_classes - 1`` others (None: the model's number of outputs): r ~ U{0, ..., K - 2} from a torch
    generator seeded with ``seed``, class r + (r >= target), i.e. the r-th other class, as Quantus picks it
    (Quantus draws r with ``np.random.seed(seed); np.random.randint(0, K - 1, N)``, reseeded for each of
    its batches; ``off_targets`` (N,) gives the classes directly). similarity: ``pearson`` (the published
    setting; Quantus's default is SSIM) or ``spearman`` between the flattened maps. Quantus's normalisation
    (a positive factor per call) does not change either.
    Returns (N,) in [-1, 1].
    """
    if similarity not in ("pearson", "spearman"):
        raise ValueError(f"similarity must be pearson or spearman, got {similarity!r}")
    x = x.detach()
    n = x.shape[0]
    t = class_targets(target, n, x.device, grid=False)
    if off_targets is None:
        if num_classes is None:
            with torch.no_grad(), preserved_model(model):
                num_classes = int(model(x[:1]).shape[1])
        if num_classes < 2:
            raise ValueError(f"random_logit needs at least 2 classes, got {num_classes}")
        r = torch.randint(0, num_classes - 1, (n,), generator=torch.Generator().manual_seed(seed)).to(x.device)
        off_targets = r + (r >= t).long()
    off = class_targets(off_targets, n, x.device, grid=False)
    if bool((off == t).any()):
        raise ValueError("off_targets must differ from the targets")
    a = (explain(model, x, t) if maps is None else maps).detach().to(x.dtype)
    b = explain(model, x, off).detach().to(x.dtype)
    return (pearson if similarity == "pearson" else spearman)(a, b)
