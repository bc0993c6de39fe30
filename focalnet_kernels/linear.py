"""`linear`: a linear layer with an optional GELU epilogue, and `linear_ref` beside it.

Why it exists: on CPUs, a FocalNet forward is ~70% GEMMs (the f / h / proj projections and the MLP),
and torch's `F.linear` sends fp32 GEMMs to MKL, which runs its AVX2 code on non-Intel CPUs. oneDNN
(shipped inside torch as mkldnn) picks its kernels by instruction set, so on an AVX-512 AMD EPYC it
is 2-2.8x faster for these shapes, and it applies GELU as a GEMM epilogue instead of a second pass
over the activations (`python -m benchmarks.linear_bench` measures both on the machine at hand).

Dispatch (FOCALNET_LINEAR_BACKEND, read per call: auto | onednn | torch):
  auto    oneDNN (`torch.ops.mkldnn._linear_pointwise`) for fp32 CPU tensors (plain tensors or
          Parameters, not subclasses such as DTensor), CPU autocast off, torch built with it.
          Inference: one oneDNN call, GELU as its epilogue. With a gradient: a small autograd
          Function - forward on oneDNN (GELU applied after it, its input saved), backward with
          grad_x and grad_w as oneDNN GEMMs too (grad_w in the orientation oneDNN runs fast),
          grad_b a sum. Otherwise `linear_ref` (CUDA, other dtypes, autocast: torch's own GEMM is
          the right choice there, so no warning).
  onednn  as auto, but raises where oneDNN cannot run instead of falling back.
  torch   always `linear_ref` (F.linear, then F.gelu).
Inside torch.compile'd code every backend but `torch` is skipped (auto) or refused (onednn):
Inductor lowers the oneDNN op only for frozen weights, and fuses F.linear's epilogues itself.
`torch.backends.mkldnn.enabled = False` turns the oneDNN path off.

The oneDNN GELU epilogue is the exact (erf) GELU, like F.gelu(approximate="none"). Results differ
from MKL's in rounding only (summation order): ~1e-7 relative in fp32.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from torch.autograd.function import once_differentiable

from .dispatch import count_call, forced_backend

LINEAR_BACKENDS = ("auto", "onednn", "torch")
ACTIVATIONS = (None, "gelu")


def linear_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
               activation: Optional[str] = None) -> Tensor:
    """F.linear(x, weight, bias), then GELU (exact) when activation == "gelu"."""
    y = F.linear(x, weight, bias)
    return F.gelu(y) if activation == "gelu" else y


def _find_onednn_op():
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


_ONEDNN_LINEAR = _find_onednn_op()   # looked up once: torch.compile does not trace torch.backends


def _cpu_autocast_enabled() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:   # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def _onednn_unsupported(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Optional[str]:
    """Why oneDNN cannot take this call (None: it can)."""
    if _ONEDNN_LINEAR is None:
        return "this torch build has no oneDNN (mkldnn) linear"
    if torch.compiler.is_compiling():
        return "inside torch.compile (Inductor lowers the oneDNN op only for frozen weights; it fuses F.linear's epilogue itself)"
    if not torch.backends.mkldnn.enabled:
        return "torch.backends.mkldnn is disabled"
    if _cpu_autocast_enabled():
        return "CPU autocast is on (F.linear follows its dtype policy)"
    tensors = [t for t in (x, weight, bias) if t is not None]
    if any(type(t) not in (Tensor, torch.nn.Parameter) for t in tensors):
        return "a tensor subclass (" + ", ".join(sorted({type(t).__name__ for t in tensors})) + ")"
    if any(t.device.type != "cpu" for t in tensors):
        return "tensors not on the CPU"
    if any(t.dtype != torch.float32 for t in tensors):
        return f"dtype {x.dtype} (oneDNN path is fp32 only)"
    if x.dim() < 2 or x.numel() == 0:
        return "input with fewer than 2 dims or no elements"
    return None


def select_linear_backend(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> str:
    """The backend `linear` runs this call on ("onednn" or "torch"); reads FOCALNET_LINEAR_BACKEND now."""
    forced = forced_backend("FOCALNET_LINEAR_BACKEND", LINEAR_BACKENDS)
    if forced == "torch":
        return "torch"
    why = _onednn_unsupported(x, weight, bias)
    if why is None:
        return "onednn"
    if forced == "onednn":
        raise RuntimeError(f"FOCALNET_LINEAR_BACKEND=onednn but {why}")
    return "torch"


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
           activation: Optional[str] = None) -> Tensor:
    """y = act(x @ weight.T + bias) over the last dim of x (any leading dims, any strides).

    x: [..., in_features]; weight: [out_features, in_features]; bias: [out_features] or None;
    activation: None or "gelu" (exact erf GELU). Same dtype and device for all three.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"linear: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor):
        raise TypeError("linear: x and weight must be tensors")
    if weight.dim() != 2:
        raise ValueError(f"linear: weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: x's last dim must be in_features={weight.shape[1]}, got shape {tuple(x.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"linear: bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
    backend = select_linear_backend(x, weight, bias)
    count_call("linear:" + backend)   # not while dynamo traces (see count_call)
    if backend == "onednn":
        # the oneDNN op reads the bias (and, to be safe, the weight) as dense: a strided bias view
        # gave wrong sums (x may have any strides: it is copied inside when needed)
        weight = weight.contiguous()
        bias = None if bias is None else bias.contiguous()
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
            return _OneDNNLinear.apply(x, weight, bias, activation)
        if activation == "gelu":
            return _ONEDNN_LINEAR(x, weight, bias, "gelu", [], "none")
        return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")
    return linear_ref(x, weight, bias, activation=activation)


def _mm_onednn(a: Tensor, b_t: Tensor) -> Tensor:
    """a @ b_t.T for 2-D fp32 tensors, on oneDNN (b_t plays the [out, in] weight)."""
    return _ONEDNN_LINEAR(a, b_t, None, "none", [], "")


def _grad_weight(dh: Tensor, x: Tensor) -> Tensor:
    """dh.T @ x ([N, M] @ [M, K]) for contiguous dh [M, N] and x [M, K], on oneDNN in the orientation
    it runs fast. Measured on the FocalNet-T shapes (AMD EPYC, 2 threads): with a long reduction
    (M >= 4 max(K, N)) the product should have the smaller side as its rows (the other orientation
    was up to 4x slower than MKL), otherwise N rows; either way the same sums, rounded differently."""
    M, N, K = dh.shape[0], dh.shape[1], x.shape[1]
    if M >= 4 * max(K, N) and K < N:
        return _mm_onednn(x.t(), dh.t()).t().contiguous()
    return _mm_onednn(dh.t(), x.t())


class _OneDNNLinear(torch.autograd.Function):
    """y = act(x @ w.T + b) with oneDNN GEMMs forward and backward (fp32, CPU)."""

    @staticmethod
    def forward(ctx, x, weight, bias, activation):
        h = _ONEDNN_LINEAR(x, weight, bias, "none", [], "")
        ctx.activation = activation
        ctx.x_shape = x.shape
        ctx.save_for_backward(x, weight, h if activation == "gelu" else None)
        return F.gelu(h) if activation == "gelu" else h

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, h = ctx.saved_tensors
        if ctx.activation == "gelu":
            dy = torch.ops.aten.gelu_backward(dy, h)
        dh = dy.reshape(-1, dy.shape[-1]).contiguous()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _mm_onednn(dh, weight.t().contiguous()).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            gw = _grad_weight(dh, x.reshape(-1, x.shape[-1]).contiguous())
        if ctx.needs_input_grad[2]:
            gb = dh.sum(0)
        return gx, gw, gb, None
