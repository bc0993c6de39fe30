"""Compile report of the Triton kernels, without a GPU.

``python -m focalnet_kernels.report [--arch 80,90] [--filter SUBSTR] [--jobs N] [--json]``

Compiles every entry of ``REPORT_KERNELS`` of ``focalnet_kernels.triton.focal_context_fwd`` and
(if importable) ``focalnet_kernels.triton.focal_context_bwd`` (format: see the docstring of
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

MODULES = ("focalnet_kernels.triton.focal_context_fwd", "focalnet_kernels.triton.focal_context_bwd")
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="80,90", help="comma separated compute capabilities")
    ap.add_argument("--filter", default=None, help="only kernels/configs containing this")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print the rows as one JSON line")
    ap.add_argument("--select-json", default=None, help="JSON list of '<name> @ <config>'")
    ap.add_argument("--modules", default=None, help="comma separated module names")
    a = ap.parse_args(argv)
    archs = tuple(int(x) for x in a.arch.split(","))
    select = json.loads(a.select_json) if a.select_json else None
    modules = a.modules.split(",") if a.modules else None
    rows = collect(archs, a.filter, a.jobs, select, modules)
    if a.json:
        print(json.dumps(rows))
    else:
        print(toolchain(archs))
        print(format_table(rows))
        print("regs/stack/local/smem: cuobjdump -res-usage (smem adds Triton's dynamic shared "
              "memory); stack or local > 0 = spills.\nLDG128: 16-byte global loads / all global "
              "loads in the SASS (static count); LDG<128: the others by width; hot: 16B when >= 75% "
              "of the loads are 16-byte, mixed >= 50%, else narrow.")
    return 0 if all(r.get("ok") is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
