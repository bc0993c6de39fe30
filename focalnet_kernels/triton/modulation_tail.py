"""Triton modulation tail: ``out = q * (x @ w.T + bias [+ gate * global_h[b]])`` as one GEMM with the
gating epilogue.

In FocalModulation (notes §1) the focal context ``ctx_all`` goes through ``h`` (a 1x1 conv, i.e. a
[C, C] GEMM) and multiplies the query. Eager PyTorch writes the modulator to memory and reads it back
with q for the product; here the product is the GEMM's epilogue (fp32 accumulate, one rounding to the
output dtype), so the modulator never leaves registers.

The rank-1 global term (notes §4). ``ctx_all = s * (local + g_L * GELU(pooled)[b])`` where ``local``
is the gated sum of the levels; since ``h`` is linear,
``h(ctx_all) = s * local @ w.T + g_L * (s * GELU(pooled) @ w.T)[b] + bias``: with ``x`` the local sum
(already scaled by s) and ``global_h = s * GELU(pooled) @ w.T`` ([B, C], fp32, a tiny GEMM), the
global term is one fused multiply-add per output here, instead of a read-modify-write pass over
``ctx_all`` in the focal-context forward (and one rounding of ctx_all instead of two).

``modulation_tail_triton(q, x, w, bias, gate=None, global_h=None, hw=1)``: q, x 2-D [M, C] with unit
column stride (q may have any row stride: a slice of the f projection's output), w [C, K], bias [C]
or None, gate [M] (any stride) and global_h [B, C] fp32 with M = B * hw. Returns a new contiguous
[M, C] tensor in q's dtype. fp16/bf16 run tl.dot on tensor cores with fp32 accumulation; fp32 runs
with IEEE fp32 products unless torch allows TF32 for matmuls (``torch.backends.cuda.matmul.allow_tf32``),
the precision torch's own GEMM would use.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .focal_context_fwd import pow2_align

__all__ = ["modulation_tail_triton", "tail_blocks", "REPORT_KERNELS"]


@triton.jit(do_not_specialize=["M", "HW", "s_qm", "s_gm"])
def _modulation_tail_fwd_kernel(
        q_ptr, x_ptr, w_ptr, bias_ptr, gate_ptr, gh_ptr, out_ptr,
        M, N, K, HW, s_qm, s_xm, s_gm,
        HAS_BIAS: tl.constexpr, HAS_GLOBAL: tl.constexpr, PRECISION: tl.constexpr, Q_ALIGN: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < M
    nmask = rn < N
    rm64 = rm.to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < K
        a = tl.load(x_ptr + rm64[:, None] * s_xm + rk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_ptr + rn[None, :] * K + rk[:, None], mask=kmask[:, None] & nmask[None, :],
                    other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    m2 = mmask[:, None] & nmask[None, :]
    if HAS_GLOBAL:
        g = tl.load(gate_ptr + rm64 * s_gm, mask=mmask, other=0.0).to(tl.float32)
        bi = rm // HW
        gh = tl.load(gh_ptr + bi[:, None] * N + rn[None, :], mask=m2, other=0.0)
        acc += g[:, None] * gh
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    # q's row stride (2C+L+1 in the f output) is not specialised (it is rarely a multiple of 16):
    # Q_ALIGN, the power of two dividing it, gives the loads their width
    q_rows = q_ptr + tl.multiple_of(rm64 * s_qm, Q_ALIGN)
    q = tl.load(q_rows[:, None] + rn[None, :], mask=m2, other=0.0).to(tl.float32)
    tl.store(out_ptr + rm64[:, None] * N + rn[None, :], (q * acc).to(out_ptr.dtype.element_ty), mask=m2)


_BLOCK_M = 128
_STAGES = 3


def tail_blocks(C: int, K: int):
    """(BLOCK_N, BLOCK_K, num_warps): 64 or 32 wide (whichever divides C; every FocalNet width is a
    multiple of 32), 32 with masking otherwise; 8 warps for the 128x64 tile (4 spill nothing at 128x32,
    and would at 128x64 with the epilogue's operands: the report shows registers and spills)."""
    def pick(n):
        return 64 if n % 64 == 0 else 32
    bn = pick(C)
    return bn, pick(K), 8 if bn == 64 else 4


def q_align(s_qm: int, elem_size: int) -> int:
    """Largest power of two (<= one 16-byte vector) dividing q's row stride, in elements."""
    return pow2_align((s_qm,), elem_size)


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "ieee"   # unused for fp16/bf16 inputs (exact products on tensor cores)


def _check(name, t, dims, dtype=None):
    if t.dim() != dims:
        raise ValueError(f"modulation_tail_triton: `{name}` must be {dims}-D, got shape {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"modulation_tail_triton: `{name}` must be {dtype}, got {t.dtype}")


def modulation_tail_triton(q: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias=None, gate=None,
                           global_h=None, hw: int = 1) -> torch.Tensor:
    _check("q", q, 2)
    _check("x", x, 2, q.dtype)
    _check("w", w, 2, q.dtype)
    M, N = q.shape
    K = x.shape[1]
    if x.shape[0] != M or tuple(w.shape) != (N, K):
        raise ValueError(f"modulation_tail_triton: q {tuple(q.shape)}, x {tuple(x.shape)}, w {tuple(w.shape)} "
                         "do not match (q [M, C], x [M, K], w [C, K])")
    if q.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError("modulation_tail_triton: q and x need unit column stride")
    if bias is not None:
        _check("bias", bias, 1, q.dtype)
        if bias.shape[0] != N:
            raise ValueError(f"modulation_tail_triton: bias must be [{N}], got {tuple(bias.shape)}")
    if (gate is None) != (global_h is None):
        raise ValueError("modulation_tail_triton: gate and global_h go together")
    if gate is not None:
        _check("gate", gate, 1, q.dtype)
        _check("global_h", global_h, 2, torch.float32)
        if hw < 1 or M % hw or gate.shape[0] != M or tuple(global_h.shape) != (M // hw, N):
            raise ValueError(f"modulation_tail_triton: gate [{M}] and global_h [{M // max(hw, 1)}, {N}] expected "
                             f"(hw={hw}), got {tuple(gate.shape)} and {tuple(global_h.shape)}")
        global_h = global_h.contiguous()
    out = torch.empty((M, N), dtype=q.dtype, device=q.device)
    if M == 0 or N == 0:
        return out
    w = w.contiguous()
    bias = None if bias is None else bias.contiguous()
    bn, bk, warps = tail_blocks(N, K)
    grid = (triton.cdiv(M, _BLOCK_M), triton.cdiv(N, bn))
    if grid[0] > 2**31 - 1 or grid[1] > 65535:
        raise ValueError(f"modulation_tail_triton: grid {grid} exceeds the CUDA limits")
    dummy = out   # pointer arguments a flag switches off are never read
    with (torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext()):
        _modulation_tail_fwd_kernel[grid](
            q, x, w, dummy if bias is None else bias, dummy if gate is None else gate,
            dummy if global_h is None else global_h, out,
            M, N, K, hw, q.stride(0), x.stride(0), 0 if gate is None else gate.stride(0),
            HAS_BIAS=bias is not None, HAS_GLOBAL=gate is not None, PRECISION=_precision(q.dtype),
            Q_ALIGN=q_align(q.stride(0), q.element_size()),
            BLOCK_M=_BLOCK_M, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=_STAGES)
    return out


# what the compile report (focalnet_kernels/report.py) builds (format: focal_context_fwd.py's docstring):
# bf16, the FocalNet-T stage widths, q a slice of the f output (row stride 2C+L+1), the global term
# folded in
def _report_entry(dt: str, C: int, L: int = 3):
    bn, bk, warps = tail_blocks(C, C)
    sig = {n: f"*{dt}" for n in ("q_ptr", "x_ptr", "w_ptr", "bias_ptr", "gate_ptr", "out_ptr")}
    sig["gh_ptr"] = "*fp32"
    sig.update({n: "i32" for n in ("M", "N", "K", "HW", "s_qm", "s_xm", "s_gm")})
    return {
        "name": f"modulation_tail[{dt} C={C} L={L}]",
        "config": f"{_BLOCK_M}x{bn} k{bk} w{warps} s{_STAGES}",
        "fn": _modulation_tail_fwd_kernel,
        "signature": sig,
        "constexprs": {"HAS_BIAS": True, "HAS_GLOBAL": True, "PRECISION": "ieee",
                       "Q_ALIGN": q_align(2 * C + L + 1, 2), "BLOCK_M": _BLOCK_M, "BLOCK_N": bn, "BLOCK_K": bk},
        "attrs": {n: [["tt.divisibility", 16]] for n in ("q_ptr", "x_ptr", "w_ptr", "bias_ptr", "out_ptr",
                                                         "gh_ptr", "N", "K", "s_xm")},
        "num_warps": warps,
        "num_stages": _STAGES,
    }


REPORT_KERNELS = [_report_entry("bf16", C) for C in (96, 192, 384, 768)] + [_report_entry("bf16", 96, L=2)]
