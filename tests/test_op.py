"""The torch.library op: registration (opcheck), torch.compile without graph breaks, autocast,
backend selection through FOCALNET_KERNELS_BACKEND."""
import os

import pytest
import torch

import focalnet_kernels as fk
from focalnet_kernels import dispatch, ops
from conftest import kernel_backends, rel_err, run_fresh_python


def _inputs(B=2, H=5, W=6, C=4, ks=(3, 5), dtype=torch.float32, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = len(ks)
    f_out = torch.randn(B, H, W, 2 * C + L + 1, generator=g, dtype=dtype)
    kernels = [torch.randn(C, 1, k, k, generator=g, dtype=dtype) for k in ks]
    if requires_grad:
        f_out.requires_grad_(True)
        for k in kernels:
            k.requires_grad_(True)
    return f_out, f_out[..., C : 2 * C], f_out[..., 2 * C :], kernels


@pytest.mark.parametrize("name", ["reference"] + kernel_backends())
def test_opcheck(backend, name):
    backend(name)
    _, ctx, gates, ks = _inputs(requires_grad=True)
    before = ops.backend_calls[f"{name}:bwd"]
    torch.library.opcheck(ops.focal_context_fwd, (ctx, gates, ks, True))
    assert ops.backend_calls[f"{name}:bwd"] > before


@pytest.mark.parametrize("name", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_on_kernel_backends(backend, name, dtype):
    if name == "triton" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter does not do bf16 arithmetic correctly: bf16 is tested on GPU")
    backend(name)
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 2 * 4 + 3)
    ks = [torch.randn(4, 1, 3, 3, requires_grad=True), torch.randn(4, 1, 5, 5, requires_grad=True)]
    x = torch.randn(2, 5, 6, 8)
    before = ops.backend_calls[f"{name}:fwd"]
    with torch.autocast("cpu", dtype=dtype):
        y = lin(x)
        out = fk.focal_context(y[..., 4:8], y[..., 8:], ks)
    assert ops.backend_calls[f"{name}:fwd"] == before + 1
    assert out.dtype == y.dtype
    out.float().sum().backward()
    assert all(k.grad is not None and k.grad.dtype == torch.float32 for k in ks)
    want = fk.focal_context_ref(y[..., 4:8].double(), y[..., 8:].double(), [k.double() for k in ks])
    assert rel_err(out, want) < 1e-2


def test_compile_fullgraph_no_recompile(backend):
    backend("reference")
    torch._dynamo.reset()

    def f(y, k0, k1):
        C = k0.shape[0]
        return fk.focal_context(y[..., C : 2 * C], y[..., 2 * C :], [k0, k1]).sum()

    counter = torch._dynamo.testing.CompileCounter()
    cf = torch.compile(f, fullgraph=True, backend=counter)
    for seed in range(3):
        y, _, _, ks = _inputs(seed=seed)
        want = f(y, *ks)
        assert rel_err(cf(y, *ks), want) < 1e-6
    assert counter.frame_count == 1, "recompiled across calls of the same shape"


def test_compile_backward_aot_eager(backend):
    backend("reference")
    torch._dynamo.reset()
    y, _, _, ks = _inputs(requires_grad=True)

    def f(y, k0, k1):
        C = k0.shape[0]
        return (fk.focal_context(y[..., C : 2 * C], y[..., 2 * C :], [k0, k1], normalize=True) ** 2).sum()

    grads = torch.autograd.grad(f(y, *ks), (y, *ks))
    cgrads = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(y, *ks), (y, *ks))
    for a, b in zip(cgrads, grads):
        assert rel_err(a, b) < 1e-6


def test_autocast_mixed_dtypes(backend):
    """Under autocast the f-projection yields bf16 ctx/gates while the conv weights stay fp32."""
    backend("reference")
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 2 * 4 + 3)
    ks = [torch.randn(4, 1, 3, 3, requires_grad=True), torch.randn(4, 1, 5, 5, requires_grad=True)]
    x = torch.randn(2, 5, 6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
        out = fk.focal_context(y[..., 4:8], y[..., 8:], ks)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(k.grad is not None and k.grad.dtype == torch.float32 for k in ks)
    want = fk.focal_context_ref(y[..., 4:8].float(), y[..., 8:].float(), ks)
    assert rel_err(out, want) < 1e-2


@pytest.mark.parametrize("name", ["cuda", "fastest"])
def test_forcing_impossible_backend_raises(monkeypatch, name):
    _, ctx, gates, ks = _inputs()
    monkeypatch.setenv("FOCALNET_KERNELS_BACKEND", name)
    with pytest.raises((RuntimeError, ValueError), match="FOCALNET_KERNELS_BACKEND"):
        fk.focal_context(ctx, gates, ks)


def test_unsupported_config_warns_once_and_falls_back(monkeypatch):
    monkeypatch.delenv("FOCALNET_KERNELS_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "_warned", set())
    _, ctx, gates, _ = _inputs(ks=(3,))
    ks = [torch.randn(ctx.shape[-1], 1, 17, 17)]  # kernel 17 > 15: valid, but no fused kernel
    before = ops.backend_calls["reference:fwd"]
    with pytest.warns(RuntimeWarning, match="no fused kernel"):
        out = fk.focal_context(ctx, gates, ks)
    assert ops.backend_calls["reference:fwd"] == before + 1
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fk.focal_context(ctx, gates, ks)  # second call: no second warning
    assert rel_err(out, fk.focal_context_ref(ctx, gates, ks)) < 1e-6


def test_build_info_reports_backends():
    info = fk.build_info()
    assert info["version"]
    assert isinstance(info["backends"], list)


def test_one_call_counter_shared_by_both_dispatchers(backend):
    """ops.backend_calls, focalnet_kernels.backend_calls and linear's counter are one object."""
    assert ops.backend_calls is fk.backend_calls is dispatch.backend_calls
    backend("reference")
    _, ctx, gates, ks = _inputs()
    before = dict(fk.backend_calls)
    fk.focal_context(ctx, gates, ks)
    fk.linear(torch.randn(3, 4), torch.randn(5, 4))
    after = fk.backend_calls
    assert after["reference:fwd"] == before.get("reference:fwd", 0) + 1
    assert sum(after[k] for k in after if k.startswith("linear:")) == \
        sum(v for k, v in before.items() if k.startswith("linear:")) + 1


FRESH_FIRST_CALL = r"""
import sys, torch, focalnet_kernels as fk
y = torch.randn(1, 6, 7, 2 * 4 + 3, requires_grad=True)
ks = [torch.randn(4, 1, k, k, requires_grad=True) for k in (3, 5)]
with torch.no_grad():
    fk.focal_context(y[..., 4:8], y[..., 8:], ks)
fk.focal_context(y[..., 4:8], y[..., 8:], ks).sum().backward()
print("HEAVY", sorted(m for m in ("torch._dynamo", "torch._inductor", "torch.onnx", "sympy", "triton") if m in sys.modules))
print("CALLS", dict(fk.backend_calls))
"""


def test_first_call_imports_nothing_heavy():
    """The first-call latency fix: in a fresh process a forward and a backward on the CPU kernel import
    neither torch._dynamo (custom_op's wrapper imported it at the first call: ~2 s) nor sympy, Inductor,
    triton or torch.onnx (the ONNX-export check imported it: ~0.1 s). (No timing assertion: `python -m benchmarks.first_call` measures the time.)"""
    env = {k: v for k, v in os.environ.items() if k not in ("FOCALNET_KERNELS_BACKEND", "TRITON_INTERPRET")}
    proc = run_fresh_python(FRESH_FIRST_CALL, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    expected = "cpu" if ops._native_available("cpu") else "reference"
    assert f"'{expected}:bwd': 1" in lines["CALLS"], lines["CALLS"]
    assert lines["HEAVY"] == "[]", f"imported at the first call: {lines['HEAVY']}"


def test_first_call_benchmark_prints_its_rows():
    """benchmarks.first_call runs (one fresh process, a tiny shape) and prints every row; no timings checked."""
    import contextlib
    import io
    from benchmarks import first_call
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert first_call.main(["--runs", "1", "--shape", "1x6x7x4", "--ks", "3,5", "--threads", "1"]) == 0
    out = buf.getvalue()
    assert out.startswith("CPU: ") and "1x6x7x4" in out, out
    for _, label in first_call.ROWS:
        assert any(line.startswith(label) and len(line.split()) >= 3 for line in out.splitlines()), (label, out)
