"""The modulation tail on the GPU: ``q * (ctx_all @ h_weight.T + h_bias)`` as one Triton GEMM whose
epilogue does the gating (focalnet_kernels/triton/modulation_tail.py), and, for inference, the whole
focal modulation with the focal context's rank-1 global term folded into that GEMM (notes §4).

Two torch.library ops (opaque to torch.compile, with fake implementations):

    modulation_tail_fwd(q, ctx_all, h_weight, h_bias) -> q * (ctx_all @ h_weight.T + h_bias)
        the Triton tail; q, ctx_all [..., C] of one shape (q may be a strided view).
    focal_modulation_fwd(y, kernels, h_weight, h_bias, normalize) -> q * h(ctx_all)
        from the f output y = [q | ctx | gates]: the focal-context forward of the backend `auto`
        picks, asked to leave the global term s * g_L * GELU(pooled) out of its output where it can
        (the Triton and CUDA backends: one read-modify-write pass over ctx_all less, and one rounding
        of ctx_all instead of two), then the tail, whose epilogue adds g_L * (s * GELU(pooled) @ h.T)[b].
        Inference only (no autograd formula): `focal_modulation` calls it when no gradient is needed.

Which tail runs (FOCALNET_TAIL_BACKEND, read per call: auto | triton | torch):
    auto    the Triton tail for CUDA tensors of one dtype (fp16, bf16, fp32) when Triton is installed;
            otherwise torch (`linear`, then the product: oneDNN for fp32 CPU tensors). No warning: the
            torch composition is a fast path in its own right (cuBLAS / oneDNN), not a fallback.
    triton  as auto, and CPU tensors too under TRITON_INTERPRET=1 (tests); raises where it cannot run.
    torch   always the torch composition.
`modulation_tail_ref` is the eager reference beside it.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .dispatch import count_call, forced_backend

TAIL_BACKENDS = ("auto", "triton", "torch")
_TAIL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# focal-context backends whose forward can leave the global term out (contract: global_term=False)
_GLOBAL_TERM_OPTIONAL = ("triton", "cuda", "reference")

__all__ = ["modulation_tail_ref", "select_tail_backend", "TAIL_BACKENDS"]


def modulation_tail_ref(q: Tensor, ctx_all: Tensor, h_weight: Tensor, h_bias: Optional[Tensor] = None) -> Tensor:
    """q * (ctx_all @ h_weight.T + h_bias): eager torch."""
    return q * F.linear(ctx_all, h_weight, h_bias)


def _tail_unsupported(q: Tensor, ctx_all: Tensor, h_weight: Tensor, h_bias: Optional[Tensor]) -> Optional[str]:
    dev = q.device.type
    if dev != "cuda" and not (dev == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"):
        return f"the tensors are on {q.device} (the Triton tail runs CUDA tensors, CPU ones under TRITON_INTERPRET=1)"
    if not ops.triton_available():
        return "triton is not installed"
    dts = {t.dtype for t in (q, ctx_all, h_weight, h_bias) if t is not None}
    if len(dts) != 1 or q.dtype not in _TAIL_DTYPES:
        return f"the dtypes are {sorted(map(str, dts))} (one of fp16, bf16, fp32 for all)"
    if any(t is not None and t.device != q.device for t in (ctx_all, h_weight, h_bias)):
        return "the tensors are on different devices"
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return "autocast is on (cast first)"
    return None


def select_tail_backend(q: Tensor, ctx_all: Tensor, h_weight: Tensor, h_bias: Optional[Tensor] = None) -> str:
    """"triton" or "torch": what the modulation tail runs this call on; reads FOCALNET_TAIL_BACKEND now."""
    forced = forced_backend("FOCALNET_TAIL_BACKEND", TAIL_BACKENDS)
    if forced == "torch" or (forced == "auto" and q.device.type != "cuda"):
        return "torch"
    why = _tail_unsupported(q, ctx_all, h_weight, h_bias)
    if why is None:
        return "triton"
    if forced == "triton":
        raise RuntimeError(f"FOCALNET_TAIL_BACKEND=triton but {why}")
    return "torch"


# ------------------------------------------------------------------------------------------------
# the ops
# ------------------------------------------------------------------------------------------------
# defined in the library fragment of focal_context's ops (ops._LIB), registered the same way
ops._LIB.define("modulation_tail_fwd(Tensor q, Tensor ctx_all, Tensor h_weight, Tensor? h_bias) -> Tensor",
                tags=(torch.Tag.pt2_compliant_tag,))
ops._LIB.define("focal_modulation_fwd(Tensor y, Tensor[] kernels, Tensor h_weight, Tensor? h_bias, "
                "bool normalize) -> Tensor", tags=(torch.Tag.pt2_compliant_tag,))
_implements = ops._implements


def _tail_2d(q2: Tensor, x2: Tensor, h_weight: Tensor, h_bias: Optional[Tensor], **kw) -> Tensor:
    from .triton.modulation_tail import modulation_tail_triton
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if q2.stride(-1) != 1:
        q2 = q2.contiguous()
    return modulation_tail_triton(q2, x2, h_weight, h_bias, **kw)


@_implements("modulation_tail_fwd")
def _tail_impl(q: Tensor, ctx_all: Tensor, h_weight: Tensor, h_bias: Optional[Tensor]) -> Tensor:
    C = q.shape[-1]
    count_call("tail:triton")
    out = _tail_2d(q.reshape(-1, C), ctx_all.reshape(-1, C), h_weight, h_bias)
    return out.view(q.shape)


@torch.library.register_fake("focalnet::modulation_tail_fwd", lib=ops._LIB)
def _(q, ctx_all, h_weight, h_bias):
    return q.new_empty(q.shape)


@_implements("focal_modulation_fwd")
def _modulation_impl(y: Tensor, kernels: List[Tensor], h_weight: Tensor, h_bias: Optional[Tensor],
                     normalize: bool) -> Tensor:
    C, L = h_weight.shape[0], len(kernels)
    B, H, W, _ = y.shape
    q, ctx, gates = y[..., :C], y[..., C:2 * C], y[..., 2 * C:]
    name = ops.select_backend(ctx, [k.shape[-1] for k in kernels])
    count_call(name + ":fwd")
    count_call("tail:triton")
    fwd, _ = ops._backend_fns(name)
    weights = ops._backend_weights(name, ctx, kernels)
    q2 = q.reshape(-1, C)
    if name not in _GLOBAL_TERM_OPTIONAL:   # the CPU kernel adds the global term itself
        ctx_all, _ = fwd(ctx, gates, weights, normalize)
        return _tail_2d(q2, ctx_all.view(-1, C), h_weight, h_bias).view(B, H, W, C)
    count_call("tail:global-folded")
    local, pooled = fwd(ctx, gates, weights, normalize, global_term=False)
    s = 1.0 / (L + 1) if normalize else 1.0
    # the rank-1 global term through h: [B, C] in fp32 (h's bias stays in the tail's epilogue)
    global_h = F.linear(F.gelu(pooled.float()) * s, h_weight.float())
    out = _tail_2d(q2, local.view(-1, C), h_weight, h_bias, gate=gates[..., L].reshape(-1),
                   global_h=global_h, hw=H * W)
    return out.view(B, H, W, C)


@torch.library.register_fake("focalnet::focal_modulation_fwd", lib=ops._LIB)
def _(y, kernels, h_weight, h_bias, normalize):
    C = h_weight.shape[0]
    return y.new_empty((*y.shape[:-1], C))


#: The ops (OpOverloads).
modulation_tail_fwd = torch.ops.focalnet.modulation_tail_fwd.default
focal_modulation_fwd = torch.ops.focalnet.focal_modulation_fwd.default


def tail_product(q: Tensor, ctx_all: Tensor, h_weight: Tensor, h_bias: Optional[Tensor], backend: str) -> Tensor:
    """q * (ctx_all @ h_weight.T + h_bias) on `backend` ("triton": the op; "torch": `linear`, then the
    product). Not differentiable on "triton": autograd callers use it inside a Function's forward."""
    if backend == "triton":
        return modulation_tail_fwd(q, ctx_all, h_weight, h_bias)
    from .linear import linear
    return q * linear(ctx_all, h_weight, h_bias)


def focal_modulation_infer(y: Tensor, kernels: Sequence[Tensor], h_weight: Tensor, h_bias: Optional[Tensor],
                           normalize: bool) -> Tensor:
    """The fused inference path of `focal_modulation` (no gradient), when the tail runs on Triton:
    validates like `focal_context`, then `focal_modulation_fwd`."""
    C = h_weight.shape[0]
    normalize = ops.validate(y[..., C:2 * C], y[..., 2 * C:], kernels, normalize)
    return focal_modulation_fwd(y, list(kernels), h_weight, h_bias, normalize)

