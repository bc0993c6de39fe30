"""pytest plugin: run tests/test_cuda_backend.py on CPU tensors against the emulated CUDA backend
(a _C module built by run_emulated_tests.sh from csrc/cuda with fc_emu.h). Not for CI."""
import os
import sys

import pytest

sys.path.insert(0, os.environ["FC_EMU_MODULE_DIR"])
import _C as _EMU  # noqa: E402  (the emulated extension)


class _Proxy:
    """Looks like focalnet_kernels._C to native.py; its 'cpu' entry points are the emulated CUDA ones."""
    BUILD_INFO = {"backends": ["cpu", "cuda"], "version": "emulated", "cuda_archs": "", "openmp": False}
    FocalContextArgs = _EMU.FocalContextArgs
    focal_context_workspace_bytes_cpu = staticmethod(_EMU.focal_context_workspace_bytes_cuda)
    focal_context_fwd_cpu = staticmethod(_EMU.focal_context_fwd_cuda)
    focal_context_bwd_cpu = staticmethod(_EMU.focal_context_bwd_cuda)
    focal_context_cpu_isa = staticmethod(_EMU.focal_context_cpu_isa)   # the emulated module's stub: "base"
    focal_context_fwd_plan_cuda = staticmethod(_EMU.focal_context_fwd_plan_cuda)
    focal_context_bwd_plan_cuda = staticmethod(_EMU.focal_context_bwd_plan_cuda)


def pytest_configure(config):
    from focalnet_kernels import native
    native._ext = lambda: _Proxy


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item.module.DEVICE = "cpu"
    item.module._skip_reason = lambda: None
