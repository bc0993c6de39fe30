"""The benchmark suites: a CPU default (no GPU) and the full GPU suite, both run as a budgeted plan.

A plan is an ordered list of tasks, most important first. Each task has a cost estimate; a task that
does not fit the time left is recorded as skipped with the reason, so one command always finishes
inside its budget (the GPU suite must fit one 10-minute command, build included) and the JSON says
what was and was not measured.

Timing rules (GPU): CUDA events; warm-up (and torch.compile, reported separately as compile_s)
excluded; models of one group interleaved per repetition (A B C A B C ...); each repetition times
`iters` back-to-back calls on input buffers rotated so that they exceed twice the L2 size; the
medians of the repetitions are reported beside every raw sample. The op section times each call
with CUDA events after overwriting a 256 MB buffer (L2 flush, as triton.testing.do_bench does).
"""
from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from . import models as M
from . import op_bench
from .activation_memory import NOTE as SAVED_ACTIVATIONS_NOTE, saved_activation_bytes
from . import peers
from .common import (DTYPE_NAMES, Budget, env_var, free_memory, is_oom, l2_bytes, log, median, n_buffers,
                     short_exc, sync, time_loop, wall)

SCHEMA = "focalnet-bench/1"
FOCAL_MODES = ("eager", "fused", "fused-ctx", "fused:cuda", "fused:triton", "compile", "fused+compile", "onnxruntime")
# fused-ctx: the fused model with its projections left on torch's F.linear (FOCALNET_LINEAR_BACKEND=torch),
# so that the share of focal_context in a fused speed-up is measured apart from focalnet_kernels.linear's.
LINEAR_ENV = {"fused-ctx": "torch"}
SWIN_MODES = ("eager", "compile")
# onnxruntime: the eager model exported to ONNX and run in ONNX Runtime (CPU; benchmarks/peers.py).
# Like the compiled modes it is built on its first call, which is reported as compile_s.
BUILT_ON_FIRST_CALL = ("onnxruntime",)


# ------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Config:
    suite: str                      # "cpu" | "gpu"
    device: torch.device
    quick: bool = False
    dry_run: bool = False
    tiny: bool = False
    models: List[str] = dataclasses.field(default_factory=list)
    dtypes: List[torch.dtype] = dataclasses.field(default_factory=list)
    batches: List[int] = dataclasses.field(default_factory=list)
    train_batch: int = 128
    equiv_batch: int = 8
    equiv_dtypes: List[torch.dtype] = dataclasses.field(default_factory=list)  # default: dtypes
    img_size: int = 224
    modes: List[str] = dataclasses.field(default_factory=lambda: ["eager", "fused"])
    # CPU suite: a second inference group of what a CPU deployer would use instead (torch.compile with
    # Inductor freezing, ONNX Runtime) beside our eager and fused model, interleaved, same weights
    peer_modes: List[str] = dataclasses.field(default_factory=list)
    peer_models: List[str] = dataclasses.field(default_factory=list)
    peer_swin_modes: List[str] = dataclasses.field(default_factory=list)
    cpu_freezing: bool = True        # torch.compile on the CPU with Inductor's freezing (inference)
    compile_modes: bool = True       # measure compile / fused+compile (GPU suite)
    exhaustive: bool = True          # plan the whole matrix (the budget cuts it); False: the main tasks only
    reps: int = 5
    warmup: int = 2
    rep_target_s: float = 0.25       # each repetition times enough calls to last about this long
    train: bool = True
    op_sizes: List[str] = dataclasses.field(default_factory=list)
    op_levels: List[int] = dataclasses.field(default_factory=lambda: [2, 3])
    op_stages: int = 4               # how many of the four stage shapes
    op_batch: int = 256
    op_dtypes: List[torch.dtype] = dataclasses.field(default_factory=list)
    op_directions: List[str] = dataclasses.field(default_factory=lambda: ["fwd", "fwd+bwd"])
    op_backends: List[str] = dataclasses.field(default_factory=lambda: list(op_bench.OP_BACKENDS))
    op_rep_ms: float = 100.0
    op_min_calls: int = 10
    op_max_calls: int = 100
    compile_backend: str = "inductor"
    compile_est_s: float = 60.0      # planning estimate of one inductor compile of a model (GPU)
    budget_s: Optional[float] = None
    channels_last: bool = True
    bandwidth_bytes: int = 2 ** 30
    bandwidth_reps: int = 20
    out_dir: Optional[Path] = None
    argv: List[str] = dataclasses.field(default_factory=list)

    def describe(self) -> Dict:
        d = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.device):
                v = str(v)
            elif isinstance(v, torch.dtype):
                v = DTYPE_NAMES.get(v, str(v))
            elif isinstance(v, Path):
                v = str(v)
            elif isinstance(v, list):
                v = [DTYPE_NAMES.get(x, str(x)) if isinstance(x, torch.dtype) else x for x in v]
            d[f.name] = v
        return d


# ------------------------------------------------------------------------------------------------
# run state
# ------------------------------------------------------------------------------------------------
class Run:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.device = cfg.device
        self.budget = Budget(cfg.budget_s)
        self.results: Dict = {"inference": [], "training": [], "op": [], "tail": [], "equivalence": [], "skipped": [],
                              "sections": [], "bandwidth": None, "models": {}}
        self.pool: Dict[str, Dict] = {}
        self.current_task = ""
        self.backend_ok_cache: Dict = {}

    # ---- models --------------------------------------------------------------------------------
    def model(self, name: str) -> Dict:
        """The eval-mode model (and, for FocalNet, a fused twin with the same weights), built once."""
        if name not in self.pool:
            torch.manual_seed(0)
            base, info = M.build(name, tiny=self.cfg.tiny, img_size=self.cfg.img_size)
            base = base.eval().to(self.device)
            fused = None
            if M.fused_capable(name):
                fused = copy.deepcopy(base)
                fused.set_fused(True)
            self.pool[name] = {"base": base, "fused": fused, "info": info}
            self.results["models"][name] = dict(info, label=M.label(name))
        return self.pool[name]

    def drop_models(self, keep: Sequence[str] = ()) -> None:
        for n in [n for n in self.pool if n not in keep]:
            del self.pool[n]
        free_memory(self.device)

    def skip(self, what: str, reason: str) -> None:
        item = {"item": what, "reason": reason}
        if item not in self.results["skipped"]:
            self.results["skipped"].append(item)

    def cuda_backend_available(self) -> bool:
        key = "cuda-backend"
        if key not in self.backend_ok_cache:
            self.backend_ok_cache[key] = (self.device.type == "cuda" and op_bench.backend_skip_reason(
                "cuda", self.device, torch.bfloat16, 2, self.cfg.compile_backend) is None)
        return self.backend_ok_cache[key]


@dataclasses.dataclass
class Task:
    name: str
    est_s: float
    fn: Callable[[Run], None]


# ------------------------------------------------------------------------------------------------
# members: one timed callable of a group
# ------------------------------------------------------------------------------------------------
class Member:
    def __init__(self, name: str, mode: str, fn: Callable, *, compiled: bool, env_backend: Optional[str],
                 dtype: torch.dtype, device: torch.device, grad: bool, autocast: bool = True):
        self.name, self.mode, self.fn = name, mode, fn
        self.env_linear = LINEAR_ENV.get(mode)
        self.autocast = autocast
        self.compiled, self.env_backend = compiled, env_backend
        self.dtype, self.device, self.grad = dtype, device, grad
        self.samples_s: List[float] = []
        self.iters = 1
        self.status, self.reason = "ok", None
        self.first_call_s: Optional[float] = None
        self.backends_ran: Dict[str, int] = {}
        self.extra: Dict = {}
        self._i = 0

    @contextlib.contextmanager
    def context(self):
        with contextlib.ExitStack() as st:
            if not self.grad:
                st.enter_context(torch.no_grad())
            if self.autocast:
                st.enter_context(torch.autocast(self.device.type, dtype=self.dtype,
                                                enabled=self.dtype != torch.float32))
            if self.env_backend:
                st.enter_context(env_var("FOCALNET_KERNELS_BACKEND", self.env_backend))
            if self.env_linear:
                st.enter_context(env_var("FOCALNET_LINEAR_BACKEND", self.env_linear))
            yield

    def step(self, inputs: List[torch.Tensor]) -> None:
        x = inputs[self._i % len(inputs)]
        self._i += 1
        self.fn(x)

    def fail(self, e: BaseException) -> None:
        self.status = "oom" if is_oom(e) else "error"
        self.reason = short_exc(e)
        log(f"    ! {M.label(self.name)} {self.mode}: {self.reason}")


def _parse_mode(mode: str):
    """(fused, forced focal_context backend or None, built on its first call: compiled or exported)."""
    compiled = mode == "compile" or mode.endswith("+compile") or mode in BUILT_ON_FIRST_CALL
    fused = mode.startswith("fused")
    head = mode.split("+")[0]
    backend = head.split(":", 1)[1] if ":" in head else None
    return fused, backend, compiled


def _compile(run: Run, module):
    return peers.compile_inference(module, run.cfg.compile_backend,
                                   freezing=run.cfg.cpu_freezing and run.device.type == "cpu")


def _build_member_fn(run: Run, name: str, mode: str, module):
    """(callable, how it was built or None) of one inference member, or (None, why not) when it
    cannot run here."""
    compiled = _parse_mode(mode)[2]
    if mode == "onnxruntime":
        why = "ONNX Runtime runs on the CPU here" if run.device.type != "cpu" else peers.onnxruntime_skip_reason()
        if why:
            return None, why
        import onnxruntime
        fn = peers.OnnxRuntimeModel(module)
        return fn, f"onnxruntime {onnxruntime.__version__}, CPU provider, {fn.threads} threads, ORT_ENABLE_ALL"
    if not compiled:
        return module, None
    freezing = run.cfg.cpu_freezing and run.device.type == "cpu" and run.cfg.compile_backend == "inductor"
    return _compile(run, module), f"torch.compile backend={run.cfg.compile_backend}" + (", freezing" if freezing else "")


def _backend_counts() -> collections.Counter:
    try:
        import focalnet_kernels
        return collections.Counter(focalnet_kernels.backend_calls)
    except Exception:
        return collections.Counter()


def _backends_ran_since(before: collections.Counter) -> Dict[str, int]:
    """Which backends ran (and how often) since `before` = _backend_counts()."""
    after = _backend_counts()
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def _make_inputs(run: Run, batch: int, seed: int) -> List[torch.Tensor]:
    cfg = run.cfg
    shape = (batch, 3, cfg.img_size, cfg.img_size)
    one = 4 * math.prod(shape)
    n = n_buffers(one, l2_bytes(run.device), max_total=2 ** 30 if run.device.type == "cuda" else 2 ** 27)
    g = torch.Generator().manual_seed(seed)
    xs = []
    for _ in range(n):
        x = torch.randn(shape, generator=g).to(run.device)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        xs.append(x)
    return xs


def _warm_and_calibrate(run: Run, members: List[Member], inputs: List[torch.Tensor]) -> None:
    cfg = run.cfg
    for m in members:
        if m.compiled and not run.budget.allows(cfg.compile_est_s + 10):
            m.status, m.reason = "skipped", (f"time budget: {run.budget.left():.0f} s left, a compile needs "
                                             f"~{cfg.compile_est_s:.0f} s")
            continue
        try:
            with m.context():
                before = _backend_counts()
                m.first_call_s = wall(lambda: m.step(inputs), run.device)  # compile happens here
                m.backends_ran = _backends_ran_since(before)
                for _ in range(cfg.warmup + (2 if m.compiled else 0)):  # compiled code settles after a few calls
                    m.step(inputs)
                sync(run.device)
                t1 = time_loop(lambda: m.step(inputs), 1, run.device)
            m.iters = int(max(1, min(200, round(cfg.rep_target_s / max(t1, 1e-6)))))
            log(f"    {M.label(m.name):16s} {m.mode:14s} first call {m.first_call_s:7.2f} s, "
                f"{t1 * 1e3:8.2f} ms/call -> {m.iters} calls per sample")
        except Exception as e:
            m.fail(e)
            free_memory(run.device)


def _timed_reps(run: Run, members: List[Member], inputs: List[torch.Tensor]) -> None:
    cfg = run.cfg
    for r in range(cfg.reps):
        active = [m for m in members if m.status == "ok"]
        if not active:
            return
        if r >= 2 and run.budget.left() < 0:
            for m in active:
                m.extra["note"] = f"stopped after {r} repetitions: time budget"
            return
        for m in active:  # interleaved: A B C A B C ...
            try:
                with m.context():
                    m.samples_s.append(time_loop(lambda: m.step(inputs), m.iters, run.device))
            except Exception as e:
                m.fail(e)
                free_memory(run.device)


def _member_entry(run: Run, m: Member, kind: str, batch: int) -> Dict:
    per_call = [s / m.iters for s in m.samples_s]
    e = dict(kind=kind, group=run.current_task, model=m.name, label=M.label(m.name), size=M.size_of(m.name),
             mode=m.mode,
             dtype=DTYPE_NAMES[m.dtype], batch=batch, img_size=run.cfg.img_size, status=m.status,
             reason=m.reason, iters_per_sample=m.iters, samples_s=m.samples_s,
             samples_ms=[p * 1e3 for p in per_call], samples_img_s=[batch / p for p in per_call if p > 0],
             median_ms=(median(per_call) * 1e3) if per_call else None,
             median_img_s=(batch / median(per_call)) if per_call else None,
             backends_ran=m.backends_ran, source=run.results["models"].get(m.name, {}).get("source"))
    if m.compiled:
        e["compile_s"] = m.first_call_s
    else:
        e["first_call_s"] = m.first_call_s
    e.update(m.extra)
    return e


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------------
# tasks
# ------------------------------------------------------------------------------------------------
def task_bandwidth(run: Run) -> None:
    cfg = run.cfg
    nbytes = cfg.bandwidth_bytes
    if run.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(run.device)
        nbytes = min(nbytes, free // 4)
    bw = op_bench.measure_bandwidth(run.device, nbytes, cfg.bandwidth_reps)
    run.results["bandwidth"] = bw
    log(f"    copy bandwidth: {bw['GBps']:.1f} GB/s ({bw['method']})")


def task_inference(run: Run, size: str, dtype: torch.dtype, batch: int, modes: Sequence[str],
                   swin_modes: Sequence[str], anchor_equivalence: bool = False,
                   only: Optional[Sequence[str]] = None) -> None:
    cfg = run.cfg
    names = [n for n in cfg.models if M.size_of(n) == size and (only is None or n in only)]
    members: List[Member] = []
    for name in names:
        entry = run.model(name)
        for mode in (swin_modes if M.is_swin(name) else modes):
            fused, backend, compiled = _parse_mode(mode)
            mod = entry["fused"] if fused else entry["base"]
            if fused and backend == "cuda" and not run.cuda_backend_available():
                run.skip(f"{M.label(name)} mode {mode}", "the cuda backend of focalnet_kernels is not available")
                continue
            fn, how = _build_member_fn(run, name, mode, mod)
            if fn is None:
                run.skip(f"{M.label(name)} mode {mode}", how)
                continue
            members.append(Member(name, mode, fn, compiled=compiled, env_backend=backend, dtype=dtype,
                                  device=run.device, grad=False))
            if how:
                members[-1].extra["built_with"] = how
    if not members:
        return
    inputs = _make_inputs(run, batch, seed=batch)
    _warm_and_calibrate(run, members, inputs)
    if anchor_equivalence:  # compiled modes against the eager anchor, same weights, same input
        _equivalence_from_members(run, members, inputs[0], dtype, batch)
    _timed_reps(run, members, inputs)
    for m in members:
        run.results["inference"].append(_member_entry(run, m, "inference", batch))
    del inputs
    if any(m.compiled for m in members):
        torch._dynamo.reset()
    del members
    free_memory(run.device)


def _equivalence_from_members(run: Run, members: List[Member], x: torch.Tensor, dtype, batch) -> None:
    by_model: Dict[str, Dict[str, Member]] = collections.defaultdict(dict)
    for m in members:
        if m.status == "ok" and not M.is_swin(m.name):
            by_model[m.name][m.mode] = m
    for name, ms in by_model.items():
        if "eager" not in ms or len(ms) < 2:
            continue
        outs = {}
        for mode, m in ms.items():
            with m.context():
                outs[mode] = m.fn(x).float()
        ref = outs["eager"]
        run.results["equivalence"].append(dict(
            model=name, label=M.label(name), dtype=DTYPE_NAMES[dtype], batch=batch,
            metric="max|out - eager| / max|eager| over the logits (same weights, same input)",
            max_rel_vs_eager={k: _max_rel(v, ref) for k, v in outs.items() if k != "eager"}))


def task_equivalence(run: Run, size: str, dtype: torch.dtype, batch: int) -> None:
    """Max relative logit difference, fused vs eager, per dtype (and both against fp32 eager)."""
    cfg = run.cfg
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(batch, 3, cfg.img_size, cfg.img_size, generator=g).to(run.device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for name in [n for n in cfg.models if M.size_of(n) == size and M.fused_capable(n)]:
        entry = run.model(name)
        base, fused = entry["base"], entry["fused"]
        rec = dict(model=name, label=M.label(name), dtype=DTYPE_NAMES[dtype], batch=batch,
                   metric="max|a - b| / max|b| over the logits (same weights, same input)")
        try:
            with torch.no_grad():
                ref32 = base(x).float()
                with torch.autocast(run.device.type, dtype=dtype, enabled=dtype != torch.float32):
                    eager = base(x).float()
                    before = _backend_counts()
                    fz = fused(x).float()
                    ran = _backends_ran_since(before)
                    outs = {"fused": fz}
                    if run.cuda_backend_available():
                        with env_var("FOCALNET_KERNELS_BACKEND", "cuda"):
                            outs["fused:cuda"] = fused(x).float()
            rec.update(status="ok",
                       max_rel_fused_vs_eager=_max_rel(fz, eager),
                       max_rel_eager_vs_fp32=_max_rel(eager, ref32),
                       max_rel_fused_vs_fp32=_max_rel(fz, ref32),
                       rel_l2_fused_vs_eager=float((fz - eager).norm() / eager.norm().clamp_min(1e-30)),
                       max_rel_vs_eager={k: _max_rel(v, eager) for k, v in outs.items()},
                       backends_ran=ran)
            log(f"    {M.label(name):16s} {DTYPE_NAMES[dtype]}: fused vs eager max rel {rec['max_rel_fused_vs_eager']:.2e}"
                f" (eager vs fp32 {rec['max_rel_eager_vs_fp32']:.2e})")
        except Exception as e:
            rec.update(status="error", reason=short_exc(e))
            log(f"    ! equivalence {M.label(name)}: {rec['reason']}")
        run.results["equivalence"].append(rec)
    free_memory(run.device)


def task_training(run: Run, size: str, dtype: torch.dtype, batch: int, modes: Sequence[str]) -> None:
    """Training step (forward, backward, AdamW) throughput, saved activations of one forward (every
    device) and peak memory of one step (CUDA), fresh train-mode models."""
    cfg = run.cfg
    names = [n for n in cfg.models if M.size_of(n) == size]
    run.drop_models(keep=[n for n in run.pool if M.size_of(n) == size])
    members: List[Member] = []
    holders = []
    for name in names:
        torch.manual_seed(0)
        base, info = M.build(name, tiny=cfg.tiny, img_size=cfg.img_size)
        run.results["models"].setdefault(name, dict(info, label=M.label(name)))
        base = base.train().to(run.device)
        for mode in (["eager"] if M.is_swin(name) else modes):
            fused, backend, compiled = _parse_mode(mode)
            if compiled:
                continue  # training is measured eager and fused (compile: see the inference section)
            if fused and backend == "cuda" and not run.cuda_backend_available():
                continue
            mod = copy.deepcopy(base).set_fused(True) if fused else base
            n_classes = 10 if cfg.tiny else 1000
            labels = torch.randint(0, n_classes, (batch,), generator=torch.Generator().manual_seed(0)).to(run.device)
            opt_kw = {"fused": True} if run.device.type == "cuda" else {}
            opt = torch.optim.AdamW(mod.parameters(), lr=1e-4, weight_decay=0.05, **opt_kw)
            scaler = torch.amp.GradScaler(run.device.type) if dtype == torch.float16 else None

            def step(x, mod=mod, opt=opt, labels=labels, scaler=scaler, dtype=dtype):
                opt.zero_grad(set_to_none=True)
                with torch.autocast(run.device.type, dtype=dtype, enabled=dtype != torch.float32):
                    loss = F.cross_entropy(mod(x).float(), labels)
                if scaler is None:
                    loss.backward()
                    opt.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()

            m = Member(name, mode, step, compiled=False, env_backend=backend, dtype=dtype,
                       device=run.device, grad=True, autocast=False)  # autocast is inside step
            m.extra.update(optimizer="AdamW(lr=1e-4, wd=0.05%s)" % (", fused=True" if opt_kw else ""),
                           train_dtype=DTYPE_NAMES[dtype], loss_scaler=scaler is not None)
            members.append(m)
            holders.append((m, mod, opt))
    if not members:
        return
    inputs = _make_inputs(run, batch, seed=7)
    _warm_and_calibrate(run, members, inputs)
    # per member: the activations one training forward saves for the backward (device-independent),
    # and on CUDA the peak memory of one step (the other members' states are resident, so the step's
    # own transient peak is measured and the member's persistent state is added)
    for m, mod, opt in holders:
        if m.status != "ok":
            continue
        _measure_saved_activations(run, m, mod, inputs[0], dtype)
        if run.device.type != "cuda":
            m.extra["peak_mem_bytes"] = None
            m.extra["peak_mem_note"] = "CPU: no allocator statistics"
            continue
        try:
            opt.zero_grad(set_to_none=True)
            sync(run.device)
            free_memory(run.device)
            torch.cuda.reset_peak_memory_stats(run.device)
            before = torch.cuda.memory_allocated(run.device)
            with m.context():
                m.step(inputs)
            sync(run.device)
            peak = torch.cuda.max_memory_allocated(run.device)
            params = sum(p.numel() * p.element_size() for p in mod.parameters())
            states = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                         if torch.is_tensor(t))
            m.extra.update(peak_mem_bytes=int(peak - before + params + states),
                           step_transient_peak_bytes=int(peak - before), param_bytes=int(params),
                           optimizer_state_bytes=int(states), process_max_memory_allocated_bytes=int(peak),
                           peak_mem_note="torch.cuda.max_memory_allocated during one step minus the memory "
                                         "allocated before it (grads freed), plus this model's parameters "
                                         "and AdamW state")
        except Exception as e:
            m.fail(e)
    _timed_reps(run, members, inputs)
    for m in members:
        run.results["training"].append(_member_entry(run, m, "training", batch))
    del holders, members, inputs
    free_memory(run.device)


def _measure_saved_activations(run: Run, m: Member, mod, x: torch.Tensor, dtype: torch.dtype) -> None:
    """m.extra["saved_activation_bytes"]: what one forward of `mod` (as the step runs it) saves."""
    try:
        with m.context(), torch.autocast(run.device.type, dtype=dtype, enabled=dtype != torch.float32):
            saved = saved_activation_bytes(mod, x)["bytes"]
        m.extra.update(saved_activation_bytes=saved, saved_activation_note=SAVED_ACTIVATIONS_NOTE)
    except Exception as e:  # a measurement that failed does not fail the timing
        m.extra.update(saved_activation_bytes=None, saved_activation_note=f"not measured: {short_exc(e)}")


def task_op(run: Run, size: str, dtype: torch.dtype, backends: Sequence[str], directions: Sequence[str]) -> None:
    cfg = run.cfg
    shapes = M.stage_shapes(size, tiny=cfg.tiny, img_size=cfg.img_size)[:cfg.op_stages]
    bw = (run.results.get("bandwidth") or {}).get("GBps")
    bw_Bps = bw * 1e9 if bw else None
    flush = op_bench.L2Flusher(run.device)
    compiled_cache = run.backend_ok_cache.setdefault("compiled_ref", {})
    stopped = False
    for L in cfg.op_levels:
        reasons = {}
        for b in backends:
            key = ("op", b, DTYPE_NAMES[dtype], L)
            if key not in run.backend_ok_cache:
                run.backend_ok_cache[key] = op_bench.backend_skip_reason(b, run.device, dtype, L, cfg.compile_backend)
            reasons[b] = run.backend_ok_cache[key]
            if reasons[b]:
                run.skip(f"op {size} {DTYPE_NAMES[dtype]} L={L} backend {b}", reasons[b])
        for direction in directions:
            for stage, (H, W, C) in enumerate(shapes):
                live = [b for b in backends if not reasons[b]]
                if not live:
                    continue
                if run.budget.left() < 0:
                    stopped = True
                    break
                try:  # one set of inputs per cell, shared by the backends
                    sets = op_bench.make_input_sets(cfg.op_batch, H, W, C, L, dtype, run.device,
                                                    bwd=direction == "fwd+bwd", l2=l2_bytes(run.device))
                except Exception as e:
                    run.skip(f"op {size} {H}x{W}x{C} L={L} {direction}", f"inputs: {short_exc(e)}")
                    free_memory(run.device)
                    continue
                for b in live:
                    compiled = op_bench.compiled_reference(L, direction, cfg.compile_backend, compiled_cache) \
                        if b == "reference_compiled" else {}
                    e = op_bench.run_op_entry(
                        size=size, stage=stage, shape=(cfg.op_batch, H, W, C), L=L, dtype=dtype,
                        direction=direction, backend=b, device=run.device, rep_ms=cfg.op_rep_ms,
                        max_calls=cfg.op_max_calls, min_calls=cfg.op_min_calls, bandwidth_Bps=bw_Bps,
                        compiled=compiled, flush=flush, sets=sets)
                    run.results["op"].append(e)
                    if e["status"] == "ok":
                        frac = f"{100 * e['frac_floor']:5.1f}% of floor" if e.get("frac_floor") else ""
                        log(f"    {H:3d}x{W:<3d}x{C:<5d} L={L} {direction:7s} {b:18s} {e['median_ms']:9.3f} ms {frac}")
                    else:
                        log(f"    ! {H}x{W}x{C} L={L} {direction} {b}: {e['reason']}")
                del sets
                free_memory(run.device)
    if stopped:
        run.skip(f"op {size} {DTYPE_NAMES[dtype]} remaining cells", "time budget")
    del flush
    free_memory(run.device)


def task_tail(run: Run, dtype: torch.dtype) -> None:
    """The modulation tail and the inference modulation, eager vs the Triton tail (benchmarks/tail_bench.py)."""
    from . import tail_bench
    cfg = run.cfg
    shapes = M.stage_shapes("tiny", tiny=cfg.tiny, img_size=cfg.img_size)[:cfg.op_stages]
    rows = tail_bench.run(cfg.op_batch, dtype, levels=cfg.op_levels, shapes=shapes, device=run.device,
                          budget_left=run.budget.left)
    run.results["tail"].extend(rows)
    log(tail_bench.format_rows(rows))


# ------------------------------------------------------------------------------------------------
# plans
# ------------------------------------------------------------------------------------------------
def _infer_est(run: Run, n_members: int, n_compiled: int, batch: int) -> float:
    cfg = run.cfg
    per = cfg.reps * max(cfg.rep_target_s, 0.02) * 1.3 + 1.0
    return 5.0 + n_members * per + n_compiled * cfg.compile_est_s


def _count_members(cfg: Config, size: str, modes: Sequence[str], swin_modes: Sequence[str],
                   only: Optional[Sequence[str]] = None):
    n = c = 0
    for name in cfg.models:
        if M.size_of(name) != size or (only is not None and name not in only):
            continue
        for mode in (swin_modes if M.is_swin(name) else modes):
            n += 1
            c += _parse_mode(mode)[2]
    return n, c


def plan_gpu(run: Run) -> List[Task]:
    """Most important first; the budget drops what does not fit (recorded as skipped)."""
    cfg = run.cfg
    tasks: List[Task] = []
    sizes = M.sizes_in(cfg.models)
    head, other_dtypes = cfg.dtypes[0], cfg.dtypes[1:]
    equiv_dtypes = cfg.equiv_dtypes or cfg.dtypes
    big = sorted([b for b in cfg.batches if b > 1], reverse=True) or sorted(cfg.batches, reverse=True)
    one = [b for b in cfg.batches if b not in big]
    eager_modes = [m for m in cfg.modes if not _parse_mode(m)[2]]
    comp_modes = [m for m in cfg.modes if _parse_mode(m)[2]]
    swin_eager = ["eager"]
    swin_comp = ["compile"] if comp_modes else []
    op_backends_main = [b for b in cfg.op_backends if b != "reference_compiled"]

    def infer(size, dtype, batch, modes, swin_modes, anchor=False, only=None):
        n, c = _count_members(cfg, size, modes, swin_modes, only)
        if n == 0:
            return
        what = (", ".join(M.label(o) for o in only) + " " if only else f"{M.SIZE_LETTER.get(size, size)} ")
        tasks.append(Task(f"inference {what}{DTYPE_NAMES[dtype]} b{batch} "
                          f"[{', '.join(modes)}; swin {', '.join(swin_modes) or '-'}]",
                          _infer_est(run, n, c, batch),
                          lambda r: task_inference(r, size, dtype, batch, modes, swin_modes, anchor, only)))

    def compiled(size, dtype, batch):  # one task per model: the budget can keep some of them
        cm = ["eager"] + comp_modes
        order = sorted([n for n in cfg.models if M.size_of(n) == size],
                       key=lambda n: (M.is_swin(n), not n.endswith("_srf"), n))
        order = order[:1] + [n for n in order[1:] if M.is_swin(n)] + [n for n in order[1:] if not M.is_swin(n)]
        for name in order:
            infer(size, dtype, batch, cm, ["eager"] + swin_comp, anchor=True, only=[name])

    def equiv(size, dtype):
        if any(M.size_of(n) == size and M.fused_capable(n) for n in cfg.models):
            tasks.append(Task(f"equivalence {M.SIZE_LETTER.get(size, size)} {DTYPE_NAMES[dtype]}", 8.0,
                              lambda r: task_equivalence(r, size, dtype, cfg.equiv_batch)))

    def train(size):
        if cfg.train:
            n, _ = _count_members(cfg, size, [m for m in eager_modes], ["eager"])
            tasks.append(Task(f"training {M.SIZE_LETTER.get(size, size)} {DTYPE_NAMES[head]} b{cfg.train_batch}",
                              10.0 + n * (4 + cfg.reps * max(cfg.rep_target_s, 0.05) * 1.5),
                              lambda r: task_training(r, size, head, cfg.train_batch, eager_modes)))

    def op(size, backends, dtype, label):
        if size in cfg.op_sizes and backends:
            n = len(cfg.op_levels) * len(cfg.op_directions) * cfg.op_stages * len(backends)
            est = n * (0.4 if run.device.type == "cuda" else 0.1) + (
                n * cfg.compile_est_s / 6
                if "reference_compiled" in backends else 10.0)
            tasks.append(Task(f"op {M.SIZE_LETTER.get(size, size)} {DTYPE_NAMES[dtype]} B={cfg.op_batch} {label}",
                              est, lambda r: task_op(r, size, dtype, backends, cfg.op_directions)))

    tasks.append(Task("bandwidth", 5.0, task_bandwidth))
    first, rest = sizes[:1], sizes[1:]
    op_dtype = cfg.op_dtypes[0] if cfg.op_dtypes else head
    def infer_and_equiv(s):   # the large batches in the head dtype, equivalence in every dtype
        for i, b in enumerate(big):
            infer(s, head, b, eager_modes, swin_eager)
            if i == 0:
                equiv(s, equiv_dtypes[0])
        for d in equiv_dtypes[1:]:
            equiv(s, d)

    for s in first:                                   # the essentials (what --quick keeps)
        op(s, op_backends_main, op_dtype, "[" + ", ".join(op_backends_main) + "]")
        if run.device.type == "cuda" and s in cfg.op_sizes:
            tasks.append(Task(f"tail {DTYPE_NAMES[op_dtype]} B={cfg.op_batch}", 6.0 + 2.0 * cfg.op_stages,
                              lambda r: task_tail(r, op_dtype)))
        infer_and_equiv(s)
        train(s)
        if comp_modes and big:
            compiled(s, head, big[0])
    for s in rest:                                    # the other sizes
        infer_and_equiv(s)
    for s in rest:
        op(s, op_backends_main, op_dtype, "[" + ", ".join(op_backends_main) + "]")
    for s in rest:
        train(s)
    for d in other_dtypes:                            # fp16
        for s in sizes:
            if big:
                infer(s, d, big[0], eager_modes, swin_eager)
    for s in sizes:                                   # batch 1 (launch-bound)
        for b in one:
            infer(s, head, b, eager_modes, swin_eager)
    if comp_modes:
        for s in rest:
            if big:
                compiled(s, head, big[0])
    if "reference_compiled" in cfg.op_backends:
        for s in sizes:
            op(s, ["reference_compiled"], op_dtype, "[reference_compiled]")
    if not cfg.exhaustive:
        return tasks
    for d in other_dtypes:                            # what is left of the matrix
        for s in sizes:
            for b in big[1:]:
                infer(s, d, b, eager_modes, swin_eager)
            for b in one:
                infer(s, d, b, eager_modes, swin_eager)
    if comp_modes:
        for s in sizes:
            for b in big[1:] + one:
                compiled(s, head, b)
            for d in other_dtypes:
                for b in big + one:
                    compiled(s, d, b)
    for d in cfg.op_dtypes[1:]:
        for s in sizes:
            op(s, op_backends_main, d, "[" + ", ".join(op_backends_main) + "]")
    return tasks


def plan_cpu(run: Run) -> List[Task]:
    """No GPU: FocalNet-T SRF/LRF eager vs fused-ctx vs fused vs Swin-T: inference, a training step
    (not with --quick), equivalence, and the op."""
    cfg = run.cfg
    tasks = [Task("bandwidth", 3.0, task_bandwidth)]
    for s in M.sizes_in(cfg.models):
        for d in cfg.dtypes:
            for b in cfg.batches:
                n, _ = _count_members(cfg, s, cfg.modes, ["eager"])
                per_call = (0.05 if cfg.tiny else 0.45) * b  # FocalNet-T fp32 on 2 cores: ~0.4 s per image
                tasks.append(Task(f"inference {M.SIZE_LETTER.get(s, s)} {DTYPE_NAMES[d]} b{b} "
                                  f"[{', '.join(cfg.modes)}; swin eager]", 5.0 + n * (cfg.reps + 3) * per_call,
                                  lambda r, s=s, d=d, b=b: task_inference(r, s, d, b, cfg.modes, ["eager"])))
            tasks.append(Task(f"equivalence {M.SIZE_LETTER.get(s, s)} {DTYPE_NAMES[d]}", 5.0,
                              lambda r, s=s, d=d: task_equivalence(r, s, d, cfg.equiv_batch)))
        if cfg.train:   # eager modes only (no compile on the CPU suite)
            modes = [m for m in cfg.modes if not _parse_mode(m)[2]]
            n, _ = _count_members(cfg, s, modes, ["eager"])
            per_step = (0.02 if cfg.tiny else 0.2) * cfg.train_batch   # eager FocalNet-T: ~0.2 s per image
            tasks.append(Task(f"training {M.SIZE_LETTER.get(s, s)} fp32 b{cfg.train_batch}",
                              5.0 + n * (cfg.reps + 2) * per_step,
                              lambda r, s=s, modes=modes: task_training(r, s, torch.float32, cfg.train_batch, modes)))
        if s in cfg.op_sizes:
            for d in cfg.op_dtypes:
                tasks.append(Task(f"op {M.SIZE_LETTER.get(s, s)} {DTYPE_NAMES[d]} B={cfg.op_batch}", 20.0,
                                  lambda r, s=s, d=d: task_op(r, s, d, cfg.op_backends, cfg.op_directions)))
    tasks += _peer_tasks(cfg)
    return tasks


def _peer_tasks(cfg: Config) -> List[Task]:
    """After the main tasks: our eager and fused model beside torch.compile (Inductor, freezing) and
    ONNX Runtime of the eager model (and Swin's peers), one interleaved group per size and batch."""
    if not cfg.peer_modes or not cfg.peer_models:
        return []
    tasks = []
    for s in M.sizes_in(cfg.peer_models):
        n, c = _count_members(cfg, s, cfg.peer_modes, cfg.peer_swin_modes, only=cfg.peer_models)
        for d in cfg.dtypes[:1]:
            for b in cfg.batches:
                per_call = (0.05 if cfg.tiny else 0.45) * b
                est = 5.0 + n * (cfg.reps + 3) * per_call + c * cfg.compile_est_s
                tasks.append(Task(
                    f"peers {M.SIZE_LETTER.get(s, s)} {DTYPE_NAMES[d]} b{b} [{', '.join(cfg.peer_modes)}"
                    + (f"; swin {', '.join(cfg.peer_swin_modes)}" if cfg.peer_swin_modes else "") + "]", est,
                    lambda r, s=s, d=d, b=b: task_inference(r, s, d, b, cfg.peer_modes, cfg.peer_swin_modes,
                                                            anchor_equivalence=True, only=cfg.peer_models)))
    return tasks


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------
def _configure_torch(cfg: Config) -> None:
    import torch._dynamo.config as dcfg
    for attr in ("recompile_limit", "cache_size_limit"):  # one compiled code object serves many models
        if hasattr(dcfg, attr):
            setattr(dcfg, attr, max(64, getattr(dcfg, attr)))
    if hasattr(dcfg, "accumulated_recompile_limit"):
        dcfg.accumulated_recompile_limit = max(1024, dcfg.accumulated_recompile_limit)
    if cfg.device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def print_plan(cfg: Config) -> None:
    """The tasks in priority order with their estimates, and which ones the budget would keep."""
    run = Run(cfg)
    plan = plan_gpu(run) if cfg.suite == "gpu" else plan_cpu(run)
    t = 0.0
    budget = math.inf if cfg.budget_s is None else cfg.budget_s
    print(f"{cfg.suite} plan, budget {'none' if cfg.budget_s is None else f'{cfg.budget_s:.0f} s'}, "
          f"compile estimate {cfg.compile_est_s:.0f} s:")
    for task in plan:
        keep = t + task.est_s + (10.0 if cfg.budget_s is not None else 0.0) <= budget
        t += task.est_s if keep else 0.0
        print(f"  {'run ' if keep else 'skip'} {task.est_s:6.0f} s  (cum {t:6.0f} s)  {task.name}")


def run_suite(cfg: Config, env: Dict, on_progress: Optional[Callable[[Dict], None]] = None) -> Dict:
    """Run the plan of cfg.suite; on_progress(partial results) is called after every task."""
    _configure_torch(cfg)
    run = Run(cfg)
    plan = plan_gpu(run) if cfg.suite == "gpu" else plan_cpu(run)
    log(f"focalnet-bench: {cfg.suite} suite{' (quick)' if cfg.quick else ''}{' (dry run)' if cfg.dry_run else ''} "
        f"on {env.get('device_name')}, {len(plan)} tasks, budget "
        f"{'none' if cfg.budget_s is None else f'{cfg.budget_s:.0f} s'}")
    reserve = 10.0 if cfg.budget_s is not None else 0.0
    interrupted = False
    for task in plan:
        if interrupted:
            run.skip(task.name, "interrupted")
            run.results["sections"].append(dict(name=task.name, status="skipped", est_s=task.est_s,
                                                reason="interrupted"))
            continue
        if not run.budget.allows(task.est_s + reserve):
            reason = f"time budget: {run.budget.left():.0f} s left, task needs ~{task.est_s:.0f} s"
            run.skip(task.name, reason)
            run.results["sections"].append(dict(name=task.name, status="skipped", est_s=task.est_s, reason=reason))
            log(f"[{run.budget.elapsed():7.1f} s] skip {task.name}: {reason}")
            continue
        log(f"[{run.budget.elapsed():7.1f} s] {task.name} (est {task.est_s:.0f} s)")
        t0 = time.perf_counter()
        status, reason = "ok", None
        run.current_task = task.name
        try:
            task.fn(run)
        except KeyboardInterrupt:  # timeout -s INT: keep what was measured, write it out
            status, reason, interrupted = "interrupted", "KeyboardInterrupt (SIGINT)", True
            log(f"    ! {task.name} interrupted: writing what was measured")
        except Exception as e:  # one broken section must not lose the others
            status, reason = ("oom" if is_oom(e) else "error"), short_exc(e, 1000)
            log(f"    ! {task.name} failed: {reason}")
            free_memory(cfg.device)
        dt = time.perf_counter() - t0
        run.results["sections"].append(dict(name=task.name, status=status, est_s=task.est_s, elapsed_s=dt,
                                            reason=reason))
        log(f"[{run.budget.elapsed():7.1f} s] done {task.name}: {dt:.1f} s")
        if on_progress is not None:
            try:
                on_progress(assemble(run, env, partial=True))
            except Exception as e:  # a progress write must never stop the run
                log(f"    ! progress write failed: {short_exc(e)}")
    run.drop_models()
    return assemble(run, env, partial=False)


def assemble(run: Run, env: Dict, partial: bool) -> Dict:
    cfg = run.cfg
    return dict(schema=SCHEMA, partial=partial, suite=cfg.suite, quick=cfg.quick, dry_run=cfg.dry_run,
                tiny=cfg.tiny, env=env, config=cfg.describe(),
                device=dict(type=cfg.device.type, name=env.get("device_name"), driver=env.get("driver")),
                dtype=[DTYPE_NAMES[d] for d in cfg.dtypes], batch=cfg.batches,
                swin_source=M.swin_source(),
                timing=dict(
                    models="CUDA events around `iters` back-to-back calls per sample; warm-up and compile "
                           "excluded; members of a group interleaved per repetition; inputs rotated over buffers "
                           "exceeding 2x L2" if cfg.device.type == "cuda" else
                           "synchronised wall clock around `iters` calls per sample; warm-up excluded; members "
                           "interleaved per repetition",
                    op="per-call CUDA events, L2 flushed (256 MB overwrite) before each call; input sets rotated"
                       if cfg.device.type == "cuda" else "per-call wall clock"),
                op_floor=dict(formulas=op_bench.FLOOR_FORMULAS, backends=op_bench.BACKEND_NOTES),
                loadavg_end=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                total_elapsed_s=run.budget.elapsed(), **run.results)
