"""Triton backward of the focal context against fp64 autograd of the contract math.

Runs the kernels on CPU tensors through the Triton interpreter (tiny shapes). bf16 is not tested
here: the interpreter's bf16 arithmetic is not faithful.
"""
import os

import math  # noqa: E402

import pytest  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1":
    # conftest turns the interpreter on only where there is no GPU; setting it here would make every
    # Triton kernel of the session (the GPU tests' too) an interpreted one
    pytest.skip("Triton interpreter tests: run without a GPU (tests/conftest.py sets TRITON_INTERPRET=1)",
                allow_module_level=True)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from focalnet_kernels.triton import focal_context_bwd as bwd_mod  # noqa: E402
from focalnet_kernels.triton.focal_context_bwd import REPORT_KERNELS, focal_context_bwd_triton  # noqa: E402


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def ref_forward(ctx, gates, weights, normalize):
    """Contract forward in the dtype of its inputs (fp64 here), channels-first conv, exact GELU."""
    L = len(weights)
    x = ctx.permute(0, 3, 1, 2)
    g = gates.permute(0, 3, 1, 2)
    out = 0
    for l, w in enumerate(weights):
        C, k, _ = w.shape
        x = F.gelu(F.conv2d(x, w.reshape(C, 1, k, k), padding=k // 2, groups=C))
        out = out + x * g[:, l : l + 1]
    pooled = x.mean((2, 3))
    out = out + F.gelu(pooled)[:, :, None, None] * g[:, L : L + 1]
    if normalize:
        out = out / (L + 1)
    return out.permute(0, 2, 3, 1), pooled


def make_inputs(B, H, W, C, ks, dtype, seed, ctx_layout="fslice"):
    """ctx/gates: slices of an f-output-like tensor (or a channels-first permuted ctx); grad_out: a
    permuted channels-first tensor. Values are rounded to dtype first, so the fp64 reference sees
    exactly what the kernel sees."""
    gen = torch.Generator().manual_seed(seed)
    L = len(ks)
    f = torch.randn(B, H, W, 2 * C + L + 1 + 3, generator=gen).to(dtype)
    if ctx_layout == "fslice":
        ctx = f[..., C : 2 * C]
    else:  # channels-first storage, permuted to B×H×W×C
        ctx = torch.randn(B, C, H, W + 2, generator=gen).to(dtype)[..., 1 : W + 1].permute(0, 2, 3, 1)
    gates = f[..., 2 * C : 2 * C + L + 1]
    weights = [(torch.randn(C, k, k, generator=gen) * (1.5 / k)).contiguous() for k in ks]
    grad_out = torch.randn(B, C, H, W + 1, generator=gen).to(dtype)[..., :W].permute(0, 2, 3, 1)
    return grad_out, ctx, gates, weights


def reference_grads(grad_out, ctx, gates, weights, normalize):
    c64 = ctx.detach().double().requires_grad_(True)
    g64 = gates.detach().double().requires_grad_(True)
    w64 = [w.detach().double().requires_grad_(True) for w in weights]
    out, pooled = ref_forward(c64, g64, w64, normalize)
    grads = torch.autograd.grad(out, (c64, g64, *w64), grad_out.double())
    return pooled.detach().float(), grads[0], grads[1], list(grads[2:])


def run_and_check(B, H, W, C, ks, dtype, normalize, seed=0, ctx_layout="fslice", tol=None):
    grad_out, ctx, gates, weights = make_inputs(B, H, W, C, ks, dtype, seed, ctx_layout)
    assert (H * W == 1 and C > 1) or (not ctx.is_contiguous() and not grad_out.is_contiguous())
    pooled, rc, rg, rw = reference_grads(grad_out, ctx, gates, weights, normalize)
    gc, gg, gw = focal_context_bwd_triton(grad_out, ctx, gates, weights, pooled, normalize)
    assert gc.dtype == dtype and gc.shape == ctx.shape and gc.is_contiguous()
    assert gg.dtype == dtype and gg.shape == gates.shape and gg.is_contiguous()
    assert len(gw) == len(ks)
    for w, k in zip(gw, ks):
        assert w.dtype == torch.float32 and w.shape == (C, k, k) and w.is_contiguous()
    tol = tol or {torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    errs = {"ctx": rel(gc, rc), "gates": rel(gg, rg)}
    errs.update({f"w{l}": rel(a, b) for l, (a, b) in enumerate(zip(gw, rw))})
    bad = {k: v for k, v in errs.items() if not v < tol}
    assert not bad, f"rel err over {tol}: {bad} (all: {errs})"
    return gc, gg, gw


# A covering subset of H×W {1×1, 7×9, 13×17} × C {1, 20, 64} × L 1..4 × windows 3/5/9 (factor 2)
# × normalize × layouts × fp32/fp16; B = 2 in several.
CASES = [
    # B, H, W, C, kernels, dtype, normalize, ctx layout
    (1, 1, 1, 20, (3,), torch.float32, False, "fslice"),
    (2, 1, 1, 64, (5, 7), torch.float32, True, "cfirst"),
    (2, 7, 9, 20, (3, 5, 7, 9), torch.float32, True, "fslice"),
    (1, 7, 9, 1, (9, 11), torch.float32, False, "cfirst"),
    (1, 13, 17, 64, (5, 7, 9), torch.float32, False, "fslice"),
    (2, 13, 17, 1, (3, 5), torch.float32, True, "cfirst"),
    (2, 13, 17, 20, (9,), torch.float32, False, "fslice"),
    (2, 7, 9, 64, (3, 5, 7), torch.float16, True, "fslice"),
    (1, 13, 17, 20, (3, 5, 7, 9), torch.float16, False, "cfirst"),
]


@pytest.mark.parametrize("B,H,W,C,ks,dtype,normalize,layout", CASES,
                         ids=[f"B{c[0]}-{c[1]}x{c[2]}-C{c[3]}-k{'.'.join(map(str, c[4]))}-"
                              f"{str(c[5]).split('.')[-1]}-n{int(c[6])}-{c[7]}" for c in CASES])
def test_matches_fp64_autograd(B, H, W, C, ks, dtype, normalize, layout):
    run_and_check(B, H, W, C, ks, dtype, normalize, seed=B * 7 + H + C, ctx_layout=layout)


def test_multi_tile_rows_and_determinism(monkeypatch):
    """Few workspace rows (each program walks several tiles and accumulates onto its row) gives the
    same answer; two runs are bit-identical."""
    monkeypatch.setattr(bwd_mod, "MAX_ROWS", 2)
    args = (2, 13, 17, 20, (3, 5), torch.float32, True)
    a = run_and_check(*args, seed=3)
    b = run_and_check(*args, seed=3)
    for x, y in zip(a[:2] + tuple(a[2]), b[:2] + tuple(b[2])):
        assert torch.equal(x, y)
    assert bwd_mod._rows(2, 13, 17, 20, 5) == 2


def test_nan_in_ctx_propagates():
    B, H, W, C, ks = 2, 7, 9, 20, (3, 5)
    grad_out, ctx, gates, weights = make_inputs(B, H, W, C, ks, torch.float32, seed=11)
    ctx = ctx.clone()
    ctx[1, 3, 4, 5] = float("nan")
    pooled, rc, rg, rw = reference_grads(grad_out, ctx, gates, weights, False)
    gc, gg, gw = focal_context_bwd_triton(grad_out, ctx, gates, weights, pooled, False)
    for ours, ref in [(gc, rc), (gg, rg)] + list(zip(gw, rw)):
        assert torch.equal(torch.isnan(ours), torch.isnan(ref))
        assert torch.isnan(ref).any()
    # the image without NaN stays finite and correct
    assert rel(gc[0], rc[0]) < 1e-5 and rel(gg[0], rg[0]) < 1e-5


def test_report_kernels_format():
    """The format of focal_context_fwd.py's docstring: every argument of fn is either typed in
    signature or given in constexprs; names unique."""
    assert REPORT_KERNELS
    names = set()
    for e in REPORT_KERNELS:
        assert set(e) >= {"name", "config", "fn", "signature", "constexprs", "attrs", "num_warps", "num_stages"}
        assert (e["name"], e["config"]) not in names
        names.add((e["name"], e["config"]))
        sig, cst = e["signature"], e["constexprs"]
        assert not set(sig) & set(cst), e["name"]
        assert set(sig) | set(cst) == set(e["fn"].arg_names), e["name"]
        assert all(v in {"*fp32", "*fp16", "*bf16", "i32", "i64", "fp32"} for v in sig.values())
        assert set(e["attrs"]) <= set(sig)
        assert math.log2(e["num_warps"]).is_integer() and e["num_stages"] >= 1
