"""The native CPU backend (focalnet_kernels._C via focalnet_kernels.native) against the fp64 oracle of
the contract math in tests/conftest.py (docs/backend-contract.md): F.conv2d channels-first in fp64,
autograd for the backward. Forward (out, pooled) and backward (grad_ctx, grad_gates, grad_weights),
fp32 / fp16 / bf16, strided inputs, NaN / Inf propagation, determinism (repeats, thread counts),
every instruction-set path the CPU supports, argument validation."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from focalnet_kernels import native

if not native.available("cpu"):
    pytest.skip(
        "focalnet_kernels._C is not built (pip install -e . without FOCALNET_SKIP_EXT=1)",
        allow_module_level=True,
    )

from focalnet_kernels import _C  # noqa: E402
from conftest import TOL, contract_reference, make_contract_grad_out, make_contract_inputs, rel_err  # noqa: E402

# ------------------------------------------------------------------------------------------------
# fp64 reference (the contract math)

def reference_grads(ctx, gates, weights, normalize, grad_out, dtype=torch.float64):
    """(out, pooled, grad_ctx, grad_gates, grad_weights) of the contract in `dtype` (tests/conftest.py)."""
    r = contract_reference(ctx, gates, weights, normalize, grad_out, dtype=dtype)
    return r["out"], r["pooled"], r["grad_ctx"], r["grad_gates"], r["grad_w"]


def check(name, got, ref64, ref32, tol):
    """rel err vs fp64 below tol; on tiny tensors where cancellation makes even torch's own fp32
    evaluation miss tol (e.g. 1x1 images, C=1), no worse than 4x that fp32 evaluation."""
    err = rel_err(got, ref64)
    bound = max(tol, 4 * rel_err(ref32, ref64)) if ref32 is not None else tol
    assert err < bound, f"{name}: rel err {err:.3e} >= {bound:.3e}"


# ------------------------------------------------------------------------------------------------
# inputs

def make_inputs(B, H, W, C, ks, dtype=torch.float32, layout="slice", seed=0):
    """ctx, gates (views with the given layout: tests/conftest.py), weights [C,k,k] fp32, grad_out
    (channels-first permuted, non-contiguous)."""
    gen = torch.Generator().manual_seed(seed)
    ctx, gates, weights = make_contract_inputs(B, H, W, C, ks, dtype, layout, gen=gen)
    return ctx, gates, weights, make_contract_grad_out(B, H, W, C, dtype, gen=gen)


def run_native(ctx, gates, weights, normalize, grad_out):
    out, pooled = native.focal_context_fwd_native(ctx, gates, weights, normalize)
    gc, gg, gw = native.focal_context_bwd_native(grad_out, ctx, gates, weights, pooled, normalize)
    return out, pooled, gc, gg, gw


# (H, W, C, kernels): 1x1 / 7x9 / 13x17 images, C in {1, 20, 64}, L = 1..4, windows 3, 5, 9
# (factor 2: kernels 5,7,9 and 9,11,13[,15]).
CASES = [
    (1, 1, 20, (3,)),
    (1, 1, 1, (3, 5)),
    (1, 1, 64, (5, 7, 9)),
    (7, 9, 1, (3, 5, 7)),
    (7, 9, 20, (3, 5)),
    (7, 9, 64, (3, 5, 7, 9)),
    (7, 9, 20, (9, 11, 13)),
    (13, 17, 1, (3,)),
    (13, 17, 20, (5, 7, 9)),
    (13, 17, 64, (3, 5, 7)),
    (13, 17, 20, (9, 11, 13, 15)),
]
LAYOUTS = ["slice", "chfirst", "wstep", "contig"]


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_fp32_forward_backward(case, normalize):
    H, W, C, ks = CASES[case]
    layout = LAYOUTS[(case + int(normalize)) % len(LAYOUTS)]
    ctx, gates, weights, grad_out = make_inputs(2, H, W, C, ks, layout=layout, seed=case)
    out, pooled, gc, gg, gw = run_native(ctx, gates, weights, normalize, grad_out)
    assert out.shape == (2, H, W, C) and out.dtype == torch.float32 and out.is_contiguous()
    assert pooled.shape == (2, C) and pooled.dtype == torch.float32 and pooled.is_contiguous()
    assert gc.shape == ctx.shape and gc.is_contiguous()
    assert gg.shape == gates.shape and gg.is_contiguous()
    assert [tuple(g.shape) for g in gw] == [tuple(w.shape) for w in weights]
    assert all(g.dtype == torch.float32 and g.is_contiguous() for g in gw)
    r64 = reference_grads(ctx, gates, weights, normalize, grad_out)
    r32 = reference_grads(ctx, gates, weights, normalize, grad_out, torch.float32)
    tol = TOL[torch.float32]
    check("out", out, r64[0], r32[0], tol)
    check("pooled", pooled, r64[1], r32[1], tol)
    check("grad_ctx", gc, r64[2], r32[2], tol)
    check("grad_gates", gg, r64[3], r32[3], tol)
    for l, (a, b, c) in enumerate(zip(gw, r64[4], r32[4])):
        check(f"grad_weights[{l}]", a, b, c, tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [(7, 9, 20, (3, 5, 7), "slice"), (13, 17, 64, (3, 5), "chfirst"),
                                  (13, 17, 20, (5, 7, 9, 11), "wstep")])
def test_half_dtypes(dtype, case):
    H, W, C, ks, layout = case
    ctx, gates, weights, grad_out = make_inputs(2, H, W, C, ks, dtype=dtype, layout=layout, seed=7)
    out, pooled, gc, gg, gw = run_native(ctx, gates, weights, True, grad_out)
    assert out.dtype == dtype and gc.dtype == dtype and gg.dtype == dtype
    assert pooled.dtype == torch.float32 and all(g.dtype == torch.float32 for g in gw)
    # oracle: fp64 on the same (rounded) inputs
    r = reference_grads(ctx.double(), gates.double(), weights, True, grad_out.double())
    tol = TOL[dtype]
    for name, a, b in [("out", out, r[0]), ("pooled", pooled, r[1]), ("grad_ctx", gc, r[2]),
                       ("grad_gates", gg, r[3])] + [(f"grad_weights[{l}]", a, b)
                                                    for l, (a, b) in enumerate(zip(gw, r[4]))]:
        assert rel_err(a, b) < tol, f"{dtype} {name}: {rel_err(a, b):.3e}"


def _k1_run(x, g0, w, dtype):
    """One level, kernel 1x1: out[p][c] = g0[p] * GELU(w[c] * x[p][c]) (global gate 0). For
    w * x > 9 sqrt2 GELU is exactly the identity, so out = g0 * w * x: with powers of two this is
    exact in fp32 and the only rounding is the final store to `dtype`."""
    B, H, W, C = x.shape
    gates = torch.zeros(B, H, W, 2)
    gates[..., 0] = g0   # g0: [B, H, W] or broadcastable
    out, _ = native.focal_context_fwd_native(x.to(dtype), gates.to(dtype), [w.view(C, 1, 1)], False)
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_store_rounds_to_nearest_even(dtype):
    """fp32 -> fp16 / bf16 stores: round to nearest even (ties included), subnormals, overflow."""
    gen = torch.Generator().manual_seed(1)
    drop = 13 if dtype == torch.float16 else 16          # mantissa bits dropped by the store
    low = torch.randint(0, 1 << drop, (256,), generator=gen)
    tie = 1 << (drop - 1)
    low = torch.cat([low, torch.tensor([0, 1, tie - 1, tie, tie + 1, (1 << drop) - 1])])
    kept = torch.randint(0, 1 << (23 - drop), (low.numel(),), generator=gen)
    kept[-6:] = torch.tensor([0, 1, 2, 3, 4, 5])          # even and odd kept mantissas at the ties
    bits = (127 << 23) | (kept << drop) | low               # fp32 values in [1, 2)
    m = bits.to(torch.int32).view(torch.float32)
    w = m * 16                                              # conv output 16 m: GELU is the identity
    if dtype == torch.float16:
        exps = list(range(-24, 12))                         # subnormal .. overflow to inf
    else:
        exps = list(range(-130, 124, 7))
    g0 = torch.tensor([s * 2.0 ** e for e in exps for s in (1.0, -1.0)])
    assert torch.equal(g0.to(dtype).float(), g0)             # the gates are exact in dtype
    x = torch.ones(1, 1, g0.numel(), w.numel())
    out = _k1_run(x, g0.view(1, 1, -1), w, dtype)
    want = (g0.double().view(-1, 1) * w.double().view(1, -1)).float().to(dtype)   # exact in fp32
    assert torch.equal(out.view_as(want), want)


def test_half_loads_are_exact():
    """fp16 / bf16 -> fp32 loads of every positive fp16 value >= 2^-20 (normals, most subnormals,
    65504) and a spread of bf16 values >= 2^-20: out = 2^-24 * GELU(2^24 x) = x exactly (round trip)."""
    for dtype in (torch.float16, torch.bfloat16):
        if dtype == torch.float16:
            bits = torch.arange(0, 0x7C00, dtype=torch.int32).to(torch.int16)
            v = bits.view(torch.float16)
            v = v[v >= 2.0 ** -20]
        else:
            bits = torch.arange(0x0080, 0x7F80, 37, dtype=torch.int32).to(torch.int16)
            v = bits.view(torch.bfloat16)
            v = v[(v >= 2.0 ** -20) & (v <= 2.0 ** 100)]
        x = v.float().view(1, 1, 1, -1)
        w = torch.full((v.numel(),), 2.0 ** 24)
        out = _k1_run(x, torch.full((1, 1, 1), 2.0 ** -24), w, dtype)
        assert torch.equal(out.view(-1), v), dtype
        neg = _k1_run(x, torch.full((1, 1, 1), -(2.0 ** -24)), w, dtype)
        assert torch.equal(neg.view(-1), -v), dtype


def test_nan_inf_propagation():
    """NaN in ctx of image 0 and an Inf gate in image 1: masks of NaN and Inf exactly as the fp64
    reference, finite values within tolerance (fp32)."""
    ctx, gates, weights, grad_out = make_inputs(2, 13, 17, 20, (3, 5, 7), layout="slice", seed=11)
    ctx = ctx.clone()
    gates = gates.clone()
    ctx[0, 4, 6, 3] = float("nan")
    gates[1, 5, 9, 1] = float("inf")
    gates[1, 8, 2, 3] = float("-inf")   # global gate of one pixel
    grad_out = grad_out.clone()
    out, pooled, gc, gg, gw = run_native(ctx, gates, weights, False, grad_out)
    r = reference_grads(ctx, gates, weights, False, grad_out)
    for name, a, b in [("out", out, r[0]), ("pooled", pooled, r[1]), ("grad_ctx", gc, r[2]),
                       ("grad_gates", gg, r[3])] + [(f"grad_weights[{l}]", a, b)
                                                    for l, (a, b) in enumerate(zip(gw, r[4]))]:
        assert torch.equal(a.isnan(), b.isnan()), f"{name}: NaN positions differ"
        assert torch.equal(a.isinf(), b.isinf()), f"{name}: Inf positions differ"
        assert torch.equal(a[a.isinf()].sign(), b[b.isinf()].sign().to(a.dtype)), name
        fin = torch.isfinite(b)
        if fin.any():
            assert rel_err(a[fin], b[fin]) < 1e-5, name
    # depthwise: the NaN stays in its channel of image 0 (everywhere, via the pooled mean)
    assert out[0, ..., 3].isnan().all() and torch.isfinite(out[0, ..., :3]).all()
    assert not torch.isfinite(out[1, 5, 9]).all() and torch.isfinite(out[1, 0, 0]).all()


def test_special_values_gelu():
    """GELU(+inf) = inf, GELU(-inf) = GELU(nan) = nan, GELU(+-0) = 0, as the reference."""
    vals = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 1.0, -30.0, 40.0])
    n = vals.numel()
    x = torch.stack([vals, torch.ones(n)]).view(1, 1, 2, n)   # two pixels: pooled stays finite
    g = torch.ones(1, 1, 2, 2)                                # g_L = 1: 1 * GELU(inf) = inf, not nan
    out, _ = native.focal_context_fwd_native(x, g, [torch.ones(n, 1, 1)], False)
    ref = contract_reference(x, g, [torch.ones(n, 1, 1)], False)["out"]
    o = out[0, 0, 0]
    assert o[0] == float("inf") and o[1].isnan() and o[2].isnan()
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    fin = torch.isfinite(ref)
    assert rel_err(out[fin], ref[fin]) < 1e-6


def test_deterministic_repeats():
    ctx, gates, weights, grad_out = make_inputs(2, 13, 17, 20, (3, 5, 7), seed=5)
    first = run_native(ctx, gates, weights, True, grad_out)
    for _ in range(2):
        again = run_native(ctx, gates, weights, True, grad_out)
        for a, b in zip(first[:4], again[:4]):
            assert torch.equal(a, b)
        for a, b in zip(first[4], again[4]):
            assert torch.equal(a, b)


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _supported_isas():
    flags = _cpu_flags()
    isas = ["base"]
    if {"avx2", "fma"} <= flags:
        isas.append("avx2")
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
            isas.append("avx512")
    return isas


_ISA_CASES = [(torch.float32, (13, 17, 20, (3, 5, 7))), (torch.float32, (7, 9, 24, (9, 11, 13, 15))),
              (torch.bfloat16, (7, 9, 20, (5, 7)))]
_isa_refs = {}


@pytest.mark.parametrize("isa", _supported_isas())
def test_isa_path(isa, monkeypatch):
    """Every kernel instantiation this CPU can run (FOCALNET_CPU_ISA caps the runtime dispatch)."""
    monkeypatch.setenv("FOCALNET_CPU_ISA", isa)
    assert _C.focal_context_cpu_isa() == isa   # that instantiation, not a silent lower one, runs
    for i, (dtype, (H, W, C, ks)) in enumerate(_ISA_CASES):
        ctx, gates, weights, grad_out = make_inputs(2, H, W, C, ks, dtype=dtype, seed=2)
        out, pooled, gc, gg, gw = run_native(ctx, gates, weights, False, grad_out)
        if i not in _isa_refs:
            _isa_refs[i] = reference_grads(ctx.double(), gates.double(), weights, False,
                                           grad_out.double())
        r = _isa_refs[i]
        tol = TOL[dtype]
        for name, a, b in [("out", out, r[0]), ("pooled", pooled, r[1]), ("grad_ctx", gc, r[2]),
                           ("grad_gates", gg, r[3])] + [(f"gw{l}", a, b) for l, (a, b) in enumerate(zip(gw, r[4]))]:
            assert rel_err(a, b) < tol, f"{isa} {dtype} {name}: {rel_err(a, b):.3e}"


@pytest.mark.parametrize("value", ["avx9", "none", "sse2", "generic", "avx-512", "avx2 avx512", "0", "AVX"])
def test_cpu_isa_rejects_unknown_values(value, monkeypatch):
    """FOCALNET_CPU_ISA with anything but auto / avx512 / avx2 / base (any case, surrounding
    whitespace) raises ValueError naming the variable, the value and the choices: in the Python op
    (forward and backward) and in the C++ extension alone; it never silently runs another path."""
    ctx, gates, weights, grad_out = make_inputs(1, 5, 6, 16, (3,), seed=3)
    out, pooled = native.focal_context_fwd_native(ctx, gates, weights, False)
    monkeypatch.setenv("FOCALNET_CPU_ISA", value)
    for call in (lambda: native.focal_context_fwd_native(ctx, gates, weights, False),
                 lambda: native.focal_context_bwd_native(grad_out, ctx, gates, weights, pooled, False),
                 native.cpu_isa):
        with pytest.raises(ValueError, match="FOCALNET_CPU_ISA") as e:
            call()
        assert repr(value.strip().lower()) in str(e.value) and "avx512, avx2, base" in str(e.value)
    with pytest.raises(ValueError, match="FOCALNET_CPU_ISA") as e:
        _C.focal_context_cpu_isa()
    assert repr(value) in str(e.value)
    a = _C.FocalContextArgs()   # the C++ entry points, called directly, throw too
    a.B, a.H, a.W, a.C, a.L = 1, 5, 6, 16, 1
    a.ksize = [3, 0, 0, 0]
    a.ctx, a.ctx_stride = ctx.data_ptr(), list(ctx.stride())
    a.gates, a.gates_stride = gates.data_ptr(), list(gates.stride())
    a.weight = [weights[0].data_ptr(), 0, 0, 0]
    o = torch.empty(1, 5, 6, 16)
    p = torch.empty(1, 16)
    a.out, a.pooled = o.data_ptr(), p.data_ptr()
    need = _C.focal_context_workspace_bytes_cpu(a, False)
    ws = torch.empty(need, dtype=torch.uint8)
    a.workspace, a.workspace_bytes = ws.data_ptr(), need
    with pytest.raises(ValueError, match="FOCALNET_CPU_ISA"):
        _C.focal_context_fwd_cpu(a)


def test_cpu_isa_case_and_whitespace(monkeypatch):
    """Values are compared without case and surrounding whitespace ("" and "auto": the best path),
    in Python and in C++ alike; the op runs the path they name."""
    best = _supported_isas()[-1]
    ctx, gates, weights, grad_out = make_inputs(1, 5, 6, 16, (3, 5), seed=3)
    ref = None
    for value, want in [(" AVX2 ", "avx2"), ("\tBase\n", "base"), ("AVX512", "avx512"), ("", best),
                        (" Auto", best), ("avx2", "avx2")]:
        if want not in _supported_isas():
            continue
        monkeypatch.setenv("FOCALNET_CPU_ISA", value)
        assert _C.focal_context_cpu_isa() == want, value
        assert native.cpu_isa() == want, value
        out, pooled, gc, gg, gw = run_native(ctx, gates, weights, False, grad_out)
        if ref is None:
            ref = reference_grads(ctx, gates, weights, False, grad_out)
        assert rel_err(out, ref[0]) < 1e-5 and rel_err(gc, ref[2]) < 1e-5, value
    monkeypatch.delenv("FOCALNET_CPU_ISA")
    assert _C.focal_context_cpu_isa() == best and native.cpu_isa() == best


@pytest.mark.skipif("avx512" in _supported_isas(), reason="this CPU has AVX-512: nothing to cap")
def test_cpu_isa_capped_to_the_cpu(monkeypatch):
    """A path above the CPU's runs the best the CPU has, with one RuntimeWarning saying so."""
    best = _supported_isas()[-1]
    monkeypatch.setenv("FOCALNET_CPU_ISA", "avx512")
    assert _C.focal_context_cpu_isa() == best
    with pytest.warns(RuntimeWarning, match="FOCALNET_CPU_ISA=avx512"):
        assert native.cpu_isa() == best


@pytest.mark.parametrize("isa", _supported_isas())
def test_gelu_pointwise_accuracy(isa, monkeypatch):
    """GELU and GELU' value by value on a dense grid of [-10, 10] (every interval edge of the
    AVX-512 tables at multiples of 1/4, and the cut at |x| = 8 included), through one level with a
    1x1 kernel of weight 1 (out = GELU(x), grad_ctx = dout * GELU'(x)), against fp64:
    |error| <= 1e-7 |x| + 4 ulp of the value (of Phi + |x phi| for GELU', which cancels near -0.75)
    + 1e-30 for each element, on every instruction-set path."""
    monkeypatch.setenv("FOCALNET_CPU_ISA", isa)
    assert _C.focal_context_cpu_isa() == isa
    grid = torch.linspace(-10.0, 10.0, 16001)
    edges = torch.arange(-40, 41, dtype=torch.float32) / 4
    x = torch.cat([grid, edges, edges.nextafter(torch.tensor(-100.0)), edges.nextafter(torch.tensor(100.0))])
    n = x.numel()
    ctx = x.view(1, 1, n, 1)
    gates = torch.zeros(1, 1, n, 2)
    gates[..., 0] = 1.0                                      # global gate 0: out = GELU(x)
    w = [torch.ones(1, 1, 1)]
    dout = torch.ones(1, 1, n, 1)
    out, pooled = native.focal_context_fwd_native(ctx, gates, w, False)
    gc, _, _ = native.focal_context_bwd_native(dout, ctx, gates, w, pooled, False)
    xd = x.double()
    val = F.gelu(xd)
    cdf = 0.5 * torch.erfc(-xd / 2 ** 0.5)
    grad = cdf + xd * torch.exp(-0.5 * xd * xd) / (2 * torch.pi) ** 0.5
    pdf_term = (xd * torch.exp(-0.5 * xd * xd) / (2 * torch.pi) ** 0.5).abs()
    for name, got, ref, scale in (("GELU", out.view(-1), val, val.abs()),
                                  ("GELU'", gc.view(-1), grad, cdf + pdf_term)):
        err = (got.double() - ref).abs()
        bound = 1e-7 * xd.abs() + 4 * 2.0 ** -23 * scale + 1e-30
        bad = err > bound
        assert not bad.any(), (f"{isa} {name}: {int(bad.sum())} values off, worst at x = "
                               f"{x[(err - bound).argmax()].item()!r}: err {err.max().item():.3e}")


_THREAD_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_cpu_backend import make_inputs, run_native
    torch.set_num_threads({threads})
    ctx, gates, weights, grad_out = make_inputs(3, 30, 21, 40, (3, 5, 7), seed=9)
    res = run_native(ctx, gates, weights, False, grad_out)
    torch.save([res[0], res[1], res[2], res[3]] + list(res[4]), {path!r})
    """
)


def test_bit_identical_across_thread_counts(tmp_path):
    """Same bits with 1 and 3 OpenMP threads (the tiling never depends on the thread count)."""
    # Run outside the source tree so the subprocess imports the installed package (with _C).
    tests = os.path.dirname(os.path.abspath(__file__))
    outs = []
    for threads in (1, 3):
        path = str(tmp_path / f"t{threads}.pt")
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        code = _THREAD_SCRIPT.format(tests=tests, threads=threads, path=path)
        subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=str(tmp_path), timeout=120)
        outs.append(torch.load(path))
    ctx, gates, weights, grad_out = make_inputs(3, 30, 21, 40, (3, 5, 7), seed=9)
    here = run_native(ctx, gates, weights, False, grad_out)
    here = [here[0], here[1], here[2], here[3]] + list(here[4])
    for a, b, c in zip(outs[0], outs[1], here):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_broadcast_grad_out_and_gates():
    """Zero strides: grad_out as autograd makes it for .sum() (an expanded scalar) and gates
    broadcast over the width."""
    B, H, W, C, ks = 2, 7, 9, 20, (3, 5)
    ctx, _, weights, _ = make_inputs(B, H, W, C, ks, seed=8)
    gates = torch.randn(B, H, 1, len(ks) + 1).expand(B, H, W, len(ks) + 1)
    grad_out = torch.ones(()).expand(B, H, W, C)
    assert grad_out.stride() == (0, 0, 0, 0)
    out, pooled, gc, gg, gw = run_native(ctx, gates, weights, False, grad_out)
    r = reference_grads(ctx, gates.contiguous(), weights, False, grad_out.contiguous())
    for name, a, b in [("out", out, r[0]), ("grad_ctx", gc, r[2]), ("grad_gates", gg, r[3])] + [
            (f"gw{l}", a, b) for l, (a, b) in enumerate(zip(gw, r[4]))]:
        assert rel_err(a, b) < 1e-5, f"{name}: {rel_err(a, b):.3e}"


def test_multi_tile_images():
    """Large images / batch 1 split into several tiles per image (two-pass global term, per-tile
    partial sums) and wide rows split into column tiles: same results as the reference."""
    for (B, H, W, C, ks, dtype) in [(1, 70, 150, 24, (3, 5, 7), torch.float32),
                                    (1, 40, 100, 16, (9, 11), torch.bfloat16)]:
        ctx, gates, weights, grad_out = make_inputs(B, H, W, C, ks, dtype=dtype, seed=4)
        out, pooled, gc, gg, gw = run_native(ctx, gates, weights, True, grad_out)
        r = reference_grads(ctx.double(), gates.double(), weights, True, grad_out.double())
        for name, a, b in [("out", out, r[0]), ("pooled", pooled, r[1]), ("grad_ctx", gc, r[2]),
                           ("grad_gates", gg, r[3])] + [(f"gw{l}", a, b) for l, (a, b) in enumerate(zip(gw, r[4]))]:
            assert rel_err(a, b) < TOL[dtype], f"{H}x{W} {dtype} {name}: {rel_err(a, b):.3e}"


def test_empty_and_validation():
    ctx = torch.randn(0, 5, 6, 4)
    gates = torch.randn(0, 5, 6, 3)
    w = [torch.randn(4, 3, 3), torch.randn(4, 5, 5)]
    out, pooled = native.focal_context_fwd_native(ctx, gates, w, False)
    assert out.shape == (0, 5, 6, 4) and pooled.shape == (0, 4)
    # the C++ side validates too (std::invalid_argument -> ValueError)
    a = _C.FocalContextArgs()
    a.B, a.H, a.W, a.C, a.L = 1, 4, 4, 8, 5
    with pytest.raises(ValueError, match="focal levels"):
        _C.focal_context_workspace_bytes_cpu(a, False)
    a.L = 1
    a.ksize = [4, 0, 0, 0]
    with pytest.raises(ValueError, match="odd"):
        _C.focal_context_workspace_bytes_cpu(a, False)
    a.ksize = [3, 0, 0, 0]
    a.dtype = 7
    with pytest.raises(ValueError, match="dtype"):
        _C.focal_context_workspace_bytes_cpu(a, False)
    a.dtype = 0
    x = torch.randn(1, 4, 4, 8)
    g = torch.randn(1, 4, 4, 2)
    wt = torch.randn(8, 3, 3)
    out = torch.empty(1, 4, 4, 8)
    pooled = torch.empty(1, 8)
    a.ctx, a.ctx_stride = x.data_ptr(), list(x.stride())
    a.gates, a.gates_stride = g.data_ptr(), list(g.stride())
    a.weight = [wt.data_ptr(), 0, 0, 0]
    a.out, a.pooled = out.data_ptr(), pooled.data_ptr()
    need = _C.focal_context_workspace_bytes_cpu(a, False)
    ws = torch.empty(need, dtype=torch.uint8)
    a.workspace, a.workspace_bytes = ws.data_ptr(), need - 1
    with pytest.raises(ValueError, match="workspace"):
        _C.focal_context_fwd_cpu(a)
    a.workspace_bytes = need
    a.out = 0
    with pytest.raises(ValueError, match="out"):
        _C.focal_context_fwd_cpu(a)
    a.out = out.data_ptr()
    _C.focal_context_fwd_cpu(a)
    ref = contract_reference(x, g, [wt], False)["out"]
    assert rel_err(out, ref) < 1e-5
    with pytest.raises(ValueError):
        native.focal_context_fwd_native(x, g, [torch.randn(8, 4, 4)], False)


def test_forward_without_global_term_is_refused():
    """global_term=False (the inference op's fold of the global term into the h GEMM) is a Triton/CUDA
    option: the CPU kernel says so instead of returning a sum with the term in it."""
    ctx, gates, weights = make_contract_inputs(1, 5, 6, 8, [3, 5])
    with pytest.raises(ValueError, match="global_term=false is not supported by the CPU kernel"):
        native.focal_context_fwd_native(ctx, gates, weights, False, global_term=False)
