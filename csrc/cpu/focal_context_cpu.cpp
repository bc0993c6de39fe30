// Placeholder: replaced by the CPU backend.
#include <stdexcept>
#include "focal_context.h"
namespace focalnet {
int64_t focal_context_workspace_bytes_cpu(const FocalContextArgs&, bool) { return 0; }
void focal_context_fwd_cpu(const FocalContextArgs&) { throw std::runtime_error("focal_context_fwd_cpu: not implemented"); }
void focal_context_bwd_cpu(const FocalContextArgs&) { throw std::runtime_error("focal_context_bwd_cpu: not implemented"); }
}
