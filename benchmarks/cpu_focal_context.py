"""Native CPU focal_context backend vs the eager formulation, forward and forward+backward.

    python -m benchmarks.cpu_focal_context [--batch 8] [--reps 15] [--threads N] [--quick]

Shapes: FocalNet-T stage 1 (56x56x96) and stage 2 (28x28x192), fp32, L=3 (kernels 3,5,7: LRF) and
L=2 (3,5: SRF). Eager = the official op order (microsoft/FocalNet FocalModulation): on the
channels-last ctx / gates views of the f-projection output, permuted to channels-first, per level
F.conv2d (depthwise, 'same' zero padding, no bias) -> GELU -> gate multiply -> accumulate, then the
global term GELU(mean) * g_L. Forward+backward: eager autograd of that graph w.r.t. ctx, gates and
the kernels vs the native forward followed by the native backward (grad_ctx, grad_gates,
grad_weights). A and B are timed in interleaved repetitions; medians are reported (minima beside
them: on a shared machine the medians of both sides move with the load).

FOCALNET_CPU_ISA=avx2 runs the AVX2 kernels on an AVX-512 CPU; to time the eager side as an AVX2-only
CPU would run it too, also set ATEN_CPU_CAPABILITY=avx2 and ONEDNN_MAX_CPU_ISA=AVX2 (read when torch
loads).

Measured (issue 13 item 3: the AVX2 path behind the AVX-512 one), stage 1 56x56x96 L=3 fp32 batch 8,
native ms and x eager, medians of 3 interleaved runs of each build (before: the AVX2 path without
the register-blocked conv / fused epilogue / polynomial GELU, f8fd9e1; after: with them, e9a7950),
on a 2-core KVM Intel Xeon (family 6 model 207, AVX-512), torch 2.13 CPU, a loaded shared machine
(the eager side moves by up to 2x between runs: compare the native columns first):

    OMP_NUM_THREADS=1 FOCALNET_CPU_ISA=avx2 python -m benchmarks.cpu_focal_context --threads 1
      avx2    fwd  32.9 -> 15.4 ms (1.65x -> 2.84x)   fwd+bwd 101.3 -> 60.4 ms (2.09x -> 3.39x)
      avx512  fwd  11.3 -> 10.5 ms (4.98x -> 5.69x)   fwd+bwd  40.6 -> 46.5 ms (5.46x -> 5.96x)
    the same with ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 (eager as on an AVX2 CPU):
      avx2    fwd  27.0 -> 14.4 ms (2.63x -> 3.51x)   fwd+bwd 104.0 -> 57.5 ms (2.33x -> 3.81x)
    default threads (2 here, with another job on one of the cores: slower than one thread):
      avx2    fwd  48.0 -> 38.0 ms (3.67x -> 4.70x)   fwd+bwd 173.9 -> 111.8 ms (4.06x -> 5.93x)
      avx512  fwd  31.8 -> 31.8 ms (5.76x -> 5.53x)   fwd+bwd  87.8 -> 87.8 ms (7.45x -> 7.73x)

A C++ loop around focal_context_fwd_cpu / _bwd_cpu (process CPU time, one thread, same shape and
machine: the quieter measure, by which the avx512 changes above are the benchmark's run-to-run
noise): forward avx2 26.4 -> 14.5 ms, avx512 7.7 -> 7.7 ms; forward+backward avx2 96 -> 59.6 ms,
avx512 36.0 -> 34.3 ms. The AVX2 forward is now ~1.9x the AVX-512 one (half the vector width; its
polynomial GELU is ~40% of it, the AVX-512 tables ~10% of theirs).
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.nn.functional as F

from focalnet_kernels import native

from .common import ab_samples

SHAPES = [  # (name, H, W, C)
    ("stage1 56x56x96", 56, 56, 96),
    ("stage2 28x28x192", 28, 28, 192),
]
KERNELS = {"L=3 (3,5,7)": (3, 5, 7), "L=2 (3,5)": (3, 5)}


def eager_context(ctx_cl, gates_cl, kernels4d, normalize=False):
    """Official op order on channels-first views of the channels-last inputs."""
    L = len(kernels4d)
    C = ctx_cl.shape[-1]
    ctx = ctx_cl.permute(0, 3, 1, 2)
    gates = gates_cl.permute(0, 3, 1, 2)
    ctx_all = 0
    for l in range(L):
        k = kernels4d[l]
        ctx = F.gelu(F.conv2d(ctx, k, padding=k.shape[-1] // 2, groups=C))
        ctx_all = ctx_all + ctx * gates[:, l : l + 1]
    ctx_global = F.gelu(ctx.mean(2, keepdim=True).mean(3, keepdim=True))
    ctx_all = ctx_all + ctx_global * gates[:, L:]
    if normalize:
        ctx_all = ctx_all / (L + 1)
    return ctx_all


def bench_case(B, H, W, C, ks, reps, warmup=2):
    g = torch.Generator().manual_seed(0)
    L = len(ks)
    y = torch.randn(B, H, W, 2 * C + L + 1, generator=g)   # the f-projection output (channels-last)
    ctx, gates = y[..., C : 2 * C], y[..., 2 * C :]
    k4 = [torch.randn(C, 1, k, k, generator=g) * (1.5 / k) for k in ks]
    k3 = [k.reshape(C, k.shape[-1], k.shape[-1]).contiguous() for k in k4]
    grad_out = torch.randn(B, H, W, C, generator=g)

    # eager autograd leaves
    ye = y.clone().requires_grad_(True)
    k4e = [k.clone().requires_grad_(True) for k in k4]

    def eager_fwd():
        with torch.no_grad():
            eager_context(ctx, gates, k4)

    def eager_fwdbwd():
        out = eager_context(ye[..., C : 2 * C], ye[..., 2 * C :], k4e)
        torch.autograd.backward(out, grad_out.permute(0, 3, 1, 2))
        ye.grad = None
        for k in k4e:
            k.grad = None

    def native_fwd():
        native.focal_context_fwd_native(ctx, gates, k3, False)

    def native_fwdbwd():
        out, pooled = native.focal_context_fwd_native(ctx, gates, k3, False)
        native.focal_context_bwd_native(grad_out, ctx, gates, k3, pooled, False)

    res = {}
    for name, a_fn, b_fn in (("fwd", eager_fwd, native_fwd), ("fwd+bwd", eager_fwdbwd, native_fwdbwd)):
        ta, tb = ab_samples(a_fn, b_fn, reps, warmup)   # interleaved A/B (alternating which goes first)
        res[name] = (statistics.median(ta), statistics.median(tb), min(ta), min(tb))
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    p.add_argument("--quick", action="store_true", help="stage 1 L=3 only, 5 repetitions")
    args = p.parse_args(argv)
    if not native.available("cpu"):
        raise SystemExit("focalnet_kernels._C (CPU backend) is not built")
    if args.threads:
        torch.set_num_threads(args.threads)
    info = native.build_info()
    print(
        f"torch {torch.__version__}, torch threads {torch.get_num_threads()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"FOCALNET_CPU_ISA={os.environ.get('FOCALNET_CPU_ISA', 'auto')}, _C {info.get('version')}, "
        f"openmp={info.get('openmp')}, batch {args.batch}, fp32, medians of {args.reps if not args.quick else 5}"
    )
    print(f"{'shape':<18} {'levels':<12} {'pass':<8} {'eager ms':>9} {'native ms':>10} {'speedup':>8}"
          f"   (min: eager / native / ratio)")
    shapes = SHAPES[:1] if args.quick else SHAPES
    kernels = {"L=3 (3,5,7)": (3, 5, 7)} if args.quick else KERNELS
    for sname, H, W, C in shapes:
        for kname, ks in kernels.items():
            res = bench_case(args.batch, H, W, C, ks, 5 if args.quick else args.reps)
            for pname, (ta, tb, ma, mb) in res.items():
                print(f"{sname:<18} {kname:<12} {pname:<8} {ta * 1e3:9.2f} {tb * 1e3:10.2f} {ta / tb:7.2f}x"
                      f"   ({ma * 1e3:.2f} / {mb * 1e3:.2f} / {ma / mb:.2f}x)")


if __name__ == "__main__":
    main()
