"""Metrics (excitation_pullbacks.metrics) against direct, unbatched computations, Quantus, SciPy and skimage."""

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage, stats
from torch import nn

from excitation_pullbacks import metrics as M
from excitation_pullbacks import pullback


def small_cnn(seed: int = 0, classes: int = 5, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return (
        nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(6, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(32, classes),
        )
        .to(dtype)
        .eval()
    )


def deep_cnn(seed: int = 0) -> nn.Module:
    """Five conv + ReLU modules and a linear head (random init): the randomization control's model."""
    torch.manual_seed(seed)
    layers, c = [], 3
    for co in (16, 16, 32, 32, 32):
        layers += [nn.Conv2d(c, co, 3, padding=1), nn.ReLU()]
        c = co
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)).double().eval()


def disc_images(n: int = 4, size: int = 32) -> torch.Tensor:
    """Seeded images of three flat-coloured discs on a grey background, float64 in [-1, 1]."""
    g = torch.Generator().manual_seed(1)
    ax = torch.linspace(-1, 1, size, dtype=torch.float64)
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    out = []
    for _ in range(n):
        img = torch.full((3, size, size), -0.5, dtype=torch.float64)
        for _ in range(3):
            cx, cy, r = torch.rand(3, generator=g, dtype=torch.float64) * torch.tensor([1.2, 1.2, 0.4]) + torch.tensor(
                [-0.6, -0.6, 0.2]
            )
            colour = torch.rand(3, 1, 1, generator=g, dtype=torch.float64) * 2 - 1
            img = torch.where((xx - cx) ** 2 + (yy - cy) ** 2 < r**2, colour.expand(3, size, size), img)
        out.append(img)
    return torch.stack(out)


def gradient(model, x, t):
    x = x.detach().requires_grad_(True)
    return torch.autograd.grad(model(x).gather(1, t[:, None]).sum(), x)[0]


def guided_backprop(model, x, t):
    from captum.attr import GuidedBackprop

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GuidedBackprop(model).attribute(x.detach().requires_grad_(True), target=t).detach()


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model, before) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


# ---------------------------------------------------------------------------------------------------------
# Deletion / insertion
# ---------------------------------------------------------------------------------------------------------


def reference_curve(model, x, maps, t, *, mode, steps, baseline, score, reduce, sigma=5.0):
    """One image at a time, one pixel at a time: x (C, H, W), maps (C', H, W) -> (curve list, AUC)."""
    _, h, w = x.shape
    a = maps.sum(0) if reduce == "sum" else maps.abs().sum(0)
    values = a.reshape(-1).tolist()
    order = sorted(range(h * w), key=lambda i: (-values[i], i))
    if baseline == "mean":
        base = x.mean(dim=(1, 2), keepdim=True).expand_as(x).clone()
    elif baseline == "blur":
        r = math.ceil(3 * sigma)
        base = torch.from_numpy(
            ndimage.gaussian_filter(x.numpy(), sigma=(0, sigma, sigma), mode="nearest", radius=(0, r, r))
        )
    else:
        base = torch.full_like(x, float(baseline))
    cur = x.clone() if mode == "deletion" else base.clone()
    src = base if mode == "deletion" else x

    def value(img):
        with torch.no_grad():
            out = model(img[None])[0]
        return float(out.softmax(0)[t] if score == "probability" else out[t])

    curve, done = [value(cur)], 0
    for k in range(1, steps + 1):
        upto = (k * h * w) // steps
        for i in order[done:upto]:
            cur[:, i // w, i % w] = src[:, i // w, i % w]
        done = upto
        curve.append(value(cur))
    fr = [((k * h * w) // steps) / (h * w) for k in range(steps + 1)]
    auc = sum((fr[k + 1] - fr[k]) * (curve[k] + curve[k + 1]) / 2 for k in range(steps))
    return curve, auc


@pytest.mark.parametrize("mode", ["deletion", "insertion"])
@pytest.mark.parametrize(
    "baseline,score,reduce,ties",
    [
        ("mean", "probability", "sum", False),
        ("blur", "logit", "abs_sum", False),
        (0.25, "probability", "sum", True),
    ],
)
def test_perturbation_matches_pixel_loop(mode, baseline, score, reduce, ties):
    model = small_cnn()
    g = torch.Generator().manual_seed(3)
    x = torch.rand(3, 3, 9, 11, generator=g, dtype=torch.float64) * 2 - 1
    maps = torch.randn(3, 3, 9, 11, generator=g, dtype=torch.float64)
    if ties:  # many equal pixel scores: ties go to the lower flat index
        maps = torch.randint(-2, 3, (3, 1, 9, 11), generator=g).double().expand(-1, 3, -1, -1)
    t = torch.tensor([0, 3, 1])
    steps = 7  # 99 pixels: unequal steps of floor(k * 99 / 7) pixels
    fn = M.deletion if mode == "deletion" else M.insertion
    auc, curves = fn(
        model,
        x,
        maps,
        t,
        steps=steps,
        baseline=baseline,
        score=score,
        reduce=reduce,
        blur_sigma=5.0,
        batch_size=5,
        return_curves=True,
    )
    assert auc.shape == (3,) and curves.shape == (3, steps + 1) and auc.dtype == torch.float64
    for i in range(3):
        ref_curve, ref_auc = reference_curve(
            model, x[i], maps[i], int(t[i]), mode=mode, steps=steps, baseline=baseline, score=score, reduce=reduce
        )
        torch.testing.assert_close(curves[i], torch.tensor(ref_curve, dtype=torch.float64), rtol=1e-12, atol=1e-12)
        assert abs(float(auc[i]) - ref_auc) < 1e-12
    # start and end points: the image itself and the full baseline
    with torch.no_grad():
        p_x = model(x).softmax(1).gather(1, t[:, None])[:, 0]
    if score == "probability":
        torch.testing.assert_close(curves[:, 0 if mode == "deletion" else -1], p_x, rtol=1e-12, atol=1e-12)


def test_perturbation_batching_and_options():
    model = small_cnn()
    g = torch.Generator().manual_seed(4)
    x = torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    maps = torch.randn(4, 8, 8, generator=g, dtype=torch.float64)  # (N, H, W) maps are accepted
    t = torch.tensor([1, 2, 3, 4])
    _, c1 = M.insertion(model, x, maps, t, steps=4, batch_size=1, return_curves=True)
    _, c2 = M.insertion(model, x, maps, t, steps=4, batch_size=64, return_curves=True)
    torch.testing.assert_close(c1, c2, rtol=1e-12, atol=1e-12)
    a3, c3 = M.insertion(model, x, maps, t, steps=4, include_start=False, auc_spacing="step", return_curves=True)
    assert c3.shape == (4, 4)
    torch.testing.assert_close(c3, c1[:, 1:])
    torch.testing.assert_close(a3, c1[:, 2:-1].sum(1) + (c1[:, 1] + c1[:, -1]) / 2)  # np.trapz, dx=1
    with pytest.raises(ValueError, match="baseline"):
        M.deletion(model, x, maps, t, baseline="zeros")
    with pytest.raises(ValueError, match="do not match"):
        M.deletion(model, x, maps[:, :4], t)


def test_blur_matches_scipy():
    g = torch.Generator().manual_seed(5)
    x = torch.rand(2, 3, 12, 7, generator=g, dtype=torch.float64)
    for sigma in (0.8, 2.0, 5.0):
        r = math.ceil(3 * sigma)
        ref = ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, sigma, sigma), mode="nearest", radius=(0, 0, r, r))
        torch.testing.assert_close(M.gaussian_blur(x, sigma=sigma), torch.from_numpy(ref), rtol=1e-12, atol=1e-12)


def test_deletion_insertion_agree_with_quantus_pixel_flipping():
    """Quantus 0.6 PixelFlipping is deletion: curve after each step (no unperturbed point), np.trapz with
    dx=1, features ranked per channel by argsort(-a). Insertion is PixelFlipping started from the baseline
    with a perturbation that copies the original's pixels. Quantus's own AUC (return_auc_per_sample) calls
    np.trapz, which NumPy 2.4 removed: its curves are compared, and integrated as it would (dx=1)."""
    import quantus

    model = small_cnn(dtype=torch.float32)
    g = torch.Generator().manual_seed(6)
    n, c, h, w, steps = 3, 3, 12, 12, 36
    x = torch.rand(n, c, h, w, generator=g) * 2 - 1
    a = torch.randn(n, 1, h, w, generator=g)  # distinct scores: Quantus's unstable argsort cannot reorder
    t = torch.tensor([0, 2, 4])
    fis = c * h * w // steps  # 12 features = 4 pixels x 3 channels per step
    common = {"features_in_step": fis, "abs": False, "normalise": False, "disable_warnings": True}

    q_del = quantus.PixelFlipping(perturb_baseline=0.0, **common)(
        model=model, x_batch=x.numpy(), y_batch=t.numpy(), a_batch=a.numpy(), device="cpu", softmax=True
    )
    auc, curves = M.deletion(
        model, x, a, t, steps=steps, baseline=0.0, include_start=False, auc_spacing="step", return_curves=True
    )
    np.testing.assert_allclose(curves.numpy(), np.asarray(q_del), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(auc.numpy(), np.trapezoid(np.asarray(q_del), dx=1, axis=1), rtol=1e-5)

    base = M.gaussian_blur(x, sigma=2.0)
    source = x.reshape(n, -1).numpy()

    def reveal(arr, indices, source, **kwargs):  # insertion step: take the original's values at indices
        out = arr.copy()
        rows = np.arange(arr.shape[0])[:, None]
        out[rows, indices] = source[rows, indices]
        return out

    q_ins = quantus.PixelFlipping(perturb_func=reveal, perturb_func_kwargs={"source": source}, **common)(
        model=model, x_batch=base.numpy(), y_batch=t.numpy(), a_batch=a.numpy(), device="cpu", softmax=True
    )
    auc, curves = M.insertion(
        model,
        x,
        a,
        t,
        steps=steps,
        baseline="blur",
        blur_sigma=2.0,
        include_start=False,
        auc_spacing="step",
        return_curves=True,
    )
    np.testing.assert_allclose(curves.numpy(), np.asarray(q_ins), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(auc.numpy(), np.trapezoid(np.asarray(q_ins), dx=1, axis=1), rtol=1e-5)


def test_faithful_map_orders_insertion_above_reversed():
    """The model's own input-times-gradient ranks pixels better than its negation (a sanity check)."""
    model = small_cnn()
    x = disc_images(3, 16)
    t = torch.tensor([0, 1, 2])
    maps = pullback(model, x, t, temperature=0) * x
    good = M.insertion(model, x, maps, t, steps=8, baseline="mean", score="logit")
    bad = M.insertion(model, x, -maps, t, steps=8, baseline="mean", score="logit")
    assert (good > bad).all()
    good = M.deletion(model, x, maps, t, steps=8, baseline="mean", score="logit")
    bad = M.deletion(model, x, -maps, t, steps=8, baseline="mean", score="logit")
    assert (good < bad).all()


# ---------------------------------------------------------------------------------------------------------
# Similarities
# ---------------------------------------------------------------------------------------------------------


def test_ssim_matches_skimage():
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(7)
    a = torch.rand(3, 2, 20, 24, generator=g, dtype=torch.float64)
    b = (a + 0.3 * torch.randn(3, 2, 20, 24, generator=g, dtype=torch.float64)).clamp(0, 1)
    b[2] = torch.rand(2, 20, 24, generator=g, dtype=torch.float64)
    kw = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False, "data_range": 1.0}
    ours = M.ssim(a, b, data_range=1.0)
    ref = [structural_similarity(a[i].numpy(), b[i].numpy(), channel_axis=0, **kw) for i in range(3)]
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-10, atol=1e-12)
    ours = M.ssim(a[:, 0], b[:, 0], data_range=1.0)  # (N, H, W)
    ref = [structural_similarity(a[i, 0].numpy(), b[i, 0].numpy(), **kw) for i in range(3)]
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(M.ssim(a, a), torch.ones(3, dtype=torch.float64))
    small = torch.rand(2, 6, 6, generator=g, dtype=torch.float64)  # smaller than the window: clipped window
    torch.testing.assert_close(M.ssim(small, small), torch.ones(2, dtype=torch.float64))
    assert torch.isfinite(M.ssim(small, small.flip(-1))).all()


def test_spearman_matches_scipy():
    g = torch.Generator().manual_seed(8)
    a = torch.randint(0, 6, (4, 5, 7), generator=g).double()  # many ties
    b = a + torch.randint(0, 4, (4, 5, 7), generator=g).double()
    ours = M.spearman(a, b)
    ref = [stats.spearmanr(a[i].reshape(-1).numpy(), b[i].reshape(-1).numpy()).statistic for i in range(4)]
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Randomization check
# ---------------------------------------------------------------------------------------------------------


def test_randomization_guided_backprop_fails_gradient_passes():
    model = deep_cnn(0)
    before = state(model)
    x, t = disc_images(4, 32), torch.arange(4)
    rng = torch.get_rng_state()
    grad = M.randomization_check(model, x, t, gradient, layers=3)
    gb = M.randomization_check(model, x, t, guided_backprop, layers=3)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is left alone
    assert same_state(model, before)
    assert grad.layers == gb.layers == ["12", "8", "6"]  # head first, then the top convolutions
    assert grad.spearman.shape == grad.ssim.shape == (3, 4)
    gs, gm = grad.spearman.mean(1), grad.ssim.mean(1)
    bs, bm = gb.spearman.mean(1), gb.ssim.mean(1)
    # guided backprop barely changes when the top layers are randomised; the gradient does
    assert (bs[:2] > 0.65).all() and (bm[:2] > 0.6).all()
    assert (gs[:2] < bs[:2] - 0.2).all() and (gm[:2] < bm[:2] - 0.3).all()
    assert (gm[:2] < 0.4).all()
    # seeded: the same result again
    again = M.randomization_check(model, x, t, gradient, layers=3)
    torch.testing.assert_close(again.spearman, grad.spearman, rtol=0, atol=0)


def test_randomization_options_and_model_unchanged_on_error():
    model = (
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 3))
        .double()
        .eval()
    )
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].weight.uniform_(0.5, 1.5)
    before = state(model)
    x, t = disc_images(2, 16), torch.tensor([0, 2])
    res = M.randomization_check(model, x, t, gradient, similarity=("ssim",))
    assert res.layers == ["4", "0"] and res.spearman is None and res.ssim.shape == (2, 2)
    res = M.randomization_check(model, x, t, gradient, batchnorm="reset", layers=2)
    assert res.layers == ["4", "1"]
    assert same_state(model, before)
    calls = []

    def failing(m, x, t):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("explain failed")
        return gradient(m, x, t)

    with pytest.raises(RuntimeError, match="explain failed"):
        M.randomization_check(model, x, t, failing)
    assert same_state(model, before)
    with pytest.raises(ValueError, match="unknown layer"):
        M.randomization_check(model, x, t, gradient, layers=["nope"])


def test_randomization_block_names_reinitialise_the_whole_block():
    torch.manual_seed(0)
    model = (
        nn.Sequential(
            nn.Conv2d(3, 4, 3),
            nn.ReLU(),
            nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3)),
            nn.Flatten(),
            nn.Linear(4 * 10 * 10, 3),
        )
        .double()
        .eval()
    )
    before = state(model)
    seen = []

    def recording(m, x, t):
        seen.append(state(m))
        return gradient(m, x, t)

    x, t = disc_images(2, 16), torch.tensor([0, 1])
    res = M.randomization_check(model, x, t, recording, layers=["2"])
    assert res.layers == ["2"] and len(seen) == 2
    changed = {k for k in before if not torch.equal(seen[1][k], before[k])}
    assert changed == {"2.0.weight", "2.0.bias", "2.3.weight", "2.3.bias"}  # BatchNorm skipped by default
    assert same_state(model, before)


def test_randomization_with_excitation_pullback():
    model = deep_cnn(1)
    x, t = disc_images(2, 16), torch.tensor([3, 7])
    res = M.randomization_check(model, x, t, lambda m, x, t: pullback(m, x, t), layers=2)
    assert res.spearman.shape == (2, 2) and torch.isfinite(res.spearman).all() and torch.isfinite(res.ssim).all()
    torch.testing.assert_close(res.original, pullback(model, x, t))


# ---------------------------------------------------------------------------------------------------------
# Ascent and transfer
# ---------------------------------------------------------------------------------------------------------


def test_ascent_scores_match_direct_computation():
    model = small_cnn()
    g = torch.Generator().manual_seed(9)
    x = torch.rand(5, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        top = model(x).argmax(1)
    t = (top + 1) % 5
    t[0] = top[0]  # already the target: not counted in the flip rate
    x_adv = M.transfer(model, {}, x, t, steps=5, step_size=2.0, eps=3.0, vanilla=True).x_adv
    x_adv[4] = x[4]  # no perturbation: gain per L2 undefined
    s = M.ascent_scores(model, x, x_adv, t, batch_size=2)
    for i in range(5):
        with torch.no_grad():
            lo, la = model(x[i : i + 1])[0], model(x_adv[i : i + 1])[0]
        gain = float(la[t[i]] - lo[t[i]])
        l2 = float(torch.sqrt(((x_adv[i] - x[i]) ** 2).sum()))
        assert abs(float(s.gain[i]) - gain) < 1e-12 and abs(float(s.l2[i]) - l2) < 1e-12
        if l2 > 0:
            assert abs(float(s.gain_per_l2[i]) - gain / l2) < 1e-10
        else:
            assert math.isnan(float(s.gain_per_l2[i]))
        if int(lo.argmax()) == int(t[i]):
            assert math.isnan(float(s.flipped[i]))
        else:
            assert float(s.flipped[i]) == float(int(la.argmax()) == int(t[i]))
    assert float(s.l2[:4].max()) <= 3.0 + 1e-9
    flips = s.flipped[~torch.isnan(s.flipped)]
    assert s.flip_rate == pytest.approx(float(flips.mean()))
    # an ascent grid (N, K, C, H, W) with targets (N, K) gives N * K rows
    grid = torch.stack([x_adv, x_adv], 1)
    sg = M.ascent_scores(model, x, grid, torch.stack([t, t], 1))
    torch.testing.assert_close(sg.gain.view(5, 2)[:, 1], s.gain)


def test_transfer_scores_every_model():
    source, other = small_cnn(0), small_cnn(1)
    x = disc_images(3, 16)
    t = torch.tensor([1, 2, 3])
    res = M.transfer(source, {"source": source, "other": other}, x, t, steps=3, step_size=1.0, eps=2.0)
    assert set(res.scores) == {"source", "other"} and res.x_adv.shape == x.shape
    direct = M.transfer_scores({"other": other}, x, res.x_adv, t)["other"]
    torch.testing.assert_close(res.scores["other"].gain, direct.gain)
    assert (res.scores["source"].gain > 0).all()  # ascent raises the source model's target logit
    with torch.no_grad():
        ref = (other(res.x_adv) - other(x)).gather(1, t[:, None])[:, 0]
    torch.testing.assert_close(direct.gain, ref)


# ---------------------------------------------------------------------------------------------------------
# Structure proxies
# ---------------------------------------------------------------------------------------------------------


def test_high_frequency_energy_matches_dft_loop():
    g = torch.Generator().manual_seed(10)
    maps = torch.randn(2, 3, 6, 5, generator=g, dtype=torch.float64)
    maps[1] = maps[1].cumsum(-1).cumsum(-2)  # smoother: less high-frequency energy
    cutoff = 0.6
    ours = M.high_frequency_energy(maps, cutoff=cutoff)
    for n in range(2):
        high = total = 0.0
        for ky in range(6):
            for kx in range(5):
                fy = (ky if ky <= 6 // 2 - (6 % 2 == 0) else ky - 6) / 6  # cycles per pixel (numpy fftfreq)
                fx = (kx if kx <= (5 - 1) // 2 else kx - 5) / 5
                e = 0.0
                for c in range(3):
                    m = maps[n, c].numpy()
                    yy, xx = np.meshgrid(np.arange(6), np.arange(5), indexing="ij")
                    e += abs((m * np.exp(-2j * np.pi * (ky * yy / 6 + kx * xx / 5))).sum()) ** 2
                total += e
                if math.hypot(fy, fx) / 0.5 > cutoff:
                    high += e
        assert abs(float(ours[n]) - high / total) < 1e-12
    assert ours[1] < ours[0]
    torch.testing.assert_close(M.high_frequency_energy(3 * maps, cutoff=cutoff), ours)


def test_total_variation_matches_loop():
    g = torch.Generator().manual_seed(11)
    maps = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    ours = M.total_variation(maps, normalize=False)
    for n in range(2):
        tv = 0.0
        for c in range(3):
            for i in range(5):
                for j in range(4):
                    if i + 1 < 5:
                        tv += abs(float(maps[n, c, i + 1, j] - maps[n, c, i, j]))
                    if j + 1 < 4:
                        tv += abs(float(maps[n, c, i, j + 1] - maps[n, c, i, j]))
        assert abs(float(ours[n]) - tv) < 1e-12
    torch.testing.assert_close(M.total_variation(maps), ours / maps.abs().flatten(1).sum(1))
    torch.testing.assert_close(M.total_variation(-5 * maps), M.total_variation(maps))
    flat = torch.ones(1, 3, 5, 4, dtype=torch.float64)
    assert float(M.total_variation(flat)) == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_metrics_run_on_cuda():
    model = small_cnn().cuda()
    x = disc_images(2, 16).cuda()
    t = torch.tensor([0, 1], device="cuda")
    maps = gradient(model, x, t)
    for fn in (M.deletion, M.insertion):
        cpu = fn(model.cpu(), x.cpu(), maps.cpu(), t.cpu(), steps=4)
        model.cuda()
        gpu = fn(model, x, maps, t, steps=4)
        assert gpu.is_cuda
        torch.testing.assert_close(gpu.cpu(), cpu)
    assert M.high_frequency_energy(maps).is_cuda and M.total_variation(maps).is_cuda
    res = M.randomization_check(model, x, t, gradient, layers=2)
    assert res.ssim.is_cuda
