"""focalnet_kernels.linear vs F.linear (+ F.gelu) on the projections of a FocalNet-T forward.

    python -m benchmarks.linear_bench [--batch 4] [--reps 15] [--threads N] [--levels 3]

Shapes: every linear of a FocalNet-T block at 224x224 input (stage resolutions 56, 28, 14, 7; widths
96..768): f (C -> 2C + L + 1), h (C -> C), proj (C -> C), fc1 (C -> 4C, with GELU), fc2 (4C -> C).
Both sides run on the same fp32 tensors, interleaved A/B (alternating which goes first), medians
reported: the forward under torch.no_grad, then forward+backward (grad of x, w and b) with autograd;
"model total" weights each stage by its depth (2, 2, 6, 2). On CPUs where FOCALNET_LINEAR_BACKEND=auto
picks oneDNN this measures oneDNN against torch's default GEMM (MKL).
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import focalnet_kernels
from focalnet_kernels import linear, select_linear_backend

from .common import ab_samples

STAGES = [(56, 96), (28, 192), (14, 384), (7, 768)]
DEPTHS = [2, 2, 6, 2]


def _ab(fa, fb, reps):
    ta, tb = ab_samples(fa, fb, reps)
    return statistics.median(ta), statistics.median(tb)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--levels", type=int, default=3, help="focal levels L (f has 2C + L + 1 outputs)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, fp32, "
          f"medians of {args.reps}, focalnet_kernels {focalnet_kernels.__version__}")
    print(f"{'stage':>10} {'layer':>9} {'M x K -> N':>22} {'F.linear ms':>12} {'linear ms':>10} {'speedup':>8}"
          f"  {'fwd+bwd: F.linear':>17} {'linear':>8} {'speedup':>8}  backend")
    tot_a = tot_b = tot_ta = tot_tb = 0.0
    for (hw, C), depth in zip(STAGES, DEPTHS):
        M = args.batch * hw * hw
        layers = [("f", C, 2 * C + args.levels + 1, None), ("h", C, C, None), ("proj", C, C, None),
                  ("fc1", C, 4 * C, "gelu"), ("fc2", 4 * C, C, None)]
        for name, k, n, act in layers:
            x = torch.randn(args.batch, hw, hw, k, generator=g)
            w = torch.randn(n, k, generator=g) / k ** 0.5
            b = torch.randn(n, generator=g)

            def base(x=x, w=w, b=b, act=act):
                y = F.linear(x, w, b)
                return F.gelu(y) if act else y

            def ours(x=x, w=w, b=b, act=act):
                return linear(x, w, b, activation=act)

            with torch.no_grad():
                ta, tb = _ab(base, ours, args.reps)
                backend = select_linear_backend(x, w, b)
            xg, wg, bg = (t.clone().requires_grad_(True) for t in (x, w, b))
            dy = torch.randn(args.batch, hw, hw, n, generator=g)

            def base_t(xg=xg, wg=wg, bg=bg, dy=dy, base=base):
                base(xg, wg, bg).backward(dy)

            def ours_t(xg=xg, wg=wg, bg=bg, dy=dy, ours=ours):
                ours(xg, wg, bg).backward(dy)

            tta, ttb = _ab(base_t, ours_t, max(3, args.reps // 3))
            tot_a += depth * ta
            tot_b += depth * tb
            tot_ta += depth * tta
            tot_tb += depth * ttb
            label = name + ("+gelu" if act else "")
            print(f"{hw:>4}x{hw:<2}x{C:<3} {label:>9} {f'{M} x {k} -> {n}':>22} {ta * 1e3:12.3f} {tb * 1e3:10.3f} "
                  f"{ta / tb:7.2f}x  {tta * 1e3:17.3f} {ttb * 1e3:8.3f} {tta / ttb:7.2f}x  {backend}")
    print(f"model total (depth-weighted): forward F.linear {tot_a * 1e3:.1f} ms, linear {tot_b * 1e3:.1f} ms, "
          f"{tot_a / tot_b:.2f}x; forward+backward {tot_ta * 1e3:.1f} ms vs {tot_tb * 1e3:.1f} ms, {tot_ta / tot_tb:.2f}x")


if __name__ == "__main__":
    main()
