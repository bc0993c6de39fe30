// Native CPU backend of focal_context: the tiling plan and workspace layout shared by the
// per-ISA kernel instantiations (focal_context_cpu_kernels.inc) and the entry points
// (focal_context_cpu.cpp). Plain data only: this header is included before any target pragma.
#pragma once
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#else
inline int omp_get_thread_num() { return 0; }
inline int omp_get_max_threads() { return 1; }
#endif

#include "focal_context.h"

namespace focalnet {
namespace cpu {

// Channels are processed in blocks of kCB lanes (one AVX-512 vector, two AVX2 vectors). A block
// past C is zero padded (zero input, zero weights), so every inner loop has a fixed trip count.
constexpr int kCB = 16;

struct Plan {
  int64_t B = 0, H = 0, W = 0, C = 0;
  int L = 0;
  int K[kMaxLevels] = {0, 0, 0, 0};   // kernel size per level
  int P[kMaxLevels] = {0, 0, 0, 0};   // padding k // 2
  int R[kMaxLevels + 1] = {0, 0, 0, 0, 0};   // R[l] = sum_{m >= l} P[m]: halo of level l's input
  int pmax = 0;
  int64_t Cp = 0;    // C rounded up to kCB
  int64_t NCB = 0;   // channel blocks
  // Spatial tiles: TH x TW, NTY x NTX per image (NT in all). Fixed by the shape alone, never by
  // the thread count, so every partial sum (and thus every result bit) is thread-count independent.
  int64_t TH = 0, TW = 0, NTY = 0, NTX = 0, NT = 0;
  int64_t BH = 0, BW = 0;   // per-thread halo buffer: (TH + 2 R0) x (TW + 2 R0) pixels of kCB lanes
  float s = 1.f;            // 1 / (L + 1) when normalize
  int dtype = 0;

  // Workspace layout, offsets in floats (every offset a multiple of kCB: 64-byte aligned).
  int64_t off_wt[kMaxLevels] = {0, 0, 0, 0};    // weights, blocked [NCB][k*k][kCB]
  int64_t off_wtf[kMaxLevels] = {0, 0, 0, 0};   // flipped weights (backward: transposed conv)
  int64_t off_part = 0;    // [B][NT][Cp] per-tile partial sums (pooled / dpool)
  int64_t off_gp = 0;      // [B][Cp] GELU(pooled)
  int64_t off_gall = 0;    // [B][H][W][L+1] the gates in fp32
  int64_t off_ggp = 0;     // [B][NCB][H][W][L+1] grad_gates partials per channel block (fused bwd)
  int64_t off_dp = 0;      // [B][Cp] dpool / (H W)   (backward)
  int64_t off_stage = 0;   // [B][H][W][C] fp32 output staging (forward, half dtypes only)
  int64_t map_elems = 0;   // B * NCB * H * W * kCB: one level map, blocked [B][NCB][H][W][kCB]
  int64_t off_z = 0;       // [L] maps: z_l, overwritten in place by dz_l (backward)
  int64_t gw_elems = 0;    // sum_l NCB * k_l^2 * kCB: one tile's weight-gradient partials
  int64_t gw_off[kMaxLevels] = {0, 0, 0, 0};
  int64_t off_gwp = 0;     // [B][NT][gw_elems] (backward)
  // Backward with one tile per image (NT == 1): per-thread slots of scratch + padded level maps
  // (replace the full-batch maps). slots = min(B, OpenMP threads): the team never exceeds it, and
  // which slot serves an image never changes a result.
  int64_t slots = 0, slot_floats = 0, off_slots = 0;
  int64_t total = 0;       // floats
};

// Floats of one thread's scratch (Scratch in the kernels, laid out by Scratch::carve): two halo
// buffers, two tiles, two rows, and two gate tiles rounded up to kCB.
inline int64_t scratch_floats(const Plan& pl) {
  const int64_t halo = pl.BH * pl.BW * kCB, tile = pl.TH * pl.TW * kCB;
  const int64_t gts = ((pl.TH * pl.TW * (pl.L + 1) + kCB - 1) / kCB) * kCB;
  return 2 * halo + 2 * tile + 2 * pl.BW * kCB + 2 * gts;
}

// Floats of one per-thread slot of the single-tile backward: the scratch, then the padded level
// maps, (H + 2 p_l) x (W + 2 p_l) x kCB each: GELU'(z_l) / dz_l for every level, x_l for l >= 1.
inline int64_t single_slot_floats(const Plan& pl) {
  int64_t n = scratch_floats(pl);
  for (int l = 0; l < pl.L; ++l) {
    const int64_t m = (pl.H + 2 * pl.P[l]) * (pl.W + 2 * pl.P[l]) * kCB;
    n += (l == 0) ? m : 2 * m;
  }
  return ((n + kCB - 1) / kCB) * kCB;
}

// Kernel entry points of one ISA instantiation. They return 0, or a nonzero code when a per-thread
// scratch allocation failed (the caller turns it into std::runtime_error).
#define FOCALNET_CPU_DECLARE_ISA(ns)                                   \
  namespace ns {                                                       \
  int run_fwd(const FocalContextArgs& a, const Plan& pl, float* ws);   \
  int run_bwd(const FocalContextArgs& a, const Plan& pl, float* ws);   \
  }

FOCALNET_CPU_DECLARE_ISA(isa_base)
#if defined(__x86_64__) && defined(__GNUC__)
#define FOCALNET_CPU_X86_DISPATCH 1
FOCALNET_CPU_DECLARE_ISA(isa_avx2)
FOCALNET_CPU_DECLARE_ISA(isa_avx512)
#endif

}  // namespace cpu
}  // namespace focalnet
