"""First-call latency of `focalnet_kernels.focal_context`: what a fresh process pays once.

    python -m benchmarks.first_call [--runs 5] [--shape 2x56x56x96] [--ks 3,5,7] [--threads N]

Each run is a fresh Python subprocess (so nothing is cached in memory; the OS file cache is warm
after the first) that times, in this order:
  import torch                 `import torch`
  import focalnet_kernels      `import focalnet_kernels` after torch (the package's own cost)
  first forward                the first focal_context call (no grad), inputs made beforehand
  steady forward               the median of the next 5 calls
  first forward+backward       the first call with inputs that require grad, then .backward()
  steady forward+backward      the median of the next 3
The table gives the median, min and max over the runs, and the first-call overhead (first - steady).
The default shape is FocalNet-T stage 1 at batch 2 (2x56x56x96, L=3 with kernel sizes 3,5,7, fp32,
channels-last), on whatever backend `auto` picks (the native CPU kernel on a CPU machine).

Measured on a 2-core Intel Xeon (AVX-512; focalnet_kernels._C ISA avx512, torch ISA AVX512), torch
2.13.0+cpu, python 3.11, 2 threads, default shape, 5 runs each, medians; the two trees one right
after the other, twice, on a machine shared with other jobs (with 2 OpenMP threads on 2 busy cores
the steady forward itself ranged from 0.002 to 0.06 s):
                            import torch  import focalnet_kernels  first fwd  steady fwd  overhead
  busy   before (f8fd9e1)       2.32 s           0.028 s             2.23 s     0.036 s    2.19 s
         after                  2.25 s           0.032 s             0.094 s    0.036 s    0.085 s
  quiet  before (f8fd9e1)       1.60 s           0.017 s             1.52 s     0.024 s    1.49 s
         after                  1.25 s           0.018 s             0.006 s    0.002 s    0.004 s
The 1.5-2.2 s were torch.library.custom_op's implementation wrapper importing torch._dynamo (with
sympy, Inductor and triton) at the first call, plus ~0.1 s importing torch.onnx to ask whether an
ONNX export is running (ops.py says how both are avoided). The first forward+backward after the
first forward costs 0.005 s more than later ones, before and after. `import focalnet_kernels` is
~0.02-0.03 s on top of `import torch`, which is where the import time goes.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Dict, List, Sequence

CHILD = r"""
import json, sys, time
B, H, W, C = (int(v) for v in sys.argv[1].split("x"))
ks = [int(v) for v in sys.argv[2].split(",")]
threads = int(sys.argv[3])
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import focalnet_kernels as fk
t2 = time.perf_counter()
if threads:
    torch.set_num_threads(threads)
g = torch.Generator().manual_seed(0)
L = len(ks)
y = torch.randn(B, H, W, 2 * C + L + 1, generator=g)
ctx, gates = y[..., C : 2 * C], y[..., 2 * C :]
kernels = [torch.randn(C, 1, k, k, generator=g) * (1.0 / k) for k in ks]


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def fwd():
    fk.focal_context(ctx, gates, kernels)


yg = y.detach().clone().requires_grad_(True)
kg = [k.detach().clone().requires_grad_(True) for k in kernels]


def fwd_bwd():
    fk.focal_context(yg[..., C : 2 * C], yg[..., 2 * C :], kg).sum().backward()


res = {"import_torch": t1 - t0, "import_fk": t2 - t1}
res["first_fwd"] = timed(fwd)
res["steady_fwd"] = sorted(timed(fwd) for _ in range(5))[2]
res["first_fwd_bwd"] = timed(fwd_bwd)
res["steady_fwd_bwd"] = sorted(timed(fwd_bwd) for _ in range(3))[1]
isa = fk._C.focal_context_cpu_isa() if getattr(fk, "_C", None) is not None else "no extension"
res["env"] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "kernel_isa": isa,
              "torch_isa": torch.backends.cpu.get_cpu_capability(),
              "backend": fk.select_backend(ctx, ks)}
print("FIRST_CALL_JSON " + json.dumps(res))
"""

ROWS = [  # (key, label)
    ("import_torch", "import torch"),
    ("import_fk", "import focalnet_kernels"),
    ("first_fwd", "first forward"),
    ("steady_fwd", "steady forward"),
    ("overhead_fwd", "  first-call overhead"),
    ("first_fwd_bwd", "first forward+backward"),
    ("steady_fwd_bwd", "steady forward+backward"),
    ("overhead_fwd_bwd", "  first-call overhead"),
]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine() or "cpu"


def one_run(shape: str, ks: str, threads: int) -> Dict:
    """One fresh interpreter: the timings of CHILD as a dict."""
    # run in the folder holding the imported package: a `-c` child puts its working directory first on
    # sys.path, and started in a repository root it would import the source tree instead of the install
    import focalnet_kernels
    root = os.path.dirname(os.path.dirname(os.path.abspath(focalnet_kernels.__file__)))
    proc = subprocess.run([sys.executable, "-c", CHILD, shape, ks, str(threads)],
                          capture_output=True, text=True, env=dict(os.environ), cwd=root)
    for line in proc.stdout.splitlines():
        if line.startswith("FIRST_CALL_JSON "):
            res = json.loads(line.split(" ", 1)[1])
            res["overhead_fwd"] = res["first_fwd"] - res["steady_fwd"]
            res["overhead_fwd_bwd"] = res["first_fwd_bwd"] - res["steady_fwd_bwd"]
            return res
    raise RuntimeError(f"the benchmark subprocess failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def table(runs: Sequence[Dict]) -> List[str]:
    lines = [f"{'step':<28} {'median s':>9} {'min s':>8} {'max s':>8}"]
    for key, label in ROWS:
        xs = [r[key] for r in runs]
        lines.append(f"{label:<28} {statistics.median(xs):9.3f} {min(xs):8.3f} {max(xs):8.3f}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="fresh processes (default 5)")
    p.add_argument("--shape", default="2x56x56x96", help="BxHxWxC (default 2x56x56x96)")
    p.add_argument("--ks", default="3,5,7", help="kernel sizes, one per level (default 3,5,7)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    args = p.parse_args(argv)
    runs = [one_run(args.shape, args.ks, args.threads) for _ in range(args.runs)]
    env = runs[0]["env"]
    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores; focalnet_kernels._C ISA {env['kernel_isa']}, "
          f"torch ISA {env['torch_isa']}); torch {env['torch']}, {env['threads']} threads, "
          f"python {sys.version.split()[0]}")
    print(f"focal_context {args.shape} fp32, kernels {args.ks}, backend {env['backend']}; "
          f"{args.runs} fresh processes")
    for line in table(runs):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
