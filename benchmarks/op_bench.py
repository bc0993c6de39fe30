"""The focal_context op benchmark: every backend, every stage shape, time and fraction of the HBM floor."""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import (DTYPE_NAMES, L2Flusher, bench_calls, env_var, free_memory, is_oom, median, short_exc,
                     sync, wall)

#: kernel sizes per focal level count (focal_window 3, focal_factor 2): SRF L=2, LRF L=3.
LEVEL_KERNELS = {1: [3], 2: [3, 5], 3: [3, 5, 7], 4: [3, 5, 7, 9]}

#: every backend the op section knows, in table order.
OP_BACKENDS = ("eager", "reference", "reference_compiled", "triton", "cuda", "cuda_fma", "cpu")
# cuda_fma: the CUDA backend with its tensor-core forward off (FOCALNET_CUDA_MMA=0), so that a GPU run
# times both CUDA forwards (fp16/bf16; for fp32 it is the same kernel as cuda and is skipped)

BACKEND_NOTES = {
    "eager": "the model's eager formulation in the input dtype (channels-first F.conv2d + GELU + gate per "
             "level, as focalnet.model.FocalModulation._context_eager): the baseline the notes count ~30 passes for",
    "reference": "focal_context with FOCALNET_KERNELS_BACKEND=reference (eager torch, fp32 internally, "
                 "explicit backward formulas)",
    "reference_compiled": "torch.compile(focalnet_kernels.reference.focal_context_ref, dynamic=False): "
                          "compiled for each (shape, L, direction); compile time is first_call_s",
    "triton": "focal_context with FOCALNET_KERNELS_BACKEND=triton",
    "cuda": "focal_context with FOCALNET_KERNELS_BACKEND=cuda (native extension)",
    "cpu": "focal_context with FOCALNET_KERNELS_BACKEND=cpu (native extension, OpenMP)",
}

FLOOR_FORMULAS = {
    "fwd": "B*H*W*(C + (L+1) + C)*e bytes: read ctx and the gates once, write ctx_all once "
           "(e = bytes per element, 2 for bf16/fp16; kernel weights and the pooled vector are O(C*k^2 + B*C), "
           "neglected)",
    "fwd+bwd": "B*H*W*(5*C + 3*(L+1))*e bytes: the forward's 2*C + (L+1) plus the backward's minimal "
               "traffic, read grad_out, ctx and the gates (2*C + (L+1)), write grad_ctx and grad_gates "
               "(C + (L+1)); level outputs are recomputed, never stored; weight gradients and pooled "
               "vectors neglected",
    "time": "floor_ms = floor_bytes / measured device-to-device copy bandwidth of the same run; "
            "frac_floor = floor_ms / median_ms (1.0 = at the HBM floor)",
}


def floor_bytes(B: int, H: int, W: int, C: int, L: int, esize: int, direction: str) -> int:
    tokens = B * H * W
    fwd = tokens * (C + (L + 1) + C) * esize
    if direction == "fwd":
        return fwd
    return fwd + tokens * (3 * C + 2 * (L + 1)) * esize


def focal_context_eager(ctx: Tensor, gates: Tensor, kernels: Sequence[Tensor], normalize: bool = False) -> Tensor:
    """The official eager formulation in the input dtype (channels-first), returned as B×H×W×C."""
    x = ctx.permute(0, 3, 1, 2).contiguous()
    g = gates.permute(0, 3, 1, 2).contiguous()
    L = len(kernels)
    out = 0
    for l, w in enumerate(kernels):
        k = w.shape[-1]
        x = F.gelu(F.conv2d(x, w.to(x.dtype), padding=k // 2, groups=w.shape[0]))
        out = out + x * g[:, l:l + 1]
    out = out + F.gelu(x.mean((2, 3), keepdim=True)) * g[:, L:]
    if normalize:
        out = out / (L + 1)
    return out.permute(0, 2, 3, 1)


class OpInputs:
    """ctx and gates as views into one f-projection output B×H×W×(2C+L+1), as the model passes them."""

    def __init__(self, B, H, W, C, L, dtype, device, requires_grad: bool, seed: int):
        device = torch.device(device)
        g = torch.Generator(device=device).manual_seed(seed)  # generated on the device: fast for big shapes
        y = torch.randn(B, H, W, 2 * C + L + 1, generator=g, device=device, dtype=torch.float32).to(dtype)
        self.y = y.requires_grad_(requires_grad)
        self.ctx = self.y[..., C:2 * C]
        self.gates = self.y[..., 2 * C:]
        self.kernels = [(torch.randn(C, 1, k, k, generator=g, device=device) / k).requires_grad_(requires_grad)
                        for k in LEVEL_KERNELS[L]]
        self.grad = torch.randn(B, H, W, C, generator=g, device=device, dtype=torch.float32).to(dtype) \
            if requires_grad else None

    def nbytes(self) -> int:
        n = self.y.numel() * self.y.element_size()
        return n + (self.grad.numel() * self.grad.element_size() if self.grad is not None else 0)

    def zero_grads(self) -> None:
        self.y.grad = None
        for k in self.kernels:
            k.grad = None


def make_input_sets(B, H, W, C, L, dtype, device, *, bwd: bool, l2: int, seed: int = 0) -> List[OpInputs]:
    """One input set, plus more (up to 8) while together they do not exceed twice the L2 size (GPU)."""
    sets = [OpInputs(B, H, W, C, L, dtype, device, requires_grad=bwd, seed=seed)]
    if torch.device(device).type == "cuda":
        n = min(8, max(1, math.ceil(2 * l2 / max(1, sets[0].nbytes()))))
        sets += [OpInputs(B, H, W, C, L, dtype, device, requires_grad=bwd, seed=seed + i) for i in range(1, n)]
    return sets


def _backend_env(backend: str) -> Dict[str, str]:
    """The environment a backend runs under (FOCALNET_KERNELS_BACKEND, FOCALNET_CUDA_MMA)."""
    if backend in ("eager", "reference_compiled"):
        return {}
    if backend == "cuda_fma":
        return {"FOCALNET_KERNELS_BACKEND": "cuda", "FOCALNET_CUDA_MMA": "0"}
    return {"FOCALNET_KERNELS_BACKEND": backend}


def _backend_call(backend: str, compiled: Dict) -> Tuple[Callable, Dict[str, str]]:
    """(fn(ctx, gates, kernels) -> out, the environment to set while it runs)."""
    import focalnet_kernels
    if backend == "eager":
        return focal_context_eager, {}
    if backend == "reference_compiled":
        return compiled["fn"], {}
    return (lambda c, g, k: focalnet_kernels.focal_context(c, g, k)), _backend_env(backend)


@contextlib.contextmanager
def _env(values: Dict[str, str]):
    with contextlib.ExitStack() as stack:
        for k, v in values.items():
            stack.enter_context(env_var(k, v))
        yield


def backend_skip_reason(backend: str, device: torch.device, dtype: torch.dtype, L: int,
                        compile_backend: str) -> Optional[str]:
    """None when the backend can run here (a trial call on a small input), else why it cannot."""
    if backend in ("cuda", "cuda_fma") and device.type != "cuda":
        return "the cuda backend needs CUDA tensors (this run uses CPU tensors)"
    if backend == "cuda_fma" and dtype == torch.float32:
        return "fp32 has no tensor-core forward: cuda_fma is the cuda backend's kernel"
    if backend == "cpu" and device.type != "cpu":
        return "the cpu backend runs on CPU tensors; the GPU suite times device tensors"
    if backend == "triton" and device.type != "cuda":
        return "Triton on CPU tensors runs in its interpreter (TRITON_INTERPRET=1): a correctness tool, not timed"
    if backend in ("eager", "reference_compiled"):
        return None
    try:
        import focalnet_kernels
        inp = OpInputs(1, 5, 5, 4, L, dtype, device, requires_grad=False, seed=0)
        with _env(_backend_env(backend)):
            focalnet_kernels.focal_context(inp.ctx, inp.gates, inp.kernels)
        sync(device)
    except Exception as e:
        return short_exc(e)
    return None


def run_op_entry(*, size: str, stage: int, shape: Tuple[int, int, int, int], L: int, dtype: torch.dtype,
                 direction: str, backend: str, device: torch.device, rep_ms: float, max_calls: int,
                 min_calls: int, bandwidth_Bps: Optional[float], compiled: Dict, flush: Optional[L2Flusher],
                 sets: List[OpInputs]) -> Dict:
    """Time one (shape, L, dtype, direction, backend) cell; `sets` are the rotated input sets."""
    B, H, W, C = shape
    esize = torch.tensor([], dtype=dtype).element_size()
    fb = floor_bytes(B, H, W, C, L, esize, direction)
    entry: Dict = dict(size=size, stage=stage, shape=[B, H, W, C], L=L, kernels=LEVEL_KERNELS[L],
                       dtype=DTYPE_NAMES[dtype], direction=direction, backend=backend, floor_bytes=fb,
                       floor_ms=(fb / bandwidth_Bps * 1e3) if bandwidth_Bps else None)
    bwd = direction == "fwd+bwd"
    try:
        fn, env_value = _backend_call(backend, compiled)
        one = sets[0]
        entry["input_sets"] = len(sets)
        idx = [0]

        def call():
            s = sets[idx[0] % len(sets)]
            idx[0] += 1
            if bwd:
                s.zero_grads()
                out = fn(s.ctx, s.gates, s.kernels)
                out.backward(s.grad)
            else:
                with torch.no_grad():
                    fn(s.ctx, s.gates, s.kernels)

        with _env(env_value):
            first = wall(call, device)  # includes JIT / compile of this configuration
            for _ in range(2):
                call()
            probe = bench_calls(call, device, n=3, flush=flush)
            t = max(1e-3, median(probe))
            n = int(max(min_calls, min(max_calls, rep_ms / t)))
            samples = bench_calls(call, device, n=n, flush=flush)
            if not bwd:  # accuracy beside speed: the output against the fp32 reference
                from focalnet_kernels.reference import focal_context_ref
                with torch.no_grad():
                    out = fn(one.ctx, one.gates, one.kernels).float()
                    ref = focal_context_ref(one.ctx.float(), one.gates.float(), [k.float() for k in one.kernels])
                    entry["rel_err_vs_fp32_ref"] = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
                    del out, ref
        for s in sets:
            s.zero_grads()
        med = median(samples)
        entry.update(status="ok", first_call_s=first, samples_ms=samples, median_ms=med,
                     effective_GBps=fb / (med / 1e3) / 1e9 if med else None,
                     frac_floor=(entry["floor_ms"] / med) if entry["floor_ms"] and med else None)
    except Exception as e:
        entry.update(status="error" if not is_oom(e) else "oom", reason=short_exc(e))
        if sets:
            for s in sets:
                s.zero_grads()
        free_memory(device)
    return entry


def compiled_reference(L: int, direction: str, compile_backend: str, cache: Dict) -> Dict:
    key = (L, direction)
    if key not in cache:
        from focalnet_kernels.reference import focal_context_ref
        cache[key] = {"fn": torch.compile(focal_context_ref, dynamic=False, backend=compile_backend)}
    return cache[key]


def measure_bandwidth(device: torch.device, nbytes: int, reps: int) -> Dict:
    """Device-to-device copy bandwidth: (read + write) bytes / time of dst.copy_(src)."""
    bufs = [torch.empty(nbytes, dtype=torch.uint8, device=device)]
    bufs[0].random_(0, 255)
    bufs.append(torch.empty_like(bufs[0]))

    def fn():
        bufs[1].copy_(bufs[0])
    for _ in range(3):
        fn()
    sync(device)
    samples = bench_calls(fn, device, n=reps)
    med = median(samples)
    bufs.clear()
    free_memory(device)
    return {"method": "dst.copy_(src) of two %d MiB buffers, bytes = 2 x size (read + write), "
                      "%s" % (nbytes >> 20, "CUDA events per copy" if device.type == "cuda" else "wall clock"),
            "bytes": 2 * nbytes, "samples_ms": samples, "median_ms": med,
            "GBps": 2 * nbytes / (med / 1e3) / 1e9 if med else None}
