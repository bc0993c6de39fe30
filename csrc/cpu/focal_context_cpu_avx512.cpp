// focal_context CPU kernels compiled for AVX-512 (512-bit vectors; with 32 registers the conv and
// weight-gradient kernels keep whole kernel rows and 8-16 output pixels in registers: FC_VW = 16,
// FC_REGW).
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
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#endif

namespace focalnet {
namespace cpu {
namespace isa_avx512 {
#define FC_NX 8
#define FC_NJ 8
#define FC_VW 16
#define FC_REGW 1
#include "focal_context_cpu_kernels.inc"
#undef FC_NX
#undef FC_NJ
#undef FC_VW
#undef FC_REGW
}  // namespace isa_avx512
}  // namespace cpu
}  // namespace focalnet

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // FOCALNET_CPU_X86_DISPATCH
