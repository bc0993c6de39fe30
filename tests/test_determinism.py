"""Determinism: every backend gives bit-identical outputs and gradients across runs, by default and
under torch.use_deterministic_algorithms(True) (no float atomics; fixed-order reductions)."""
import pytest
import torch

import focalnet_kernels as fk
from conftest import kernel_backends


def _run(seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(2, 9, 11, 2 * 20 + 4, generator=g, requires_grad=True)
    ks = [torch.randn(20, 1, k, k, generator=g, requires_grad=True) for k in (3, 5, 7)]
    out = fk.focal_context(y[..., 20:40], y[..., 40:], ks, normalize=True)
    grads = torch.autograd.grad(out, (y, *ks), torch.randn(out.shape, generator=g))
    return (out, *grads)


@pytest.mark.parametrize("name", kernel_backends() + ["reference"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_bit_identical_across_runs(name, deterministic, backend):
    backend(name)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        a, b = _run(), _run()
    finally:
        torch.use_deterministic_algorithms(prev)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.skipif("triton" not in kernel_backends(), reason="triton cannot run here")
def test_triton_pins_one_config_under_deterministic_algorithms(backend, monkeypatch):
    """Autotuning may pick another tile in another process (another summation order): under
    use_deterministic_algorithms(True) every autotuned Triton kernel runs its first config."""
    import focalnet_kernels.triton as ft
    seen = []
    for k in ft._AUTOTUNED:
        monkeypatch.setattr(k, "configs", list(k.configs) * 2)  # as if several configs shipped
    real = ft._fwd.focal_context_fwd_triton

    def spy(*a, **kw):
        seen.append([len(k.configs) for k in ft._AUTOTUNED])
        return real(*a, **kw)

    monkeypatch.setattr(ft._fwd, "focal_context_fwd_triton", spy)
    wrapped = ft._deterministic_when_asked(ft._fwd.focal_context_fwd_triton)
    ctx, gates = torch.randn(1, 5, 6, 4), torch.randn(1, 5, 6, 3)
    ws = [torch.randn(4, 3, 3), torch.randn(4, 5, 5)]
    torch.use_deterministic_algorithms(True)
    try:
        wrapped(ctx, gates, ws, False)
    finally:
        torch.use_deterministic_algorithms(False)
    wrapped(ctx, gates, ws, False)
    assert seen[0] == [1, 1, 1]
    assert all(n >= 2 for n in seen[1])
    assert all(len(k.configs) >= 2 for k in ft._AUTOTUNED)  # restored after the call
