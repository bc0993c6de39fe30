import os

# Triton kernels run on CPU tensors through the interpreter; it must be switched on before triton is
# imported anywhere. On a GPU machine (the GPU suite) the kernels compile for the device instead.
def _cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _patch_old_triton_interpreter() -> None:
    """Workaround for Triton < 3.8's interpreter with numpy >= 2.4 (the GPU machine's Triton 3.6 when
    its kernels run interpreted, e.g. the CI leg with Triton 3.6).

    While a kernel runs, the interpreter gives tl.tensor an ``__index__`` of
    ``int(self.handle.data)`` (triton/runtime/interpreter.py, _patch_lang_tensor). A scalar such as
    ``tl.program_id(0)`` is held as a 1-element 1-D numpy array, and numpy 2.4 removed int() of arrays
    with ndim > 0, so ``range(pid, total, nprog)`` in a kernel raises "TypeError: only 0-dimensional
    arrays can be converted to Python scalars". Triton 3.8 changed that line to
    ``int(self.handle.data.squeeze())``; this wraps _patch_lang_tensor to install the same ``__index__``
    after the original (it is registered in the same restore scope, so it is undone with the rest when
    the kernel returns). Nothing is changed for Triton >= 3.8, for compiled kernels, or when the
    interpreter's layout is not the one this was written against (then the tests show the error)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import re
        import triton
        from triton.runtime import interpreter
    except Exception:
        return
    m = re.match(r"(\d+)\.(\d+)", getattr(triton, "__version__", ""))
    if not m or (int(m.group(1)), int(m.group(2))) >= (3, 8):
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_focalnet_squeeze_index", False):
        return

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    _patch_lang_tensor._focalnet_squeeze_index = True
    interpreter._patch_lang_tensor = _patch_lang_tensor


_patch_old_triton_interpreter()

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


@pytest.fixture
def forbid_eager_dwconv(monkeypatch):
    """Make every eager depthwise conv raise while the test runs: proves a kernel did the work."""
    real_conv, real_convt = F.conv2d, F.conv_transpose2d

    def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        if groups > 1:
            raise AssertionError("eager depthwise conv2d ran: the fused path fell back to eager")
        return real_conv(input, weight, bias, stride, padding, dilation, groups)

    def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
        if groups > 1:
            raise AssertionError("eager depthwise conv_transpose2d ran: the fused path fell back to eager")
        return real_convt(input, weight, bias, stride, padding, output_padding, groups, dilation)

    monkeypatch.setattr(F, "conv2d", conv2d)
    monkeypatch.setattr(F, "conv_transpose2d", conv_transpose2d)
    monkeypatch.setattr(torch.nn.functional, "conv2d", conv2d)
    yield


@pytest.fixture
def forbid_eager_dwconv_later(monkeypatch):
    """A context manager form of forbid_eager_dwconv, for tests that run the eager model first."""
    import contextlib

    @contextlib.contextmanager
    def _ctx():
        with monkeypatch.context() as m:
            real_conv = F.conv2d

            def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
                if groups > 1:
                    raise AssertionError("eager depthwise conv2d ran: the fused path fell back to eager")
                return real_conv(input, weight, bias, stride, padding, dilation, groups)

            m.setattr(F, "conv2d", conv2d)
            yield
    return _ctx


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is fastest and immune to OpenMP stalls on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def backend(monkeypatch):
    """Force a focal_context backend for one test: backend('triton')."""
    def _set(name):
        monkeypatch.setenv("FOCALNET_KERNELS_BACKEND", name)
    return _set


def rel_err(a, b):
    """||a - b|| / ||b|| in fp64 on the CPU (any device, any dtype)."""
    a = a.detach().cpu().double()
    b = b.detach().cpu().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def kernel_backends():
    """The fused backends that can run on CPU tensors here: the native CPU kernel (when the
    extension is built) and Triton in its interpreter (when TRITON_INTERPRET=1)."""
    from focalnet_kernels import ops
    names = []
    if ops._native_available("cpu"):
        names.append("cpu")
    if ops.triton_available() and os.environ.get("TRITON_INTERPRET") == "1":
        names.append("triton")
    return names


# --------------------------------------------------------------------------------------------
# The contract's fp64 oracle and the input makers shared by the backend test files
# (test_triton_fwd/bwd, test_cpu_backend, test_cuda_backend). The oracle is written here, apart
# from focalnet_kernels.reference, so that the library's own reference is tested too.
# --------------------------------------------------------------------------------------------
import math  # noqa: E402


class _ContractGelu(torch.autograd.Function):
    """Exact GELU whose backward is dz = dx * GELU'(z), GELU' = Phi(z) + z phi(z), as ONE factor
    (autograd through the composite formula would split an infinite dx into two terms of opposite
    sign and turn +-Inf into NaN, unlike the contract: docs/backend-contract.md)."""

    @staticmethod
    def forward(ctx, z):
        ctx.save_for_backward(z)
        return 0.5 * z * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        d = 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0)))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
        return grad * d


def contract_forward(ctx, gates, weights, normalize):
    """(out B×H×W×C, pooled B×C, mean |x_L| B×C) by the contract, in the inputs' dtype and differentiable:
    channels-first depthwise F.conv2d per level, exact GELU, gated sum, global term.
    weights: [C,k,k] or [C,1,k,k]."""
    x = ctx.permute(0, 3, 1, 2)
    C, L = x.shape[1], len(weights)
    acc = 0
    for lvl, w in enumerate(weights):
        k = w.shape[-1]
        x = _ContractGelu.apply(F.conv2d(x, w.reshape(C, 1, k, k), padding=k // 2, groups=C))
        acc = acc + x.permute(0, 2, 3, 1) * gates[..., lvl:lvl + 1]
    pooled = x.mean(dim=(2, 3))
    acc = acc + _ContractGelu.apply(pooled)[:, None, None, :] * gates[..., L:L + 1]
    return (acc / (L + 1) if normalize else acc), pooled, x.abs().mean(dim=(2, 3))


def contract_reference(ctx, gates, weights, normalize, grad_out=None, dtype=torch.float64):
    """dict(out, pooled, pooled_abs[, grad_ctx, grad_gates, grad_w]) of the contract, computed on CPU
    copies in `dtype` (fp64: the oracle). One torch thread: the grouped fp64 conv runs one small
    kernel per channel, and a fork/join per call costs more than the work on a small machine."""
    need = grad_out is not None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        c = ctx.detach().cpu().to(dtype).requires_grad_(need)
        g = gates.detach().cpu().to(dtype).requires_grad_(need)
        ws = [w.detach().cpu().to(dtype).requires_grad_(need) for w in weights]
        out, pooled, pabs = contract_forward(c, g, ws, normalize)
        r = dict(out=out.detach(), pooled=pooled.detach(), pooled_abs=pabs.detach())
        if need:
            grads = torch.autograd.grad(out, [c, g] + ws, grad_out.detach().cpu().to(dtype))
            r.update(grad_ctx=grads[0], grad_gates=grads[1], grad_w=list(grads[2:]))
    finally:
        torch.set_num_threads(threads)
    return r


#: Input layouts of make_contract_inputs: how ctx and gates are laid out in memory.
CONTRACT_LAYOUTS = ("contig", "slice", "chfirst", "offset1", "bcast", "wstep")


def make_contract_inputs(B, H, W, C, ks, dtype=torch.float32, layout="contig", seed=0, device="cpu",
                         wscale=1.5, gen=None):
    """ctx B×H×W×C and gates B×H×W×(L+1) in `dtype`, laid out as `layout` says, and fp32 depthwise
    weights [C,k,k] ~ N(0, 1) * wscale / k (levels stay O(1)). Values are made in fp32 and rounded to
    dtype, so the fp64 oracle sees exactly what a kernel sees.

    contig   contiguous tensors
    slice    views into an f-projection-like output [B,H,W, C | C | L+1 | 3 spare] (the model's use)
    chfirst  channels-first storage permuted to B×H×W×C (ctx rows padded by 2: channel stride H*(W+2)),
             gates likewise (unpadded)
    offset1  views one element off the storage's alignment (vector kernels take their scalar path)
    bcast    gates broadcast over W (stride 0)
    wstep    every other column of a wider tensor (W stride 2, channel offset 1), gates transposed
    """
    if layout not in CONTRACT_LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {CONTRACT_LAYOUTS}")
    gen = gen or torch.Generator().manual_seed(seed)
    L = len(ks)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(device)

    if layout == "slice":
        y = randn(B, H, W, 2 * C + L + 1 + 3)
        ctx, gates = y[..., C:2 * C], y[..., 2 * C:2 * C + L + 1]
    elif layout == "chfirst":  # rows padded: not contiguous even with C = 1
        ctx = randn(B, C, H, W + 2)[..., 1:W + 1].permute(0, 2, 3, 1)
        gates = randn(B, L + 1, H, W).permute(0, 2, 3, 1)
    elif layout == "offset1":
        y = randn(B, H, W, C + L + 2)
        ctx, gates = y[..., 1:1 + C], y[..., 1 + C:]
    elif layout == "bcast":
        ctx = randn(B, H, W, C)
        gates = randn(B, H, 1, L + 1).expand(B, H, W, L + 1)
    elif layout == "wstep":
        ctx = randn(B, H, 2 * W, C + 3)[:, :, ::2, 1:C + 1]
        gates = randn(B, W, H, L + 1).transpose(1, 2)
    else:
        ctx, gates = randn(B, H, W, C), randn(B, H, W, L + 1)
    weights = [(torch.randn(C, k, k, generator=gen) * (wscale / k)).contiguous().to(device) for k in ks]
    return ctx, gates, weights


def make_contract_grad_out(B, H, W, C, dtype=torch.float32, layout="chfirst", seed=1, device="cpu", gen=None):
    """grad_out B×H×W×C: "chfirst" (channels-first with rows padded by 1, permuted: the default,
    not contiguous whenever H*W > 1), "slice" (the second half of a 2C-wide tensor) or "contig"."""
    gen = gen or torch.Generator().manual_seed(seed)
    if layout == "chfirst":
        return torch.randn(B, C, H, W + 1, generator=gen).to(dtype).to(device)[..., :W].permute(0, 2, 3, 1)
    if layout == "slice":
        return torch.randn(B, H, W, 2 * C, generator=gen).to(dtype).to(device)[..., C:]
    return torch.randn(B, H, W, C, generator=gen).to(dtype).to(device)


def run_fresh_python(code, *args, env=None, timeout=300):
    """`python -c code args...` in a fresh interpreter that imports the same focalnet_kernels (and
    focalnet) as this test session. It runs in the folder that holds the imported package: a `-c`
    child puts its working directory first on sys.path, so started in the repository root of a
    non-editable install (CI) it would import the source tree, which has no compiled extension."""
    import subprocess
    import sys
    import focalnet_kernels
    root = os.path.dirname(os.path.dirname(os.path.abspath(focalnet_kernels.__file__)))
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=timeout)
