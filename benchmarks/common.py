"""Shared helpers of the benchmark suite: environment record, time budget, timers, input buffers."""
from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch

#: L2 size assumed when the device does not report one (H100: 50 MB).
L2_DEFAULT_BYTES = 50 * 2 ** 20

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def median(xs: Sequence[float]) -> Optional[float]:
    return float(statistics.median(xs)) if xs else None


def parse_dtype(name: str) -> torch.dtype:
    key = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r} (use fp32, bf16 or fp16)")
    return DTYPES[key]


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------------
# time budget
# ------------------------------------------------------------------------------------------------
class Budget:
    """Wall-clock budget of a whole run. `None` seconds: unlimited."""

    def __init__(self, seconds: Optional[float]):
        self.t0 = time.perf_counter()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - self.elapsed()

    def allows(self, est_s: float) -> bool:
        return self.left() >= est_s


# ------------------------------------------------------------------------------------------------
# environment
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def env_var(name: str, value: Optional[str]) -> Iterator[None]:
    """Set (value) or unset (None) an environment variable for the duration of the block."""
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _find_git_dir(start: Path) -> Optional[Path]:
    for d in [start, *start.parents]:
        g = d / ".git"
        if g.is_dir():
            return g
        if g.is_file():  # worktree / submodule: "gitdir: <path>"
            txt = g.read_text(errors="replace").strip()
            if txt.startswith("gitdir:"):
                p = Path(txt.split(":", 1)[1].strip())
                return p if p.is_absolute() else (d / p).resolve()
    return None


def git_commit(start: Optional[Path] = None) -> Optional[str]:
    """HEAD commit: $FOCALNET_GIT_COMMIT if set (a copy of the tree without .git), else read from .git
    (no git process is run)."""
    if os.environ.get("FOCALNET_GIT_COMMIT"):
        return os.environ["FOCALNET_GIT_COMMIT"].strip()
    starts = [start] if start else [Path.cwd(), Path(__file__).resolve().parent]
    for s in starts:
        gd = _find_git_dir(Path(s).resolve())
        if gd is None:
            continue
        try:
            head = (gd / "HEAD").read_text().strip()
            if not head.startswith("ref:"):
                return head
            ref = head.split(":", 1)[1].strip()
            common = gd
            cd = gd / "commondir"
            if cd.is_file():
                common = (gd / cd.read_text().strip()).resolve()
            for base in (gd, common):
                f = base / ref
                if f.is_file():
                    return f.read_text().strip()
            for base in (gd, common):
                packed = base / "packed-refs"
                if packed.is_file():
                    for line in packed.read_text().splitlines():
                        parts = line.split()
                        if len(parts) == 2 and parts[1] == ref:
                            return parts[0]
            return None  # a branch without commits yet
        except OSError:
            continue
    return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _nvidia_driver() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0].strip()
    except Exception:
        pass
    try:  # fallback: the kernel module's version file
        return Path("/proc/driver/nvidia/version").read_text().split("Kernel Module")[1].split()[0]
    except Exception:
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_name()


def device_slug(device: torch.device, dry_run: bool = False) -> str:
    name = device_name(device)
    if device.type == "cpu":
        name = "cpu-" + name
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    slug = re.sub(r"-(r|tm)-", "-", slug)[:48].strip("-") or device.type
    return slug + ("-dryrun" if dry_run else "")


def l2_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        v = getattr(props, "L2_cache_size", None) or getattr(props, "l2_cache_size", None)
        if v:
            return int(v)
    return L2_DEFAULT_BYTES


def _version(mod: str) -> Optional[str]:
    try:
        m = __import__(mod)
        return str(getattr(m, "__version__", "?"))
    except Exception:
        return None


def _prog() -> str:
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "focalnet-bench"
    return "python -m benchmarks" if name in ("__main__.py", "-m", "-c", "") else name


def collect_env(device: torch.device, argv: Sequence[str]) -> Dict:
    env: Dict = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command_line": " ".join(shlex.quote(a) for a in [_prog(), *argv]),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "timm": _version("timm"),
        "transformers": _version("transformers"),
        "device_type": device.type,
        "device_name": device_name(device),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cuda_runtime": torch.version.cuda,
        "driver": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(driver=_nvidia_driver(), cudnn=torch.backends.cudnn.version(),
                   capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                   total_memory_bytes=int(props.total_memory), sm_count=int(props.multi_processor_count),
                   l2_bytes=l2_bytes(device),
                   cudnn_benchmark=bool(torch.backends.cudnn.benchmark),
                   matmul_allow_tf32=bool(torch.backends.cuda.matmul.allow_tf32),
                   cudnn_allow_tf32=bool(torch.backends.cudnn.allow_tf32))
    try:
        import focalnet_kernels
        env["focalnet_kernels"] = {"file": str(Path(focalnet_kernels.__file__).parent),
                                   "build_info": focalnet_kernels.build_info()}
    except Exception as e:  # the library may be missing or broken: the record says so
        env["focalnet_kernels"] = {"error": f"{type(e).__name__}: {e}"}
    env["env_vars"] = {k: os.environ[k] for k in sorted(os.environ)
                       if k.startswith(("FOCALNET_", "TRITON_INTERPRET", "TIMM_", "CUDA_VISIBLE"))}
    return env


# ------------------------------------------------------------------------------------------------
# timers
# ------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loop(fn: Callable[[], None], n: int, device: torch.device) -> float:
    """Seconds for n back-to-back calls of fn (CUDA events on GPU; synchronised wall clock on CPU)."""
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return time.perf_counter() - t0


def ab_samples(fa: Callable[[], object], fb: Callable[[], object], reps: int,
               warmup: int = 2) -> "tuple[List[float], List[float]]":
    """Interleaved A/B timing on the CPU: `warmup` calls of each, then `reps` single-call wall times
    of each, A first on even repetitions and B first on odd ones (so neither side always runs in the
    other's wake). Returns the two lists of seconds."""
    for _ in range(warmup):
        fa()
        fb()
    ta: List[float] = []
    tb: List[float] = []
    for r in range(reps):
        order = ((fa, ta), (fb, tb)) if r % 2 == 0 else ((fb, tb), (fa, ta))
        for fn, acc in order:
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return ta, tb


def wall(fn: Callable[[], None], device: torch.device) -> float:
    """Synchronised wall-clock seconds of one call (used for first calls: compile time)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


class L2Flusher:
    """Overwrites a buffer larger than L2 before each timed op call (as triton.testing.do_bench does).

    It also keeps the GPU busy while the CPU enqueues the call, so per-call events time the kernels,
    not Python's launch overhead."""

    def __init__(self, device: torch.device, nbytes: int = 256 * 2 ** 20):
        self.buf = torch.empty(nbytes // 4, dtype=torch.int32, device=device) if device.type == "cuda" else None

    def __call__(self) -> None:
        if self.buf is not None:
            self.buf.zero_()


def bench_calls(fn: Callable[[], None], device: torch.device, *, n: int, flush: Optional[L2Flusher] = None
                ) -> List[float]:
    """Per-call milliseconds of n calls (CUDA events around each call, L2 flushed before each)."""
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            if flush is not None:
                flush()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def n_buffers(one_bytes: int, l2: int, *, max_total: int = 2 ** 30, lo: int = 2, hi: int = 64) -> int:
    """How many input buffers to rotate so that together they exceed twice the L2 size."""
    n = max(lo, min(hi, math.ceil(2 * l2 / max(1, one_bytes))))
    return max(1, min(n, max(lo, max_total // max(1, one_bytes))))


def short_exc(e: BaseException, limit: int = 400) -> str:
    s = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return s if len(s) <= limit else s[: limit - 3] + "..."


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":  # on CPU reference counting frees the tensors; gc.collect costs ~0.1 s
        import gc
        gc.collect()
        torch.cuda.empty_cache()


def default_results_root() -> Path:
    """benchmarks/results of the repository the command runs in (or of this in-tree package)."""
    here = Path(__file__).resolve().parent
    cwd = Path.cwd()
    if (cwd / "benchmarks" / "__init__.py").is_file():  # run from the repository root
        return cwd / "benchmarks" / "results"
    if (here.parent / "pyproject.toml").is_file():      # an in-tree (editable) copy of the package
        return here / "results"
    return cwd / "focalnet-bench-results"
