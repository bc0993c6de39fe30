"""Triton kernels of the focal context (imported lazily: triton is optional)."""
from .focal_context_bwd import focal_context_bwd_triton
from .focal_context_fwd import focal_context_fwd_triton

__all__ = ["focal_context_fwd_triton", "focal_context_bwd_triton"]
