"""The GPU suite's first tier (benchmarks/gpu_suite.sh runs `-m "gpu and smoke"` before anything else):
every kernel backend (Triton, native CUDA) x forward/backward x fp32/bf16 at one FocalNet-T shape
against the fp64 reference, plus 1x1, single-row / single-column and odd shapes, the public op with
autograd under `auto`, and a fused model. Few shapes on purpose: each new (dtype, kernel sizes,
layout) compiles Triton kernels, and this tier must finish in about a minute and a half.
"""
import pytest
import torch

import test_cuda_backend as cb

pytestmark = [pytest.mark.gpu, pytest.mark.smoke]

BACKENDS = ["cuda", "triton"]  # the backend `auto` runs first: the tier may run out of time in Triton's compiles


class _TritonLaunchers:
    def __init__(self):
        from focalnet_kernels.triton import focal_context_bwd_triton, focal_context_fwd_triton
        self.focal_context_fwd_native = focal_context_fwd_triton
        self.focal_context_bwd_native = focal_context_bwd_triton


def _use_backend(name, monkeypatch):
    """Point test_cuda_backend's helpers at one backend's launchers (skip with the reason if absent)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
    if name == "triton":
        try:
            from focalnet_kernels.triton import focal_context_fwd
        except Exception as e:
            pytest.skip(f"triton cannot be imported: {e!r}")
        assert not focal_context_fwd._INTERPRET, "TRITON_INTERPRET is set: this would test the interpreter"
        launchers = _TritonLaunchers()
        monkeypatch.setattr(cb, "_native", lambda: launchers)
    else:
        reason = cb._skip_reason()
        if reason:
            pytest.skip(reason)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("backend", BACKENDS)
def test_stage1_lrf_slice(backend, dtype, monkeypatch):
    # FocalNet-T stage 1 with ctx and gates as the model passes them: slices of the f output
    _use_backend(backend, monkeypatch)
    cb.run_and_check(2, 56, 56, 96, [3, 5, 7], dtype, False, layout="slice", gout_layout="contig")


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_shapes_srf(backend, monkeypatch):
    # H, W not multiples of any tile, C not a multiple of a channel block, channels-first views
    _use_backend(backend, monkeypatch)
    cb.run_and_check(1, 7, 9, 20, [3, 5], torch.bfloat16, True, layout="chfirst", gout_layout="chfirst")
    cb.run_and_check(2, 13, 17, 20, [3, 5], torch.float32, True, layout="chfirst", gout_layout="chfirst")


@pytest.mark.parametrize("H,W", [(1, 1), (1, 37), (29, 1)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_maps(backend, H, W, monkeypatch):
    _use_backend(backend, monkeypatch)
    cb.run_and_check(3, H, W, 96, [3, 5, 7], torch.bfloat16, False, layout="slice")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_inf(backend, monkeypatch):
    _use_backend(backend, monkeypatch)
    cb.test_nan_inf_propagation(torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_public_op_auto_autograd(dtype):
    """focal_context under `auto` on CUDA tensors: forward and backward through autograd, a fused
    backend ran (not the reference), equal to the fp64 reference."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import focalnet_kernels
    from focalnet_kernels import ops
    B, H, W, C, ks = 2, 28, 28, 192, [3, 5]
    y = torch.randn(B, H, W, 2 * C + len(ks) + 1, device="cuda").to(dtype).requires_grad_()
    ctx, gates = y[..., C:2 * C], y[..., 2 * C:]
    kernels = [(torch.randn(C, 1, k, k, device="cuda") / k).requires_grad_() for k in ks]
    name = ops.select_backend(ctx, ks)
    assert name in ("triton", "cuda"), name
    before = dict(ops.backend_calls)
    out = focalnet_kernels.focal_context(ctx, gates, kernels)
    gout = torch.randn_like(out)
    out.backward(gout)
    assert ops.backend_calls[name + ":fwd"] == before.get(name + ":fwd", 0) + 1
    assert ops.backend_calls[name + ":bwd"] == before.get(name + ":bwd", 0) + 1
    r = cb.reference(ctx, gates, [k.reshape(C, k.shape[-1], k.shape[-1]) for k in kernels], False, gout)
    tol = cb.TOL[dtype]
    assert cb.rel_err(out, r["out"]) < tol
    gy = y.grad
    assert cb.rel_err(gy[..., C:2 * C], r["grad_ctx"]) < tol
    assert cb.rel_err(gy[..., 2 * C:], r["grad_gates"]) < tol
    for k, gw in zip(kernels, r["grad_w"]):
        assert cb.rel_err(k.grad.reshape(gw.shape), gw) < tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_model_bf16(backend, monkeypatch):
    """A small FocalNet-T (LRF) under bf16 autocast: fused == eager, and the kernel ran per block."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if backend == "cuda" and cb._skip_reason():
        pytest.skip(cb._skip_reason())
    import focalnet
    from focalnet_kernels import ops
    monkeypatch.setenv("FOCALNET_KERNELS_BACKEND", backend)
    torch.manual_seed(0)
    eager = focalnet.create_model("focalnet_tiny_lrf", num_classes=10, depths=(1, 1, 2, 1)).cuda().eval()
    fused = focalnet.create_model("focalnet_tiny_lrf", num_classes=10, depths=(1, 1, 2, 1),
                                  use_fused=True).cuda().eval()
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(4, 3, 224, 224, device="cuda")
    before = ops.backend_calls[backend + ":fwd"]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        want = eager(x).float()
        got = fused(x).float()
    assert ops.backend_calls[backend + ":fwd"] - before == 5, "the fused model did not run the kernel per block"
    assert cb.rel_err(got, want) < 2 * cb.TOL[torch.bfloat16]
