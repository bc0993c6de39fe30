// Tensor-core forward of the local levels (fp16/bf16, 2 or 3 levels, every k <= 9); included by
// focal_context_cuda.cu only. Planned by plan_mma (focal_context_cuda.cu), which falls back to the
// FMA kernels (fc_fused_kernel) for every other case.
//
// The taps of one depthwise level along a row are a banded (Toeplitz) matrix per channel:
//   x_out[y][x0 + n] = sum_dy sum_i x_in[y + dy][x0 - r + i] * B_dy[i][n],  B_dy[i][n] = w[dy][i - n]
// (0 <= i - n < k, else 0), n < 8, i < 16: one mma.m16n8k16 per kernel row dy gives 16 rows x 8
// columns of outputs of one channel (K = 16 >= 8 + 2r for k <= 9). The A operand (16 rows x 16
// columns of the level's input) comes from shared memory with one ldmatrix.x4 whose row addresses
// shift by dy; B (the weights) lives in registers for the whole block. fp32 accumulate. Weights
// rounded to T, as eager PyTorch's fp16/bf16 (autocast) convolution has them: one mma per dy
// (FC_MMA_BF16_NS=2 builds split bf16 weights hi + lo, two mmas per dy, weights exact to ~2^-16).
//
// Block = one image, one TH x TW tile, 8 channels; warp w owns channel c0 + w from staging to the
// output (its planes of every buffer are read and written by that warp only: __syncwarp between
// levels, block barriers only around staging and the transposed output store).
// Shared memory (16-bit values, one plane per channel): slot 0 holds ctx on tile + halo (then
// x_2, then the output tile), slot 1 holds x_1; the gates of the tile (fp32, per level).
// Level j computes nrow[j] x ncol[j] subtiles of 16 x 8 on its region (tile + the halo of the later
// levels), GELU in fp32, zero outside the image and the region, and stores them rounded to T for
// level j+1 (the precision eager PyTorch keeps between levels in fp16/bf16). Columns: every
// column a level reads was written (ncol[j] >= ncol[j+1] + 1), since a garbage value would meet
// B's zeros (NaN * 0); rows a level reads past what was written only reach output rows that the
// epilogue discards (select, not multiply).
// The last level's tile outputs stay in registers; the gated sum reads x_1 (and x_2) at the tile
// positions from their buffers, and the output is written through shared memory in 16-byte
// vectors of 8 channels. Pooled partials as fc_fused_kernel's ([B][ntiles][C]).
//
// Values this path cannot reproduce exactly as the reference does -- a non-finite ctx value or
// weight, a weight or level value outside T's finite range (fp16 overflow) -- set *P.flag; the
// host then runs the FMA kernels for the whole call (their launches test the flag and return at
// once when it is 0), and fc_pool_finish_kernel takes their pooled partials.
#pragma once

#include "fc_device.cuh"

namespace focalnet {
namespace fcc {

constexpr int MMA_NT = 256;   // 8 warps = 8 channels
constexpr int MMA_KMAX = 9;   // 8 outputs + 2 * (k / 2) inputs fit one k-step of 16
// bf16 weights: 1 (shipped) = rounded to bf16, as eager autocast's conv has them (one mma per kernel row;
// out error vs fp64 3.9e-3 in the emulator, tolerance 1e-2); 2 = hi + lo parts (two mmas per row, out error
// 3.0e-3: a build-time knob). The backward's level kernels use the same split.
#ifndef FC_MMA_BF16_NS
#define FC_MMA_BF16_NS 1
#endif

struct MmaParams {
  int64_t B, H, W, C;
  int L;
  int k[3];
  int Rn[3];          // halo of level j's output region (sum of the radii of the later levels)
  int H0;             // halo of the staged ctx
  int nrow[3], ncol[3];
  int pitch[3];       // elements per row of the buffer holding level j's input
  int srows, scols;   // staged rows / columns of ctx (rows past srows only feed discarded outputs)
  int opitch;         // elements per row of the output tile in slot 0
  int TH, TW, ntw, ntiles, cblocks;
  int offS[2], planeS[2], offG;  // bytes
  const void* ctx;
  int64_t cs[4];
  int ctx_vec16, ctx_vec8;
  const void* gates;
  int64_t gs[4];
  const float* w[3];
  void* out;
  int out_vec;
  float* pool_part;
  int* flag;
  float scale;
  void* xws[2];       // recompute mode: x_1, x_2 (WsT<T> contiguous [B][H][W][C]) of the backward's workspace
  int xws_vec;        // their 8-channel vectors are 16-byte aligned
};

template <typename T> struct MmaT;
template <> struct MmaT<__half> {
  static constexpr int NS = 1;
  static constexpr float maxv = 65504.f;
  static constexpr uint32_t expmask = 0x7c00u;
};
template <> struct MmaT<__nv_bfloat16> {
  static constexpr int NS = FC_MMA_BF16_NS;
  static constexpr float maxv = 3.38953139e38f;
  static constexpr uint32_t expmask = 0x7f80u;
};

#ifdef FC_EMULATION
// ldmatrix.x4 / mma.m16n8k16 by the PTX fragment layouts, through the emulator's warp exchange.
inline void ldsm_x4(uint32_t (&a)[4], const void* p) { emu_ldsm_x4(a, p); }
template <typename T>
inline void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu_mma16816(c, a, b0, b1, std::is_same<T, __half>::value);
}
#else
__device__ __forceinline__ void ldsm_x4(uint32_t (&a)[4], const void* p) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
               : "r"(s));
}
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same<T, __half>::value)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

// B fragments of every level, written once per call by fc_mma_bfrag_kernel into the workspace:
// frag[(c * 32 + lane) * nwp + i], i over (level, dy, s, h) = {rows 2t, 2t+1 | rows 2t+8, 2t+9} of
// column n = g (g = lane / 4, t = lane % 4) of B_dy, hi (s = 0) and lo (s = 1, bf16) parts of the
// fp32 weights; nwp = NS * 2 * sum(k) rounded up to 4 words (16-byte loads per lane).
// Weights that are not finite, or outside T's range, set *flag (the FMA fallback runs).
// One kernel row's B-fragment words of a lane: v[h][e] = B[2t + 8h + e][g]; hi parts, then lo (NS = 2).
template <typename T>
__device__ __forceinline__ int put_bfrag_row(uint32_t* d, int i, const float (&v)[2][2]) {
  const T* tag = nullptr;
  uint32_t hi[2], lo[2];
  for (int h = 0; h < 2; ++h) {
    hi[h] = pack2(v[h][0], v[h][1], tag);
    const float2 hf = unpack2(hi[h], tag);
    lo[h] = pack2(v[h][0] - hf.x, v[h][1] - hf.y, tag);
  }
  d[i++] = hi[0];
  d[i++] = hi[1];
  if (MmaT<T>::NS == 2) {
    d[i++] = lo[0];
    d[i++] = lo[1];
  }
  return i;
}

template <typename T>
__global__ void __launch_bounds__(NT) fc_mma_bfrag_kernel(const MmaParams P, uint32_t* __restrict__ frag, int nwp) {
  const int64_t idx = blockIdx.x * (int64_t)NT + threadIdx.x;
  if (idx >= P.C * 32) return;
  const int64_t c = idx / 32;
  const int lane = (int)(idx % 32), g = lane >> 2, t = lane & 3;
  uint32_t* d = frag + idx * nwp;
  bool bad = false;
  int i = 0;
  for (int j = 0; j < P.L; ++j) {
    const int K = P.k[j];
    const float* w = P.w[j] + c * K * K;
    for (int dy = 0; dy < K; ++dy) {
      float v[2][2];
      for (int h = 0; h < 2; ++h)
        for (int e = 0; e < 2; ++e) {
          const int dx = 2 * t + 8 * h + e - g;
          v[h][e] = (dx >= 0 && dx < K) ? w[dy * K + dx] : 0.f;
          bad |= !(fabsf(v[h][e]) <= MmaT<T>::maxv);
        }
      i = put_bfrag_row<T>(d, i, v);
    }
  }
  for (; i < nwp; ++i) d[i] = 0u;
  if (bad) *P.flag = 1;
}

// One 16 x 8 subtile: rows r0.., columns col0.. of the level's output region, from the level's
// input plane (pitch elements per row); bf = the level's K * NS * 2 fragment words.
template <typename T, int K>
__device__ __forceinline__ void mma_subtile(float (&c)[4], const T* plane, int pitch, int r0, int col0,
                                            const uint32_t* bf, int lane) {
  constexpr int NS = MmaT<T>::NS;
  float d[NS][4];
#pragma unroll
  for (int s = 0; s < NS; ++s)
#pragma unroll
    for (int i = 0; i < 4; ++i) d[s][i] = 0.f;
  const int mi = lane >> 3;
  const T* p = plane + (r0 + (lane & 7) + 8 * (mi & 1)) * pitch + col0 + 8 * (mi >> 1);
#pragma unroll
  for (int dy = 0; dy < K; ++dy) {
    uint32_t a[4];
    ldsm_x4(a, p + dy * pitch);
#pragma unroll
    for (int s = 0; s < NS; ++s) mma16816<T>(d[s], a, bf[(dy * NS + s) * 2], bf[(dy * NS + s) * 2 + 1]);
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    c[i] = d[0][i];
    if constexpr (NS == 2) c[i] += d[1][i];
  }
}

// Non-finite (or overflowed) 16-bit values: exponent bits all ones. Per 32-bit word of two values,
// ((u & em2) + add2) has bit 15 / 31 set exactly for such a half.
template <typename T>
__device__ __forceinline__ uint32_t nonfinite2(uint32_t u) {
  constexpr uint32_t em = MmaT<T>::expmask, em2 = em | (em << 16);
  constexpr uint32_t add = (0x8000u - em), add2 = add | (add << 16);
  return (u & em2) + add2;
}

// Level j < L-1: its region -> GELU -> rounded to T into the next buffer (zero outside the image
// and the region); returns the OR of nonfinite2 over what it stored.
template <typename T, int K>
__device__ __forceinline__ uint32_t mma_level(const MmaParams& P, int j, const T* src, T* dst, int dpitch,
                                              const uint32_t* bf, int h0, int w0, int lane) {
  const T* tag = nullptr;
  const int g = lane >> 2, t = lane & 3;
  const int Rn = P.Rn[j];
  const int nrow = P.nrow[j], ncol = P.ncol[j], pitch = P.pitch[j];
  // rows / columns of the region that are inside the image and the region: [lo, hi)
  const int rlo = max(0, Rn - h0), rhi = min(P.TH + 2 * Rn, (int)P.H - h0 + Rn);
  const int clo = max(0, Rn - w0), chi = min(P.TW + 2 * Rn, (int)P.W - w0 + Rn);
  uint32_t nf = 0;
  for (int sr = 0; sr < nrow; ++sr) {
    const int ry = 16 * sr + g;
    const bool okr0 = ry >= rlo && ry < rhi;
    const bool okr1 = ry + 8 >= rlo && ry + 8 < rhi;
    T* d0 = dst + ry * dpitch + 2 * t;
    for (int sc = 0; sc < ncol; ++sc) {
      float c[4];
      mma_subtile<T, K>(c, src, pitch, 16 * sr, 8 * sc, bf, lane);
      const int cx = 8 * sc + 2 * t;
      const bool okc0 = cx >= clo && cx < chi;
      const bool okc1 = cx + 1 >= clo && cx + 1 < chi;
      const float v0 = gelu_f(c[0]), v1 = gelu_f(c[1]), v2 = gelu_f(c[2]), v3 = gelu_f(c[3]);
      const uint32_t u0 = pack2((okr0 && okc0) ? v0 : 0.f, (okr0 && okc1) ? v1 : 0.f, tag);
      const uint32_t u1 = pack2((okr1 && okc0) ? v2 : 0.f, (okr1 && okc1) ? v3 : 0.f, tag);
      // fp16: a level value past 65504 (rounded to inf here, finite in fp32 in the reference and the
      // FMA kernels); bf16 has fp32's range, and non-finite inputs were caught at staging
      if constexpr (std::is_same<T, __half>::value) nf |= nonfinite2<T>(u0) | nonfinite2<T>(u1);
      *reinterpret_cast<uint32_t*>(d0 + 8 * sc) = u0;
      *reinterpret_cast<uint32_t*>(d0 + 8 * dpitch + 8 * sc) = u1;
    }
  }
  return nf;
}

// ctx on tile + halo -> the 8 channel planes of slot 0 (raw 16-bit values, 0 outside the image and
// for channels >= nvalid): rows by warp, column pairs by lane (one 32-bit store per channel and
// pair); MODE 2: 16-byte loads of 8 channels, 1: two 8-byte loads, 0: per channel.
template <typename T, int MODE>
__device__ __forceinline__ void mma_load8(uint32_t (&q)[4], const uint16_t* p, bool in, int nvalid, int64_t cs3) {
#pragma unroll
  for (int i = 0; i < 4; ++i) q[i] = 0u;
  if (!in) return;
  if constexpr (MODE == 2) {
    FC_CHECK_ALIGN16(p);
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    q[0] = v.x; q[1] = v.y; q[2] = v.z; q[3] = v.w;
  } else if constexpr (MODE == 1) {
    const uint2 v0 = *reinterpret_cast<const uint2*>(p);
    const uint2 v1 = *reinterpret_cast<const uint2*>(p + 4);
    q[0] = v0.x; q[1] = v0.y; q[2] = v1.x; q[3] = v1.y;
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i)
      if (i < nvalid) q[i / 2] |= (uint32_t)p[i * cs3] << (16 * (i % 2));
  }
}

// rows x cols positions from image position (gh0, gw0) of the map at `base` (image and first channel;
// strides cs1, cs2, cs3 in elements) -> the 8 channel planes at s0 (plane = 16-bit elements per
// plane, pitch per row); returns the OR of nonfinite2 over the staged words. Both tensor-core
// kernels stage their 16-bit input this way (the forward ctx, the backward's level input x_l).
template <typename T, int MODE>
__device__ __forceinline__ uint32_t stage_planes(uint16_t* s0, int plane, int pitch, int rows, int cols,
                                                 const uint16_t* base, int64_t cs1, int64_t cs2, int64_t cs3,
                                                 int gh0, int gw0, int H, int W, int nvalid, int warp, int lane) {
  uint32_t nf = 0;
  const int64_t step = 64 * cs2;
  const uint16_t* colp = base + (int64_t)(gw0 + 2 * lane) * cs2 + (int64_t)(gh0 + warp) * cs1;
#pragma unroll 1
  for (int r = warp; r < rows; r += NWARP) {
    const int gh = gh0 + r;
    const bool rin = (unsigned)gh < (unsigned)H;
    uint32_t* d = reinterpret_cast<uint32_t*>(s0 + r * pitch);
    const uint16_t* p = colp;
    colp += NWARP * cs1;
#pragma unroll 1
    for (int s = 2 * lane; s < cols; s += 64, p += step) {
      const int gw = gw0 + s;
      uint32_t qa[4], qb[4];
      mma_load8<T, MODE>(qa, p, rin && (unsigned)gw < (unsigned)W, nvalid, cs3);
      mma_load8<T, MODE>(qb, p + cs2, rin && (unsigned)(gw + 1) < (unsigned)W, nvalid, cs3);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        nf |= nonfinite2<T>(qa[i]) | nonfinite2<T>(qb[i]);
        d[(2 * i) * (plane / 2) + s / 2] = __byte_perm(qa[i], qb[i], 0x5410);      // channel 2i: (s, s+1)
        d[(2 * i + 1) * (plane / 2) + s / 2] = __byte_perm(qa[i], qb[i], 0x7632);  // channel 2i+1
      }
    }
  }
  return nf;
}

// stage_planes with the widest load the host's alignment flags allow for the map (v16: 16-byte
// vectors of 8 channels, v8: two 8-byte halves; only when all 8 channels are valid): one unswitched
// loop per width.
template <typename T>
__device__ __forceinline__ uint32_t stage_planes_vec(bool v16, bool v8, uint16_t* s0, int plane, int pitch, int rows,
                                                     int cols, const uint16_t* base, int64_t cs1, int64_t cs2,
                                                     int64_t cs3, int gh0, int gw0, int H, int W, int nvalid, int warp,
                                                     int lane) {
  if (v16 && nvalid == CB)
    return stage_planes<T, 2>(s0, plane, pitch, rows, cols, base, cs1, cs2, cs3, gh0, gw0, H, W, nvalid, warp, lane);
  if (v8 && nvalid == CB)
    return stage_planes<T, 1>(s0, plane, pitch, rows, cols, base, cs1, cs2, cs3, gh0, gw0, H, W, nvalid, warp, lane);
  return stage_planes<T, 0>(s0, plane, pitch, rows, cols, base, cs1, cs2, cs3, gh0, gw0, H, W, nvalid, warp, lane);
}

// N fragment words (N % 4 == 0) from 16-byte aligned global memory
template <int N>
__device__ __forceinline__ void load_words(uint32_t (&d)[N], const uint32_t* s) {
  static_assert(N % 4 == 0, "whole 16-byte vectors");
  FC_CHECK_ALIGN16(s);
#pragma unroll
  for (int i = 0; i < N / 4; ++i) {
    const uint4 v = reinterpret_cast<const uint4*>(s)[i];
    d[4 * i] = v.x;
    d[4 * i + 1] = v.y;
    d[4 * i + 2] = v.z;
    d[4 * i + 3] = v.w;
  }
}

// 8 channels of one position as raw 16-bit values: one 16-byte store where vec (all 8 valid, aligned), else
// one per valid channel
__device__ __forceinline__ void store_u16x8(uint16_t* o, int nvalid, bool vec, const uint16_t (&u)[8]) {
  if (vec) {
    FC_CHECK_ALIGN16(o);
    uint4 q;
    memcpy(&q, u, 16);
    *reinterpret_cast<uint4*>(o) = q;
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i)
      if (i < nvalid) o[i] = u[i];
  }
}

// REC (the backward's recompute): only the levels before the last, whose tile values (rounded to T, as
// the forward used them) go to P.xws (WsT<T>: exact); no gates, output or pooled partials.
template <typename T, int LC, int K0, int K1, int K2, bool REC>
__global__ void __launch_bounds__(MMA_NT, 2) fc_mma_fwd_kernel(const MmaParams P, const uint32_t* __restrict__ frag,
                                                               int nwp) {
  constexpr int NS = MmaT<T>::NS;
  constexpr int NW0 = K0 * NS * 2, NW1 = K1 * NS * 2, NW2 = (LC > 2 ? K2 : 0) * NS * 2;
  constexpr int NWP = (NW0 + NW1 + NW2 + 3) / 4 * 4;
  FC_DYN_SMEM(smf);
  char* sm = reinterpret_cast<char*>(smf);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  // 32-bit index math: the host keeps the grid below 2^31 blocks
  unsigned bid = blockIdx.x;
  const int cb = (int)(bid % (unsigned)P.cblocks);
  bid /= (unsigned)P.cblocks;
  const int tile = (int)(bid % (unsigned)P.ntiles);
  const int64_t b = bid / (unsigned)P.ntiles;
  const int tr = (int)((unsigned)tile / (unsigned)P.ntw);
  const int h0 = tr * P.TH, w0 = (tile - tr * P.ntw) * P.TW;
  const int c0 = cb * CB;
  const int nvalid = min(CB, (int)P.C - c0);
  const bool cok = warp < nvalid;
  const int H = (int)P.H, W = (int)P.W, TH = P.TH, TW = P.TW;
  const int tpos = TH * TW;
  uint32_t nf = 0;

  // B fragments (registers, whole block): 16-byte loads of this lane's words
  uint32_t bf[NWP];
  load_words<NWP>(bf, frag + ((int64_t)(c0 + (cok ? warp : 0)) * 32 + lane) * nwp);
  // gates of the tile, fp32 [level][TH][TW] (0 outside the image): rows by warp, columns by lane
  float* gsm = reinterpret_cast<float*>(sm + P.offG);
  if constexpr (!REC) {
    const int64_t gs1 = P.gs[1], gs2 = P.gs[2], gs3 = P.gs[3];
    const T* gp = static_cast<const T*>(P.gates) + b * P.gs[0] + (int64_t)(h0 + warp) * gs1 + (int64_t)(w0 + lane) * gs2;
#pragma unroll 1
    for (int ty = warp; ty < TH; ty += NWARP) {
      const int gh = h0 + ty;
      const T* q = gp;
      gp += NWARP * gs1;
      float* gd = gsm + ty * TW;
#pragma unroll 1
      for (int tx = lane; tx < TW; tx += 32, q += 32 * gs2) {
        const bool in = gh < H && w0 + tx < W;
        float v[LC];
#pragma unroll
        for (int l = 0; l < LC; ++l) v[l] = in ? to_f<T>(q[l * gs3]) : 0.f;
#pragma unroll
        for (int l = 0; l < LC; ++l) gd[l * tpos + tx] = v[l];
      }
    }
  }
  {
    uint16_t* s0 = reinterpret_cast<uint16_t*>(sm + P.offS[0]);
    const int plane = P.planeS[0] / 2;
    const uint16_t* base = reinterpret_cast<const uint16_t*>(static_cast<const T*>(P.ctx) + b * P.cs[0] +
                                                             (int64_t)c0 * P.cs[3]);
    nf |= stage_planes_vec<T>(P.ctx_vec16, P.ctx_vec8, s0, plane, P.pitch[0], P.srows, P.scols, base, P.cs[1],
                              P.cs[2], P.cs[3], h0 - P.H0, w0 - P.H0, H, W, nvalid, warp, lane);
  }
  __syncthreads();

  T* slot0 = reinterpret_cast<T*>(sm + P.offS[0] + warp * P.planeS[0]);
  T* slot1 = reinterpret_cast<T*>(sm + P.offS[1] + warp * P.planeS[1]);
  // level 0: slot 0 -> slot 1; level 1 (of 3): slot 1 -> slot 0
  nf |= mma_level<T, K0>(P, 0, slot0, slot1, P.pitch[1], bf, h0, w0, lane);
  __syncwarp();
  if constexpr (LC > 2) {
    nf |= mma_level<T, K1>(P, 1, slot1, slot0, P.pitch[2], bf + NW0, h0, w0, lane);
    __syncwarp();
  }
  const int thl = min(TH, H - h0), twl = min(TW, W - w0);
  const int r1 = P.Rn[0], p1 = P.pitch[1];
  const int r2 = LC > 2 ? P.Rn[1] : 0, p2 = P.pitch[LC > 2 ? 2 : 1];
  if constexpr (REC) {
    if ((nf & 0x80008000u) != 0u) *P.flag = 1;
    __syncthreads();
    // x_1 (slot 1) and x_2 (slot 0, 3 levels) at the tile positions -> workspace, 8 channels per
    // position (one 16-byte store for bf16, two for fp32); rows by warp, columns by lane
    const T* tag = nullptr;
    const int pl1 = P.planeS[1] / 2, pl0 = P.planeS[0] / 2;
    const uint16_t* x1s = reinterpret_cast<const uint16_t*>(sm + P.offS[1]) + r1 * p1 + r1;
    const uint16_t* x2s = reinterpret_cast<const uint16_t*>(sm + P.offS[0]) + r2 * p2 + r2;
    const bool wvec = P.xws_vec && nvalid == CB;
    using WT = WsT<T>;
#pragma unroll 1
    for (int ty = warp; ty < thl; ty += NWARP) {
      const int64_t row = (((int64_t)b * H + h0 + ty) * W + w0) * P.C + c0;
#pragma unroll 1
      for (int tx = lane; tx < twl; tx += 32) {
        if constexpr (std::is_same<WT, T>::value) {
          // bf16 maps: the planes' 16-bit values copied as they are
          uint16_t u[8];
#pragma unroll
          for (int i = 0; i < 8; ++i) u[i] = x1s[i * pl1 + ty * p1 + tx];
          store_u16x8(static_cast<uint16_t*>(P.xws[0]) + row + (int64_t)tx * P.C, nvalid, wvec, u);
          if constexpr (LC > 2) {
#pragma unroll
            for (int i = 0; i < 8; ++i) u[i] = x2s[i * pl0 + ty * p2 + tx];
            store_u16x8(static_cast<uint16_t*>(P.xws[1]) + row + (int64_t)tx * P.C, nvalid, wvec, u);
          }
        } else {
          float v[8];
#pragma unroll
          for (int i = 0; i < 8; ++i) v[i] = unpack2((uint32_t)x1s[i * pl1 + ty * p1 + tx], tag).x;
          store8<WT>(static_cast<WT*>(P.xws[0]), row + (int64_t)tx * P.C, nvalid, wvec, v);
          if constexpr (LC > 2) {
#pragma unroll
            for (int i = 0; i < 8; ++i) v[i] = unpack2((uint32_t)x2s[i * pl0 + ty * p2 + tx], tag).x;
            store8<WT>(static_cast<WT*>(P.xws[1]), row + (int64_t)tx * P.C, nvalid, wvec, v);
          }
        }
      }
    }
    return;
  }
  // last level on the tile: out = s * (g_{L-1} x_L + sum_l g_l x_{l+1}) with x_1 (slot 1) and x_2
  // (slot 0, 3 levels) read at the position; the result goes, rounded to T, where it does not
  // disturb what is still to be read: over x_1 at the same position (3 levels: only this thread
  // reads it), or into slot 0 (2 levels: ctx is no longer needed)
  constexpr int KL = LC > 2 ? K2 : K1;
  constexpr int OFFL = LC > 2 ? NW0 + NW1 : NW0;
  const T* lsrc = LC > 2 ? slot0 : slot1;
  const int lp = P.pitch[LC - 1];
  const int nrowL = P.nrow[LC - 1], ncolL = P.ncol[LC - 1];
  T* x1p = slot1 + r1 * p1 + r1;
  T* obuf = LC > 2 ? x1p : slot0;
  const int op = LC > 2 ? p1 : P.opitch;
  const float scale = P.scale;
  float psum = 0.f;
  // Straight-line epilogue: every lane computes its 4 values of each subtile, loads from clamped or padded
  // positions (a row past the tile reads the tile's last gate row; a column past TW reads on, into the next
  // row or the 32-byte pad after the gates), and only the stores and the pooled sum are predicated, so no
  // branch splits the warp per value.
  for (int fr = 0; fr < nrowL; ++fr) {
    const int ty0 = 16 * fr + g;
    const bool ra = ty0 < thl, rb = ty0 + 8 < thl;
    // this lane's two rows (ty0, ty0 + 8) at column 2t of the first subtile; walk 8 columns per step
    const T* x1a = x1p + ty0 * p1 + 2 * t;
    const T* x1b = x1a + 8 * p1;
    const T* x2a = slot0 + (ty0 + r2) * p2 + r2 + 2 * t;
    const T* x2b = x2a + 8 * p2;
    const float* ga = gsm + min(ty0, TH - 1) * TW + 2 * t;
    const float* gb = gsm + min(ty0 + 8, TH - 1) * TW + 2 * t;
    T* oa = obuf + ty0 * op + 2 * t;
    T* ob = oa + 8 * op;
    for (int fc = 0; fc < ncolL; ++fc) {
      float c[4];
      mma_subtile<T, KL>(c, lsrc, lp, 16 * fr, 8 * fc, bf + OFFL, lane);
      const int tx0 = 8 * fc + 2 * t;
      const bool ce0 = tx0 < twl, ce1 = tx0 + 1 < twl;
      const bool ok[4] = {ra && ce0, ra && ce1, rb && ce0, rb && ce1};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int e = i & 1;
        const bool hb = i >= 2;
        const float* gq = (hb ? gb : ga) + e;
        const float v = gelu_f(c[i]);
        float o = gq[(LC - 1) * tpos] * v;
        o = fmaf(gq[0], to_f<T>((hb ? x1b : x1a)[e]), o);
        if constexpr (LC > 2) o = fmaf(gq[tpos], to_f<T>((hb ? x2b : x2a)[e]), o);
        psum += ok[i] ? v : 0.f;
        if (ok[i]) (hb ? ob : oa)[e] = from_f<T>(o * scale);
      }
      x1a += 8; x1b += 8; x2a += 8; x2b += 8; ga += 8; gb += 8; oa += 8; ob += 8;
    }
  }
  // pooled partial of this tile (channel of this warp)
  psum += __shfl_xor_sync(0xffffffffu, psum, 16);
  psum += __shfl_xor_sync(0xffffffffu, psum, 8);
  psum += __shfl_xor_sync(0xffffffffu, psum, 4);
  psum += __shfl_xor_sync(0xffffffffu, psum, 2);
  psum += __shfl_xor_sync(0xffffffffu, psum, 1);
  if (lane == 0 && cok) P.pool_part[(b * P.ntiles + tile) * P.C + c0 + warp] = psum;
  if ((nf & 0x80008000u) != 0u) *P.flag = 1;
  __syncthreads();
  // output tile: 8 channel planes -> 16-byte stores of 8 channels; rows by warp, columns by lane
  {
    const int obase = (LC > 2 ? P.offS[1] : P.offS[0]) + 2 * (LC > 2 ? r1 * p1 + r1 : 0);
    const uint16_t* ob = reinterpret_cast<const uint16_t*>(sm + obase);
    const int plane = (LC > 2 ? P.planeS[1] : P.planeS[0]) / 2;
    uint16_t* outp = static_cast<uint16_t*>(P.out);
#pragma unroll 1
    for (int ty = warp; ty < thl; ty += NWARP) {
      uint16_t* orow = outp + (((int64_t)b * H + h0 + ty) * W + w0) * P.C + c0;
#pragma unroll 1
      for (int tx = lane; tx < twl; tx += 32) {
        uint16_t u[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) u[i] = ob[i * plane + ty * op + tx];
        store_u16x8(orow + (int64_t)tx * P.C, nvalid, P.out_vec && nvalid == CB, u);
      }
    }
  }
}

}  // namespace fcc
}  // namespace focalnet
