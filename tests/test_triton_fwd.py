"""Fused Triton forward of focal_context vs an fp64 reference of the contract math.

Runs under the Triton CPU interpreter (TRITON_INTERPRET=1), so shapes are tiny.  The local
kernel's tiling is pinned per case (``_force_config``) to cover several tile shapes / channel
blocks, including every GPU config's tile shape, with the same kernel code.
"""
import os
import zlib  # noqa: E402

import pytest  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1":
    # conftest turns the interpreter on only where there is no GPU; setting it here would make every
    # Triton kernel of the session (the GPU tests' too) an interpreted one
    pytest.skip("Triton interpreter tests: run without a GPU (tests/conftest.py sets TRITON_INTERPRET=1)",
                allow_module_level=True)
import torch  # noqa: E402

pytest.importorskip("triton")

from focalnet_kernels.triton import focal_context_fwd as fwd_mod  # noqa: E402
from focalnet_kernels.triton.focal_context_fwd import focal_context_fwd_triton  # noqa: E402
from conftest import TOL, contract_reference, make_contract_inputs, rel_err  # noqa: E402


@pytest.fixture
def pinned():
    saved = list(fwd_mod._fwd_local.configs)
    yield fwd_mod._force_config
    fwd_mod._restore_configs(saved)


# (B, H, W, C, kernel sizes, normalize, layout, dtype, (tile_h, tile_w, block_c))
# A covering subset of {1x1, 7x9, 13x17} x {1, 20, 64} x L=1..4 x {fp32, fp16} x layouts; the
# tiles cover all GPU config shapes (8x8x32, 8x8x64, 8x16x32, 16x16x16) plus small 4x4/4x8 tiles
# (many tile borders, several channel blocks).
CASES = [
    (1, 1, 1, 1, [3], False, "contig", torch.float32, (8, 8, 32)),
    (2, 1, 1, 20, [3, 5], True, "slice", torch.float16, (8, 8, 32)),
    (2, 7, 9, 20, [3, 5], True, "slice", torch.float32, (4, 4, 16)),
    (1, 7, 9, 64, [3, 5, 7], False, "chfirst", torch.float32, (8, 8, 32)),
    (2, 7, 9, 64, [3], False, "slice", torch.float16, (8, 8, 64)),
    (1, 7, 9, 20, [5, 7, 9], True, "chfirst", torch.float16, (8, 16, 16)),
    (1, 13, 17, 1, [5, 7], False, "slice", torch.float16, (8, 8, 16)),
    (1, 13, 17, 20, [3, 5, 7, 9], True, "contig", torch.float32, (16, 16, 32)),
    (1, 13, 17, 64, [9, 11], True, "contig", torch.float16, (8, 16, 64)),
    (1, 13, 17, 20, [3, 5, 7, 9], False, "slice", torch.float16, (16, 16, 16)),
    (2, 13, 17, 64, [3, 5], False, "chfirst", torch.float32, (8, 16, 32)),
    (1, 7, 9, 1, [3, 5, 7, 9], True, "contig", torch.float32, (8, 8, 32)),
    (1, 13, 17, 20, [3], True, "chfirst", torch.float16, (4, 4, 16)),
]


def _id(case):
    B, H, W, C, ks, norm, layout, dtype, tile = case
    return (f"B{B}-{H}x{W}-C{C}-k{'.'.join(map(str, ks))}-{'n' if norm else 'u'}-{layout}-"
            f"{str(dtype).split('.')[-1]}-t{'x'.join(map(str, tile))}")


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_forward_matches_fp64_reference(case, pinned):
    B, H, W, C, ks, normalize, layout, dtype, tile = case
    pinned(*tile)
    gen = torch.Generator().manual_seed(zlib.crc32(_id(case).encode()))
    ctx, gates, weights = make_contract_inputs(B, H, W, C, ks, dtype, layout, gen=gen)
    out, pooled = focal_context_fwd_triton(ctx, gates, weights, normalize)
    r = contract_reference(ctx, gates, weights, normalize)
    ref_out, ref_pooled = r["out"], r["pooled"]

    assert out.shape == (B, H, W, C) and out.dtype == dtype and out.is_contiguous()
    assert pooled.shape == (B, C) and pooled.dtype == torch.float32 and pooled.is_contiguous()
    assert rel_err(out, ref_out) < TOL[dtype], rel_err(out, ref_out)
    # pooled is fp32 math on the (exact) inputs whatever the input dtype
    assert rel_err(pooled, ref_pooled) < 1e-5, rel_err(pooled, ref_pooled)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy inf-inf inside the interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nan_inf_propagate_like_reference(dtype, pinned):
    pinned(8, 8, 16)
    B, H, W, C, ks = 2, 7, 9, 20, [3, 5]
    gen = torch.Generator().manual_seed(7)
    ctx, gates, weights = make_contract_inputs(B, H, W, C, ks, dtype, "slice", gen=gen)
    with torch.no_grad():
        ctx[0, 3, 4, 2] = float("nan")
        ctx[0, 0, 8, 5] = float("inf")   # corner: exercises the zero padding next to an Inf
        ctx[1, 6, 0, 7] = float("-inf")
        ctx[1, 2, 2, 11] = float("inf")
        gates[1, 5, 5, 0] = float("nan")
    out, pooled = focal_context_fwd_triton(ctx, gates, weights, True)
    r = contract_reference(ctx, gates, weights, True)
    ref_out, ref_pooled = r["out"], r["pooled"]
    for got, ref in ((out, ref_out), (pooled, ref_pooled)):
        got = got.double()
        assert torch.equal(torch.isnan(got), torch.isnan(ref))
        assert torch.equal(torch.isinf(got), torch.isinf(ref))
        assert torch.isnan(ref).any()
        fin = torch.isfinite(ref)
        assert fin.any()
        assert rel_err(got[fin], ref[fin]) < TOL[dtype]
        torch.testing.assert_close(got, ref, equal_nan=True, rtol=1e-2, atol=1e-2)


def test_deterministic_and_inputs_untouched(pinned):
    pinned(8, 8, 32)
    gen = torch.Generator().manual_seed(3)
    ctx, gates, weights = make_contract_inputs(2, 5, 9, 20, [3, 5], torch.float32, "slice", gen=gen)
    snap = (ctx.clone(), gates.clone(), [w.clone() for w in weights])
    o1, p1 = focal_context_fwd_triton(ctx, gates, weights, False)
    o2, p2 = focal_context_fwd_triton(ctx, gates, weights, False)
    assert torch.equal(o1, o2) and torch.equal(p1, p2)
    assert torch.equal(ctx, snap[0]) and torch.equal(gates, snap[1])
    assert all(torch.equal(w, s) for w, s in zip(weights, snap[2]))


def test_rejects_bad_arguments():
    ctx = torch.randn(1, 4, 4, 8)
    gates = torch.randn(1, 4, 4, 2)
    with pytest.raises(ValueError):
        focal_context_fwd_triton(ctx, gates, [torch.randn(8, 4, 4)], False)  # even kernel
    with pytest.raises(ValueError):
        focal_context_fwd_triton(ctx, gates, [torch.randn(8, 3, 3)] * 5, False)  # L = 5
    with pytest.raises(ValueError):
        focal_context_fwd_triton(ctx, gates[..., :1], [torch.randn(8, 3, 3)], False)


def test_report_kernels_describe_every_shipped_config():
    entries = fwd_mod.REPORT_KERNELS
    names = {e["name"] + e["config"] for e in entries}
    assert len(names) == len(entries)
    for e in entries:
        assert {"name", "config", "fn", "signature", "constexprs", "attrs", "num_warps",
                "num_stages"} <= set(e)
        args = set(e["fn"].arg_names)
        assert set(e["signature"]) | set(e["constexprs"]) == args
        assert not set(e["signature"]) & set(e["constexprs"])
    cfgs = {(c.kwargs["TILE_H"], c.kwargs["TILE_W"], c.kwargs["BLOCK_C"], c.num_warps)
            for c in fwd_mod._GPU_CONFIGS}
    shipped = {(e["constexprs"]["TILE_H"], e["constexprs"]["TILE_W"], e["constexprs"]["BLOCK_C"],
                e["num_warps"]) for e in entries if "TILE_H" in e["constexprs"]}
    assert cfgs <= shipped
