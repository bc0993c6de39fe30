"""Hardware counters of the focal_context kernels, read by Nsight Compute (the GPU suite's tier 2).

    ncu --profile-from-start off --csv --page raw --metrics "$(python -m benchmarks.gpu_profile --metrics)" \\
        python -m benchmarks.gpu_profile --run > ncu.csv
    python -m benchmarks.gpu_profile --parse ncu.csv

`--run` builds FocalNet-T stage-1 inputs as the model passes them (ctx and gates slices of the f output,
bf16), warms every backend up (compiles, autotuning) with the profiler off, then runs each phase
(backend x fwd / bwd) once between `cudaProfilerStart/Stop`, a `torch.cuda._sleep` marker kernel
before each phase so the CSV can be split by phase. `--parse` prints per phase: time, warp instructions
per output element (x32 / B*H*W*C, the unit of the cost model, docs/cost-model.md), FFMA per element,
DRAM bytes per element, and per kernel registers, achieved occupancy and its share. These are the
measurements the static cost model is calibrated against.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from typing import Dict, List

METRICS = [
    "gpu__time_duration.sum",
    "smsp__inst_executed.sum",
    "smsp__sass_thread_inst_executed_op_ffma_pred_on.sum",
    "dram__bytes_read.sum",
    "dram__bytes_write.sum",
    "launch__registers_per_thread",
    "sm__warps_active.avg.pct_of_peak_sustained_active",
    "launch__grid_size",
]
MARKER = "spin_kernel"  # torch.cuda._sleep's kernel


PHASES = [(b, d) for b in ("triton", "cuda") for d in ("fwd", "bwd")]  # run order, marker-separated


def run(B: int, H: int, W: int, C: int, ks: List[int]) -> None:
    import torch
    from focalnet_kernels import native
    from focalnet_kernels.triton import focal_context_bwd_triton, focal_context_fwd_triton

    launch = {"triton": (focal_context_fwd_triton, focal_context_bwd_triton)}
    if native.available("cuda"):
        launch["cuda"] = (native.focal_context_fwd_native, native.focal_context_bwd_native)
    L = len(ks)
    g = torch.Generator(device="cuda").manual_seed(0)
    y = torch.randn(B, H, W, 2 * C + L + 1, device="cuda", generator=g).to(torch.bfloat16)
    ctx, gates = y[..., C:2 * C], y[..., 2 * C:]
    weights = [torch.randn(C, k, k, device="cuda", generator=g) / k for k in ks]
    gout = torch.randn(B, H, W, C, device="cuda", generator=g).to(torch.bfloat16)
    state = {}
    for name, (fwd, bwd) in list(launch.items()):  # warm-up: compiles and autotuning stay out of the counters
        try:
            for _ in range(2):
                out, pooled = fwd(ctx, gates, weights, False)
                bwd(gout, ctx, gates, weights, pooled, False)
            state[name] = pooled
        except Exception as e:  # one broken backend must not cost the other its counters
            print(f"gpu_profile: {name} failed in the warm-up, not profiled: {type(e).__name__}: {e}",
                  file=sys.stderr)
            del launch[name]
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for name, direction in PHASES:
        if name not in launch:
            continue
        torch.cuda._sleep(1000)
        fwd, bwd = launch[name]
        if direction == "fwd":
            fwd(ctx, gates, weights, False)
        else:
            bwd(gout, ctx, gates, weights, state[name], False)
        torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    ran = [f"{b}:{d}" for b, d in PHASES if b in launch]
    print(f"gpu_profile: ran {', '.join(ran)} at B={B} {H}x{W}x{C} k={ks} bf16", file=sys.stderr)
    print(f"gpu_profile phases: {','.join(ran)}")  # the parser labels the CSV's segments with these


def _num(s: str) -> float:
    try:
        return float(str(s).replace(",", ""))
    except ValueError:
        return float("nan")


def parse(text: str, B: int, H: int, W: int, C: int, ks: List[int]) -> str:
    """The phase table from ncu's `--csv --page raw` output (header row, a units row, one row per kernel)."""
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    if not lines:
        return "gpu_profile: no ncu rows (ncu failed or profiled nothing)"
    rows = [r for r in csv.DictReader(io.StringIO("\n".join(lines)))
            if str(r.get("ID", "")).strip().isdigit() and r.get("Kernel Name")]  # drops the units row
    n_el = B * H * W * C
    # split at the marker kernels, in the phase order of run()
    phases: List[List[Dict]] = []
    for r in rows:
        if MARKER in r["Kernel Name"]:
            phases.append([])
        elif phases:
            phases[-1].append(r)
    names = [f"{b}:{d}" for b, d in PHASES]
    for ln in text.splitlines():  # the phases that ran, as run() printed them (a backend may be missing)
        if ln.startswith("gpu_profile phases: "):
            names = ln.split(": ", 1)[1].strip().split(",")
    out = [f"ncu counters, B={B} {H}x{W}x{C} k={ks} bf16 (per output element = / {n_el}):",
           f"{'phase':<12} {'time ms':>8} {'instr/el':>9} {'ffma/el':>8} {'dram B/el':>9}  kernels (regs, occupancy %, time share)"]
    for name, krs in zip(names, phases):
        t = sum(_num(k["gpu__time_duration.sum"]) for k in krs)  # ns
        inst = sum(_num(k["smsp__inst_executed.sum"]) for k in krs) * 32 / n_el
        ffma = sum(_num(k["smsp__sass_thread_inst_executed_op_ffma_pred_on.sum"]) for k in krs) / n_el
        dram = sum(_num(k["dram__bytes_read.sum"]) + _num(k["dram__bytes_write.sum"]) for k in krs) / n_el
        parts = []
        for k in krs:
            kt = _num(k["gpu__time_duration.sum"])
            parts.append(f"{k['Kernel Name'][:40]} ({_num(k['launch__registers_per_thread']):.0f}, "
                         f"{_num(k['sm__warps_active.avg.pct_of_peak_sustained_active']):.0f}%, "
                         f"{100 * kt / t if t else 0:.0f}%)")
        out.append(f"{name:<12} {t / 1e6:8.3f} {inst:9.1f} {ffma:8.1f} {dram:9.1f}  " + "; ".join(parts))
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--metrics", action="store_true", help="print the ncu metric list")
    g.add_argument("--run", action="store_true", help="run the phases (under ncu)")
    g.add_argument("--parse", metavar="CSV", help="print the phase table from ncu's csv")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--shape", default="56,56,96", help="H,W,C (FocalNet-T stage 1)")
    p.add_argument("--kernels", default="3,5,7")
    a = p.parse_args(argv)
    H, W, C = (int(v) for v in a.shape.split(","))
    ks = [int(v) for v in a.kernels.split(",")]
    if a.metrics:
        print(",".join(METRICS))
    elif a.run:
        run(a.batch, H, W, C, ks)
    else:
        with open(a.parse) as f:
            print(parse(f.read(), a.batch, H, W, C, ks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
