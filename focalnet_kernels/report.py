"""Compile report of the Triton kernels, without a GPU.

``python -m focalnet_kernels.report [--arch 80,90] [--filter SUBSTR] [--jobs N] [--json]``

Compiles every entry of ``REPORT_KERNELS`` of ``focalnet_kernels.triton.focal_context_fwd``,
``focal_context_bwd`` and ``modulation_tail`` (format: see the docstring of
focal_context_fwd.py) for sm_80 and sm_90 with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))``, dumps each cubin to a temp file and runs the ``cuobjdump``
shipped in Triton's wheel (``-res-usage``, ``-sass``).  Per kernel x config x arch it prints:
registers, stack and local bytes (local > 0 means spills), shared memory (dynamic, from Triton's
metadata, + static), and the global loads by width (LDG.*.128 = 16-byte vectors).

``collect()`` returns the rows as dicts (used by the tests).  Compiling needs the real
``triton.jit`` functions, so when TRITON_INTERPRET is set in this process (e.g. by an interpreter
test) the work runs in a subprocess with TRITON_INTERPRET removed from its environment.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import warnings

MODULES = ("focalnet_kernels.triton.focal_context_fwd", "focalnet_kernels.triton.focal_context_bwd",
           "focalnet_kernels.triton.modulation_tail")
ARCHS = (80, 90)

_LDG_RE = re.compile(r"\bLDG(\.[A-Z0-9_]+)*")
_STG_RE = re.compile(r"\bSTG(\.[A-Z0-9_]+)*")
_RES_RE = re.compile(r"Function\s+(\S+):\s*\n\s*(.*)")


def _interpret_env(env=None):
    env = os.environ if env is None else env
    return env.get("TRITON_INTERPRET", "0") not in ("", "0")


def _load_entries(errors, modules=None):
    """[(module name, index, entry)] for every importable module exporting REPORT_KERNELS."""
    out = []
    for mod in modules or MODULES:
        try:
            m = importlib.import_module(mod)
        except Exception as e:  # the bwd module may not exist yet / fail to import
            errors.append(f"{mod}: not importable ({type(e).__name__}: {e})")
            continue
        entries = getattr(m, "REPORT_KERNELS", None)
        if entries is None:
            errors.append(f"{mod}: no REPORT_KERNELS")
            continue
        out.extend((mod, i, e) for i, e in enumerate(entries))
    return out


def _width(op):
    """Bytes per thread of an LDG/STG opcode string such as 'LDG.E.128' or 'LDG.E.U16'."""
    parts = op.split(".")
    for p in parts[1:]:
        if p in ("128", "64"):
            return int(p) // 8
        if p in ("U8", "S8"):
            return 1
        if p in ("U16", "S16", "16"):
            return 2
    return 4


def _parse_sass(sass):
    # keys are byte widths as strings (rows go through JSON)
    loads = {"16": 0, "8": 0, "4": 0, "2": 0, "1": 0}
    stores = dict(loads)
    for line in sass.splitlines():
        if "/*" not in line:
            continue
        code = line.split("*/", 1)[-1]
        m = _LDG_RE.search(code)
        if m:
            loads[str(_width(m.group(0)))] += 1
        m = _STG_RE.search(code)
        if m:
            stores[str(_width(m.group(0)))] += 1
    return loads, stores


def _parse_res(text, name):
    for fn, rest in _RES_RE.findall(text):
        if fn == name or not name:
            vals = dict(re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", rest))
            return {k: int(v) for k, v in vals.items()}
    return {}


def _cuobjdump():
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _compile_task(task):
    """Worker: compile REPORT_KERNELS[idx] of module `mod` for `arch`; return one row."""
    mod, idx, arch = task
    warnings.filterwarnings("ignore")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    entry = importlib.import_module(mod).REPORT_KERNELS[idx]
    fn = entry["fn"]
    row = {"module": mod.rsplit(".", 1)[-1], "kernel": entry["name"], "config": _label(entry),
           "arch": arch, "ok": False}
    try:
        sig = {}
        for a in fn.arg_names:
            if a in entry["constexprs"]:
                sig[a] = "constexpr"
            elif a in entry["signature"]:
                sig[a] = entry["signature"][a]
            else:
                raise KeyError(f"argument {a!r} is in neither signature nor constexprs")
        attrs = {(fn.arg_names.index(k),): v for k, v in (entry.get("attrs") or {}).items()}
        src = ASTSource(fn, sig, dict(entry["constexprs"]), attrs)
        opts = {"num_warps": entry.get("num_warps", 4), "num_stages": entry.get("num_stages", 3)}
        ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
        cubin = ck.asm["cubin"]
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "k.cubin")
            with open(path, "wb") as f:
                f.write(cubin)
            tool = _cuobjdump()
            res = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True,
                                 check=True).stdout
            sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True,
                                  check=True).stdout
        r = _parse_res(res, ck.metadata.name)
        loads, stores = _parse_sass(sass)
        row.update(
            ok=True,
            regs=r.get("REG", -1),
            stack=r.get("STACK", -1),
            local=r.get("LOCAL", -1),
            smem=int(ck.metadata.shared) + r.get("SHARED", 0),
            ldg=loads,
            stg=stores,
            ldg128=loads["16"],
            ldg_narrow=sum(v for k, v in loads.items() if k != "16"),
            num_warps=entry.get("num_warps", 4),
        )
        row["spill_bytes"] = row["local"] + row["stack"]
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"[:2000]
    return row


def _label(entry):
    """The entry's "config" label, or one made from its BLOCK-ish constexprs and num_warps."""
    if entry.get("config"):
        return str(entry["config"])
    cx = entry.get("constexprs", {})
    keys = [k for k in cx if k.startswith(("TILE", "BLOCK"))]
    return " ".join([f"{k}={cx[k]}" for k in keys] + [f"w{entry.get('num_warps', 4)}",
                                                      f"s{entry.get('num_stages', 3)}"])


def entry_key(entry):
    """'<name> @ <config>': how `select` names one REPORT_KERNELS entry."""
    return f"{entry['name']} @ {_label(entry)}"


def _collect_here(archs, filt, jobs, select=None, modules=None):
    errors = []
    sel = set(select) if select is not None else None
    # an entry may name the archs it is meant for ("archs", e.g. the 1x1-map specialisations)
    tasks = [(mod, i, a) for mod, i, e in _load_entries(errors, modules)
             if (not filt or filt in e["name"] or filt in _label(e))
             and (sel is None or entry_key(e) in sel) for a in archs
             if a in e.get("archs", archs)]
    if jobs > 1 and len(tasks) > 1:
        import multiprocessing as mp
        ctx = mp.get_context("fork")
        with ctx.Pool(min(jobs, len(tasks))) as pool:
            rows = pool.map(_compile_task, tasks, chunksize=1)
    else:
        rows = [_compile_task(t) for t in tasks]
    for e in errors:
        rows.append({"module": "-", "kernel": e, "config": "", "arch": 0, "ok": None})
    return rows


def collect(archs=ARCHS, filt=None, jobs=2, select=None, modules=None, timeout=900):
    """Compile and inspect; returns a list of row dicts (one per kernel x config x arch; rows
    with ok=None are notes such as 'bwd module not importable', ok=False carry 'error').

    filt: substring of name/config; select: iterable of entry_key() strings; modules: module
    names to read REPORT_KERNELS from (default: fwd and bwd).  Row keys: module, kernel, config,
    arch, ok, regs, stack, local, spill_bytes, smem, ldg / stg ({bytes: count}), ldg128,
    ldg_narrow, num_warps, error."""
    archs = tuple(archs)
    if not _interpret_env():
        return _collect_here(archs, filt, jobs, select, modules)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "focalnet_kernels.report", "--json", "--jobs", str(jobs),
           "--arch", ",".join(map(str, archs))]
    if filt:
        cmd += ["--filter", filt]
    if select is not None:
        cmd += ["--select-json", json.dumps(list(select))]
    if modules:
        cmd += ["--modules", ",".join(modules)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=root)
    if p.returncode != 0:
        raise RuntimeError(f"report subprocess failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def toolchain(archs=ARCHS):
    """'triton 3.9.0; sm_80: ptxas 12.9 ...' -- the assembler decides registers and spills, and
    Triton picks a different ptxas per arch (and per release)."""
    import triton
    parts = [f"triton {triton.__version__}"]
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        for a in archs:
            tool = get_ptxas(a)
            out = subprocess.run([tool.path, "--version"], capture_output=True, text=True).stdout
            ver = re.search(r"release ([\d.]+)", out)
            parts.append(f"sm_{a}: {os.path.basename(tool.path)} {ver.group(1) if ver else '?'}")
    except Exception as e:  # report the table anyway
        parts.append(f"ptxas unknown ({type(e).__name__})")
    return "; ".join(parts)


def format_table(rows):
    hdr = ("kernel", "config", "sm", "regs", "stack", "local", "smem", "LDG128", "LDG<128", "hot")
    lines = []
    body = []
    for r in rows:
        if r.get("ok") is None:
            continue
        if not r["ok"]:
            body.append((r["kernel"], r["config"], str(r["arch"]), "ERROR", "", "", "", "", "",
                         r.get("error", "")[:60]))
            continue
        total = r["ldg128"] + r["ldg_narrow"]
        frac = r["ldg128"] / total if total else 0.0
        hot = "16B" if frac >= 0.75 else "mixed" if frac >= 0.5 else "narrow"
        narrow = "/".join(f"{r['ldg'][k]}x{k}B" for k in ("8", "4", "2", "1") if r["ldg"][k])
        body.append((r["kernel"], r["config"], str(r["arch"]), str(r["regs"]), str(r["stack"]),
                     str(r["local"]), str(r["smem"]), f"{r['ldg128']}/{total}", narrow or "-", hot))
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(hdr)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines.append(fmt.format(*hdr))
    lines.append(fmt.format(*("-" * w for w in widths)))
    lines.extend(fmt.format(*b) for b in body)
    notes = [r["kernel"] for r in rows if r.get("ok") is None]
    lines.extend(f"note: {n}" for n in notes)
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--predict" in argv:
        # the static H100 cost model (focalnet_kernels/cost_model.py, docs/cost-model.md): predicted
        # time per backend x direction x stage x dtype from the compiled SASS; its own options follow
        from .cost_model import main as predict_main
        return predict_main([a for a in argv if a != "--predict"])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--predict", action="store_true",
                    help="print the cost model's predictions instead (python -m focalnet_kernels.cost_model -h)")
    ap.add_argument("--compile-count", action="store_true",
                    help="only the number of kernel variants the GPU tests and the op benchmark compile")
    ap.add_argument("--arch", default="80,90", help="comma separated compute capabilities")
    ap.add_argument("--filter", default=None, help="only kernels/configs containing this")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print the rows as one JSON line")
    ap.add_argument("--select-json", default=None, help="JSON list of '<name> @ <config>'")
    ap.add_argument("--modules", default=None, help="comma separated module names")
    a = ap.parse_args(argv)
    if a.compile_count:
        print(compile_count_summary())
        return 0
    archs = tuple(int(x) for x in a.arch.split(","))
    select = json.loads(a.select_json) if a.select_json else None
    modules = a.modules.split(",") if a.modules else None
    rows = collect(archs, a.filter, a.jobs, select, modules)
    if a.json:
        print(json.dumps(rows))
    else:
        print(toolchain(archs))
        print(format_table(rows))
        print(compile_count_summary())
        print(scratch_summary())
        print("regs/stack/local/smem: cuobjdump -res-usage (smem adds Triton's dynamic shared "
              "memory); stack or local > 0 = spills.\nLDG128: 16-byte global loads / all global "
              "loads in the SASS (static count); LDG<128: the others by width; hot: 16B when >= 75% "
              "of the loads are 16-byte, mixed >= 50%, else narrow.")
    return 0 if all(r.get("ok") is not False for r in rows) else 1



# ----------------------------------------------------------------------------------------------
# compile count: how many kernel variants Triton compiles for a set of calls
# ----------------------------------------------------------------------------------------------
# The calls of tests/test_triton_gpu.py (a copy: keep in step with that file) and of the op
# benchmark (FocalNet-T stage shapes, B = 256, slice views of the f output as in op_bench).
# (B, H, W, C, kernel sizes, dtype name, ctx layout, grad_out layout, backward)
def _gpu_test_calls():
    out = []
    dts = ("float32", "float16", "bfloat16")
    for dt in dts:
        for L in (1, 2, 3, 4):
            out.append((2, 13, 17, 64, [3 + 2 * i for i in range(L)], dt, "contig", "contig", True))
    for H, W, C in ((56, 56, 96), (28, 28, 192), (14, 14, 384), (7, 7, 768), (7, 9, 20)):
        out.append((2, H, W, C, [3, 5, 7], "bfloat16", "contig", "contig", True))
    for lay, glay in (("slice", "chfirst"), ("chfirst", "slice"), ("offset1", "contig")):
        for dt in dts:
            out.append((2, 13, 17, 64, [3, 5, 7], dt, lay, glay, True))
    for ks in ((9, 11, 13), (9, 11, 13, 15), (5, 7, 9)):
        out.append((1, 30, 41, 64, list(ks), "bfloat16", "contig", "contig", True))
    for dt in ("float32", "bfloat16"):
        out.append((2, 13, 15, 12, [3, 5], dt, "contig", "contig", True))
    out.append((2050, 64, 64, 256, [3], "float16", "contig", "contig", True))
    for dt in dts:
        out.append((4, 56, 56, 96, [3, 5, 7], dt, "slice", "contig", True))
    for dt in ("bfloat16", "float16"):  # the fused model, forward only
        for H, C in ((56, 96), (28, 192), (14, 384), (7, 768)):
            out.append((4, H, H, C, [3, 5, 7], dt, "slice", "contig", False))
    return out


def _bench_calls():
    return [(256, H, H, C, ks, dt, "slice", "contig", True)
            for H, C in ((56, 96), (28, 192), (14, 384), (7, 768))
            for dt in ("bfloat16", "float32") for ks in ([3, 5], [3, 5, 7])]


def _meta_view(B, H, W, C, L, dtype, layout):
    import torch
    dt = getattr(torch, dtype)
    if layout == "slice":
        y = torch.empty(B, H, W, 2 * C + L + 1, dtype=dt, device="meta")
        return y[..., C:2 * C], y[..., 2 * C:]
    if layout == "chfirst":
        return (torch.empty(B, C, H, W, dtype=dt, device="meta").permute(0, 2, 3, 1),
                torch.empty(B, L + 1, H, W, dtype=dt, device="meta").permute(0, 2, 3, 1))
    if layout == "offset1":
        y = torch.empty(B, H, W, C + L + 2, dtype=dt, device="meta")
        return y[..., 1:1 + C], y[..., 1 + C:]
    return (torch.empty(B, H, W, C, dtype=dt, device="meta"),
            torch.empty(B, H, W, L + 1, dtype=dt, device="meta"))


_TRITON_DT = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16",
              "torch.int32": "i32"}


def _arg_key(v, dns):
    """Triton's specialisation of one runtime argument (runtime/jit.py, native_specialize_impl):
    tensors by dtype and 16-byte alignment, ints by width and (unless do_not_specialize) == 1 or
    divisible by 16, floats not at all."""
    import torch
    if isinstance(v, torch.Tensor):
        return ("*" + _TRITON_DT.get(str(v.dtype), str(v.dtype)),
                (v.storage_offset() * v.element_size()) % 16 == 0)
    if isinstance(v, bool):
        return ("u1",)
    if isinstance(v, int):
        ty = "i32" if -2**31 <= v < 2**31 else "i64"
        if dns:
            return (ty,)
        return (ty, "1" if v == 1 else "D" if v % 16 == 0 else "")
    return ("fp32",)


def _variants_of(kernel, args, kwargs, pinned=False):
    """(compile keys, autotune key or None) of one launch; pinned: autotuned kernels run their
    first config only (FOCALNET_TRITON_AUTOTUNE=0 or deterministic mode)."""
    from focalnet_kernels.triton import focal_context_bwd as bwd
    from focalnet_kernels.triton import focal_context_fwd as fwd
    tuner = heur = None
    fn = kernel
    while type(fn).__name__ in ("Autotuner", "Heuristics"):
        if type(fn).__name__ == "Autotuner":
            tuner = fn
        else:
            heur = fn
        fn = fn.fn
    nargs = dict(zip(fn.arg_names, args))
    nargs.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
    opts = {k: v for k, v in kwargs.items() if k not in fn.arg_names}
    if tuner is None:
        cfgs = [({}, opts.get("num_warps", 4), opts.get("num_stages", 3))]
        tkey = None
    else:
        import triton
        if fn is bwd._raw(fwd._fwd_local):
            configs = fwd._prune(fwd._GPU_CONFIGS, nargs)
        else:
            configs = [triton.Config({"TILE_H": th, "TILE_W": tw, "BLOCK_C": bc}, num_warps=nw,
                                     num_stages=bwd._NUM_STAGES)
                       for th, tw, bc, nw in bwd._GPU_TILE_CONFIGS]
            if fn is bwd._raw(bwd._bwd_step_kernel):
                configs = bwd._prune_step(configs, nargs)
        cfgs = [(c.kwargs, c.num_warps, c.num_stages) for c in configs]
        if pinned:
            cfgs = cfgs[:1]
        tkey = (fn.__name__,) + tuple(nargs[k] for k in tuner.keys if k in nargs) + tuple(
            str(v.dtype) for v in nargs.values() if hasattr(v, "dtype"))
    keys = set()
    for ckw, nw, ns in cfgs:
        cx = {**{k: v for k, v in nargs.items() if k in fn.arg_names
                 and fn.params[fn.arg_names.index(k)].is_constexpr}, **ckw}
        if heur is not None:
            full = {**nargs, **ckw}
            for name, f in heur.values.items():
                cx[name] = f(full)
                full[name] = cx[name]
        spec = tuple(_arg_key(nargs[p.name], p.do_not_specialize) for p in fn.params
                     if not p.is_constexpr and p.name in nargs)
        keys.add((fn.__name__, spec, tuple(sorted((k, str(v)) for k, v in cx.items())), nw, ns))
    return keys, tkey


def compile_count(calls, pinned=False):
    """{"variants": distinct compiled kernels, "autotune_keys": distinct autotune runs, per kernel}
    for the calls, by recording the launchers' launches on meta tensors (nothing runs).  Under
    TRITON_INTERPRET the kernels are not JITFunctions: counted in a subprocess without it."""
    if _interpret_env():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        code = ("import json, sys; from focalnet_kernels import report; "
                "r = report.compile_count(json.loads(sys.argv[1]), sys.argv[2] == '1'); "
                "r.pop('keys'); print(json.dumps(r))")
        p = subprocess.run([sys.executable, "-c", code, json.dumps(calls), "1" if pinned else "0"],
                           capture_output=True, text=True, env=env, cwd=root, timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"compile count subprocess failed:\n{p.stderr[-4000:]}")
        return json.loads(p.stdout.strip().splitlines()[-1])
    return _compile_count_here(calls, pinned)


def _compile_count_here(calls, pinned):
    import torch
    from focalnet_kernels.triton import focal_context_bwd as bwd
    from focalnet_kernels.triton import focal_context_fwd as fwd
    keys, tkeys = set(), set()

    def hook(kernel, grid, args, kwargs):
        k, t = _variants_of(kernel, args, kwargs, pinned)
        keys.update(k)
        if t is not None:
            tkeys.add(t)
    saved = fwd._LAUNCH_HOOK
    fwd._LAUNCH_HOOK = hook
    try:
        for B, H, W, C, ks, dt, lay, glay, backward in calls:
            ctx, gates = _meta_view(B, H, W, C, len(ks), dt, lay)
            weights = [torch.empty(C, k, k, device="meta") for k in ks]
            fwd.focal_context_fwd_triton(ctx, gates, weights, False)
            if backward:
                gout = (_meta_view(B, H, W, C, 0, dt, "chfirst")[0] if glay == "chfirst" else
                        torch.empty(B, H, W, 2 * C, dtype=ctx.dtype, device="meta")[..., C:]
                        if glay == "slice" else torch.empty_like(ctx, memory_format=torch.contiguous_format))
                bwd.focal_context_bwd_triton(gout, ctx, gates, weights,
                                             torch.empty(B, C, device="meta"), False)
    finally:
        fwd._LAUNCH_HOOK = saved
    per = {}
    for k in keys:
        per[k[0]] = per.get(k[0], 0) + 1
    return {"variants": len(keys), "autotune_keys": len(tkeys), "per_kernel": per, "keys": keys}


def compile_count_summary():
    tests, bench = _gpu_test_calls(), _bench_calls()
    t, b, both = compile_count(tests), compile_count(bench), compile_count(tests + bench)
    lines = [f"compiled Triton variants (from the specialisation keys; target <= 60): "
             f"GPU tests {t['variants']} ({t['autotune_keys']} autotune runs), "
             f"benchmark {b['variants']} ({b['autotune_keys']} autotune runs), "
             f"both {both['variants']}",
             "  with FOCALNET_TRITON_AUTOTUNE=0 (first config only): GPU tests "
             f"{compile_count(tests, True)['variants']}, benchmark {compile_count(bench, True)['variants']}",
             "  per kernel (both): " + ", ".join(f"{k} {v}" for k, v in sorted(both["per_kernel"].items()))]
    return "\n".join(lines)


def scratch_summary():
    from focalnet_kernels.triton import focal_context_fwd as fwd
    lines = ["forward scratch per call (H100: 132 SMs x 4 programs, budget "
             f"{fwd.SCRATCH_BUDGET_BYTES >> 20} MB per config):"]
    for B, H, W, C, ks in ((256, 56, 56, 96, [3, 5, 7]), (256, 56, 56, 96, [3, 5, 7, 9]),
                           (16, 200, 304, 256, [9, 11, 13, 15])):
        for dt in (2, 4):
            plan = fwd.scratch_plan(B, H, W, C, ks, elem_size=dt)
            lines.append(f"  B={B} {H}x{W}x{C} k={','.join(map(str, ks))} {'bf16' if dt == 2 else 'fp32'}: "
                         + "; ".join(f"{lab}: {n} programs, {nb / 2**20:.1f} MB" for lab, n, nb in plan))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
