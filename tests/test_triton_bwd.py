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

pytest.importorskip("triton")

from focalnet_kernels.triton import focal_context_bwd as bwd_mod  # noqa: E402
from focalnet_kernels.triton.focal_context_bwd import REPORT_KERNELS, focal_context_bwd_triton  # noqa: E402
from conftest import contract_reference, make_contract_grad_out, make_contract_inputs, rel_err  # noqa: E402


def run_and_check(B, H, W, C, ks, dtype, normalize, seed=0, ctx_layout="slice", tol=None):
    gen = torch.Generator().manual_seed(seed)
    ctx, gates, weights = make_contract_inputs(B, H, W, C, ks, dtype, ctx_layout, gen=gen)
    grad_out = make_contract_grad_out(B, H, W, C, dtype, gen=gen)
    assert (H * W == 1 and C > 1) or (not ctx.is_contiguous() and not grad_out.is_contiguous())
    r = contract_reference(ctx, gates, weights, normalize, grad_out)
    pooled, rc, rg, rw = r["pooled"].float(), r["grad_ctx"], r["grad_gates"], r["grad_w"]
    gc, gg, gw = focal_context_bwd_triton(grad_out, ctx, gates, weights, pooled, normalize)
    assert gc.dtype == dtype and gc.shape == ctx.shape and gc.is_contiguous()
    assert gg.dtype == dtype and gg.shape == gates.shape and gg.is_contiguous()
    assert len(gw) == len(ks)
    for w, k in zip(gw, ks):
        assert w.dtype == torch.float32 and w.shape == (C, k, k) and w.is_contiguous()
    tol = tol or {torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    errs = {"ctx": rel_err(gc, rc), "gates": rel_err(gg, rg)}
    errs.update({f"w{l}": rel_err(a, b) for l, (a, b) in enumerate(zip(gw, rw))})
    bad = {k: v for k, v in errs.items() if not v < tol}
    assert not bad, f"rel err over {tol}: {bad} (all: {errs})"
    return gc, gg, gw


# A covering subset of H×W {1×1, 7×9, 13×17} × C {1, 20, 64} × L 1..4 × windows 3/5/9 (factor 2)
# × normalize × layouts × fp32/fp16; B = 2 in several.
CASES = [
    # B, H, W, C, kernels, dtype, normalize, ctx layout
    (1, 1, 1, 20, (3,), torch.float32, False, "slice"),
    (2, 1, 1, 64, (5, 7), torch.float32, True, "chfirst"),
    (2, 7, 9, 20, (3, 5, 7, 9), torch.float32, True, "slice"),
    (1, 7, 9, 1, (9, 11), torch.float32, False, "chfirst"),
    (1, 13, 17, 64, (5, 7, 9), torch.float32, False, "slice"),
    (2, 13, 17, 1, (3, 5), torch.float32, True, "chfirst"),
    (2, 13, 17, 20, (9,), torch.float32, False, "slice"),
    (2, 7, 9, 64, (3, 5, 7), torch.float16, True, "slice"),
    (1, 13, 17, 20, (3, 5, 7, 9), torch.float16, False, "chfirst"),
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
    gen = torch.Generator().manual_seed(11)
    ctx, gates, weights = make_contract_inputs(B, H, W, C, ks, torch.float32, "slice", gen=gen)
    grad_out = make_contract_grad_out(B, H, W, C, torch.float32, gen=gen)
    ctx = ctx.clone()
    ctx[1, 3, 4, 5] = float("nan")
    r = contract_reference(ctx, gates, weights, False, grad_out)
    pooled, rc, rg, rw = r["pooled"].float(), r["grad_ctx"], r["grad_gates"], r["grad_w"]
    gc, gg, gw = focal_context_bwd_triton(grad_out, ctx, gates, weights, pooled, False)
    for ours, ref in [(gc, rc), (gg, rg)] + list(zip(gw, rw)):
        assert torch.equal(torch.isnan(ours), torch.isnan(ref))
        assert torch.isnan(ref).any()
    # the image without NaN stays finite and correct
    assert rel_err(gc[0], rc[0]) < 1e-5 and rel_err(gg[0], rg[0]) < 1e-5


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
