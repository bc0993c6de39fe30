// The C ABI shared by the native focal-context backends (CPU and CUDA).
//
// The extension does not link libtorch: Python validates the inputs, allocates every output
// and workspace with torch, and passes raw pointers, sizes and element strides here.
//
// Computation (notes §1), tokens channels-last B x H x W x C, L levels:
//   x_0 = ctx;  x_{l+1} = GELU(dwconv_l(x_l))   (zero 'same' padding, no bias, exact erf GELU)
//   out  = s * ( sum_l gates[..., l] * x_{l+1}  +  gates[..., L] * GELU(pooled) )
//   pooled[b, c] = mean_{h,w} x_L[b, h, w, c];   s = 1/(L+1) if normalize else 1
#pragma once
#include <array>
#include <cstdint>
#include <string>

namespace focalnet {

enum DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int kMaxLevels = 4;

struct FocalContextArgs {
  int64_t B = 0, H = 0, W = 0, C = 0;
  int32_t L = 0;                              // 1..kMaxLevels
  std::array<int32_t, kMaxLevels> ksize{};    // odd kernel size of each level (3..15)
  int32_t dtype = kFloat32;                   // dtype of ctx, gates, grad_out, out, grad_ctx, grad_gates
  bool normalize = false;
  bool deterministic = true;                  // no float atomics when true
  // Forward: add the global term s * g_L * GELU(pooled) to out (false: out holds only the levels'
  // gated sum, for a caller that applies the rank-1 global term itself, in the h GEMM's epilogue).
  // CUDA only: the CPU forward rejects false.
  bool global_term = true;

  // Inputs. Strides are in ELEMENTS, ordered (B, H, W, C); any strides (views) are allowed.
  uintptr_t ctx = 0;   std::array<int64_t, 4> ctx_stride{};
  uintptr_t gates = 0; std::array<int64_t, 4> gates_stride{};   // B x H x W x (L+1)
  std::array<uintptr_t, kMaxLevels> weight{};   // float32, contiguous [C, k, k] per level

  // Forward outputs: out is contiguous B x H x W x C in `dtype`; pooled is float32 contiguous [B, C].
  uintptr_t out = 0;
  uintptr_t pooled = 0;   // written by forward, read by backward

  // Backward: grad_out has arbitrary strides (B, H, W, C order).
  uintptr_t grad_out = 0; std::array<int64_t, 4> grad_out_stride{};
  uintptr_t grad_ctx = 0;     // contiguous B x H x W x C, `dtype`
  uintptr_t grad_gates = 0;   // contiguous B x H x W x (L+1), `dtype`
  std::array<uintptr_t, kMaxLevels> grad_weight{};   // float32 contiguous [C, k, k]

  // Scratch memory allocated by the caller (size from *_workspace_bytes), may be 0 if 0 requested.
  uintptr_t workspace = 0; int64_t workspace_bytes = 0;
  uintptr_t stream = 0;   // cudaStream_t of the caller (CUDA only)
};

// Each function throws std::invalid_argument (bad arguments) or std::runtime_error
// (launch / runtime failure, message names the kernel).
int64_t focal_context_workspace_bytes_cpu(const FocalContextArgs& a, bool backward);
void focal_context_fwd_cpu(const FocalContextArgs& a);
void focal_context_bwd_cpu(const FocalContextArgs& a);
// The instruction-set path the CPU functions run with now ("avx512", "avx2" or "base": the best the
// CPU has, capped by FOCALNET_CPU_ISA), so tests can prove which kernel instantiation ran. It, and
// the CPU functions, throw std::invalid_argument for a FOCALNET_CPU_ISA other than auto, avx512,
// avx2 or base (case and surrounding whitespace ignored; unset or empty: auto).
const char* focal_context_cpu_isa();

#ifdef FOCALNET_WITH_CUDA
int64_t focal_context_workspace_bytes_cuda(const FocalContextArgs& a, bool backward);
void focal_context_fwd_cuda(const FocalContextArgs& a);
void focal_context_bwd_cuda(const FocalContextArgs& a);
// The forward's main kernel for these arguments: "mma TH x TW" (tensor cores) or "fma" (fc_fused_kernel).
std::string focal_context_fwd_plan_cuda(const FocalContextArgs& a);
// The backward's plan: "recompute TH x TW[, ...]; level l: k TH x TW slots N; ..." (levels l = 0 .. L-1),
// what the cost model's port (focalnet_kernels.cost_model.cuda_plan_bwd) is checked against.
std::string focal_context_bwd_plan_cuda(const FocalContextArgs& a);
#endif

}  // namespace focalnet
