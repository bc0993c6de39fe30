"""pytest-benchmark micro-benchmarks of focal_context, forward and forward+backward, per backend.

    pytest benchmarks --benchmark-only                  # CPU (small shapes), and the GPU when there is one
    pytest benchmarks --benchmark-only -k cuda          # one device / backend
    pytest benchmarks --benchmark-only --benchmark-json=out.json

Not part of `pytest tests` (testpaths = tests). A backend that cannot run here is skipped with the reason.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from benchmarks.common import env_var, sync  # noqa: E402
from benchmarks.op_bench import OpInputs, backend_skip_reason, focal_context_eager  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BACKENDS = ["eager", "reference", "cpu", "triton", "cuda"]
# small on CPU (2 cores must finish in seconds), FocalNet-T stage 1 and 3 at batch 64 on a GPU
SHAPES = {"cpu": [(2, 28, 28, 64)], "cuda": [(64, 56, 56, 96), (64, 14, 14, 384)]}
DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}


def _cases():
    for dev in DEVICES:
        for shape in SHAPES[dev]:
            for L in (2, 3):
                for backend in BACKENDS:
                    B, H, W, C = shape
                    yield pytest.param(dev, shape, L, backend, id=f"{dev}-{backend}-L{L}-{B}x{H}x{W}x{C}")


def _setup(dev, shape, L, backend, grad):
    device = torch.device(dev)
    dtype = DTYPE[dev]
    reason = backend_skip_reason(backend, device, dtype, L, "inductor")
    if reason:
        pytest.skip(reason)
    inp = OpInputs(*shape, L, dtype, device, requires_grad=grad, seed=0)
    if backend == "eager":
        fn, env = focal_context_eager, None
    else:
        import focalnet_kernels
        fn, env = focalnet_kernels.focal_context, backend
    return device, inp, fn, env


@pytest.mark.parametrize("dev,shape,L,backend", list(_cases()))
def test_focal_context_fwd(benchmark, dev, shape, L, backend):
    device, inp, fn, env = _setup(dev, shape, L, backend, grad=False)

    def run():
        with torch.no_grad():
            out = fn(inp.ctx, inp.gates, inp.kernels)
        sync(device)
        return out

    with env_var("FOCALNET_KERNELS_BACKEND", env):
        run()  # warm-up (Triton JIT)
        out = benchmark(run)
    assert out.shape == inp.ctx.shape


@pytest.mark.parametrize("dev,shape,L,backend", list(_cases()))
def test_focal_context_fwd_bwd(benchmark, dev, shape, L, backend):
    device, inp, fn, env = _setup(dev, shape, L, backend, grad=True)

    def run():
        inp.zero_grads()
        out = fn(inp.ctx, inp.gates, inp.kernels)
        out.backward(inp.grad)
        sync(device)
        return inp.y.grad

    with env_var("FOCALNET_KERNELS_BACKEND", env):
        run()
        g = benchmark(run)
    assert g is not None and g.shape == inp.y.shape
