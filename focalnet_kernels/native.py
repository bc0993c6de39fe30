"""The native focal-context backends (C++/OpenMP CPU and CUDA in ``focalnet_kernels._C``) behind the
backend contract (docs/backend-contract.md) on torch tensors.

The extension does not link libtorch: these wrappers allocate every output and the workspace with
torch and hand raw pointers, sizes and element strides to ``_C`` through ``FocalContextArgs``.

    fwd(ctx, gates, weights, normalize) -> (out, pooled)
    bwd(grad_out, ctx, gates, weights, pooled, normalize) -> (grad_ctx, grad_gates, grad_weights)
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from .dispatch import forced_backend, warn_once

__all__ = ["available", "build_info", "cpu_isa", "focal_context_fwd_native", "focal_context_bwd_native"]

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_MAX_LEVELS = 4
#: FOCALNET_CPU_ISA values (case and surrounding whitespace ignored; unset or empty = auto).
CPU_ISAS = ("auto", "avx512", "avx2", "base")

def _ext():
    """The compiled extension, or None: the package imports it once (and warns why when it cannot)."""
    from . import _C
    return _C


def build_info() -> dict:
    """``_C.BUILD_INFO`` (version, backends, cuda_archs, openmp), or {} without the extension."""
    mod = _ext()
    return dict(mod.BUILD_INFO) if mod is not None else {}


def available(device_type) -> bool:
    """True when the extension imports and its backend for ``device_type`` ('cpu' / 'cuda') is built."""
    if isinstance(device_type, torch.device):
        device_type = device_type.type
    mod = _ext()
    if mod is None:
        return False
    try:
        return str(device_type) in list(mod.BUILD_INFO["backends"])
    except Exception:
        return False


def _require_ext(device_type: str):
    mod = _ext()
    if mod is None:
        raise RuntimeError("focalnet_kernels._C is not built (reinstall without FOCALNET_SKIP_EXT=1)")
    if not available(device_type):
        raise RuntimeError(
            f"focalnet_kernels._C was built without the {device_type} backend "
            f"(BUILD_INFO={dict(mod.BUILD_INFO)})"
        )
    return mod


def _cpu_isa_env() -> str:
    """FOCALNET_CPU_ISA, read now, normalised (ValueError naming the variable, the value and the
    choices for anything but auto / empty / unset, avx512, avx2, base, in any case, with any
    surrounding whitespace). The C++ side parses it the same way, and throws for a bad value too."""
    return forced_backend("FOCALNET_CPU_ISA", CPU_ISAS)


def _cpu_isa_ran(mod, want: str) -> str:
    got = str(mod.focal_context_cpu_isa())
    if want != "auto" and got != want:   # capped to the best the CPU has
        warn_once(("FOCALNET_CPU_ISA", want, got),
                  f"FOCALNET_CPU_ISA={want}: this CPU does not support it, the CPU kernels run {got}")
    return got


def cpu_isa() -> str:
    """The instruction-set path the CPU kernels run with now: "avx512", "avx2" or "base".

    FOCALNET_CPU_ISA (read at each call) picks it: `auto` (or unset / empty) the best the CPU has;
    `avx512`, `avx2` or `base` that path, capped to the best the CPU has (with a RuntimeWarning once
    per process and value); any other value raises ValueError."""
    want = _cpu_isa_env()
    return _cpu_isa_ran(_require_ext("cpu"), want)


def _check(ctx: torch.Tensor, gates: torch.Tensor, weights: Sequence[torch.Tensor]) -> Tuple[int, ...]:
    if ctx.dim() != 4:
        raise ValueError(f"ctx must be B x H x W x C, got shape {tuple(ctx.shape)}")
    B, H, W, C = ctx.shape
    L = len(weights)
    if not 1 <= L <= _MAX_LEVELS:
        raise ValueError(f"the native backends support 1..{_MAX_LEVELS} focal levels, got {L}")
    if ctx.dtype not in _DTYPE_CODE:
        raise TypeError(f"ctx dtype must be float32, float16 or bfloat16, got {ctx.dtype}")
    if gates.dtype != ctx.dtype or gates.device != ctx.device:
        raise TypeError("gates must have the dtype and device of ctx")
    if tuple(gates.shape) != (B, H, W, L + 1):
        raise ValueError(f"gates must be {(B, H, W, L + 1)}, got {tuple(gates.shape)}")
    for l, w in enumerate(weights):
        k = w.shape[-1]
        if w.dim() != 3 or tuple(w.shape) != (C, k, k) or k % 2 == 0 or not 1 <= k <= 15:
            raise ValueError(f"weights[{l}] must be [C, k, k] with odd k in 1..15, got {tuple(w.shape)}")
        if w.device != ctx.device:
            raise TypeError(f"weights[{l}] is on {w.device}, ctx on {ctx.device}")
    return B, H, W, C, L


def _weights_f32(weights: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    # The contract promises float32 contiguous weights; converting (a no-op then) keeps this safe.
    return [w.detach().to(torch.float32).contiguous() for w in weights]


def _base_args(mod, ctx, gates, weights, normalize):
    B, H, W, C = ctx.shape
    L = len(weights)
    a = mod.FocalContextArgs()
    a.B, a.H, a.W, a.C = int(B), int(H), int(W), int(C)
    a.L = L
    a.ksize = [int(w.shape[-1]) for w in weights] + [0] * (_MAX_LEVELS - L)
    a.dtype = _DTYPE_CODE[ctx.dtype]
    a.normalize = bool(normalize)
    a.deterministic = True
    a.ctx = ctx.data_ptr()
    a.ctx_stride = [int(s) for s in ctx.stride()]
    a.gates = gates.data_ptr()
    a.gates_stride = [int(s) for s in gates.stride()]
    a.weight = [w.data_ptr() for w in weights] + [0] * (_MAX_LEVELS - L)
    if ctx.device.type == "cuda":
        a.stream = torch.cuda.current_stream(ctx.device).cuda_stream
    return a


def _workspace(mod, a, device_type: str, backward: bool, device) -> torch.Tensor:
    nbytes = int(getattr(mod, f"focal_context_workspace_bytes_{device_type}")(a, backward))
    ws = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
    a.workspace = ws.data_ptr() if nbytes > 0 else 0
    a.workspace_bytes = nbytes
    return ws


class _DeviceGuard:
    def __init__(self, device: torch.device):
        self._cm = torch.cuda.device(device) if device.type == "cuda" else None

    def __enter__(self):
        if self._cm is not None:
            self._cm.__enter__()

    def __exit__(self, *exc):
        if self._cm is not None:
            return self._cm.__exit__(*exc)
        return False


def cuda_fwd_plan(ctx: torch.Tensor, gates: torch.Tensor, weights: Sequence[torch.Tensor], normalize: bool) -> str:
    """The CUDA forward's main kernel for these inputs: "mma THxTW" (the tensor-core forward, fp16/bf16
    SRF/LRF; FOCALNET_CUDA_MMA=0 turns it off) or "fma" (fc_fused_kernel). Tests use it to know which ran."""
    return _cuda_plan("fwd", ctx, gates, weights, normalize)


def cuda_bwd_plan(ctx: torch.Tensor, gates: torch.Tensor, weights: Sequence[torch.Tensor], normalize: bool) -> str:
    """The CUDA backward's plan for these inputs: recompute tiles and, per level, kernel size, tile and
    slots (what focalnet_kernels.cost_model.cuda_plan_bwd mirrors)."""
    return _cuda_plan("bwd", ctx, gates, weights, normalize)


def _cuda_plan(direction: str, ctx, gates, weights, normalize) -> str:
    _check(ctx, gates, weights)
    mod = _require_ext("cuda")
    planner = getattr(mod, f"focal_context_{direction}_plan_cuda")
    return str(planner(_base_args(mod, ctx, gates, _weights_f32(weights), normalize)))


def focal_context_fwd_native(
    ctx: torch.Tensor, gates: torch.Tensor, weights: Sequence[torch.Tensor], normalize: bool,
    global_term: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """out = s (sum_l g_l x_{l+1} + g_L GELU(pooled)) as a new contiguous B x H x W x C tensor of
    ctx's dtype, and pooled = mean_{H,W} x_L as float32 [B, C] (saved for backward).
    global_term=False (CUDA only; the CPU kernel raises ValueError): out without g_L GELU(pooled)."""
    B, H, W, C, L = _check(ctx, gates, weights)
    dev = ctx.device
    isa = _cpu_isa_env() if dev.type == "cpu" else None
    out = torch.empty((B, H, W, C), dtype=ctx.dtype, device=dev)
    pooled = torch.empty((B, C), dtype=torch.float32, device=dev)
    if out.numel() == 0:
        return out.zero_(), pooled.zero_()
    mod = _require_ext(dev.type)
    if isa is not None:
        _cpu_isa_ran(mod, isa)
    w32 = _weights_f32(weights)
    with _DeviceGuard(dev):
        a = _base_args(mod, ctx, gates, w32, normalize)
        a.out = out.data_ptr()
        a.pooled = pooled.data_ptr()
        a.global_term = bool(global_term)
        ws = _workspace(mod, a, dev.type, False, dev)
        getattr(mod, f"focal_context_fwd_{dev.type}")(a)
    del ws
    return out, pooled


def focal_context_bwd_native(
    grad_out: torch.Tensor,
    ctx: torch.Tensor,
    gates: torch.Tensor,
    weights: Sequence[torch.Tensor],
    pooled: torch.Tensor,
    normalize: bool,
) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
    """(grad_ctx, grad_gates, grad_weights): contiguous B x H x W x C and B x H x W x (L+1) in ctx's
    dtype, and L float32 contiguous [C, k, k]. Level outputs are recomputed from ctx."""
    B, H, W, C, L = _check(ctx, gates, weights)
    if tuple(grad_out.shape) != (B, H, W, C) or grad_out.dtype != ctx.dtype or grad_out.device != ctx.device:
        raise ValueError("grad_out must match ctx in shape, dtype and device")
    dev = ctx.device
    isa = _cpu_isa_env() if dev.type == "cpu" else None
    grad_ctx = torch.empty((B, H, W, C), dtype=ctx.dtype, device=dev)
    grad_gates = torch.empty((B, H, W, L + 1), dtype=ctx.dtype, device=dev)
    grad_weights = [torch.empty(tuple(w.shape), dtype=torch.float32, device=dev) for w in weights]
    if grad_ctx.numel() == 0:
        return grad_ctx.zero_(), grad_gates.zero_(), [g.zero_() for g in grad_weights]
    mod = _require_ext(dev.type)
    if isa is not None:
        _cpu_isa_ran(mod, isa)
    w32 = _weights_f32(weights)
    pooled32 = pooled.detach().to(device=dev, dtype=torch.float32).contiguous()
    if tuple(pooled32.shape) != (B, C):
        raise ValueError(f"pooled must be [B, C] = {(B, C)}, got {tuple(pooled.shape)}")
    with _DeviceGuard(dev):
        a = _base_args(mod, ctx, gates, w32, normalize)
        a.pooled = pooled32.data_ptr()
        a.grad_out = grad_out.data_ptr()
        a.grad_out_stride = [int(s) for s in grad_out.stride()]
        a.grad_ctx = grad_ctx.data_ptr()
        a.grad_gates = grad_gates.data_ptr()
        a.grad_weight = [g.data_ptr() for g in grad_weights] + [0] * (_MAX_LEVELS - L)
        ws = _workspace(mod, a, dev.type, True, dev)
        getattr(mod, f"focal_context_bwd_{dev.type}")(a)
    del ws
    return grad_ctx, grad_gates, grad_weights
