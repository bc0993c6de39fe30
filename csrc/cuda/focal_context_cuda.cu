// Placeholder: replaced by the CUDA backend.
#include <stdexcept>
#include "focal_context.h"
namespace focalnet {
int64_t focal_context_workspace_bytes_cuda(const FocalContextArgs&, bool) { return 0; }
void focal_context_fwd_cuda(const FocalContextArgs&) { throw std::runtime_error("focal_context_fwd_cuda: not implemented"); }
void focal_context_bwd_cuda(const FocalContextArgs&) { throw std::runtime_error("focal_context_bwd_cuda: not implemented"); }
}
