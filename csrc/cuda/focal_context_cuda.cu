// Native CUDA backend of focal_context (docs/backend-contract.md), C ABI in focal_context.h.
//
// Design (kernels in fc_kernels.cuh, helpers in fc_device.cuh):
//  * Forward: the levels are partitioned into fused segments, and each segment's tile chosen, by
//    a small cost model (halo recompute vs. workspace round trips; e.g. SRF, LRF, fl3: one
//    segment; fl4: (3,5,7)+(9); detection window 9: (9,11)+(13)[+(15)]).
//    One fc_fused_kernel launch per segment stages the tile + halo of its input level in shared
//    memory once and computes every level of the segment from shared memory on a shrinking
//    region (zero padding of every level outside the image), accumulating the gated sum in fp32.
//    Segment boundaries pass x_l (WsT<T>: bf16 for bf16 calls, else fp32) and the running sum (fp32)
//    through workspace maps. The last
//    segment writes out = s * local sum and per-tile pooled partials; fc_pool_finish_kernel
//    reduces them in a fixed order, and fc_fwd_epilogue_kernel adds s * g_L * GELU(pooled) (skipped
//    when the caller folds that rank-1 term into the h GEMM: FocalContextArgs::global_term).
//  * Forward, fp16/bf16 SRF (k = 3,5) and LRF (k = 3,5,7): the tensor-core kernel of fc_mma.cuh
//    (taps as banded-matrix mma.sync per channel, one launch for all local levels) replaces the
//    fused segments; fc_mma_bfrag_kernel lays the weights out as mma fragments first. It flags
//    what it cannot reproduce exactly (non-finite ctx or weights, fp16 level overflow); the fused
//    segments are still launched after it and run only when the flag is set (one int read per
//    block otherwise), and fc_pool_finish_kernel takes the partials of whichever ran.
//    FOCALNET_CUDA_MMA=0 turns the tensor-core path off.
//  * Backward (staged per level, recomputing): x_1..x_{L-1} recomputed into workspace maps (WsT<T>) by
//    the tensor-core kernel (REC instance: the levels before the last, rounded to T as the forward
//    had them) where the forward uses it, with the fused segments behind it as the same flag-gated
//    fallback; else by fc_fused_kernel; fc_bwd_prep_kernel (dpool and global-gate partials); then one
//    level kernel per level, l = L-1..0, recomputing z_l from x_l in shared memory: for bf16 where the
//    forward runs on tensor cores, fc_bwd_level_mma_kernel (fc_bwd_mma.cuh: z, dx and the weight
//    gradient as banded mma.sync; FOCALNET_CUDA_MMA_BWD=0 turns it off) with fc_bwd_level_kernel (FMA)
//    behind it as its flag-gated fallback; else fc_bwd_level_kernel.
//    Gate gradients (reduction over C) and weight gradients (reduction over B*H*W) are per-block
//    partials in the workspace reduced by fixed-order kernels. No float atomics anywhere.
//  * Compile-time specialisations (FC_FUSED_SPECS) for the common level segments; any other
//    segment runs the generic instantiation (runtime L and kernel sizes, predicated unrolled taps).
//    The per-level backward kernel is specialised for every kernel size 3..15.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "focal_context.h"
#include "fc_kernels.cuh"
#include "fc_mma.cuh"
#include "fc_bwd_mma.cuh"

namespace focalnet {
namespace {

using namespace fcc;

constexpr int64_t kSmemBudget = 96 * 1024;  // <= the opt-in limit of every sm_80+ GPU (sm_86/89: 99 KB)
#ifndef FC_BWD_TARGET_BLOCKS
#define FC_BWD_TARGET_BLOCKS 2048
#endif
constexpr int kTargetBlocks = FC_BWD_TARGET_BLOCKS;  // grid size aimed at by the per-level backward
constexpr int64_t kAlign = 256;             // workspace sub-buffer alignment (bytes)

// Tile sides tried by the planners (7, 14, 28 divide the FocalNet maps 56/28/14/7).
constexpr int kTileSides[] = {1, 2, 4, 7, 8, 12, 14, 16, 24, 28, 32};

// Cost model of the planners, in fp32-FMA equivalents per pixel and channel: conv FMAs on the
// (padded) regions actually computed, staging loads, a constant per block, and the workspace
// traffic of a segment boundary (~16 bytes per element at ~11 FMA per DRAM byte on an H100).
constexpr double kCostPerTile = 2000.0;
constexpr double kCostStageByte = 2.0;
constexpr double kCostGeneric = 1.3;
constexpr double kCostGeluStore = 16.0;  // GELU (exp2 form, 13), border select and store of one conv output
constexpr double kCostPass = 5.0;        // one tile-pass slot of one level
constexpr double kCostItem = 24.0;       // per conv item (strip): index math, row pointers, border predicates
constexpr double kCostBoundaryFwd = 176.0;
constexpr double kCostBoundaryRecompute = 50.0;

// (levels in the segment, k0, k1, k2, k3)
#define FC_FUSED_SPECS(X)                                                                             \
  X(1, 3, 0, 0, 0) X(1, 5, 0, 0, 0) X(1, 7, 0, 0, 0) X(1, 9, 0, 0, 0) X(1, 11, 0, 0, 0)               \
  X(1, 13, 0, 0, 0) X(1, 15, 0, 0, 0) X(2, 3, 5, 0, 0) X(2, 5, 7, 0, 0) X(2, 9, 11, 0, 0)            \
  X(3, 3, 5, 7, 0) X(3, 5, 7, 9, 0) X(4, 3, 5, 7, 9)

struct SpecK {
  int nl;
  int k[4];
};
constexpr SpecK kSpecs[] = {
#define FC_X(LC, a, b, c, d) {LC, {a, b, c, d}},
    FC_FUSED_SPECS(FC_X)
#undef FC_X
};
constexpr int kNumSpecs = (int)(sizeof(kSpecs) / sizeof(kSpecs[0]));

using FusedFn = void (*)(FusedParams);
using LevelFn = void (*)(LevelBwdParams);

template <typename T>
FusedFn fused_fn(int spec) {
  static const FusedFn tbl[] = {
#define FC_X(LC, a, b, c, d) &fc_fused_kernel<T, LC, a, b, c, d>,
      FC_FUSED_SPECS(FC_X)
#undef FC_X
  };
  static_assert(sizeof(tbl) / sizeof(tbl[0]) == sizeof(kSpecs) / sizeof(kSpecs[0]), "spec table mismatch");
  return (spec >= 0 && spec < kNumSpecs) ? tbl[spec] : &fc_fused_kernel<T, 0, 0, 0, 0, 0>;
}

template <typename T>
LevelFn level_fn(int k) {
  switch (k) {
    case 3: return &fc_bwd_level_kernel<T, 3>;
    case 5: return &fc_bwd_level_kernel<T, 5>;
    case 7: return &fc_bwd_level_kernel<T, 7>;
    case 9: return &fc_bwd_level_kernel<T, 9>;
    case 11: return &fc_bwd_level_kernel<T, 11>;
    case 13: return &fc_bwd_level_kernel<T, 13>;
    case 15: return &fc_bwd_level_kernel<T, 15>;
    default: throw std::invalid_argument("focal_context_cuda: kernel size " + std::to_string(k) + " unsupported");
  }
}

template <typename T> const char* dtype_name();
template <> const char* dtype_name<float>() { return "float32"; }
template <> const char* dtype_name<__half>() { return "float16"; }
template <> const char* dtype_name<__nv_bfloat16>() { return "bfloat16"; }

int find_spec(int nl, const int* k) {
  for (int i = 0; i < kNumSpecs; ++i) {
    if (kSpecs[i].nl != nl) continue;
    bool ok = true;
    for (int j = 0; j < nl; ++j) ok = ok && kSpecs[i].k[j] == k[j];
    if (ok) return i;
  }
  return -1;
}

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t cblocks_of(int64_t C) { return ceil_div(C, CB); }  // channel blocks of 8

// ------------------------------------------------------------------------------------------
// plans (pure functions of the arguments: workspace size and launches always agree)
// ------------------------------------------------------------------------------------------
struct Segment {
  int l0 = 0, nl = 0;
  int k[4] = {0, 0, 0, 0};
  int spec = -1;
  int TH = 0, TW = 0, accP = 0, ntw = 0, ntiles = 0;
  int R[5] = {0, 0, 0, 0, 0};
  int pitch[5] = {0, 0, 0, 0, 0};
  int offA = 0, offB = 0, offW[4] = {0, 0, 0, 0}, offG = 0, offRed = 0;
  int vmask = 0;  // bit j: level j computes strips of FV_SHORT outputs (else FV)
  int64_t smem = 0;
};

// Modelled instructions of level j of a segment (per thread-channel, whole tile) with strips of V
// outputs: taps, row loads, per-item overhead, GELU and store per output.
double seg_level_cost(const Segment& s, int j, int V) {
  const double k = s.k[j];
  const int64_t orows = s.TH + 2 * s.R[j + 1], ocols = s.TW + 2 * s.R[j + 1];
  const double outs = (double)round_up(orows, GPW) * (double)round_up(ocols, V);
  return outs * ((k * k + k * (V + k - 1) / V) * (s.spec >= 0 ? 1.0 : kCostGeneric) + kCostGeluStore + kCostItem / V);
}

bool fused_geom(Segment& s, bool fwd, int64_t H, int64_t W, int th, int tw) {
  const int TH = (int)std::min<int64_t>(th, H), TW = (int)std::min<int64_t>(tw, W);
  // the tile pass keeps 32 * PSLOTS positions of a tile_wp-wide map in registers
  if (TW > 32 || TH * tile_wp(TW) > 32 * PSLOTS) return false;
  s.TH = TH;
  s.TW = TW;
  s.R[s.nl] = 0;
  for (int j = s.nl - 1; j >= 0; --j) s.R[j] = s.R[j + 1] + s.k[j] / 2;
  // strip length of each level: the one with the lower modelled cost of its region
  s.vmask = 0;
  for (int j = 0; j < s.nl; ++j)
    if (seg_level_cost(s, j, FV_SHORT) < seg_level_cost(s, j, FV)) s.vmask |= 1 << j;
  auto vlen = [&](int j) { return ((s.vmask >> j) & 1) ? FV_SHORT : FV; };
  // buffer j holds x_{l0+j} on tile + R[j] (j = nl: the last level's output on the tile); it is
  // read by level j (whole strips of vlen(j) outputs, k_j - 1 more columns) and written by level
  // j - 1 (whole strips of vlen(j - 1) outputs)
  int64_t sizeA = 0, sizeB = 0;
  for (int j = 0; j <= s.nl; ++j) {
    const int rows = TH + 2 * s.R[j], cols = TW + 2 * s.R[j];
    int pitch = cols;
    if (j < s.nl) pitch = std::max(pitch, (int)ceil_div(TW + 2 * s.R[j + 1], vlen(j)) * vlen(j) + s.k[j] - 1);
    if (j > 0) pitch = std::max(pitch, (int)ceil_div(cols, vlen(j - 1)) * vlen(j - 1));
    pitch |= 1;
    s.pitch[j] = pitch;
    const int64_t sz = (int64_t)rows * pitch * CB;
    if (j & 1)
      sizeB = std::max(sizeB, sz);
    else
      sizeA = std::max(sizeA, sz);
  }
  s.accP = TW | 1;
  int64_t off = 0;
  s.offA = 0;
  off += sizeA;
  s.offB = (int)off;
  off += sizeB;
  for (int j = 0; j < 4; ++j) {
    s.offW[j] = (int)off;
    if (j < s.nl) off += (int64_t)s.k[j] * s.k[j] * CB;
  }
  if (fwd) {
    s.offG = (int)off;
    off += round_up((int64_t)s.nl * TH * s.accP, 4);
  } else {
    s.offG = 0;
  }
  s.offRed = (int)off;
  off += NT;
  // the tile pass reads PSLOTS slots of every level buffer and of the gate table unconditionally
  // (slots past the tile read whatever lies there and are discarded): keep them inside the block
  {
    const int twp = tile_wp(TW), rows_max = PSLOTS * (32 / twp);
    for (int j = 1; j <= s.nl; ++j) {
      const int64_t start = (j & 1) ? s.offB : s.offA;
      off = std::max<int64_t>(off, start + ((int64_t)(rows_max + s.R[j]) * s.pitch[j] + twp + s.R[j]) * CB);
    }
    if (fwd) off = std::max<int64_t>(off, s.offG + (int64_t)s.nl * TH * s.accP + (int64_t)rows_max * s.accP + twp);
  }
  s.smem = off * 4;
  const int64_t ntiles = ceil_div(H, TH) * ceil_div(W, TW);
  if (ntiles > std::numeric_limits<int32_t>::max() / 1024) return false;
  s.ntw = (int)ceil_div(W, TW);
  s.ntiles = (int)ntiles;
  return s.smem <= kSmemBudget;
}

// Modelled issued instructions per tile, per thread-channel, divided by the tile's pixels: conv
// items (taps, row loads, GELU and store per output), the tile pass per level, staging, a constant
// per block.
double fused_cost(const Segment& s, int64_t H, int64_t W) {
  double per_tile = kCostPerTile;
  for (int j = 0; j < s.nl; ++j) {
    per_tile += seg_level_cost(s, j, ((s.vmask >> j) & 1) ? FV_SHORT : FV);
    per_tile += kCostPass * (double)s.TH * (double)tile_wp(s.TW);
  }
  per_tile += kCostStageByte * 4.0 * (double)(s.TH + 2 * s.R[0]) * (double)(s.TW + 2 * s.R[0]);
  return per_tile * (double)s.ntiles / (double)(H * W);
}

// Best tile of a segment (min cost among the tiles that fit the shared-memory budget).
bool plan_segment_tile(Segment& s, bool fwd, int64_t B, int64_t H, int64_t W, int64_t cblocks, double& cost) {
  bool found = false;
  Segment best;
  double best_cost = 0.0;
  for (int th : kTileSides)
    for (int tw : kTileSides) {
      Segment t = s;
      if (!fused_geom(t, fwd, H, W, th, tw)) continue;
      if (B * t.ntiles * cblocks > std::numeric_limits<int32_t>::max()) continue;  // grid.x limit
      const double c = fused_cost(t, H, W);
      if (!found || c < best_cost) {
        best = t;
        best_cost = c;
        found = true;
      }
    }
  if (found) {
    s = best;
    cost = best_cost;
  }
  return found;
}

// Partition of levels [lb, le) into fused segments with the lowest modelled cost.
std::vector<Segment> make_segments(const FocalContextArgs& a, int lb, int le, bool fwd) {
  const int n = le - lb;
  std::vector<Segment> best;
  double best_cost = 0.0;
  for (int mask = 0; mask < (1 << (n - 1)); ++mask) {  // bit i: a segment ends after level lb + i
    std::vector<Segment> segs;
    double cost = 0.0;
    bool ok = true;
    int l = lb;
    while (l < le && ok) {
      Segment s;
      s.l0 = l;
      s.nl = 0;
      do {
        s.k[s.nl] = a.ksize[l + s.nl];
        ++s.nl;
      } while (l + s.nl < le && !((mask >> (l + s.nl - 1 - lb)) & 1));
      s.spec = find_spec(s.nl, s.k);
      double c = 0.0;
      ok = plan_segment_tile(s, fwd, a.B, a.H, a.W, ceil_div(a.C, CB), c);
      cost += c;
      segs.push_back(s);
      l += s.nl;
    }
    if (!ok) continue;
    cost += (double)(segs.size() - 1) * (fwd ? kCostBoundaryFwd : kCostBoundaryRecompute);
    if (best.empty() || cost < best_cost) {
      best = segs;
      best_cost = cost;
    }
  }
  if (best.empty()) throw std::runtime_error("focal_context_cuda: no tile of the fused kernel fits shared memory");
  return best;
}

struct LevelPlan {
  int k = 0, TH = 0, TW = 0, accP = 0, ntw = 0, ntiles = 0, nslots = 0, pX = 0, pZ = 0;
  int offX = 0, offZ = 0, offW = 0, offD = 0, offGp = 0;
  int64_t smem = 0;
};

bool level_geom(LevelPlan& g, int k, int64_t H, int64_t W, int th, int tw) {
  const int TH = (int)std::min<int64_t>(th, H), TW = (int)std::min<int64_t>(tw, W);
  const int p = k / 2, V = vblock(k);
  g.k = k;
  g.TH = TH;
  g.TW = TW;
  const int xr = TH + 4 * p, xc = TW + 4 * p;
  g.pX = std::max(xc, (int)ceil_div(TW + 2 * p, V) * V + k - 1) | 1;
  const int zr = TH + 2 * p, zc = TW + 2 * p;
  g.pZ = std::max(zc, (int)ceil_div(TW, V) * V + k - 1) | 1;
  g.accP = TW | 1;
  const int NP = NGRP / k;
  const int64_t sizeX = std::max<int64_t>((int64_t)xr * g.pX * CB, (int64_t)NP * k * k * CB);
  const int64_t sizeZ = (int64_t)zr * g.pZ * CB;
  int64_t off = 0;
  g.offX = 0;
  off += sizeX;
  g.offZ = (int)off;
  off += sizeZ;
  g.offW = (int)off;
  off += (int64_t)k * k * CB;
  g.offD = (int)off;
  off += (int64_t)TH * g.accP * CB;
  g.offGp = (int)off;
  off += round_up((int64_t)TH * g.accP, 4);
  g.smem = off * 4;
  const int64_t ntiles = ceil_div(H, TH) * ceil_div(W, TW);
  if (ntiles > std::numeric_limits<int32_t>::max() / 1024) return false;
  g.ntw = (int)ceil_div(W, TW);
  g.ntiles = (int)ntiles;
  return g.smem <= kSmemBudget;
}

double level_cost(const LevelPlan& g, int64_t H, int64_t W) {
  const int k = g.k, p = k / 2, V = vblock(k);
  double per_tile = kCostPerTile;
  per_tile += (double)k * k * (double)round_up(g.TH + 2 * p, GPW) * (double)round_up(g.TW + 2 * p, V);  // z
  per_tile += (double)k * k * (double)round_up(g.TH, GPW) * (double)round_up(g.TW, V);                  // dx
  per_tile += 2.0 * k * k * (double)g.TH * g.TW;                                                            // dw
  per_tile += kCostStageByte * 4.0 * ((double)(g.TH + 4 * p) * (g.TW + 4 * p) + (double)(g.TH + 2 * p) * (g.TW + 2 * p));
  return per_tile * (double)g.ntiles / (double)(H * W);
}

struct Layout {
  int64_t cur = 0;
  int64_t take(int64_t bytes) {
    const int64_t o = cur;
    cur += round_up(std::max<int64_t>(bytes, 0), kAlign);
    return o;
  }
};

// ------------------------------------------------------------------------------------------
// tensor-core forward (fc_mma.cuh): fp16/bf16, 2 or 3 levels, every k in {3,5,7,9}
// ------------------------------------------------------------------------------------------
struct MmaPlan {
  bool ok = false;
  int TH = 0, TW = 0, ntw = 0, ntiles = 0;
  int Rn[3] = {0, 0, 0}, H0 = 0;
  int nrow[3] = {0, 0, 0}, ncol[3] = {0, 0, 0}, pitch[3] = {0, 0, 0}, brow[3] = {0, 0, 0};
  int srows = 0, scols = 0, opitch = 0;
  int offS[2] = {0, 0}, planeS[2] = {0, 0}, offG = 0;
  int64_t smem = 0, budget = 0;
  double cost = 0.0;
};

// Modelled issued instructions (per channel) of the tensor-core forward, from its compiled SASS
// (python -m focalnet_kernels.cost_model): per computed subtile value ~16 (GELU 13, select,
// pack, store), per value and kernel row (1 + NS) / 4 (ldmatrix + mma per 128 values, x 32
// lanes), per staged position ~3, per block ~3000.
constexpr double kMmaCostValue = 16.0;
constexpr double kMmaCostStage = 3.0;
constexpr double kMmaCostBlock = 3000.0;
constexpr int kMmaTH[] = {7, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 32};
constexpr int kMmaTW[] = {7, 8, 14, 16, 24, 28, 32, 40, 48, 56, 64};

// (levels, k0, k1, k2) of the tensor-core instances: FocalNet's SRF and LRF context stacks
#define FC_MMA_SPECS(X) X(2, 3, 5, 0) X(3, 3, 5, 7)

bool mma_has_spec(const FocalContextArgs& a) {
  const int* k = a.ksize.data();
  bool found = false;
#define FC_MMA_HAS(LC, k0, k1, k2) found |= a.L == LC && k[0] == k0 && k[1] == k1 && (LC < 3 || k[2] == k2);
  FC_MMA_SPECS(FC_MMA_HAS)
#undef FC_MMA_HAS
  return found;
}

// FOCALNET_CUDA_MMA_BWD: unset / "1" = the tensor-core backward level kernels where they apply (bf16, where
// the forward runs on tensor cores), "0" = the FMA level kernels (the recompute stays on tensor cores).
bool mma_bwd_enabled() {
  const char* e = std::getenv("FOCALNET_CUDA_MMA_BWD");
  if (e == nullptr || e[0] == 0 || std::strcmp(e, "1") == 0) return true;
  if (std::strcmp(e, "0") == 0) return false;
  throw std::invalid_argument(std::string("focal_context_cuda: FOCALNET_CUDA_MMA_BWD must be 0 or 1, got '") + e +
                              "'");
}

// FOCALNET_CUDA_MMA: unset / "1" = the tensor-core forward where it applies, "0" = never.
bool mma_enabled() {
  const char* e = std::getenv("FOCALNET_CUDA_MMA");
  if (e == nullptr || e[0] == 0 || std::strcmp(e, "1") == 0) return true;
  if (std::strcmp(e, "0") == 0) return false;
  throw std::invalid_argument(std::string("focal_context_cuda: FOCALNET_CUDA_MMA must be 0 or 1, got '") + e + "'");
}

// Shared memory per block of the tensor-core forward: two blocks per SM (16 warps) with what the
// device has: min(opt-in limit per block, per-SM capacity / 2 - 1 KB reserved) -- H100: 113 KB,
// A100: 81 KB, sm_86/89: 49 KB. Per device (of ctx), asked once.
int64_t mma_smem_budget(const FocalContextArgs& a) {
  static std::atomic<int64_t> cache[64];
  cudaPointerAttributes attr{};
  int dev = 0;
  if (cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(a.ctx)) == cudaSuccess) dev = attr.device;
  (void)cudaGetLastError();
  if (dev < 0 || dev >= 64) dev = 0;
  int64_t v = cache[dev].load();
  if (v > 0) return v;
  int per_sm = 0, optin = 0;
  if (cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return 48 * 1024;  // not cached: ask again next time
  }
  v = std::max<int64_t>(48 * 1024, std::min<int64_t>(optin, per_sm / 2 - 1024));
  cache[dev].store(v);
  return v;
}

// rec: the backward's recompute, which stops before the last level: that level adds no halo (planned
// with kernel size 1) and is not paid for
bool mma_geom(MmaPlan& m, const FocalContextArgs& a, int TH, int TW, int64_t budget, bool rec = false) {
  const int L = a.L;
  std::array<int32_t, kMaxLevels> ksize = a.ksize;
  if (rec) ksize[L - 1] = 1;
  m.TH = TH;
  m.TW = TW;
  m.Rn[L - 1] = 0;
  for (int j = L - 2; j >= 0; --j) m.Rn[j] = m.Rn[j + 1] + ksize[j + 1] / 2;
  m.H0 = m.Rn[0] + ksize[0] / 2;
  for (int j = 0; j < L; ++j) {
    m.nrow[j] = (int)ceil_div(TH + 2 * m.Rn[j], 16);
    m.ncol[j] = (int)ceil_div(TW + 2 * m.Rn[j], 8);
  }
  for (int j = L - 2; j >= 0; --j) m.ncol[j] = std::max(m.ncol[j], m.ncol[j + 1] + 1);
  auto odd8 = [](int x) { return (x / 8) % 2 == 0 ? x + 8 : x; };  // 16-byte rows: ldmatrix bank spread
  m.pitch[0] = odd8(8 * m.ncol[0] + 8);
  m.brow[0] = 16 * m.nrow[0] + ksize[0] - 1;
  for (int j = 1; j < L; ++j) {
    m.pitch[j] = odd8(8 * m.ncol[j - 1]);
    m.brow[j] = std::max(16 * m.nrow[j] + ksize[j] - 1, 16 * m.nrow[j - 1]);
  }
  m.scols = 8 * m.ncol[0] + 8;                       // every column level 0 reads
  m.srows = std::min(m.brow[0], TH + 2 * m.H0);       // the rows its kept outputs read
  m.opitch = (int)round_up(TW, 2);
  int64_t plane[2] = {0, 0};
  for (int j = 0; j < L; ++j) plane[j % 2] = std::max<int64_t>(plane[j % 2], (int64_t)m.brow[j] * m.pitch[j] * 2);
  plane[0] = std::max<int64_t>(plane[0], (int64_t)TH * m.opitch * 2);
  m.planeS[0] = (int)round_up(plane[0], 16);
  m.planeS[1] = (int)round_up(plane[1], 16);
  m.offS[0] = 0;
  m.offS[1] = CB * m.planeS[0];
  m.offG = m.offS[1] + CB * m.planeS[1];
  m.smem = m.offG + (int64_t)L * TH * TW * 4 + 32;  // + 32: the last level's reads past column TW of the last row
  if (m.smem > budget) return false;
  m.ntw = (int)ceil_div(a.W, TW);
  const int64_t ntiles = ceil_div(a.H, TH) * m.ntw;
  if (ntiles > std::numeric_limits<int32_t>::max() / 1024) return false;
  m.ntiles = (int)ntiles;
  const double ns = a.dtype == kBFloat16 ? (double)FC_MMA_BF16_NS : 1.0;
  double per_tile = kMmaCostBlock + kMmaCostStage * (double)m.srows * m.scols;
  for (int j = 0; j < L - (rec ? 1 : 0); ++j)
    per_tile += 128.0 * m.nrow[j] * m.ncol[j] * (kMmaCostValue + 0.25 * (1.0 + ns) * ksize[j]);
  m.cost = per_tile * (double)m.ntiles / (double)(a.H * a.W);
  return true;
}

// The tensor-core plan, or ok = false when the case is not one it handles.
// rec: the plan of the backward's recompute (REC instance: levels 0 .. L-2 on the tile + the halo of
// levels 1 .. L-2 only, so its tile may be larger than the forward's)
MmaPlan plan_mma(const FocalContextArgs& a, bool rec = false) {
  MmaPlan best;
  if (a.dtype != kFloat16 && a.dtype != kBFloat16) return best;
  if (a.L < 2 || a.L > 3) return best;
  for (int l = 0; l < a.L; ++l)
    if (a.ksize[l] > MMA_KMAX) return best;
  if (!mma_has_spec(a) || !mma_enabled()) return best;
  const int64_t budget = mma_smem_budget(a);
  for (int th : kMmaTH)
    for (int tw : kMmaTW) {
      MmaPlan m;
      if (!mma_geom(m, a, th, tw, budget, rec)) continue;
      if (a.B * (int64_t)m.ntiles * cblocks_of(a.C) > std::numeric_limits<int32_t>::max()) continue;
      if (!best.ok || m.cost < best.cost) {
        best = m;
        best.ok = true;
        best.budget = budget;
      }
    }
  return best;
}

// tensor-core backward of one level (fc_bwd_mma.cuh): bf16, k in {3, 5, 7}, where the forward runs on
// tensor cores (its recompute then leaves x_l exact in bf16)
struct LevelMmaPlan {
  bool ok = false;
  int k = 0, TH = 0, TW = 0, ntw = 0, ntiles = 0, nslots = 0;
  int nrowZ = 0, ncolZ = 0, nrowT = 0, ncolT = 0, ncolE = 0;
  int xrows = 0, xp = 0, drows = 0, dp = 0, nrows = 0, np = 0;
  int planeX = 0, planeD = 0, planeN = 0;
  int64_t smem = 0, budget = 0;
  double cost = 0.0;
};
constexpr int kLvMmaTH[] = {8, 10, 16, 24, 26, 32, 40, 56};
constexpr int kLvMmaTW[] = {8, 16, 24, 32, 40, 48, 56, 64};
// planner weights (instructions per unit, from the kernel's SASS by the cost model, rounded): per z output
// (GELU, GELU', dz split and stores, 4 per lane), per x-plane element staged, per region position staged
// (8 channels), per dx output, per tile position of the final pass, per tile
constexpr double kLvMmaZ = 36.0, kLvMmaX = 1.5, kLvMmaN = 2.0, kLvMmaF = 6.0, kLvMmaT = 4.0, kLvMmaTile = 3000.0;

bool level_mma_geom(LevelMmaPlan& m, int k, int64_t H, int64_t W, int th, int tw, int64_t budget) {
  const int TH = (int)std::min<int64_t>(th, H), TW = (int)std::min<int64_t>(tw, W);
  const int p = k / 2;
  m.k = k;
  m.TH = TH;
  m.TW = TW;
  m.nrowZ = (int)ceil_div(TH + 2 * p, 16);
  m.ncolZ = (int)std::max(ceil_div(TW + 2 * p, 8), ceil_div(TW, 8) + 1);  // every column (f) reads is written
  m.nrowT = (int)ceil_div(TH, 16);
  m.ncolT = (int)ceil_div(TW, 8);
  m.ncolE = (int)ceil_div(TW + p, 8);
  m.xrows = std::max(16 * m.nrowZ + k - 1, 16 * m.nrowT + k + p - 1);
  auto odd8 = [](int x) { return (x / 8) % 2 == 0 ? x + 8 : x; };  // 16-byte rows: ldmatrix bank spread
  m.xp = odd8(std::max(8 * m.ncolZ + 8, 8 * m.ncolE + 8));
  m.drows = std::max({16 * m.nrowZ, 16 * m.nrowT + k - 1, 16 * m.nrowT + p});
  m.dp = odd8(std::max({8 * m.ncolZ, 8 * m.ncolT + 8, 8 * m.ncolE}));
  m.nrows = TH + 2 * p;
  m.np = (int)round_up(TW + 2 * p, 2);  // even: (d) reads the plane in 8-byte column pairs
  m.planeX = (int)round_up(std::max<int64_t>({(int64_t)m.xrows * m.xp * 2, (int64_t)TH * TW * 4, (int64_t)k * 128 * 4}), 16);
  m.planeD = (int)round_up((int64_t)m.drows * m.dp * 2, 16);
  m.planeN = (int)round_up((int64_t)m.nrows * m.np * 4, 16);
  m.smem = (int64_t)CB * (m.planeX + (1 + FC_BWD_DZ_SPLIT) * m.planeD + m.planeN);
  const int64_t ntiles = ceil_div(H, TH) * ceil_div(W, TW);
  if (ntiles > std::numeric_limits<int32_t>::max() / 1024) return false;
  m.ntw = (int)ceil_div(W, TW);
  m.ntiles = (int)ntiles;
  // staging and the epilogue walk rows with the lanes across columns (x: 2 columns per lane, 64 per pass;
  // n and the epilogue: 32 per pass): a narrow tile leaves lanes idle, so those terms count whole passes
  double per_tile = kLvMmaTile + kLvMmaZ * 128.0 * m.nrowZ * m.ncolZ + kLvMmaX * m.xrows * round_up(m.xp, 64) +
                    kLvMmaN * (double)m.nrows * round_up(m.np, 32) + kLvMmaF * 128.0 * m.nrowT * m.ncolT +
                    kLvMmaT * TH * round_up(TW, 32);
  m.cost = per_tile * (double)ntiles / (double)(H * W);
  m.budget = budget;
  return m.smem <= budget;
}

// The instances of fc_bwd_level_mma_kernel<K, ROLE>: the levels of the tensor-core forward's shapes
// (FC_MMA_SPECS: k = 3,5 and 3,5,7): k = 3 first, k = 5 middle or last, k = 7 last.
using LevelMmaFn = void (*)(LevelMmaParams);
LevelMmaFn level_mma_fn(int k, int l, int L) {
  const int role = l == 0 ? kLvFirst : (l == L - 1 ? kLvLast : kLvMid);
  if (k == 3 && role == kLvFirst) return &fc_bwd_level_mma_kernel<3, kLvFirst>;
  if (k == 5 && role == kLvMid) return &fc_bwd_level_mma_kernel<5, kLvMid>;
  if (k == 5 && role == kLvLast) return &fc_bwd_level_mma_kernel<5, kLvLast>;
  if (k == 7 && role == kLvLast) return &fc_bwd_level_mma_kernel<7, kLvLast>;
  return nullptr;
}

LevelMmaPlan plan_level_mma(const FocalContextArgs& a, int l) {
  LevelMmaPlan best;
  const int k = a.ksize[l];
  if (a.dtype != kBFloat16 || level_mma_fn(k, l, a.L) == nullptr) return best;
  const int64_t budget = mma_smem_budget(a);
  for (int th : kLvMmaTH)
    for (int tw : kLvMmaTW) {
      LevelMmaPlan m;
      if (!level_mma_geom(m, k, a.H, a.W, th, tw, budget)) continue;
      if (!best.ok || m.cost < best.cost) {
        best = m;
        best.ok = true;
      }
    }
  return best;
}

struct FwdPlan {
  MmaPlan mma;
  int64_t off_flag = -1, off_pool_mma = -1, off_frag = -1;
  int nwp = 0;  // B-fragment words per lane and channel
  std::vector<Segment> segs;
  int64_t off_pool = -1, off_gp = -1, off_acc = -1;
  int64_t off_X[5] = {-1, -1, -1, -1, -1};
  int64_t bytes = 0;
};

struct BwdPlan {
  MmaPlan mma;  // the recompute on tensor cores (the forward's plan; segs then run only if it flagged)
  int64_t off_flag = -1, off_frag = -1;
  int nwp = 0;
  std::vector<Segment> segs;
  int64_t off_X[5] = {-1, -1, -1, -1, -1};
  int64_t off_D[2] = {-1, -1};
  int64_t nchunk = 0, off_dp = -1, off_dpool = -1, off_gg = -1;
  LevelPlan lv[kMaxLevels];
  LevelMmaPlan lvm[kMaxLevels];  // the tensor-core level kernel where it applies (lv[l] then its fallback)
  int64_t off_lflag = -1, off_lfrag[kMaxLevels] = {-1, -1, -1, -1};
  int64_t off_gw[kMaxLevels] = {-1, -1, -1, -1};
  int64_t bytes = 0;
};

int64_t map_bytes(const FocalContextArgs& a) { return a.B * a.H * a.W * a.C * (int64_t)sizeof(float); }
// The level maps x_1 .. x_{L-1} of the workspace hold WsT<T> (fc_device.cuh): bf16 for bf16 calls, else fp32.
int xmap_elem(const FocalContextArgs& a) { return a.dtype == kBFloat16 ? 2 : 4; }
int64_t xmap_bytes(const FocalContextArgs& a) { return a.B * a.H * a.W * a.C * (int64_t)xmap_elem(a); }
// Their 8-channel vectors allow 16-byte access (xmap_vec), or two 8-byte ones (xmap_vec8, 16-bit maps).
struct XmapVec {
  bool v16, v8;
};
template <typename T>
XmapVec xmap_vec(const FocalContextArgs& a) {
  const int e = (int)sizeof(WsT<T>);
  if (e != xmap_elem(a)) throw std::logic_error("focal_context_cuda: level-map element size mismatch");
  const bool al = a.workspace % 16 == 0;
  return {al && a.C % (16 / e) == 0, al && e == 2 && a.C % 4 == 0};
}
int64_t cblocks_of(const FocalContextArgs& a) { return cblocks_of(a.C); }

// B-fragment words per lane and channel of the tensor-core kernel (fc_mma_bfrag_kernel)
int mma_frag_words(const FocalContextArgs& a) {
  int words = 0;
  for (int l = 0; l < a.L; ++l) words += (a.dtype == kBFloat16 ? 2 * FC_MMA_BF16_NS : 2) * a.ksize[l];
  return (int)round_up(words, 4);
}

FwdPlan plan_fwd(const FocalContextArgs& a) {
  FwdPlan pl;
  pl.segs = make_segments(a, 0, a.L, true);
  pl.mma = plan_mma(a);
  Layout lay;
  if (pl.mma.ok) {
    pl.off_flag = lay.take(16);
    pl.off_pool_mma = lay.take((int64_t)a.B * pl.mma.ntiles * a.C * 4);
    pl.nwp = mma_frag_words(a);
    pl.off_frag = lay.take(a.C * 32 * (int64_t)pl.nwp * 4);
  }
  pl.off_pool = lay.take((int64_t)a.B * pl.segs.back().ntiles * a.C * 4);
  pl.off_gp = lay.take(a.B * a.C * 4);
  if (pl.segs.size() > 1) {
    pl.off_acc = lay.take(map_bytes(a));
    for (size_t i = 1; i < pl.segs.size(); ++i) pl.off_X[pl.segs[i].l0] = lay.take(xmap_bytes(a));
  }
  pl.bytes = lay.cur;
  return pl;
}

BwdPlan plan_bwd(const FocalContextArgs& a) {
  BwdPlan pl;
  const int L = a.L;
  Layout lay;
  if (L >= 2) {
    pl.mma = plan_mma(a, true);
    if (pl.mma.ok) {
      pl.off_flag = lay.take(16);
      pl.nwp = mma_frag_words(a);
      pl.off_frag = lay.take(a.C * 32 * (int64_t)pl.nwp * 4);
    }
    pl.segs = make_segments(a, 0, L - 1, false);
    for (int l = 1; l <= L - 1; ++l) pl.off_X[l] = lay.take(xmap_bytes(a));
    pl.off_D[0] = lay.take(map_bytes(a));
    if (L >= 3) pl.off_D[1] = lay.take(map_bytes(a));
  }
  pl.nchunk = ceil_div(a.H * a.W, PREP_POS);
  pl.off_dp = lay.take(a.B * pl.nchunk * a.C * 4);
  pl.off_dpool = lay.take(a.B * a.C * 4);
  const int64_t cblocks = cblocks_of(a);
  pl.off_gg = lay.take(cblocks * a.B * a.H * a.W * (L + 1) * 4);
  for (int l = 0; l < L; ++l) {
    LevelPlan& g = pl.lv[l];
    bool ok = false;
    double best_cost = 0.0;
    for (int th : kTileSides)
      for (int tw : kTileSides) {
        LevelPlan t;
        if (!level_geom(t, a.ksize[l], a.H, a.W, th, tw)) continue;
        const double c = level_cost(t, a.H, a.W);
        if (!ok || c < best_cost) {
          g = t;
          best_cost = c;
          ok = true;
        }
      }
    if (!ok) throw std::runtime_error("focal_context_cuda: no tile of the backward kernel fits shared memory");
    const int64_t tiles = a.B * g.ntiles;
    g.nslots = (int)std::min<int64_t>(tiles, std::max<int64_t>(1, kTargetBlocks / cblocks));
    if (pl.mma.ok && mma_bwd_enabled()) {
      LevelMmaPlan& m = pl.lvm[l];
      m = plan_level_mma(a, l);
      if (m.ok) {
        // the FMA kernel's slot count (any count is correct: a slot past the tiles writes zero partials),
        // so that fc_gw_finish_kernel reduces the same partials whichever of the two ran
        m.nslots = g.nslots;
        if (pl.off_lflag < 0) pl.off_lflag = lay.take(16);
        pl.off_lfrag[l] = lay.take(a.C * 32 * (int64_t)(2 * bfrag_words_per_dir(a.ksize[l])) * 4);
      }
    }
    pl.off_gw[l] = lay.take((int64_t)g.nslots * g.k * g.k * a.C * 4);
  }
  pl.bytes = lay.cur;
  return pl;
}

// ------------------------------------------------------------------------------------------
// validation, device, launches
// ------------------------------------------------------------------------------------------
void validate_shape(const FocalContextArgs& a) {
  if (a.B < 1 || a.H < 1 || a.W < 1 || a.C < 1)
    throw std::invalid_argument("focal_context_cuda: B, H, W, C must be >= 1");
  if (a.H > (int64_t(1) << 30) || a.W > (int64_t(1) << 30))
    throw std::invalid_argument("focal_context_cuda: H and W must be < 2^30");
  if (a.L < 1 || a.L > kMaxLevels)
    throw std::invalid_argument("focal_context_cuda: L must be in 1.." + std::to_string(kMaxLevels));
  for (int l = 0; l < a.L; ++l) {
    const int k = a.ksize[l];
    if (k < 3 || k > KMAX_ALL || k % 2 == 0)
      throw std::invalid_argument("focal_context_cuda: kernel size of level " + std::to_string(l) + " is " +
                                  std::to_string(k) + " (odd 3..15 required)");
  }
  if (a.dtype != kFloat32 && a.dtype != kFloat16 && a.dtype != kBFloat16)
    throw std::invalid_argument("focal_context_cuda: unknown dtype code " + std::to_string(a.dtype));
}

void require(uintptr_t p, const char* name) {
  if (p == 0) throw std::invalid_argument(std::string("focal_context_cuda: null pointer for ") + name);
}

void check_workspace(const FocalContextArgs& a, int64_t need) {
  if (need > 0) {
    if (a.workspace == 0 || a.workspace_bytes < need)
      throw std::invalid_argument("focal_context_cuda: workspace of " + std::to_string(a.workspace_bytes) +
                                  " bytes given, " + std::to_string(need) + " needed");
    if (a.workspace % 16 != 0) throw std::invalid_argument("focal_context_cuda: workspace must be 16-byte aligned");
  }
}

void cuda_check(cudaError_t e, const std::string& what) {
  if (e != cudaSuccess)
    throw std::runtime_error("focal_context_cuda: " + what + ": " + cudaGetErrorName(e) + ": " +
                             cudaGetErrorString(e));
}

void check_launch(const std::string& kernel) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    throw std::runtime_error("focal_context_cuda: kernel " + kernel + " failed: " + cudaGetErrorName(e) + ": " +
                             cudaGetErrorString(e));
}

void set_smem(const void* fn, int64_t bytes, const std::string& kernel, int64_t limit = kSmemBudget) {
  // Always the same value per kernel (the plan budget), so concurrent host threads cannot race.
  if (bytes > 48 * 1024)
    cuda_check(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)limit),
               "cudaFuncSetAttribute(" + kernel + ")");
}

unsigned grid_1d(int64_t n) {
  const int64_t g = ceil_div(std::max<int64_t>(n, 1), NT);
  return (unsigned)std::min<int64_t>(g, int64_t(1) << 20);
}

// The extension links its own (static) CUDA runtime, whose current device is independent of
// torch's: make the device that owns ctx current for the duration of the call.
struct DeviceGuard {
  int prev = -1, dev = -1;
  explicit DeviceGuard(uintptr_t ptr) {
    cudaPointerAttributes attr{};
    cuda_check(cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(ptr)), "cudaPointerGetAttributes(ctx)");
    if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
      throw std::invalid_argument("focal_context_cuda: ctx is not CUDA device memory");
    dev = attr.device;
    cuda_check(cudaGetDevice(&prev), "cudaGetDevice");
    if (prev != dev) cuda_check(cudaSetDevice(dev), "cudaSetDevice");
  }
  ~DeviceGuard() {
    if (prev >= 0 && prev != dev) cudaSetDevice(prev);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
};

// 16-byte vector access of 8 channels is legal for every (b, h, w) and channel block?
bool vecw(uintptr_t p, const std::array<int64_t, 4>& st, const int64_t (&sz)[4], int esz, int bytes) {
  if (p % bytes != 0) return false;
  const int64_t ve = bytes / esz;
  if (sz[3] > 1 && st[3] != 1) return false;
  for (int d = 0; d < 3; ++d)
    if (sz[d] > 1 && st[d] % ve != 0) return false;
  return true;
}
bool vec16(uintptr_t p, const std::array<int64_t, 4>& st, const int64_t (&sz)[4], int esz) {
  return vecw(p, st, sz, esz, 16);
}
// 8-byte access of 4 channels (fp16/bf16 only), e.g. the f projection's ctx slice with its pixel
// stride 2C + L + 1 = 196 (a multiple of 4, not of 8)
bool vec8_16bit(uintptr_t p, const std::array<int64_t, 4>& st, const int64_t (&sz)[4], int esz) {
  return esz == 2 && vecw(p, st, sz, esz, 8);
}

std::string seg_name(const char* dt, const Segment& s, bool fwd) {
  std::string n = std::string("fc_fused_kernel<") + dt + (s.spec >= 0 ? ", L=" : ", generic L=") +
                  std::to_string(s.nl) + ", k=";
  for (int j = 0; j < s.nl; ++j) n += (j ? "," : "") + std::to_string(s.k[j]);
  n += fwd ? "> (forward)" : "> (backward recompute)";
  return n;
}

// The grid fields every tiled launch's parameter block has (FusedParams, LevelBwdParams), from the
// arguments and the tile plan (Segment, LevelPlan).
template <class Params>
void set_shape(Params& P, const FocalContextArgs& a) {
  P.B = a.B;
  P.H = a.H;
  P.W = a.W;
  P.C = a.C;
  P.L = a.L;
}

template <class Params, class TilePlan>
void set_tile_grid(Params& P, const FocalContextArgs& a, const TilePlan& g, int64_t cblocks) {
  set_shape(P, a);
  P.TH = g.TH;
  P.TW = g.TW;
  P.accP = g.accP;
  P.ntw = g.ntw;
  P.ntiles = g.ntiles;
  P.cblocks = (int)cblocks;
}

template <typename T>
void launch_fused(const FocalContextArgs& a, const Segment& s, FusedParams& P, bool fwd, cudaStream_t st) {
  const int64_t cblocks = cblocks_of(a);
  set_tile_grid(P, a, s, cblocks);
  P.l0 = s.l0;
  P.nl = s.nl;
  for (int j = 0; j < 4; ++j) {
    P.k[j] = s.k[j];
    P.offW[j] = s.offW[j];
    P.w[j] = j < s.nl ? reinterpret_cast<const float*>(a.weight[s.l0 + j]) : nullptr;
  }
  for (int j = 0; j < 5; ++j) {
    P.R[j] = s.R[j];
    P.pitch[j] = s.pitch[j];
  }
  P.offA = s.offA;
  P.offB = s.offB;
  P.offG = s.offG;
  P.offRed = s.offRed;
  P.vmask = s.vmask;
  P.fwd = fwd ? 1 : 0;
  const std::string name = seg_name(dtype_name<T>(), s, fwd);
  const int64_t nblk = a.B * (int64_t)s.ntiles * cblocks;
  if (nblk > std::numeric_limits<int32_t>::max())
    throw std::runtime_error("focal_context_cuda: " + name + ": grid too large");
  const FusedFn fn = fused_fn<T>(s.spec);
  set_smem(reinterpret_cast<const void*>(fn), s.smem, name);
  FC_LAUNCH(fn, (unsigned)nblk, NT, (size_t)s.smem, st, P);
  check_launch(name);
}

// xws == nullptr: the forward; else the backward's recompute of x_1 .. x_{L-1} into xws[0 .. L-2] (REC).
template <typename T>
void launch_mma(const FocalContextArgs& a, const MmaPlan& m, int* flag, float* pool_part, uint32_t* frag, int nwp,
                bool ctx_vec, bool ctx_vec8, bool out_vec, float scale, cudaStream_t st,
                void* const* xws = nullptr, bool xws_vec = false) {
  if constexpr (sizeof(T) == 2) {
    MmaParams P{};
    set_shape(P, a);
    for (int j = 0; j < 3; ++j) {
      P.k[j] = j < a.L ? a.ksize[j] : 0;
      P.Rn[j] = m.Rn[j];
      P.nrow[j] = m.nrow[j];
      P.ncol[j] = m.ncol[j];
      P.pitch[j] = m.pitch[j];
      P.w[j] = j < a.L ? reinterpret_cast<const float*>(a.weight[j]) : nullptr;
    }
    P.H0 = m.H0;
    P.srows = m.srows;
    P.scols = m.scols;
    P.opitch = m.opitch;
    P.TH = m.TH;
    P.TW = m.TW;
    P.ntw = m.ntw;
    P.ntiles = m.ntiles;
    const int64_t cblocks = cblocks_of(a.C);
    P.cblocks = (int)cblocks;
    P.offS[0] = m.offS[0];
    P.offS[1] = m.offS[1];
    P.planeS[0] = m.planeS[0];
    P.planeS[1] = m.planeS[1];
    P.offG = m.offG;
    P.ctx = reinterpret_cast<const void*>(a.ctx);
    for (int d = 0; d < 4; ++d) P.cs[d] = a.ctx_stride[d];
    P.ctx_vec16 = ctx_vec;
    P.ctx_vec8 = ctx_vec8;
    P.gates = reinterpret_cast<const void*>(a.gates);
    for (int d = 0; d < 4; ++d) P.gs[d] = a.gates_stride[d];
    P.out = reinterpret_cast<void*>(a.out);
    P.out_vec = out_vec;
    P.pool_part = pool_part;
    P.flag = flag;
    P.scale = scale;
    const bool rec = xws != nullptr;
    for (int j = 0; j < 2; ++j) P.xws[j] = (rec && j < a.L - 1) ? xws[j] : nullptr;
    P.xws_vec = xws_vec;
    std::string name = std::string("fc_mma_fwd_kernel<") + dtype_name<T>() + ", k=";
    for (int j = 0; j < a.L; ++j) name += (j ? "," : "") + std::to_string(a.ksize[j]);
    name += rec ? "> (backward recompute)" : ">";
    using MmaFn = void (*)(MmaParams, const uint32_t*, int);
    MmaFn fn = nullptr;
    const int* k = a.ksize.data();
#define FC_MMA_CASE(LC, k0, k1, k2)                                            \
    if (a.L == LC && k[0] == k0 && k[1] == k1 && (LC < 3 || k[2] == k2))       \
      fn = rec ? &fc_mma_fwd_kernel<T, LC, k0, k1, k2, true> : &fc_mma_fwd_kernel<T, LC, k0, k1, k2, false>;
    FC_MMA_SPECS(FC_MMA_CASE)
#undef FC_MMA_CASE
    if (fn == nullptr) throw std::logic_error("focal_context_cuda: no " + name + " instance (planner bug)");
    cuda_check(cudaMemsetAsync(flag, 0, sizeof(int), st), "cudaMemsetAsync(flag)");
    FC_LAUNCH(fc_mma_bfrag_kernel<T>, grid_1d(a.C * 32), NT, 0, st, P, frag, nwp);
    check_launch(std::string("fc_mma_bfrag_kernel<") + dtype_name<T>() + ">");
    const int64_t nblk = a.B * (int64_t)m.ntiles * cblocks;
    set_smem(reinterpret_cast<const void*>(fn), m.smem, name, m.budget);
    FC_LAUNCH(fn, (unsigned)nblk, MMA_NT, (size_t)m.smem, st, P, (const uint32_t*)frag, nwp);
    check_launch(name);
  } else {
    throw std::logic_error("focal_context_cuda: tensor-core forward planned for fp32 (planner bug)");
  }
}

// The inputs of one fused segment: level 0 reads ctx through its strides; a later segment reads
// the level map x_{l0} that the previous segment left in the workspace (WsT<T>, contiguous B,H,W,C);
// the workspace maps X and the output scale are the same for every segment.
static FusedParams segment_inputs(const FocalContextArgs& a, const Segment& s, void* const X[5],
                                  bool ctx_vec, bool ctx_vec8, XmapVec xv, float scale) {
  FusedParams P{};
  for (int l = 0; l < 5; ++l) P.X[l] = X[l];
  P.scale = scale;
  if (s.l0 == 0) {
    P.src = reinterpret_cast<const void*>(a.ctx);
    for (int d = 0; d < 4; ++d) P.ss[d] = a.ctx_stride[d];
    P.src_is_ws = 0;
    P.src_vec = ctx_vec;
    P.src_vec8 = ctx_vec8;
  } else {
    P.src = X[s.l0];
    P.ss[0] = a.H * a.W * a.C;
    P.ss[1] = a.W * a.C;
    P.ss[2] = a.C;
    P.ss[3] = 1;
    P.src_is_ws = 1;
    P.src_vec = xv.v16;
    P.src_vec8 = xv.v8;
  }
  P.gates = reinterpret_cast<const void*>(a.gates);
  for (int d = 0; d < 4; ++d) P.gs[d] = a.gates_stride[d];
  return P;
}

template <typename T>
void run_fwd(const FocalContextArgs& a, const FwdPlan& pl, cudaStream_t st) {
  const int64_t B = a.B, H = a.H, W = a.W, C = a.C;
  const int L = a.L;
  char* ws = reinterpret_cast<char*>(a.workspace);
  const float scale = a.normalize ? 1.0f / (float)(L + 1) : 1.0f;
  const int64_t sz[4] = {B, H, W, C};
  const bool ctx_vec = vec16(a.ctx, a.ctx_stride, sz, (int)sizeof(T));
  const bool ctx_vec8 = vec8_16bit(a.ctx, a.ctx_stride, sz, (int)sizeof(T));
  const XmapVec xv = xmap_vec<T>(a);
  const bool out_vec = (a.out % 16 == 0) && (C % (int64_t)(16 / sizeof(T)) == 0);
  void* X[5] = {nullptr, nullptr, nullptr, nullptr, nullptr};
  for (int l = 0; l < 5; ++l)
    if (pl.off_X[l] >= 0) X[l] = ws + pl.off_X[l];
  float* acc = pl.off_acc >= 0 ? reinterpret_cast<float*>(ws + pl.off_acc) : nullptr;
  float* pool_part = reinterpret_cast<float*>(ws + pl.off_pool);
  float* gp = reinterpret_cast<float*>(ws + pl.off_gp);

  int* flag = nullptr;
  float* pool_mma = nullptr;
  if (pl.mma.ok) {
    flag = reinterpret_cast<int*>(ws + pl.off_flag);
    pool_mma = reinterpret_cast<float*>(ws + pl.off_pool_mma);
    launch_mma<T>(a, pl.mma, flag, pool_mma, reinterpret_cast<uint32_t*>(ws + pl.off_frag), pl.nwp, ctx_vec,
                  ctx_vec8, out_vec, scale, st);
  }
  for (const Segment& s : pl.segs) {
    FusedParams P = segment_inputs(a, s, X, ctx_vec, ctx_vec8, xv, scale);
    P.run_if = flag;  // with the tensor-core forward: a fallback that runs only when it flagged
    const bool final_out = s.l0 + s.nl == L;
    P.acc_in = s.l0 > 0;
    P.final_out = final_out;
    P.acc_ws = acc;
    P.xmask = final_out ? 0 : (1 << (s.nl - 1));
    P.out = reinterpret_cast<void*>(a.out);
    P.out_vec = out_vec;
    P.pool_part = pool_part;
    launch_fused<T>(a, s, P, true, st);
  }
  if (pl.mma.ok)
    FC_LAUNCH(fc_pool_finish_kernel, grid_1d(B * C), NT, 0, st, pool_mma, pl.mma.ntiles, B, C,
              1.0 / (double)(H * W), reinterpret_cast<float*>(a.pooled), gp, flag, pool_part,
              pl.segs.back().ntiles);
  else
    FC_LAUNCH(fc_pool_finish_kernel, grid_1d(B * C), NT, 0, st, pool_part, pl.segs.back().ntiles, B, C,
              1.0 / (double)(H * W), reinterpret_cast<float*>(a.pooled), gp, (const int*)nullptr,
              (const float*)nullptr, 0);
  check_launch("fc_pool_finish_kernel");
  if (!a.global_term) return;  // the caller applies the global term (the h GEMM's epilogue)
  const int64_t nch = cblocks_of(a);
  const int cpt = (int)ceil_div(nch, ceil_div(nch, 8));  // <= 8 channel blocks per thread, balanced
  FC_LAUNCH(fc_fwd_epilogue_kernel<T>, grid_1d(B * H * W * ceil_div(nch, cpt)), NT, 0, st,
      reinterpret_cast<T*>(a.out), B * H * W, H, W, C, reinterpret_cast<const T*>(a.gates), a.gates_stride[0],
      a.gates_stride[1], a.gates_stride[2], a.gates_stride[3], L, gp, scale, out_vec ? 1 : 0, cpt);
  check_launch(std::string("fc_fwd_epilogue_kernel<") + dtype_name<T>() + ">");
}

// The tensor-core backward of level P.l (bf16), with the FMA kernel's parameters as the source of its
// inputs and outputs; the weight fragments first (fc_bwd_mma_bfrag_kernel).
template <typename T>
void launch_level_mma(const FocalContextArgs& a, const LevelMmaPlan& m, const LevelBwdParams& F, int* flag,
                      uint32_t* frag, bool x_vec8, cudaStream_t st) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    const int k = m.k;
    LevelMmaParams Q{};
    static_cast<LevelIO&>(Q) = F;  // the inputs and outputs of the FMA kernel launched behind it
    Q.TH = m.TH;
    Q.TW = m.TW;
    Q.ntw = m.ntw;
    Q.ntiles = m.ntiles;
    Q.cblocks = F.cblocks;
    Q.nslots = m.nslots;
    Q.nrowZ = m.nrowZ;
    Q.ncolZ = m.ncolZ;
    Q.nrowT = m.nrowT;
    Q.ncolT = m.ncolT;
    Q.ncolE = m.ncolE;
    Q.xrows = m.xrows;
    Q.xp = m.xp;
    Q.dp = m.dp;
    Q.np = m.np;
    Q.planeX = m.planeX;
    Q.planeD = m.planeD;
    Q.planeN = m.planeN;
    Q.offX = 0;
    Q.offDh = CB * m.planeX;
    Q.offDl = Q.offDh + CB * m.planeD;                        // FC_BWD_DZ_SPLIT builds only
    Q.offN = Q.offDh + (1 + FC_BWD_DZ_SPLIT) * CB * m.planeD;
    Q.x_vec8 = x_vec8;
    Q.frag = frag;
    Q.flag = flag;
    const std::string name = "fc_bwd_level_mma_kernel<bf16, k=" + std::to_string(k) + "> (level " +
                             std::to_string(F.l) + ")";
    const LevelMmaFn fn = level_mma_fn(k, F.l, a.L);
    if (fn == nullptr) throw std::logic_error("focal_context_cuda: " + name + ": no instance (planner bug)");
    cuda_check(cudaMemsetAsync(flag, 0, sizeof(int), st), "cudaMemsetAsync(level flag)");
    FC_LAUNCH(fc_bwd_mma_bfrag_kernel, grid_1d(a.C * 32), NT, 0, st, F.w, a.C, k, frag, flag);
    check_launch("fc_bwd_mma_bfrag_kernel");
    const int64_t nblk = (int64_t)m.nslots * F.cblocks;
    set_smem(reinterpret_cast<const void*>(fn), m.smem, name, m.budget);
    FC_LAUNCH(fn, (unsigned)nblk, MMA_NT, (size_t)m.smem, st, Q);
    check_launch(name);
  } else {
    throw std::logic_error("focal_context_cuda: tensor-core backward planned for a dtype other than bf16 (planner bug)");
  }
}

template <typename T>
void run_bwd(const FocalContextArgs& a, const BwdPlan& pl, cudaStream_t st) {
  const int64_t B = a.B, H = a.H, W = a.W, C = a.C;
  const int L = a.L;
  const int64_t cblocks = cblocks_of(a);
  char* ws = reinterpret_cast<char*>(a.workspace);
  const float scale = a.normalize ? 1.0f / (float)(L + 1) : 1.0f;
  const int64_t sz[4] = {B, H, W, C};
  const bool ctx_vec = vec16(a.ctx, a.ctx_stride, sz, (int)sizeof(T));
  const bool ctx_vec8 = vec8_16bit(a.ctx, a.ctx_stride, sz, (int)sizeof(T));
  const bool dout_vec = vec16(a.grad_out, a.grad_out_stride, sz, (int)sizeof(T));
  const bool ws_vec = (C % 4 == 0) && (a.workspace % 16 == 0);  // the fp32 dx maps
  const XmapVec xv = xmap_vec<T>(a);
  const bool gctx_vec = (a.grad_ctx % 16 == 0) && (C % (int64_t)(16 / sizeof(T)) == 0);
  void* X[5] = {nullptr, nullptr, nullptr, nullptr, nullptr};
  for (int l = 0; l < 5; ++l)
    if (pl.off_X[l] >= 0) X[l] = ws + pl.off_X[l];
  auto Dmap = [&](int l) -> float* {  // dx_l for 1 <= l <= L-1
    const int i = (L == 2) ? 0 : (l & 1);
    return reinterpret_cast<float*>(ws + pl.off_D[i]);
  };
  float* dp_part = reinterpret_cast<float*>(ws + pl.off_dp);
  float* dpool = reinterpret_cast<float*>(ws + pl.off_dpool);
  float* gg = reinterpret_cast<float*>(ws + pl.off_gg);

  // 1. recompute x_1 .. x_{L-1} into the workspace: on tensor cores where the forward ran on them (the
  //    FMA segments then run only if it flagged a value it cannot reproduce), else the FMA segments
  int* flag = nullptr;
  if (pl.mma.ok) {
    flag = reinterpret_cast<int*>(ws + pl.off_flag);
    launch_mma<T>(a, pl.mma, flag, nullptr, reinterpret_cast<uint32_t*>(ws + pl.off_frag), pl.nwp, ctx_vec, ctx_vec8,
                  false, scale, st, X + 1, xv.v16);
  }
  for (const Segment& s : pl.segs) {
    FusedParams P = segment_inputs(a, s, X, ctx_vec, ctx_vec8, xv, scale);
    P.run_if = flag;
    P.xmask = (1 << s.nl) - 1;
    launch_fused<T>(a, s, P, false, st);
  }

  // 2. level-independent partials, dpool
  {
    PrepParams Q{};
    Q.B = B;
    Q.H = H;
    Q.W = W;
    Q.C = C;
    Q.L = L;
    Q.cblocks = (int)cblocks;
    Q.nchunk = pl.nchunk;
    Q.dout = reinterpret_cast<const void*>(a.grad_out);
    for (int d = 0; d < 4; ++d) Q.ds[d] = a.grad_out_stride[d];
    Q.dout_vec = dout_vec;
    Q.gates = reinterpret_cast<const void*>(a.gates);
    for (int d = 0; d < 4; ++d) Q.gs[d] = a.gates_stride[d];
    Q.pooled = reinterpret_cast<const float*>(a.pooled);
    Q.gg = gg;
    Q.dp_part = dp_part;
    const int64_t nblk = B * pl.nchunk * cblocks;
    if (nblk > std::numeric_limits<int32_t>::max())
      throw std::runtime_error("focal_context_cuda: fc_bwd_prep_kernel: grid too large");
    const bool flat = Q.ds[1] == W * Q.ds[2] && Q.gs[1] == W * Q.gs[2];
    void (*prep)(const PrepParams) = H * W + PREP_POS >= (int64_t(1) << 31) ? fc_bwd_prep_kernel<T, true>
                                     : flat                                  ? fc_bwd_prep_kernel<T, false, true>
                                                                             : fc_bwd_prep_kernel<T, false, false>;
    FC_LAUNCH(prep, (unsigned)nblk, NT, (NWARP + 1) * CB * sizeof(float), st, Q);
    check_launch(std::string("fc_bwd_prep_kernel<") + dtype_name<T>() + ">");
    FC_LAUNCH(fc_dpool_finish_kernel, grid_1d(B * C), NT, 0, st, dp_part, pl.nchunk, B, C,
              reinterpret_cast<const float*>(a.pooled), scale, 1.0 / (double)(H * W), dpool);
    check_launch("fc_dpool_finish_kernel");
  }

  // 3. levels L-1 .. 0
  for (int l = L - 1; l >= 0; --l) {
    const LevelPlan& g = pl.lv[l];
    LevelBwdParams P{};
    set_tile_grid(P, a, g, cblocks);
    P.l = l;
    P.nslots = g.nslots;
    P.pX = g.pX;
    P.pZ = g.pZ;
    P.offX = g.offX;
    P.offZ = g.offZ;
    P.offW = g.offW;
    P.offD = g.offD;
    P.offGp = g.offGp;
    if (l == 0) {
      P.xsrc = reinterpret_cast<const void*>(a.ctx);
      for (int d = 0; d < 4; ++d) P.xs[d] = a.ctx_stride[d];
      P.x_is_ws = 0;
      P.x_vec = ctx_vec;
    } else {
      P.xsrc = X[l];
      P.xs[0] = H * W * C;
      P.xs[1] = W * C;
      P.xs[2] = C;
      P.xs[3] = 1;
      P.x_is_ws = 1;
      P.x_vec = xv.v16;
    }
    P.dx_in = (l < L - 1) ? Dmap(l + 1) : nullptr;
    P.ws_vec = ws_vec;
    P.dout = reinterpret_cast<const void*>(a.grad_out);
    for (int d = 0; d < 4; ++d) P.ds[d] = a.grad_out_stride[d];
    P.dout_vec = dout_vec;
    P.gates = reinterpret_cast<const void*>(a.gates);
    for (int d = 0; d < 4; ++d) P.gs[d] = a.gates_stride[d];
    P.dpool = dpool;
    P.w = reinterpret_cast<const float*>(a.weight[l]);
    if (l == 0) {
      P.dx_out = reinterpret_cast<void*>(a.grad_ctx);
      P.out_vec = gctx_vec;
    } else {
      P.dx_out = Dmap(l);
      P.out_vec = ws_vec;
    }
    P.gg = gg;
    P.gw_part = reinterpret_cast<float*>(ws + pl.off_gw[l]);
    P.scale = scale;
    const std::string name = std::string("fc_bwd_level_kernel<") + dtype_name<T>() + ", k=" + std::to_string(g.k) +
                             "> (level " + std::to_string(l) + ")";
    const int64_t nblk = (int64_t)g.nslots * cblocks;
    if (nblk > std::numeric_limits<int32_t>::max())
      throw std::runtime_error("focal_context_cuda: " + name + ": grid too large");
    // the level kernels index tiles in 32 bits
    const int64_t mtiles = pl.lvm[l].ok ? std::max<int64_t>(g.ntiles, pl.lvm[l].ntiles) : g.ntiles;
    if (B * mtiles > std::numeric_limits<int32_t>::max())
      throw std::runtime_error("focal_context_cuda: " + name + ": B * tiles >= 2^31 (batch too large)");
    if (pl.lvm[l].ok) {
      int* lflag = reinterpret_cast<int*>(ws + pl.off_lflag) + l;
      launch_level_mma<T>(a, pl.lvm[l], P, lflag, reinterpret_cast<uint32_t*>(ws + pl.off_lfrag[l]),
                          l == 0 ? ctx_vec8 : xv.v8, st);
      P.run_if = lflag;  // the FMA kernel below: only if the tensor-core one flagged
    }
    const LevelFn fn = level_fn<T>(g.k);
    set_smem(reinterpret_cast<const void*>(fn), g.smem, name);
    FC_LAUNCH(fn, (unsigned)nblk, NT, (size_t)g.smem, st, P);
    check_launch(name);
  }

  // 4. fixed-order reductions of the partials
  const int64_t ng = B * H * W * (L + 1);
  FC_LAUNCH(fc_gates_finish_kernel<T>, grid_1d(ng), NT, 0, st, gg, (int)cblocks, ng, L + 1, scale,
            reinterpret_cast<T*>(a.grad_gates));
  check_launch(std::string("fc_gates_finish_kernel<") + dtype_name<T>() + ">");
  for (int l = 0; l < L; ++l) {
    const LevelPlan& g = pl.lv[l];
    FC_LAUNCH(fc_gw_finish_kernel, grid_1d((int64_t)g.k * g.k * C), NT, 0, st,
        reinterpret_cast<const float*>(ws + pl.off_gw[l]), g.nslots, g.k * g.k, C,
        reinterpret_cast<float*>(a.grad_weight[l]));
    check_launch("fc_gw_finish_kernel (level " + std::to_string(l) + ")");
  }
}

}  // namespace

int64_t focal_context_workspace_bytes_cuda(const FocalContextArgs& a, bool backward) {
  validate_shape(a);
  return backward ? plan_bwd(a).bytes : plan_fwd(a).bytes;
}

std::string focal_context_fwd_plan_cuda(const FocalContextArgs& a) {
  validate_shape(a);
  const MmaPlan m = plan_mma(a);
  if (m.ok) return "mma " + std::to_string(m.TH) + "x" + std::to_string(m.TW);
  return "fma";
}

std::string focal_context_bwd_plan_cuda(const FocalContextArgs& a) {
  validate_shape(a);
  const BwdPlan pl = plan_bwd(a);
  std::string s = "recompute";
  if (pl.mma.ok) s += " mma " + std::to_string(pl.mma.TH) + "x" + std::to_string(pl.mma.TW) + " else";
  for (const Segment& g : pl.segs) s += " " + std::to_string(g.TH) + "x" + std::to_string(g.TW);
  for (int l = 0; l < a.L; ++l) {
    const LevelPlan& g = pl.lv[l];
    const LevelMmaPlan& m = pl.lvm[l];
    s += "; level " + std::to_string(l) + ": k" + std::to_string(g.k);
    if (m.ok)
      s += " mma " + std::to_string(m.TH) + "x" + std::to_string(m.TW) + " slots " + std::to_string(m.nslots) +
           " else";
    s += " " + std::to_string(g.TH) + "x" + std::to_string(g.TW) + " slots " + std::to_string(g.nslots);
  }
  return s;
}

void focal_context_fwd_cuda(const FocalContextArgs& a) {
  validate_shape(a);
  require(a.ctx, "ctx");
  require(a.gates, "gates");
  require(a.out, "out");
  require(a.pooled, "pooled");
  for (int l = 0; l < a.L; ++l) require(a.weight[l], "weight");
  const FwdPlan pl = plan_fwd(a);
  check_workspace(a, pl.bytes);
  DeviceGuard guard(a.ctx);
  (void)cudaGetLastError();  // do not blame our first launch for an earlier, unrelated error
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(a.stream);
  switch (a.dtype) {
    case kFloat32: run_fwd<float>(a, pl, st); break;
    case kFloat16: run_fwd<__half>(a, pl, st); break;
    default: run_fwd<__nv_bfloat16>(a, pl, st); break;
  }
}

void focal_context_bwd_cuda(const FocalContextArgs& a) {
  validate_shape(a);
  require(a.ctx, "ctx");
  require(a.gates, "gates");
  require(a.pooled, "pooled");
  require(a.grad_out, "grad_out");
  require(a.grad_ctx, "grad_ctx");
  require(a.grad_gates, "grad_gates");
  for (int l = 0; l < a.L; ++l) {
    require(a.weight[l], "weight");
    require(a.grad_weight[l], "grad_weight");
  }
  const BwdPlan pl = plan_bwd(a);
  check_workspace(a, pl.bytes);
  DeviceGuard guard(a.ctx);
  (void)cudaGetLastError();
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(a.stream);
  switch (a.dtype) {
    case kFloat32: run_bwd<float>(a, pl, st); break;
    case kFloat16: run_bwd<__half>(a, pl, st); break;
    default: run_bwd<__nv_bfloat16>(a, pl, st); break;
  }
}

}  // namespace focalnet
