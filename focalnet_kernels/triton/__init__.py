"""Triton kernels of the focal context (imported lazily: triton is optional).

Autotuning picks a tile per shape in each process, and the tile fixes the order of the fp32
reductions (pooled, weight gradients), so two processes could differ in the last bits. Under
`torch.use_deterministic_algorithms(True)` every autotuned kernel runs its first config (safe for
every dtype and level mix), making results bit-identical across processes and machines of one kind.
"""
import contextlib
import functools
import os

import torch

from . import focal_context_bwd as _bwd
from . import focal_context_fwd as _fwd

_AUTOTUNED = (_fwd._fwd_local, _bwd._dwconv_kernel, _bwd._bwd_step_kernel)


def _autotune_off():
    # FOCALNET_TRITON_AUTOTUNE=0: every autotuned kernel runs its first config (a test tier that
    # checks results compiles ~3x fewer variants and benchmarks none)
    return os.environ.get("FOCALNET_TRITON_AUTOTUNE", "1") == "0"


@contextlib.contextmanager
def _pinned_configs():
    if not (torch.are_deterministic_algorithms_enabled() or _autotune_off()):
        yield
        return
    saved = [(k, k.configs) for k in _AUTOTUNED]
    try:
        for k, configs in saved:
            k.configs = list(configs[:1])
        yield
    finally:
        for k, configs in saved:
            k.configs = configs


def _deterministic_when_asked(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _pinned_configs():
            return fn(*args, **kwargs)
    return wrapper


focal_context_fwd_triton = _deterministic_when_asked(_fwd.focal_context_fwd_triton)
focal_context_bwd_triton = _deterministic_when_asked(_bwd.focal_context_bwd_triton)

__all__ = ["focal_context_fwd_triton", "focal_context_bwd_triton"]
