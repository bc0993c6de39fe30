"""Bookkeeping shared by the library's two dispatchers, `focal_context` (ops.py) and `linear`
(linear.py): the backend environment variables, read at each call; the per-backend call counters
(`focalnet_kernels.backend_calls`, which tests and benchmarks read to prove a fast path ran); and
warn-once for fallbacks.
"""
from __future__ import annotations

import collections
import os
import warnings
from typing import Hashable, Sequence

import torch

#: How many times each backend ran, keyed "<backend>:<direction>" ("cpu:fwd", "linear:onednn", ...).
backend_calls: "collections.Counter[str]" = collections.Counter()

_warned: set = set()


def forced_backend(var: str, choices: Sequence[str]) -> str:
    """The backend environment variable `var`, read now: one of `choices` ("auto" when unset or empty)."""
    forced = os.environ.get(var, "auto").strip().lower() or "auto"
    if forced not in choices:
        raise ValueError(f"{var}={forced!r} is not one of {', '.join(choices)}")
    return forced


def count_call(key: str) -> None:
    """backend_calls[key] += 1, except while dynamo traces: a global it sees mutated becomes a guard
    on its value, and every call would recompile (measured on an H100: the compiled fused model ran
    91 img/s instead of ~8,900)."""
    if not torch.compiler.is_compiling():
        backend_calls[key] += 1


def warn_once(key: Hashable, msg: str, stacklevel: int = 4) -> None:
    """A RuntimeWarning the first time `key` is seen in this process, nothing after."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=stacklevel)
