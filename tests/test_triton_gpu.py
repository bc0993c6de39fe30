"""The Triton backend on a real GPU (run by benchmarks/gpu_suite.sh): the CUDA backend's accuracy
grid reused with the Triton launchers (bf16 included, which the interpreter cannot test), 64-bit
offsets, Triton vs CUDA equivalence, and a fused model under bf16 autocast and torch.compile."""
import pytest
import torch

import test_cuda_backend as cb

pytestmark = pytest.mark.gpu


def _skip_reason():
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    try:
        import triton  # noqa: F401
    except Exception as e:
        return f"triton cannot be imported: {e!r}"
    return None


class _TritonLaunchers:
    """The Triton launchers under the names the CUDA backend's test helpers call."""

    def __init__(self):
        from focalnet_kernels.triton import focal_context_bwd_triton, focal_context_fwd_triton
        self.focal_context_fwd_native = focal_context_fwd_triton
        self.focal_context_bwd_native = focal_context_bwd_triton


@pytest.fixture(autouse=True)
def _triton_on_gpu(monkeypatch):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from focalnet_kernels.triton import focal_context_fwd
    assert not focal_context_fwd._INTERPRET, "TRITON_INTERPRET is set: these would test the interpreter, not the GPU"
    launchers = _TritonLaunchers()
    monkeypatch.setattr(cb, "_native", lambda: launchers)


# Kept small: every (dtype, kernel sizes) pair JIT-compiles and autotunes a set of kernels, and the
# GPU suite gives all GPU tests a few minutes.
@pytest.mark.parametrize("dtype", cb.DTYPES)
@pytest.mark.parametrize("L", [1, 2, 3, 4])
def test_levels_and_dtypes(dtype, L):
    cb.run_and_check(2, 13, 17, 64, cb.kernel_sizes(L, 3), dtype, normalize=(L == 4))


@pytest.mark.parametrize("H,W,C", [(56, 56, 96), (28, 28, 192), (14, 14, 384), (7, 7, 768), (7, 9, 20)])
def test_focalnet_t_stage_shapes_bf16(H, W, C):
    cb.run_and_check(2, H, W, C, cb.kernel_sizes(3, 3), torch.bfloat16, normalize=False)


@pytest.mark.parametrize("layout,gout_layout", [("slice", "chfirst"), ("chfirst", "slice"), ("offset1", "contig")])
@pytest.mark.parametrize("dtype", cb.DTYPES)
def test_strided_views(layout, gout_layout, dtype):
    cb.run_and_check(2, 13, 17, 64, cb.kernel_sizes(3, 3), dtype, False, layout, gout_layout)


@pytest.mark.parametrize("ks", [(9, 11, 13), (9, 11, 13, 15), (5, 7, 9)])
def test_detection_windows(ks):
    cb.run_and_check(1, 30, 41, 64, list(ks), torch.bfloat16, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_inf(dtype):
    cb.test_nan_inf_propagation(dtype)


@pytest.mark.slow
def test_64bit_offsets():
    cb.test_64bit_offsets()


@pytest.mark.parametrize("dtype", cb.DTYPES)
def test_triton_matches_cuda_backend(dtype):
    from focalnet_kernels import native
    if not native.available("cuda"):
        pytest.skip("focalnet_kernels._C was built without its cuda backend")
    ctx, gates, weights = cb.make_inputs(4, 56, 56, 96, [3, 5, 7], dtype, "slice")
    gout = cb.make_grad_out(4, 56, 56, 96, dtype)
    t = cb._native()
    out_t, pooled_t = t.focal_context_fwd_native(ctx, gates, weights, False)
    out_c, pooled_c = native.focal_context_fwd_native(ctx, gates, weights, False)
    assert cb.rel_err(out_t, out_c) < cb.TOL[dtype]
    assert cb.rel_err(pooled_t, pooled_c) < 1e-5
    gt = t.focal_context_bwd_native(gout, ctx, gates, weights, pooled_t, False)
    gc = native.focal_context_bwd_native(gout, ctx, gates, weights, pooled_c, False)
    for a, b in zip(list(gt[:2]) + list(gt[2]), list(gc[:2]) + list(gc[2])):
        assert cb.rel_err(a, b) < cb.TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_model_autocast_and_compile(dtype, monkeypatch):
    import focalnet
    from focalnet_kernels import ops
    monkeypatch.setenv("FOCALNET_KERNELS_BACKEND", "triton")
    torch.manual_seed(0)
    eager = focalnet.create_model("focalnet_tiny_lrf", num_classes=10, depths=(1, 1, 2, 1)).cuda().eval()
    fused = focalnet.create_model("focalnet_tiny_lrf", num_classes=10, depths=(1, 1, 2, 1), use_fused=True).cuda().eval()
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(4, 3, 224, 224, device="cuda")
    before = ops.backend_calls["triton:fwd"]
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        want = eager(x).float()
        got = fused(x).float()
        mid = ops.backend_calls["triton:fwd"]
        got_c = torch.compile(fused, fullgraph=True)(x).float()
    assert mid > before
    assert ops.backend_calls["triton:fwd"] - mid >= 5, "the compiled model did not run the Triton kernel per block"
    assert cb.rel_err(got, want) < 2 * cb.TOL[dtype]
    assert cb.rel_err(got_c, want) < 2 * cb.TOL[dtype]
