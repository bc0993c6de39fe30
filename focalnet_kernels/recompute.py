"""Memory-lean training compositions: GEMM chains whose backward recomputes cheap intermediates
instead of keeping them alive between forward and backward.

A chain of autograd ops saves every op's inputs. In `linear(gelu(linear(x)))` the first linear keeps
x and the GELU's input h, and the second keeps the GELU's output as well: a second hidden-width
tensor per token that one elementwise pass over h rebuilds. Likewise in `q * (ctx_all @ W.T + b)`
followed by a projection, the product's factors and the projection's input are kept, where q and
ctx_all alone determine them (one more GEMM in the backward rebuilds the modulator).

    mlp_gelu(x, w1, b1, w2, b2)         = gelu(x @ w1.T + b1) @ w2.T + b2
        saves x and h = x @ w1.T + b1; gelu(h) is recomputed in the backward.
    modulation_tail(q, ctx_all, h_weight, h_bias, proj_weight=None, proj_bias=None)
                                        = q * (ctx_all @ h_weight.T + h_bias)   [@ proj_weight.T + proj_bias]
        saves q and ctx_all; the modulator (a GEMM) and q * modulator are recomputed in the backward.
    focal_modulation(y, kernels, h_weight, h_bias, proj_weight=None, proj_bias=None, *, normalize=False)
        the whole modulation from the f-projection output y = [q | ctx | gates] (notes §1): the
        focal-context stage (`focal_context`), then `modulation_tail`.

Every result equals its plain composition up to rounding; gradients flow to every argument, to any
order (with create_graph=True the backward runs on torch ops and rebuilds what it needs from the
inputs, so autograd can differentiate it again). Without a gradient to compute (inference,
torch.no_grad) they are that composition of `linear` calls (GELU as the oneDNN epilogue on the CPU).
The GEMMs run where `linear` runs them: oneDNN for fp32 CPU tensors outside torch.compile, torch
otherwise. Under autocast the GEMM operands are cast to the autocast dtype first, as autocast does
for F.linear. The Functions are plain autograd.Functions, which dynamo traces (forward and backward)
inside torch.compile.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .linear import _grad_weight, _mm_onednn, linear, select_linear_backend
from .modulation import focal_modulation_infer, select_tail_backend, tail_product
from .ops import _exporting_to_onnx, focal_context

__all__ = ["mlp_gelu", "modulation_tail", "focal_modulation"]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _needs_graph(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _autocast_cast(tensors: Sequence[Optional[Tensor]]) -> Tuple[bool, List[Optional[Tensor]]]:
    """Under autocast (on the tensors' device), the floating tensors cast to the autocast dtype, as
    autocast does for F.linear; the casts stay on the graph, so gradients reach the originals."""
    dev = tensors[0].device.type
    if dev not in ("cpu", "cuda") or not torch.is_autocast_enabled(dev):
        return False, list(tensors)
    dt = torch.get_autocast_dtype(dev)
    return True, [t.to(dt) if t is not None and t.is_floating_point() else t for t in tensors]


def _apply(fn, tensors: Sequence[Optional[Tensor]]):
    """fn.apply(*tensors), with autocast's casts done outside the Function and autocast off inside
    (its backward then sees the dtypes its forward saw)."""
    cast, tensors = _autocast_cast(tensors)
    if not cast:
        return fn.apply(*tensors)
    with torch.autocast(tensors[0].device.type, enabled=False):
        return fn.apply(*tensors)


def _rows(t: Tensor) -> Tensor:
    """[..., n] -> contiguous [M, n]."""
    return t.reshape(-1, t.shape[-1]).contiguous()


def _backward_on_onednn(ctx) -> bool:
    """oneDNN in the backward when the forward ran there, unless the backward is itself recorded
    (create_graph=True): then torch ops, which autograd can differentiate again."""
    return ctx.onednn and not torch.is_grad_enabled()


def _linear_grads(dy: Tensor, x: Tensor, w: Tensor, needs: Sequence[bool], onednn: bool):
    """(dx, dw, db) of y = x @ w.T + b for 2-D contiguous dy [M, N] and x [M, K]; None where `needs`
    says no. On oneDNN in the orientations `linear`'s own backward uses."""
    dx = dw = db = None
    if needs[0]:
        dx = _mm_onednn(dy, w.t().contiguous()) if onednn else dy @ w
    if needs[1]:
        dw = _grad_weight(dy, x) if onednn else dy.t() @ x
    if needs[2]:
        db = dy.sum(0)
    return dx, dw, db


def _check_linear(name: str, in_features: int, weight: Tensor, bias: Optional[Tensor]) -> None:
    if weight.dim() != 2 or weight.shape[1] != in_features:
        raise ValueError(f"{name}: weight must be [out, {in_features}], got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{name}: bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")


# ------------------------------------------------------------------------------------------------
# MLP: fc1 -> GELU -> fc2
# ------------------------------------------------------------------------------------------------
class _MlpGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        ctx.onednn = select_linear_backend(x, w1, b1) == "onednn"
        h = linear(x, w1, b1)
        out = linear(F.gelu(h), w2, b2)
        ctx.save_for_backward(x, h, w1, b1, w2)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, h, w1, b1, w2 = ctx.saved_tensors
        need, onednn = ctx.needs_input_grad, _backward_on_onednn(ctx)
        if torch.is_grad_enabled():   # create_graph: h must carry its dependence on x, w1, b1
            h = F.linear(x, w1, b1)
        dout2, h2 = _rows(dout), _rows(h)
        da, dw2, db2 = _linear_grads(dout2, F.gelu(h2), w2, (any(need[:3]), need[3], need[4]), onednn)
        dx = dw1 = db1 = None
        if da is not None:
            dh = torch.ops.aten.gelu_backward(da, h2)
            dx, dw1, db1 = _linear_grads(dh, _rows(x), w1, need[:3], onednn)
            dx = None if dx is None else dx.view(x.shape)
        return dx, dw1, db1, dw2, db2


def mlp_gelu(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor]) -> Tensor:
    """gelu(x @ w1.T + b1) @ w2.T + b2 over the last dim of x (exact erf GELU).

    With a gradient to compute, saves x and the pre-activation (not the GELU output: the backward
    recomputes it). x: [..., in]; w1: [hidden, in]; w2: [out, hidden]; biases 1-D or None.
    """
    _check_linear("mlp_gelu (fc1)", x.shape[-1], w1, b1)
    _check_linear("mlp_gelu (fc2)", w1.shape[0], w2, b2)
    if not _needs_graph(x, w1, b1, w2, b2):
        return linear(linear(x, w1, b1, activation="gelu"), w2, b2)
    return _apply(_MlpGelu, (x, w1, b1, w2, b2))


# ------------------------------------------------------------------------------------------------
# modulation tail: q * h(ctx_all) [-> proj]
# ------------------------------------------------------------------------------------------------
class _ModulationTail(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, ctx_all, h_weight, h_bias, proj_weight, proj_bias):
        ctx.onednn = select_linear_backend(ctx_all, h_weight, h_bias) == "onednn"
        ctx.save_for_backward(q, ctx_all, h_weight, h_bias, proj_weight)
        out = tail_product(q, ctx_all, h_weight, h_bias, select_tail_backend(q, ctx_all, h_weight, h_bias))
        return out if proj_weight is None else linear(out, proj_weight, proj_bias)

    @staticmethod
    def backward(ctx, dout):
        q, ctx_all, h_weight, h_bias, proj_weight = ctx.saved_tensors
        need, onednn = ctx.needs_input_grad, _backward_on_onednn(ctx)
        q2, ctx2 = q.reshape(-1, q.shape[-1]), _rows(ctx_all)
        modulator = (linear if onednn else F.linear)(ctx2, h_weight, h_bias)   # recomputed: one GEMM
        dt, dpw, dpb = _rows(dout), None, None
        if proj_weight is not None:
            dt, dpw, dpb = _linear_grads(dt, q2 * modulator, proj_weight, (True, need[4], need[5]), onednn)
        dq = (dt * modulator).view(q.shape) if need[0] else None
        dctx = dhw = dhb = None
        if any(need[1:4]):
            dctx, dhw, dhb = _linear_grads((dt * q2).contiguous(), ctx2, h_weight, need[1:4], onednn)
            dctx = None if dctx is None else dctx.view(ctx_all.shape)
        return dq, dctx, dhw, dhb, dpw, dpb


def modulation_tail(q: Tensor, ctx_all: Tensor, h_weight: Tensor, h_bias: Optional[Tensor],
                    proj_weight: Optional[Tensor] = None, proj_bias: Optional[Tensor] = None) -> Tensor:
    """q * (ctx_all @ h_weight.T + h_bias), then, when proj_weight is given, @ proj_weight.T + proj_bias.

    With a gradient to compute, saves q and ctx_all only: the modulator (one GEMM) and its product
    with q are recomputed in the backward. q, ctx_all: [..., C], same shape (q may be a strided view);
    h_weight: [C, C]; proj_weight: [out, C]; biases 1-D or None.
    """
    if q.shape != ctx_all.shape:
        raise ValueError(f"modulation_tail: q {tuple(q.shape)} and ctx_all {tuple(ctx_all.shape)} differ in shape")
    _check_linear("modulation_tail (h)", ctx_all.shape[-1], h_weight, h_bias)
    if h_weight.shape[0] != q.shape[-1]:
        raise ValueError(f"modulation_tail: h_weight must be [C, C] with C={q.shape[-1]}, got {tuple(h_weight.shape)}")
    if proj_weight is None and proj_bias is not None:
        raise ValueError("modulation_tail: proj_bias without proj_weight")
    if proj_weight is not None:
        _check_linear("modulation_tail (proj)", q.shape[-1], proj_weight, proj_bias)
    if not _needs_graph(q, ctx_all, h_weight, h_bias, proj_weight, proj_bias):
        out = _tail_no_grad(q, ctx_all, h_weight, h_bias)
        return out if proj_weight is None else linear(out, proj_weight, proj_bias)
    return _apply(_ModulationTail, (q, ctx_all, h_weight, h_bias, proj_weight, proj_bias))


def _tail_no_grad(q: Tensor, ctx_all: Tensor, h_weight: Tensor, h_bias: Optional[Tensor]) -> Tensor:
    """q * h(ctx_all) without a graph: the Triton tail where it runs (autocast's casts done first, as
    for F.linear), else `linear` (which autocasts itself), then the product."""
    cast, (cq, cx, cw, cb) = _autocast_cast((q, ctx_all, h_weight, h_bias))
    with torch.autocast(q.device.type, enabled=False) if cast else contextlib.nullcontext():
        if select_tail_backend(cq, cx, cw, cb) == "triton":
            return tail_product(cq, cx, cw, cb, "triton")
    return q * linear(ctx_all, h_weight, h_bias)


def focal_modulation(y: Tensor, kernels: Sequence[Tensor], h_weight: Tensor, h_bias: Optional[Tensor],
                     proj_weight: Optional[Tensor] = None, proj_bias: Optional[Tensor] = None, *,
                     normalize: bool = False) -> Tensor:
    """Focal modulation from the f-projection output, channels-last (notes §1).

    y: [B, H, W, 2C + L + 1] = [q | ctx | gates]; kernels: the L depthwise weights [C, 1, k, k];
    h_weight: [C, C] (a 1x1 conv's weight reshaped); proj_weight / proj_bias: the output projection,
    applied here when given (its input is then never saved). Returns q * h(ctx_all) [projected].
    """
    C, L = h_weight.shape[0], len(kernels)
    if y.dim() != 4 or y.shape[-1] != 2 * C + L + 1:
        raise ValueError(f"focal_modulation: y must be [B, H, W, 2C + L + 1] = [..., {2 * C + L + 1}] for "
                         f"C={C}, L={L}; got {tuple(y.shape)}")
    q, ctx, gates = y[..., :C], y[..., C:2 * C], y[..., 2 * C:]
    if y.numel() and not _needs_graph(y, *kernels, h_weight, h_bias, proj_weight, proj_bias) \
            and not _exporting_to_onnx():
        # inference: with the tail on Triton, one op whose tail's epilogue adds the global term
        cast, (cy, cw, cb) = _autocast_cast((y, h_weight, h_bias))
        out = None
        with torch.autocast(y.device.type, enabled=False) if cast else contextlib.nullcontext():
            if select_tail_backend(cy[..., :C], cy[..., C:2 * C], cw, cb) == "triton":
                out = focal_modulation_infer(cy, kernels, cw, cb, normalize)
        if out is not None:
            return out if proj_weight is None else linear(out, proj_weight, proj_bias)
    ctx_all = focal_context(ctx, gates, kernels, normalize=normalize)
    return modulation_tail(q, ctx_all, h_weight, h_bias, proj_weight, proj_bias)
