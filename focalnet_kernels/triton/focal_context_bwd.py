"""Triton backward of the focal context (docs/backend-contract.md, "Backward").

    focal_context_bwd_triton(grad_out, ctx, gates, weights, pooled, normalize)
        -> (grad_ctx, grad_gates, grad_weights)

Notation (contract): x_0 = ctx, z_l = dwconv(x_l, w_l), x_{l+1} = GELU(z_l), s = 1/(L+1) or 1,
dout = grad_out, g = gates, k_l = kernel size of level l, N = one B*H*W*C map.

Stages and launches (L levels; 2L + 1 Triton launches, plus tiny torch ops on [B, C] and the
fixed-order sums of the weight-gradient workspaces):

  (1) `_bwd_global_kernel`, 1 launch, fixed config. Reads dout and g[..., L] once (1 N pass):
      grad_gates[..., L] = s * sum_c dout * GELU(pooled) (all C looped inside the program, so the
      per-token sum is complete: no partials), and dpool partial sums over blocks of BLOCK_HW tokens
      ([B, n_blocks, C] fp32; summed over blocks in a fixed order by torch). dpool -> dxg[b, c] =
      GELU'(pooled) * s * sum / (H*W) is a [B, C] torch op.
  (2) `_dwconv_kernel` (GELU epilogue), L-1 launches: x_{l+1} = GELU(dwconv(x_l)) for l = 0..L-2
      into fp32 scratch maps (read x_l + write x_{l+1}: 2 N per launch). x_L and every z_l are
      never stored: z_l is recomputed at the tile inside step (3) from the taps of x_l that the
      weight gradient has to read anyway.
  (3) `_bwd_step_kernel`, one launch per level l = L-1 .. 0. Per spatial tile, looping over all
      channel blocks:
        dx_{l+1} = s*dout*g_l + (l == L-1 ? dxg[b, c] : conv_transpose(dz_{l+1}, w_{l+1}))
        z_l      = dwconv(x_l, w_l)                       (taps of x_l: L1/L2 hits, not N passes)
        grad_gates[..., l] = s * sum_c dout * GELU(z_l)    (complete per token: C looped in-program)
        dz_l     = dx_{l+1} * GELU'(z_l)                  -> fp32 scratch map
        grad_w_l partial[row, i, j, c] += sum_tile dz_l * x_l(shifted)   (private workspace row)
      Passes: read x_l, dout, (dz_{l+1}), write dz_l: 3 N for the top level, 4 N for the others.
  (4) `_dwconv_kernel` (flipped taps, no GELU), 1 launch: grad_ctx = conv_transpose(dz_0, w_0)
      (read dz_0, write grad_ctx: 2 N).

  Total: 1 + 2(L-1) + 3 + 4(L-1) + 2 = 6L full-map passes (18 for L = 3; gates traffic is
  (L+1)/C of a map and not counted). Eager autograd of the same graph runs ~9 passes per level
  forward again plus its backward.

Transient memory: the fp32 scratch maps x_1..x_{L-1} plus one more: dz_l is written into the
buffer of x_{l+1}, which step l no longer needs (steps l+1.. are done, x_{l+1} is recomputed at
the tile), so the peak is L fp32 maps (freed when backward returns), plus the weight-gradient
workspaces (bounded, see `_rows`).

Determinism: no atomics anywhere. The weight-gradient reduction is two-stage: program `row` of the
step kernel owns workspace row `row` ([rows, k, k, C] fp32), walks the tiles row, row+rows, ... in a
fixed order and accumulates into its own row (load-add-store, a barrier between tiles); torch then
sums the rows with `.sum(0)` (fixed order). `rows` never depends on the autotuned config (it is at
most the tile count of the biggest tile), so every row is fully overwritten on every run and
autotuner benchmark runs cannot leave stale data. Results are bit-identical between runs with the
same chosen config; a different autotuned tile changes the summation order (ulp-level), so two
processes that tune differently may differ in the last bits.

Strides: grad_out, ctx and gates are read through their strides (never made contiguous); all map
offsets are computed in int64. Weights are read from tap-major [k, k, C] copies (host permute of
C*k*k floats) so weight loads are contiguous along C; EVEN_C (C % BLOCK_C == 0, a heuristic on the
autotuned BLOCK_C) drops the channel masks so loads vectorise.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..reference import gelu_grad
from .focal_context_fwd import (_INTERPRET, _check_grid, _const_ones, _gelu, _launch as _fwd_launch,
                                 _ctx_align, _size_class, device_guard)

# kernel side: jit functions may only read constexpr globals
_K_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_K_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)

# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------
# (TILE_H, TILE_W, BLOCK_C, num_warps), shared by the recompute/transpose conv and the step kernel.
# Every config keeps 16 elements of a [TILE, BLOCK_C] tile per thread: the step kernel holds
# ~6 such fp32 tiles plus 64-bit pointer tiles live, and 32 per thread spilled (sm_90, 255 regs).
_GPU_TILE_CONFIGS = [
    # 64-token tile: small maps (7x7, 14x14 late stages) waste little on tile overhang and
    # still give B*tiles programs; the default for mid-size C.
    (8, 8, 32, 4),
    # 128-token tile with 16 channels: large early-stage maps (56x56 and up, C = 96..192);
    # halo re-reads and the per-tile workspace update are amortised over 2x more tokens.
    # (8-warp variants of these tiles hit ptxas' 128-register cap and spilled on sm_90.)
    (8, 16, 16, 4),
    # 64-token tile with 64 channels at 8 warps would spill; 4x16 tokens x 32 channels keeps 16
    # elements per thread: wide C (384..1024) on small maps (7x7, 14x14), where the number of
    # tiles, not bandwidth, limits the grid.
    (4, 16, 32, 4),
]
if _INTERPRET:
    # The interpreter: one config, no benchmarking. 8x8 tiles so the small test maps (7x9, 13x17)
    # span several tiles with partial edges, BLOCK_C 32 so C = 64 takes two channel blocks.
    _TILE_CONFIGS = [_GPU_TILE_CONFIGS[0]]
else:
    _TILE_CONFIGS = _GPU_TILE_CONFIGS
_NUM_STAGES = 1  # no tl.dot: nothing for the software pipeliner to overlap; keep shared memory free


def _autotune_configs():
    return [triton.Config({"TILE_H": th, "TILE_W": tw, "BLOCK_C": bc}, num_warps=nw, num_stages=_NUM_STAGES)
            for th, tw, bc, nw in _TILE_CONFIGS]


# The global kernel is not autotuned: its partial-sum buffer shape depends on BLOCK_HW.
_G_BLOCK_HW = 64
_G_BLOCK_C = 32
_G_NUM_WARPS = 4

# Weight-gradient workspace rows (= step-kernel programs): at most MAX_ROWS, at most
# WS_BUDGET_FLOATS floats per level workspace, never more than the tile count of any config.
MAX_ROWS = 4096
WS_BUDGET_FLOATS = 1 << 24  # 64 MiB of fp32


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _aligned(v, A: tl.constexpr):
    """v itself (the launcher checked v % A == 0), written so that the compiler knows A divides it:
    integer arguments are not specialised, so alignment comes from these explicit constexprs."""
    if A > 1:
        v = (v // A) * A
    return v


@triton.jit
def _tile_coords(t, H, W, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """Tile index t -> (b, h[TILE], w[TILE]); tiles are image-major, then rows, then columns."""
    nth = tl.cdiv(H, TILE_H)
    ntw = tl.cdiv(W, TILE_W)
    per = nth * ntw
    b = t // per
    rem = t - b * per
    th = rem // ntw
    tw = rem - th * ntw
    r = tl.arange(0, TILE_H * TILE_W)
    hh = th * TILE_H + r // TILE_W
    ww = tw * TILE_W + r % TILE_W
    return b, hh, ww


@triton.jit
def _dwconv_tile(src_ptr, s_b, s_h, s_w, s_c, w_ptr, b, hh, ww, cc64, cc, cm, H, W, C, kz,
                 K: tl.constexpr, FLIP: tl.constexpr, TILE: tl.constexpr, BLOCK_C: tl.constexpr):
    """fp32 depthwise conv of src at the tile (w tap-major [K, K, C]). FLIP=False: sum_ij w[c,i,j] src[h+i-p, w+j-p]
    (forward conv); FLIP=True: sum_ij w[c,i,j] src[h-i+p, w-j+p] (transposed conv). Zero padding.
    kz: 0; a literal 0 (constexpr) gives compile-time tap loops, a runtime 0 run-time ones (see
    _bwd_step_kernel)."""
    P: tl.constexpr = K // 2
    acc = tl.zeros([TILE, BLOCK_C], dtype=tl.float32)
    base = b.to(tl.int64) * s_b
    coff = cc64 * s_c
    for i in range(0, K + kz):
        if FLIP:
            h2 = hh + (P - i)
        else:
            h2 = hh + (i - P)
        hm = (h2 >= 0) & (h2 < H)
        hoff = base + h2.to(tl.int64) * s_h
        for j in range(0, K + kz):
            if FLIP:
                w2 = ww + (P - j)
            else:
                w2 = ww + (j - P)
            m = hm & (w2 >= 0) & (w2 < W)
            v = tl.load(src_ptr + (hoff + w2.to(tl.int64) * s_w)[:, None] + coff[None, :],
                        mask=m[:, None] & cm[None, :], other=0.0).to(tl.float32)
            wv = tl.load(w_ptr + (i * K + j) * C + cc, mask=cm, other=0.0)
            acc += v * wv[None, :]
    return acc


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
def _even_c(args):
    return args["C"] % args["BLOCK_C"] == 0


# The step kernel holds at most two 16-byte vectors of a [TILE, BLOCK_C] input tile per thread:
# 16 elements for 16-bit inputs (every config as it is), 8 for fp32, whose BLOCK_C is capped to fit
# (8x8 c32 -> c16, 8x16 c16 -> c8, 4x16 c32 -> c16).  With 16 fp32 elements per thread the non-top
# steps sat at ptxas' 128-register mark and spilled 8-40 B at sm_80 (Triton 3.6 and 3.9); with 8
# they use ~90-100 registers and do not spill.  The cap is applied by the kernel's heuristics (so
# also when autotuning is off and the first config runs unpruned) and by _prune_step (so the
# autotuner, the compile count and the cost model see the configs that actually run); it is
# idempotent, so both together apply it once.
def _step_block_c(th, tw, bc, nw, esize):
    per_thread = 2 * (16 // esize)
    return max(1, min(bc, per_thread * 32 * nw // (th * tw)))


def _step_configs(esize):
    """The (TILE_H, TILE_W, BLOCK_C, num_warps) the step kernel runs for inputs of esize bytes."""
    return [(th, tw, _step_block_c(th, tw, bc, nw, esize), nw) for th, tw, bc, nw in _TILE_CONFIGS]


def _step_heuristic_block_c(args):
    return _step_block_c(args["TILE_H"], args["TILE_W"], args["BLOCK_C"], args.get("num_warps", 4),
                         args["dout_ptr"].element_size())


# The 8x16 tile is not offered to two step variants that spilled there (sm_90, the cost model's
# compiles): the level-0 step of fp16/bf16 calls, which reads x_0 = ctx itself in 16 bits (other levels
# read the fp32 scratch): 8 B under Triton 3.6 (128 registers), 16 B under 3.9; and the fp32 top step:
# 8 B under 3.6. 8x8 c32 and 4x16 c32 stay for them (the model puts them within 2 %).
_STEP_SPILL_SKIP = {(8, 16)}


def _prune_step(configs, nargs):
    """Early config prune of the step kernel: every config runs, for every dtype and kernel size,
    with the fp32 channel-block cap applied -- except the 8x16 tile for the two variants that spill
    there (_STEP_SPILL_SKIP: 16-bit x_0, fp32 top step)."""
    es = nargs["dout_ptr"].element_size()
    x = nargs.get("x_ptr")
    skip = (x is not None and x.element_size() == 2) or (es == 4 and bool(nargs.get("TOP", False)))
    out = []
    for cf in configs:
        k = cf.kwargs
        if skip and (k["TILE_H"], k["TILE_W"]) in _STEP_SPILL_SKIP and len(configs) > 1:
            continue
        bc = _step_block_c(k["TILE_H"], k["TILE_W"], k["BLOCK_C"], cf.num_warps, es)
        out.append(cf if bc == k["BLOCK_C"] else
                   triton.Config({**k, "BLOCK_C": bc}, num_warps=cf.num_warps, num_stages=cf.num_stages))
    return out


# Integer arguments (shapes, strides, level numbers) are never specialised: a new batch size,
# image size or view must not compile a new variant.  Speed-relevant facts are constexprs:
# *_CONTIG (channel stride 1), *_ALIGN (batch/row/pixel strides multiples of it), EVEN_C.
_NO_SPEC_GLOBAL = ["sdb", "sdh", "sdw", "sdc", "sgb", "sgh", "sgw", "sgc", "H", "W", "C", "LEVELS"]
_NO_SPEC_DWCONV = ["s_b", "s_h", "s_w", "s_c", "B", "H", "W", "C", "size_class"]
# The step kernel is the register-critical one: an aligned copy of a stride, (s // A) * A, is a
# value ptxas must keep in a register, where a specialised stride stays a kernel parameter (constant
# bank, free to re-read); with them the top step spilled 16 B under Triton 3.6.  So its strides and C
# keep Triton's specialisation (a new view layout may compile a variant; a new size does not).
_NO_SPEC_STEP = ["B", "H", "W", "R", "LEVEL", "LEVELS", "size_class"]


@triton.jit(do_not_specialize=_NO_SPEC_GLOBAL)
def _bwd_global_kernel(dout_ptr, sdb, sdh, sdw, sdc,
                       g_ptr, sgb, sgh, sgw, sgc,
                       pooled_ptr, gg_ptr, dpart_ptr,
                       H, W, C, LEVELS, scale,
                       BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr,
                       D_CONTIG: tl.constexpr, D_ALIGN: tl.constexpr):
    """Program b * nblk + blk: BLOCK_HW tokens of image b. grad_gates[tok, L] =
    s*sum_c dout*GELU(pooled); dpart[b, blk, c] = sum_tokens dout * g[..., L]. (One grid axis:
    axis 0 allows 2^31 - 1 programs, axis 1 only 65535.)"""
    if EVEN_C:
        C = _aligned(C, BLOCK_C)
    if D_CONTIG:
        sdc = 1
    sdb = _aligned(sdb, D_ALIGN)
    sdh = _aligned(sdh, D_ALIGN)
    sdw = _aligned(sdw, D_ALIGN)
    HW = H * W
    nblk = tl.cdiv(HW, BLOCK_HW)
    pid = tl.program_id(0)
    b = pid // nblk
    blk = pid - b * nblk
    hw = blk * BLOCK_HW + tl.arange(0, BLOCK_HW)
    tm = hw < HW
    hh = hw // W
    ww = hw - hh * W
    b64 = b.to(tl.int64)
    doff = b64 * sdb + hh.to(tl.int64) * sdh + ww.to(tl.int64) * sdw
    goff = b64 * sgb + hh.to(tl.int64) * sgh + ww.to(tl.int64) * sgw + LEVELS * sgc
    gl = tl.load(g_ptr + goff, mask=tm, other=0.0).to(tl.float32)
    gdot = tl.zeros([BLOCK_HW], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        if EVEN_C:  # constant mask: lets the loads vectorise along C
            cm = tl.full([BLOCK_C], 1, tl.int1)
        else:
            cm = cc < C
        m2 = tm[:, None] & cm[None, :]
        d = tl.load(dout_ptr + doff[:, None] + cc.to(tl.int64)[None, :] * sdc, mask=m2, other=0.0).to(tl.float32)
        p = tl.load(pooled_ptr + b * C + cc, mask=cm, other=0.0)
        gp = _gelu(p)
        gdot += tl.sum(d * gp[None, :], axis=1)
        part = tl.sum(d * gl[:, None], axis=0)
        tl.store(dpart_ptr + (b64 * nblk + blk) * C + cc, part, mask=cm)
    tok = b64 * HW + hw
    tl.store(gg_ptr + tok * (LEVELS + 1) + LEVELS, (gdot * scale).to(gg_ptr.dtype.element_ty), mask=tm)


# autotune keys: no B, H, W (size_class is an image-size bucket; dtypes are appended by autotune)
@triton.autotune(configs=_autotune_configs(), key=["size_class", "C", "K", "FLIP", "SRC_CONTIG", "SRC_ALIGN"])
@triton.heuristics({"EVEN_C": _even_c})
@triton.jit(do_not_specialize=_NO_SPEC_DWCONV)
def _dwconv_kernel(src_ptr, s_b, s_h, s_w, s_c, w_ptr, dst_ptr, B, H, W, C, size_class,
                   K: tl.constexpr, FLIP: tl.constexpr, GELU: tl.constexpr,
                   SRC_CONTIG: tl.constexpr, SRC_ALIGN: tl.constexpr,
                   TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_C: tl.constexpr,
                   EVEN_C: tl.constexpr):
    """dst (contiguous B*H*W*C) = [GELU](dwconv or transposed dwconv of src). One grid axis:
    program cb * n_tiles + t (tile t fastest, as a (tiles, c-blocks) grid would run)."""
    TILE: tl.constexpr = TILE_H * TILE_W
    if EVEN_C:
        C = _aligned(C, BLOCK_C)
    if SRC_CONTIG:
        s_c = 1
    s_b = _aligned(s_b, SRC_ALIGN)
    s_h = _aligned(s_h, SRC_ALIGN)
    s_w = _aligned(s_w, SRC_ALIGN)
    n_tiles = B * tl.cdiv(H, TILE_H) * tl.cdiv(W, TILE_W)
    pid = tl.program_id(0)
    cb = pid // n_tiles
    t = pid - cb * n_tiles
    b, hh, ww = _tile_coords(t, H, W, TILE_H, TILE_W)
    cc = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    if EVEN_C:
        cm = tl.full([BLOCK_C], 1, tl.int1)
    else:
        cm = cc < C
    cc64 = cc.to(tl.int64)
    y = _dwconv_tile(src_ptr, s_b, s_h, s_w, s_c, w_ptr, b, hh, ww, cc64, cc, cm, H, W, C, 0,
                     K, FLIP, TILE, BLOCK_C)
    if GELU:
        y = _gelu(y)
    valid = (hh < H) & (ww < W)
    tok = (b.to(tl.int64) * H + hh) * W + ww
    tl.store(dst_ptr + (tok * C)[:, None] + cc64[None, :], y.to(dst_ptr.dtype.element_ty),
             mask=valid[:, None] & cm[None, :])


@triton.autotune(configs=_autotune_configs(), key=["size_class", "C", "KOUT", "KIN", "TOP"],
                 # Triton 3.6 passes the constexpr launch arguments in kw, not in nargs: merged
                 prune_configs_by={"early_config_prune":
                                   lambda configs, nargs, **kw: _prune_step(configs, {**kw, **nargs})})
@triton.heuristics({"BLOCK_C": _step_heuristic_block_c, "EVEN_C": _even_c})
@triton.jit(do_not_specialize=_NO_SPEC_STEP)
def _bwd_step_kernel(x_ptr, sxb, sxh, sxw, sxc,          # x_l (ctx with its strides, or fp32 scratch)
                     w_ptr,                              # w_l tap-major [KOUT, KOUT, C] fp32
                     dzin_ptr, szb, szh, szw, win_ptr,   # dz_{l+1} (fp32, channel stride 1), w_{l+1}
                     dout_ptr, sdb, sdh, sdw, sdc,
                     g_ptr, sgb, sgh, sgw, sgc,
                     dxg_ptr,                            # [B, C] fp32: dpool / (H W)  (TOP only)
                     dz_ptr,                             # out: dz_l, fp32 contiguous
                     gg_ptr,                             # out: grad_gates contiguous [B*H*W, L+1]
                     ws_ptr,                             # out: [R, KOUT, KOUT, C] fp32 partials
                     B, H, W, C, R, LEVEL, LEVELS, scale, size_class, kz,
                     KOUT: tl.constexpr, KIN: tl.constexpr, TOP: tl.constexpr,
                     TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_C: tl.constexpr,
                     EVEN_C: tl.constexpr):
    """Backward of level LEVEL for the tiles row, row+R, ... (R = number of programs).

    kz is always 0 (as in the forward's local kernel): the tap loops run to `K + kz`, a bound the
    compiler cannot see, so they are not fully unrolled; fully unrolled (25..225 taps per loop, three
    loops) ptxas 12.8 (Triton 3.6) hoisted loads until the non-top steps spilled 16-32 B."""
    TILE: tl.constexpr = TILE_H * TILE_W
    KK: tl.constexpr = KOUT * KOUT
    P: tl.constexpr = KOUT // 2
    row = tl.program_id(0)
    T = B * tl.cdiv(H, TILE_H) * tl.cdiv(W, TILE_W)
    ws_row = ws_ptr + row.to(tl.int64) * KK * C
    for t in range(row, T, R):
        b, hh, ww = _tile_coords(t, H, W, TILE_H, TILE_W)
        valid = (hh < H) & (ww < W)
        b64 = b.to(tl.int64)
        goff = b64 * sgb + hh.to(tl.int64) * sgh + ww.to(tl.int64) * sgw + LEVEL * sgc
        gl = tl.load(g_ptr + goff, mask=valid, other=0.0).to(tl.float32)
        gdot = tl.zeros([TILE], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            # The tile's coordinates and offsets, recomputed per channel block (a few integer ops)
            # from `t + kz * c0` (= t, but loop-variant): held across the channel loop instead,
            # they made ptxas 12.8 (Triton 3.6) spill 16-32 B in the non-top steps.
            cb, ch, cw = _tile_coords(t + kz * c0, H, W, TILE_H, TILE_W)
            cvalid = (ch < H) & (cw < W)
            cb64 = cb.to(tl.int64)
            ctok = (cb64 * H + ch) * W + cw
            doff = cb64 * sdb + ch.to(tl.int64) * sdh + cw.to(tl.int64) * sdw
            cc = c0 + tl.arange(0, BLOCK_C)
            if EVEN_C:
                cm = tl.full([BLOCK_C], 1, tl.int1)
            else:
                cm = cc < C
            cc64 = cc.to(tl.int64)
            m2 = cvalid[:, None] & cm[None, :]
            # z_l = dwconv(x_l) first, then the transposed conv of the level above, then dout:
            # at most two [TILE, BLOCK_C] fp32 tiles are live during a tap loop (dout loaded
            # first, sd and dx were both held across both convolutions)
            z = _dwconv_tile(x_ptr, sxb, sxh, sxw, sxc, w_ptr, cb, ch, cw, cc64, cc, cm, H, W, C,
                             kz, KOUT, False, TILE, BLOCK_C)
            if not TOP:
                up = _dwconv_tile(dzin_ptr, szb, szh, szw, 1, win_ptr, cb, ch, cw, cc64, cc, cm, H, W, C,
                                  kz, KIN, True, TILE, BLOCK_C)
            sd = tl.load(dout_ptr + doff[:, None] + (cc64 * sdc)[None, :], mask=m2, other=0.0).to(tl.float32)
            sd = sd * scale
            # dx_{l+1} at the tile
            dx = sd * gl[:, None]
            if TOP:
                dx += tl.load(dxg_ptr + cb64 * C + cc64, mask=cm, other=0.0)[None, :]
            else:
                dx += up
            # x_{l+1}, GELU'(z_l)
            cdf = 0.5 * (1.0 + tl.math.erf(z * _K_INV_SQRT2))
            gdot += tl.sum(sd * (z * cdf), axis=1)
            dz = dx * (cdf + z * tl.exp(-0.5 * z * z) * _K_INV_SQRT_2PI)
            dz = tl.where(m2, dz, 0.0)
            tl.store(dz_ptr + (ctok * C)[:, None] + cc64[None, :], dz, mask=m2)
            # weight-gradient partials: sum over the tile of dz_l * x_l(shifted), per tap
            xbase = cb64 * sxb
            xcoff = cc64 * sxc
            for i in range(0, KOUT + kz):
                h2 = ch + (i - P)
                hm = (h2 >= 0) & (h2 < H)
                hoff = xbase + h2.to(tl.int64) * sxh
                for j in range(0, KOUT + kz):
                    w2 = cw + (j - P)
                    m = hm & (w2 >= 0) & (w2 < W)
                    xs = tl.load(x_ptr + (hoff + w2.to(tl.int64) * sxw)[:, None] + xcoff[None, :],
                                 mask=m[:, None] & cm[None, :], other=0.0).to(tl.float32)
                    part = tl.sum(dz * xs, axis=0)
                    wp = ws_row + (i * KOUT + j) * C + cc64
                    prev = tl.load(wp, mask=cm & ((cc * 0 + t) != row), other=0.0)
                    tl.store(wp, prev + part, mask=cm)
        # and once more for the grad_gates store (`+ kz * C` = 0), rather than live across the loop
        b, hh, ww = _tile_coords(t + kz * C, H, W, TILE_H, TILE_W)
        valid = (hh < H) & (ww < W)
        tok = (b.to(tl.int64) * H + hh) * W + ww
        tl.store(gg_ptr + tok * (LEVELS + 1) + LEVEL, (gdot).to(gg_ptr.dtype.element_ty), mask=valid)
        # the next tile re-reads this program's workspace row: make the stores visible CTA-wide
        tl.debug_barrier()


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------
def _ntiles(B: int, H: int, W: int, th: int, tw: int) -> int:
    return B * triton.cdiv(H, th) * triton.cdiv(W, tw)


def _rows(B: int, H: int, W: int, C: int, k: int) -> int:
    """Step-kernel programs = workspace rows. Config-independent: <= the tile count of every config,
    so each program owns at least one tile and writes its whole row on every run."""
    t_min = min(_ntiles(B, H, W, th, tw) for th, tw, _, _ in _TILE_CONFIGS)
    budget = max(1, WS_BUDGET_FLOATS // (C * k * k))
    return max(1, min(t_min, MAX_ROWS, budget))


def _tile_grid(B, H, W, C):
    """One grid axis (limit 2^31 - 1): tiles x channel blocks."""
    return lambda META: _check_grid((_ntiles(B, H, W, META["TILE_H"], META["TILE_W"])
                                     * triton.cdiv(C, META["BLOCK_C"]),))


def global_grid(B, HW):
    return _check_grid((B * triton.cdiv(HW, _G_BLOCK_HW),))


def _view_flags(t):
    """(channel stride is 1, alignment of the other strides in elements) of a B x H x W x C view."""
    contig = t.stride(3) == 1 or t.shape[3] == 1
    return contig, _ctx_align(t) if contig else 1


def focal_context_bwd_triton(grad_out: torch.Tensor, ctx: torch.Tensor, gates: torch.Tensor,
                             weights: Sequence[torch.Tensor], pooled: torch.Tensor,
                             normalize: bool) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
    with device_guard(ctx.device):
        return _bwd(grad_out, ctx, gates, weights, pooled, normalize)


def _bwd(grad_out, ctx, gates, weights, pooled, normalize):
    B, H, W, C = ctx.shape
    L = len(weights)
    assert L >= 1 and gates.shape == (B, H, W, L + 1) and grad_out.shape == ctx.shape
    assert ctx.dtype in (torch.float32, torch.float16, torch.bfloat16)
    assert grad_out.dtype == ctx.dtype and gates.dtype == ctx.dtype
    ks = [int(w.shape[-1]) for w in weights]
    for w, k in zip(weights, ks):
        assert w.shape == (C, k, k) and k % 2 == 1 and w.dtype == torch.float32 and w.is_contiguous()
    dev = ctx.device
    # tap-major copies [k, k, C] (C*k*k floats): contiguous weight loads along C in the kernels
    wt = [w.permute(1, 2, 0).contiguous() for w in weights]
    s = 1.0 / (L + 1) if normalize else 1.0
    HW = H * W
    sc = _size_class(H, W)
    d_contig, d_align = _view_flags(grad_out)

    grad_ctx = torch.empty((B, H, W, C), dtype=ctx.dtype, device=dev)
    grad_gates = torch.empty((B, H, W, L + 1), dtype=ctx.dtype, device=dev)
    pooled = pooled.to(device=dev, dtype=torch.float32).contiguous()

    # (1) global term: grad_gates[..., L] and dpool
    nblk = triton.cdiv(HW, _G_BLOCK_HW)
    dpart = torch.empty((B, nblk, C), dtype=torch.float32, device=dev)
    _launch(_bwd_global_kernel, global_grid(B, HW), (
        grad_out, *grad_out.stride(), gates, *gates.stride(), pooled, grad_gates, dpart,
        H, W, C, L, s), dict(
        BLOCK_HW=_G_BLOCK_HW, BLOCK_C=_G_BLOCK_C, EVEN_C=C % _G_BLOCK_C == 0,
        D_CONTIG=d_contig, D_ALIGN=d_align, num_warps=_G_NUM_WARPS, num_stages=_NUM_STAGES))
    dxg = (gelu_grad(pooled) * dpart.sum(1) * (s / HW)).contiguous()  # [B, C] fp32
    del dpart

    # (2) recompute x_1 .. x_{L-1} (fp32 scratch)
    grid = _tile_grid(B, H, W, C)
    xs = [ctx]
    for l in range(L - 1):
        src = xs[-1]
        dst = torch.empty((B, H, W, C), dtype=torch.float32, device=dev)
        contig, align = _view_flags(src)
        _launch(_dwconv_kernel, grid, (src, *src.stride(), wt[l], dst, B, H, W, C, sc), dict(
            K=ks[l], FLIP=False, GELU=True, SRC_CONTIG=contig, SRC_ALIGN=align))
        xs.append(dst)

    # (3) level steps, top down. dz_l goes into x_{l+1}'s buffer (free by then) or a new one (top).
    grad_w: List[torch.Tensor] = [None] * L  # type: ignore[list-item]
    dz_next = None
    for l in range(L - 1, -1, -1):
        top = l == L - 1
        dz = torch.empty((B, H, W, C), dtype=torch.float32, device=dev) if top else xs[l + 1]
        R = _rows(B, H, W, C, ks[l])
        ws = torch.empty((R, ks[l], ks[l], C), dtype=torch.float32, device=dev)
        x = xs[l]
        _launch(_bwd_step_kernel, _check_grid((R,)), (
            x, *x.stride(), wt[l],
            dz if top else dz_next, *dz.stride()[:3], wt[l] if top else wt[l + 1],
            grad_out, *grad_out.stride(), gates, *gates.stride(),
            dxg, dz, grad_gates, ws,
            B, H, W, C, R, l, L, s, sc, 0), dict(
            KOUT=ks[l], KIN=1 if top else ks[l + 1], TOP=top))
        # second, fixed-order stage of the weight-gradient reduction
        grad_w[l] = ws.sum(0).permute(2, 0, 1).contiguous()
        del ws
        if not top:
            xs[l + 1] = None  # its buffer now holds dz_l
        dz_next = dz

    # (4) grad_ctx = conv_transpose(dz_0, w_0)
    _launch(_dwconv_kernel, grid, (dz_next, *dz_next.stride(), wt[0], grad_ctx, B, H, W, C, sc),
            dict(K=ks[0], FLIP=True, GELU=False, SRC_CONTIG=True, SRC_ALIGN=_ctx_align(dz_next)))
    return grad_ctx, grad_gates, grad_w


def _launch(kernel, grid, args, kwargs):
    # the forward module's launch point (one hook records both modules' launches)
    return _fwd_launch(kernel, grid, args, kwargs)


# --------------------------------------------------------------------------------------------
# kernels for the compile report (format: focal_context_fwd.py's top docstring; read by
# focalnet_kernels/report.py). Representative specialisations: bf16 (the training dtype), the
# LRF kernel sizes (3, 5, 7) for every shipped config, the detection sizes (.., 13, 15) for the
# big-tile config, and fp32 once. Channel strides are 1 in the production layouts (f-output slice,
# contiguous grad_out, scratch), and Triton specialises an integer argument equal to 1 to a
# constant, so they are given as constexprs = 1.
# --------------------------------------------------------------------------------------------
_D16 = [["tt.divisibility", 16]]


def _raw(kernel):
    """The @triton.jit function under the autotune/heuristics wrappers."""
    while type(kernel).__name__ in ("Autotuner", "Heuristics"):
        kernel = kernel.fn
    return kernel


def _cfg_label(th, tw, bc, nw):
    return f"{th}x{tw} c{bc} w{nw} s{_NUM_STAGES}"


def _valign(dt):
    return 4 if dt == "*fp32" else 8  # one 16-byte vector in elements


def _report_global(dt):
    sig = {"dout_ptr": dt, "g_ptr": dt, "pooled_ptr": "*fp32", "gg_ptr": dt, "dpart_ptr": "*fp32"}
    sig.update({n: "i32" for n in ("sdb", "sdh", "sdw", "sdc", "sgb", "sgh", "sgw", "sgc", "H", "W", "C",
                                   "LEVELS")})
    sig["scale"] = "fp32"
    return {
        "name": f"bwd_global[{dt[1:]}]",
        "config": f"p{_G_BLOCK_HW} c{_G_BLOCK_C} w{_G_NUM_WARPS} s{_NUM_STAGES}",
        "fn": _bwd_global_kernel,
        "signature": sig,
        "constexprs": {"BLOCK_HW": _G_BLOCK_HW, "BLOCK_C": _G_BLOCK_C, "EVEN_C": True,
                       "D_CONTIG": True, "D_ALIGN": _valign(dt)},
        "attrs": {n: _D16 for n in ("dout_ptr", "g_ptr", "pooled_ptr", "gg_ptr", "dpart_ptr")},
        "num_warps": _G_NUM_WARPS, "num_stages": _NUM_STAGES,
    }


def _report_dwconv(dt, cfg, k, final):
    th, tw, bc, nw = cfg
    # recompute: ctx (a slice view of the f output: unaligned row strides) -> fp32 scratch;
    # final: fp32 dz_0 scratch -> grad_ctx in the ctx dtype
    src, dst = ("*fp32", dt) if final else (dt, "*fp32")
    sig = {"src_ptr": src, "w_ptr": "*fp32", "dst_ptr": dst}
    sig.update({n: "i32" for n in ("s_b", "s_h", "s_w", "s_c", "B", "H", "W", "C", "size_class")})
    attrs = {n: _D16 for n in ("src_ptr", "w_ptr", "dst_ptr")}
    return {
        "name": f"bwd_{'grad_ctx' if final else 'recompute'}[{dt[1:]} k={k}]",
        "config": _cfg_label(*cfg),
        "fn": _raw(_dwconv_kernel),
        "signature": sig,
        "constexprs": {"K": k, "FLIP": final, "GELU": not final, "SRC_CONTIG": True,
                       "SRC_ALIGN": 4 if final else 1,
                       "TILE_H": th, "TILE_W": tw, "BLOCK_C": bc, "EVEN_C": True},
        "attrs": attrs,
        "num_warps": nw, "num_stages": _NUM_STAGES,
    }


def _report_step(dt, cfg, kout, kin):
    th, tw, bc, nw = cfg
    top = kin == 0
    sig = {"x_ptr": "*fp32", "w_ptr": "*fp32", "dzin_ptr": "*fp32", "win_ptr": "*fp32", "dout_ptr": dt,
           "g_ptr": dt, "dxg_ptr": "*fp32", "dz_ptr": "*fp32", "gg_ptr": dt, "ws_ptr": "*fp32"}
    sig.update({n: "i32" for n in ("sxb", "sxh", "sxw", "szb", "szh", "szw", "sdb", "sdh", "sdw",
                                   "sgb", "sgh", "sgw", "B", "H", "W", "C", "R", "LEVEL", "LEVELS",
                                   "size_class", "kz")})
    sig["scale"] = "fp32"
    # x_l is the fp32 scratch (L >= 2), dz_{l+1} too: contiguous, aligned strides (still
    # specialised in this kernel, see _NO_SPEC_STEP)
    attrs = {n: _D16 for n in ("x_ptr", "w_ptr", "dzin_ptr", "win_ptr", "dout_ptr", "g_ptr", "dxg_ptr",
                               "dz_ptr", "gg_ptr", "ws_ptr", "C", "sxb", "sxh", "sxw", "szb", "szh",
                               "szw", "sdb", "sdh", "sdw", "kz")}
    return {
        "name": f"bwd_step[{dt[1:]} k={kout}{' top' if top else f' up={kin}'}]",
        "config": _cfg_label(*cfg),
        "fn": _raw(_bwd_step_kernel),
        "signature": sig,
        "constexprs": {"sxc": 1, "sdc": 1, "sgc": 1, "KOUT": kout, "KIN": max(kin, 1), "TOP": top,
                       "TILE_H": th, "TILE_W": tw, "BLOCK_C": bc, "EVEN_C": True},
        "attrs": attrs,
        "num_warps": nw, "num_stages": _NUM_STAGES,
    }


def _report_kernels():
    # the step kernel at the configs it runs (_step_configs: the fp32 channel block is capped)
    out = [_report_global("*bf16")]
    for cfg, scfg in zip(_TILE_CONFIGS, _step_configs(2)):
        out += [_report_dwconv("*bf16", cfg, 3, False), _report_step("*bf16", scfg, 7, 0),
                _report_step("*bf16", scfg, 5, 7), _report_dwconv("*bf16", cfg, 3, True)]
    big = max(_step_configs(2), key=lambda c: c[0] * c[1])
    out += [_report_step("*bf16", big, 15, 0), _report_step("*bf16", big, 13, 15)]
    base = _TILE_CONFIGS[0]
    f32 = _step_configs(4)
    out += [_report_step("*fp32", f32[0], 7, 0)] + [_report_step("*fp32", c, 5, 7) for c in f32]
    out += [_report_dwconv("*fp32", base, 3, True)]
    # 1 x 1 maps (and H = 1 or W = 1) as Triton specialised them before the shape arguments were
    # unspecialised, sm_90 only: the kernels must compile with constant shapes too
    # (the step kernel is left out: a constant W = 1 made ptxas 13.4 spill 48 B there, and launches
    # never produce it now that H and W are unspecialised; H = W = 1 compiled spill-free)
    for e in (_report_global("*bf16"), _report_dwconv("*bf16", base, 3, False),
              _report_dwconv("*bf16", base, 3, True)):
        out += [_const_ones(e, ("H", "W"), "H=W=1"), _const_ones(e, ("H",), "H=1"), _const_ones(e, ("W",), "W=1")]
    return out


REPORT_KERNELS = _report_kernels()
