"""`focal_context`: validation, backend dispatch and the torch.library op (autograd, fake, compile).

Backends (docs/backend-contract.md): "triton" (focalnet_kernels/triton), "cuda" and "cpu" (native
extension focalnet_kernels._C), "reference" (eager torch, focalnet_kernels/reference.py).
`FOCALNET_KERNELS_BACKEND` = auto|triton|cuda|cpu|reference is read at every call.
auto: CUDA tensors -> the backend the measured table below names (else _CUDA_DEFAULT, from the same run);
CPU tensors -> the native CPU kernel when built, else Triton when TRITON_INTERPRET=1, else reference.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import reference
from .dispatch import backend_calls, count_call, forced_backend, warn_once  # noqa: F401 (ops.backend_calls)

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_LEVELS = 4
MIN_KERNEL, MAX_KERNEL = 3, 15

# Which backend `auto` picks for CUDA tensors, keyed by (L, kernel sizes); a configuration not listed
# uses _CUDA_DEFAULT. Written by `python -m benchmarks.cuda_preference --write` from the op section of a
# GPU suite run (benchmarks/results/), never by hand. The default for configurations the table does
# not list follows the same evidence: in the first H100 run (benchmarks/results/20261127-183419-*) the
# CUDA backend was faster than Triton in every measured case (forward, 1.7-1.9x) and passed all its GPU
# tests, so it is the default; a configuration without the CUDA extension still falls back to Triton.
# cuda-preference:begin
# Measured: NVIDIA H100 80GB HBM3, 20261127-183419-nvidia-h100-80gb-hbm3. Regenerate with python -m benchmarks.cuda_preference --write.
_CUDA_PREFERENCE: dict = {
    (2, (3, 5)): 'cuda',   # triton 5.173 ms, cuda 2.786 ms over 4 cases
    (3, (3, 5, 7)): 'cuda',   # triton 9.819 ms, cuda 5.377 ms over 4 cases
}
# cuda-preference:end
_CUDA_DEFAULT = "cuda"

# --------------------------------------------------------------------------------------------
# availability
# --------------------------------------------------------------------------------------------
def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _native_available(device_type: str) -> bool:
    try:
        from . import native
    except Exception:
        return False
    return native.available(device_type)


def _supported_by_kernels(ctx: Tensor, ksizes: Sequence[int]) -> Optional[str]:
    """None when the fast backends support this configuration, else the reason."""
    if ctx.dtype not in KERNEL_DTYPES:
        return f"dtype {ctx.dtype} (kernels take float32, float16, bfloat16)"
    if len(ksizes) > MAX_LEVELS:
        return f"{len(ksizes)} focal levels (kernels take 1..{MAX_LEVELS})"
    bad = [k for k in ksizes if not MIN_KERNEL <= k <= MAX_KERNEL]
    if bad:
        return f"kernel sizes {bad} (kernels take {MIN_KERNEL}..{MAX_KERNEL})"
    return None


def select_backend(ctx: Tensor, ksizes: Sequence[int]) -> str:
    """The backend a call with these inputs runs on (reads FOCALNET_KERNELS_BACKEND now)."""
    forced = forced_backend("FOCALNET_KERNELS_BACKEND", BACKENDS)
    dev = ctx.device.type
    if forced == "reference":
        return "reference"
    unsupported = _supported_by_kernels(ctx, ksizes)
    if forced != "auto":
        if forced == "triton":
            if not triton_available():
                raise RuntimeError("FOCALNET_KERNELS_BACKEND=triton but triton cannot be imported")
            if dev != "cuda" and not (dev == "cpu" and _interpret()):
                raise RuntimeError(
                    f"FOCALNET_KERNELS_BACKEND=triton needs CUDA tensors (or CPU tensors with "
                    f"TRITON_INTERPRET=1); got a {dev} tensor")
        elif forced in ("cuda", "cpu"):
            if dev != forced:
                raise RuntimeError(f"FOCALNET_KERNELS_BACKEND={forced} but the tensors are on {dev}")
            if not _native_available(forced):
                raise RuntimeError(
                    f"FOCALNET_KERNELS_BACKEND={forced} but the extension focalnet_kernels._C was not "
                    f"built with the {forced} backend (see focalnet_kernels.build_info())")
        if unsupported:
            raise RuntimeError(f"FOCALNET_KERNELS_BACKEND={forced} does not support {unsupported}")
        return forced
    if unsupported:
        if ctx.dtype != torch.float64:  # float64 is the tests' oracle dtype: reference on purpose
            warn_once(("unsupported", unsupported),
                       f"focal_context: no fused kernel for {unsupported}; using the eager reference")
        return "reference"
    if dev == "cuda":
        choice = _CUDA_PREFERENCE.get((len(ksizes), tuple(ksizes)), _CUDA_DEFAULT)
        for name in (choice, "triton", "cuda"):
            if name == "triton" and triton_available():
                return "triton"
            if name == "cuda" and _native_available("cuda"):
                return "cuda"
        warn_once("no-cuda-backend", "focal_context: neither triton nor the CUDA extension is "
                   "available for CUDA tensors; using the eager reference")
        return "reference"
    if dev == "cpu":
        if _native_available("cpu"):
            return "cpu"
        if _interpret() and triton_available():
            return "triton"
        warn_once("no-cpu-backend", "focal_context: the CPU kernel of focalnet_kernels._C is not "
                   "built; using the eager reference")
        return "reference"
    warn_once(("device", dev), f"focal_context: no kernel for {dev} tensors; using the eager reference")
    return "reference"


def _backend_fns(name: str):
    if name == "reference":
        return reference.focal_context_fwd_ref, reference.focal_context_bwd_ref
    if name == "triton":
        from .triton import focal_context_bwd_triton, focal_context_fwd_triton
        return focal_context_fwd_triton, focal_context_bwd_triton
    from . import native
    return native.focal_context_fwd_native, native.focal_context_bwd_native


def _backend_weights(name: str, ctx: Tensor, kernels: Sequence[Tensor]) -> List[Tensor]:
    """The user's [C,1,k,k] weights as the contract's contiguous [C,k,k]: float32 for the kernels
    (float64 only for the reference on float64 inputs, the tests' oracle dtype)."""
    dtype = torch.float64 if (name == "reference" and ctx.dtype == torch.float64) else torch.float32
    return [k.detach().reshape(k.shape[0], k.shape[-2], k.shape[-1]).to(dtype).contiguous() for k in kernels]


# --------------------------------------------------------------------------------------------
# the torch.library ops
# --------------------------------------------------------------------------------------------
# Defined with torch.library.define/impl, not torch.library.custom_op: custom_op wraps every
# implementation in torch._disable_dynamo, which imports torch._dynamo (and sympy, Inductor, triton)
# at the first call of the op: 1.3-2.4 s of first-call latency on a CPU (benchmarks/first_call.py).
# `_not_traced_by_dynamo` keeps what that wrapper is for without the import.
_LIB = torch.library.Library("focalnet", "FRAGMENT")
_LIB.define("focal_context_fwd(Tensor ctx, Tensor gates, Tensor[] kernels, bool normalize) -> (Tensor, Tensor)",
            tags=(torch.Tag.pt2_compliant_tag,))
_LIB.define("focal_context_bwd(Tensor grad_out, Tensor ctx, Tensor gates, Tensor[] kernels, Tensor pooled, "
            "bool normalize) -> (Tensor, Tensor, Tensor[])", tags=(torch.Tag.pt2_compliant_tag,))


def _not_traced_by_dynamo(fn):
    """fn behind torch._dynamo.disable (torch.compile must not trace into an op's implementation,
    e.g. when it runs eagerly after a graph break), as custom_op does, but without importing
    torch._dynamo: until something else has imported it, nothing can be tracing."""
    disabled = []

    @functools.wraps(fn)
    def wrapper(*args):
        disable = getattr(sys.modules.get("torch._dynamo"), "disable", None)
        if disable is None:
            return fn(*args)
        if not disabled:
            disabled.append(disable(fn))
        return disabled[0](*args)
    return wrapper


def _implements(name: str):
    def register(fn):
        _LIB.impl(name, _not_traced_by_dynamo(fn), "CompositeExplicitAutograd")
        return fn
    return register


@_implements("focal_context_fwd")
def _fwd_impl(ctx: Tensor, gates: Tensor, kernels: List[Tensor], normalize: bool) -> Tuple[Tensor, Tensor]:
    """Returns (ctx_all, pooled): pooled is the fp32 spatial mean of the last level, kept for backward."""
    B, H, W, C = ctx.shape
    if ctx.numel() == 0:
        pooled = torch.full((B, C), float("nan") if B * C else 0.0, dtype=torch.float32, device=ctx.device)
        return ctx.new_zeros((B, H, W, C)), pooled
    name = select_backend(ctx, [k.shape[-1] for k in kernels])
    count_call(name + ":fwd")
    fwd, _ = _backend_fns(name)
    return fwd(ctx, gates, _backend_weights(name, ctx, kernels), normalize)


@torch.library.register_fake("focalnet::focal_context_fwd", lib=_LIB)
def _(ctx, gates, kernels, normalize):
    B, H, W, C = ctx.shape
    pdt = torch.float64 if ctx.dtype == torch.float64 else torch.float32
    return ctx.new_empty((B, H, W, C)), ctx.new_empty((B, C), dtype=pdt)


@_implements("focal_context_bwd")
def _bwd_impl(grad_out: Tensor, ctx: Tensor, gates: Tensor, kernels: List[Tensor], pooled: Tensor,
              normalize: bool) -> Tuple[Tensor, Tensor, List[Tensor]]:
    if ctx.numel() == 0:
        return (torch.zeros_like(ctx, memory_format=torch.contiguous_format),
                torch.zeros_like(gates, memory_format=torch.contiguous_format),
                [torch.zeros_like(k) for k in kernels])
    name = select_backend(ctx, [k.shape[-1] for k in kernels])
    count_call(name + ":bwd")
    _, bwd = _backend_fns(name)
    grad_ctx, grad_gates, grad_w = bwd(grad_out, ctx, gates, _backend_weights(name, ctx, kernels), pooled, normalize)
    grad_k = [gw.reshape(k.shape).to(k.dtype) for gw, k in zip(grad_w, kernels)]
    return grad_ctx, grad_gates, grad_k


@torch.library.register_fake("focalnet::focal_context_bwd", lib=_LIB)
def _(grad_out, ctx, gates, kernels, pooled, normalize):
    return (ctx.new_empty(ctx.shape), gates.new_empty(gates.shape), [k.new_empty(k.shape) for k in kernels])


#: The ops (OpOverloads): focal_context_fwd(ctx, gates, kernels, normalize) -> (ctx_all, pooled) and
#: focal_context_bwd(grad_out, ctx, gates, kernels, pooled, normalize) -> (grad_ctx, grad_gates, grad_kernels).
focal_context_fwd = torch.ops.focalnet.focal_context_fwd.default
focal_context_bwd = torch.ops.focalnet.focal_context_bwd.default


def _setup_context(ctx, inputs, output):
    x, gates, kernels, normalize = inputs
    _, pooled = output
    ctx.save_for_backward(x, gates, pooled, *kernels)
    ctx.normalize = normalize
    ctx.mark_non_differentiable(pooled)


def _backward(ctx, grad_out, _grad_pooled):
    x, gates, pooled, *kernels = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(x)
    grad_x, grad_gates, grad_k = focal_context_bwd(grad_out, x, gates, list(kernels), pooled, ctx.normalize)
    return grad_x, grad_gates, list(grad_k), None


torch.library.register_autograd("focalnet::focal_context_fwd", _backward, setup_context=_setup_context, lib=_LIB)


# Double backward. A plain backward (create_graph=False) runs with grad mode off, so
# focal_context_bwd records nothing and stays on the backend's kernel. With create_graph=True it
# still runs the kernel, and records this formula: when its gradients are differentiated in turn
# (a gradient penalty, gradgradcheck), the second-order terms come from differentiating the eager
# reference's backward at the saved inputs. It is made of torch ops on those inputs, so third and
# higher orders follow.
def _bwd_setup_context(ctx, inputs, output):
    grad_out, x, gates, kernels, _pooled, normalize = inputs
    ctx.save_for_backward(grad_out, x, gates, *kernels)
    ctx.normalize = normalize


def _bwd_backward(ctx, grad_grad_x, grad_grad_gates, grad_grad_k):
    saved = ctx.saved_tensors
    grads = _reference_double_backward(saved, [grad_grad_x, grad_grad_gates, *grad_grad_k], ctx.normalize)
    grad_grad_out, gx, ggates, *gk = grads
    return grad_grad_out, gx, ggates, gk, None, None


def _reference_double_backward(saved: Sequence[Tensor], grad_grads: Sequence[Optional[Tensor]],
                               normalize: bool) -> List[Optional[Tensor]]:
    """The vector-Jacobian product of (grad_out, ctx, gates, *kernels) -> (grad_ctx, grad_gates,
    *grad_kernels) with grad_grads, by autograd through focal_context_ref."""
    if saved[1].numel() == 0 or all(g is None for g in grad_grads):
        return [None] * len(saved)
    create_graph = torch.is_grad_enabled()  # the caller differentiates this result too
    with torch.enable_grad():
        # a fresh node per position: the same tensor at two positions (one kernel at two levels,
        # ctx and gates as views of one map) gets its per-position gradient, as the op's inputs do
        inputs = [t.view_as(t) if t.requires_grad else t.detach().requires_grad_(True) for t in saved]
        grad_out, x, gates, *kernels = inputs
        out = reference.focal_context_ref(x, gates, kernels, normalize)
        first = torch.autograd.grad(out, [x, gates, *kernels], grad_out, create_graph=True)
        used = [(f, g) for f, g in zip(first, grad_grads) if g is not None]
        return list(torch.autograd.grad([f for f, _ in used], inputs, [g for _, g in used],
                                        allow_unused=True, create_graph=create_graph))


torch.library.register_autograd("focalnet::focal_context_bwd", _bwd_backward, setup_context=_bwd_setup_context,
                                lib=_LIB)


# --------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------
def _type_name(x) -> str:
    """The type of x as the user knows it: `int`, `numpy.int64`, `torch.Tensor`."""
    t = type(x)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _check_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"focal_context: `{name}` must be a torch.Tensor, got {_type_name(t)}")
    if t.layout != torch.strided:  # sparse COO/CSR/..., mkldnn: the kernels read strided memory
        raise TypeError(f"focal_context: `{name}` must be a dense (strided) tensor, got layout {t.layout}")
    if not t.is_floating_point():
        raise TypeError(f"focal_context: `{name}` must be a floating-point tensor, got dtype {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"focal_context: `{name}` must have {ndim} dimensions, got shape {tuple(t.shape)}")


def _as_bool(normalize) -> bool:
    """normalize as a Python bool: a bool, or a numpy.bool_ (its type is named "bool" too)."""
    if isinstance(normalize, bool):
        return normalize
    np = sys.modules.get("numpy")  # a numpy.bool_ exists only if numpy was imported
    if np is not None and isinstance(normalize, np.bool_):
        return bool(normalize)
    raise TypeError(f"focal_context: `normalize` must be a bool or numpy.bool_, got {_type_name(normalize)}")


def validate(ctx, gates, kernels, normalize) -> bool:
    """Raise TypeError/ValueError naming the offending argument; returns normalize as a Python bool."""
    _check_tensor("ctx", ctx, 4)
    if ctx.dtype not in KERNEL_DTYPES + (torch.float64,):
        raise TypeError(f"focal_context: `ctx` dtype must be float32, float16, bfloat16 or float64, got {ctx.dtype}")
    if isinstance(kernels, Tensor) or not isinstance(kernels, (list, tuple)):
        raise TypeError("focal_context: `kernels` must be a list or tuple of L depthwise weights [C,1,k,k], "
                        f"got {_type_name(kernels)}")
    L = len(kernels)
    if L < 1:
        raise ValueError("focal_context: `kernels` must hold at least one level (L >= 1), got an empty sequence")
    B, H, W, C = ctx.shape
    _check_tensor("gates", gates, 4)
    if gates.dtype != ctx.dtype:
        raise TypeError(f"focal_context: `gates` dtype {gates.dtype} must match `ctx` dtype {ctx.dtype}")
    if tuple(gates.shape) != (B, H, W, L + 1):
        raise ValueError(f"focal_context: `gates` must have shape (B, H, W, L+1) = {(B, H, W, L + 1)}, "
                         f"got {tuple(gates.shape)}")
    if gates.device != ctx.device:
        raise ValueError(f"focal_context: `gates` is on {gates.device} but `ctx` is on {ctx.device}")
    for i, k in enumerate(kernels):
        _check_tensor(f"kernels[{i}]", k, 4)
        if k.shape[0] != C or k.shape[1] != 1:
            raise ValueError(f"focal_context: `kernels[{i}]` must have shape (C, 1, k, k) with C={C}, "
                             f"got {tuple(k.shape)}")
        if k.shape[2] != k.shape[3]:
            raise ValueError(f"focal_context: `kernels[{i}]` must be square, got {tuple(k.shape[2:])}")
        if k.shape[2] % 2 != 1:
            raise ValueError(f"focal_context: `kernels[{i}]` size must be odd, got {k.shape[2]}")
        if k.device != ctx.device:
            raise ValueError(f"focal_context: `kernels[{i}]` is on {k.device} but `ctx` is on {ctx.device}")
    return _as_bool(normalize)


def focal_context(ctx: Tensor, gates: Tensor, kernels: Sequence[Tensor], *, normalize: bool = False) -> Tensor:
    """The focal-context stage of FocalModulation (notes §1), from ctx and the gates through ctx_all.

    ctx: B×H×W×C (any strides: a view into the f-projection output, or a channels-first map seen
    through permute); gates: B×H×W×(L+1), same dtype; kernels: L depthwise weights [C,1,k,k], k odd,
    any strides and any floating dtype (used in float32, in float64 when ctx is float64; their
    gradients come back in their own dtype). All on one device, dense (strided) tensors: a sparse or
    mkldnn tensor raises TypeError; meta tensors give meta results. normalize: a bool (a numpy.bool_
    is accepted). Returns ctx_all, B×H×W×C contiguous, in ctx's dtype.

    Differentiable w.r.t. ctx, gates and kernels, to any order. The backward runs on the backend's
    kernel, with create_graph=True too; when that backward is differentiated in turn (a gradient
    penalty, torch.autograd.gradgradcheck), the second-order terms are computed by autograd through
    the eager reference (focal_context_ref) at the saved inputs: eager speed and memory for that
    part, float32 arithmetic for half inputs. torch.compile has no double backward (aot_autograd
    raises); double backward is for eager code.
    """
    normalize = validate(ctx, gates, kernels, normalize)
    if _exporting_to_onnx():
        # ONNX has no focal-context operator: export the op as its decomposition into standard ops.
        return reference.focal_context_ref(ctx, gates, kernels, normalize)
    out, _ = focal_context_fwd(ctx, gates, list(kernels), normalize)
    return out


def _exporting_to_onnx() -> bool:
    # `torch.onnx` takes ~0.1 s to import, and an ONNX export has imported it: outside dynamo's
    # tracing (which does not read sys.modules), its absence means no export is running.
    if not torch.compiler.is_compiling() and "torch.onnx" not in sys.modules:
        return False
    try:
        return bool(torch.onnx.is_in_onnx_export())
    except Exception:  # pragma: no cover - very old torch
        return False
