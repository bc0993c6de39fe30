"""focalnet-bench: FocalNet eager vs fused vs torch.compile vs Swin, and the focal_context op.

    focalnet-bench                      # auto: the full GPU suite on a GPU, else the CPU default (< 5 min)
    focalnet-bench --quick              # GPU: the essentials in < 4 min
    focalnet-bench --dry-run            # the GPU code path with tiny models on CPU tensors (CI)
    focalnet-bench --suite cpu --models focalnet_tiny_lrf,swin_tiny --batch 8
    focalnet-bench --suite cpu --no-peers   # without the torch.compile / ONNX Runtime group (~3 min less)

Writes results.json (every raw sample, medians, environment), results.png and table.txt under
benchmarks/results/<timestamp>-<device>/ (or --out DIR) and prints the table.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path
from typing import List, Optional

import torch

from . import models as M
from . import report
from .common import collect_env, default_results_root, device_slug, log, parse_dtype
from .op_bench import OP_BACKENDS
from .suite import FOCAL_MODES, Config, run_suite

FULL_MODELS = ["focalnet_tiny_srf", "focalnet_tiny_lrf", "swin_tiny", "focalnet_small_srf", "focalnet_small_lrf",
               "swin_small", "focalnet_base_srf", "focalnet_base_lrf", "swin_base"]
QUICK_MODELS = ["focalnet_tiny_srf", "focalnet_tiny_lrf", "swin_tiny"]
GPU_BUDGET_S = {"full": 480.0, "quick": 200.0}
CPU_BUDGET_S = 420.0


def _csv(values: Optional[List[str]]) -> List[str]:
    out: List[str] = []
    for v in values or []:
        out += [x.strip() for x in v.split(",") if x.strip()]
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="focalnet-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=("cpu", "gpu", "auto"), default="auto",
                   help="cpu: the short CPU default; gpu: the full GPU suite; auto (default): gpu if CUDA is available")
    p.add_argument("--quick", action="store_true",
                   help="GPU: T SRF/LRF + Swin-T, bf16, batch 256/64, the op at T shapes, one training group (< 4 min); "
                        "CPU: fewer repetitions")
    p.add_argument("--out", type=Path, help="output folder (default benchmarks/results/<timestamp>-<device>/)")
    p.add_argument("--models", action="append",
                   help="comma-separated: focalnet_* variants and swin_tiny/swin_small/swin_base")
    p.add_argument("--batch", action="append", help="comma-separated inference batch sizes")
    p.add_argument("--dtype", action="append", help="comma-separated: bf16, fp16, fp32 (first = headline)")
    p.add_argument("--dry-run", action="store_true",
                   help="run the GPU suite's code path with tiny models and sizes on CPU tensors (for CI)")
    p.add_argument("--budget", type=float,
                   help="time budget in seconds; tasks that do not fit are skipped and listed "
                        f"(default: GPU {GPU_BUDGET_S['full']:.0f}, GPU --quick {GPU_BUDGET_S['quick']:.0f}, "
                        f"CPU {CPU_BUDGET_S:.0f}, dry run none; 0 = none)")
    p.add_argument("--train-batch", type=int, help="training batch (default 128 on GPU)")
    p.add_argument("--op-batch", type=int, help="batch of the focal_context op benchmark (default 256 on GPU)")
    p.add_argument("--modes", help=f"comma-separated FocalNet modes among {', '.join(FOCAL_MODES)}")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile modes")
    p.add_argument("--no-train", action="store_true", help="skip the training section")
    p.add_argument("--no-peers", action="store_true",
                   help="CPU: skip the peers group (torch.compile with freezing, ONNX Runtime)")
    p.add_argument("--op-backends", help="comma-separated focal_context backends of the op section, among "
                   + ", ".join(OP_BACKENDS))
    p.add_argument("--compile-backend", default=None, help=argparse.SUPPRESS)
    p.add_argument("--reps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: tiny models in any suite
    p.add_argument("--compile-est", type=float, help=argparse.SUPPRESS)  # planning estimate of one compile (s)
    p.add_argument("--plan", action="store_true",
                   help="print the task plan with the time estimates and exit (works without a GPU)")
    return p


def make_config(args: argparse.Namespace, argv: List[str]) -> Config:
    has_cuda = torch.cuda.is_available()
    suite = args.suite
    if args.dry_run:
        suite = "gpu"
    elif suite == "auto":
        suite = "gpu" if has_cuda else "cpu"
    if suite == "gpu" and not has_cuda and not args.dry_run and not args.plan:
        raise SystemExit("focalnet-bench: --suite gpu needs a CUDA device (use --dry-run to exercise the GPU "
                         "code path on CPU, or --suite cpu)")
    tiny = args.tiny or args.dry_run
    device = torch.device("cuda" if (suite == "gpu" and not args.dry_run) else "cpu")
    cfg = Config(suite=suite, device=device, quick=args.quick, dry_run=args.dry_run, tiny=tiny, argv=argv)

    if suite == "gpu":
        cfg.models = list(QUICK_MODELS if args.quick or args.dry_run else FULL_MODELS)
        cfg.dtypes = [torch.bfloat16] if args.quick else [torch.bfloat16, torch.float16]
        cfg.batches = [256, 64] if args.quick else [256, 64, 1]
        # --quick: the essentials; torch.compile (about a minute per model) only in the full suite
        cfg.modes = ["eager", "fused"] if args.quick else ["eager", "fused", "fused:cuda", "compile", "fused+compile"]
        cfg.op_backends = ["eager", "reference", "triton", "cuda", "cuda_fma"] + ([] if args.quick else ["reference_compiled"])
        cfg.op_sizes = ["tiny"] if args.quick else ["tiny", "base"]
        cfg.op_dtypes = [torch.bfloat16]
        cfg.budget_s = GPU_BUDGET_S["quick" if args.quick else "full"]
        if args.quick:
            cfg.rep_target_s = 0.15
    else:
        cfg.models = list(QUICK_MODELS)
        cfg.dtypes = [torch.float32]
        cfg.batches = [4]
        cfg.modes = ["eager", "fused-ctx", "fused"]
        cfg.compile_modes = False
        # the peers group: FocalNet-T LRF eager / fused beside torch.compile (Inductor, freezing) and ONNX
        # Runtime of the same eager model (--no-peers drops it, --no-compile its compile member)
        cfg.peer_modes = ["eager", "fused", "compile", "onnxruntime"]
        cfg.peer_models = ["focalnet_tiny_lrf"]
        cfg.compile_est_s = 90.0      # one Inductor compile of FocalNet-T with freezing on 2 cores
        cfg.train = not args.quick     # one training step per rep: forward, backward, AdamW
        cfg.train_batch = 4
        cfg.reps = 3 if args.quick else 5
        cfg.warmup = 1
        cfg.rep_target_s = 0.0
        cfg.op_sizes = ["tiny"]
        cfg.op_batch = 2
        cfg.op_dtypes = [torch.float32]
        cfg.op_backends = ["eager", "reference", "cpu"]
        cfg.op_rep_ms = 150.0
        cfg.op_min_calls = 3
        cfg.op_max_calls = 20
        cfg.equiv_batch = 2
        cfg.budget_s = CPU_BUDGET_S
        cfg.bandwidth_bytes = 128 * 2 ** 20
        cfg.bandwidth_reps = 5
    if tiny:  # tiny models, 64x64 images, tiny batches: seconds, not minutes
        cfg.img_size = M.TINY_IMG
        cfg.batches = [2, 1] if suite == "gpu" else [2]
        cfg.train_batch = 2
        cfg.equiv_batch = 2
        cfg.op_batch = 1
        cfg.reps = 2
        cfg.warmup = 0  # the first (timed separately) call is the warm-up
        cfg.rep_target_s = 0.0
        cfg.op_rep_ms = 1.0
        cfg.op_min_calls = 2
        cfg.op_max_calls = 3
        cfg.bandwidth_bytes = 16 * 2 ** 20
        cfg.bandwidth_reps = 3
        cfg.compile_est_s = 5.0
        if suite == "cpu":  # the peers' compile traces with dynamo only: Inductor's C++ build takes minutes
            cfg.compile_backend = "eager"
    if args.dry_run:
        cfg.budget_s = None
        cfg.batches = [2]
        cfg.dtypes = [torch.bfloat16]
        cfg.equiv_dtypes = [torch.bfloat16, torch.float16]
        cfg.op_levels = [3]
        cfg.op_stages = 2
        cfg.exhaustive = False
        cfg.compile_backend = "eager"  # exercises dynamo tracing of the models and the custom op, fast on CPU
    if args.compile_backend:
        cfg.compile_backend = args.compile_backend
    if args.models:
        cfg.models = [M.canonical(m) for m in _csv(args.models)]
    if args.dtype:
        cfg.dtypes = [parse_dtype(d) for d in _csv(args.dtype)]
        cfg.equiv_dtypes = list(cfg.dtypes)
        cfg.op_dtypes = [d for d in cfg.dtypes if d != torch.float32 or suite == "cpu"] or cfg.op_dtypes
    if args.batch:
        cfg.batches = [int(b) for b in _csv(args.batch)]
    if args.train_batch:
        cfg.train_batch = args.train_batch
    if args.op_batch:
        cfg.op_batch = args.op_batch
    if args.modes:
        cfg.modes = _csv([args.modes])
        bad = [m for m in cfg.modes if m not in FOCAL_MODES]
        if bad:
            raise SystemExit(f"focalnet-bench: unknown mode(s) {bad}; known: {', '.join(FOCAL_MODES)}")
    if args.no_compile or not cfg.compile_modes:
        cfg.modes = [m for m in cfg.modes if "compile" not in m]
        cfg.op_backends = [b for b in cfg.op_backends if b != "reference_compiled"]
    if args.no_compile:
        cfg.peer_modes = [m for m in cfg.peer_modes if "compile" not in m]
    if args.no_peers or cfg.peer_modes in ([], ["eager"], ["eager", "fused"]):
        cfg.peer_modes, cfg.peer_models = [], []
    cfg.peer_models = [m for m in cfg.peer_models if m in cfg.models] if not args.models else \
        [m for m in cfg.models if M.fused_capable(m)][-1:]
    if args.no_train:
        cfg.train = False
    if args.op_backends:
        cfg.op_backends = _csv([args.op_backends])
        bad = [b for b in cfg.op_backends if b not in OP_BACKENDS]
        if bad:
            raise SystemExit(f"focalnet-bench: unknown op backend(s) {bad}; known: {', '.join(OP_BACKENDS)}")
    if args.reps:
        cfg.reps = args.reps
    if args.budget is not None:
        cfg.budget_s = args.budget if args.budget > 0 else None
    if args.compile_est:
        cfg.compile_est_s = args.compile_est
    # the op runs at the stage shapes of the model sizes selected (T and B by default)
    sizes = M.sizes_in(cfg.models)
    cfg.op_sizes = [s for s in cfg.op_sizes if s in sizes] or sizes[:1]
    return cfg


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    cfg = make_config(args, argv)
    if args.plan:
        from .suite import print_plan
        print_plan(cfg)
        return 0
    env = collect_env(cfg.device, argv)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or default_results_root() / f"{stamp}-{device_slug(cfg.device, cfg.dry_run)}"
    out.mkdir(parents=True, exist_ok=True)
    cfg.out_dir = out
    threads = torch.get_num_threads()
    if cfg.tiny:  # tiny tensors: one thread avoids OpenMP barrier costs (numbers are not the point here)
        torch.set_num_threads(1)
    try:
        res = run_suite(cfg, env, on_progress=lambda partial: report.write_json(partial, out / "results.json"))
    finally:
        torch.set_num_threads(threads)
    text = report.render_text(res)
    (out / "table.txt").write_text(text + "\n")
    png_problem = report.write_png(res, out / "results.png")
    res["files"] = {"json": "results.json", "table": "table.txt",
                    "png": None if png_problem else "results.png"}
    if png_problem:
        res["png_problem"] = png_problem
    report.write_json(res, out / "results.json")
    print()
    print(text)
    log(f"\nwrote {out / 'results.json'}" + ("" if png_problem else f", {out / 'results.png'}")
        + f", {out / 'table.txt'}" + (f"\n(no PNG: {png_problem})" if png_problem else ""))
    errors = [s for s in res["sections"] if s["status"] in ("error", "oom")]
    return 3 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
