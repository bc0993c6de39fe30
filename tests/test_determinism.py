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
