// Kernels of the CUDA focal-context backend (included by focal_context_cuda.cu only).
//
// Forward:  fc_fused_kernel (one launch per level segment; usually one segment = all levels)
//           -> fc_pool_finish_kernel -> fc_fwd_epilogue_kernel.
// Backward: fc_mma_fwd_kernel<..., REC> (fp16/bf16 SRF/LRF, fc_mma.cuh) and / or fc_fused_kernel in
//           recompute mode (x_1..x_{L-1} into the workspace, L >= 2)
//           -> fc_bwd_prep_kernel -> fc_dpool_finish_kernel
//           -> fc_bwd_level_kernel (or fc_bwd_level_mma_kernel of fc_bwd_mma.cuh) for l = L-1 .. 0
//           -> fc_gates_finish_kernel, fc_gw_finish_kernel.
// Every reduction is two-stage with a fixed order (no atomics): results are bit-reproducible.
#pragma once

#include <type_traits>

#include "fc_device.cuh"

namespace focalnet {
namespace fcc {

// ==========================================================================================
// Fused multi-level forward over one segment [l0, l0+nl) of levels.
//
// Block = (image b, spatial tile TH x TW, 8 channels). The tile plus the segment halo
// R[0] = sum_j k_j/2 of x_{l0} is staged once in shared memory (fp32, zero outside the image);
// level j is then computed from shared memory on the region tile + R[j+1] (shrinking), its
// out-of-image positions set to 0 (zero padding of the next level, never recomputed values),
// and written to the other ping-pong buffer (the last level's output too: the tile region).
//
// Conv items (fused_conv_level): a warp = 4 rows x 8 channels, each thread a strip of V
// consecutive outputs of one row and channel (V = FV = 8 or FV_SHORT = 4, per level, whichever
// the planner finds wastes less on rounding the region's width); with compile-time k the k*k
// weights of the thread's channel live in registers for the whole level and the taps are fully
// unrolled: per kernel row, V+k-1 shared-memory loads (immediate offsets from one row pointer)
// feed k*V FFMAs. No per-tap bounds checks: buffers are zero-padded at the image border, and
// every item stores all V outputs unconditionally (the pitches leave room for the last strip),
// the border zeroing being one select per output: values at columns >= the region's
// width or at clamped rows only ever feed outputs that are themselves outside the next region,
// never a tile position, so they are never used (the emulator fills shared memory with NaN).
//
// Tile pass (tile_pass, after each level): the thread owns the tile positions
// (ti0 + m * rstep, tj0), m < PSLOTS, of its channel, and keeps the gated sum of those
// positions in registers across the levels (acc[m] = fma(g_l, x_{l+1}, acc[m]), in level order);
// the pooled partial of the last level and the workspace stores (segment boundary, or recompute
// mode for the backward) are done there too. The out / workspace stores are per element.
//
// Dynamic SASS instructions per output element (FC_FWD_COUNT), sm_90, nvcc 13.0 -O3, FocalNet-T
// stage 1 LRF: B=256, 56x56x96, k = 3,5,7, bf16, ctx/gates strided slices (pixel stride 196).
// Method: nvdisasm of fc_fused_kernel<bf16,3,3,5,7>; each basic-block range x its warp executions
// per block (loops: trip counts from the tile geometry; the branches not taken for this case --
// fp32 source, multi-segment and workspace paths -- excluded; conditional blocks inside taken
// ranges counted as taken, so an upper bound), x 32 / (tile pixels x 8 channels).
//   before (28x14 tile; figures of issue 11): ~718 = 170 FFMA + 256 int/address + 33 moves
//     + 60 control + 46 select + ~153 other (LDS, MUFU, LDG, ...); 64 regs, 93 KB smem.
//   after (28x14 tile, strips 8/4/8 for k = 3/5/7): ~523 = 166 FFMA + 138 int/address (uniform
//     included) + 17 moves + 9 control + 58 select/predicate + 57 LDS + 8 STS + 42 other fp
//     (GELU's FMUL/FADD) + 6 MUFU + 13 LDG/LDC + 7 convert + 1 STG; 128 regs (no spills),
//     74.6 KB smem. By region: conv levels 120 + 144 + 117 (taps, row loads, and per conv output
//     ~25 of GELU (erff) + border select + store), tile passes 14 + 15 + 11, staging 36 (8-byte
//     loads), gates 26, weights and index math 22, output 16.
// What remains is mostly GELU and halo: 5.5 conv outputs per element (28x14 tile + halo 5/3/0,
// strips rounded), each ~25 instructions of GELU, i.e. ~135 of the 523; taps 133 FFMA (83 without
// the halo).
//   GELU as 2^P(|x|) (gelu_f in fc_device.cuh: 8 FFMA + MUFU.EX2 + 4, instead of erff): counted
//   by the cost model (python -m focalnet_kernels.cost_model; its per-class counts of this kernel,
//   all blocks' warp-instructions x 32 / elements, an upper bound of the above method: it counts
//   conditional blocks inside loops as taken), before -> after: total 659.7 -> 585.0 = FFMA
//   169.8 -> 175.2 (the polynomial), other fp (FSETP/FSEL/FMNMX...) 63.6 -> 14.8, FMUL 23.0 -> 6.7,
//   FADD 17.4 -> 12.0, int 209.2 -> 200.9, MUFU 6.7 -> 6.7, LDS 77.3, moves 40.4 -> 40.5,
//   control 20.9, HFMA2 3.9 -> 3.0; i.e. ~75 fewer per element (~14 per conv output), so ~523 ->
//   ~450 by the hand count above. 128 registers (sm_90; 127 sm_80), 0 spills, 74.6 KB smem;
//   predicted kernel time 1.527 -> 1.354 ms (issue-bound; + 0.172 ms epilogue).
// ==========================================================================================
struct FusedParams {
  int64_t B, H, W, C;
  int L, l0, nl;
  int k[4];
  int R[5];          // R[j]: halo of the buffer holding x_{l0+j}; R[nl] = 0
  int pitch[5];      // pitch (positions) of the buffer holding x_{l0+j} (j = 0..nl), odd
  int TH, TW, accP, ntw, ntiles, cblocks;
  int offA, offB, offW[4], offG, offRed;   // shared-memory offsets in floats
  const void* src;   // x_{l0}: ctx (dtype T, any strides) when src_is_ws == 0, else a workspace level map
  int64_t ss[4];
  int src_is_ws, src_vec;
  int src_vec8;      // 16-bit src: 8-byte loads of 4 channels are legal (when src_vec is not)
  const void* gates;
  int64_t gs[4];
  const float* w[4]; // weights of the segment's levels, [C][k][k]
  int fwd;           // 1: forward (gated sum, out, pooled partials); 0: recompute (store levels only)
  int acc_in, final_out;
  float* acc_ws;     // fp32 contiguous B x H x W x C running gated sum (multi-segment forward)
  void* X[5];        // X[l]: contiguous map of level l (1 <= l <= L-1) of WsT<T>, where needed
  int xmask;         // bit j: store x_{l0+j+1} into X[l0+j+1]
  int vmask;         // bit j: level j computes strips of FV_SHORT outputs (else FV)
  void* out;
  int out_vec;
  float* pool_part;  // [B][ntiles][C]
  float scale;
  const int* run_if; // non-null: the launch is the tensor-core forward's fallback; return unless *run_if
};

// Forward staging of x_{l0} (rows x cols positions from image origin gh0, gw0) into buffer A, one
// thread per position and 8 channels: the position walks by NT with an incremental (row, column)
// instead of a division per position; unit channel stride gets immediate load offsets, and 16-bit
// sources with 8-byte aligned positions use two 8-byte loads (VEC8).
template <typename E, bool VEC8>
__device__ __forceinline__ void stage_src(float* __restrict__ buf, int pitch, int rows, int cols, int gh0, int gw0,
                                          const E* __restrict__ src, const int64_t (&st)[4], int64_t b,
                                          int64_t c0, int nvalid, bool vec, int H, int W) {
  const E* base = src + b * st[0] + c0 * st[3];
  const int dr = NT / cols, ds = NT - dr * cols;
  int r = threadIdx.x / cols;
  int s = threadIdx.x - r * cols;
  const bool unit = st[3] == 1;
  while (r < rows) {
    const int gh = gh0 + r, gw = gw0 + s;
    float v[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = 0.f;
    if ((unsigned)gh < (unsigned)H && (unsigned)gw < (unsigned)W) {
      const E* p = base + (int64_t)gh * st[1] + (int64_t)gw * st[2];
      if constexpr (VEC8) {
        if (nvalid == CB) {
          const uint2 u0 = *reinterpret_cast<const uint2*>(p);
          const uint2 u1 = *reinterpret_cast<const uint2*>(p + 4);
          const float2 f0 = unpack2(u0.x, p), f1 = unpack2(u0.y, p), f2 = unpack2(u1.x, p), f3 = unpack2(u1.y, p);
          v[0] = f0.x; v[1] = f0.y; v[2] = f1.x; v[3] = f1.y;
          v[4] = f2.x; v[5] = f2.y; v[6] = f3.x; v[7] = f3.y;
        } else {
#pragma unroll
          for (int i = 0; i < 8; ++i)
            if (i < nvalid) v[i] = to_f<E>(p[i]);
        }
      } else if (vec) {
        load8<E>(p, 0, 1, CB, true, v);
      } else if (unit) {
#pragma unroll
        for (int i = 0; i < 8; ++i)
          if (i < nvalid) v[i] = to_f<E>(p[i]);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i)
          if (i < nvalid) v[i] = to_f<E>(p[i * st[3]]);
      }
    }
    sm_store8(buf + (r * pitch + s) * CB, v);
    s += ds;
    r += dr;
    if (s >= cols) {
      s -= cols;
      ++r;
    }
  }
}

// FV consecutive outputs of one row of one channel, compile-time k, weights in registers:
//   a[v] = sum_{i,j<K} w[i*K+j] * p[(i*rs) + (v+j)*CB]      (same summation order as conv_item)
template <int K, int V>
__device__ __forceinline__ void conv_strip_fix(const float* __restrict__ p, int rs, const float (&w)[K * K],
                                               float (&a)[V]) {
#pragma unroll
  for (int v = 0; v < V; ++v) a[v] = 0.f;
#pragma unroll
  for (int i = 0; i < K; ++i) {
    const float* row = p + i * rs;
    float xr[V + K - 1];
#pragma unroll
    for (int t = 0; t < V + K - 1; ++t) xr[t] = row[t * CB];
#pragma unroll
    for (int j = 0; j < K; ++j)
#pragma unroll
      for (int v = 0; v < V; ++v) a[v] = fmaf(w[i * K + j], xr[v + j], a[v]);
  }
}

// Level j of the segment: x_{l0+j+1} on region tile + R[j+1] into the other ping-pong buffer.
template <int KMAX, bool KFIX, int V>
__device__ __forceinline__ void fused_conv_level_v(const FusedParams& P, float* sm, int j, int k, int h0, int w0) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int c = threadIdx.x & (CB - 1);
  const int g4 = lane / CB;
  const unsigned H = (unsigned)P.H, W = (unsigned)P.W;
  const float* src = sm + ((j & 1) ? P.offB : P.offA) + c;
  float* dst = sm + ((j & 1) ? P.offA : P.offB) + c;
  const int sp = P.pitch[j], dp = P.pitch[j + 1];
  const int Ro = P.R[j + 1];
  const int orows = P.TH + 2 * Ro, ocols = P.TW + 2 * Ro;
  const int nchunk = (ocols + V - 1) / V;
  const int nitems = ((orows + GPW - 1) / GPW) * nchunk;
  const float* wt = sm + P.offW[j] + c;
  // weights in registers up to k = 7 (49 registers); larger kernels read them from shared memory
  // per tap (k loads per kernel row) to stay within the 128 registers of 2 blocks per SM
  constexpr bool WREG = KFIX && KMAX <= 7;
  float wr[WREG ? KMAX * KMAX : 1];
  if constexpr (WREG) {
#pragma unroll
    for (int t = 0; t < KMAX * KMAX; ++t) wr[t] = wt[t * CB];
  }
  for (int it = warp; it < nitems; it += NWARP) {
    const int rq = it / nchunk;
    const int ch = it - rq * nchunk;
    const int rr = min(rq * GPW + g4, orows - 1);  // rows past the region recompute the last row
    const int s0 = ch * V;
    float a[V];
    if constexpr (WREG)
      conv_strip_fix<KMAX, V>(src + (rr * sp + s0) * CB, sp * CB, wr, a);
    else
      conv_item<KMAX, KFIX, V, false>(src, sp, wt, k, rr, s0, a);
    const bool hin = (unsigned)(h0 - Ro + rr) < H;
    const int gw0 = w0 - Ro + s0;
    float* d = dst + (rr * dp + s0) * CB;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const float x = gelu_f(a[v]);
      d[v * CB] = (hin && (unsigned)(gw0 + v) < W) ? x : 0.f;
    }
  }
  __syncthreads();
}

// The planner picks the strip length of each level (bit j of vmask: FV_SHORT instead of FV), the one
// that wastes fewer outputs on the rounding of the region's width.
template <int KMAX, bool KFIX>
__device__ __forceinline__ void fused_conv_level(const FusedParams& P, float* sm, int j, int k, int h0, int w0) {
  if ((P.vmask >> j) & 1)
    fused_conv_level_v<KMAX, KFIX, FV_SHORT>(P, sm, j, k, h0, w0);
  else
    fused_conv_level_v<KMAX, KFIX, FV>(P, sm, j, k, h0, w0);
}

// The thread's tile positions: (ti0 + m * rstep, tj0) for m < nslot (a prefix of the PSLOTS slots).
struct TileSlots {
  int ti0, tj0, rstep, nslot;
  int64_t g0, gstep;  // element offset (b, h0 + ti0, w0 + tj0, c0 + c) in a contiguous B,H,W,C map; per slot
};

// After level j: gated sum, pooled partial and workspace store (WT: the level maps' type) at the
// thread's tile positions.
template <typename WT>
__device__ __forceinline__ void tile_pass(const FusedParams& P, const float* sm, int j, const TileSlots& S,
                                          bool cok, float (&acc)[PSLOTS], float& psum) {
  const int c = threadIdx.x & (CB - 1);
  const int gl = P.l0 + j;
  const bool fwd = P.fwd != 0;
  const bool last_global = fwd && (gl == P.L - 1);
  WT* Xo = ((P.xmask >> j) & 1) ? static_cast<WT*>(P.X[gl + 1]) : nullptr;
  if (!fwd && Xo == nullptr) return;
  const int Ro = P.R[j + 1], dp = P.pitch[j + 1];
  const float* x = sm + ((j & 1) ? P.offA : P.offB) + ((S.ti0 + Ro) * dp + S.tj0 + Ro) * CB + c;
  const int xstep = S.rstep * dp * CB;
  const float* g = sm + P.offG + j * P.TH * P.accP + S.ti0 * P.accP + S.tj0;
  const int gstep = S.rstep * P.accP;
  // Every slot loads unconditionally (the planner sizes shared memory so that the PSLOTS slot
  // addresses of every buffer and of the gate table stay inside it): slots >= nslot accumulate
  // values that are never stored, and only the pooled sum needs the slot predicate.
  if (last_global) {
    int ns = S.nslot;
    FC_OPAQUE(ns);
#pragma unroll
    for (int m = 0; m < PSLOTS; ++m) {
      const float xv = x[m * xstep];
      acc[m] = fmaf(g[m * gstep], xv, acc[m]);
      psum += (m < ns) ? xv : 0.f;
    }
  } else if (fwd) {
#pragma unroll
    for (int m = 0; m < PSLOTS; ++m) acc[m] = fmaf(g[m * gstep], x[m * xstep], acc[m]);
  }
  if (Xo != nullptr && cok) {
#pragma unroll
    for (int m = 0; m < PSLOTS; ++m)
      if (m < S.nslot) Xo[S.g0 + m * S.gstep] = from_f<WT>(x[m * xstep]);
  }
}

template <typename T, int LC, int K0, int K1, int K2, int K3>
__global__ void __launch_bounds__(NT, 2) fc_fused_kernel(const FusedParams P) {
  if (P.run_if != nullptr && *P.run_if == 0) return;
  FC_DYN_SMEM(sm);
  const int tid = threadIdx.x;
  // 32-bit index math: the host keeps the grid below 2^31 blocks
  unsigned bid = blockIdx.x;
  const int cb = (int)(bid % (unsigned)P.cblocks);
  bid /= (unsigned)P.cblocks;
  const int tile = (int)(bid % (unsigned)P.ntiles);
  const int64_t b = bid / (unsigned)P.ntiles;
  const int TH = P.TH, TW = P.TW, accP = P.accP;
  const int tr = (int)((unsigned)tile / (unsigned)P.ntw);
  const int h0 = tr * TH, w0 = (tile - tr * P.ntw) * TW;
  const int64_t c0 = (int64_t)cb * CB;
  const int nvalid = (int)((P.C - c0) < CB ? (P.C - c0) : CB);
  const int nl = LC > 0 ? LC : P.nl;
  const int H = (int)P.H, W = (int)P.W;
  const int c = tid & (CB - 1);
  const bool cok = c < nvalid;

  // weights of the segment, transposed to [tap][CB]; channels >= nvalid are 0
  for (int j = 0; j < nl; ++j) {
    const int kk = P.k[j] * P.k[j];
    float* wd = sm + P.offW[j] + c;
    const float* wsrc = P.w[j] + (c0 + (cok ? c : 0)) * kk;
#pragma unroll 1
    for (int tap = tid / CB; tap < kk; tap += NGRP) wd[tap * CB] = cok ? wsrc[tap] : 0.f;
  }
  // the thread's tile positions (planner: TW <= 32, TH * tile_wp(TW) <= 32 * PSLOTS)
  TileSlots S;
  {
    const int twp = tile_wp(TW);
    const int pl = tid / CB;
    S.rstep = 32 / twp;
    S.ti0 = pl / twp;
    S.tj0 = pl - S.ti0 * twp;
    const int nvr = min(TH, H - h0) - S.ti0;  // image rows of the tile left from ti0
    const bool colok = S.tj0 < min(TW, W - w0);
    S.nslot = (colok && nvr > 0) ? min(PSLOTS, (nvr + S.rstep - 1) / S.rstep) : 0;
    S.g0 = ((b * P.H + h0 + S.ti0) * P.W + w0 + S.tj0) * P.C + c0 + c;
    S.gstep = (int64_t)S.rstep * P.W * P.C;
  }
  // gates of the segment's levels at the tile positions: thread (slots, c) loads level c of its
  // slots (8 threads share a position; lanes c >= nl idle)
  if (P.fwd && c < nl) {
    const T* gp = static_cast<const T*>(P.gates) + b * P.gs[0] + (int64_t)(h0 + S.ti0) * P.gs[1] +
                  (int64_t)(w0 + S.tj0) * P.gs[2] + (int64_t)(P.l0 + c) * P.gs[3];
    const int64_t gpstep = (int64_t)S.rstep * P.gs[1];
    float* gd = sm + P.offG + c * TH * accP + S.ti0 * accP + S.tj0;
    const int gdstep = S.rstep * accP;
    int ns = S.nslot;
    FC_OPAQUE(ns);
#pragma unroll
    for (int m = 0; m < PSLOTS; ++m) {
      if (m < ns) gd[m * gdstep] = to_f<T>(*gp);
      gp += gpstep;
    }
  }
  {
    const int R0 = P.R[0];
    const int rows = TH + 2 * R0, cols = TW + 2 * R0;
    const bool vec = P.src_vec && nvalid == CB;
    using WT = WsT<T>;
    if (!std::is_same<WT, T>::value && P.src_is_ws)  // (a bf16 map is read as ctx is, below)
      stage_src<WT, false>(sm + P.offA, P.pitch[0], rows, cols, h0 - R0, w0 - R0,
                           static_cast<const WT*>(P.src), P.ss, b, c0, nvalid, vec, H, W);
    else if (sizeof(T) == 2 && !vec && P.src_vec8)
      stage_src<T, sizeof(T) == 2>(sm + P.offA, P.pitch[0], rows, cols, h0 - R0, w0 - R0,
                                   static_cast<const T*>(P.src), P.ss, b, c0, nvalid, vec, H, W);
    else
      stage_src<T, false>(sm + P.offA, P.pitch[0], rows, cols, h0 - R0, w0 - R0, static_cast<const T*>(P.src),
                          P.ss, b, c0, nvalid, vec, H, W);
  }

  float acc[PSLOTS];
#pragma unroll
  for (int m = 0; m < PSLOTS; ++m) acc[m] = 0.f;
  if (P.fwd && P.acc_in && cok) {
    const float* ap = P.acc_ws + S.g0;
#pragma unroll
    for (int m = 0; m < PSLOTS; ++m)
      if (m < S.nslot) acc[m] = ap[m * S.gstep];
  }
  __syncthreads();

  float psum = 0.f;
  if constexpr (LC == 0) {
    for (int j = 0; j < nl; ++j) {
      fused_conv_level<KMAX_ALL, false>(P, sm, j, P.k[j], h0, w0);
      tile_pass<WsT<T>>(P, sm, j, S, cok, acc, psum);
    }
  } else {
    fused_conv_level<K0, true>(P, sm, 0, K0, h0, w0);
    tile_pass<WsT<T>>(P, sm, 0, S, cok, acc, psum);
    if constexpr (LC > 1) {
      fused_conv_level<K1, true>(P, sm, 1, K1, h0, w0);
      tile_pass<WsT<T>>(P, sm, 1, S, cok, acc, psum);
    }
    if constexpr (LC > 2) {
      fused_conv_level<K2, true>(P, sm, 2, K2, h0, w0);
      tile_pass<WsT<T>>(P, sm, 2, S, cok, acc, psum);
    }
    if constexpr (LC > 3) {
      fused_conv_level<K3, true>(P, sm, 3, K3, h0, w0);
      tile_pass<WsT<T>>(P, sm, 3, S, cok, acc, psum);
    }
  }

  if (!P.fwd) return;
  if (P.final_out) {
    // pooled partial of this tile: per channel, the 32 position lanes summed in a fixed order
    float* red = sm + P.offRed;
    red[tid] = psum;
    __syncthreads();
    if (tid < nvalid) {
      float t = 0.f;
      for (int g = 0; g < NGRP; ++g) t += red[g * CB + tid];
      P.pool_part[(b * P.ntiles + tile) * P.C + c0 + tid] = t;
    }
  }
  if (!cok) return;
  int ns = S.nslot;
  FC_OPAQUE(ns);
  if (P.final_out) {
    T* o = static_cast<T*>(P.out) + S.g0;
    const float scale = P.scale;
#pragma unroll
    for (int m = 0; m < PSLOTS; ++m) {
      if (m < ns) *o = from_f<T>(acc[m] * scale);
      o += S.gstep;
    }
  } else {
    float* o = P.acc_ws + S.g0;
#pragma unroll
    for (int m = 0; m < PSLOTS; ++m) {
      if (m < ns) *o = acc[m];
      o += S.gstep;
    }
  }
}

// pooled[b,c] = sum of the tile partials (fixed order, fp64) / (H*W); gp = GELU(pooled)
// (With the tensor-core forward: its partials part/ntiles, unless *flag asks for the FMA fallback's
// alt/alt_ntiles.)
__global__ void __launch_bounds__(NT) fc_pool_finish_kernel(const float* __restrict__ part, int ntiles, int64_t B,
                                                             int64_t C, double inv_hw, float* __restrict__ pooled,
                                                             float* __restrict__ gp, const int* __restrict__ flag,
                                                             const float* __restrict__ alt, int alt_ntiles) {
  if (flag != nullptr && *flag != 0) {
    part = alt;
    ntiles = alt_ntiles;
  }
  const int64_t n = B * C;
  for (int64_t idx = blockIdx.x * (int64_t)NT + threadIdx.x; idx < n; idx += (int64_t)gridDim.x * NT) {
    const int64_t b = idx / C, c = idx - b * C;
    double s = 0.0;
    for (int t = 0; t < ntiles; ++t) s += (double)part[(b * ntiles + t) * C + c];
    const float m = (float)(s * inv_hw);
    pooled[idx] = m;
    gp[idx] = gelu_f(m);
  }
}

// out[b,h,w,c] += scale * g[b,h,w,L] * GELU(pooled[b,c]); one thread per (position, cpt blocks of 8
// channels): the gate is loaded once per cpt x 8 channels
template <typename T>
__global__ void __launch_bounds__(NT) fc_fwd_epilogue_kernel(T* __restrict__ out, int64_t npos, int64_t H, int64_t W,
                                                              int64_t C, const T* __restrict__ gates, int64_t gs0,
                                                              int64_t gs1, int64_t gs2, int64_t gs3, int L,
                                                              const float* __restrict__ gp, float scale, int vec,
                                                              int cpt) {
  const int64_t nch = (C + CB - 1) / CB;
  const int64_t nchunk = (nch + cpt - 1) / cpt;
  const int64_t n = npos * nchunk;
  const int64_t HW = H * W;
  for (int64_t idx = blockIdx.x * (int64_t)NT + threadIdx.x; idx < n; idx += (int64_t)gridDim.x * NT) {
    const int64_t pos = idx / nchunk, chunk = idx - pos * nchunk;
    const int64_t b = pos / HW, hw = pos - b * HW;
    const int64_t h = hw / W, w = hw - h * W;
    const float g = scale * to_f<T>(gates[b * gs0 + h * gs1 + w * gs2 + (int64_t)L * gs3]);
    const int64_t cb0 = chunk * cpt;
    const int ncb = (int)((nch - cb0) < cpt ? (nch - cb0) : cpt);
    for (int j = 0; j < ncb; ++j) {
      const int64_t c0 = (cb0 + j) * CB;
      const int nvalid = (int)((C - c0) < CB ? (C - c0) : CB);
      float v[8];
      const int64_t off = pos * C + c0;
      const bool vv = vec && nvalid == CB;
      load8<T>(out, off, 1, nvalid, vv, v);
      const float* gpp = gp + b * C + c0;
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (i < nvalid) v[i] = fmaf(g, gpp[i], v[i]);
      store8<T>(out, off, nvalid, vv, v);
    }
  }
}

// ==========================================================================================
// Backward preparation (level independent), block = (image, PREP_POS positions, 8 channels); a thread
// owns positions tid, tid + NT, ... of the chunk with the block's 8 channels of each (one 16-byte load
// of dout when it is channel-contiguous and aligned):
//   dp_part[b][chunk][c]        = sum_{positions} dout * g_L               (for dpool)
//   gg[cb][L][b,h,w]            = sum_{c in block} dout * GELU(pooled)     (global gate partial)
// Per thread and position: one dout vector, one gate, 16 FFMA, one store (the earlier layout, a thread
// per channel, loaded the gate 8 times and reduced the gate partial with shuffles: ~155 instructions
// per element by the cost model, int-bound).
// ==========================================================================================
constexpr int PREP_POS = 4 * NT;

struct PrepParams {
  int64_t B, H, W, C;
  int L, cblocks;
  int64_t nchunk;
  const void* dout;
  int64_t ds[4];
  int dout_vec;
  const void* gates;
  int64_t gs[4];
  const float* pooled;
  float* gg;
  float* dp_part;
};

// WIDE: positions need 64-bit arithmetic (H * W + PREP_POS >= 2^31); else 32-bit position math.
// FLAT: dout's and the gates' rows follow each other (stride[1] = W * stride[2], as in contiguous maps and
// slices of the f projection's output): position q is at q * stride[2], no division by W.
template <typename T, bool WIDE, bool FLAT = false>
__global__ void __launch_bounds__(NT) fc_bwd_prep_kernel(const PrepParams P) {
  FC_DYN_SMEM(red);  // CB floats of GELU(pooled), then NWARP * CB partial sums
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // 32-bit block index math (a 64-bit division is a ~70-instruction subroutine): the grid is below 2^31
  unsigned bid = blockIdx.x;
  const int cb = (int)(bid % (unsigned)P.cblocks);
  bid /= (unsigned)P.cblocks;
  const int64_t chunk = bid % (unsigned)P.nchunk;
  const int64_t b = bid / (unsigned)P.nchunk;
  const int64_t c0 = (int64_t)cb * CB;
  const int nvalid = (int)((P.C - c0) < CB ? (P.C - c0) : CB);
  const int64_t HW = P.H * P.W;
  const int64_t BHW = P.B * HW;
  const T* dout = static_cast<const T*>(P.dout);
  const T* gates = static_cast<const T*>(P.gates);
  const bool vec = P.dout_vec && nvalid == CB;
  float* gsm = red + NWARP * CB;
  if (tid < CB) gsm[tid] = (tid < nvalid) ? gelu_f(P.pooled[b * P.C + c0 + tid]) : 0.f;
  __syncthreads();
  float G[CB], dsum[CB];
#pragma unroll
  for (int i = 0; i < CB; ++i) {
    G[i] = gsm[i];
    dsum[i] = 0.f;
  }
  using Pos = typename std::conditional<WIDE, int64_t, int>::type;
  const Pos Wp = (Pos)P.W, HWp = (Pos)HW;
  const T* dimg = dout + b * P.ds[0] + c0 * P.ds[3];
  const T* gimg = gates + b * P.gs[0] + (int64_t)P.L * P.gs[3];
  float* ggimg = P.gg + ((int64_t)cb * (P.L + 1) + P.L) * BHW + b * HW;
  auto accumulate = [&](Pos q, const float (&d)[CB], float gl) {
    float prod = 0.f;
#pragma unroll
    for (int i = 0; i < CB; ++i) {
      dsum[i] = fmaf(d[i], gl, dsum[i]);
      prod = fmaf(d[i], G[i], prod);
    }
    ggimg[q] = prod;
  };
  if constexpr (FLAT) {
    // incremental pointers, NT positions per step
    const Pos q0 = (Pos)(chunk * PREP_POS) + tid;
    const T* dq = dimg + (int64_t)q0 * P.ds[2];
    const T* gq = gimg + (int64_t)q0 * P.gs[2];
    const int64_t dstep = (int64_t)NT * P.ds[2], gstep = (int64_t)NT * P.gs[2];
#pragma unroll 1
    for (int m = 0; m < PREP_POS / NT; ++m, dq += dstep, gq += gstep) {
      const Pos q = q0 + m * NT;
      if (q >= HWp) break;
      float d[CB];
      load8<T>(dq, 0, P.ds[3], nvalid, vec, d);
      accumulate(q, d, to_f<T>(*gq));
    }
  } else {
#pragma unroll 1
    for (int m = 0; m < PREP_POS / NT; ++m) {
      const Pos q = (Pos)(chunk * PREP_POS) + m * NT + tid;
      if (q >= HWp) break;
      const Pos h = q / Wp, w = q - h * Wp;
      float d[CB];
      load8<T>(dimg, (int64_t)h * P.ds[1] + (int64_t)w * P.ds[2], P.ds[3], nvalid, vec, d);
      accumulate(q, d, to_f<T>(gimg[(int64_t)h * P.gs[1] + (int64_t)w * P.gs[2]]));
    }
  }
  // dsum over the block: a fixed xor tree per warp, then the warps in order
#pragma unroll
  for (int i = 0; i < CB; ++i) {
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) dsum[i] += __shfl_xor_sync(0xffffffffu, dsum[i], o);
  }
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < CB; ++i) red[warp * CB + i] = dsum[i];
  }
  __syncthreads();
  if (tid < nvalid) {
    float t = 0.f;
    for (int g = 0; g < NWARP; ++g) t += red[g * CB + tid];
    P.dp_part[(b * P.nchunk + chunk) * P.C + c0 + tid] = t;
  }
}

// dpoolHW[b,c] = GELU'(pooled) * scale * sum_chunks(dp_part) / (H*W)
__global__ void __launch_bounds__(NT) fc_dpool_finish_kernel(const float* __restrict__ part, int64_t nchunk,
                                                              int64_t B, int64_t C, const float* __restrict__ pooled,
                                                              float scale, double inv_hw, float* __restrict__ dpool) {
  const int64_t n = B * C;
  for (int64_t idx = blockIdx.x * (int64_t)NT + threadIdx.x; idx < n; idx += (int64_t)gridDim.x * NT) {
    const int64_t b = idx / C, c = idx - b * C;
    double s = 0.0;
    for (int64_t t = 0; t < nchunk; ++t) s += (double)part[(b * nchunk + t) * C + c];
    dpool[idx] = (float)((double)(gelu_grad_f(pooled[idx]) * scale) * s * inv_hw);
  }
}

// grad_gates[pos][l] = scale * sum_cb gg[cb][l][pos]   (fixed order; n = positions * L1)
template <typename T>
__global__ void __launch_bounds__(NT) fc_gates_finish_kernel(const float* __restrict__ gg, int cblocks, int64_t n,
                                                              int L1, float scale, T* __restrict__ grad_gates) {
  const int64_t npos = n / L1;
  for (int64_t idx = blockIdx.x * (int64_t)NT + threadIdx.x; idx < n; idx += (int64_t)gridDim.x * NT) {
    const int64_t pos = idx / L1;
    const int64_t off = (idx - pos * L1) * npos + pos;
    double s = 0.0;
    for (int cb = 0; cb < cblocks; ++cb) s += (double)gg[(int64_t)cb * n + off];
    grad_gates[idx] = from_f<T>(scale * (float)s);
  }
}

// grad_w[c][tap] = sum_slots part[slot][tap][c]   (fixed order)
__global__ void __launch_bounds__(NT) fc_gw_finish_kernel(const float* __restrict__ part, int nslots, int KK,
                                                           int64_t C, float* __restrict__ grad_w) {
  const int64_t n = (int64_t)KK * C;
  for (int64_t idx = blockIdx.x * (int64_t)NT + threadIdx.x; idx < n; idx += (int64_t)gridDim.x * NT) {
    const int64_t tap = idx / C, c = idx - tap * C;
    double s = 0.0;
    for (int sl = 0; sl < nslots; ++sl) s += (double)part[((int64_t)sl * KK + tap) * C + c];
    grad_w[c * KK + tap] = (float)s;
  }
}

// ==========================================================================================
// Backward of one level l (staged, recomputing), block = (slot, 8 channels); a slot walks the
// tiles slot, slot + nslots, ... of all images. Per tile:
//   x_l on tile + 2p (ctx or workspace)           -> z_l on tile + p (recomputed in shared memory)
//   dx_{l+1} on tile + p (workspace, or from dout/gates/dpool for l = L-1)
//   dz_l = dx_{l+1} * GELU'(z_l) on tile + p (0 outside the image)
//   gate partial  gg[cb][l][pos] = sum_{c in block} dout * GELU(z_l)       (tile positions)
//   weight grad   sum_{tile positions} dz_l(h,w) * x_l(h+i-p, w+j-p)       (registers, fp64 across tiles)
//   dx_l on tile = conv(dz_l, flipped w_l) (+ scale * dout * g_{l-1} for l > 0) -> workspace or grad_ctx
// The weight-gradient partial of the slot is written once at the end: [slot][tap][C].
// ==========================================================================================
// The inputs and outputs of level l's backward, shared by the FMA level kernel (LevelBwdParams) and the
// tensor-core one (LevelMmaParams, fc_bwd_mma.cuh): the host fills them once for both launches.
struct LevelIO {
  int64_t B, H, W, C;
  int L, l;
  const void* xsrc;  // x_l: ctx (T, any strides) when x_is_ws == 0, else the workspace's map (WsT<T>)
  int64_t xs[4];
  int x_is_ws, x_vec;
  const float* dx_in;  // dx_{l+1} (fp32 contiguous) for l < L-1
  int ws_vec;
  const void* dout;
  int64_t ds[4];
  int dout_vec;
  const void* gates;
  int64_t gs[4];
  const float* dpool;  // [B][C], already divided by H*W
  void* dx_out;        // l == 0: grad_ctx (T, contiguous); else fp32 contiguous workspace map dx_l
  int out_vec;
  float* gg;
  float* gw_part;
  float scale;
};

struct LevelBwdParams : LevelIO {
  int TH, TW, accP, ntw, ntiles, cblocks, nslots;
  int pX, pZ;
  int offX, offZ, offW, offD, offGp;
  const float* w;      // [C][k][k]
  const int* run_if;  // non-null: the tensor-core level kernel's fallback; return unless *run_if
};

// Tile t (image-major, ntiles per image, ntw per tile row) of a level kernel's persistent loop: its image
// and origin. 32-bit math (a 64-bit division is a ~70-instruction subroutine): the host keeps
// B * ntiles below 2^31.
struct TileAt {
  int64_t b;
  int h0, w0;
};
__device__ __forceinline__ TileAt level_tile(unsigned t, unsigned ntiles, int ntw, int TH, int TW) {
  const unsigned bu = t / ntiles;
  const int tile = (int)(t - bu * ntiles);
  const int tr = (int)((unsigned)tile / (unsigned)ntw);
  return {(int64_t)bu, tr * TH, (tile - tr * ntw) * TW};
}

// dx_{l+1} of 8 channels at image position (gh, gw) (0 outside the image): for the last level
// scale * dout * g_{L-1} + dpool, else the fp32 workspace map
template <typename T>
__device__ __forceinline__ void load_dx_next8(const LevelBwdParams& P, int64_t b, int64_t c0, int gh, int gw,
                                              int nvalid, bool dvec, bool wvec, float (&v)[8]) {
  if (gh < 0 || gh >= P.H || gw < 0 || gw >= P.W) {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = 0.f;
  } else if (P.l == P.L - 1) {
    float d[8];
    load8<T>(static_cast<const T*>(P.dout), b * P.ds[0] + (int64_t)gh * P.ds[1] + (int64_t)gw * P.ds[2] + c0 * P.ds[3],
             P.ds[3], nvalid, dvec, d);
    const float g = P.scale * to_f<T>(static_cast<const T*>(P.gates)[b * P.gs[0] + (int64_t)gh * P.gs[1] +
                                                                     (int64_t)gw * P.gs[2] + (int64_t)(P.L - 1) * P.gs[3]]);
    const float* dp = P.dpool + b * P.C + c0;
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = (i < nvalid) ? fmaf(d[i], g, dp[i]) : 0.f;
  } else {
    load8<float>(P.dx_in, ((b * P.H + gh) * P.W + gw) * P.C + c0, 1, nvalid, wvec, v);
  }
}

template <typename T, int K>
__global__ void __launch_bounds__(NT, 2) fc_bwd_level_kernel(const LevelBwdParams P) {
  if (P.run_if != nullptr && *P.run_if == 0) return;
  constexpr int p = K / 2;
  constexpr int V = vblock(K);
  constexpr int KK = K * K;
  constexpr int NP = NGRP / K;  // position parts of the weight-gradient work (>= 2 for K <= 15)
  FC_DYN_SMEM(sm);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int c = tid & (CB - 1), grp = tid / CB, g4 = lane / CB;
  const int cb = (int)(blockIdx.x % (unsigned)P.cblocks);
  const int slot = (int)(blockIdx.x / (unsigned)P.cblocks);
  const int64_t c0 = (int64_t)cb * CB;
  const int nvalid = (int)((P.C - c0) < CB ? (P.C - c0) : CB);
  const int H = (int)P.H, W = (int)P.W, TH = P.TH, TW = P.TW, accP = P.accP;
  const int l = P.l, L = P.L;
  const int64_t BHW = P.B * P.H * P.W;
  float* Xs = sm + P.offX;
  float* Zs = sm + P.offZ;
  float* Ws = sm + P.offW;
  float* Ds = sm + P.offD;
  float* Gs = sm + P.offGp;
  const T* dout = static_cast<const T*>(P.dout);
  const T* gates = static_cast<const T*>(P.gates);

  for (int idx = tid; idx < KK * CB; idx += NT) {
    const int tap = idx / CB, cc = idx - tap * CB;
    Ws[idx] = (cc < nvalid) ? P.w[(c0 + cc) * KK + tap] : 0.f;
  }
  // weight-gradient work item of this channel group: kernel row wi, position part pp
  const int wi = grp % K, pp = grp / K;
  const bool wact = grp < K * NP;
  double gacc[K];
#pragma unroll
  for (int j = 0; j < K; ++j) gacc[j] = 0.0;

  const unsigned total = (unsigned)(P.B * P.ntiles);
  for (unsigned t = slot; t < total; t += (unsigned)P.nslots) {
    const TileAt at = level_tile(t, (unsigned)P.ntiles, P.ntw, TH, TW);
    const int64_t b = at.b;
    const int h0 = at.h0, w0 = at.w0;
    __syncthreads();  // the previous tile (and the weight staging) is done with shared memory

    // (a) x_l on tile + 2p
    {
      const bool vec = P.x_vec && nvalid == CB;
      using WT = WsT<T>;
      if (!std::is_same<WT, T>::value && P.x_is_ws)  // (a bf16 map is read as ctx is, below)
        load_region<WT>(Xs, P.pX, TH + 4 * p, TW + 4 * p, h0 - 2 * p, w0 - 2 * p,
                        static_cast<const WT*>(P.xsrc), P.xs, b, c0, nvalid, vec, H, W);
      else
        load_region<T>(Xs, P.pX, TH + 4 * p, TW + 4 * p, h0 - 2 * p, w0 - 2 * p, static_cast<const T*>(P.xsrc),
                       P.xs, b, c0, nvalid, vec, H, W);
    }
    // (b) dx_{l+1} on tile + p into Zs
    {
      const int zr = TH + 2 * p, zc = TW + 2 * p;
      const bool dvec = P.dout_vec && nvalid == CB;
      const bool wvec = P.ws_vec && nvalid == CB;
      for (int idx = tid; idx < zr * zc; idx += NT) {
        const int r = idx / zc, s = idx - r * zc;
        const int gh = h0 - p + r, gw = w0 - p + s;
        float v[8];
        load_dx_next8<T>(P, b, c0, gh, gw, nvalid, dvec, wvec, v);
        sm_store8(Zs + (r * P.pZ + s) * CB, v);
      }
    }
    // (c) dout (and g_{l-1}) on the tile
    {
      const bool dvec = P.dout_vec && nvalid == CB;
      for (int pos = tid; pos < TH * TW; pos += NT) {
        const int ti = pos / TW, tj = pos - ti * TW;
        const int gh = h0 + ti, gw = w0 + tj;
        const bool in = gh < H && gw < W;
        float v[8];
        if (in) {
          load8<T>(dout, b * P.ds[0] + (int64_t)gh * P.ds[1] + (int64_t)gw * P.ds[2] + c0 * P.ds[3], P.ds[3], nvalid,
                   dvec, v);
        } else {
#pragma unroll
          for (int i = 0; i < 8; ++i) v[i] = 0.f;
        }
        sm_store8(Ds + (ti * accP + tj) * CB, v);
        if (l > 0)
          Gs[ti * accP + tj] =
              in ? to_f<T>(gates[b * P.gs[0] + (int64_t)gh * P.gs[1] + (int64_t)gw * P.gs[2] + (int64_t)(l - 1) * P.gs[3]])
                 : 0.f;
      }
    }
    __syncthreads();

    // (d) z_l on tile + p, dz in place of dx_{l+1}, gate partial at tile positions
    {
      const int orows = TH + 2 * p, ocols = TW + 2 * p;
      const int nchunk = (ocols + V - 1) / V;
      const int nitems = ((orows + GPW - 1) / GPW) * nchunk;
      for (int it = warp; it < nitems; it += NWARP) {  // warp-uniform: the shuffles below are safe
        const int rq = it / nchunk, ch = it - rq * nchunk;
        const int r = rq * GPW + g4;
        const int rr = min(r, orows - 1);
        const int s0 = ch * V;
        float a[V];
        conv_item<K, true, V, false>(Xs + c, P.pX, Ws + c, K, rr, s0, a);
        const int gh = h0 - p + r;
        const bool hin = r < orows && gh >= 0 && gh < H;
        const int ti = r - p;
        // gate partials of this row: one 64-bit base per item, V consecutive stores from it
        float* ggrow = P.gg + ((int64_t)cb * (L + 1) + l) * BHW + ((int64_t)b * H + gh) * W + (w0 - p + s0);
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const int s = s0 + v;
          const int gw = w0 - p + s;
          const bool valid = r < orows && s < ocols;
          const bool in = valid && hin && gw >= 0 && gw < W;
          const int tj = s - p;
          const bool interior = in && ti >= 0 && ti < TH && tj >= 0 && tj < TW;
          float prod = 0.f;
          if (valid) {
            float* zp = Zs + (r * P.pZ + s) * CB + c;
            const float z = a[v];
            float gz, gpz;
            gelu_and_grad_f(z, gz, gpz);
            *zp = in ? (*zp) * gpz : 0.f;
            if (interior) prod = Ds[(ti * accP + tj) * CB + c] * gz;
          }
          prod += __shfl_xor_sync(0xffffffffu, prod, 4);
          prod += __shfl_xor_sync(0xffffffffu, prod, 2);
          prod += __shfl_xor_sync(0xffffffffu, prod, 1);
          if (interior && c == 0) ggrow[v] = prod;
        }
      }
    }
    __syncthreads();

    // (e) weight gradient of this tile: item (kernel row wi, rows pp, pp+NP, ...), all K columns
    if (wact) {
      const int nr = min(TH, H - h0), nc = min(TW, W - w0);
      float part[K];
#pragma unroll
      for (int j = 0; j < K; ++j) part[j] = 0.f;
      for (int r = pp; r < nr; r += NP) {
        const float* drow = Zs + ((r + p) * P.pZ + p) * CB + c;
        const float* xrow = Xs + ((r + p + wi) * P.pX + p) * CB + c;
        float win[K];
#pragma unroll
        for (int j = 0; j < K - 1; ++j) win[j] = xrow[j * CB];
        for (int s = 0; s < nc; ++s) {
          win[K - 1] = xrow[(s + K - 1) * CB];
          const float d = drow[s * CB];
#pragma unroll
          for (int j = 0; j < K; ++j) part[j] = fmaf(d, win[j], part[j]);
#pragma unroll
          for (int j = 0; j < K - 1; ++j) win[j] = win[j + 1];
        }
      }
#pragma unroll
      for (int j = 0; j < K; ++j) gacc[j] += (double)part[j];
    }

    // (f) dx_l on the tile: correlation of dz with the flipped kernel (+ the gate term for l > 0)
    {
      const int nchunk = (TW + V - 1) / V;
      const int nitems = ((TH + GPW - 1) / GPW) * nchunk;
      for (int it = warp; it < nitems; it += NWARP) {
        const int rq = it / nchunk, ch = it - rq * nchunk;
        const int r = rq * GPW + g4;
        const int rr = min(r, TH - 1);
        const int s0 = ch * V;
        float a[V];
        conv_item<K, true, V, true>(Zs + c, P.pZ, Ws + c, K, rr, s0, a);
        if (r < TH && h0 + r < H) {
#pragma unroll
          for (int v = 0; v < V; ++v) {
            const int s = s0 + v;
            if (s < TW && w0 + s < W) {
              float* dp = Ds + (r * accP + s) * CB + c;
              float val = a[v];
              if (l > 0) val = fmaf(P.scale * (*dp), Gs[r * accP + s], val);
              *dp = val;
            }
          }
        }
      }
    }
    __syncthreads();

    // (g) store dx_l of the tile
    {
      const bool ovec = P.out_vec && nvalid == CB;
      for (int pos = tid; pos < TH * TW; pos += NT) {
        const int ti = pos / TW, tj = pos - ti * TW;
        const int gh = h0 + ti, gw = w0 + tj;
        if (gh >= H || gw >= W) continue;
        float v[8];
        sm_load8(Ds + (ti * accP + tj) * CB, v);
        const int64_t off = ((b * P.H + gh) * P.W + gw) * P.C + c0;
        if (l == 0)
          store8<T>(static_cast<T*>(P.dx_out), off, nvalid, ovec, v);
        else
          store8<float>(static_cast<float*>(P.dx_out), off, nvalid, ovec, v);
      }
    }
  }
  __syncthreads();

  // weight-gradient partial of the slot: the NP position parts summed in a fixed order
  float* red = Xs;  // NP * KK * CB floats (the host sizes Xs for it)
  if (wact) {
#pragma unroll
    for (int j = 0; j < K; ++j) red[((pp * K + wi) * K + j) * CB + c] = (float)gacc[j];
  }
  __syncthreads();
  for (int idx = tid; idx < KK * CB; idx += NT) {
    const int tap = idx / CB, cc = idx - tap * CB;
    float s = 0.f;
    for (int q = 0; q < NP; ++q) s += red[(q * KK + tap) * CB + cc];
    if (cc < nvalid) P.gw_part[((int64_t)slot * KK + tap) * P.C + c0 + cc] = s;
  }
}

}  // namespace fcc
}  // namespace focalnet
