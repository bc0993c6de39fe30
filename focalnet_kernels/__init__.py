"""focalnet_kernels: fused kernels for the focal-context stage of Focal Modulation Networks.

The library knows nothing of the model: functional entry points `focal_context` (the focal-context
stage) and `linear` (a linear layer with an optional GELU epilogue), each with its `*_ref` beside it;
and, built from them, training-memory-lean compositions that recompute cheap intermediates in the
backward (`mlp_gelu`, `modulation_tail`, `focal_modulation`: focalnet_kernels/recompute.py). On CUDA
tensors the modulation tail `q * h(ctx_all)` runs as one Triton GEMM with the gating epilogue, and in
inference with the focal context's global term folded into it (focalnet_kernels/modulation.py).
"""
from __future__ import annotations

import warnings

__version__ = "0.1.0"

try:  # the native extension is optional: the reference and Triton paths work without it
    from . import _C  # type: ignore[attr-defined]
except ImportError as _e:  # pragma: no cover - depends on the install
    _C = None
    import os as _os
    _hint = ""
    if _os.path.exists(_os.path.join(_os.path.dirname(_os.path.dirname(__file__)), "setup.py")):
        _hint = (" (this is the source tree, not the installed package: run from another directory, "
                 "or install with `pip install -e .` to build the extension in place)")
    warnings.warn(f"focalnet_kernels: the native extension focalnet_kernels._C is not available ({_e}){_hint}; "
                  "using the reference/Triton paths only", RuntimeWarning, stacklevel=2)

from .ops import BACKENDS, backend_calls, focal_context, select_backend  # noqa: E402
from .reference import focal_context_ref  # noqa: E402
from .linear import LINEAR_BACKENDS, linear, linear_ref, select_linear_backend  # noqa: E402
from .recompute import focal_modulation, mlp_gelu, modulation_tail  # noqa: E402
from .fuse import fuse, is_fused, unfuse  # noqa: E402


def build_info() -> dict:
    """Version, compiled native backends and CUDA archs of the installed extension."""
    info = {"version": __version__, "extension": _C is not None, "backends": [], "cuda_archs": []}
    if _C is not None:
        b = dict(_C.BUILD_INFO)
        info.update(extension_version=b["version"], backends=list(b["backends"]),
                    cuda_archs=[a for a in str(b["cuda_archs"]).split(",") if a], openmp=bool(b["openmp"]))
    from .ops import triton_available
    info["triton"] = triton_available()
    return info


__all__ = ["focal_context", "linear", "linear_ref", "focal_modulation", "mlp_gelu", "modulation_tail", "select_linear_backend", "LINEAR_BACKENDS", "fuse", "unfuse", "is_fused", "focal_context_ref", "build_info", "select_backend", "backend_calls", "BACKENDS"]
