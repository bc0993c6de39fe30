// Device helpers of the CUDA focal-context backend: constants, GELU, dtype conversion, 8-channel
// vector loads/stores and the register-blocked depthwise-conv step that every kernel uses.
//
// Shared-memory maps hold fp32 values in the layout [row][pitch][CB]: CB = 8 channels of one
// position are contiguous, so a warp of 32 lanes = 4 groups of 8 channels. The 4 groups of a warp
// always work on 4 consecutive rows of the same columns and every pitch is odd, so the 32 lanes hit
// 32 different banks (offset between groups = 8 * pitch * d words, d = 1..3, distinct mod 32).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

// FC_DYN_SMEM / FC_LAUNCH let a CPU emulation harness (threads + barriers, used to execute these
// kernels where no GPU exists) compile the very same source; with nvcc they are the usual forms.
#ifndef FC_EMULATION
#define FC_DYN_SMEM(name)                   \
  extern __shared__ float4 fc_smem_f4[]; \
  float* name = reinterpret_cast<float*>(fc_smem_f4)
#define FC_LAUNCH(fn, grid, block, smem, stream, ...) fn<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#define FC_CHECK_ALIGN16(ptr) ((void)0)
#define FC_OPAQUE(v) asm volatile("" : "+r"(v))  // the compiler must not reuse what it knows of v
#endif
#ifndef FC_OPAQUE
#define FC_OPAQUE(v) ((void)0)
#endif

namespace focalnet {
namespace fcc {

constexpr int CB = 8;             // channels per block (one 16-byte fp16/bf16 vector)
constexpr int NT = 256;           // threads per block
constexpr int NWARP = NT / 32;    // 8 warps
constexpr int GPW = 32 / CB;      // channel groups per warp (4)
constexpr int NGRP = NT / CB;     // channel groups per block (32)
constexpr int KMAX_ALL = 15;      // largest kernel size of the contract

// Outputs computed per thread and item along the row (register blocking of the conv).
__host__ __device__ constexpr int vblock(int kmax) { return kmax <= 3 ? 4 : 8; }

// Fused forward: outputs per thread item along the row (FV), tile positions per thread held in
// registers (PSLOTS), and the padded tile width of the position map (32 position lanes per block
// = 32 / tile_wp rows of tile_wp columns; the planner keeps TW <= 32, TH * tile_wp(TW) <= 32 * PSLOTS).
constexpr int FV = 8;
constexpr int FV_SHORT = 4;
constexpr int PSLOTS = 16;
__host__ __device__ constexpr int tile_wp(int tw) { return tw <= 8 ? 8 : (tw <= 16 ? 16 : 32); }

// ------------------------------------------------------------------------------------------
// math
// ------------------------------------------------------------------------------------------
// 2^a: one MUFU.EX2 on the GPU (ex2.approx.ftz: <= 2 ulp, results below 2^-126 flushed to 0).
__device__ __forceinline__ float fc_ex2(float a) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(a));
  return r;
#else
  return exp2f(a);
#endif
}

// Exact-erf GELU, branch-free: GELU(x) = x * Phi(x), Phi(x) = 1 - h (x >= 0) or h (x < 0) with
// h = Phi(-|x|) = erfc(|x|/sqrt2)/2 = 2^P(|x|), P a degree-8 polynomial (P(0) = -1 exactly),
// weighted minimax fit of log2 Phi(-t) on [0, 5.6] (absolute error of h; past 5.6, h < 2^-24
// and P decreases monotonically to -inf without NaN, checked in fp32 up to FLT_MAX).
// 8 FFMA + MUFU.EX2 + FADD + FSETP + FSEL + FMUL, vs ~25 instructions with erff.
// Host check against double erfc on 4.2 M points of [-12, 12] plus log-spaced |x| in
// [1e-30, 31.6] (fp32 Horner with fma, exact 2^P): the erf it implies, 1 - 2h, is within
// 9.9e-8 = 1.7 ulp of erf (ulp 5.96e-8 below 1), and the GELU error is <= 1.03e-7 * max(1, |x|)
// (0.5 x (1 + erff) with a correctly rounded erff: 1.06e-7); ex2.approx adds <= 2 ulp of h.
// Non-finite values as the erff form: GELU(NaN) = NaN, GELU(+inf) = +inf (h = 0), GELU(-inf) =
// -inf * 0 = NaN, and GELU(x) = -0 for x below about -13 (h flushed to 0; erff form: 1 + erf = 0).
// h = Phi(-t) = 2^P(t) for t = |x| >= 0 (the polynomial above).
__device__ __forceinline__ float phi_tail(float t) {
  float p = -2.7718233468476683e-06f;
  p = fmaf(p, t, 3.8618094549747184e-05f);
  p = fmaf(p, t, -1.825353247113526e-04f);
  p = fmaf(p, t, -1.458988554077223e-04f);
  p = fmaf(p, t, 7.075508125126362e-03f);
  p = fmaf(p, t, -5.250505357980728e-02f);
  p = fmaf(p, t, -4.5920491218566895e-01f);
  p = fmaf(p, t, -1.1511057615280151f);
  p = fmaf(p, t, -1.0f);
  return fc_ex2(p);
}
__device__ __forceinline__ float gelu_f(float x) {
  const float h = phi_tail(fabsf(x));
  return x * (x >= 0.f ? 1.f - h : h);
}
__device__ __forceinline__ float gelu_grad_f(float z) {
  return 0.5f * (1.0f + erff(z * 0.70710678118654752440f)) +
         z * expf(-0.5f * z * z) * 0.39894228040143267794f;
}
// GELU(x) and GELU'(x) = Phi(x) + x phi(x) together, branch-free: Phi from gelu_f's polynomial (h =
// phi_tail(|x|)), phi(x) = 2^(-x^2 log2(e) / 2) / sqrt(2 pi): 10 FFMA/FMUL + 2 MUFU.EX2 + a few, against
// ~45 instructions for gelu_f + gelu_grad_f (erff, expf). Error of GELU' <= 1.5e-7 * max(1, |x|)
// (host check against double erf/exp at 24 M points of [-12, 12], exact 2^a); ex2.approx adds <= 2
// ulp to each 2^a, and the rounding of a = -0.72 x^2 adds |a| * 6e-8 relative to phi (at |x| = 4:
// 5e-7 of a phi of 1.3e-4). Non-finite: GELU'(NaN) = NaN, GELU'(+-inf) = NaN (inf * 0), as
// gelu_grad_f; GELU as gelu_f.
__device__ __forceinline__ void gelu_and_grad_f(float x, float& g, float& gp) {
  const float h = phi_tail(fabsf(x));
  const float Phi = x >= 0.f ? 1.f - h : h;
  const float phi = fc_ex2(-0.72134752044448170368f * x * x) * 0.39894228040143267794f;
  g = x * Phi;
  gp = fmaf(x, phi, Phi);
}

// ------------------------------------------------------------------------------------------
// dtype conversion
// ------------------------------------------------------------------------------------------
template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Element type of the level maps x_1 .. x_{L-1} the workspace holds between launches (the backward's
// recompute -> its level kernels; one forward segment -> the next): bf16 for bf16 calls (half the bytes;
// bf16 has fp32's range, and the tensor-core path's levels are bf16 values already), fp32 otherwise
// (fp16 would overflow past 65504 where the reference and the FMA kernels stay finite).
template <typename T> struct WsTrait { using type = float; };
template <> struct WsTrait<__nv_bfloat16> { using type = __nv_bfloat16; };
template <typename T> using WsT = typename WsTrait<T>::type;

__device__ __forceinline__ float2 unpack2(uint32_t u, const __half*) {
  __half2 h;
  memcpy(&h, &u, 4);
  return __half22float2(h);
}
__device__ __forceinline__ float2 unpack2(uint32_t u, const __nv_bfloat16*) {
  __nv_bfloat162 h;
  memcpy(&h, &u, 4);
  return __bfloat1622float2(h);
}
__device__ __forceinline__ uint32_t pack2(float a, float b, const __half*) {
  const __half2 h = __floats2half2_rn(a, b);
  uint32_t u;
  memcpy(&u, &h, 4);
  return u;
}
__device__ __forceinline__ uint32_t pack2(float a, float b, const __nv_bfloat16*) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  uint32_t u;
  memcpy(&u, &h, 4);
  return u;
}

// ------------------------------------------------------------------------------------------
// 8 channels of one position. `vec` (block-uniform) promises: channel stride 1, all 8 channels
// valid, and p + off 16-byte aligned (checked on the host for base pointer and strides).
// Channels >= nvalid read as 0 on the scalar path.
// ------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void load8(const T* __restrict__ p, int64_t off, int64_t sc, int nvalid,
                                      bool vec, float (&v)[8]) {
  if (vec) {
    FC_CHECK_ALIGN16(p + off);
    if constexpr (sizeof(T) == 4) {
      const float4 a = *reinterpret_cast<const float4*>(p + off);
      const float4 b = *reinterpret_cast<const float4*>(p + off + 4);
      v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
      v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
      const uint4 u = *reinterpret_cast<const uint4*>(p + off);
      const float2 f0 = unpack2(u.x, p), f1 = unpack2(u.y, p), f2 = unpack2(u.z, p), f3 = unpack2(u.w, p);
      v[0] = f0.x; v[1] = f0.y; v[2] = f1.x; v[3] = f1.y;
      v[4] = f2.x; v[5] = f2.y; v[6] = f3.x; v[7] = f3.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = (i < nvalid) ? to_f<T>(p[off + i * sc]) : 0.f;
  }
}

// Contiguous channels (outputs and workspace maps are always channel-contiguous).
template <typename T>
__device__ __forceinline__ void store8(T* __restrict__ p, int64_t off, int nvalid, bool vec, const float (&v)[8]) {
  if (vec) {
    FC_CHECK_ALIGN16(p + off);
    if constexpr (sizeof(T) == 4) {
      *reinterpret_cast<float4*>(p + off) = make_float4(v[0], v[1], v[2], v[3]);
      *reinterpret_cast<float4*>(p + off + 4) = make_float4(v[4], v[5], v[6], v[7]);
    } else {
      uint4 u;
      u.x = pack2(v[0], v[1], p);
      u.y = pack2(v[2], v[3], p);
      u.z = pack2(v[4], v[5], p);
      u.w = pack2(v[6], v[7], p);
      *reinterpret_cast<uint4*>(p + off) = u;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i)
      if (i < nvalid) p[off + i] = from_f<T>(v[i]);
  }
}

__device__ __forceinline__ void sm_store8(float* d, const float (&v)[8]) {
  FC_CHECK_ALIGN16(d);
  reinterpret_cast<float4*>(d)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(d)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void sm_load8(const float* s, float (&v)[8]) {
  FC_CHECK_ALIGN16(s);
  const float4 a = reinterpret_cast<const float4*>(s)[0];
  const float4 b = reinterpret_cast<const float4*>(s)[1];
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
  v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

// Loads rows x cols positions (image origin gh0, gw0) of channels [c0, c0+8) of image b into a
// shared map with the given pitch; positions outside the image (and channels >= nvalid) are 0.
template <typename E>
__device__ __forceinline__ void load_region(float* __restrict__ buf, int pitch, int rows, int cols, int gh0,
                                            int gw0, const E* __restrict__ src, const int64_t (&st)[4],
                                            int64_t b, int64_t c0, int nvalid, bool vec, int H, int W) {
  const int n = rows * cols;
  const int64_t base = b * st[0] + c0 * st[3];
  for (int idx = threadIdx.x; idx < n; idx += NT) {
    const int r = idx / cols;
    const int s = idx - r * cols;
    const int gh = gh0 + r, gw = gw0 + s;
    float v[8];
    if (gh >= 0 && gh < H && gw >= 0 && gw < W) {
      load8<E>(src, base + (int64_t)gh * st[1] + (int64_t)gw * st[2], st[3], nvalid, vec, v);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = 0.f;
    }
    sm_store8(buf + (r * pitch + s) * CB, v);
  }
}

// ------------------------------------------------------------------------------------------
// One conv item: V consecutive outputs (columns s0 .. s0+V-1) of output row r of one channel:
//   acc[v] = sum_{i,j<k} w[i][j] * src[r+i][s0+v+j]          (FLIP: w[k-1-i][k-1-j])
// src and wt are already offset by the lane's channel; wt layout [tap][CB]. KFIX: k == KMAX at
// compile time; otherwise k <= KMAX is a runtime value (block-uniform) and the unrolled j loop is
// predicated. The caller guarantees columns up to s0 + V + k - 2 and rows up to r + k - 1 lie
// inside the buffer (pitch >= nchunk*V + k - 1); results for columns past the region are unused.
// ------------------------------------------------------------------------------------------
template <int KMAX, bool KFIX, int V, bool FLIP>
__device__ __forceinline__ void conv_row(const float* __restrict__ src, int sp, const float* __restrict__ wt,
                                         int k, int i, int r, int s0, float (&acc)[V]) {
  const float* row = src + ((r + i) * sp + s0) * CB;
  float xr[V + KMAX - 1];
#pragma unroll
  for (int t = 0; t < V + KMAX - 1; ++t) xr[t] = (KFIX || t < V + k - 1) ? row[t * CB] : 0.f;
  const int wi = FLIP ? (k - 1 - i) : i;
#pragma unroll
  for (int j = 0; j < KMAX; ++j) {
    if (KFIX || j < k) {
      const int wj = FLIP ? (k - 1 - j) : j;
      const float w = wt[(wi * k + wj) * CB];
#pragma unroll
      for (int v = 0; v < V; ++v) acc[v] = fmaf(w, xr[v + j], acc[v]);
    }
  }
}

template <int KMAX, bool KFIX, int V, bool FLIP>
__device__ __forceinline__ void conv_item(const float* __restrict__ src, int sp, const float* __restrict__ wt,
                                          int k, int r, int s0, float (&acc)[V]) {
#pragma unroll
  for (int v = 0; v < V; ++v) acc[v] = 0.f;
  if constexpr (KFIX) {
#pragma unroll
    for (int i = 0; i < KMAX; ++i) conv_row<KMAX, true, V, FLIP>(src, sp, wt, KMAX, i, r, s0, acc);
  } else {
    for (int i = 0; i < k; ++i) conv_row<KMAX, false, V, FLIP>(src, sp, wt, k, i, r, s0, acc);
  }
}

}  // namespace fcc
}  // namespace focalnet
