// focal_context CPU kernels compiled for AVX2 + FMA (256-bit vectors, 16 registers): the conv of
// each level register-blocked per half pixel (FC_VW = 8: lanes 0-7, then 8-15 of a block of 8
// pixels, K <= 7 weights in registers) with GELU, gating and the stores in its epilogue, GELU a
// polynomial (see focal_context_cpu_kernels.inc); the plain kernels use 4 pixels x 2 ymm.
// Selected at run time by focal_context_cpu.cpp only when the CPU supports it; the rest of the
// extension stays baseline, so the wheel runs anywhere. System headers come before the target
// pragma, and the kernels instantiate no std template (see focal_context_cpu_kernels.inc).
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "focal_context.h"
#include "focal_context_cpu_plan.h"

#ifdef FOCALNET_CPU_X86_DISPATCH

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace focalnet {
namespace cpu {
namespace isa_avx2 {
#define FC_NX 4
#define FC_NJ 4
#define FC_VW 8
#define FC_REGW 0
#include "focal_context_cpu_kernels.inc"
#undef FC_NX
#undef FC_NJ
#undef FC_VW
#undef FC_REGW
}  // namespace isa_avx2
}  // namespace cpu
}  // namespace focalnet

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // FOCALNET_CPU_X86_DISPATCH
