"""The engine's fast paths against their plain-torch fallbacks: the same gradients (float64 where it matters)."""

import itertools
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm

from excitation_pullbacks import Gate, ImageNetInput, excitation, pullback, soft_max_pool2d, soft_relu
from excitation_pullbacks.canonizers import LeanBatchNorm
from excitation_pullbacks.rules import pool, pool_kernel


@pytest.fixture
def no_kernel(monkeypatch):
    """The pure-torch pool backward only."""
    monkeypatch.setenv("EXCITATION_PULLBACKS_KERNELS", "0")


def _x(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _pool_grad(x, gate, k, s, p, d=1, ceil=False, inplace_relu=False):
    xr = x.clone().requires_grad_(True)
    out = soft_max_pool2d(xr, gate, k, s, p, d, ceil_mode=ceil)
    out = torch.relu_(out) if inplace_relu else torch.relu(out)
    w = _x(out.shape, seed=9)
    (g,) = torch.autograd.grad((out * w).sum(), xr)
    return g


GATES = [
    Gate("softmax", 0.3),
    Gate("softmax", 0.7, detach=True),
    Gate("softmax", 0.3, padding="zero"),
    Gate("softmax", torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64)),
    Gate("none"),
]


@pytest.mark.parametrize("gate", GATES, ids=repr)
@pytest.mark.parametrize(
    "geometry", [(3, 2, 1, 1, False), (2, 2, 0, 1, False), (3, 2, 1, 1, True), (3, 1, 0, 2, False)]
)
def test_chunked_pool_backward_equals_one_chunk(gate, geometry, monkeypatch, no_kernel):
    """Planes in chunks (tiny chunks here: one to a few planes each) give the one-chunk gradient bit for bit."""
    k, s, p, d, ceil = geometry
    x = _x((3, 3, 9, 8))
    whole = _pool_grad(x, gate, k, s, p, d, ceil)
    monkeypatch.setattr(pool, "POOL_CHUNK", 100)
    assert torch.equal(_pool_grad(x, gate, k, s, p, d, ceil), whole)


@pytest.mark.parametrize("gate", GATES[:2], ids=repr)
def test_reused_max_equals_recomputed_max(gate, no_kernel):
    """The backward reuses the forward's max; an in-place change of it (an in-place ReLU) makes it recompute."""
    x = _x((2, 3, 9, 9), seed=4)
    torch.testing.assert_close(
        _pool_grad(x, gate, 3, 2, 1, inplace_relu=True), _pool_grad(x, gate, 3, 2, 1), rtol=1e-12, atol=1e-14
    )


def test_fused_sigmoid_gate_equals_gate_product():
    """ReLU with a float temperature: one softplus_backward pass; a 0-dim tensor temperature: grad * gate(z)."""
    z = _x((4, 5, 6, 6), seed=2) * 30  # also far past the threshold where sigmoid rounds to 1
    grad = _x(z.shape, seed=3)
    grads = []
    for t in (0.3, torch.tensor(0.3, dtype=torch.float64)):
        zr = z.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(soft_relu(zr, Gate("sigmoid", t)), zr, grad)
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-14, atol=1e-300)
    torch.testing.assert_close(grads[0], grad * torch.sigmoid(z / 0.3), rtol=1e-14, atol=1e-300)


POOL_GEOMETRIES = [  # kernel, stride, padding, dilation, ceil_mode
    (2, 2, 0, 1, False),
    (3, 2, 1, 1, False),
    (3, 2, 1, 1, True),
    (3, 1, 1, 1, False),
    (2, 1, 0, 2, False),
    (3, 3, 1, 1, True),
    ((3, 2), (2, 1), (1, 0), (1, 2), True),
]


def test_pool_kernel_builds_where_a_c_compiler_exists(tmp_path):
    """Where a C compiler exists the kernel must build, from an empty cache, in a fresh process (a broken build
    would otherwise pass silently as the torch fallback); the cache then holds the library and nothing else."""
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler")
    code = "from excitation_pullbacks.rules import pool_kernel as k; print(k.available(), k._failed)"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True", "None"], done.stdout + done.stderr
    assert [p.name[:12] for p in (tmp_path / "excitation_pullbacks").iterdir()] == ["pool_kernel_"]
    assert pool_kernel.available(), pool_kernel._failed


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("geometry", POOL_GEOMETRIES, ids=str)
def test_pool_kernel_equals_torch_path(geometry, dtype):
    """The compiled soft-pool backward == the pure-torch one: float64 to 1e-13, float32 to 1e-5 (relative to
    the largest entry), for every padding mode, detach flag and per-channel temperatures."""
    if not pool_kernel.available():
        pytest.skip(f"no soft-pool kernel here: {pool_kernel._failed}")
    k, s, p, d = pool.pool_geometry(*geometry[:4])
    x = _x((2, 3, 11, 9)).to(dtype)
    out = F.max_pool2d(x, k, s, p, d, ceil_mode=geometry[4])
    grad = _x(out.shape, seed=1).to(dtype)
    tol = 1e-13 if dtype == torch.float64 else 1e-5
    for t, padding, detach in itertools.product(
        (0.3, torch.tensor([0.2, 0.5, 1.0], dtype=dtype)), ("exclude", "zero"), (False, True)
    ):
        gate = Gate("softmax", t, detach=detach, padding=padding)
        fast = pool.soft_pool_backward(x, out, grad, gate, k, s, p, d)
        ref = pool.torch_pool_backward(x, out, grad, gate, k, s, p, d)
        assert fast.dtype == dtype and fast.shape == x.shape
        assert (fast - ref).abs().max() <= tol * ref.abs().max(), (t, padding, detach)


def test_pullback_with_and_without_pool_kernel(monkeypatch):
    """A whole pullback through ResNet's 3x3/2 padded soft pool: the same map with the kernel switched off."""
    torch.manual_seed(0)
    model = ImageNetInput(tvm.resnet18(weights=None)).eval().double()
    x, t = _x((2, 3, 48, 48), seed=5), torch.tensor([3, 7])
    fast = pullback(model, x, t, temperature=0.3)
    monkeypatch.setenv("EXCITATION_PULLBACKS_KERNELS", "0")
    torch.testing.assert_close(pullback(model, x, t, temperature=0.3), fast, rtol=1e-12, atol=1e-14)


def _graph_nodes(root) -> list:
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(fn for fn, _ in node.next_functions)
    return [type(node).__name__ for node in seen]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(
    ("arch", "in_place"), [("resnet18", 17), ("vgg11_bn", 8), ("densenet121", 121)], ids=lambda v: str(v)
)
def test_relu_after_batch_norm_runs_in_place(arch, in_place, dtype, monkeypatch):
    """Every in-place ReLU of a BatchNorm output (after ResNet's residual add too) runs in place and
    recomputes z in the backward: the logits are bit for bit the model's and every ReLU is still counted.
    With the pools in torch the gradient is bit for bit the out-of-place path's (which keeps z); with the
    compiled soft-pool kernel, within rounding of it (float64 1e-13, float32 1e-5 of the largest entry)."""
    torch.manual_seed(0)
    model = tvm.get_model(arch, weights=None).eval().to(dtype)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics, so that BatchNorm is not an identity
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = _x((2, 3, 40, 40), seed=6).to(dtype)
    t = torch.tensor([5, 9])
    with torch.no_grad():
        plain = model(x)
    for p in model.parameters():
        p.requires_grad_(False)

    def run():
        xr = x.clone().requires_grad_(True)
        with excitation(model, temperature=0.3, lean_batchnorm=True) as report:
            logits = model(xr)
        nodes = _graph_nodes(logits.grad_fn)
        (g,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), xr)
        return logits, report.relu_calls, nodes, g

    logits, calls, nodes, compiled = run()
    assert torch.equal(logits, plain)
    assert nodes.count("_SoftReLUOfBatchNormBackward") == in_place
    monkeypatch.setenv("EXCITATION_PULLBACKS_KERNELS", "0")  # the pools in torch too
    fused = run()[3]
    monkeypatch.setattr(LeanBatchNorm, "take", lambda self, z: None)
    logits_kept, calls_kept, nodes_kept, kept = run()
    assert "_SoftReLUOfBatchNormBackward" not in nodes_kept
    assert calls == calls_kept and torch.equal(logits_kept, plain)
    assert torch.equal(fused, kept)
    tol = 1e-13 if dtype == torch.float64 else 1e-5
    assert (compiled - kept).abs().max() <= tol * kept.abs().max()
