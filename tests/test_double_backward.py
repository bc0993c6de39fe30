"""Double backward of focal_context (gradgradcheck, gradient penalties with create_graph=True).

The first-order backward runs on the backend (a fast kernel); only when that backward is itself
differentiated does the op recompute through the eager reference (focal_context_ref) to form the
second-order terms."""
import pytest
import torch

import focalnet_kernels as fk
from focalnet_kernels import ops
from conftest import kernel_backends, rel_err


def _inputs(B=1, H=3, W=4, C=2, ks=(3, 5), dtype=torch.float64, seed=0, scale=1.0):
    """ctx and gates as views into one f-projection output (the model's layout), all requiring grad."""
    g = torch.Generator().manual_seed(seed)
    L = len(ks)
    y = torch.randn(B, H, W, 2 * C + L + 1, generator=g, dtype=dtype) * scale
    y.requires_grad_(True)
    kernels = [(torch.randn(C, 1, k, k, generator=g, dtype=dtype) / k).requires_grad_(True) for k in ks]
    return y, y[..., C : 2 * C], y[..., 2 * C :], kernels


# full mode (every Jacobian entry) on the smallest case; fast mode (random projections of the
# Jacobians, ~10x quicker) on the larger ones
@pytest.mark.parametrize("ks, normalize, C, fast", [((3,), False, 1, False), ((3, 5), True, 2, True),
                                                    ((5, 3, 3), False, 2, True)])
def test_gradgradcheck_fp64(ks, normalize, C, fast):
    _, ctx, gates, kernels = _inputs(ks=ks, C=C, H=3, W=3 + C, seed=len(ks))
    ctx, gates = ctx.detach().requires_grad_(True), gates.detach().requires_grad_(True)

    def f(c, g, *k):
        return fk.focal_context(c, g, list(k), normalize=normalize)

    assert torch.autograd.gradgradcheck(f, (ctx, gates, *kernels), fast_mode=fast)


def test_gradgradcheck_fp64_some_inputs_without_grad():
    """Only ctx and one kernel require grad; gates and the other kernel are constants."""
    _, ctx, gates, kernels = _inputs(ks=(3, 3), seed=5)
    ctx = ctx.detach().requires_grad_(True)
    k1 = kernels[1].detach()

    def f(c, k0):
        return fk.focal_context(c, gates.detach(), [k0, k1])

    assert torch.autograd.gradgradcheck(f, (ctx, kernels[0]))


def test_the_same_kernel_at_two_levels():
    """One tensor passed at two levels: its gradient is the sum over both, at second order too."""
    _, ctx, gates, kernels = _inputs(ks=(3, 3), seed=6)
    k = kernels[0]
    assert torch.autograd.gradgradcheck(lambda c, kk: fk.focal_context(c, gates.detach(), [kk, kk]),
                                        (ctx.detach().requires_grad_(True), k), fast_mode=True)


def _penalty_second_order(fn, y, C, kernels, weight):
    """A WGAN-GP style penalty: ||d(sum(w * out)) / d(inputs)||^2, then its gradient w.r.t. the inputs."""
    out = fn(y[..., C : 2 * C], y[..., 2 * C :], kernels)
    first = torch.autograd.grad((out * weight).sum(), (y, *kernels), create_graph=True)
    penalty = sum((g ** 2).sum() for g in first)
    return first, torch.autograd.grad(penalty, (y, *kernels))


@pytest.mark.parametrize("name", kernel_backends())
def test_gradient_penalty_fp32_on_the_kernel_backend(backend, name, forbid_eager_dwconv_later):
    """fp32 on a fused backend: the first-order gradients (create_graph=True) come from the kernel (no
    eager depthwise conv runs), and the penalty's second-order gradient matches the fp64 reference."""
    backend(name)
    C, ks = 4, (3, 5, 7)
    y, _, _, kernels = _inputs(B=2, H=6, W=7, C=C, ks=ks, dtype=torch.float32, seed=1)
    weight = torch.randn(2, 6, 7, C, generator=torch.Generator().manual_seed(2))
    bwd_before, ref_before = ops.backend_calls[f"{name}:bwd"], ops.backend_calls["reference:bwd"]
    with forbid_eager_dwconv_later():
        out = fk.focal_context(y[..., C : 2 * C], y[..., 2 * C :], kernels)
        first = torch.autograd.grad((out * weight).sum(), (y, *kernels), create_graph=True)
    assert ops.backend_calls[f"{name}:bwd"] == bwd_before + 1, "the first-order backward left the kernel"
    assert ops.backend_calls["reference:bwd"] == ref_before
    assert all(g.requires_grad for g in first)
    second = torch.autograd.grad(sum((g ** 2).sum() for g in first), (y, *kernels))

    y64 = y.detach().double().requires_grad_(True)
    k64 = [k.detach().double().requires_grad_(True) for k in kernels]
    first64, second64 = _penalty_second_order(fk.focal_context_ref, y64, C, k64, weight.double())
    for a, b in zip(first, first64):
        assert rel_err(a, b) < 1e-5
    for a, b in zip(second, second64):
        assert a.dtype == torch.float32
        assert rel_err(a, b) < 1e-4


def test_plain_backward_does_not_recompute(monkeypatch):
    """create_graph=False (and create_graph=True until the gradients are differentiated): the
    backward is the backend's alone; the eager reference is not called."""
    from focalnet_kernels import reference

    def forbidden(*a, **k):
        raise AssertionError("the eager reference ran in a first-order backward")

    monkeypatch.setattr(reference, "focal_context_ref", forbidden)
    y, ctx, gates, kernels = _inputs(ks=(3,), dtype=torch.float32)
    grads = torch.autograd.grad(fk.focal_context(ctx, gates, kernels).sum(), (y, *kernels))
    assert not any(g.requires_grad for g in grads)
    grads = torch.autograd.grad(fk.focal_context(ctx, gates, kernels).sum(), (y, *kernels), create_graph=True)
    assert all(g.requires_grad for g in grads)


def test_third_order_fp64():
    """The second-order formula is itself differentiable (torch ops on the saved inputs): a third
    derivative matches the reference's."""
    C = 2
    results = []
    for fn in (fk.focal_context, fk.focal_context_ref):
        y, _, _, kernels = _inputs(ks=(3,), seed=3)
        out = fn(y[..., C : 2 * C], y[..., 2 * C :], kernels)
        (g1,) = torch.autograd.grad(out.pow(2).sum(), y, create_graph=True)
        (g2,) = torch.autograd.grad(g1.pow(2).sum(), y, create_graph=True)
        results.append(torch.autograd.grad(g2.sum(), (y, *kernels)))
    for a, b in zip(*results):
        assert rel_err(a, b) < 1e-10


def test_opcheck_of_the_backward_op():
    """focal_context_bwd's autograd registration (the double-backward formula) under opcheck. Not
    test_aot_dispatch_dynamic: torch.compile has no double backward (aot_autograd raises "does not
    currently support double backward"), and torch's own double backward of conv2d needs concrete
    sizes, which that test's symbolic shapes are not."""
    _, ctx, gates, kernels = _inputs(ks=(3, 5), seed=4)
    ctx, gates = ctx.detach().requires_grad_(True), gates.detach().requires_grad_(True)
    _, pooled = ops.focal_context_fwd(ctx.detach(), gates.detach(), [k.detach() for k in kernels], True)
    grad_out = torch.randn_like(ctx).requires_grad_(True)
    torch.library.opcheck(ops.focal_context_bwd, (grad_out, ctx, gates, kernels, pooled, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
