"""The Triton modulation tail (focalnet_kernels/triton/modulation_tail.py, focalnet_kernels/modulation.py)
against fp64 references: the kernel alone, the inference op with the global term folded into the GEMM
epilogue, the training path (its forward on the kernel, gradients equal to eager's), NaN/Inf, errors,
the fake implementations under torch.compile.

Without a GPU the kernel runs in the Triton interpreter (fp32, fp16: the interpreter does not do bf16
arithmetic); on a GPU the same tests run on CUDA tensors in fp32, fp16 and bf16.
"""
import os

import pytest
import torch

pytest.importorskip("triton")

import focalnet_kernels as fk  # noqa: E402
from focalnet_kernels import modulation, reference  # noqa: E402
from conftest import TOL, rel_err  # noqa: E402

ON_GPU = torch.cuda.is_available()
if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs a GPU or the Triton interpreter (tests/conftest.py sets it without a GPU)",
                allow_module_level=True)
pytestmark = pytest.mark.gpu   # the GPU suite runs it on CUDA tensors (bf16 too); CI in the interpreter
DEV = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])


@pytest.fixture
def tail_triton(monkeypatch):
    monkeypatch.setenv("FOCALNET_TAIL_BACKEND", "triton")
    fk.backend_calls.clear()


def _inputs(B, H, W, C, L, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(B, H, W, 2 * C + L + 1, generator=g, dtype=torch.float64)
    ks = [torch.randn(C, 1, k, k, generator=g, dtype=torch.float64) * 0.3 for k in (3, 5, 7, 9)[:L]]
    hw = torch.randn(C, C, generator=g, dtype=torch.float64) * scale / C ** 0.5
    hb = torch.randn(C, generator=g, dtype=torch.float64)
    return y, ks, hw, hb


def _to(t, dtype):
    return t.to(device=DEV, dtype=dtype)


# (M rows, C): M not a multiple of the 128-row block; C a multiple of 32, 64, 128 or of nothing. On a
# GPU (where every case is a compile of a few seconds, inside the suite's time box) a covering subset.
KERNEL_CASES = [(77, 40), (300, 96), (129, 128)] if ON_GPU else [(1, 32), (77, 40), (130, 64), (300, 96), (129, 128)]
FLAGS = [(True, True), (False, False)] if ON_GPU else [(True, True), (True, False), (False, True), (False, False)]


@pytest.mark.parametrize("M,C", KERNEL_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_matches_fp64(M, C, dtype):
    from focalnet_kernels.triton.modulation_tail import modulation_tail_triton
    g = torch.Generator().manual_seed(M * 1000 + C)
    ystride = 2 * C + 5          # q is a slice of a wider row, as of the f output
    rows = torch.randn(M, ystride, generator=g, dtype=torch.float64)
    q, x = rows[:, :C], torch.randn(M, C, generator=g, dtype=torch.float64)
    w = torch.randn(C, C, generator=g, dtype=torch.float64) / C ** 0.5
    b = torch.randn(C, generator=g, dtype=torch.float64)
    B = 1 if M < 3 else 3 if M % 3 == 0 else 1
    gate = rows[:, -1]
    gh = torch.randn(B, C, generator=g, dtype=torch.float64)
    qd, xd, wd, bd, gd = (_to(t, dtype) for t in (rows, x, w, b, rows))
    qd, gd = qd[:, :C], gd[:, -1]
    assert qd.stride(0) == ystride and gd.stride(0) == ystride
    for with_bias, with_global in FLAGS:
        got = modulation_tail_triton(qd, xd, wd, bd if with_bias else None,
                                     gate=gd if with_global else None,
                                     global_h=_to(gh, torch.float32) if with_global else None, hw=M // B)
        # the reference from the dtype-rounded inputs, in fp64
        qr, xr, wr, br, gr = (t.to(dtype).double() for t in (q, x, w, b, gate))
        h = xr @ wr.T
        if with_bias:
            h = h + br
        if with_global:
            h = h + gr[:, None] * gh.float().double().repeat_interleave(M // B, 0)
        ref = qr * h
        assert got.dtype == dtype and got.shape == (M, C) and got.is_contiguous()
        assert rel_err(got.cpu(), ref) < TOL[dtype], (with_bias, with_global)


@pytest.mark.parametrize("B,H,W,C,L,normalize", [(2, 5, 7, 24, 3, True), (1, 9, 4, 40, 2, False),
                                                 (3, 1, 1, 32, 1, True)])
@pytest.mark.parametrize("ctx_backend", ["triton", "reference"] + (["cuda"] if ON_GPU else ["cpu"]))
@pytest.mark.parametrize("dtype", DTYPES)
def test_inference_folds_the_global_term(B, H, W, C, L, normalize, ctx_backend, dtype, tail_triton, monkeypatch):
    if ctx_backend == "cuda" and not (fk._C is not None and "cuda" in fk.build_info()["backends"]):
        pytest.skip("the CUDA extension is not built")
    if ctx_backend == "reference" and dtype != torch.float32:
        pytest.skip("the reference backend runs in the tests' fp32/fp64 only")
    monkeypatch.setenv("FOCALNET_KERNELS_BACKEND", ctx_backend)
    y, ks, hw, hb = _inputs(B, H, W, C, L, dtype, seed=B * 100 + H * 10 + C)
    yd = _to(y, dtype)
    ref = modulation.modulation_tail_ref(y[..., :C], reference.focal_context_ref(
        y[..., C:2 * C], y[..., 2 * C:], ks, normalize), hw, hb)
    with torch.no_grad():
        got = fk.focal_modulation(yd, [_to(k, torch.float32) for k in ks], _to(hw, dtype), _to(hb, dtype),
                                  normalize=normalize)
    assert got.dtype == dtype and got.shape == (B, H, W, C)
    assert rel_err(got.cpu(), ref) < TOL[dtype]
    calls = dict(fk.backend_calls)
    assert calls.get(f"{ctx_backend}:fwd") == 1 and calls.get("tail:triton") == 1, calls
    # the CPU kernel adds the global term itself; every other backend leaves it to the tail
    assert calls.get("tail:global-folded", 0) == (0 if ctx_backend == "cpu" else 1), calls


def test_proj_and_autocast_inference(tail_triton):
    """proj applied after the fused op; on a GPU also under autocast (the op's inputs cast to bf16 first,
    proj autocast as F.linear is)."""
    B, H, W, C, L = 2, 4, 5, 32, 2
    y, ks, hw, hb = _inputs(B, H, W, C, L, torch.float32, seed=7)
    pw, pb = torch.randn(48, C, dtype=torch.float64) / C ** 0.5, torch.randn(48, dtype=torch.float64)
    ref = modulation.modulation_tail_ref(y[..., :C], reference.focal_context_ref(
        y[..., C:2 * C], y[..., 2 * C:], ks, False), hw, hb) @ pw.T + pb
    f32 = [_to(t, torch.float32) for t in (y, hw, hb, pw, pb)]
    with torch.no_grad():
        got = fk.focal_modulation(f32[0], [_to(k, torch.float32) for k in ks], *f32[1:])
    assert got.shape == (B, H, W, 48) and rel_err(got.cpu(), ref) < TOL[torch.float32]
    if ON_GPU:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            got = fk.focal_modulation(f32[0], [_to(k, torch.float32) for k in ks], *f32[1:])
        assert got.dtype == torch.bfloat16 and rel_err(got.float().cpu(), ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float32])
def test_training_forward_on_the_kernel_and_gradients(dtype, tail_triton):
    B, H, W, C, L = 2, 5, 6, 24, 3
    y, ks, hw, hb = _inputs(B, H, W, C, L, dtype, seed=11)
    pw, pb = torch.randn(C, C, dtype=torch.float64) / C ** 0.5, torch.randn(C, dtype=torch.float64)
    leaves64 = [t.clone().requires_grad_() for t in (y, *ks, hw, hb, pw, pb)]
    leaves = [_to(t, dtype).requires_grad_() for t in (y, *ks, hw, hb, pw, pb)]

    def run(y_, *rest):
        kk, (h_w, h_b, p_w, p_b) = rest[:L], rest[L:]
        return fk.focal_modulation(y_, list(kk), h_w, h_b, p_w, p_b, normalize=True)

    def run_ref(y_, *rest):
        kk, (h_w, h_b, p_w, p_b) = rest[:L], rest[L:]
        ctx_all = reference.focal_context_ref(y_[..., C:2 * C], y_[..., 2 * C:], kk, True)
        return modulation.modulation_tail_ref(y_[..., :C], ctx_all, h_w, h_b) @ p_w.T + p_b

    grad = torch.randn(B, H, W, C, dtype=torch.float64)
    out = run(*leaves)
    assert fk.backend_calls.get("tail:triton") == 1 and "tail:global-folded" not in fk.backend_calls
    out.backward(_to(grad, dtype))
    ref = run_ref(*leaves64)
    ref.backward(grad)
    assert rel_err(out.detach().cpu(), ref.detach()) < TOL[dtype]
    for i, (a, b) in enumerate(zip(leaves, leaves64)):
        assert rel_err(a.grad.cpu(), b.grad) < 1e-4, i


def test_nan_and_inf_propagate(tail_triton):
    B, H, W, C, L = 1, 4, 4, 32, 2
    y, ks, hw, hb = _inputs(B, H, W, C, L, torch.float32, seed=3)
    y[0, 1, 2, 3] = float("nan")      # q at one position: that position's channel 3 only
    y[0, 3, 0, C + 5] = float("inf")  # ctx: spreads through the levels and the global term
    yd = _to(y, torch.float32)
    with torch.no_grad():
        got = fk.focal_modulation(yd, [_to(k, torch.float32) for k in ks], _to(hw, torch.float32),
                                  _to(hb, torch.float32)).cpu()
    ref = modulation.modulation_tail_ref(y[..., :C], reference.focal_context_ref(
        y[..., C:2 * C], y[..., 2 * C:], ks, False), hw, hb)
    assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.isinf(), ref.isinf())
    assert got.isnan().any()
    fin = ref.isfinite()
    assert rel_err(got[fin], ref[fin]) < TOL[torch.float32]


def test_backend_selection_and_errors(monkeypatch):
    q, x = torch.randn(2, 3, 3, 32, device=DEV), torch.randn(2, 3, 3, 32, device=DEV)
    w, b = torch.randn(32, 32, device=DEV), torch.randn(32, device=DEV)
    monkeypatch.setenv("FOCALNET_TAIL_BACKEND", "auto")   # CUDA tensors only
    assert modulation.select_tail_backend(q, x, w, b) == ("triton" if ON_GPU else "torch")
    monkeypatch.setenv("FOCALNET_TAIL_BACKEND", "torch")
    assert modulation.select_tail_backend(q, x, w, b) == "torch"
    monkeypatch.setenv("FOCALNET_TAIL_BACKEND", "tritn")
    with pytest.raises(ValueError, match="FOCALNET_TAIL_BACKEND='tritn' is not one of auto, triton, torch"):
        modulation.select_tail_backend(q, x, w, b)
    monkeypatch.setenv("FOCALNET_TAIL_BACKEND", "triton")
    assert modulation.select_tail_backend(q, x, w, b) == "triton"
    with pytest.raises(RuntimeError, match=r"FOCALNET_TAIL_BACKEND=triton but the dtypes are"):
        modulation.select_tail_backend(q, x, w.double(), b)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cpu = [t.cpu() for t in (q, x, w, b)]
    with pytest.raises(RuntimeError, match="the tensors are on cpu"):
        modulation.select_tail_backend(*cpu)


def test_kernel_rejects_bad_arguments():
    from focalnet_kernels.triton.modulation_tail import modulation_tail_triton
    q, x, w = torch.randn(10, 32), torch.randn(10, 32), torch.randn(32, 32)
    with pytest.raises(ValueError, match="do not match"):
        modulation_tail_triton(q, x[:, :16], w)
    with pytest.raises(TypeError, match="`w` must be torch.float32"):
        modulation_tail_triton(q, x, w.half())
    with pytest.raises(ValueError, match="bias must be"):
        modulation_tail_triton(q, x, w, torch.randn(31))
    with pytest.raises(ValueError, match="gate and global_h go together"):
        modulation_tail_triton(q, x, w, gate=q[:, 0])
    with pytest.raises(ValueError, match="gate .* and global_h"):
        modulation_tail_triton(q, x, w, gate=q[:, 0], global_h=torch.randn(3, 32), hw=5)
    with pytest.raises(ValueError, match="unit column stride"):
        modulation_tail_triton(q.t().contiguous().t(), x, w)


def test_ops_under_torch_compile(tail_triton):
    """The two ops' fake implementations: fullgraph compile (aot_eager: no Inductor compile here),
    inference op and the training forward, results equal to eager."""
    B, H, W, C, L = 1, 4, 5, 32, 2
    y, ks, hw, hb = _inputs(B, H, W, C, L, torch.float32, seed=5)
    args = [_to(t, torch.float32) for t in (y, hw, hb)]
    kk = [_to(k, torch.float32) for k in ks]

    def f(y_, h_w, h_b):
        return fk.focal_modulation(y_, kk, h_w, h_b)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert rel_err(compiled(*args), f(*args)) < 1e-6
    leaves = [a.clone().requires_grad_() for a in args]
    out = compiled(*leaves)
    out.sum().backward()
    assert all(t.grad is not None for t in leaves)
