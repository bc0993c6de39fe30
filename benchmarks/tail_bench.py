"""The modulation-tail benchmark (GPU): `q * (ctx_all @ h.T + b)` and the whole inference modulation,
eager against the Triton tail, at the FocalNet-T stage shapes.

Variants per (shape, L, dtype), each timed with the L2 flushed before every call (CUDA events, median):
  tail_eager        q * F.linear(ctx_all, h, b)                       (cuBLAS GEMM, then the product)
  tail_triton       focalnet_kernels.modulation.modulation_tail_fwd   (one GEMM, gating in its epilogue)
  modulation_eager  focal_context (backend auto) + tail_eager         (what the fused model ran before)
  modulation_fused  focalnet_kernels.modulation.focal_modulation_fwd  (global term folded into the tail)
Also the largest relative difference of modulation_fused against modulation_eager (same inputs).

    python -m benchmarks.tail_bench [--batch 256] [--dtype bf16] [--json FILE]
The GPU suite runs it as its "tail" task (results.json["tail"]).
"""
from __future__ import annotations

import argparse
import json
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from .common import L2Flusher, bench_calls, free_memory, median, parse_dtype, short_exc

STAGES = [(56, 56, 96), (28, 28, 192), (14, 14, 384), (7, 7, 768)]
VARIANTS = ("tail_eager", "tail_triton", "modulation_eager", "modulation_fused")
KERNELS = {2: [3, 5], 3: [3, 5, 7]}


def _inputs(B, H, W, C, L, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    y = rnd(B, H, W, 2 * C + L + 1)
    ks = [(torch.randn(C, 1, k, k, generator=g) * (1.0 / k)).to(device) for k in KERNELS[L]]
    return dict(y=y, kernels=ks, h_w=rnd(C, C, scale=C ** -0.5), h_b=rnd(C), ctx_all=rnd(B, H, W, C))


def _calls(inp, C):
    import focalnet_kernels
    from focalnet_kernels import modulation
    y, ks, hw, hb = inp["y"], inp["kernels"], inp["h_w"], inp["h_b"]
    q, ctx, gates = y[..., :C], y[..., C:2 * C], y[..., 2 * C:]
    return {
        "tail_eager": lambda: q * F.linear(inp["ctx_all"], hw, hb),
        "tail_triton": lambda: modulation.modulation_tail_fwd(q, inp["ctx_all"], hw, hb),
        "modulation_eager": lambda: q * F.linear(focalnet_kernels.focal_context(ctx, gates, ks), hw, hb),
        "modulation_fused": lambda: modulation.focal_modulation_fwd(y, ks, hw, hb, False),
    }


def run_cell(B, H, W, C, L, dtype, device, n=20) -> List[Dict]:
    """One dict per variant (status ok / error) for one shape."""
    rows = []
    try:
        inp = _inputs(B, H, W, C, L, dtype, device)
    except Exception as e:  # e.g. out of memory
        return [dict(shape=[B, H, W, C], L=L, dtype=str(dtype), variant=v, status="error",
                     reason=f"inputs: {short_exc(e)}") for v in VARIANTS]
    calls = _calls(inp, C)
    flush = L2Flusher(device)
    with torch.no_grad():
        ref = None
        for v in VARIANTS:
            row = dict(shape=[B, H, W, C], L=L, dtype=str(dtype).replace("torch.", ""), variant=v)
            try:
                out = calls[v]()          # first call: compiles
                for _ in range(3):
                    calls[v]()
                ms = bench_calls(calls[v], device, n=n, flush=flush)
                row.update(status="ok", median_ms=round(median(ms), 4), calls=len(ms))
                if v == "modulation_eager":
                    ref = out.float()
                if v == "modulation_fused" and ref is not None:
                    row["max_rel_vs_modulation_eager"] = float((out.float() - ref).abs().max() /
                                                               ref.abs().max().clamp_min(1e-30))
            except Exception as e:
                row.update(status="error", reason=short_exc(e))
            rows.append(row)
    del inp, calls
    free_memory(device)
    return rows


def run(batch=256, dtype=torch.bfloat16, levels=(3, 2), shapes=STAGES, device=None, n=20,
        budget_left=None) -> List[Dict]:
    device = torch.device(device or "cuda")
    rows: List[Dict] = []
    for L in levels:
        for H, W, C in shapes:
            if budget_left is not None and budget_left() < 0:
                rows.append(dict(shape=[batch, H, W, C], L=L, status="skipped", reason="time budget"))
                continue
            rows.extend(run_cell(batch, H, W, C, L, dtype, device, n))
    return rows


def format_rows(rows: List[Dict]) -> str:
    out = []
    for r in rows:
        if r.get("status") == "ok":
            extra = f"  max rel vs eager {r['max_rel_vs_modulation_eager']:.2e}" if "max_rel_vs_modulation_eager" in r else ""
            out.append(f"    {'x'.join(map(str, r['shape']))} L={r['L']} {r['dtype']:9s} {r['variant']:17s} "
                       f"{r['median_ms']:8.3f} ms{extra}")
        else:
            out.append(f"    ! {r.get('shape')} L={r.get('L')} {r.get('variant', '')}: {r.get('reason')}")
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.tail_bench: needs a CUDA GPU (the Triton tail runs CUDA tensors)")
        return 0
    rows = run(a.batch, parse_dtype(a.dtype), shapes=STAGES[:a.stages])
    print(format_rows(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
