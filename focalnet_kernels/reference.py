"""Eager references of the focal-context stage.

`focal_context_ref` is the plain formulation (autograd-capable, any float dtype): it is the oracle the
tests compare against and what the model's fused path falls back to. `focal_context_fwd_ref` /
`focal_context_bwd_ref` implement the backend contract (docs/backend-contract.md) with explicit
backward formulas, so the reference backend exercises the same derivation every kernel follows.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def gelu(x: Tensor) -> Tensor:
    """Exact (erf) GELU."""
    return 0.5 * x * (1.0 + torch.erf(x * _INV_SQRT2))


def gelu_grad(x: Tensor) -> Tensor:
    """d GELU(x) / dx = Phi(x) + x * phi(x)."""
    return 0.5 * (1.0 + torch.erf(x * _INV_SQRT2)) + x * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dwconv(x_cf: Tensor, w: Tensor) -> Tensor:
    """Depthwise 'same' conv of a channels-first map with weight [C, k, k]."""
    C, k, _ = w.shape
    return F.conv2d(x_cf, w.reshape(C, 1, k, k), padding=k // 2, groups=C)


def _dwconv_transpose(dz_cf: Tensor, w: Tensor) -> Tensor:
    C, k, _ = w.shape
    return F.conv_transpose2d(dz_cf, w.reshape(C, 1, k, k), padding=k // 2, groups=C)


def focal_context_ref(ctx: Tensor, gates: Tensor, kernels: Sequence[Tensor], normalize: bool = False) -> Tensor:
    """ctx_all of notes §1 in the official order of ops. ctx: B×H×W×C, gates: B×H×W×(L+1),
    kernels: L depthwise weights [C,1,k,k]. Half inputs compute in fp32 and return their dtype."""
    cdt = _compute_dtype(ctx.dtype)
    x = ctx.to(cdt).permute(0, 3, 1, 2)  # B C H W
    g = gates.to(cdt).permute(0, 3, 1, 2)
    L = len(kernels)
    out = 0
    for l, w in enumerate(kernels):
        k = w.shape[-1]
        x = F.gelu(F.conv2d(x, w.to(cdt), padding=k // 2, groups=w.shape[0]))
        out = out + x * g[:, l : l + 1]
    glob = F.gelu(x.mean((2, 3), keepdim=True))
    out = out + glob * g[:, L : L + 1]
    if normalize:
        out = out / (L + 1)
    return out.permute(0, 2, 3, 1).to(ctx.dtype)


def _levels(x0_cf: Tensor, weights: Sequence[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
    """Pre-activations z_l and activations x_{l+1} of every level (channels-first)."""
    zs, xs = [], [x0_cf]
    for w in weights:
        z = _dwconv(xs[-1], w.to(x0_cf.dtype))
        zs.append(z)
        xs.append(gelu(z))
    return zs, xs


def focal_context_fwd_ref(ctx: Tensor, gates: Tensor, weights: Sequence[Tensor], normalize: bool,
                          global_term: bool = True):
    """Backend contract forward: returns (out contiguous B×H×W×C in ctx.dtype, pooled fp32 [B, C]).
    global_term=False leaves s·g_L·GELU(pooled) out of `out` (the caller folds it into the h GEMM)."""
    cdt = _compute_dtype(ctx.dtype)
    L = len(weights)
    s = 1.0 / (L + 1) if normalize else 1.0
    _, xs = _levels(ctx.to(cdt).permute(0, 3, 1, 2), weights)
    g = gates.to(cdt).permute(0, 3, 1, 2)
    pooled = xs[-1].mean((2, 3))
    out = gelu(pooled)[:, :, None, None] * g[:, L : L + 1] if global_term else 0
    for l in range(L):
        out = out + xs[l + 1] * g[:, l : l + 1]
    out = out * s
    out = out.permute(0, 2, 3, 1).contiguous().to(ctx.dtype)
    return out, pooled.to(torch.float32 if cdt == torch.float32 else cdt).contiguous()


def focal_context_bwd_ref(grad_out: Tensor, ctx: Tensor, gates: Tensor, weights: Sequence[Tensor],
                          pooled: Tensor, normalize: bool):
    """Backend contract backward with explicit formulas (docs/backend-contract.md)."""
    cdt = _compute_dtype(ctx.dtype)
    L = len(weights)
    H, W = ctx.shape[1], ctx.shape[2]
    s = 1.0 / (L + 1) if normalize else 1.0
    zs, xs = _levels(ctx.to(cdt).permute(0, 3, 1, 2), weights)
    g = gates.to(cdt).permute(0, 3, 1, 2)
    dout = grad_out.to(cdt).permute(0, 3, 1, 2) * s
    pooled = pooled.to(cdt)
    grad_g = [(dout * xs[l + 1]).sum(1) for l in range(L)]
    grad_g.append((dout * gelu(pooled)[:, :, None, None]).sum(1))
    dpool = gelu_grad(pooled) * (dout * g[:, L : L + 1]).sum((2, 3))
    dx = dout * g[:, L - 1 : L] + (dpool / (H * W))[:, :, None, None]
    grad_w: List[Tensor] = [None] * L  # type: ignore[list-item]
    for l in range(L - 1, -1, -1):
        w = weights[l].to(cdt)
        C, k, _ = w.shape
        dz = dx * gelu_grad(zs[l])
        # grad_w[c,i,j] = sum dz[b,c,h,w] * x_l[b,c,h+i-p,w+j-p]: a conv of x_l with dz as the kernel.
        xl = F.pad(xs[l], (k // 2,) * 4)
        gw = torch.empty(C, k, k, dtype=cdt, device=ctx.device)
        for i in range(k):
            for j in range(k):
                gw[:, i, j] = (dz * xl[:, :, i : i + H, j : j + W]).sum((0, 2, 3))
        grad_w[l] = gw.to(torch.float32 if cdt == torch.float32 else cdt)
        dx = _dwconv_transpose(dz, w)
        if l > 0:
            dx = dx + dout * g[:, l - 1 : l]
    grad_ctx = dx.permute(0, 2, 3, 1).contiguous().to(ctx.dtype)
    grad_gates = torch.stack(grad_g, dim=-1).contiguous().to(ctx.dtype)
    return grad_ctx, grad_gates, grad_w
