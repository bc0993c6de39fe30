"""The native CUDA backend of focal_context (csrc/cuda/, ``focalnet_kernels._C``) on a GPU.

Every case runs ``focalnet_kernels.native.focal_context_fwd_native`` / ``_bwd_native`` on CUDA
tensors and compares with an fp64 reference of the contract math written here (channels-first
``F.conv2d`` on fp64 copies, autograd for the backward), computed on the CPU so that it does not
depend on cuDNN. Skipped, with the reason, where there is no GPU or the extension was built
without its cuda backend.
"""
from __future__ import annotations

import pytest
import torch
from conftest import TOL, contract_reference, make_contract_grad_out, make_contract_inputs, rel_err

pytestmark = pytest.mark.gpu

DEVICE = "cuda"  # every tensor of these tests lives here
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _skip_reason():
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    try:
        from focalnet_kernels import native
    except Exception as e:  # pragma: no cover - import problems are reported as the skip reason
        return f"focalnet_kernels.native cannot be imported: {e!r}"
    if not native.available("cuda"):
        return f"focalnet_kernels._C has no cuda backend (build_info={native.build_info()})"
    return None


@pytest.fixture(autouse=True)
def _needs_cuda_backend():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)


def _native():
    from focalnet_kernels import native
    return native


# ------------------------------------------------------------------------------------------
# fp64 reference of docs/backend-contract.md
# ------------------------------------------------------------------------------------------
reference = contract_reference  # fp64 on CPU copies, so that it does not depend on cuDNN


def _check_pooled(pooled, r, tol):
    # pooled is a mean that may cancel to ~0 (C = 1, tiny maps): scale the bound by mean |x_L|.
    err = (pooled.detach().cpu().double() - r["pooled"]).norm().item()
    bound = tol * (r["pooled"].norm().item() + r["pooled_abs"].norm().item()) + 1e-30
    assert err <= bound, f"pooled: |err| {err:.3e} > {bound:.3e}"


# ------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------
def kernel_sizes(L, window, factor=2):
    return [window + factor * lvl for lvl in range(L)]


def make_inputs(B, H, W, C, ks, dtype, layout="contig", seed=0):
    """ctx, gates (views as the layout says: tests/conftest.py), fp32 weights [C,k,k] ~ 1/k, on DEVICE."""
    return make_contract_inputs(B, H, W, C, ks, dtype, layout, seed, device=DEVICE, wscale=1.0)


def make_grad_out(B, H, W, C, dtype, layout="contig", seed=1):
    return make_contract_grad_out(B, H, W, C, dtype, layout, seed, device=DEVICE)


def run_and_check(B, H, W, C, ks, dtype, normalize, layout="contig", gout_layout="contig", backward=True, seed=0):
    nat = _native()
    ctx, gates, weights = make_inputs(B, H, W, C, ks, dtype, layout, seed)
    out, pooled = nat.focal_context_fwd_native(ctx, gates, weights, normalize)
    assert out.shape == (B, H, W, C) and out.dtype == dtype and out.is_contiguous()
    assert pooled.shape == (B, C) and pooled.dtype == torch.float32
    tol = TOL[dtype]
    gout = make_grad_out(B, H, W, C, dtype, gout_layout, seed + 1) if backward else None
    r = reference(ctx, gates, weights, normalize, gout)
    errs = {"out": rel_err(out, r["out"])}
    _check_pooled(pooled, r, tol)
    if backward:
        gctx, ggates, gw = nat.focal_context_bwd_native(gout, ctx, gates, weights, pooled, normalize)
        assert gctx.shape == ctx.shape and gctx.dtype == dtype and gctx.is_contiguous()
        assert ggates.shape == gates.shape and ggates.dtype == dtype and ggates.is_contiguous()
        assert [tuple(g.shape) for g in gw] == [tuple(w.shape) for w in weights]
        assert all(g.dtype == torch.float32 for g in gw)
        errs["grad_ctx"] = rel_err(gctx, r["grad_ctx"])
        errs["grad_gates"] = rel_err(ggates, r["grad_gates"])
        for lvl in range(len(ks)):
            errs[f"grad_w{lvl}"] = rel_err(gw[lvl], r["grad_w"][lvl])
    bad = {k: v for k, v in errs.items() if not v < tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errs})"


# ------------------------------------------------------------------------------------------
# accuracy against fp64
# ------------------------------------------------------------------------------------------
SHAPES = [(1, 1), (7, 9), (13, 17), (56, 56)]
CHANNELS = [1, 20, 64, 96, 192]


@pytest.mark.parametrize("C", CHANNELS)
@pytest.mark.parametrize("H,W", SHAPES)
def test_shapes_and_channels_fp32(H, W, C):
    run_and_check(2, H, W, C, kernel_sizes(3, 3), torch.float32, normalize=(C % 2 == 0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("H,W,C", [(1, 1, 20), (7, 9, 1), (13, 17, 96), (56, 56, 64)])
def test_shapes_half(H, W, C, dtype):
    run_and_check(2, H, W, C, kernel_sizes(2, 3), dtype, normalize=False)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [3, 9])
@pytest.mark.parametrize("L", [1, 2, 3, 4])
def test_levels_and_windows(L, window, dtype, normalize):
    # window 9: kernels 9, 11, 13, 15 (detection backbones); split into several fused segments
    run_and_check(2, 13, 17, 20, kernel_sizes(L, window), dtype, normalize)


@pytest.mark.parametrize("ks", [[5], [7], [15], [3, 9], [15, 3], [5, 5, 5], [13, 11, 9, 7], [11, 13, 15], [5, 7, 9],
                                [3, 5, 7, 9], [9, 11]])
def test_other_kernel_sizes(ks):
    # generic (runtime kernel size) segments and the remaining specialisations
    run_and_check(2, 19, 23, 24, ks, torch.float32, normalize=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout,gout_layout", [("slice", "contig"), ("chfirst", "chfirst"), ("offset1", "slice"),
                                                ("bcast", "contig")])
def test_strided_views(layout, gout_layout, dtype):
    # C = 40: five channel blocks (the emulator's cost grows with C; CI runs this test there)
    run_and_check(2, 13, 17, 40, kernel_sizes(3, 3), dtype, normalize=True, layout=layout, gout_layout=gout_layout)
    run_and_check(1, 7, 9, 20, kernel_sizes(2, 9), dtype, normalize=False, layout=layout, gout_layout=gout_layout)


@pytest.mark.parametrize("dtype", DTYPES)
def test_larger_maps(dtype):
    # many tiles per image and several images per backward slot
    run_and_check(3, 56, 56, 96, kernel_sizes(3, 3), dtype, normalize=False)
    run_and_check(1, 75, 100, 192, kernel_sizes(4, 3), dtype, normalize=True)
    run_and_check(2, 41, 63, 64, kernel_sizes(3, 9), dtype, normalize=False)
    run_and_check(1, 56, 56, 64, kernel_sizes(3, 5), dtype, normalize=True)  # fl3: one 3-level segment


# ------------------------------------------------------------------------------------------
# the tensor-core forward (fc_mma.cuh): fp16/bf16 SRF and LRF
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ks", [[3, 5], [3, 5, 7]])
@pytest.mark.parametrize("B,H,W,C,layout", [(2, 13, 17, 20, "contig"), (1, 9, 30, 12, "slice"),
                                             (1, 1, 2, 9, "chfirst"), (1, 40, 11, 8, "offset1")])
def test_tensor_core_forward(B, H, W, C, layout, ks, dtype, monkeypatch):
    nat = _native()
    ctx, gates, weights = make_inputs(B, H, W, C, ks, dtype, layout, seed=11)
    plan = nat.cuda_fwd_plan(ctx, gates, weights, True)
    assert plan.startswith("mma "), plan  # the case this test is for: the tensor-core kernel runs
    out, pooled = nat.focal_context_fwd_native(ctx, gates, weights, True)
    r = reference(ctx, gates, weights, True, None)
    assert rel_err(out, r["out"]) < TOL[dtype]
    _check_pooled(pooled, r, TOL[dtype])
    # FOCALNET_CUDA_MMA=0: the FMA kernel (fp32 between levels); both within the dtype's tolerance
    monkeypatch.setenv("FOCALNET_CUDA_MMA", "0")
    assert nat.cuda_fwd_plan(ctx, gates, weights, True) == "fma"
    out2, _ = nat.focal_context_fwd_native(ctx, gates, weights, True)
    assert rel_err(out2, r["out"]) < TOL[dtype]
    if H * W * C >= 1000:  # the tensor-core result really came from its kernel, not the fallback
        assert not torch.equal(out, out2)


@pytest.mark.parametrize("mma", ["1", "0"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_forward_without_the_global_term(mma, dtype, monkeypatch):
    """global_term=False (the inference op folds the term into the h GEMM): out is the full forward's
    minus s * g_L * GELU(pooled), pooled unchanged; on the tensor-core and the FMA paths."""
    if mma == "0" and dtype == torch.float32:
        pytest.skip("fp32 runs the FMA kernels either way")
    monkeypatch.setenv("FOCALNET_CUDA_MMA", mma)
    nat = _native()
    ks = [3, 5, 7]
    ctx, gates, weights = make_inputs(2, 9, 11, 16, ks, dtype, "slice", seed=5)
    local, pooled = nat.focal_context_fwd_native(ctx, gates, weights, True, global_term=False)
    r = reference(ctx, gates, weights, True, None)
    s = 1.0 / (len(ks) + 1)
    glob = torch.nn.functional.gelu(r["pooled"])[:, None, None, :] * gates[..., -1:].detach().cpu().double() * s
    assert rel_err(local, r["out"] - glob) < TOL[dtype]
    _check_pooled(pooled, r, TOL[dtype])


@pytest.mark.parametrize("ks", [[3, 5], [3, 5, 7]])
@pytest.mark.parametrize("B,H,W,C,layout,gout_layout", [(2, 13, 17, 20, "contig", "contig"),
                                                         (1, 9, 30, 12, "slice", "strided"),
                                                         (1, 1, 2, 9, "chfirst", "contig"),
                                                         (1, 40, 11, 8, "offset1", "contig")])
def test_tensor_core_backward(B, H, W, C, layout, gout_layout, ks, monkeypatch):
    """The bf16 backward's level kernels on tensor cores (fc_bwd_mma.cuh) against fp64, and against the FMA
    level kernels (FOCALNET_CUDA_MMA_BWD=0): both within tolerance, and different (its results are its own,
    not its fallback's)."""
    nat = _native()
    dtype = torch.bfloat16
    ctx, gates, weights = make_inputs(B, H, W, C, ks, dtype, layout, seed=21)
    plan = nat.cuda_bwd_plan(ctx, gates, weights, True)
    assert plan.count(" mma ") == len(ks) + 1, plan  # the recompute and every level
    out, pooled = nat.focal_context_fwd_native(ctx, gates, weights, True)
    gout = make_grad_out(B, H, W, C, dtype, gout_layout, seed=22)
    r = reference(ctx, gates, weights, True, gout)
    res = {}
    for sw in ("1", "0"):
        monkeypatch.setenv("FOCALNET_CUDA_MMA_BWD", sw)
        if sw == "0":
            assert nat.cuda_bwd_plan(ctx, gates, weights, True).count(" mma ") == 1
        gctx, ggates, gw = nat.focal_context_bwd_native(gout, ctx, gates, weights, pooled, True)
        errs = {"grad_ctx": rel_err(gctx, r["grad_ctx"]), "grad_gates": rel_err(ggates, r["grad_gates"])}
        for i in range(len(ks)):
            errs[f"grad_w{i}"] = rel_err(gw[i], r["grad_w"][i])
        assert all(v < TOL[dtype] for v in errs.values()), (sw, errs)
        res[sw] = [gctx, ggates] + list(gw)
    if H * W * C >= 1000:
        assert not all(torch.equal(a, b) for a, b in zip(res["1"], res["0"]))
    monkeypatch.setenv("FOCALNET_CUDA_MMA_BWD", "2")
    with pytest.raises(ValueError, match="FOCALNET_CUDA_MMA_BWD"):
        nat.focal_context_bwd_native(gout, ctx, gates, weights, pooled, True)


@pytest.mark.parametrize("case", ["nan_ctx", "inf_gate", "inf_dout"])
def test_tensor_core_backward_falls_back(case):
    # non-finite x_l / dx_{l+1} / weights: the tensor-core level kernel flags them and the FMA level kernel
    # recomputes that level, so NaN / Inf reach exactly the positions they reach in the reference
    nat = _native()
    dtype = torch.bfloat16
    B, H, W, C, ks = 2, 11, 13, 12, [3, 5, 7]
    ctx, gates, weights = make_inputs(B, H, W, C, ks, dtype, seed=31)
    ctx, gates = ctx.clone(), gates.clone()
    gout = make_grad_out(B, H, W, C, dtype, seed=32).clone()
    if case == "nan_ctx":
        ctx[1, 4, 5, 2] = float("nan")
    elif case == "inf_gate":
        gates[0, 6, 7, 1] = float("inf")
    else:
        gout[1, 2, 3, 4] = float("inf")
    assert nat.cuda_bwd_plan(ctx, gates, weights, False).count(" mma ") == len(ks) + 1
    out, pooled = nat.focal_context_fwd_native(ctx, gates, weights, False)
    gctx, ggates, gw = nat.focal_context_bwd_native(gout, ctx, gates, weights, pooled, False)
    r = reference(ctx, gates, weights, False, gout)
    for name, got, ref in [("grad_ctx", gctx, r["grad_ctx"]), ("grad_gates", ggates, r["grad_gates"])] + \
                          [(f"grad_w{i}", gw[i], r["grad_w"][i]) for i in range(len(ks))]:
        g, rf = _same_nonfinite(name, got, ref)
        if rf.numel():
            assert rel_err(g, rf) < TOL[dtype], name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tensor_core_recompute_runs(dtype, monkeypatch):
    """The backward's recompute of x_1 .. x_{L-1} on the tensor-core forward kernel (REC) gives its own
    results, not those of the FMA segments launched behind it as its fallback: with the level kernels on
    FMA in both runs (FOCALNET_CUDA_MMA_BWD=0), the gradients with the recompute on tensor cores differ
    from those with everything on FMA (FOCALNET_CUDA_MMA=0), and both are within tolerance of fp64."""
    nat = _native()
    B, H, W, C, ks = 2, 13, 11, 16, [3, 5, 7]
    ctx, gates, weights = make_inputs(B, H, W, C, ks, dtype, "slice", seed=41)
    gout = make_grad_out(B, H, W, C, dtype, seed=42)
    r = reference(ctx, gates, weights, True, gout)
    _, pooled = nat.focal_context_fwd_native(ctx, gates, weights, True)
    monkeypatch.setenv("FOCALNET_CUDA_MMA_BWD", "0")
    res = {}
    for mma in ("1", "0"):
        monkeypatch.setenv("FOCALNET_CUDA_MMA", mma)
        plan = nat.cuda_bwd_plan(ctx, gates, weights, True)
        assert plan.startswith("recompute mma ") == (mma == "1") and plan.count(" mma ") == (mma == "1"), plan
        grads = nat.focal_context_bwd_native(gout, ctx, gates, weights, pooled, True)
        gctx, ggates, gw = grads
        errs = {"grad_ctx": rel_err(gctx, r["grad_ctx"]), "grad_gates": rel_err(ggates, r["grad_gates"])}
        errs.update({f"grad_w{i}": rel_err(gw[i], r["grad_w"][i]) for i in range(len(ks))})
        assert all(v < TOL[dtype] for v in errs.values()), (mma, errs)
        res[mma] = [gctx, ggates] + list(gw)
    assert not all(torch.equal(a, b) for a, b in zip(res["1"], res["0"])), "REC gave the FMA recompute's results"


def test_tensor_core_switch_rejects_other_values(monkeypatch):
    nat = _native()
    ctx, gates, weights = make_inputs(1, 5, 6, 8, [3, 5], torch.bfloat16, seed=2)
    for bad in ("2", "yes", "true"):
        monkeypatch.setenv("FOCALNET_CUDA_MMA", bad)
        with pytest.raises(ValueError, match="FOCALNET_CUDA_MMA"):
            nat.focal_context_fwd_native(ctx, gates, weights, True)


def test_backward_plan_matches_the_cost_model_port():
    # focalnet_kernels.cost_model.cuda_plan_bwd mirrors plan_bwd (recompute segments, per-level tiles, slots)
    from focalnet_kernels import cost_model as cm
    nat = _native()
    if DEVICE == "cuda" and "H100" not in torch.cuda.get_device_name() and "H200" not in torch.cuda.get_device_name():
        pytest.skip("the port's shared-memory budget (tensor-core recompute) is an H100's")
    for ks, dtype in (([3, 5], torch.bfloat16), ([3, 5, 7], torch.bfloat16), ([3], torch.bfloat16),
                      ([3, 5, 7], torch.float32), ([3, 5], torch.float16)):
        for shape in cm.STAGES.values():
            _, H, W, C = shape
            for B in (1, 256):
                ctx, gates, weights = make_inputs(1, H, W, C, ks, dtype, seed=0)
                plan = cm.cuda_plan_bwd((B, H, W, C), ks, str(dtype).split(".")[-1])
                if B != 1:   # the slots depend on B: the planner sees B from ctx's shape
                    ctx = ctx.expand(B, -1, -1, -1)
                    gates = gates.expand(B, -1, -1, -1)
                assert nat.cuda_bwd_plan(ctx, gates, weights, False) == cm.cuda_bwd_plan_string(plan), (shape, ks, B)


def test_tensor_core_plan_matches_the_cost_model_port():
    # focalnet_kernels.cost_model.cuda_plan_mma mirrors plan_mma (its budget: an H100's 113 KB)
    from focalnet_kernels import cost_model as cm
    nat = _native()
    if DEVICE == "cuda" and "H100" not in torch.cuda.get_device_name() and "H200" not in torch.cuda.get_device_name():
        pytest.skip("the port's shared-memory budget is an H100's")
    for dtype in (torch.float16, torch.bfloat16):
        for ks in ([3, 5], [3, 5, 7]):
            for shape in cm.STAGES.values():
                _, H, W, C = shape
                ctx, gates, weights = make_inputs(1, H, W, C, ks, dtype, seed=0)
                g = cm.cuda_plan_mma((1, H, W, C), ks, str(dtype).split(".")[-1])
                assert nat.cuda_fwd_plan(ctx, gates, weights, False) == f"mma {g['TH']}x{g['TW']}", (shape, ks)


@pytest.mark.parametrize("case", ["nan_ctx", "inf_weight", "fp16_overflow"])
def test_tensor_core_forward_falls_back(case):
    # values the tensor-core path cannot reproduce as the reference does: it flags them and the
    # FMA kernels recompute the whole call (same launch sequence, no host synchronisation)
    nat = _native()
    dtype = torch.float16 if case != "inf_weight" else torch.bfloat16
    B, H, W, C, ks = 2, 11, 13, 12, [3, 5]
    ctx, gates, weights = make_inputs(B, H, W, C, ks, dtype, seed=5)
    ctx, gates, weights = ctx.clone(), gates.clone(), [w.clone() for w in weights]
    if case == "nan_ctx":
        ctx[1, 4, 5, 2] = float("nan")
    elif case == "inf_weight":
        weights[1][3, 2, 2] = float("inf")
    else:  # level 1 exceeds fp16's range (1.8e5) while the output stays finite
        ctx[0, 3:8, 3:8, :] = 2.0e4
        weights[0].fill_(1.0)
        gates.mul_(1e-3)
    assert nat.cuda_fwd_plan(ctx, gates, weights, False).startswith("mma ")
    # the backward's recompute runs on tensor cores too and falls back the same way
    assert nat.cuda_bwd_plan(ctx, gates, weights, False).startswith("recompute mma ")
    out, pooled = nat.focal_context_fwd_native(ctx, gates, weights, False)
    gout = make_grad_out(B, H, W, C, dtype, seed=6)
    gctx, ggates, gw = nat.focal_context_bwd_native(gout, ctx, gates, weights, pooled, False)
    r = reference(ctx, gates, weights, False, gout)
    for name, got, ref in [("out", out, r["out"]), ("pooled", pooled, r["pooled"]),
                           ("grad_ctx", gctx, r["grad_ctx"]), ("grad_gates", ggates, r["grad_gates"])] + \
                          [(f"grad_w{i}", gw[i], r["grad_w"][i]) for i in range(len(ks))]:
        if got.dtype == torch.float16:  # fp16 results (grad_gates = dout * x_1 here) overflow where fp64's exceed it
            ref = torch.where(ref.abs() > 65504.0, ref * float("inf"), ref)
        g, rf = _same_nonfinite(name, got, ref)
        if rf.numel():
            assert rel_err(g, rf) < TOL[dtype], name
    if case == "fp16_overflow":
        assert torch.isfinite(out).all() and torch.isfinite(gctx).all()


# ------------------------------------------------------------------------------------------
# NaN / Inf propagate as in the reference
# ------------------------------------------------------------------------------------------
def _same_nonfinite(name, got, ref):
    got = got.detach().cpu().double()
    assert torch.equal(torch.isnan(got), torch.isnan(ref)), f"{name}: NaN positions differ"
    assert torch.equal(torch.isinf(got), torch.isinf(ref)), f"{name}: Inf positions differ"
    inf = torch.isinf(ref)
    assert torch.equal(torch.sign(got[inf]), torch.sign(ref[inf])), f"{name}: Inf signs differ"
    fin = torch.isfinite(ref)
    return got[fin], ref[fin]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nan_inf_propagation(dtype):
    nat = _native()
    B, H, W, C = 2, 13, 15, 12
    ks = [3, 5]
    ctx, gates, weights = make_inputs(B, H, W, C, ks, dtype, seed=7)
    ctx = ctx.clone()
    gates = gates.clone()
    ctx[0, 6, 7, 3] = float("nan")    # image 0, channel 3: NaN spreads through the levels and pooled
    gates[1, 6, 7, 0] = float("inf")  # image 1: an infinite level-0 gate far from the border
    gout = make_grad_out(B, H, W, C, dtype, seed=8)
    out, pooled = nat.focal_context_fwd_native(ctx, gates, weights, False)
    gctx, ggates, gw = nat.focal_context_bwd_native(gout, ctx, gates, weights, pooled, False)
    r = reference(ctx, gates, weights, False, gout)
    tol = TOL[dtype]
    for name, got, ref in [("out", out, r["out"]), ("pooled", pooled, r["pooled"]),
                           ("grad_ctx", gctx, r["grad_ctx"]), ("grad_gates", ggates, r["grad_gates"])] + \
                          [(f"grad_w{i}", gw[i], r["grad_w"][i]) for i in range(len(ks))]:
        g, rf = _same_nonfinite(name, got, ref)
        if rf.numel():  # (grad_w0 is all +-Inf / NaN here: the infinite gate reaches every tap)
            assert rel_err(g, rf) < tol, name
    # the NaN stays in image 0 channel 3 (and what depends on it); image 1 has no NaN at all
    assert torch.isnan(out[0, :, :, 3]).all() and not torch.isnan(out[1]).any()
    assert torch.isinf(out[1, 6, 7]).all()


# ------------------------------------------------------------------------------------------
# determinism, streams
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,ks", [(torch.float16, [3, 5, 7]), (torch.float32, [9, 11, 13, 15]),
                                      (torch.bfloat16, [3, 9])])
def test_bitwise_deterministic_20_runs(dtype, ks):
    nat = _native()
    B, H, W, C = 4, 56, 56, 96
    ctx, gates, weights = make_inputs(B, H, W, C, ks, dtype, seed=3)
    gout = make_grad_out(B, H, W, C, dtype, seed=4)
    first = None
    for _ in range(20):
        out, pooled = nat.focal_context_fwd_native(ctx, gates, weights, True)
        gctx, ggates, gw = nat.focal_context_bwd_native(gout, ctx, gates, weights, pooled, True)
        res = [out, pooled, gctx, ggates] + list(gw)
        if first is None:
            first = [t.clone() for t in res]
            continue
        for i, (a, b) in enumerate(zip(res, first)):
            assert torch.equal(a, b), f"run differs from the first in output {i}"


def test_runs_on_the_callers_stream():
    nat = _native()
    B, H, W, C = 2, 56, 56, 64
    ks = [3, 5, 7]
    src_ctx, src_gates, weights = make_inputs(B, H, W, C, ks, torch.float16, seed=11)
    gout_src = make_grad_out(B, H, W, C, torch.float16, seed=12)
    ref_out, ref_pooled = nat.focal_context_fwd_native(src_ctx, src_gates, weights, False)
    ref_g = nat.focal_context_bwd_native(gout_src, src_ctx, src_gates, weights, ref_pooled, False)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # the inputs become valid only after a long kernel on the side stream: a backend that
        # ran on any other stream would read zeros
        ctx = torch.zeros_like(src_ctx)
        gates = torch.zeros_like(src_gates)
        gout = torch.zeros_like(gout_src)
        if hasattr(torch.cuda, "_sleep"):
            torch.cuda._sleep(50_000_000)
        ctx.copy_(src_ctx)
        gates.copy_(src_gates)
        gout.copy_(gout_src)
        out, pooled = nat.focal_context_fwd_native(ctx, gates, weights, False)
        gctx, ggates, gw = nat.focal_context_bwd_native(gout, ctx, gates, weights, pooled, False)
    side.synchronize()
    assert torch.equal(out, ref_out) and torch.equal(pooled, ref_pooled)
    assert torch.equal(gctx, ref_g[0]) and torch.equal(ggates, ref_g[1])
    assert all(torch.equal(a, b) for a, b in zip(gw, ref_g[2]))


def test_invalid_arguments_raise():
    nat = _native()
    ctx, gates, weights = make_inputs(1, 5, 5, 8, [3], torch.float32)
    w1 = [torch.randn(8, 1, 1, device=DEVICE)]  # k = 1: outside the backend's 3..15
    with pytest.raises((ValueError, RuntimeError)):
        nat.focal_context_fwd_native(ctx, gates, w1, False)


# ------------------------------------------------------------------------------------------
# 64-bit offsets: B*H*W*C > 2^31 elements (fp16, ~4.3 GB per map)
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_64bit_offsets():
    nat = _native()
    B, H, W, C = 2050, 64, 64, 256  # 2,149,580,800 elements > 2^31 = 2,147,483,648
    ks = [3]
    need = 5 * B * H * W * C * 2 + (1 << 30) * 3
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs ~{need / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    dtype = torch.float16
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    ctx = torch.randn(B, H, W, C, generator=gen, device=DEVICE, dtype=dtype)
    gates = torch.randn(B, H, W, len(ks) + 1, generator=gen, device=DEVICE, dtype=dtype)
    weights = [(torch.randn(C, k, k, generator=gen, device=DEVICE) / k) for k in ks]
    assert ctx.numel() > 2 ** 31
    out, pooled = nat.focal_context_fwd_native(ctx, gates, weights, False)
    # the first image (small offsets) and the last two (offsets >= 2^31) against the reference
    for sl in (slice(0, 1), slice(B - 2, B)):
        r = reference(ctx[sl], gates[sl], weights, False)
        assert rel_err(out[sl], r["out"]) < TOL[dtype]
        _check_pooled(pooled[sl], r, TOL[dtype])
    # backward: grad_out is zero except in the last two images, so every gradient (the weight
    # gradient included) is that of those two images alone
    gout = torch.zeros_like(ctx)
    gout[B - 2:] = torch.randn(2, H, W, C, generator=gen, device=DEVICE, dtype=dtype)
    gctx, ggates, gw = nat.focal_context_bwd_native(gout, ctx, gates, weights, pooled, False)
    r = reference(ctx[B - 2:], gates[B - 2:], weights, False, gout[B - 2:])
    assert rel_err(gctx[B - 2:], r["grad_ctx"]) < TOL[dtype]
    assert rel_err(ggates[B - 2:], r["grad_gates"]) < TOL[dtype]
    assert rel_err(gw[0], r["grad_w"][0]) < TOL[dtype]
    assert not gctx[: B - 2].any() and not ggates[: B - 2].any()
