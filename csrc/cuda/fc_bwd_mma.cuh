// Tensor-core backward of one level (bf16, k = 3, 5, 7); included by focal_context_cuda.cu only. Planned by
// plan_level_mma (focal_context_cuda.cu) where the forward runs on tensor cores (its recompute then leaves
// x_l exactly in bf16); fc_bwd_level_kernel (FMA) runs otherwise, and behind this kernel as its fallback.
//
// Block = (slot, 8 channels), warp w owns channel c0 + w; a slot walks the tiles slot, slot + nslots, ...
// All three stencils of the level are banded mma.m16n8k16 (bf16 in, fp32 accumulate), per channel:
//  (d) z = conv(x_l, w) on tile + p (x plane, weights as the forward's mma_subtile has them), then
//      GELU(z), GELU'(z), dz = dx_{l+1} * GELU'(z) (0 outside the image and the region), stored
//      rounded to bf16 (the precision eager PyTorch's bf16 backward keeps dz in; FC_BWD_DZ_SPLIT=1
//      builds keep a lo plane too, dz exact to ~2^-16, for one more mma per kernel row in (f));
//  (e) weight gradient: with the tile rows as the k dimension,
//        D_dy[m][n] += sum_r x[r + dy - p][8j - 2p + m] * dz[r][8j - p + n]     (tile coordinates)
//      (A from the x plane, B from the dz planes, both by ldmatrix.trans), whose diagonal m - n = dx
//      holds tap (dy, dx); B is masked to the tile's own positions (each position counted by one tile);
//      D stays in registers for the slot, its diagonals are summed once at the end;
//  (f) dx_l = correlation of dz with the flipped kernel on the tile (A = dz, B = the flipped weights:
//      1 mma per kernel row, 2 with FC_MMA_BF16_NS=2), staged in fp32 over the warp's x plane.
// Then per tile position and 8 channels (one 16-byte dout load): the gate partial
// gg[cb][l][pos] = sum_c dout * GELU(z) (GELU(z) parked in the dx_{l+1} plane by (d)) and the dx_l
// store (+ scale * dout * g_{l-1} for l > 0), as fc_bwd_level_kernel's.
//
// Planes (per warp, 16-byte aligned rows): x (bf16, xrows x xp, origin (h0 - 2p, w0 - 2p), zero outside
// the image; every element written: A's columns meet B's zeros), dz hi / lo (bf16, drows x dp, origin
// (h0 - p, w0 - p); columns < 8 ncolZ written by (d), rows past 16 nrowZ only reach discarded outputs),
// n (fp32 dx_{l+1} on the region, nrows x np, np even; later GELU(z) at the tile positions).
// Coordinates: x plane = tile + 2p, dz / n planes = tile + p (rows and columns).
//
// Non-finite x_l or dx_{l+1} (NaN * 0 inside an mma would spread a NaN along a whole subtile row, wider
// than the reference's) set *P.flag; the host launches fc_bwd_level_kernel for the level behind this one,
// which runs only when the flag is set and recomputes everything this kernel wrote.
#pragma once

#include "fc_kernels.cuh"
#include "fc_mma.cuh"

namespace focalnet {
namespace fcc {

#ifdef FC_EMULATION
inline void ldsm_x4_t(uint32_t (&a)[4], const void* p) { emu_ldsm_x4_trans(a, p); }
#else
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&a)[4], const void* p) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
               : "r"(s));
}
#endif

// dz of the level kernel as bf16 hi + lo planes (1) or one bf16 plane (0, shipped); the host's planner
// (plan_level_mma) sizes shared memory for the same choice
#ifndef FC_BWD_DZ_SPLIT
#define FC_BWD_DZ_SPLIT 0
#endif

struct LevelMmaParams : LevelIO {                   // LevelIO: the FMA level kernel's inputs and outputs
  int TH, TW, ntw, ntiles, cblocks, nslots;
  int nrowZ, ncolZ, nrowT, ncolT, ncolE;  // subtiles of z (tile + p), of dx (tile); column blocks of (e)
  int xrows, xp, dp, np;                  // plane rows and pitches (elements)
  int offX, offDh, offDl, offN;           // bytes; warp w's planes at + w * plane*
  int planeX, planeD, planeN;             // bytes per warp
  int x_vec8;                             // x_l is ctx with 8-byte aligned 4-channel groups
  const uint32_t* frag;                   // fc_bwd_mma_bfrag_kernel: [C][32][2 * bfrag_words_per_dir(K)]
  int* flag;
};

// B fragments of one level for the backward: per channel and lane, for dy = 0..K-1 the forward's words
// (B_dy[i][n] = w[dy][i - n], hi then lo), then the flipped kernel's (w[K-1-dy][K-1-(i-n)]).
// Non-finite weights set *flag (the FMA kernel recomputes the level).
// Each direction's words padded to whole 16-byte vectors: bfrag_words_per_dir(K).
__host__ __device__ constexpr int bfrag_words_per_dir(int K) {
  return (K * MmaT<__nv_bfloat16>::NS * 2 + 3) / 4 * 4;
}

__global__ void __launch_bounds__(NT) fc_bwd_mma_bfrag_kernel(const float* __restrict__ w, int64_t C, int K,
                                                              uint32_t* __restrict__ frag, int* flag) {
  const int64_t idx = blockIdx.x * (int64_t)NT + threadIdx.x;
  if (idx >= C * 32) return;
  const int64_t c = idx / 32;
  const int lane = (int)(idx % 32), g = lane >> 2, t = lane & 3;
  const int nwd = bfrag_words_per_dir(K);
  uint32_t* d = frag + idx * (2 * nwd);
  const float* wc = w + c * K * K;
  bool bad = false;
  for (int flip = 0; flip < 2; ++flip) {
    int i = flip * nwd;
    for (int dy = 0; dy < K; ++dy) {
      float v[2][2];
      for (int h = 0; h < 2; ++h)
        for (int e = 0; e < 2; ++e) {
          const int dx = 2 * t + 8 * h + e - g;
          v[h][e] = (dx >= 0 && dx < K) ? (flip ? wc[(K - 1 - dy) * K + (K - 1 - dx)] : wc[dy * K + dx]) : 0.f;
          bad |= !(fabsf(v[h][e]) <= MmaT<__nv_bfloat16>::maxv);
        }
      i = put_bfrag_row<__nv_bfloat16>(d, i, v);
    }
    for (; i < (flip + 1) * nwd; ++i) d[i] = 0u;
  }
  if (bad) *flag = 1;
}

// dz = value as bf16 hi + lo, two adjacent columns per word
__device__ __forceinline__ void split2(float a, float b, uint32_t& hi, uint32_t& lo) {
  const __nv_bfloat16* tag = nullptr;
  hi = pack2(a, b, tag);
  const float2 h = unpack2(hi, tag);
  lo = pack2(a - h.x, b - h.y, tag);
}

// The role of the level in the call decides where dx_{l+1} comes from (the last level: dout, the gate and
// dpool; else the fp32 map) and where dx_l goes (level 0: grad_ctx in bf16; else the fp32 map, plus
// scale * dout * g_{l-1}): compile-time, so that each instance carries only its own paths.
enum LevelRole : int { kLvFirst = 0, kLvMid = 1, kLvLast = 2 };

// (2) of the level kernel: dx_{l+1} on zr x zc positions from image position (gh0, gw0) -> the 8 fp32
// channel planes at n0 (pn floats per plane, np per row), 0 outside the image; rows by warp, columns by
// lane. The last level's is scale * dout * g_{L-1} + dpool (dpl: dpool of the image's 8 channels), the
// others' the fp32 map. VEC: 16-byte loads (the host's alignment flags, all 8 channels valid).
template <int ROLE, bool VEC>
__device__ __forceinline__ uint32_t stage_dx_next(const LevelMmaParams& P, float* n0, int pn, int np, int zr, int zc,
                                                  int64_t b, int64_t c0, int gh0, int gw0, int nvalid,
                                                  const float (&dpl)[8], int warp, int lane) {
  using T = __nv_bfloat16;
  const int H = (int)P.H, W = (int)P.W;
  uint32_t nf = 0;
#pragma unroll 1
  for (int r = warp; r < zr; r += NWARP) {
    const int gh = gh0 + r;
    const bool rin = (unsigned)gh < (unsigned)H;
#pragma unroll 1
    for (int s = lane; s < zc; s += 32) {
      const int gw = gw0 + s;
      float v[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = 0.f;
      if (rin && (unsigned)gw < (unsigned)W) {
        if constexpr (ROLE == kLvLast) {
          float d[8];
          load8<T>(static_cast<const T*>(P.dout), b * P.ds[0] + (int64_t)gh * P.ds[1] + (int64_t)gw * P.ds[2] +
                   c0 * P.ds[3], P.ds[3], nvalid, VEC, d);
          const float gq = P.scale * to_f<T>(static_cast<const T*>(P.gates)[b * P.gs[0] + (int64_t)gh * P.gs[1] +
                                                                             (int64_t)gw * P.gs[2] +
                                                                             (int64_t)(P.L - 1) * P.gs[3]]);
#pragma unroll
          for (int i = 0; i < 8; ++i) v[i] = (i < nvalid) ? fmaf(d[i], gq, dpl[i]) : 0.f;
        } else {
          load8<float>(P.dx_in, ((b * H + gh) * W + gw) * P.C + c0, 1, nvalid, VEC, v);
        }
      }
      float* d = n0 + r * np + s;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        nf |= (fabsf(v[i]) <= 3.38953139e38f) ? 0u : 0x80000000u;
        d[i * pn] = v[i];
      }
    }
  }
  return nf;
}

// (6) of the level kernel: per tile position, 8 channels: the gate partial sum_c dout * GELU(z) (n0 planes,
// region origin p) and dx_l = (dx planes at o0) + scale * dout * g_{l-1} (fp32 map), or, level 0, grad_ctx.
template <int ROLE, bool VEC>
__device__ __forceinline__ void level_epilogue(const LevelMmaParams& P, const float* n0, int pn, int np, int p,
                                               const float* o0, int po, int thl, int twl, int64_t b, int64_t c0,
                                               int h0, int w0, int cb, int nvalid, int warp, int lane) {
  using T = __nv_bfloat16;
  const int H = (int)P.H, W = (int)P.W, TW = P.TW, l = P.l;
  float* gg = P.gg + ((int64_t)cb * (P.L + 1) + l) * (P.B * P.H * P.W);
#pragma unroll 1
  for (int ti = warp; ti < thl; ti += NWARP) {
    const int gh = h0 + ti;
#pragma unroll 1
    for (int tj = lane; tj < twl; tj += 32) {
      const int gw = w0 + tj;
      float d[8], v[8];
      load8<T>(static_cast<const T*>(P.dout), b * P.ds[0] + (int64_t)gh * P.ds[1] + (int64_t)gw * P.ds[2] +
               c0 * P.ds[3], P.ds[3], nvalid, VEC, d);
      const float* nq = n0 + (ti + p) * np + tj + p;
      const float* oq = o0 + ti * TW + tj;
      float prod = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        prod = fmaf(d[i], nq[i * pn], prod);
        v[i] = oq[i * po];
      }
      const int64_t pos = ((int64_t)b * H + gh) * W + gw;
      gg[pos] = prod;
      if constexpr (ROLE != kLvFirst) {
        const float gq = P.scale * to_f<T>(static_cast<const T*>(P.gates)[b * P.gs[0] + (int64_t)gh * P.gs[1] +
                                                                           (int64_t)gw * P.gs[2] +
                                                                           (int64_t)(l - 1) * P.gs[3]]);
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = fmaf(gq, d[i], v[i]);
        store8<float>(static_cast<float*>(P.dx_out), pos * P.C + c0, nvalid, VEC, v);
      } else {
        store8<T>(static_cast<T*>(P.dx_out), pos * P.C + c0, nvalid, VEC, v);
      }
    }
  }
}

template <int K, int ROLE>
__global__ void __launch_bounds__(MMA_NT, 2) fc_bwd_level_mma_kernel(const LevelMmaParams P) {
  using T = __nv_bfloat16;
  static_assert(std::is_same<WsT<T>, T>::value, "x_l is bf16 whether it is ctx or a workspace level map");
  constexpr int p = K / 2;
  constexpr int NS = MmaT<T>::NS;
  constexpr int NWD = bfrag_words_per_dir(K);  // fragment words per direction (K * NS * 2 used)
  FC_DYN_SMEM(smf);
  char* sm = reinterpret_cast<char*>(smf);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int cb = (int)(blockIdx.x % (unsigned)P.cblocks);
  const int slot = (int)(blockIdx.x / (unsigned)P.cblocks);
  const int64_t c0 = (int64_t)cb * CB;
  const int nvalid = (int)((P.C - c0) < CB ? (P.C - c0) : CB);
  const int H = (int)P.H, W = (int)P.W, TH = P.TH, TW = P.TW;
  T* Xw = reinterpret_cast<T*>(sm + P.offX + warp * P.planeX);
  T* Dh = reinterpret_cast<T*>(sm + P.offDh + warp * P.planeD);
  T* Dl = reinterpret_cast<T*>(sm + P.offDl + warp * P.planeD);
  float* Nw = reinterpret_cast<float*>(sm + P.offN + warp * P.planeN);
  float* Ow = reinterpret_cast<float*>(Xw);  // (f)'s result, after (e) is done with the x plane
  const uint32_t* fr = P.frag + ((c0 + min(warp, nvalid - 1)) * 32 + lane) * (int64_t)(2 * NWD);
  const int xp = P.xp, dp = P.dp, np = P.np;
  uint32_t nf = 0;
  float D[K][4];
#pragma unroll
  for (int dy = 0; dy < K; ++dy)
#pragma unroll
    for (int i = 0; i < 4; ++i) D[dy][i] = 0.f;

  const unsigned total = (unsigned)(P.B * P.ntiles);
  for (unsigned tt = slot; tt < total; tt += (unsigned)P.nslots) {
    const TileAt at = level_tile(tt, (unsigned)P.ntiles, P.ntw, TH, TW);
    const int64_t b = at.b;
    const int h0 = at.h0, w0 = at.w0;
    const int thl = min(TH, H - h0), twl = min(TW, W - w0);
    __syncthreads();  // the previous tile is done with shared memory

    // (1) x_l (ctx or the level map, bf16) on tile + 2p -> the 8 channel planes of the x plane
    {
      uint16_t* s0 = reinterpret_cast<uint16_t*>(sm + P.offX);
      const uint16_t* base = static_cast<const uint16_t*>(P.xsrc) + b * P.xs[0] + c0 * P.xs[3];
      nf |= stage_planes_vec<T>(P.x_vec, P.x_vec8, s0, P.planeX / 2, xp, P.xrows, xp, base, P.xs[1], P.xs[2],
                                P.xs[3], h0 - 2 * p, w0 - 2 * p, H, W, nvalid, warp, lane);
    }
    // (2) dx_{l+1} on the region tile + p (fp32 planes), 0 outside the image
    {
      float dpl[8];  // the last level: dpool of the image's 8 channels
#pragma unroll
      for (int i = 0; i < 8; ++i) dpl[i] = (ROLE == kLvLast && i < nvalid) ? P.dpool[b * P.C + c0 + i] : 0.f;
      float* n0 = reinterpret_cast<float*>(sm + P.offN);
      const bool vec = (ROLE == kLvLast ? P.dout_vec : P.ws_vec) && nvalid == CB;
      if (vec)
        nf |= stage_dx_next<ROLE, true>(P, n0, P.planeN / 4, np, TH + 2 * p, TW + 2 * p, b, c0, h0 - p, w0 - p, nvalid,
                                        dpl, warp, lane);
      else
        nf |= stage_dx_next<ROLE, false>(P, n0, P.planeN / 4, np, TH + 2 * p, TW + 2 * p, b, c0, h0 - p, w0 - p,
                                         nvalid, dpl, warp, lane);
    }
    __syncthreads();

    // (3) z on the region, GELU / GELU', dz -> dz planes; GELU(z) at the tile positions -> n plane
    {
      uint32_t bf[NWD];
      load_words<NWD>(bf, fr);
      const int zr = TH + 2 * p, zc = TW + 2 * p;
      // rows / columns of the region inside the image: [lo, hi)
      const int rlo = max(0, p - h0), rhi = min(zr, H - h0 + p);
      const int clo = max(0, p - w0), chi = min(zc, W - w0 + p);
#pragma unroll 1
      for (int sr = 0; sr < P.nrowZ; ++sr) {
        // this lane's two rows of the subtile row (a: 16 sr + g, b: + 8): inside the image and the region,
        // inside the tile; the n plane's rows clamped to the region (a row past it only feeds values that
        // the selects below drop), so that its pair loads need no per-value address or predicate
        const int za = 16 * sr + g, zb = za + 8;
        const bool ina = za >= rlo && za < rhi, inb = zb >= rlo && zb < rhi;
        const bool ita = za >= p && za < p + thl, itb = zb >= p && zb < p + thl;
        float* na = Nw + min(za, zr - 1) * np;
        float* nb = Nw + min(zb, zr - 1) * np;
        uint32_t* dha = reinterpret_cast<uint32_t*>(Dh + za * dp);
        uint32_t* dhb = reinterpret_cast<uint32_t*>(Dh + zb * dp);
#if FC_BWD_DZ_SPLIT
        uint32_t* dla = reinterpret_cast<uint32_t*>(Dl + za * dp);
        uint32_t* dlb = reinterpret_cast<uint32_t*>(Dl + zb * dp);
#endif
#pragma unroll 1
        for (int sc = 0; sc < P.ncolZ; ++sc) {
          float c[4];
          mma_subtile<T, K>(c, Xw, xp, 16 * sr, 8 * sc, bf, lane);
          const int zj = 8 * sc + 2 * t;  // columns zj, zj + 1 (even: one 8-byte load of the even-pitch n plane)
          const bool ic0 = zj >= clo && zj < chi, ic1 = zj + 1 >= clo && zj + 1 < chi;
          const bool it0 = zj >= p && zj < p + twl, it1 = zj + 1 >= p && zj + 1 < p + twl;
          const int zjc = min(zj, np - 2);
          const float2 va = *reinterpret_cast<const float2*>(na + zjc);
          const float2 vb = *reinterpret_cast<const float2*>(nb + zjc);
          float gz[4], gpz[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) gelu_and_grad_f(c[i], gz[i], gpz[i]);
          float dz[4];
          dz[0] = (ina && ic0) ? va.x * gpz[0] : 0.f;
          dz[1] = (ina && ic1) ? va.y * gpz[1] : 0.f;
          dz[2] = (inb && ic0) ? vb.x * gpz[2] : 0.f;
          dz[3] = (inb && ic1) ? vb.y * gpz[3] : 0.f;
          // GELU(z) at the tile positions, over dx_{l+1} just read (this lane's own positions)
          if (ita && it0) na[zj] = gz[0];
          if (ita && it1) na[zj + 1] = gz[1];
          if (itb && it0) nb[zj] = gz[2];
          if (itb && it1) nb[zj + 1] = gz[3];
#if FC_BWD_DZ_SPLIT
          uint32_t h0w, l0w, h1w, l1w;
          split2(dz[0], dz[1], h0w, l0w);
          split2(dz[2], dz[3], h1w, l1w);
          dla[zj / 2] = l0w;
          dlb[zj / 2] = l1w;
#else
          const T* tag = nullptr;
          const uint32_t h0w = pack2(dz[0], dz[1], tag), h1w = pack2(dz[2], dz[3], tag);
#endif
          nf |= nonfinite2<T>(h0w) | nonfinite2<T>(h1w);
          dha[zj / 2] = h0w;
          dhb[zj / 2] = h1w;
        }
      }
    }
    __syncwarp();

    // (4) weight gradient: D_dy += A (x rows r0 + dy + p.., columns 8j..) x B (dz rows r0 + p.., columns 8j..)
    {
      const int mi = lane >> 3, rr = lane & 7;
#pragma unroll 1
      for (int rb = 0; rb < P.nrowT; ++rb) {
        const int r0 = 16 * rb;
        // B rows are tile rows r0 + k: this lane's k = 2t, 2t+1 (b0) and 2t+8, 2t+9 (b1)
        const uint32_t rm0 = (r0 + 2 * t < thl ? 0xffffu : 0u) | (r0 + 2 * t + 1 < thl ? 0xffff0000u : 0u);
        const uint32_t rm1 = (r0 + 2 * t + 8 < thl ? 0xffffu : 0u) | (r0 + 2 * t + 9 < thl ? 0xffff0000u : 0u);
        // matrices 0, 1: dz (hi) rows r0 + p + 0..15; 2, 3: the lo plane's (FC_BWD_DZ_SPLIT) or hi again
        const T* bsrc = ((mi < 2 || !FC_BWD_DZ_SPLIT) ? Dh : Dl) + (r0 + p + rr + 8 * (mi & 1)) * dp;
        const T* asrc = Xw + (r0 + p + rr + 8 * (mi >> 1)) * xp + 8 * (mi & 1);
#pragma unroll 1
        for (int j = 0; j < P.ncolE; ++j) {
          uint32_t bq[4];
          ldsm_x4_t(bq, bsrc + 8 * j);
          // B column n = g is tile column 8j - p + g
          const int col = 8 * j - p + g;
          const uint32_t cm = (col >= 0 && col < twl) ? 0xffffffffu : 0u;
          const uint32_t m0 = rm0 & cm, m1 = rm1 & cm;
#pragma unroll
          for (int dy = 0; dy < K; ++dy) {
            uint32_t a[4];
            ldsm_x4_t(a, asrc + dy * xp + 8 * j);
            mma16816<T>(D[dy], a, bq[0] & m0, bq[1] & m1);
            if constexpr (FC_BWD_DZ_SPLIT) mma16816<T>(D[dy], a, bq[2] & m0, bq[3] & m1);
          }
        }
      }
    }
    __syncwarp();  // (5) overwrites the x plane

    // (5) dx_l on the tile: A = dz hi / lo rows 16 fr + a .., B = the flipped kernel's hi / lo
    {
      uint32_t bf[NWD];
      load_words<NWD>(bf, fr + NWD);
      const int mi = lane >> 3;
#pragma unroll 1
      for (int fr2 = 0; fr2 < P.nrowT; ++fr2) {
#pragma unroll 1
        for (int fc2 = 0; fc2 < P.ncolT; ++fc2) {
          float dh[4] = {0.f, 0.f, 0.f, 0.f}, dl[4] = {0.f, 0.f, 0.f, 0.f};
          const int off = (16 * fr2 + (lane & 7) + 8 * (mi & 1)) * dp + 8 * fc2 + 8 * (mi >> 1);
#pragma unroll
          for (int a = 0; a < K; ++a) {
            uint32_t ah[4];
            ldsm_x4(ah, Dh + off + a * dp);
            mma16816<T>(dh, ah, bf[(a * NS) * 2], bf[(a * NS) * 2 + 1]);
            if constexpr (NS == 2) mma16816<T>(dl, ah, bf[(a * NS + 1) * 2], bf[(a * NS + 1) * 2 + 1]);
#if FC_BWD_DZ_SPLIT
            uint32_t al[4];
            ldsm_x4(al, Dl + off + a * dp);
            mma16816<T>(dl, al, bf[(a * NS) * 2], bf[(a * NS) * 2 + 1]);
#endif
          }
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int ti = 16 * fr2 + g + 8 * (i >> 1), tj = 8 * fc2 + 2 * t + (i & 1);
            if (ti < thl && tj < twl) Ow[ti * TW + tj] = dh[i] + dl[i];
          }
        }
      }
    }
    if ((nf & 0x80008000u) != 0u) *P.flag = 1;
    nf = 0;
    __syncthreads();

    // (6) per tile position, 8 channels: gate partial and dx_l (+ scale * dout * g_{l-1})
    {
      const float* n0 = reinterpret_cast<const float*>(sm + P.offN);
      const float* o0 = reinterpret_cast<const float*>(sm + P.offX);
      if (P.dout_vec && P.out_vec && nvalid == CB)
        level_epilogue<ROLE, true>(P, n0, P.planeN / 4, np, p, o0, P.planeX / 4, thl, twl, b, c0, h0, w0, cb, nvalid,
                                   warp, lane);
      else
        level_epilogue<ROLE, false>(P, n0, P.planeN / 4, np, p, o0, P.planeX / 4, thl, twl, b, c0, h0, w0, cb, nvalid,
                                    warp, lane);
    }
  }
  __syncthreads();

  // weight-gradient partial of the slot: tap (dy, dx) = sum_n D_dy[n + dx][n]
  {
    float* S = reinterpret_cast<float*>(Xw);  // K * 128 floats (the host sizes the x plane for it)
#pragma unroll
    for (int dy = 0; dy < K; ++dy)
#pragma unroll
      for (int i = 0; i < 4; ++i) S[dy * 128 + (g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)] = D[dy][i];
    __syncwarp();
#pragma unroll 1
    for (int q = lane; q < K * K; q += 32) {
      const int dy = q / K, dx = q - dy * K;
      float s = 0.f;
#pragma unroll
      for (int n = 0; n < 8; ++n) s += S[dy * 128 + (n + dx) * 8 + n];
      if (warp < nvalid) P.gw_part[((int64_t)slot * K * K + q) * P.C + c0 + warp] = s;
    }
  }
}

}  // namespace fcc
}  // namespace focalnet
