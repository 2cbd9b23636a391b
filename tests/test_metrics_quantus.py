"""The Quantus-style metrics (excitation_pullbacks.metrics) against Quantus 0.6 itself on the same inputs, maps
and random draws: the trained digits CNN and a random-weight torchvision ResNet18, float64.

Quantus runs the model on ``torch.Tensor(x)``, i.e. in torch's default dtype: the tests set it to float64
while Quantus runs, so both sides compute in float64. Random draws: Quantus draws with numpy's global RNG; the
test seeds it, draws the same values in the same order, passes them to our function and reseeds before
Quantus runs. Maps get a tiny seeded jitter: the digits CNN's gradients are equal in the three colour
channels, and Quantus's numpy quicksort orders tied features arbitrarily where we order them by index.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import numpy as np
import pytest
import scipy.stats
import torch
import torchvision
from captum.attr import Saliency
from captum.metrics import infidelity as captum_infidelity

from excitation_pullbacks import metrics as M
from excitation_pullbacks.models import digits_images, load_digits_cnn

quantus = pytest.importorskip("quantus")

TOL = 1e-9


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: one intra-op thread (several threads on a busy machine only wait for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextmanager
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.set_default_dtype(previous)


def gradient(model, x, t):
    return Saliency(model).attribute(x.detach().requires_grad_(True), target=t, abs=False).detach()


def quantus_gradient(model, inputs, targets, **kwargs):
    """Quantus explain_func: the same gradient in float64."""
    x = torch.as_tensor(np.asarray(inputs), dtype=torch.float64)
    return gradient(model, x, torch.as_tensor(np.asarray(targets)).long()).numpy()


def case_digits():
    model = load_digits_cnn().double().eval()
    x, y = digits_images("test", size=32)
    x, y = x[:6].double(), y[:6]
    return model, x, y


def case_resnet18():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    model = model.double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    return model, x, torch.tensor([3, 9])


CASES = {"digits": case_digits, "resnet18": case_resnet18}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    model, x, y = CASES[request.param]()
    a = gradient(model, x, y)
    a = a + 1e-6 * a.abs().max() * torch.randn(a.shape, generator=torch.Generator().manual_seed(2), dtype=a.dtype)
    return model, x, y, a


def run_quantus(metric, model, x, y, a, **kwargs):
    with float64_default():
        return np.asarray(
            metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a.numpy(), device="cpu", **kwargs),
            dtype=np.float64,
        )


def close(ours, theirs, tol=TOL):
    ours = ours.numpy()
    assert ours.shape == theirs.shape
    assert np.isfinite(ours).all()
    assert np.max(np.abs(ours - theirs)) < tol, (ours, theirs)


@pytest.mark.parametrize("baseline", ["black", "uniform"])
def test_infidelity_equals_quantus(case, baseline):
    model, x, y, a = case
    n, samples, patches = x.shape[0], 2, (16, 8)
    blocks = sum((32 // p) ** 2 for p in patches)
    np.random.seed(5)
    draws = torch.from_numpy(np.random.uniform(-1.0, 1.0, size=(samples, blocks, n)))
    np.random.seed(5)
    q = quantus.Infidelity(
        perturb_patch_sizes=list(patches),
        n_perturb_samples=samples,
        perturb_baseline=baseline,
        perturb_func_kwargs={"uniform_low": -1.0, "uniform_high": 1.0},
        disable_warnings=True,
    )
    theirs = run_quantus(q, model, x, y, a)
    ours = M.infidelity(
        model, x, y, a, patch_sizes=patches, samples=samples, baseline=baseline, uniform_low=-1.0, draws=draws
    )
    close(ours, theirs, tol=1e-9 * max(1.0, float(np.abs(theirs).max())))


def test_infidelity_optimal_scaling_equals_captum(case):
    """The published variant (optimal scaling) against Captum's ``infidelity(normalize=True)`` fed the same
    cumulative block perturbations."""
    model, x, y, a = case
    n, c, h, w = x.shape
    patches, samples = (16, 8), 2
    g = torch.Generator().manual_seed(3)
    draws = torch.rand(samples, 20, n, generator=g, dtype=torch.float64) * 2 - 1
    ours = M.infidelity(model, x, y, a, patch_sizes=patches, samples=samples, baseline="uniform", draws=draws,
                        scaling="optimal")  # fmt: skip
    perturbed = []  # (N, K, C, H, W): every perturbation of every image, in our order
    for s in range(samples):
        offset = 0
        for p in patches:
            per_row = w // p
            current = x.clone()
            for b in range((h // p) * per_row):
                r, col = divmod(b, per_row)
                current[:, :, r * p : (r + 1) * p, col * p : (col + 1) * p] = draws[s, offset + b][:, None, None, None]
                perturbed.append(current.clone())
            offset += (h // p) * per_row
    stack = torch.stack(perturbed, 1)
    k = stack.shape[1]

    def perturb(inputs):
        xp = stack.reshape(n * k, c, h, w)  # Captum repeats each example k times in a row
        return inputs - xp, xp

    theirs = captum_infidelity(model, perturb, x, a, target=y, n_perturb_samples=k, normalize=True)
    close(ours, theirs.numpy(), tol=1e-9 * max(1.0, float(theirs.abs().max())))


def test_faithfulness_correlation_equals_quantus(case):
    model, x, y, a = case
    n, features, runs, size = x.shape[0], x[0].numel(), 12, 64
    np.random.seed(7)
    subsets = []
    for _ in range(runs):
        subsets.append(np.stack([np.random.choice(features, size, replace=False) for _ in range(n)]))
        np.random.uniform(size=n)  # Quantus draws a "uniform" fill value for every call, whatever the baseline
    subsets = torch.from_numpy(np.stack(subsets))
    np.random.seed(7)
    q = quantus.FaithfulnessCorrelation(
        nr_runs=runs, subset_size=size, perturb_baseline="black", return_aggregate=False, disable_warnings=True
    )
    theirs = run_quantus(q, model, x, y, a)
    ours = M.faithfulness_correlation(model, x, y, a, runs=runs, subset_size=size, baseline="black", subsets=subsets)
    close(ours, theirs)


def test_faithfulness_correlation_patches_is_the_published_definition(case):
    """Every 8 px patch replaced by 0 in turn, |maps| summed over it: Pearson with the logit drops (an
    explicit loop, scipy's pearsonr)."""
    model, x, y, a = case
    ours = M.faithfulness_correlation(model, x, y, a, patch_size=8, baseline=0.0, absolute=True)
    with torch.no_grad():
        y0 = model(x).gather(1, y[:, None])[:, 0]
        drops, sums = [], []
        for i in range(4):
            for j in range(4):
                xp = x.clone()
                xp[:, :, 8 * i : 8 * i + 8, 8 * j : 8 * j + 8] = 0.0
                drops.append(y0 - model(xp).gather(1, y[:, None])[:, 0])
                sums.append(a.abs()[:, :, 8 * i : 8 * i + 8, 8 * j : 8 * j + 8].sum((1, 2, 3)))
    expected = [scipy.stats.pearsonr(s, d)[0] for s, d in zip(torch.stack(sums, 1), torch.stack(drops, 1))]
    close(ours, np.array(expected))


@pytest.mark.parametrize(("baseline", "absolute"), [(0.0, True), ("black", False), ("uniform", True)])
def test_faithfulness_estimate_equals_quantus(case, baseline, absolute):
    model, x, y, a = case
    n, step = x.shape[0], 64  # 48 steps of 64 features
    steps = x[0].numel() // step
    np.random.seed(11)
    draws = torch.from_numpy(np.random.uniform(-1.0, 1.0, size=(steps, n)))
    np.random.seed(11)
    q = quantus.FaithfulnessEstimate(
        features_in_step=step,
        perturb_baseline=baseline,
        perturb_func_kwargs={"uniform_low": -1.0, "uniform_high": 1.0},
        abs=absolute,
        disable_warnings=True,
    )
    theirs = run_quantus(q, model, x, y, a)
    ours = M.faithfulness_estimate(
        model, x, y, a, features_in_step=step, baseline=baseline, uniform_low=-1.0, absolute=absolute, draws=draws
    )
    close(ours, theirs)


def test_monotonicity_correlation_equals_quantus(case):
    model, x, y, a = case
    n, step, samples = x.shape[0], 128, 3
    steps = x[0].numel() // step
    np.random.seed(13)
    draws = torch.from_numpy(np.random.uniform(-1.0, 1.0, size=(steps, samples, n)))
    np.random.seed(13)
    q = quantus.MonotonicityCorrelation(
        nr_samples=samples,
        features_in_step=step,
        perturb_baseline="uniform",
        perturb_func_kwargs={"uniform_low": -1.0, "uniform_high": 1.0},
        abs=True,
        eps=1e-12,
        disable_warnings=True,
    )
    theirs = run_quantus(q, model, x, y, a)
    ours = M.monotonicity_correlation(
        model, x, y, a, samples=samples, features_in_step=step, uniform_low=-1.0, eps=1e-12, draws=draws
    )
    close(ours, theirs)


def test_max_sensitivity_equals_quantus(case):
    model, x, y, a = case
    a = gradient(model, x, y)  # the maps must be the explain function's own
    samples, radius = 4, 0.02
    np.random.seed(17)
    noise = torch.from_numpy(
        np.stack([np.random.uniform(-radius, radius, size=(x.shape[0], x[0].numel())) for _ in range(samples)])
    ).reshape(samples, *x.shape)
    np.random.seed(17)
    q = quantus.MaxSensitivity(nr_samples=samples, lower_bound=radius, disable_warnings=True)
    theirs = run_quantus(q, model, x, y, a, explain_func=quantus_gradient)
    ours = M.max_sensitivity(model, x, y, gradient, a, samples=samples, radius=radius, noise=noise)
    close(ours, theirs)
    both = M.max_sensitivity(model, x, y, gradient, a, samples=samples, radius=radius, noise=noise, batch_size=64)
    close(both, theirs)  # several draws per explain call: the same scores


def test_random_logit_equals_quantus(case):
    model, x, y, a = case
    a = gradient(model, x, y)
    np.random.seed(42)  # Quantus reseeds with its seed and draws r in 0..K-2: the r-th class other than y
    r = torch.from_numpy(np.random.randint(0, 10 - 1, x.shape[0]))
    q = quantus.RandomLogit(
        num_classes=10, seed=42, similarity_func=quantus.similarity_func.correlation_pearson, disable_warnings=True
    )
    theirs = run_quantus(q, model, x, y, a, explain_func=quantus_gradient)
    ours = M.random_logit(model, x, y, gradient, a, off_targets=r + (r >= y).long())
    close(ours, theirs)
    drawn = M.random_logit(model, x, y, gradient, a, seed=42)  # our own draw of the classes: still off-target
    assert drawn.shape == ours.shape and torch.isfinite(drawn).all()


def test_focus_equals_quantus():
    g = torch.Generator().manual_seed(0)
    relevance = torch.randn(5, 3, 34, 30, generator=g, dtype=torch.float64)
    quadrants = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 1], [0, 0, 1, 1], [1, 0, 1, 0]])
    q = quantus.Focus(abs=False, normalise=False, return_aggregate=False, disable_warnings=True)
    model, _, _ = case_digits()
    x = torch.zeros(5, 3, 34, 30, dtype=torch.float64)
    with float64_default():
        theirs = np.asarray(
            q(
                model=model,
                x_batch=x.numpy(),
                y_batch=np.zeros(5, dtype=int),
                a_batch=relevance.numpy(),
                custom_batch=quadrants.numpy(),
                channel_first=True,
            )
        )
    close(M.focus(relevance, quadrants), theirs, tol=1e-12)


def test_published_protocol_runs_on_digits():
    """Every metric with the published settings scaled to 32 px: finite scores of the right shape; the draws
    come from a seeded generator and repeat with the seed."""
    model, x, y = case_digits()
    x, y = x[:3], y[:3]
    a = gradient(model, x, y)
    protocol = M.PUBLISHED.scaled(32)
    assert protocol.settings("infidelity")["patch_sizes"] == (16, 8)
    assert protocol.settings("faithfulness_estimate")["features_in_step"] == 64
    for name in M.METRIC_NAMES:
        fn = getattr(M, name)
        options = protocol.settings(name)
        if name in ("max_sensitivity", "random_logit"):
            scores = fn(model, x, y, gradient, a, **options)
        else:
            if "uniform" in options.values():
                options["generator"] = torch.Generator().manual_seed(0)
            scores = fn(model, x, y, a, **options)
            if "generator" in options:
                options["generator"] = torch.Generator().manual_seed(0)
                assert torch.equal(fn(model, x, y, a, **options), scores)
        assert scores.shape == (3,) and torch.isfinite(scores).all(), name
