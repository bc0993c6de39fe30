"""Fused Triton forward of ``focal_context`` (see docs/backend-contract.md for the math).

Public entry point
------------------
``focal_context_fwd_triton(ctx, gates, weights, normalize) -> (out, pooled)``, exactly the
``fwd`` of the backend contract.

Design (two launches)
---------------------
1. ``_fwd_local_kernel`` (persistent, autotuned): each work item is one (image b, TILE_H x TILE_W
   spatial tile, BLOCK_C channel block).  It computes all L levels on a shrinking region: level l
   produces x_{l+1} on the tile grown by the halo still needed by the later levels
   (hl_{l+1} = sum_{m>l} k_m//2), chunk by chunk (CHUNK = TILE_H*TILE_W pixels at a time).
   Level 0 taps read ``ctx`` directly (strided, masked, zero padding).  Triton cannot read a
   register tile at a shifted position, so x_1 .. x_{L-1} are written in fp32 to a per-program
   scratch tile in global memory (ping-pong between two slots), fenced by ``tl.debug_barrier()``
   (bar.sync orders global memory among the threads of a CTA) and re-read at the shifted taps;
   the scratch stays in L1/L2.  The last level is computed on the tile only, in registers.
   ``s * sum_l g_l * x_{l+1}`` is accumulated in fp32 registers and written to ``out`` once; the
   sum of x_L over the tile goes to a [B, n_tiles, C] fp32 partial buffer (program 0 also
   writes n_tiles of the config that ran into one int32 word, so the host never needs to know
   which config autotune picked).
   The kernel is *persistent* (grid = min(work items, SMs * _PROGS_PER_SM)): the scratch is then
   sized by the number of resident programs, not by the number of tiles (which would be GBs for a
   batch of 256).
2. ``_fwd_global_kernel``: every program sums the partials of its (b, channel block) in a fixed
   order (deterministic; no atomics) -> pooled = sum / (H*W), program 0 stores ``pooled``, and it
   adds ``s * g_L * GELU(pooled)`` to its pixel block of ``out`` in place (one extra read+write of
   out; the real fix, plan 2 of the notes, is to move this rank-1 term into the h GEMM epilogue).

REPORT_KERNELS format (shared with focal_context_bwd.py; read by focalnet_kernels/report.py)
-------------------------------------------------------------------------------------------
``REPORT_KERNELS`` is a module-level ``list[dict]``, one dict per (@triton.jit kernel x shipped
config x representative specialisation).  Keys:

- ``"name"``: str, unique, human readable, e.g. ``"fwd_local[bf16 k=3,5,7]"``.
- ``"config"``: str, short config label, e.g. ``"8x8 c32 w4 s1"``.
- ``"fn"``: the raw ``@triton.jit`` function object (NOT the autotuner/heuristics wrapper; under
  TRITON_INTERPRET=1 this is an InterpretedFunction, which is why the report compiles in a
  subprocess with TRITON_INTERPRET unset).
- ``"signature"``: dict arg name -> Triton type string for every NON-constexpr argument, e.g.
  ``"*fp16"``, ``"*bf16"``, ``"*fp32"``, ``"i32"``, ``"i64"``, ``"fp32"``.  Argument order does not
  matter; the report fills in ``"constexpr"`` for the remaining arguments of ``fn``.
- ``"constexprs"``: dict arg name -> value for EVERY ``tl.constexpr`` argument of ``fn``
  (BLOCK sizes, kernel sizes, flags...), including the ones that autotune/heuristics supply.
- ``"attrs"``: dict arg name -> list of ``[attr, value]`` pairs, the specialisation a real launch
  would get, e.g. ``{"ctx_ptr": [["tt.divisibility", 16]], "s_h": [["tt.divisibility", 16]]}``
  (pointers 16-byte aligned, integers divisible by 16).  May be ``{}``.
- ``"num_warps"``: int; ``"num_stages"``: int.

report.py is lenient: a constexpr may also appear in ``signature`` as ``"constexpr"`` (its value
still comes from ``constexprs``), ``"attrs"`` may be missing (no specialisation) and a missing
``"config"`` is made from the TILE*/BLOCK* constexprs and num_warps/num_stages.

The report calls, for arch in (80, 90):
``triton.compile(ASTSource(fn, {**signature, <constexpr args>: "constexpr"}, constexprs,
{(fn.arg_names.index(k),): v for k, v in attrs.items()}), target=GPUTarget("cuda", arch, 32),
options={"num_warps": num_warps, "num_stages": num_stages})``.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

__all__ = ["focal_context_fwd_triton", "REPORT_KERNELS"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Persistent grid: programs per SM.  The shipped configs compile to <= ~127 registers at 4 warps
# (bf16/fp16; report.py), i.e. 4 resident CTAs per SM: one wave, no straggler CTA.  Scratch per
# program = 2 slots x (x_1 region) x BLOCK_C x 4 B: 60-83 KB for LRF (k=3,5,7), so 132 SMs x 4 x
# that is 32-44 MB, about the H100 L2; detection windows (k=9..15) need up to 293 KB/program.
_PROGS_PER_SM = 4
# Under the interpreter programs run one after another; 3 exercises the persistent loop.
_INTERP_PROGRAMS = 3


# ----------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _gelu(z):
    # exact (erf) GELU; tl.math.erf exists in Triton 3.x (3.6 and 3.9) and in the interpreter
    return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))


@triton.jit
def _taps_ctx(acc, kz, x_base, oh, ow, i, j, rmask, coff, c, cmask, w_ptr, C, H, W, s_h, s_w,
              K: tl.constexpr, WOFF: tl.constexpr, EVEN_C: tl.constexpr, ALIGN: tl.constexpr):
    """acc[r, c] += sum_{a,b} w[c,a,b] * x0[oh + i[r] + a, ow + j[r] + b, c]; zero outside."""
    for a in range(0, K + kz):
        hh = oh + i + a
        hok = rmask & (hh >= 0) & (hh < H)
        rowoff = hh * s_h
        for bb in range(0, K + kz):
            ww = ow + j + bb
            ok = hok & (ww >= 0) & (ww < W)
            wp = w_ptr + (WOFF + a * K + bb) * C + c
            pix = rowoff + ww * s_w
            if ALIGN > 1:
                # true: s_h and s_w are multiples of ALIGN (launcher); lets Triton emit
                # ALIGN-element vector loads when the row stride is not a multiple of 16
                pix = tl.multiple_of(pix, ALIGN)
            xp = x_base + pix[:, None] + coff[None, :]
            if EVEN_C:
                wv = tl.load(wp)
                xv = tl.load(xp, mask=ok[:, None], other=0.0)
            else:
                wv = tl.load(wp, mask=cmask, other=0.0)
                xv = tl.load(xp, mask=ok[:, None] & cmask[None, :], other=0.0)
            acc += xv.to(tl.float32) * wv[None, :]
    return acc


@triton.jit
def _taps_scratch(acc, kz, src, i, j, rmask, cc, c, cmask, w_ptr, C,
                  RWS: tl.constexpr, K: tl.constexpr, WOFF: tl.constexpr,
                  BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr):
    """Same stencil, the source x_l being a [RHS, RWS, BLOCK_C] fp32 scratch region whose
    out-of-image entries are already 0.  Output position (i, j) reads source (i + a, j + b)."""
    for a in range(0, K + kz):
        rowbase = (i + a) * RWS + j
        for bb in range(0, K + kz):
            wp = w_ptr + (WOFF + a * K + bb) * C + c
            if EVEN_C:
                wv = tl.load(wp)
            else:
                wv = tl.load(wp, mask=cmask, other=0.0)
            xv = tl.load(src + (rowbase + bb)[:, None] * BLOCK_C + cc[None, :],
                         mask=rmask[:, None], other=0.0)
            acc += xv * wv[None, :]
    return acc


@triton.jit
def _store_level(dst, x, r, rmask, i, j, oh, ow, H, W, cc, BLOCK_C: tl.constexpr):
    """Write x_{l+1} (already GELU'd) of one chunk to scratch; out-of-image positions get 0
    (the next level's zero padding)."""
    hh = oh + i
    ww = ow + j
    inimg = (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
    x = tl.where(inimg[:, None], x, 0.0)
    tl.store(dst + r[:, None] * BLOCK_C + cc[None, :], x, mask=rmask[:, None])


@triton.jit
def _gate_interior(acc, src, g_ptrs, tvalid, ti, tj, cc,
                   HL: tl.constexpr, RW: tl.constexpr, BLOCK_C: tl.constexpr):
    """acc += gate * x_{l+1} on the tile interior, x_{l+1} read back from scratch (halo HL)."""
    g = tl.load(g_ptrs, mask=tvalid, other=0.0).to(tl.float32)
    x = tl.load(src + ((ti + HL) * RW + tj + HL)[:, None] * BLOCK_C + cc[None, :])
    return acc + g[:, None] * x


# ----------------------------------------------------------------------------------------------
# kernel 1: all levels, local part of out + per-tile partial sums of x_L
# ----------------------------------------------------------------------------------------------
# Shapes, strides and the other integer arguments are not specialised (Triton would otherwise
# compile a new variant whenever one of them equals 1 or is divisible by 16: per batch size, image
# size and view).  What matters for speed is explicit: CTX_ALIGN (pixel/batch strides of ctx),
# C_CONTIG (channel stride 1) and EVEN_C (C a multiple of BLOCK_C).  Pointer alignment and C
# are still specialised.
# C keeps its specialisation (few values; an aligned copy (C // BLOCK_C) * BLOCK_C cost a register
# and made bf16 k=3,5,7,9 at 8x8 c32 spill 16 B under Triton 3.9).
_LOCAL_NO_SPEC = ["B", "H", "W", "s_b", "s_h", "s_w", "s_c", "g_b", "g_h", "g_w", "g_l",
                  "size_class"]


@triton.jit(do_not_specialize=_LOCAL_NO_SPEC)
def _fwd_local_kernel(
        ctx_ptr, g_ptr, w_ptr, out_ptr, part_ptr, nt_ptr, scr_ptr,
        B, H, W, C,
        s_b, s_h, s_w, s_c, g_b, g_h, g_w, g_l,
        scale, size_class, kz,
        L: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr,
        TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_C: tl.constexpr,
        C_CONTIG: tl.constexpr, CTX_ALIGN: tl.constexpr, EVEN_C: tl.constexpr):
    # size_class is only an autotune key (image-size bucket); unused here.
    # kz is always 0.  The tap loops run to `K + kz`, a bound the compiler cannot see, so neither
    # LLVM nor ptxas fully unroll them: fully unrolled taps (up to 225 for k=15) let ptxas hoist
    # dozens of loads and their weights, which measured 130-255 registers and spills with the
    # ptxas 13 of Triton 3.9, vs ~90-127 registers and no spills with runtime loops (ptxas still
    # unrolls them a few taps deep for ILP).
    TP: tl.constexpr = TILE_H * TILE_W
    # halos still needed after each level (unused levels have K = 0 -> p = 0)
    P1: tl.constexpr = K1 // 2
    P2: tl.constexpr = K2 // 2
    P3: tl.constexpr = K3 // 2
    HL1: tl.constexpr = P1 + P2 + P3
    HL2: tl.constexpr = P2 + P3
    HL3: tl.constexpr = P3
    RW1: tl.constexpr = TILE_W + 2 * HL1
    RN1: tl.constexpr = (TILE_H + 2 * HL1) * RW1
    RW2: tl.constexpr = TILE_W + 2 * HL2
    RN2: tl.constexpr = (TILE_H + 2 * HL2) * RW2
    RW3: tl.constexpr = TILE_W + 2 * HL3
    RN3: tl.constexpr = (TILE_H + 2 * HL3) * RW3
    WOFF1: tl.constexpr = K0 * K0
    WOFF2: tl.constexpr = WOFF1 + K1 * K1
    WOFF3: tl.constexpr = WOFF2 + K2 * K2
    SLOT: tl.constexpr = RN1 * BLOCK_C

    NTH = (H + TILE_H - 1) // TILE_H
    NTW = (W + TILE_W - 1) // TILE_W
    NCB = (C + BLOCK_C - 1) // BLOCK_C
    total = B * NTH * NTW * NCB
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    if pid == 0:
        # tiles per image of the config that actually ran: the global kernel reads it, so the
        # partial layout never has to be known on the host (autotune picks the tile)
        tl.store(nt_ptr, NTH * NTW)
    scr_base = scr_ptr + pid.to(tl.int64) * (2 * SLOT)

    cc = tl.arange(0, BLOCK_C)
    rt = tl.arange(0, TP)
    ti = rt // TILE_W
    tj = rt % TILE_W
    rq = tl.arange(0, TP)  # chunk lane index for the region loops
    tall = rt < TP  # all-true row mask: the tile lies inside every scratch region

    for t in range(pid, total, nprog):
        cb = t % NCB
        q = t // NCB
        tw = q % NTW
        q = q // NTW
        th = q % NTH
        b64 = (q // NTH).to(tl.int64)
        h0 = th * TILE_H
        w0 = tw * TILE_W
        c = cb * BLOCK_C + cc
        cmask = c < C
        if C_CONTIG:
            coff = c
        else:
            coff = c * s_c
        if CTX_ALIGN > 1:
            x_base = ctx_ptr + tl.multiple_of(b64 * s_b, CTX_ALIGN)
        else:
            x_base = ctx_ptr + b64 * s_b
        g_base = g_ptr + b64 * g_b
        hi = h0 + ti
        wi = w0 + tj
        tvalid = (hi < H) & (wi < W)
        g_tile = g_base + hi * g_h + wi * g_w
        # `+ kz * t` (= 0): keeps the scratch pointers loop-variant, otherwise LLVM hoists every
        # per-thread 64-bit scratch address of the tile out of the persistent loop (~16 registers
        # held for the whole kernel, which made ptxas spill)
        scr0 = scr_base + kz * t
        scr1 = scr0 + SLOT
        acc = tl.zeros([TP, BLOCK_C], dtype=tl.float32)
        # the previous work item may still be reading scratch in other warps
        tl.debug_barrier()
        if L == 1:
            z = tl.zeros([TP, BLOCK_C], dtype=tl.float32)
            z = _taps_ctx(z, kz, x_base, h0 - K0 // 2, w0 - K0 // 2, ti, tj, tvalid, coff, c, cmask,
                          w_ptr, C, H, W, s_h, s_w, K0, 0, EVEN_C, CTX_ALIGN)
        else:
            # level 0: ctx -> x_1 on the tile + halo HL1 (scratch slot 0)
            for r0 in range(0, RN1, TP):
                r = r0 + rq
                rmask = r < RN1
                i = r // RW1
                j = r % RW1
                zc = tl.zeros([TP, BLOCK_C], dtype=tl.float32)
                zc = _taps_ctx(zc, kz, x_base, h0 - HL1 - K0 // 2, w0 - HL1 - K0 // 2, i, j, rmask,
                               coff, c, cmask, w_ptr, C, H, W, s_h, s_w, K0, 0, EVEN_C,
                               CTX_ALIGN)
                _store_level(scr0, _gelu(zc), r, rmask, i, j, h0 - HL1, w0 - HL1, H, W, cc, BLOCK_C)
            tl.debug_barrier()
            acc = _gate_interior(acc, scr0, g_tile, tvalid, ti, tj, cc, HL1, RW1, BLOCK_C)
            if L == 2:
                z = tl.zeros([TP, BLOCK_C], dtype=tl.float32)
                z = _taps_scratch(z, kz, scr0, ti, tj, tall, cc, c, cmask, w_ptr, C,
                                  RW1, K1, WOFF1, BLOCK_C, EVEN_C)
            else:
                # level 1: x_1 (slot 0) -> x_2 (slot 1)
                for r0 in range(0, RN2, TP):
                    r = r0 + rq
                    rmask = r < RN2
                    i = r // RW2
                    j = r % RW2
                    zc = tl.zeros([TP, BLOCK_C], dtype=tl.float32)
                    zc = _taps_scratch(zc, kz, scr0, i, j, rmask, cc, c, cmask, w_ptr, C,
                                       RW1, K1, WOFF1, BLOCK_C, EVEN_C)
                    _store_level(scr1, _gelu(zc), r, rmask, i, j, h0 - HL2, w0 - HL2, H, W, cc,
                                 BLOCK_C)
                tl.debug_barrier()
                acc = _gate_interior(acc, scr1, g_tile + g_l, tvalid, ti, tj, cc, HL2, RW2, BLOCK_C)
                if L == 3:
                    z = tl.zeros([TP, BLOCK_C], dtype=tl.float32)
                    z = _taps_scratch(z, kz, scr1, ti, tj, tall, cc, c, cmask, w_ptr, C,
                                      RW2, K2, WOFF2, BLOCK_C, EVEN_C)
                else:
                    # level 2: x_2 (slot 1) -> x_3 (slot 0; all reads of slot 0 are fenced)
                    for r0 in range(0, RN3, TP):
                        r = r0 + rq
                        rmask = r < RN3
                        i = r // RW3
                        j = r % RW3
                        zc = tl.zeros([TP, BLOCK_C], dtype=tl.float32)
                        zc = _taps_scratch(zc, kz, scr1, i, j, rmask, cc, c, cmask, w_ptr, C,
                                           RW2, K2, WOFF2, BLOCK_C, EVEN_C)
                        _store_level(scr0, _gelu(zc), r, rmask, i, j, h0 - HL3, w0 - HL3, H, W,
                                     cc, BLOCK_C)
                    tl.debug_barrier()
                    acc = _gate_interior(acc, scr0, g_tile + 2 * g_l, tvalid, ti, tj, cc, HL3, RW3,
                                         BLOCK_C)
                    z = tl.zeros([TP, BLOCK_C], dtype=tl.float32)
                    z = _taps_scratch(z, kz, scr0, ti, tj, tall, cc, c, cmask, w_ptr, C,
                                      RW3, K3, WOFF3, BLOCK_C, EVEN_C)
        # last level, on the tile only, in registers
        xl = _gelu(z)
        gl = tl.load(g_tile + (L - 1) * g_l, mask=tvalid, other=0.0).to(tl.float32)
        acc += gl[:, None] * xl
        o = acc * scale
        optr = out_ptr + b64 * H * W * C + ((hi * W + wi) * C)[:, None] + c[None, :]
        if EVEN_C:
            omask = tvalid[:, None]
        else:
            omask = tvalid[:, None] & cmask[None, :]
        tl.store(optr, o.to(out_ptr.dtype.element_ty), mask=omask)
        # where, not a multiply: keeps NaN/Inf of out-of-image lanes out of the sum
        psum = tl.sum(tl.where(tvalid[:, None], xl, 0.0), axis=0)
        pptr = part_ptr + (b64 * (NTH * NTW) + th * NTW + tw) * C + c
        if EVEN_C:
            tl.store(pptr, psum)
        else:
            tl.store(pptr, psum, mask=cmask)


# ----------------------------------------------------------------------------------------------
# kernel 2: pooled = fixed-order sum of partials / (H*W); out += s * g_L * GELU(pooled)
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["HW", "W", "C", "g_b", "g_h", "g_w", "g_l"])
def _fwd_global_kernel(
        out_ptr, g_ptr, part_ptr, nt_ptr, pooled_ptr,
        HW, W, C, g_b, g_h, g_w, g_l, scale,
        L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
        P_ITERS: tl.constexpr, ADD_GLOBAL: tl.constexpr = True):
    # grid (B * pixel blocks, channel blocks): the batch shares axis 0 (limit 2^31 - 1) with the
    # pixel blocks instead of having grid z to itself (limit 65535)
    NPB = (HW + BLOCK_P * P_ITERS - 1) // (BLOCK_P * P_ITERS)
    pid = tl.program_id(0)
    pb = pid % NPB
    b64 = (pid // NPB).to(tl.int64)
    cb = tl.program_id(1)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    # deterministic: same layout, same order, every call (and every program of this b)
    NT = tl.load(nt_ptr)
    tt = tl.arange(0, BLOCK_T)
    sacc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for t0 in range(0, NT, BLOCK_T):
        t = t0 + tt
        sacc += tl.load(part_ptr + (b64 * NT + t)[:, None] * C + c[None, :],
                        mask=(t < NT)[:, None] & cmask[None, :], other=0.0)
    # `HW * 1.0`, not `HW.to(tl.float32)`: compiles also where HW is a compile-time constant
    # (Triton turns an integer argument equal to 1 into one); the same int -> fp32 rounding
    pooled = tl.sum(sacc, axis=0) / (HW * 1.0)
    if pb == 0:
        tl.store(pooled_ptr + b64 * C + c, pooled, mask=cmask)
    if not ADD_GLOBAL:   # the caller folds the global term into the h GEMM
        return
    gp = _gelu(pooled) * scale
    pp = tl.arange(0, BLOCK_P)
    g_base = g_ptr + b64 * g_b + L * g_l
    o_base = out_ptr + b64 * HW * C
    # only the pixel blocks that exist (a 7x7 map has one, not P_ITERS masked ones)
    n_it = tl.minimum(P_ITERS, (HW - pb * (P_ITERS * BLOCK_P) + BLOCK_P - 1) // BLOCK_P)
    for it in range(0, n_it):
        p = (pb * P_ITERS + it) * BLOCK_P + pp
        pm = p < HW
        h = p // W
        w = p % W
        gL = tl.load(g_base + h * g_h + w * g_w, mask=pm, other=0.0).to(tl.float32)
        optr = o_base + (p * C)[:, None] + c[None, :]
        m = pm[:, None] & cmask[None, :]
        o = tl.load(optr, mask=m, other=0.0).to(tl.float32)
        o = o + gL[:, None] * gp[None, :]
        tl.store(optr, o.to(out_ptr.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------
def _cfg(th, tw, bc, warps):
    # num_stages=1 everywhere: the only loops are the tap/chunk loops, whose loads feed FMAs, not
    # dots; software pipelining would buy nothing and must never hoist a scratch load above a
    # tl.debug_barrier of the persistent loop.
    return triton.Config({"TILE_H": th, "TILE_W": tw, "BLOCK_C": bc}, num_warps=warps, num_stages=1)


# All configs hold 16 fp32 per thread per tile tensor (TILE_H*TILE_W*BLOCK_C = 2048 over 4 warps):
# measured with Triton 3.9's ptxas (report.py) that keeps every level mix (k=3..15, L=1..4) at
# <= ~127 registers without spills, i.e. 4 CTAs (16 warps) per SM.  8-warp variants of the same
# tiles went to 175-190 registers (1-2 CTAs/SM) or spilled, so none is shipped.
_GPU_CONFIGS = [
    # baseline for SRF/LRF (k <= 7): 8x8 tile, 32 channels = 64 B bf16 rows per pixel
    _cfg(8, 8, 32, 4),
    # wider tile: less halo recompute per output pixel (x_1 region / tile = 3.1 -> 2.4 for LRF,
    # 4.0 -> 2.9 for fl4) at 32 B rows
    _cfg(8, 16, 16, 4),
    # big windows (detection, k = 9..15, halo up to 22): halo dominates, so the largest tile with
    # few channels keeps the recompute ratio and the fp32 scratch slot (region x BLOCK_C) bounded
    _cfg(16, 16, 8, 4),
]
_INTERP_CONFIGS = [_cfg(8, 8, 32, 4)]
_CONFIGS = _INTERP_CONFIGS if _INTERPRET else _GPU_CONFIGS


# 4-byte inputs put 4 rows per thread in Triton's layout (16 B = 4 channels); only the 8x8 c32
# tile stays spill-free for every level mix then (report.py), so fp32 is tuned over it alone.
_FP32_CONFIGS = {(8, 8, 32)}


def _prune(configs, nargs, **kwargs):
    c = nargs["C"]
    cp = max(8, triton.next_power_of_2(c))
    x = nargs.get("ctx_ptr")
    wide = x is not None and x.element_size() >= 4
    keep = [cf for cf in configs if cf.kwargs["BLOCK_C"] <= cp and (
        not wide or (cf.kwargs["TILE_H"], cf.kwargs["TILE_W"], cf.kwargs["BLOCK_C"]) in _FP32_CONFIGS)]
    return keep or configs[:1]


_fwd_local = triton.autotune(
    configs=_CONFIGS,
    # re-tune per channel count, kernel sizes, image-size bucket (dtypes are appended by autotune)
    key=["C", "L", "K0", "K1", "K2", "K3", "size_class", "C_CONTIG", "CTX_ALIGN"],
    prune_configs_by={"early_config_prune": _prune},
)(triton.heuristics({"EVEN_C": lambda a: a["C"] % a["BLOCK_C"] == 0})(_fwd_local_kernel))

def _force_config(tile_h, tile_w, block_c, num_warps=4):
    """Testing hook: pin the local kernel to one config (or restore with ``_restore_configs``).
    The interpreter tests use it to cover several tilings of the same kernel code cheaply."""
    prev = list(_fwd_local.configs)
    _fwd_local.configs = [_cfg(tile_h, tile_w, block_c, num_warps)]
    _fwd_local.cache.clear()
    return prev


def _restore_configs(configs):
    _fwd_local.configs = list(configs)
    _fwd_local.cache.clear()


_GLOBAL_BLOCK_P = 64
_GLOBAL_BLOCK_T = 16
_GLOBAL_P_ITERS = 8
_GLOBAL_WARPS = 4


def _global_block_c(C):
    return min(64, max(16, triton.next_power_of_2(C)))


# ----------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------
def _halos(ks):
    p = [k // 2 for k in ks] + [0] * (4 - len(ks))
    return p[1] + p[2] + p[3]


def _slot_elems(th, tw, bc, ks):
    hl1 = _halos(ks)
    return (th + 2 * hl1) * (tw + 2 * hl1) * bc


def _per_sm_guess(device, elem_size, L):
    """Programs per SM before a kernel of this kind has run on `device` (its register count is
    unknown then).  From the compile report (sm_90, 4 warps, Triton 3.6 and 3.9): the bf16/fp16
    local kernel needs <= 128 registers -> 4 CTAs per SM; fp32 with L = 4 needs 139-144 -> 3;
    sm_8x builds need 114-168 -> 3.  After the first launch the measured count replaces it."""
    if device.type != "cuda":
        return _PROGS_PER_SM
    major = torch.cuda.get_device_capability(device)[0]
    if major < 9 or (elem_size >= 4 and L >= 4):
        return 3
    return _PROGS_PER_SM


# (device index, kernel kind, config) -> programs per SM that fit in one wave, from the compiled
# kernel's register count (CompiledKernel.n_regs after its first launch).
_OCCUPANCY = {}


def ctas_per_sm(n_regs, num_warps, shared_bytes=0, props=None):
    """Resident CTAs per SM for a kernel with `n_regs` registers per thread (the register file is
    split over 4 SM sub-partitions of 16384 registers, allocated per warp in units of 256)."""
    regs_sm = getattr(props, "regs_per_multiprocessor", 65536) or 65536
    threads_sm = getattr(props, "max_threads_per_multi_processor", 2048) or 2048
    smem_sm = getattr(props, "shared_memory_per_multiprocessor", 233472) or 233472
    warp_regs = ((max(1, n_regs) * 32 + 255) // 256) * 256
    warps = 4 * ((regs_sm // 4) // warp_regs)
    n = min(warps // num_warps, threads_sm // (32 * num_warps), 32)
    if shared_bytes:
        n = min(n, smem_sm // shared_bytes)
    return max(1, n)


def _record_occupancy(kind_key, device, autotuner, compiled):
    """After a launch: remember how many programs of the config that ran fit on one SM."""
    if device.type != "cuda" or _INTERPRET:
        return
    try:
        cfg = autotuner.best_config
        n_regs = int(compiled.n_regs)
        shared = int(getattr(compiled.metadata, "shared", 0) or 0)
        props = torch.cuda.get_device_properties(device)
        key = (device.index, kind_key, tuple(sorted(cfg.kwargs.items())), cfg.num_warps)
        _OCCUPANCY[key] = ctas_per_sm(n_regs, cfg.num_warps, shared, props)
    except Exception:  # an unexpected Triton version: keep the guess
        pass


def _max_prog(device, total, kind_key=None, cfg=None, guess=_PROGS_PER_SM):
    """Persistent grid: never more programs than fit in one wave."""
    if _INTERPRET or device.type != "cuda":
        return min(total, _INTERP_PROGRAMS)
    props = torch.cuda.get_device_properties(device)
    per_sm = guess
    if cfg is not None:
        key = (device.index, kind_key, tuple(sorted(cfg["kwargs"].items())), cfg["num_warps"])
        per_sm = _OCCUPANCY.get(key, guess)
    return min(total, props.multi_processor_count * per_sm)


# Scratch budget per call (fp32 levels x_1 .. x_{L-1} of the resident programs): the persistent
# program count is capped so that one config's scratch stays within it.  Large windows (k = 9..15,
# halo 18) need ~170 KB per program at 16x16 c8, so the cap is ~390 programs there; LRF needs
# 60-83 KB per program and is not capped on an H100.
SCRATCH_BUDGET_BYTES = 64 << 20


def _scratch_floats(nprog, slot, n_slots):
    # the kernel strides programs by 2 slots; slot 1 is only touched when L >= 3
    return (nprog - 1) * 2 * slot + n_slots * slot if n_slots else 0


def _budget_prog(slot, n_slots):
    if not n_slots:
        return 1 << 30
    return max(1, (SCRATCH_BUDGET_BYTES // 4 - n_slots * slot) // (2 * slot) + 1)


def scratch_plan(B, H, W, C, ks, elem_size=2, sms=132, per_sm=_PROGS_PER_SM, configs=None):
    """[(config label, programs, scratch bytes)] for the candidate configs of one call; the
    launcher allocates the largest.  (Used by the report; the launcher uses the same functions.)"""
    L = len(ks)
    n_slots = 2 if L >= 3 else 1 if L == 2 else 0
    out = []
    x = torch.empty(0, dtype=torch.float32 if elem_size >= 4 else torch.bfloat16, device="meta")
    for cf in _prune(configs or _GPU_CONFIGS, {"C": C, "ctx_ptr": x}):
        th, tw, bc = cf.kwargs["TILE_H"], cf.kwargs["TILE_W"], cf.kwargs["BLOCK_C"]
        slot = _slot_elems(th, tw, bc, ks)
        work = B * triton.cdiv(H, th) * triton.cdiv(W, tw) * triton.cdiv(C, bc)
        n = min(work, sms * per_sm, _budget_prog(slot, n_slots))
        out.append((f"{th}x{tw} c{bc} w{cf.num_warps}", n, 4 * _scratch_floats(n, slot, n_slots)))
    return out


def _size_class(H, W):
    m = min(H, W)
    return 0 if m <= 8 else 1 if m <= 16 else 2 if m <= 32 else 3


def _ctx_align(ctx):
    """Largest power of two (<= one 16-byte vector) dividing the batch, row and pixel strides of
    ctx, in elements.  Triton only learns "divisible by 16" from a launch; the production ctx is a
    slice of the f output with pixel stride 2C+L+1 (e.g. 196 for C=96, L=3: 8-byte aligned)."""
    s_b, s_h, s_w, _ = ctx.stride()
    return pow2_align((s_b, s_h, s_w), ctx.element_size())


def pow2_align(strides, elem_size):
    """Largest power of two (<= one 16-byte vector, in elements) dividing every stride."""
    a = 16 // elem_size
    while a > 1 and any(v % a for v in strides):
        a //= 2
    return a


def _max_offset(t):
    return sum((n - 1) * abs(s) for n, s in zip(t.shape[1:], t.stride()[1:]) if n > 0)


def _launch(kernel, grid, args, kwargs):
    """Every Triton launch of this module goes through here (tests and the report's compile
    count replace _LAUNCH_HOOK to record the launches instead)."""
    if _LAUNCH_HOOK is not None:
        return _LAUNCH_HOOK(kernel, grid, args, kwargs)
    return kernel[grid](*args, **kwargs)


_LAUNCH_HOOK = None
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def _check_grid(grid):
    for n, lim in zip(grid, GRID_LIMITS):
        if not 1 <= n <= lim:
            raise ValueError(f"focal_context_fwd_triton: grid {grid} exceeds the CUDA limits")
    return grid


def device_guard(device):
    """The launches must run on the tensors' device, whatever the current device is."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def global_grid(B, HW, C):
    """Grid of the global kernel: (B * pixel blocks, channel blocks)."""
    return _check_grid((B * triton.cdiv(HW, _GLOBAL_BLOCK_P * _GLOBAL_P_ITERS),
                        triton.cdiv(C, _global_block_c(C))))


def focal_context_fwd_triton(ctx, gates, weights, normalize, global_term=True):
    """Contract ``fwd``: returns (out [B,H,W,C] contiguous in ctx.dtype, pooled [B,C] fp32).
    global_term=False: out without s * g_L * GELU(pooled) (folded into the h GEMM by the caller)."""
    with device_guard(ctx.device):
        return _fwd(ctx, gates, weights, normalize, global_term)


def _fwd(ctx, gates, weights, normalize, global_term=True):
    B, H, W, C = ctx.shape
    L = len(weights)
    if not 1 <= L <= 4:
        raise ValueError(f"focal_context_fwd_triton: L must be 1..4, got {L}")
    ks = [int(w.shape[-1]) for w in weights]
    for k, w in zip(ks, weights):
        if k % 2 != 1 or not 3 <= k <= 15 or tuple(w.shape) != (C, k, k):
            raise ValueError(f"focal_context_fwd_triton: bad kernel weight shape {tuple(w.shape)}")
    if tuple(gates.shape) != (B, H, W, L + 1):
        raise ValueError(f"focal_context_fwd_triton: gates shape {tuple(gates.shape)}")
    dev = ctx.device
    out = torch.empty((B, H, W, C), dtype=ctx.dtype, device=dev)
    pooled = torch.empty((B, C), dtype=torch.float32, device=dev)
    if B * H * W * C == 0:
        return out, pooled.zero_()
    # per-image offsets are int32 in the kernel (batch offsets are int64)
    lim = 2**31 - 1
    if _max_offset(ctx) >= lim or _max_offset(gates) >= lim or H * W * C >= lim:
        raise ValueError("focal_context_fwd_triton: one image exceeds 2^31 elements")
    # weights -> one [sum k^2, C] fp32 buffer: per-tap weight vectors contiguous along C (tiny)
    wpack = torch.cat([w.to(torch.float32).reshape(C, k * k).t() for w, k in zip(weights, ks)], 0)
    wpack = wpack.contiguous()
    K = ks + [0] * (4 - L)
    scale = 1.0 / (L + 1) if normalize else 1.0
    s_b, s_h, s_w, s_c = ctx.stride()
    g_b, g_h, g_w, g_l = gates.stride()

    cands = _prune(_fwd_local.configs, {"C": C, "ctx_ptr": ctx})
    min_th = min(cf.kwargs["TILE_H"] for cf in cands)
    min_tw = min(cf.kwargs["TILE_W"] for cf in cands)
    nt_max = triton.cdiv(H, min_th) * triton.cdiv(W, min_tw)
    n_slots = 2 if L >= 3 else 1 if L == 2 else 0
    kind = (str(ctx.dtype), tuple(ks))
    guess = _per_sm_guess(dev, ctx.element_size(), L)

    def nprog(meta, num_warps):
        th, tw, bc = meta["TILE_H"], meta["TILE_W"], meta["BLOCK_C"]
        work = B * triton.cdiv(H, th) * triton.cdiv(W, tw) * triton.cdiv(C, bc)
        cfg = {"kwargs": {"TILE_H": th, "TILE_W": tw, "BLOCK_C": bc}, "num_warps": num_warps}
        n = _max_prog(dev, work, kind, cfg, guess)
        return min(n, _budget_prog(_slot_elems(th, tw, bc, ks), n_slots))

    scratch_n = max(_scratch_floats(nprog(cf.kwargs, cf.num_warps),
                                    _slot_elems(cf.kwargs["TILE_H"], cf.kwargs["TILE_W"],
                                                cf.kwargs["BLOCK_C"], ks), n_slots)
                    for cf in cands)
    scratch = torch.empty(max(1, scratch_n), dtype=torch.float32, device=dev)
    # partials [B, n_tiles, C] fp32, then one int32 word: n_tiles of the config that ran
    part_all = torch.empty((B * nt_max * C + 1,), dtype=torch.float32, device=dev)
    part = part_all[:-1]
    nt_word = part_all[-1:].view(torch.int32)

    def grid(meta):
        return _check_grid((nprog(meta, meta.get("num_warps", 4)),))

    c_contig = s_c == 1 or C == 1
    ret = _launch(_fwd_local, grid, (
        ctx, gates, wpack, out, part, nt_word, scratch, B, H, W, C,
        s_b, s_h, s_w, s_c, g_b, g_h, g_w, g_l, scale, _size_class(H, W), 0), dict(
        L=L, K0=K[0], K1=K[1], K2=K[2], K3=K[3], C_CONTIG=c_contig,
        CTX_ALIGN=_ctx_align(ctx) if c_contig else 1))
    if _LAUNCH_HOOK is None:
        _record_occupancy(kind, dev, _fwd_local, ret)
    bcg = _global_block_c(C)
    _launch(_fwd_global_kernel, global_grid(B, H * W, C), (
        out, gates, part, nt_word, pooled, H * W, W, C, g_b, g_h, g_w, g_l, scale), dict(
        L=L, BLOCK_P=_GLOBAL_BLOCK_P, BLOCK_C=bcg, BLOCK_T=_GLOBAL_BLOCK_T,
        P_ITERS=_GLOBAL_P_ITERS, ADD_GLOBAL=bool(global_term), num_warps=_GLOBAL_WARPS))
    return out, pooled


# ----------------------------------------------------------------------------------------------
# what the compile report (focalnet_kernels/report.py) builds; format in the module docstring
# ----------------------------------------------------------------------------------------------
# Representative specialisations: bf16 (the training dtype), channels contiguous, C a multiple of
# BLOCK_C (C = 96·2^s in every FocalNet), 16-byte aligned pointers and strides divisible by 16
# (contiguous ctx) -- what a launch on a contiguous tensor specialises to.
_REPORT_KSETS = {
    "srf": (3, 5),          # FocalNet-T/S/B SRF
    "lrf": (3, 5, 7),       # FocalNet-T/S/B LRF, large/xlarge fl3 use (5, 7, 9)
    "fl4": (3, 5, 7, 9),    # large/xlarge/huge fl4
    "det": (9, 11, 13, 15),  # detection backbones (window 9, L=4)
}
# which kernel-size sets each shipped config is reported with (the config's intended use)
_REPORT_PLAN = [
    ((8, 8, 32, 4), ("srf", "lrf", "fl4")),
    ((8, 16, 16, 4), ("srf", "lrf", "fl4", "det")),
    ((16, 16, 8, 4), ("lrf", "fl4", "det")),
]
_D16 = [["tt.divisibility", 16]]


def _local_entry(dt, ks, th, tw, bc, warps, align=None, tag=""):
    """align=None: contiguous ctx (pointers 16 B aligned, strides multiples of 16 elements);
    align=n: ctx a slice of the f output with strides that are multiples of n elements only."""
    L = len(ks)
    K = list(ks) + [0] * (4 - L)
    sig = {"ctx_ptr": f"*{dt}", "g_ptr": f"*{dt}", "w_ptr": "*fp32", "out_ptr": f"*{dt}",
           "part_ptr": "*fp32", "nt_ptr": "*i32", "scr_ptr": "*fp32"}
    sig.update({n: "i32" for n in ("B", "H", "W", "C", "s_b", "s_h", "s_w", "s_c",
                                   "g_b", "g_h", "g_w", "g_l", "size_class", "kz")})
    sig["scale"] = "fp32"
    # shapes and strides are not specialised (_LOCAL_NO_SPEC): no attributes; CTX_ALIGN carries
    # the stride alignment
    attrs = {n: _D16 for n in ("ctx_ptr", "g_ptr", "w_ptr", "out_ptr", "part_ptr", "scr_ptr", "kz",
                               "C")}
    if align is None:
        align = 16 // (4 if dt == "fp32" else 2)
    return {
        "name": f"fwd_local[{dt} k={','.join(map(str, ks))}{tag}]",
        "config": f"{th}x{tw} c{bc} w{warps} s1",
        "fn": _fwd_local_kernel,
        "signature": sig,
        "constexprs": {"L": L, "K0": K[0], "K1": K[1], "K2": K[2], "K3": K[3], "TILE_H": th,
                       "TILE_W": tw, "BLOCK_C": bc, "C_CONTIG": True, "CTX_ALIGN": align,
                       "EVEN_C": True},
        "attrs": attrs,
        "num_warps": warps,
        "num_stages": 1,
    }


def _global_entry(dt, L, bc):
    sig = {"out_ptr": f"*{dt}", "g_ptr": f"*{dt}", "part_ptr": "*fp32", "nt_ptr": "*i32",
           "pooled_ptr": "*fp32"}
    sig.update({n: "i32" for n in ("HW", "W", "C", "g_b", "g_h", "g_w", "g_l")})
    sig["scale"] = "fp32"
    return {
        "name": f"fwd_global[{dt} L={L}]",
        "config": f"p{_GLOBAL_BLOCK_P}x{_GLOBAL_P_ITERS} c{bc} w{_GLOBAL_WARPS} s3",
        "fn": _fwd_global_kernel,
        "signature": sig,
        "constexprs": {"L": L, "BLOCK_P": _GLOBAL_BLOCK_P, "BLOCK_C": bc,
                       "BLOCK_T": _GLOBAL_BLOCK_T, "P_ITERS": _GLOBAL_P_ITERS, "ADD_GLOBAL": True},
        "attrs": {n: _D16 for n in ("out_ptr", "g_ptr", "part_ptr", "pooled_ptr")},
        "num_warps": _GLOBAL_WARPS,
        "num_stages": 3,
    }


def _build_report_kernels():
    entries = []
    for (th, tw, bc, warps), ksets in _REPORT_PLAN:
        for name in ksets:
            entries.append(_local_entry("bf16", _REPORT_KSETS[name], th, tw, bc, warps))
    # fp32 is tuned over the 8x8 c32 tile only (see _FP32_CONFIGS)
    for name in _REPORT_KSETS:
        entries.append(_local_entry("fp32", _REPORT_KSETS[name], 8, 8, 32, 4))
    # the production layout: ctx is a slice of the f output, pixel stride 2C+L+1: 196 for C=96,
    # L=3 (multiple of 4 elements -> 8-byte loads), 195 for L=2 (odd -> 2-byte loads)
    entries.append(_local_entry("bf16", _REPORT_KSETS["lrf"], 8, 8, 32, 4, align=4,
                                tag=" slice-view"))
    entries.append(_local_entry("bf16", _REPORT_KSETS["srf"], 8, 8, 32, 4, align=1,
                                tag=" slice-view"))
    entries.append(_global_entry("bf16", 3, 64))
    # 1 x 1 maps (and H = 1 or W = 1) as Triton specialised them before the shape arguments were
    # unspecialised (an argument equal to 1 became a constant; `HW.to(tl.float32)` then failed to
    # compile), sm_90 only
    for names, tag in ((("H", "W"), "H=W=1"), (("H",), "H=1"), (("W",), "W=1")):
        e = _local_entry("bf16", _REPORT_KSETS["lrf"], 8, 8, 32, 4)
        entries.append(_const_ones(e, names, tag))
        gnames = {("H", "W"): ("HW", "W"), ("W",): ("W",)}.get(names)
        if gnames:  # (H alone is not an argument of the global kernel)
            entries.append(_const_ones(_global_entry("bf16", 3, 64), gnames, tag))
    return entries


def _const_ones(entry, names, tag):
    e = dict(entry, signature={k: v for k, v in entry["signature"].items() if k not in names},
             constexprs={**entry["constexprs"], **{n: 1 for n in names}},
             attrs={k: v for k, v in entry["attrs"].items() if k not in names})
    e["name"] = entry["name"][:-1] + f" {tag}]"
    e["archs"] = (90,)
    return e


REPORT_KERNELS = _build_report_kernels()
