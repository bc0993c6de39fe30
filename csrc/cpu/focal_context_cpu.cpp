// Native CPU backend of focal_context (C ABI in focal_context.h, math in docs/backend-contract.md).
//
// This file validates the arguments, fixes the tiling plan and workspace layout (a function of the
// shape alone, never of the thread count: results are bit-identical for any OMP_NUM_THREADS),
// and dispatches at run time to the kernels compiled for the best instruction set the CPU has:
// baseline (this file: SSE2 on x86-64, or whatever the target's default is), AVX2+FMA
// (focal_context_cpu_avx2.cpp) or AVX-512 (focal_context_cpu_avx512.cpp). The extension itself is
// built without -march, so it runs on any CPU of the architecture. FOCALNET_CPU_ISA=base|avx2|avx512
// caps the choice (tests use it to check every path; parsing in choose_isa).
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "focal_context.h"
#include "focal_context_cpu_plan.h"

namespace focalnet {
namespace cpu {

// Baseline instantiation of the kernels (no target pragma).
namespace isa_base {
#define FC_NX 2
#define FC_NJ 2
#define FC_VW 0
#define FC_REGW 0
#include "focal_context_cpu_kernels.inc"
#undef FC_NX
#undef FC_NJ
#undef FC_VW
#undef FC_REGW
}  // namespace isa_base

namespace {

[[noreturn]] void bad(const char* fn, const std::string& msg) {
  throw std::invalid_argument(std::string(fn) + ": " + msg);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t m) { return ceil_div(a, m) * m; }

Plan make_plan(const FocalContextArgs& a, bool backward, const char* fn) {
  if (a.B < 1 || a.H < 1 || a.W < 1 || a.C < 1)
    bad(fn, "B, H, W, C must all be >= 1 (got B=" + std::to_string(a.B) + ", H=" +
                std::to_string(a.H) + ", W=" + std::to_string(a.W) + ", C=" + std::to_string(a.C) +
                ")");
  if (a.L < 1 || a.L > kMaxLevels)
    bad(fn, "the number of focal levels L must be in 1.." + std::to_string(kMaxLevels) + " (got " +
                std::to_string(a.L) + ")");
  if (a.dtype != kFloat32 && a.dtype != kFloat16 && a.dtype != kBFloat16)
    bad(fn, "dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got " +
                std::to_string(a.dtype));
  if ((double)a.B * (double)a.H * (double)a.W * (double)(a.C + 16) > 0x1p40)
    bad(fn, "tensor too large");

  Plan pl;
  pl.B = a.B; pl.H = a.H; pl.W = a.W; pl.C = a.C; pl.L = a.L;
  pl.dtype = a.dtype;
  pl.s = a.normalize ? 1.0f / (float)(a.L + 1) : 1.0f;
  for (int l = 0; l < a.L; ++l) {
    const int k = a.ksize[l];
    if (k < 1 || k > 15 || k % 2 == 0)
      bad(fn, "kernel size of level " + std::to_string(l) + " must be odd and in 1..15 (got " +
                  std::to_string(k) + ")");
    pl.K[l] = k;
    pl.P[l] = k / 2;
    if (pl.P[l] > pl.pmax) pl.pmax = pl.P[l];
  }
  for (int l = a.L - 1; l >= 0; --l) pl.R[l] = pl.R[l + 1] + pl.P[l];
  const int64_t R0 = pl.R[0];
  pl.Cp = round_up(a.C, kCB);
  pl.NCB = pl.Cp / kCB;

  // Tiles: full rows up to 64 pixels wide (no column halo to recompute) and as high as possible
  // (up to 64 rows: the halo rows are recomputed per tile). Work items are (image, tile, channel
  // block); rows are split further only while that gives fewer than 8 items and tiles stay at
  // least max(8, 2 R0) rows high.
  pl.TW = a.W <= 64 ? a.W : ceil_div(a.W, ceil_div(a.W, 48));
  pl.NTX = ceil_div(a.W, pl.TW);
  int64_t nty = ceil_div(a.H, 64);
  const int64_t th_min = std::max<int64_t>(8, 2 * R0);
  while (a.B * nty * pl.NTX * pl.NCB < 8 && ceil_div(a.H, nty + 1) >= th_min) ++nty;
  pl.TH = ceil_div(a.H, nty);
  pl.NTY = ceil_div(a.H, pl.TH);
  pl.NT = pl.NTY * pl.NTX;
  pl.BH = pl.TH + 2 * R0;
  pl.BW = pl.TW + 2 * R0;

  // Workspace (floats, every block a multiple of kCB floats).
  int64_t off = 0;
  auto take = [&](int64_t n) {
    const int64_t o = off;
    off += round_up(n, kCB);
    return o;
  };
  for (int l = 0; l < a.L; ++l) pl.off_wt[l] = take(pl.NCB * pl.K[l] * pl.K[l] * kCB);
  if (backward)
    for (int l = 0; l < a.L; ++l) pl.off_wtf[l] = take(pl.NCB * pl.K[l] * pl.K[l] * kCB);
  pl.off_part = take(a.B * pl.NT * pl.Cp);
  pl.off_gall = take(a.B * a.H * a.W * (a.L + 1));
  pl.off_gp = take(a.B * pl.Cp);
  pl.map_elems = a.B * pl.NCB * a.H * a.W * kCB;
  pl.gw_elems = 0;
  for (int l = 0; l < a.L; ++l) {
    pl.gw_off[l] = pl.gw_elems;
    pl.gw_elems += pl.NCB * pl.K[l] * pl.K[l] * kCB;
  }
  if (backward) {
    pl.off_dp = take(a.B * pl.Cp);
    pl.off_gwp = take(a.B * pl.NT * pl.gw_elems);
    if (pl.NT == 1) {   // fused per-image backward: per-thread slots instead of full-batch maps
      pl.slots = std::max<int64_t>(1, std::min<int64_t>(a.B * pl.NCB, omp_get_max_threads()));
      pl.off_ggp = take(a.B * pl.NCB * a.H * a.W * (a.L + 1));
      pl.slot_floats = single_slot_floats(pl);
      pl.off_slots = take(pl.slots * pl.slot_floats);
    } else {
      pl.off_z = take(a.L * pl.map_elems);
    }
  } else if (pl.NT > 1) {   // two-pass global term (see fwd_impl)
    if (a.dtype != kFloat32) pl.off_stage = take(a.B * a.H * a.W * a.C);
  }
  pl.total = off;
  return pl;
}

int64_t plan_bytes(const Plan& pl) { return pl.total * (int64_t)sizeof(float) + 64; }

float* aligned_workspace(const FocalContextArgs& a, Plan& pl, const char* fn) {
  // The fused backward sizes its per-thread slots by the OpenMP thread count at query time; should
  // the count have grown since, use fewer slots (the team is capped to them; results unchanged).
  while (pl.slots > 1 && plan_bytes(pl) > a.workspace_bytes) {
    --pl.slots;
    pl.total = pl.off_slots + pl.slots * pl.slot_floats;
  }
  const int64_t need = plan_bytes(pl);
  if (a.workspace == 0 || a.workspace_bytes < need)
    bad(fn, "workspace too small: " + std::to_string(a.workspace_bytes) + " bytes given, " +
                std::to_string(need) + " needed (focal_context_workspace_bytes_cpu)");
  return reinterpret_cast<float*>((a.workspace + 63) & ~uintptr_t(63));
}

void require(bool ok, const char* fn, const char* what) {
  if (!ok) bad(fn, std::string(what) + " is a null pointer");
}

enum class Isa { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

Isa best_isa() {
#ifdef FOCALNET_CPU_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kBase;
}

// FOCALNET_CPU_ISA, read at each call, compared without case and surrounding whitespace:
// unset, empty or `auto`: the best the CPU has; `avx512`, `avx2`, `base`: that path, capped to the
// best the CPU has (so `avx512` on an AVX2-only CPU runs avx2; focalnet_kernels.native warns once
// when it caps). Any other value throws std::invalid_argument (ValueError in Python) naming the
// variable, the value and the choices: a typo never silently runs another path.
Isa choose_isa() {
  static const Isa best = best_isa();
  Isa want = best;
  if (const char* e = std::getenv("FOCALNET_CPU_ISA")) {
    std::string v(e);
    const char* ws = " \t\n\r\f\v";
    const size_t b = v.find_first_not_of(ws);
    v = (b == std::string::npos) ? std::string() : v.substr(b, v.find_last_not_of(ws) - b + 1);
    for (char& c : v) c = (c >= 'A' && c <= 'Z') ? (char)(c - 'A' + 'a') : c;
    if (v == "base") want = Isa::kBase;
    else if (v == "avx2") want = Isa::kAvx2;
    else if (v == "avx512") want = Isa::kAvx512;
    else if (!v.empty() && v != "auto")
      throw std::invalid_argument(std::string("FOCALNET_CPU_ISA='") + e +
                                  "' is not one of auto, avx512, avx2, base");
  }
  return (int)want < (int)best ? want : best;
}

int dispatch(const FocalContextArgs& a, const Plan& pl, float* ws, bool backward) {
  switch (choose_isa()) {
#ifdef FOCALNET_CPU_X86_DISPATCH
    case Isa::kAvx512:
      return backward ? isa_avx512::run_bwd(a, pl, ws) : isa_avx512::run_fwd(a, pl, ws);
    case Isa::kAvx2:
      return backward ? isa_avx2::run_bwd(a, pl, ws) : isa_avx2::run_fwd(a, pl, ws);
#endif
    default:
      return backward ? isa_base::run_bwd(a, pl, ws) : isa_base::run_fwd(a, pl, ws);
  }
}

}  // namespace
}  // namespace cpu

const char* focal_context_cpu_isa() {
  switch (cpu::choose_isa()) {
    case cpu::Isa::kAvx512: return "avx512";
    case cpu::Isa::kAvx2: return "avx2";
    default: return "base";
  }
}

int64_t focal_context_workspace_bytes_cpu(const FocalContextArgs& a, bool backward) {
  return cpu::plan_bytes(cpu::make_plan(a, backward, "focal_context_workspace_bytes_cpu"));
}

void focal_context_fwd_cpu(const FocalContextArgs& a) {
  const char* fn = "focal_context_fwd_cpu";
  cpu::Plan pl = cpu::make_plan(a, false, fn);
  cpu::require(a.ctx != 0, fn, "ctx");
  cpu::require(a.gates != 0, fn, "gates");
  cpu::require(a.out != 0, fn, "out");
  cpu::require(a.pooled != 0, fn, "pooled");
  for (int l = 0; l < a.L; ++l) cpu::require(a.weight[l] != 0, fn, "weight");
  if (!a.global_term) cpu::bad(fn, "global_term=false is not supported by the CPU kernel (CUDA only)");
  float* ws = cpu::aligned_workspace(a, pl, fn);
  if (cpu::dispatch(a, pl, ws, false) != 0)
    throw std::runtime_error("focal_context_fwd_cpu: out of memory for per-thread tile buffers");
}

void focal_context_bwd_cpu(const FocalContextArgs& a) {
  const char* fn = "focal_context_bwd_cpu";
  cpu::Plan pl = cpu::make_plan(a, true, fn);
  cpu::require(a.ctx != 0, fn, "ctx");
  cpu::require(a.gates != 0, fn, "gates");
  cpu::require(a.pooled != 0, fn, "pooled");
  cpu::require(a.grad_out != 0, fn, "grad_out");
  cpu::require(a.grad_ctx != 0, fn, "grad_ctx");
  cpu::require(a.grad_gates != 0, fn, "grad_gates");
  for (int l = 0; l < a.L; ++l) {
    cpu::require(a.weight[l] != 0, fn, "weight");
    cpu::require(a.grad_weight[l] != 0, fn, "grad_weight");
  }
  float* ws = cpu::aligned_workspace(a, pl, fn);
  if (cpu::dispatch(a, pl, ws, true) != 0)
    throw std::runtime_error("focal_context_bwd_cpu: out of memory for per-thread tile buffers");
}

}  // namespace focalnet
