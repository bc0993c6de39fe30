"""Static H100 cost model of the focal-context kernels, from their compiled sm_90 SASS.

``python -m focalnet_kernels.cost_model [--json] [--dtype float32,bfloat16] [--stage 1,2,3,4]``

A PREDICTION, not a measurement (docs/cost-model.md): the first GPU run calibrates it.

For every launch a backend makes for a configuration (FocalNet-T stage shapes, B = 256), the model
compiles the kernel for sm_90 (Triton: ``triton.compile(ASTSource(...))`` exactly as
focalnet_kernels/report.py does, cached on disk), disassembles it with line info
(``nvdisasm -g``), finds the SASS loops (backward branches), maps every SASS loop to the source
``for`` statement its instructions come from (line info + the Python AST of the kernel file as it
was compiled), evaluates that loop's trip count from the tile configuration and the shape, and
counts the issued warp-instructions per work item by class.  Per launch:

    time = max(issue, fp32 pipe, MUFU, ALU, LSU/L1, L2, HBM)    (the largest one is the "bound")

each term being the busiest SM's work divided by the per-SM rate of the H100 table ``H100``; a
configuration's prediction is the sum over its launches.  The floor beside it is notes section 4:
taps x elements at the fp32 FMA rate, and the minimal HBM bytes (read ctx and gates, write out;
backward: + grad_out in, grad_ctx and grad_gates out) at the HBM rate, whichever is larger.

The CUDA backend is modelled the same way from an ``nvcc -cubin -lineinfo`` build of csrc/cuda with
Python ports of its planners (forward: ``cuda_plan_fwd``, ``cuda_plan_mma``; backward: ``cuda_plan_bwd``).
``--tail`` models the Triton modulation tail instead (focalnet_kernels/triton/modulation_tail.py).

Entry points: ``predict(backend, direction, shape, kernel_sizes, dtype) -> dict``,
``predict_rows(...) -> list[dict]`` and ``main(argv)``.
"""

from __future__ import annotations

import argparse
import ast
import collections
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import types
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .report import _width  # bytes per thread of a memory opcode ('LDG.E.128' -> 16)

# ----------------------------------------------------------------------------------------------
# H100 SXM5 parameters: the ONE table every number below comes from.
# ----------------------------------------------------------------------------------------------
# Sources:
#  [DS]  NVIDIA H100 Tensor Core GPU datasheet / "NVIDIA H100 Tensor Core GPU Architecture"
#        whitepaper (2022): H100 SXM5 has 132 SMs, max boost clock 1980 MHz, 80 GB HBM3 at
#        3.35 TB/s, 50 MB L2, 228 KB shared memory per SM (227 KB usable per block), 64 K
#        32-bit registers per SM, 64 resident warps and 32 resident blocks per SM, 4 warp
#        schedulers per SM (one warp-instruction issued per scheduler per clock).
#  [PG]  CUDA C++ Programming Guide, "Arithmetic Instructions" throughput table (results per clock
#        cycle per multiprocessor), compute capability 9.0 column: 32-bit fp add/mul/fma 128;
#        16-bit fp add/mul/fma 256 (HFMA2 = 2 results); 32-bit int add/sub, compare, min/max,
#        shift, bitwise, multiply-add 64; fp32 reciprocal/rsqrt/log2/exp2/sin/cos (MUFU) 16;
#        type conversions 16 ("Compute Capabilities" table: 64 K registers, 228 KB smem).
#  [PG2] CUDA C++ Programming Guide, shared memory: 32 banks of 4 bytes per clock -> 128 B/clk/SM;
#        Hopper's L1 and shared memory are one 256 KB array with the same per-clock bandwidth.
#  [MB]  L2 bandwidth is not in NVIDIA's public specs: ~5.5 TB/s measured for H100 SXM by
#        microbenchmarks (Luo et al., "Benchmarking and Dissecting the Nvidia Hopper GPU
#        Architecture", IPDPS 2024; Chips and Cheese H100 article, 2023).  An assumption.
#  [NOTES] /work/shared/focalnet-notes.md section 4 (the floor method).  The notes quote the
#        floor at "~1.83 GHz" but their 0.19 ms is 6.4 G FMA at 132 x 128 x 1.98 GHz (at
#        1.83 GHz it would be 0.207 ms); this table uses the datasheet boost clock, 1.98 GHz.
H100 = {
    "name": "H100 SXM5",
    "sms": 132,                    # [DS]
    "clock_ghz": 1.98,             # [DS] max boost clock
    "issue_warp_instr_per_clk": 4,  # [DS] 4 schedulers x 1 warp-instruction / clk
    "fp32_per_clk": 128,           # [PG] FFMA/FMUL/FADD results per clk per SM
    "fp16x2_per_clk": 256,         # [PG] 16-bit fp results per clk per SM (HFMA2 = 2)
    "int_per_clk": 64,             # [PG] IADD3/IMAD/LOP3/SHF/ISETP/... per clk per SM
    "mufu_per_clk": 16,            # [PG] MUFU (ex2, rcp, rsq, lg2, sin, cos) per clk per SM
    "hmma16816_per_clk": 0.5,      # [DS]/[MB] mma.sync m16n8k16 (4096 flop) per clk per SM: half the
                                   # dense fp16/bf16 peak (989 TFLOPS = 4096 flop/clk/SM at 1.83 GHz),
                                   # mma.sync's reach on Hopper by microbenchmarks (an assumption)
    "conv_per_clk": 16,            # [PG] type conversions (F2F, I2F, F2I) per clk per SM
    "lsu_per_clk": 32,             # [PG2] thread-accesses of LDG/STG/LDS/STS per clk per SM
    "l1_bytes_per_clk": 128,       # [PG2] L1/shared bytes per clk per SM
    "l2_tb_s": 5.5,                # [MB] (assumption, not an NVIDIA number)
    "hbm_tb_s": 3.35,              # [DS]
    "l2_mb": 50,                   # [DS]
    "regs_per_sm": 65536,          # [DS]/[PG]
    "max_warps_per_sm": 64,        # [PG]
    "max_blocks_per_sm": 32,       # [PG]
    "smem_per_sm": 228 * 1024,     # [PG]
    "smem_reserved_per_block": 1024,  # [PG] 1 KB reserved per block on cc 8.x/9.0
    "reg_alloc_unit": 256,         # [PG] occupancy calculator: registers allocated per warp in 256s
}

# FocalNet-T stage shapes (B = 256, 224x224 input) and kernel-size sets
STAGES = {1: (256, 56, 56, 96), 2: (256, 28, 28, 192), 3: (256, 14, 14, 384), 4: (256, 7, 7, 768)}
KSETS = {"SRF": (3, 5), "LRF": (3, 5, 7)}
DTYPES = ("float32", "bfloat16")
_TDT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_ESIZE = {"float32": 4, "bfloat16": 2, "float16": 2}

# ----------------------------------------------------------------------------------------------
# SASS: parse, classify, loops
# ----------------------------------------------------------------------------------------------
CLASSES = ("ffma", "fmul", "fadd", "fp_other", "hfma2", "hmma", "mufu", "int", "move", "convert",
           "ldg", "stg", "lds", "sts", "ldl_stl", "atom", "bar", "control", "other")
_FP = {"FFMA": "ffma", "FMUL": "fmul", "FADD": "fadd", "FSETP": "fp_other", "FSEL": "fp_other",
       "FMNMX": "fp_other", "FCHK": "fp_other", "FSWZADD": "fp_other", "FMUL2": "fmul",
       "FFMA2": "ffma", "FADD2": "fadd"}
_H2 = {"HFMA2", "HADD2", "HMUL2", "HSETP2", "HMNMX2", "HSET2"}
_INT = {"IMAD", "IADD3", "IADD", "LEA", "LOP3", "LOP", "SHF", "SHL", "SHR", "ISETP", "IMNMX",
        "SEL", "PRMT", "IABS", "POPC", "FLO", "BREV", "BMSK", "SGXT", "IDP", "IMUL", "VIADD",
        "VIMNMX", "PLOP3", "P2R", "R2P", "LEPC", "VOTE", "IMNMX3", "UIMAD", "UIADD3", "ULEA",
        "ULOP3", "USHF", "UISETP", "USEL", "UPRMT", "UFLO", "UPOPC", "UBMSK", "USGXT", "UPLOP3",
        "ULOP", "UIMNMX", "UP2UR", "UR2UP", "VOTEU", "ISCADD"}
_MOVE = {"MOV", "UMOV", "S2R", "S2UR", "CS2R", "R2UR", "LDC", "ULDC", "SHFL", "MOVM", "UCGABAR_ARV"}
_CONV = {"F2F", "F2I", "I2F", "F2FP", "I2FP", "F2IP", "FRND", "I2I"}
_CTRL = {"BRA", "EXIT", "BSSY", "BSYNC", "CALL", "RET", "WARPSYNC", "BREAK", "BRX", "JMP", "YIELD",
         "BMOV", "KILL", "NANOSLEEP"}
_BAR = {"BAR", "MEMBAR", "DEPBAR", "ERRBAR", "CCTL", "FENCE"}


def classify(text: str) -> Tuple[str, str, int]:
    """(class, base opcode, bytes per thread) of one SASS instruction text such as
    '@!P0 LDG.E.128 R4, desc[UR4][R2.64]' (predicate guards are stripped)."""
    t = text.strip().rstrip(";").strip()
    if t.startswith("@"):
        t = t.split(None, 1)[1] if " " in t else ""
    op = t.split(None, 1)[0] if t else ""
    base = op.split(".")[0]
    if base in _FP:
        return _FP[base], base, 0
    if base in _H2:
        return "hfma2", base, 0
    if base == "MUFU":
        return "mufu", base, 0
    if base == "HMMA":
        return "hmma", base, 0
    if base in ("LDG", "LD"):
        return "ldg", base, _width(op)
    if base in ("STG", "ST"):
        return "stg", base, _width(op)
    if base == "LDSM":  # ldmatrix .x4: 4 x 8 rows of 16 bytes per warp = 16 bytes per thread
        return "lds", base, 4 * int(op.rsplit(".", 1)[-1]) if op.rsplit(".", 1)[-1].isdigit() else 16
    if base == "LDS":
        return "lds", base, _width(op)
    if base == "STS":
        return "sts", base, _width(op)
    if base in ("LDL", "STL"):
        return "ldl_stl", base, _width(op)
    if base in ("ATOM", "ATOMG", "ATOMS", "RED", "REDG"):
        return "atom", base, _width(op)
    if base in _BAR:
        return "bar", base, 0
    if base in _CTRL:
        return "control", base, 0
    if base in _CONV:
        return "convert", base, 0
    if base in _MOVE:
        return "move", base, 0
    if base in _INT:
        return "int", base, 0
    return "other", base, 0


_WORK = {"ffma", "fmul", "fadd", "hfma2", "hmma", "mufu", "ldg", "stg", "lds", "sts"}


@dataclass
class Instr:
    addr: int
    text: str
    file: Optional[str]
    line: Optional[int]
    cls: str = ""
    op: str = ""
    width: int = 0
    inl: str = ""    # `nvdisasm -gi`: the call sites it was inlined at ("" when not inlined / not known)


@dataclass
class Loop:
    start: int
    end: int                        # address of the backward branch
    parent: Optional[int] = None    # index into the loop list
    children: List[int] = field(default_factory=list)
    source: Optional[tuple] = None  # (file, for-line) of the mapped source loop
    trips: float = 1.0
    how: str = ""
    addrs: frozenset = frozenset()  # addresses of the loop's instructions (not always contiguous)

    def has(self, addr: int) -> bool:
        return addr in self.addrs if self.addrs else self.start <= addr <= self.end


_LINE_RE = re.compile(r'^\s*//## File "([^"]+)", line (\d+)(?: inlined at (.*))?')
_LABEL_RE = re.compile(r"^\s*(\.L_x_\d+):")
_INS_RE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
# BRA [.DIV|.U|...] [condition operand: `UR7, ` (BRA.DIV) or `P2, ` / `!P2, `,] `(.L_x_N)
_BRA_RE = re.compile(r"\bBRA(?:\.[A-Z.]+)?\s+(?:!?U?[PR][0-9T]*,\s*)?`?\(?(\.L_x_\d+)")


def parse_sass(text: str, kernel: Optional[str] = None) -> List[Instr]:
    """Instructions of one function of `nvdisasm -g` output (the first .text section when kernel
    is None), each with the file/line of its line-info annotation.  Branch targets are resolved
    from the .L_x_N labels and kept in `text` as '-> 0x...'."""
    lines = text.splitlines()
    start = None
    for i, ln in enumerate(lines):
        s = ln.strip()
        if s.startswith(".text.") and s.endswith(":") and (kernel is None or s == f".text.{kernel}:"):
            start = i + 1
            break
    if start is None:
        raise ValueError(f"no .text section for {kernel!r}")
    out: List[Instr] = []
    labels: Dict[str, int] = {}
    pending: List[str] = []
    cur = (None, None, "")
    after_line = False
    for ln in lines[start:]:
        if ln.startswith("\t.section") or ln.startswith("//-----"):
            break
        m = _LINE_RE.match(ln)
        if m:
            # `nvdisasm -gi` prints an inlined location as its innermost frame ("line a inlined at ...")
            # followed by the outer frames: those only extend the call-site chain
            if after_line and cur[2]:
                cur = (cur[0], cur[1], cur[2] + " < " + f"{m.group(1)}:{m.group(2)}")
            else:
                cur = (m.group(1), int(m.group(2)), (m.group(3) or "").strip())
            after_line = True
            continue
        after_line = False
        m = _LABEL_RE.match(ln)
        if m:
            pending.append(m.group(1))
            continue
        m = _INS_RE.match(ln)
        if m:
            a = int(m.group(1), 16)
            for p in pending:
                labels[p] = a
            pending = []
            cls, op, w = classify(m.group(2))
            out.append(Instr(a, m.group(2), cur[0], cur[1], cls, op, w, cur[2]))
    for ins in out:
        m = _BRA_RE.search(ins.text)
        if m and m.group(1) in labels:
            ins.text += f" -> {labels[m.group(1)]:#x}"
    return [i for i in out if i.op != "NOP"]


_TARGET_RE = re.compile(r"->\s*(0x[0-9a-f]+)")
_NO_FALLTHROUGH = {"EXIT", "RET", "BRA", "JMP", "BRX", "KILL"}


def _cfg(instrs: Sequence[Instr]):
    """Basic blocks of the SASS (leaders: the first instruction, branch targets, what follows a
    branch or exit) and their successors: (block start indices, [successor block ids])."""
    index = {x.addr: i for i, x in enumerate(instrs)}
    leaders = {0}
    for i, x in enumerate(instrs):
        m = _TARGET_RE.search(x.text) if x.op in ("BRA", "JMP") else None
        if m and int(m.group(1), 16) in index:
            leaders.add(index[int(m.group(1), 16)])
        if x.op in _NO_FALLTHROUGH or m:
            leaders.add(i + 1)
    starts = sorted(b for b in leaders if b < len(instrs))
    block_of = {}
    for bi, st in enumerate(starts):
        end = starts[bi + 1] if bi + 1 < len(starts) else len(instrs)
        for i in range(st, end):
            block_of[i] = bi
    succ = [[] for _ in starts]
    for bi, st in enumerate(starts):
        last = (starts[bi + 1] if bi + 1 < len(starts) else len(instrs)) - 1
        x = instrs[last]
        # conditional: a guard predicate, or a condition operand (BRA.DIV URx, BRA Px, ...)
        predicated = x.text.lstrip().startswith("@") or re.search(r"\bBRA(?:\.[A-Z.]+)?\s+!?U?[PR][0-9T]*,", x.text)
        m = _TARGET_RE.search(x.text) if x.op in ("BRA", "JMP") else None
        # BRA.DIV: to the out-of-line path of a warp-synchronous op when the warp has diverged; the
        # kernels reconverge before their shuffles, so it is treated as never taken (that code is
        # then unreachable here: outside every loop, counted once per block)
        if m and int(m.group(1), 16) in index and not re.search(r"\bBRA\.DIV\b", x.text):
            succ[bi].append(block_of[index[int(m.group(1), 16)]])
        if (x.op not in _NO_FALLTHROUGH or predicated) and last + 1 < len(instrs):
            succ[bi].append(bi + 1)
    return starts, succ


def _dominators(n, succ):
    preds = [[] for _ in range(n)]
    for u in range(n):
        for v in succ[u]:
            preds[v].append(u)
    order, seen, stack = [], {0}, [(0, iter(succ[0]))]
    while stack:                       # reverse post-order from the entry
        u, it = stack[-1]
        nxt = next((v for v in it if v not in seen), None)
        if nxt is None:
            order.append(u)
            stack.pop()
        else:
            seen.add(nxt)
            stack.append((nxt, iter(succ[nxt])))
    rpo = order[::-1]
    dom = {u: None for u in rpo}
    dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for u in rpo[1:]:
            ps = [dom[p] for p in preds[u] if dom.get(p) is not None]
            new = set.intersection(*ps) | {u} if ps else {u}
            if new != dom[u]:
                dom[u], changed = new, True
    return dom, preds


def find_loops(instrs: Sequence[Instr]) -> List[Loop]:
    """Natural loops of the SASS control-flow graph: for every back edge u -> h (h dominates u) the
    blocks that reach u without passing h, merged per header, nested by inclusion. A loop's
    instructions need not be contiguous (the compiler places parts of a loop body after its back
    branch, e.g. the divergent paths of shuffles). A branch to itself (the trap after EXIT) is no
    loop. (nvcc emits reducible control flow; an irreducible cycle would not be counted.)"""
    if not instrs:
        return []
    starts, succ = _cfg(instrs)
    n = len(starts)
    dom, preds = _dominators(n, succ)
    bodies: Dict[int, set] = {}

    def block_addrs(b):
        end = starts[b + 1] if b + 1 < n else len(instrs)
        return {instrs[i].addr for i in range(starts[b], end)}

    for u in range(n):
        for h in succ[u]:
            if instrs[starts[h]].addr > instrs[starts[u]].addr and h != u:
                continue
            if dom.get(u) is None:          # unreachable code
                continue
            # a back edge is one to a dominator; other retreating branches are joins (e.g. from the
            # out-of-line divergent paths of shuffles placed after the loop, back into it)
            if h in dom[u]:
                body, work = {h, u}, ([u] if u != h else [])
                while work:
                    x = work.pop()
                    for p in preds[x]:
                        if p not in body and dom.get(p) is not None:
                            body.add(p)
                            work.append(p)
                if body == {h} and u == h and len(block_addrs(h)) == 1:
                    continue                # BRA to itself
                bodies.setdefault(h, set()).update(body)
    loops = []
    for h, body in sorted(bodies.items()):
        addrs = set().union(*(block_addrs(b) for b in body))
        loops.append(Loop(min(addrs), max(addrs), addrs=frozenset(addrs)))
    loops.sort(key=lambda lp: (lp.start, -len(lp.addrs)))
    for i, lp in enumerate(loops):
        best = None
        for j, o in enumerate(loops):
            if j != i and lp.addrs < o.addrs:
                if best is None or len(o.addrs) < len(loops[best].addrs):
                    best = j
        lp.parent = best
        if best is not None:
            loops[best].children.append(i)
    return loops


def _own(instrs, loops, idx):
    lp = loops[idx]
    inner = [loops[c].addrs for c in lp.children]
    return [x for x in instrs if x.addr in lp.addrs and not any(x.addr in a for a in inner)]


def multiplicities(instrs, loops) -> Dict[int, float]:
    """addr -> how many times the instruction runs per work item (product of the trip counts of
    the loops around it)."""
    mult = {}
    for ins in instrs:
        m = 1.0
        for lp in loops:
            if lp.has(ins.addr):
                m *= lp.trips
        mult[ins.addr] = m
    return mult


# ----------------------------------------------------------------------------------------------
# source side: for-statements of the kernel file, call sites, trip counts
# ----------------------------------------------------------------------------------------------
class _TL:
    """What range() arguments may use of `tl` when they are evaluated on the host."""

    @staticmethod
    def cdiv(a, b):
        return -(-a // b)

    constexpr = int


class _Unknown(Exception):
    pass


def _eval(node, ns):
    try:
        return eval(compile(ast.Expression(node), "<expr>", "eval"),
                    {"__builtins__": {"min": min, "max": max, "int": int}, "tl": _TL, "triton": _TL}, ns)
    except Exception as e:
        raise _Unknown(ast.unparse(node)) from e


class SourceIndex:
    """The Python AST of a kernel file (the text that was compiled): its functions and for loops."""

    def __init__(self, text: str):
        self.tree = ast.parse(text)
        self.funcs = {n.name: n for n in self.tree.body if isinstance(n, ast.FunctionDef)}
        self.fors = []  # (func name, For node)
        for fn in self.funcs.values():
            for n in ast.walk(fn):
                if isinstance(n, ast.For):
                    self.fors.append((fn.name, n))

    def innermost_for(self, line):
        best = None
        for fname, n in self.fors:
            if n.lineno <= line <= n.end_lineno:
                if best is None or n.lineno >= best[1].lineno:
                    best = (fname, n)
        return best

    def func_of_line(self, line):
        for name, fn in self.funcs.items():
            if fn.lineno <= line <= fn.end_lineno:
                return name
        return None


def _kernel_namespace(fn_node: ast.FunctionDef, values: dict) -> dict:
    """Arguments (constexprs and known runtime ints) plus every top-level assignment of the kernel
    body that evaluates on the host (derived constexprs such as TP = TILE_H * TILE_W)."""
    ns = dict(values)

    def visit(body):
        for st in body:
            if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name) and st.value is not None:
                targets, val = [st.target], st.value
            elif isinstance(st, ast.Assign) and all(isinstance(t, ast.Name) for t in st.targets):
                targets, val = st.targets, st.value
            else:
                continue
            try:
                v = _eval(val, ns)
            except _Unknown:
                for t in targets:
                    ns.pop(t.id, None)
                continue
            if isinstance(v, (int, float, bool)):
                for t in targets:
                    ns[t.id] = v
    visit(fn_node.body)
    return ns


def _live_calls(body, ns, callee, out, skip_fors=True):
    """Calls of `callee` in a statement list, in source order, inside constexpr-true branches,
    not descending into nested for loops."""
    for st in body:
        if isinstance(st, ast.If):
            try:
                cond = _eval(st.test, ns)
            except _Unknown:
                cond = None
            if cond is None or cond:
                _live_calls(st.body, ns, callee, out, skip_fors)
            if cond is None or not cond:
                _live_calls(st.orelse, ns, callee, out, skip_fors)
            continue
        if isinstance(st, (ast.For, ast.While)) and skip_fors:
            continue
        for n in ast.walk(st):
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == callee:
                out.append(n)


def _bind(helper: ast.FunctionDef, call: ast.Call, ns: dict) -> dict:
    params = [a.arg for a in helper.args.args]
    bound = {}
    for p, a in zip(params, call.args):
        try:
            bound[p] = _eval(a, ns)
        except _Unknown:
            pass
    for kw in call.keywords:
        try:
            bound[kw.arg] = _eval(kw.value, ns)
        except _Unknown:
            pass
    return bound


def _range_trips(for_node: ast.For, ns: dict):
    it = for_node.iter
    if not (isinstance(it, ast.Call) and isinstance(it.func, ast.Name) and it.func.id in ("range", "static_range")):
        raise _Unknown(ast.unparse(it))
    args = [_eval(a, ns) for a in it.args]
    r = range(*[int(a) for a in args])
    return len(r)


def map_loops(instrs, loops, src: SourceIndex, kernel: str, values: dict, file_suffix: str,
              overrides: Optional[dict] = None):
    """Give every SASS loop its source loop and trip count (per work item).

    Sources, bottom-up: a loop's source loop is a `for` of the kernel file chosen by the line info
    of its own instructions (those not inside a nested SASS loop; lines outside any `for` do not
    vote), constrained by the nesting: it must enclose the source loops of its nested SASS loops
    (the same function: contain them; a helper's loop nested in the kernel's: any kernel `for`
    qualifies).  Among the qualifying `for`s the one most own instructions fall in (innermost
    first) wins; with no vote, the innermost `for` that encloses the nested loops' sources.
    (A plain majority fails where ptxas peels a copy of an inner loop into its parent's body.)

    Trip counts, top-down: len(range(...)) of that `for`, evaluated with the constexprs, the
    shape, the derived constexprs of the kernel and `overrides` (run-time values the kernel
    loads); a `for` in a helper (@triton.jit function inlined by Triton) is evaluated with the
    helper's parameters bound from its live call (constexpr `if`s resolved) in the body of the
    parent loop's source `for` (or the kernel body), sibling SASS loops taking the calls in
    source order.  The outermost loop whose range cannot be evaluated (it starts at the program
    id: a persistent work loop) is the WORK-ITEM loop: trip 1 (counts are per work item).  A
    source loop that ptxas split into several sibling SASS loops (unrolled main + remainder)
    gets trips T // u and T % u, u the ratio of their sizes."""
    kfn = src.funcs[kernel]
    kns = _kernel_namespace(kfn, values)
    kns.update(overrides or {})  # run-time values the kernel loads or derives from the program id
    fors = {(f, n.lineno): n for f, n in src.fors}

    def encloses(outer, inner):
        (fo, lo), (fi, li) = outer, inner
        if fo == fi:
            n = fors[outer]
            return n.lineno < li <= n.end_lineno
        return fo == kernel  # a helper's loop inside a kernel loop

    def votes_of(idx, cands):
        # each own instruction votes for the innermost candidate `for` containing its line
        v = collections.Counter()
        for x in _own(instrs, loops, idx):
            if x.file and x.file.endswith(file_suffix) and x.line:
                inner = [k for k in cands if fors[k].lineno <= x.line <= fors[k].end_lineno]
                if inner:
                    v[max(inner, key=lambda k: fors[k].lineno)] += 1
        return v

    def depth_of(i):
        d, j = 0, i
        while loops[j].parent is not None:
            j, d = loops[j].parent, d + 1
        return d

    for idx in sorted(range(len(loops)), key=lambda i: -depth_of(i)):  # innermost first
        lp = loops[idx]
        kids = [loops[c].source[:2] for c in lp.children if loops[c].source]
        cands = [k for k in fors if all(encloses(k, c) for c in kids)]
        v = votes_of(idx, cands)
        scored = [(v[k], fors[k].lineno, k) for k in cands if v[k] > 0]
        if scored:
            # most votes; ties -> the innermost (latest starting) for
            lp.source = max(scored)[2]
        elif kids and cands:
            same = [k for k in cands if k[0] == kids[0][0]]
            pool = same or cands
            lp.source = min(pool, key=lambda k: fors[k].end_lineno - fors[k].lineno)
        else:
            lp.source = None

    ctx_of: Dict[int, Tuple[str, dict, list]] = {}  # loop idx -> (func, namespace, body stmts)
    used_calls = collections.defaultdict(int)
    for idx in sorted(range(len(loops)), key=lambda i: (depth_of(i), loops[i].start)):
        lp = loops[idx]
        if lp.source is None:
            lp.trips, lp.how = 1.0, "no source loop (1 trip assumed)"
            ctx_of[idx] = ctx_of.get(lp.parent, (kernel, kns, kfn.body)) if lp.parent is not None else \
                (kernel, kns, kfn.body)
            continue
        fname, fline = lp.source
        node = fors[lp.source]
        if lp.parent is None:
            pfunc, pns, pbody = kernel, kns, kfn.body
        else:
            pfunc, pns, pbody = ctx_of.get(lp.parent, (kernel, kns, kfn.body))
        if fname == pfunc:
            ns = pns
        else:
            calls = []
            _live_calls(pbody, pns, fname, calls)
            if not calls:
                _live_calls(kfn.body, kns, fname, calls, skip_fors=False)
            ck = (lp.parent, fname)
            pick = calls[min(used_calls[ck], len(calls) - 1)] if calls else None
            used_calls[ck] += 1
            ns = _bind(src.funcs[fname], pick, pns) if pick is not None else {}
        ctx_of[idx] = (fname, ns, node.body)
        try:
            lp.trips = float(_range_trips(node, ns))
            lp.how = f"{fname}:{fline} {ast.unparse(node.iter)} = {int(lp.trips)}"
        except _Unknown:
            lp.trips = 1.0
            if lp.parent is None:
                lp.how = f"{fname}:{fline} {ast.unparse(node.iter)}: work-item loop (1 per item)"
                lp.source = (fname, fline, "work")
            else:
                lp.how = f"{fname}:{fline} {ast.unparse(node.iter)}: UNKNOWN trip count (1 assumed)"
    # unrolled main + remainder (+ peeled copies): sibling SASS loops mapped to the same source
    # loop.  Work instructions (fp, MUFU, memory) measure source iterations: the smallest sibling
    # is taken as one iteration per trip (the remainder loop), each sibling's unroll factor is its
    # work / that, and work instructions of the parent's own code whose lines are in the source
    # loop's body are peeled iterations, executed once per parent trip.
    groups = collections.defaultdict(list)
    for i, lp in enumerate(loops):
        if lp.source and len(lp.source) == 2:
            groups[(lp.parent, lp.source)].append(i)
    for (par, key), idxs in groups.items():
        if len(idxs) < 2:
            continue
        node = fors[key]
        work = [sum(1 for x in instrs if loops[i].has(x.addr) and x.cls in _WORK)
                for i in idxs]
        w1 = max(1, min(work))
        peeled = 0
        if par is not None:
            peeled = sum(1 for x in _own(instrs, loops, par) if x.cls in _WORK and x.line
                         and node.lineno < x.line <= node.end_lineno and x.file and x.file.endswith(file_suffix))
        T = int(loops[idxs[0]].trips)
        rem = max(0, T - round(peeled / w1))
        for w, i in sorted(zip(work, idxs), reverse=True):
            u = max(1, round(w / w1))
            loops[i].trips = float(rem // u)
            rem -= (rem // u) * u
            loops[i].how += f" (split: x{u}, {round(peeled / w1)} peeled)"
    return loops


def _loop_label(lp):
    """A loop's source line and header (its `how` without the trip count), or "(no loop)"."""
    if lp is None:
        return "(no loop)"
    how = getattr(lp, "how", "") or f"loop at {hex(lp.start)}"
    return re.sub(r" = [^ ]+( \(.*\))?$", "", how)


def count(instrs, loops) -> dict:
    """Warp-instructions by class per work item ('item') and outside the work-item loop, once per
    program ('prologue'); bytes per thread of the global/shared accesses; fp32 and MUFU thread
    operations."""
    work = [lp for lp in loops if lp.source and len(lp.source) == 3]
    wl = min(work, key=lambda lp: lp.start) if work else None
    mult = multiplicities(instrs, loops)
    res = {"item": collections.Counter(), "prologue": collections.Counter(),
           "item_bytes": collections.Counter(), "prologue_bytes": collections.Counter()}
    res["item_l2"] = collections.Counter()
    res["prologue_l2"] = collections.Counter()
    # warp-instructions per program by the innermost loop that holds them (its source line and header)
    res["by_loop"] = collections.Counter()
    res["by_loop_class"] = collections.defaultdict(collections.Counter)
    for ins in instrs:
        where = "item" if (wl is None or wl.has(ins.addr)) else "prologue"
        m = mult[ins.addr]
        enc = [lp for lp in loops if lp.has(ins.addr)]
        inner = min(enc, key=lambda lp: len(lp.addrs) or lp.end - lp.start) if enc else None
        res["by_loop"][_loop_label(inner)] += m
        res["by_loop_class"][_loop_label(inner)][ins.cls] += m
        if ins.cls in ("ldg", "stg", "atom", "ldl_stl"):
            res[where + "_l2"][ins.cls] += _l2_mult(ins, loops, m) * ins.width * 32
        res[where][ins.cls] += m
        res[where]["total"] += m
        if ins.cls in ("ldg", "stg", "lds", "sts", "ldl_stl", "atom"):
            res[where][f"{ins.cls}.{ins.width}B"] += m
            res[where + "_bytes"][ins.cls] += m * ins.width * 32
    res["persistent"] = wl is not None
    return res


# ----------------------------------------------------------------------------------------------
# compiling (Triton) with an on-disk cache of the SASS
# ----------------------------------------------------------------------------------------------
def _cache_dir():
    d = os.environ.get("FOCALNET_COST_CACHE") or os.path.join(tempfile.gettempdir(), "focalnet_cost_model")
    os.makedirs(d, exist_ok=True)
    return d


def _tool(name):
    from . import report
    return os.path.join(os.path.dirname(report._cuobjdump()), name)


def _entry_key(entry, arch):
    import triton
    fn = entry["fn"]
    path = getattr(fn, "fn", fn).__code__.co_filename
    with open(path, "rb") as f:
        src = f.read()
    blob = json.dumps([entry["name"], entry.get("config"), entry["signature"], entry["constexprs"],
                       entry.get("attrs"), entry.get("num_warps"), entry.get("num_stages"), arch,
                       triton.__version__], sort_keys=True, default=str).encode()
    return hashlib.sha1(blob + src).hexdigest()[:20]


def compile_entry(entry, arch=90) -> dict:
    """{'sass', 'regs', 'smem', 'spill', 'name', 'num_warps', 'source': {path: text}} of one
    REPORT_KERNELS-format entry, compiled for sm_`arch` (cached by entry + kernel source +
    Triton version)."""
    key = _entry_key(entry, arch)
    path = os.path.join(_cache_dir(), key + ".json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    warnings.filterwarnings("ignore")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import report
    fn = entry["fn"]
    sig = {a: ("constexpr" if a in entry["constexprs"] else entry["signature"][a]) for a in fn.arg_names}
    attrs = {(fn.arg_names.index(k),): v for k, v in (entry.get("attrs") or {}).items()}
    src_path = getattr(fn, "fn", fn).__code__.co_filename
    with open(src_path) as f:
        src_text = f.read()
    ck = triton.compile(ASTSource(fn, sig, dict(entry["constexprs"]), attrs), target=GPUTarget("cuda", arch, 32),
                        options={"num_warps": entry.get("num_warps", 4), "num_stages": entry.get("num_stages", 3)})
    with tempfile.TemporaryDirectory() as d:
        cub = os.path.join(d, "k.cubin")
        with open(cub, "wb") as f:
            f.write(ck.asm["cubin"])
        sass = subprocess.run([_tool("nvdisasm"), "-g", cub], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([report._cuobjdump(), "-res-usage", cub], capture_output=True, text=True,
                             check=True).stdout
    r = report._parse_res(res, ck.metadata.name)
    out = {"name": ck.metadata.name, "sass": sass, "regs": r.get("REG", 0),
           "smem": int(ck.metadata.shared) + r.get("SHARED", 0),
           "spill": r.get("LOCAL", 0) + r.get("STACK", 0), "num_warps": entry.get("num_warps", 4),
           "source": {src_path: src_text}}
    with open(path + ".tmp", "w") as f:
        json.dump(out, f)
    os.replace(path + ".tmp", path)
    return out


def analyze(compiled: dict, values: dict, overrides: Optional[dict] = None) -> dict:
    """Counts per work item of one compiled kernel with its loops' trip counts evaluated at
    `values` (constexprs + runtime ints)."""
    instrs = parse_sass(compiled["sass"], compiled["name"])
    loops = find_loops(instrs)
    (path, text), = compiled["source"].items()
    src = SourceIndex(text)
    map_loops(instrs, loops, src, compiled["name"], values, os.path.basename(path), overrides)
    c = count(instrs, loops)
    c["loops"] = [{"start": hex(lp.start), "end": hex(lp.end), "depth": _depth(loops, i), "trips": lp.trips,
                   "how": lp.how} for i, lp in enumerate(loops)]
    return c


# tensor-core forward (csrc/cuda/fc_mma.cuh; plan_mma / mma_geom of focal_context_cuda.cu)
_MMA_SPECS = ((2, (3, 5)), (3, (3, 5, 7)))
_MMA_TH = (7, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 32)
_MMA_TW = (7, 8, 14, 16, 24, 28, 32, 40, 48, 56, 64)
_MMA_COST_VALUE, _MMA_COST_STAGE, _MMA_COST_BLOCK = 16.0, 3.0, 3000.0
# mma_smem_budget() on an H100: min(227 KB opt-in, 228 KB per SM / 2 - 1 KB) = 113 KB
_MMA_SMEM_BUDGET = min(227 * 1024, H100["smem_per_sm"] // 2 - 1024)


def _mma_geom(ks, H, W, TH, TW, dtype, rec=False):
    if rec:  # the recompute stops before the last level: no halo for it
        ks = list(ks[:-1]) + [1]
    L = len(ks)
    Rn = [0] * L
    for j in range(L - 2, -1, -1):
        Rn[j] = Rn[j + 1] + ks[j + 1] // 2
    nrow = [_cdiv(TH + 2 * Rn[j], 16) for j in range(L)]
    ncol = [_cdiv(TW + 2 * Rn[j], 8) for j in range(L)]
    for j in range(L - 2, -1, -1):
        ncol[j] = max(ncol[j], ncol[j + 1] + 1)

    def odd8(x):
        return x + 8 if (x // 8) % 2 == 0 else x
    pitch = [odd8(8 * ncol[0] + 8)] + [odd8(8 * ncol[j - 1]) for j in range(1, L)]
    brow = [16 * nrow[0] + ks[0] - 1] + [max(16 * nrow[j] + ks[j] - 1, 16 * nrow[j - 1]) for j in range(1, L)]
    scols = 8 * ncol[0] + 8
    srows = min(brow[0], TH + 2 * (Rn[0] + ks[0] // 2))
    opitch = _cdiv(TW, 2) * 2
    plane = [0, 0]
    for j in range(L):
        plane[j % 2] = max(plane[j % 2], brow[j] * pitch[j] * 2)
    plane[0] = max(plane[0], TH * opitch * 2)
    plane = [_cdiv(v, 16) * 16 for v in plane]
    smem = _CB * (plane[0] + plane[1]) + L * TH * TW * 4 + 32
    if smem > _MMA_SMEM_BUDGET:
        return None
    ntiles = _cdiv(H, TH) * _cdiv(W, TW)
    ns = 1.0   # mmas per kernel row: FC_MMA_BF16_NS = 1 (bf16 weights rounded, as fp16's)
    per_tile = _MMA_COST_BLOCK + _MMA_COST_STAGE * srows * scols
    for j in range(L - (1 if rec else 0)):
        per_tile += 128.0 * nrow[j] * ncol[j] * (_MMA_COST_VALUE + 0.25 * (1.0 + ns) * ks[j])
    return {"TH": TH, "TW": TW, "nrow": nrow, "ncol": ncol, "pitch": pitch, "brow": brow, "scols": scols,
            "srows": srows,
            "smem": smem, "ntiles": ntiles, "cost": per_tile * ntiles / (H * W), "Rn": Rn}


def cuda_plan_mma(shape, ks, dtype, rec=False):
    """plan_mma() of the CUDA backend: the tensor-core forward's tile, or None where it does not
    apply (fp32, other level stacks, FOCALNET_CUDA_MMA=0); rec: the backward's recompute, which stops
    before the last level (planned with that level's kernel size as 1, its values not paid for)."""
    B, H, W, C = shape
    if dtype not in ("float16", "bfloat16") or (len(ks), tuple(ks)) not in _MMA_SPECS:
        return None
    if os.environ.get("FOCALNET_CUDA_MMA", "") == "0":
        return None
    best = None
    for th in _MMA_TH:
        for tw in _MMA_TW:
            g = _mma_geom(list(ks), H, W, th, tw, dtype, rec)
            if g is None or B * g["ntiles"] * _cdiv(C, _CB) > 2 ** 31 - 1:
                continue
            if best is None or g["cost"] < best["cost"]:
                best = g
    return best


# tensor-core backward level kernel (csrc/cuda/fc_bwd_mma.cuh; plan_level_mma / level_mma_geom)
_LVM_TH = (8, 10, 16, 24, 26, 32, 40, 56)
_LVM_TW = (8, 16, 24, 32, 40, 48, 56, 64)
_LVM_Z, _LVM_X, _LVM_N, _LVM_F, _LVM_T, _LVM_TILE = 36.0, 1.5, 2.0, 6.0, 4.0, 3000.0


def _level_mma_geom(k, H, W, th, tw):
    TH, TW, p = min(th, H), min(tw, W), k // 2

    def odd8(x):
        return x + 8 if (x // 8) % 2 == 0 else x
    g = {"k": k, "TH": TH, "TW": TW, "nrowZ": _cdiv(TH + 2 * p, 16),
         "ncolZ": max(_cdiv(TW + 2 * p, 8), _cdiv(TW, 8) + 1), "nrowT": _cdiv(TH, 16), "ncolT": _cdiv(TW, 8),
         "ncolE": _cdiv(TW + p, 8)}
    g["xrows"] = max(16 * g["nrowZ"] + k - 1, 16 * g["nrowT"] + k + p - 1)
    g["xp"] = odd8(max(8 * g["ncolZ"] + 8, 8 * g["ncolE"] + 8))
    g["drows"] = max(16 * g["nrowZ"], 16 * g["nrowT"] + k - 1, 16 * g["nrowT"] + p)
    g["dp"] = odd8(max(8 * g["ncolZ"], 8 * g["ncolT"] + 8, 8 * g["ncolE"]))
    g["nrows"], g["np"] = TH + 2 * p, _cdiv(TW + 2 * p, 2) * 2
    g["planeX"] = _cdiv(max(g["xrows"] * g["xp"] * 2, TH * TW * 4, k * 128 * 4), 16) * 16
    g["planeD"] = _cdiv(g["drows"] * g["dp"] * 2, 16) * 16
    g["planeN"] = _cdiv(g["nrows"] * g["np"] * 4, 16) * 16
    g["smem"] = _CB * (g["planeX"] + g["planeD"] + g["planeN"])   # one dz plane (FC_BWD_DZ_SPLIT=0)
    g["ntiles"] = _cdiv(H, TH) * _cdiv(W, TW)
    g["ntw"] = _cdiv(W, TW)
    # staging and the epilogue count whole passes of the lanes across a row (64 / 32 / 32 columns)
    per_tile = (_LVM_TILE + _LVM_Z * 128.0 * g["nrowZ"] * g["ncolZ"] + _LVM_X * g["xrows"] * _cdiv(g["xp"], 64) * 64 +
                _LVM_N * g["nrows"] * _cdiv(g["np"], 32) * 32 + _LVM_F * 128.0 * g["nrowT"] * g["ncolT"] +
                _LVM_T * TH * _cdiv(TW, 32) * 32)
    g["cost"] = per_tile * g["ntiles"] / (H * W)
    return g if g["smem"] <= _MMA_SMEM_BUDGET else None


def cuda_plan_level_mma(shape, k, dtype):
    """plan_level_mma(): the tensor-core backward level kernel's tile for kernel size k, or None (bf16 and
    k in {3, 5, 7} only; the caller also requires the forward on tensor cores)."""
    B, H, W, C = shape
    if dtype != "bfloat16" or k not in (3, 5, 7):
        return None
    best = None
    for th in _LVM_TH:
        for tw in _LVM_TW:
            g = _level_mma_geom(k, H, W, th, tw)
            if g is not None and (best is None or g["cost"] < best["cost"]):
                best = g
    return best


def _depth(loops, i):
    d = 0
    while loops[i].parent is not None:
        i = loops[i].parent
        d += 1
    return d


# ----------------------------------------------------------------------------------------------
# occupancy and the time of one launch
# ----------------------------------------------------------------------------------------------
def occupancy(regs: int, smem: int, warps: int, hw=H100) -> int:
    """Resident blocks per SM (registers allocated per warp in units of 256 from 4 sub-partition
    register files of regs_per_sm / 4 each, as focal_context_fwd.ctas_per_sm; 1 KB of shared
    memory reserved per block)."""
    per_warp = math.ceil(max(regs, 1) * 32 / hw["reg_alloc_unit"]) * hw["reg_alloc_unit"]
    by_regs = (4 * ((hw["regs_per_sm"] // 4) // per_warp)) // warps
    by_smem = hw["smem_per_sm"] // (smem + hw["smem_reserved_per_block"])
    by_warps = hw["max_warps_per_sm"] // warps
    return max(0, min(by_regs, by_smem, by_warps, hw["max_blocks_per_sm"]))


@dataclass
class Launch:
    """One kernel launch: what it is, how many programs and work items, what HBM bytes it must
    move (unique traffic: maps read/written once), which compiled kernel and loop values."""
    kernel: str
    config: str
    programs: int
    items: int
    hbm_bytes: float
    compiled: dict
    values: dict
    overrides: dict = field(default_factory=dict)


def launch_time(ln: Launch, hw=H100) -> dict:
    c = analyze(ln.compiled, ln.values, ln.overrides)
    it, pr = c["item"], c["prologue"]
    warps = ln.compiled["num_warps"]
    blocks = occupancy(ln.compiled["regs"], ln.compiled["smem"], warps, hw)
    sms = hw["sms"]
    # the busiest SM: programs are spread round-robin; a persistent program loops over items
    progs_sm = math.ceil(ln.programs / sms)
    items_prog = math.ceil(ln.items / ln.programs) if c["persistent"] else 1
    # per program (warp-instructions of the whole CTA = per-warp count x warps)
    def per_sm(key):
        return progs_sm * warps * (items_prog * it.get(key, 0) + pr.get(key, 0))

    def per_sm_bytes(key):
        return progs_sm * warps * (items_prog * c["item_bytes"].get(key, 0) + c["prologue_bytes"].get(key, 0))

    clk = hw["clock_ghz"] * 1e9
    fp32 = sum(per_sm(k) for k in ("ffma", "fmul", "fadd")) * 32
    intops = per_sm("int") * 32
    lsu = sum(per_sm(k) for k in ("ldg", "stg", "lds", "sts", "ldl_stl", "atom")) * 32
    l1_bytes = sum(per_sm_bytes(k) for k in ("ldg", "stg", "lds", "sts", "ldl_stl", "atom"))
    # L2: stores go through; loads in tap loops mostly hit L1 (_l2_mult)
    l2_bytes_sm = progs_sm * warps * (items_prog * sum(c["item_l2"].values()) + sum(c["prologue_l2"].values()))
    terms = {
        "issue": per_sm("total") / hw["issue_warp_instr_per_clk"] / clk,
        "fp32": fp32 / hw["fp32_per_clk"] / clk,
        "mufu": per_sm("mufu") * 32 / hw["mufu_per_clk"] / clk,
        "int": intops / hw["int_per_clk"] / clk,
        "l1": max(lsu / hw["lsu_per_clk"], l1_bytes / hw["l1_bytes_per_clk"]) / clk,
        "l2": l2_bytes_sm * sms / (hw["l2_tb_s"] * 1e12),
        "hbm": ln.hbm_bytes / (hw["hbm_tb_s"] * 1e12),
    }
    bound = max(terms, key=terms.get)
    n_items = ln.items if c["persistent"] else ln.programs
    n_pro = ln.programs

    def tot(key):  # warp-instructions of the whole launch
        return (n_items * it.get(key, 0) + n_pro * pr.get(key, 0)) * warps

    by_class = {k: tot(k) for k in sorted(set(it) | set(pr))}
    total_warp_instr, ffma_total = tot("total"), tot("ffma")
    return {"kernel": ln.kernel, "config": ln.config, "ms": terms[bound] * 1e3, "bound": bound,
            "terms_ms": {k: v * 1e3 for k, v in terms.items()}, "regs": ln.compiled["regs"],
            "smem": ln.compiled["smem"], "spill": ln.compiled["spill"], "warps": warps,
            "blocks_per_sm": blocks, "occupancy_warps": blocks * warps, "programs": ln.programs,
            "items": ln.items, "warp_instr": total_warp_instr, "ffma_warp_instr": ffma_total,
            "by_class": dict(by_class), "hbm_bytes": ln.hbm_bytes, "loops": c["loops"]}


def _l2_mult(ins, loops, m):
    """How many of the `m` executions of a global access reach L2.  Stores: all (L1 is write-
    through).  Loads: a load in a stencil loop nest re-reads the lines its neighbouring taps
    read, so the up-to-two innermost enclosing loops of <= 15 trips (the tap loops) are assumed
    to hit L1 except for a halo factor of 1.5 (a rough model: docs/cost-model.md, limits)."""
    if ins.cls != "ldg":
        return m
    enc = sorted((lp for lp in loops if lp.has(ins.addr)), key=lambda lp: len(lp.addrs) or lp.end - lp.start)
    reuse = 1.0
    for lp in enc[:2]:
        if 1 < lp.trips <= 15:
            reuse *= lp.trips
        else:
            break
    return m if reuse == 1.0 else min(m, m / reuse * 1.5)


# ----------------------------------------------------------------------------------------------
# the launches of each backend (mirrors of the host code; module helpers called where they exist)
# ----------------------------------------------------------------------------------------------
def _cdiv(a, b):
    return -(-a // b)


class _StubTensor:
    """What the launchers' helpers (_ctx_align, _prune) read of a tensor."""

    def __init__(self, esize, strides):
        self._e, self._s = esize, strides

    def element_size(self):
        return self._e

    def stride(self):
        return self._s


def _slice_strides(shape, L):
    """ctx as the model passes it: a slice of the f output, pixel stride 2C + L + 1."""
    B, H, W, C = shape
    P = 2 * C + L + 1
    return (H * W * P, W * P, P, 1)


def _gate_bytes_per_pixel(L, esize):
    # the L+1 gates of a pixel are a few bytes of the f-output row: one 32-byte sector each
    return max(32, (L + 1) * esize)


def triton_fwd_launches(shape, ks, dtype, arch=90):
    """[(candidate launches of the autotuned local kernel), launch of the global kernel factory]."""
    from .triton import focal_context_fwd as F
    B, H, W, C = shape
    L = len(ks)
    tdt, es = _TDT[dtype], _ESIZE[dtype]
    stub = _StubTensor(es, _slice_strides(shape, L))
    align = F._ctx_align(stub)
    cands = F._prune(list(F._GPU_CONFIGS), {"C": C, "ctx_ptr": stub})
    K = list(ks) + [0] * (4 - L)
    npix = B * H * W
    hbm_local = npix * (C * es * 2 + _gate_bytes_per_pixel(L, es))
    out = []
    for cf in cands:
        th, tw, bc = cf.kwargs["TILE_H"], cf.kwargs["TILE_W"], cf.kwargs["BLOCK_C"]
        e = F._local_entry(tdt, tuple(ks), th, tw, bc, cf.num_warps, align=align)
        items = B * _cdiv(H, th) * _cdiv(W, tw) * _cdiv(C, bc)
        comp = compile_entry(e, arch)
        # the launcher's persistent grid: one wave at the compiled kernel's occupancy, capped by
        # the scratch budget (focal_context_fwd._max_prog / _budget_prog)
        per_sm = occupancy(comp["regs"], comp["smem"], cf.num_warps)
        progs = min(items, H100["sms"] * per_sm)
        if hasattr(F, "_budget_prog") and hasattr(F, "_slot_elems"):
            n_slots = 2 if L >= 3 else 1 if L == 2 else 0
            progs = min(progs, F._budget_prog(F._slot_elems(th, tw, bc, tuple(ks)), n_slots))
        nt = _cdiv(H, th) * _cdiv(W, tw)
        vals = dict(e["constexprs"], B=B, H=H, W=W, C=C, kz=0)
        loc = Launch(e["name"], e["config"], progs, items, hbm_local + B * nt * C * 4, comp, vals)
        bcg = F._global_block_c(C)
        ge = F._global_entry(tdt, L, bcg)
        cx = ge["constexprs"]
        npb = _cdiv(H * W, cx["BLOCK_P"] * cx["P_ITERS"])
        gprogs = B * npb * _cdiv(C, bcg)
        n_it = min(cx["P_ITERS"], _cdiv(H * W, cx["BLOCK_P"]))
        glob = Launch(ge["name"], ge["config"], gprogs, gprogs,
                      npix * (2 * C * es + _gate_bytes_per_pixel(L, es)) + B * nt * C * 4,
                      compile_entry(ge, arch), dict(cx, HW=H * W, W=W, C=C), {"NT": nt, "n_it": n_it})
        out.append((e["config"], [loc, glob]))
    return out


def triton_bwd_launches(shape, ks, dtype, arch=90):
    """[[candidates of launch 1], [candidates of launch 2], ...]: every autotuned launch of the
    backward with one Launch per shipped config (autotune picks each launch's best on its own)."""
    from .triton import focal_context_bwd as Bw
    B, H, W, C = shape
    L = len(ks)
    tdt, es = "*" + _TDT[dtype], _ESIZE[dtype]
    npix = B * H * W
    gb = _gate_bytes_per_pixel(L, es)
    groups = []
    ge = Bw._report_global(tdt)
    nblk = _cdiv(H * W, ge["constexprs"]["BLOCK_HW"])
    groups.append([Launch(ge["name"], ge["config"], B * nblk, B * nblk,
                          npix * (C * es + gb + (L + 1) * es) + B * nblk * C * 4, compile_entry(ge, arch),
                          dict(ge["constexprs"], B=B, H=H, W=W, C=C))])
    cfgs = list(Bw._GPU_TILE_CONFIGS)

    def dw(l, final):
        cands = []
        for cfg in cfgs:
            th, tw, bc, nw = cfg
            if final:
                e = Bw._report_dwconv(tdt, cfg, ks[0], True)
                hbm = npix * C * (4 + es)
            else:
                e = Bw._report_dwconv(tdt if l == 0 else "*fp32", cfg, ks[l], False)
                hbm = npix * C * ((es if l == 0 else 4) + 4)
            progs = Bw._ntiles(B, H, W, th, tw) * _cdiv(C, bc)
            cands.append(Launch(e["name"], e["config"], progs, progs, hbm, compile_entry(e, arch),
                                dict(e["constexprs"], B=B, H=H, W=W, C=C)))
        return cands

    for l in range(L - 1):
        groups.append(dw(l, False))
    for l in range(L - 1, -1, -1):
        top = l == L - 1
        R = Bw._rows(B, H, W, C, ks[l])
        cands = []
        step_cfgs = cfgs
        if hasattr(Bw, "_prune_step"):  # the module's own pruning (configs that spill)
            import triton
            conf = [triton.Config({"TILE_H": c[0], "TILE_W": c[1], "BLOCK_C": c[2]}, num_warps=c[3]) for c in cfgs]
            nargs = {"dout_ptr": _StubTensor(es, ()), "x_ptr": _StubTensor(es if l == 0 else 4, ()), "KOUT": ks[l],
                     "KIN": 1 if top else ks[l + 1], "TOP": top}
            kept = Bw._prune_step(conf, nargs)
            step_cfgs = [(c.kwargs["TILE_H"], c.kwargs["TILE_W"], c.kwargs["BLOCK_C"], c.num_warps) for c in kept]
        for cfg in step_cfgs:
            th, tw, bc, nw = cfg
            e = Bw._report_step(tdt, cfg, ks[l], 0 if top else ks[l + 1])
            if l == 0:  # x_0 is ctx itself: the model's dtype, a slice view (no aligned strides)
                e = dict(e, signature=dict(e["signature"], x_ptr=tdt),
                         attrs={k: v for k, v in e["attrs"].items() if k not in ("sxb", "sxh", "sxw")})
                e["name"] = e["name"].replace("]", " x=ctx]")
            xs = es if l == 0 else 4
            ws = R * ks[l] * ks[l] * C * 4
            hbm = npix * (C * (xs + es + 4 + (0 if top else 4)) + gb + (L + 1) * es) + 2 * ws
            items = Bw._ntiles(B, H, W, th, tw)
            cands.append(Launch(e["name"], e["config"], R, items, hbm, compile_entry(e, arch),
                                dict(e["constexprs"], B=B, H=H, W=W, C=C, R=R)))
        groups.append(cands)
    groups.append(dw(0, True))
    return groups


# ----------------------------------------------------------------------------------------------
# floor, auto, predict
# ----------------------------------------------------------------------------------------------
def floor(direction, shape, kernel_sizes, dtype, hw=H100) -> dict:
    """Notes section 4: taps x elements at the fp32 FMA rate (forward sum k^2 per element; the
    backward ~3x: recomputed z, transposed conv, weight gradient), and the minimal HBM bytes
    (forward: read ctx and gates, write out; backward: + read grad_out, write grad_ctx and
    grad_gates; ctx and gates read again) at the HBM rate; the larger one is the floor."""
    B, H, W, C = shape
    L = len(kernel_sizes)
    es = _ESIZE[dtype]
    elems = B * H * W * C
    taps = sum(k * k for k in kernel_sizes)
    fma = taps * elems * (1 if direction == "fwd" else 4)
    fma_ms = fma / (hw["sms"] * hw["fp32_per_clk"] * hw["clock_ghz"] * 1e9) * 1e3
    tok = B * H * W
    byt = tok * (2 * C + (L + 1)) * es
    if direction != "fwd":
        byt += tok * (3 * C + 2 * (L + 1)) * es
    hbm_ms = byt / (hw["hbm_tb_s"] * 1e12) * 1e3
    return {"floor_ms": max(fma_ms, hbm_ms), "fma_floor_ms": fma_ms, "hbm_floor_ms": hbm_ms,
            "floor_bound": "fp32" if fma_ms >= hbm_ms else "hbm", "fma": fma, "hbm_bytes": byt}


def auto_backend(kernel_sizes, dtype) -> str:
    """The backend focalnet_kernels.ops.select_backend picks for CUDA tensors of this
    configuration when both GPU backends are available (its table logic, called with a stand-in
    tensor)."""
    from unittest import mock

    import torch

    from . import ops
    stub = types.SimpleNamespace(device=types.SimpleNamespace(type="cuda"), dtype=getattr(torch, dtype))
    env = {k: v for k, v in os.environ.items() if k != "FOCALNET_KERNELS_BACKEND"}
    with mock.patch.object(ops, "triton_available", lambda: True), \
            mock.patch.object(ops, "_native_available", lambda d: True), \
            mock.patch.dict(os.environ, env, clear=True):
        return ops.select_backend(stub, list(kernel_sizes))


def _sum_launches(times):
    ms = sum(t["ms"] for t in times)
    worst = max(times, key=lambda t: t["ms"])
    return ms, f"{worst['bound']} ({worst['kernel']})"


def _triton_predict(direction, shape, ks, dtype, arch):
    fwd = []
    for label, launches in triton_fwd_launches(shape, ks, dtype, arch):
        times = [launch_time(ln) for ln in launches]
        ms, bound = _sum_launches(times)
        fwd.append({"config": label, "predicted_ms": ms, "bound": bound, "launches": times})
    best = min(fwd, key=lambda r: r["predicted_ms"])
    chosen = list(best["launches"])
    config = best["config"]
    cands = [{k: v for k, v in r.items() if k != "launches"} for r in fwd]
    bwd_choice = []
    if direction != "fwd":
        for group in triton_bwd_launches(shape, ks, dtype, arch):
            times = [launch_time(ln) for ln in group]
            t = min(times, key=lambda x: x["ms"])
            chosen.append(t)
            bwd_choice.append({"kernel": t["kernel"], "config": t["config"],
                               "candidates": {x["config"]: round(x["ms"], 4) for x in times}})
        config = f"fwd {config}; bwd " + ", ".join(sorted({c['config'] for c in bwd_choice}))
    return chosen, config, best["launches"][0], cands, bwd_choice


def predict(backend, direction, shape, kernel_sizes, dtype, arch=90) -> dict:
    """One row of the prediction (see the module docstring and docs/cost-model.md)."""
    shape = [int(v) for v in shape]
    ks = [int(k) for k in kernel_sizes]
    if backend == "triton":
        chosen, config, main_l, cands, bwd_choice = _triton_predict(direction, shape, ks, dtype, arch)
    elif backend == "cuda":
        chosen, config, main_l, cands, bwd_choice = _cuda_predict(direction, shape, ks, dtype)
    else:
        raise ValueError(f"backend {backend!r}: triton or cuda")
    ms, bound = _sum_launches(chosen)
    elems = shape[0] * shape[1] * shape[2] * shape[3]
    fl = floor(direction, shape, ks, dtype)
    instr = sum(t["warp_instr"] for t in chosen) * 32 / elems
    ffma = sum(t["ffma_warp_instr"] for t in chosen) * 32 / elems
    by_class = collections.Counter()
    for t in chosen:
        for k, v in t["by_class"].items():
            by_class[k] += v * 32 / elems
    try:
        auto = auto_backend(ks, dtype) == backend
    except Exception:  # torch missing: cannot ask ops
        auto = None
    return {
        "backend": backend, "direction": direction, "shape": shape, "kernel_sizes": ks, "dtype": dtype,
        "predicted_ms": round(ms, 4), "floor_ms": round(fl["floor_ms"], 4), "bound": bound, "auto": auto,
        "instr_per_elem": round(instr, 1), "ffma_per_elem": round(ffma, 1),
        "regs": main_l["regs"], "occupancy_warps": main_l["occupancy_warps"], "config": config,
        "spill_bytes": max(t["spill"] for t in chosen),
        "fma_floor_ms": round(fl["fma_floor_ms"], 4), "hbm_floor_ms": round(fl["hbm_floor_ms"], 4),
        "per_elem_by_class": {k: round(v, 1) for k, v in sorted(by_class.items())},
        "candidates": cands, "bwd_choice": bwd_choice,
        "launches": [dict({k: (round(v, 4) if isinstance(v, float) else v) for k, v in t.items()
                           if k not in ("loops", "by_class", "by_loop", "by_loop_class")},
                          **({"instr_per_elem_by_loop": {k: round(v * 32 / elems, 1) for k, v in
                                                         sorted(t["by_loop"].items(), key=lambda kv: -kv[1])
                                                         if v * 32 / elems >= 0.05},
                              "instr_per_elem_by_loop_class": {
                                  k: {q: round(v * 32 / elems, 1) for q, v in
                                      sorted(t["by_loop_class"].get(k, {}).items(), key=lambda kv: -kv[1])
                                      if v * 32 / elems >= 0.05}
                                  for k, v in t["by_loop"].items() if v * 32 / elems >= 0.05}}
                             if "by_loop" in t else {}))
                     for t in chosen],
        "prediction": "static model, not a measurement (docs/cost-model.md)",
    }


# ----------------------------------------------------------------------------------------------
# CUDA backend (forward): the planner of csrc/cuda/focal_context_cuda.cu (as of issue 11's GELU change) in
# Python, the cubin compiled with `nvcc -cubin -lineinfo -arch sm_90` (not the extension build:
# its cubins carry no line info), SASS loops mapped to the C++ `for` statements by line info.
# ----------------------------------------------------------------------------------------------
_CB, _NT, _NWARP, _GPW, _NGRP, _KMAX_ALL = 8, 256, 8, 4, 32, 15
_SMEM_BUDGET = 96 * 1024
_TILE_SIDES = (1, 2, 4, 7, 8, 12, 14, 16, 24, 28, 32)
_COST_PER_TILE, _COST_STAGE_BYTE, _COST_GENERIC, _COST_BOUNDARY_FWD = 2000.0, 2.0, 1.3, 176.0
_COST_BOUNDARY_RECOMPUTE = 50.0
_FUSED_SPECS = ((1, (3,)), (1, (5,)), (1, (7,)), (1, (9,)), (1, (11,)), (1, (13,)), (1, (15,)), (2, (3, 5)),
                (2, (5, 7)), (2, (9, 11)), (3, (3, 5, 7)), (3, (5, 7, 9)), (4, (3, 5, 7, 9)))


def _vblock(k):
    return 4 if k <= 3 else 8


_FV, _FV_SHORT, _PSLOTS = 8, 4, 16
_COST_GELU_STORE, _COST_PASS, _COST_ITEM = 16.0, 5.0, 24.0


def _tile_wp(tw):
    return 8 if tw <= 8 else (16 if tw <= 16 else 32)


def _seg_level_cost(g, j, V):
    """seg_level_cost() of the planner: level j's strips of V outputs (taps, row loads, per-item
    overhead, GELU and store per output), per thread-channel and tile."""
    k = g["ks"][j]
    orows, ocols = g["TH"] + 2 * g["R"][j + 1], g["TW"] + 2 * g["R"][j + 1]
    outs = (-(-orows // _GPW) * _GPW) * (-(-ocols // V) * V)
    return outs * ((k * k + k * (V + k - 1) / V) * (1.0 if g["kfix"] else _COST_GENERIC) + _COST_GELU_STORE
                   + _COST_ITEM / V)


def _fused_geom(ks, H, W, th, tw, budget=None, fwd=True):
    """fused_geom() of the planner: the segment's tile geometry, strip lengths (vmask) and shared
    memory (fwd=False: the backward's recompute, without the gate table)."""
    budget = _SMEM_BUDGET if budget is None else budget
    nl = len(ks)
    kfix = (nl, tuple(ks)) in _FUSED_SPECS
    TH, TW = min(th, H), min(tw, W)
    if TW > 32 or TH * _tile_wp(TW) > 32 * _PSLOTS:
        return None
    R = [0] * (nl + 1)
    for j in range(nl - 1, -1, -1):
        R[j] = R[j + 1] + ks[j] // 2
    g = {"TH": TH, "TW": TW, "R": R, "kfix": kfix, "ks": list(ks)}
    vmask = 0
    for j in range(nl):
        if _seg_level_cost(g, j, _FV_SHORT) < _seg_level_cost(g, j, _FV):
            vmask |= 1 << j
    V = [(_FV_SHORT if (vmask >> j) & 1 else _FV) for j in range(nl)]
    sizeA = sizeB = 0
    pitch = [0] * (nl + 1)
    for j in range(nl + 1):
        rows, cols = TH + 2 * R[j], TW + 2 * R[j]
        pt = cols
        if j < nl:
            pt = max(pt, _cdiv(TW + 2 * R[j + 1], V[j]) * V[j] + ks[j] - 1)
        if j > 0:
            pt = max(pt, _cdiv(cols, V[j - 1]) * V[j - 1])
        pt |= 1
        pitch[j] = pt
        sz = rows * pt * _CB
        if j & 1:
            sizeB = max(sizeB, sz)
        else:
            sizeA = max(sizeA, sz)
    accP = TW | 1
    offA, offB = 0, sizeA
    off = sizeA + sizeB + sum(k * k * _CB for k in ks)
    offG = off
    if fwd:
        off += -(-(nl * TH * accP) // 4) * 4
    off += _NT
    twp = _tile_wp(TW)
    rows_max = _PSLOTS * (32 // twp)
    for j in range(1, nl + 1):
        start = offB if j & 1 else offA
        off = max(off, start + ((rows_max + R[j]) * pitch[j] + twp + R[j]) * _CB)
    if fwd:
        off = max(off, offG + nl * TH * accP + rows_max * accP + twp)
    g.update({"smem": off * 4, "ntiles": _cdiv(H, TH) * _cdiv(W, TW), "vmask": vmask, "V": V, "pitch": pitch})
    return g if g["smem"] <= budget else None


def _fused_cost(g, H, W):
    """fused_cost() of the planner."""
    per_tile = _COST_PER_TILE
    for j in range(len(g["ks"])):
        per_tile += _seg_level_cost(g, j, g["V"][j])
        per_tile += _COST_PASS * g["TH"] * _tile_wp(g["TW"])
    per_tile += _COST_STAGE_BYTE * 4.0 * (g["TH"] + 2 * g["R"][0]) * (g["TW"] + 2 * g["R"][0])
    return per_tile * g["ntiles"] / (H * W)


def cuda_plan_fwd(shape, ks, fwd=True):
    """make_segments() + plan_segment_tile() of the planner: [(segment geometry, cost)], the
    partition of the levels with the lowest modelled cost (first found on ties, as in C++).
    fwd=False: the backward's recompute of x_1 .. x_{L-1} (ks = the first L-1 kernel sizes)."""
    B, H, W, C = shape
    n = len(ks)
    best, best_cost = None, 0.0
    for mask in range(1 << (n - 1)):
        segs, cost, l = [], 0.0, 0
        while l < n:
            m = 1
            while l + m < n and not ((mask >> (l + m - 1)) & 1):
                m += 1
            seg_ks = ks[l:l + m]
            tb, tc = None, 0.0
            for th in _TILE_SIDES:
                for tw in _TILE_SIDES:
                    g = _fused_geom(seg_ks, H, W, th, tw, fwd=fwd)
                    if g is None or B * g["ntiles"] * _cdiv(C, _CB) > 2 ** 31 - 1:
                        continue
                    c = _fused_cost(g, H, W)
                    if tb is None or c < tc:
                        tb, tc = g, c
            if tb is None:
                break
            tb["l0"] = l
            segs.append(tb)
            cost += tc
            l += m
        else:
            cost += (len(segs) - 1) * (_COST_BOUNDARY_FWD if fwd else _COST_BOUNDARY_RECOMPUTE)
            if best is None or cost < best_cost:
                best, best_cost = segs, cost
    return best


_PREP_POS, _TARGET_BLOCKS = 4 * _NT, 2048


def _level_geom(k, H, W, th, tw):
    """level_geom() of the planner: the per-level backward kernel's tile and shared memory."""
    TH, TW = min(th, H), min(tw, W)
    p, V = k // 2, _vblock(k)
    pX = max(TW + 4 * p, _cdiv(TW + 2 * p, V) * V + k - 1) | 1
    pZ = max(TW + 2 * p, _cdiv(TW, V) * V + k - 1) | 1
    accP = TW | 1
    NP = _NGRP // k
    sizeX = max((TH + 4 * p) * pX * _CB, NP * k * k * _CB)
    sizeZ = (TH + 2 * p) * pZ * _CB
    off = sizeX + sizeZ + k * k * _CB + TH * accP * _CB + -(-(TH * accP) // 4) * 4
    g = {"k": k, "TH": TH, "TW": TW, "smem": off * 4, "ntiles": _cdiv(H, TH) * _cdiv(W, TW), "NP": NP}
    return g if g["smem"] <= _SMEM_BUDGET else None


def _level_cost(g, H, W):
    """level_cost() of the planner."""
    k, TH, TW = g["k"], g["TH"], g["TW"]
    p, V = k // 2, _vblock(k)

    def ru(a, m):
        return _cdiv(a, m) * m
    per_tile = _COST_PER_TILE
    per_tile += k * k * ru(TH + 2 * p, _GPW) * ru(TW + 2 * p, V)
    per_tile += k * k * ru(TH, _GPW) * ru(TW, V)
    per_tile += 2.0 * k * k * TH * TW
    per_tile += _COST_STAGE_BYTE * 4.0 * ((TH + 4 * p) * (TW + 4 * p) + (TH + 2 * p) * (TW + 2 * p))
    return per_tile * g["ntiles"] / (H * W)


def cuda_bwd_plan_string(plan) -> str:
    """A plan of cuda_plan_bwd in the format of the extension's focal_context_bwd_plan_cuda."""
    s = "recompute"
    if plan["mma"] is not None:
        s += f" mma {plan['mma']['TH']}x{plan['mma']['TW']} else"
    s += "".join(f" {g['TH']}x{g['TW']}" for g in plan["segs"])
    for l, g in enumerate(plan["levels"]):
        m = plan["lvm"][l]
        s += f"; level {l}: k{g['k']}"
        if m is not None:
            s += f" mma {m['TH']}x{m['TW']} slots {m['nslots']} else"
        s += f" {g['TH']}x{g['TW']} slots {g['nslots']}"
    return s


def cuda_plan_bwd(shape, ks, dtype="float32"):
    """plan_bwd() of the planner: the recompute (on tensor cores where the forward is: "mma", the
    forward's plan; the FMA segments of levels 0 .. L-2 are then its fallback), the per-level tiles
    and their slot counts (persistent grid of FC_BWD_TARGET_BLOCKS blocks), the prep kernel's chunks."""
    B, H, W, C = shape
    L = len(ks)
    cbl = _cdiv(C, _CB)
    levels = []
    for k in ks:
        best, bc = None, 0.0
        for th in _TILE_SIDES:
            for tw in _TILE_SIDES:
                g = _level_geom(k, H, W, th, tw)
                if g is None:
                    continue
                c = _level_cost(g, H, W)
                if best is None or c < bc:
                    best, bc = g, c
        best["nslots"] = min(B * best["ntiles"], max(1, _TARGET_BLOCKS // cbl))
        levels.append(best)
    mp = cuda_plan_mma(shape, list(ks), dtype, rec=True)
    lvm = [None] * L
    if mp is not None and os.environ.get("FOCALNET_CUDA_MMA_BWD", "") != "0":
        for l, k in enumerate(ks):
            lvm[l] = cuda_plan_level_mma(shape, k, dtype)
            if lvm[l] is not None:
                lvm[l]["nslots"] = levels[l]["nslots"]
    return {"mma": mp if L >= 2 else None, "lvm": lvm,
            "segs": cuda_plan_fwd(shape, list(ks[:L - 1]), fwd=False) if L >= 2 else [],
            "levels": levels, "nchunk": _cdiv(H * W, _PREP_POS)}


def _cpp_fors(text, unrolled=False):
    """[(header line, end line, header text)] of every C++ `for` and `while` statement of a source
    text (without those under `#pragma unroll` -- not `unroll 1` --, which are no SASS loops,
    unless `unrolled`)."""
    out = []
    lines = text.splitlines()
    for m in re.finditer(r"\b(?:for|while)\s*\(", text):
        ln = text.count("\n", 0, m.start())
        prev = next((lines[i].strip() for i in range(ln - 1, -1, -1) if lines[i].strip()), "")
        if prev.startswith("#pragma unroll") and prev.split() != ["#pragma", "unroll", "1"] and not unrolled:
            continue
        i, depth = m.end() - 1, 0
        while i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            if depth == 0:
                break
            i += 1
        header = re.sub(r"\s+", " ", text[m.start():i + 1])
        j = i + 1
        while j < len(text) and text[j].isspace():
            j += 1
        if j < len(text) and text[j] == "{":
            d = 0
            while j < len(text):
                d += {"{": 1, "}": -1}.get(text[j], 0)
                if d == 0:
                    break
                j += 1
        else:
            j = text.find(";", j)
        out.append((text.count("\n", 0, m.start()) + 1, text.count("\n", 0, j) + 1, header))
    return out


# per-thread trip counts of the CUDA kernels' loops by their header (fractional: averages over
# the threads / warps of a block, so that x warps gives the block's warp-iterations)
_CUDA_TRIPS = [
    # tensor-core forward (fc_mma.cuh): subtile loops of the levels before the last, in order
    (r"sr = 0; sr < nrow; \+\+sr", lambda ns: ns["mma_rows"].pop(0) if ns.get("mma_rows") else 0.0),
    (r"sc = 0; sc < ncol; \+\+sc", lambda ns: ns["mma_cols"].pop(0) if ns.get("mma_cols") else 0.0),
    (r"j = 0; j < ncb; \+\+j", lambda ns: ns["epi_cpt"]),
    (r"fr = 0; fr < nrowL; \+\+fr", lambda ns: ns["mma_last"][0]),
    (r"fc = 0; fc < ncolL; \+\+fc", lambda ns: ns["mma_last"][1]),
    (r"r = warp; r < rows; r \+= NWARP", lambda ns: ns["mma_stage"][0] / _NWARP),
    (r"s = 2 \* lane; s < cols; s \+= 64", lambda ns: _cdiv(ns["mma_stage"][1], 64)),
    (r"ty = warp; ty < (TH|thl); ty \+= NWARP", lambda ns: ns["mma_tile"][0] / _NWARP),
    (r"tx = lane; tx < (TW|twl); tx \+= 32", lambda ns: _cdiv(ns["mma_tile"][1], 32)),
    (r"int j = 0; j < nl; \+\+j", lambda ns: ns["nl"]),
    (r"idx < kk \* CB; idx \+= NT", lambda ns: ns["kk_mean"] * _CB / _NT),
    (r"tap = tid / CB; tap < kk; tap \+= NGRP", lambda ns: ns["kk_mean"] / _NGRP),
    (r"while \(r < rows\)", lambda ns: ns["stage_n"] / _NT),
    (r"idx < nl \* tpos; idx \+= NT", lambda ns: ns["nl"] * ns["tpos"] / _NT),
    (r"pos < tpos; pos \+= NT", lambda ns: ns["tpos"] / _NT),
    (r"idx = threadIdx.x; idx < n; idx \+= NT", lambda ns: ns["stage_n"] / _NT),
    (r"it = warp; it < nitems; it \+= NWARP", lambda ns: ns["nitems"].pop(0) / _NWARP if ns["nitems"] else 0.0),
    (r"g < NGRP", lambda ns: _NGRP),
    (r"t = 0; t < ntiles", lambda ns: ns["ntiles"]),
    (r"idx < n; idx \+= \(int64_t\)gridDim.x \* NT", lambda ns: ns["grid_trips"]),
    # tensor-core backward level kernel (fc_bwd_mma.cuh)
    (r"tt = slot; tt < total; tt \+= \(unsigned\)P.nslots", lambda ns: ns["lv_tiles"]),
    (r"r = warp; r < zr; r \+= NWARP", lambda ns: ns["zr"] / _NWARP),
    (r"s = lane; s < zc; s \+= 32", lambda ns: _cdiv(ns["zc"], 32)),
    (r"sr = 0; sr < P.nrowZ", lambda ns: ns["nrowZ"]),
    (r"sc = 0; sc < P.ncolZ", lambda ns: ns["ncolZ"]),
    (r"rb = 0; rb < P.nrowT", lambda ns: ns["nrowT"]),
    (r"j = 0; j < P.ncolE", lambda ns: ns["ncolE"]),
    (r"fr2 = 0; fr2 < P.nrowT", lambda ns: ns["nrowT"]),
    (r"fc2 = 0; fc2 < P.ncolT", lambda ns: ns["ncolT"]),
    (r"ti = warp; ti < thl; ti \+= NWARP", lambda ns: ns["TH"] / _NWARP),
    (r"tj = lane; tj < twl; tj \+= 32", lambda ns: _cdiv(ns["TW"], 32)),
    (r"q = lane; q < K \* K; q \+= 32", lambda ns: _cdiv(ns["kk"], 32)),
    # backward (fc_kernels.cuh): prep, finish kernels, the per-level kernel
    (r"m = 0; m < PREP_POS / NT", lambda ns: ns["prep_trips"]),
    (r"g = 0; g < NWARP", lambda ns: _NWARP),
    (r"t = 0; t < nchunk", lambda ns: ns["nchunk"]),
    (r"cb = 0; cb < cblocks", lambda ns: ns["cblocks"]),
    (r"sl = 0; sl < nslots", lambda ns: ns["nslots"]),
    (r"t = slot; t < total; t \+= \(unsigned\)P.nslots", lambda ns: ns["lv_tiles"]),
    (r"idx = tid; idx < KK \* CB; idx \+= NT", lambda ns: ns["kk"] * _CB / _NT),
    (r"idx = tid; idx < zr \* zc; idx \+= NT", lambda ns: ns["zrzc"] / _NT),
    (r"pos = tid; pos < TH \* TW; pos \+= NT", lambda ns: ns["thtw"] / _NT),
    (r"r = pp; r < nr; r \+= NP", lambda ns: ns["wrows"]),
    (r"s = 0; s < nc; \+\+s", lambda ns: ns["wcols"]),
    (r"q = 0; q < NP; \+\+q", lambda ns: ns["np"]),
]


# FFMA per source iteration of loops the compiler unrolls into copies of different factors
_CUDA_UNROLL_UNIT = [
    (r"s = 0; s < nc; \+\+s", lambda ns: ns["kunit"]),   # the backward's weight-gradient row: K FFMA
]


_WARNED = set()


def _warn_once(msg):
    """To stderr, once per message (the CLI's JSON on stdout stays parseable)."""
    if msg not in _WARNED:
        _WARNED.add(msg)
        print(f"cost_model: WARNING: {msg}", file=sys.stderr)


def _cuda_compile_dir():
    return os.environ.get("FOCALNET_CUDA_CUBIN_DIR") or os.path.join(_cache_dir(), "cuda")


def cuda_cubin(root=None):
    """(SASS text with line info, -res-usage text, {file: source text}) of the CUDA backend for
    sm_90, compiled once into the cache with `nvcc -cubin -lineinfo` (minutes on 2 cores)."""
    root = root or os.environ.get("FOCALNET_CUDA_SRC") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    srcs = {}
    for n in ("focal_context_cuda.cu", "fc_kernels.cuh", "fc_device.cuh", "fc_mma.cuh", "fc_bwd_mma.cuh"):
        with open(os.path.join(root, "csrc", "cuda", n)) as f:
            srcs[n] = f.read()
    # "gi": the SASS carries inlined-at call sites (nvdisasm -gi), which entries before it lack
    key = hashlib.sha1(("gi" + "".join(srcs[k] for k in sorted(srcs))).encode()).hexdigest()[:20]
    d = _cuda_compile_dir()
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, key + ".json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    import shutil
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise NotImplementedError("CUDA backend: nvcc not found (the model compiles the CUDA kernels with "
                                  "-lineinfo to map their loops)")
    with tempfile.TemporaryDirectory() as t:
        shutil.copytree(os.path.join(root, "csrc"), os.path.join(t, "csrc"))
        cub = os.path.join(t, "fc.cubin")
        subprocess.run([nvcc, "-O3", "-std", "c++17", "-arch", "sm_90", "-cubin", "-lineinfo", "-Icsrc",
                        "-DFOCALNET_WITH_CUDA", "-o", cub, "csrc/cuda/focal_context_cuda.cu"], cwd=t, check=True,
                       capture_output=True)
        sass = subprocess.run([_tool("nvdisasm"), "-gi", cub], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", cub], capture_output=True, text=True,
                             check=True).stdout
    out = {"sass": sass, "res": res, "source": srcs}
    with open(path + ".tmp", "w") as f:
        json.dump(out, f)
    os.replace(path + ".tmp", path)
    _prune_cache(d, keep=4)
    return out


def _prune_cache(d, keep):
    """Removes all but the `keep` newest entries of a cache directory (one CUDA cubin entry is
    ~130 MB of SASS text, and every source edit adds one)."""
    entries = sorted((os.path.join(d, n) for n in os.listdir(d) if n.endswith(".json")),
                     key=os.path.getmtime, reverse=True)
    for p in entries[keep:]:
        try:
            os.remove(p)
        except OSError:
            pass


def _cuda_fn_name(sass, *parts):
    for ln in sass.splitlines():
        s = ln.strip()
        if s.startswith(".text.") and s.endswith(":") and all(p in s for p in parts):
            return s[len(".text."):-1]
    raise KeyError(parts)


def _cuda_analyze(cub, name, ns, prefer_width=None):
    """Counts per block of one CUDA kernel: SASS loops -> C++ `for` (the header line of the loop's
    backward branch when it is one; else the innermost enclosing `for` of its instructions' line info,
    the same enclosure rule as for Triton) -> trips from _CUDA_TRIPS.  Sibling loops of one
    header that is not the level loop are run-time alternatives (template instances, unswitched
    vector/scalar paths): only the one whose global loads have `prefer_width` bytes counts."""
    instrs = parse_sass(cub["sass"], name)
    loops = find_loops(instrs)
    fors = {}
    for fname, text in cub["source"].items():
        for hl, el, hdr in _cpp_fors(text):
            fors[(fname, hl)] = (el, hdr)

    def fkey(x):
        return os.path.basename(x.file) if x.file else None

    def encloses(o, i):
        return o[0] != i[0] or (o[1] < i[1] <= fors[o][0])

    def depth(i):
        d = 0
        while loops[i].parent is not None:
            i, d = loops[i].parent, d + 1
        return d

    byaddr = {x.addr: x for x in instrs}
    for idx in sorted(range(len(loops)), key=lambda i: -depth(i)):
        lp = loops[idx]
        # the backward branch carries the line of the `for` it closes (its condition): decisive where
        # loop-invariant code hoisted into a loop outvotes the header (a per-tile block of code in an
        # inner loop's region once made that inner loop the tile loop, and the tile loop sourceless)
        be = byaddr.get(lp.end)
        if be is not None and (fkey(be), be.line) in fors:
            lp.source = (fkey(be), be.line)
            continue
        kids = [loops[c].source for c in lp.children if loops[c].source]
        votes = collections.Counter()
        for x in _own(instrs, loops, idx):
            f = fkey(x)
            if f is None or not x.line:
                continue
            inner = [k for k in fors if k[0] == f and k[1] <= x.line <= fors[k][0]
                     and all(encloses(k, c) for c in kids)]
            if inner:
                votes[max(inner, key=lambda k: k[1])] += 1
        lp.source = votes.most_common(1)[0][0] if votes else None
    ns = dict(ns, nitems=list(ns.get("nitems", [])), mma_rows=list(ns.get("mma_rows", [])),
              mma_cols=list(ns.get("mma_cols", [])))
    groups = collections.defaultdict(list)
    for i in sorted(range(len(loops)), key=lambda i: loops[i].start):
        if loops[i].source:
            groups[(loops[i].parent, loops[i].source)].append(i)

    def call_sites(i):  # `nvdisasm -gi`: where the loop's backward branch was inlined ("" if not)
        be = byaddr.get(loops[i].end)
        return be.inl if be is not None else ""
    for i in sorted(range(len(loops)), key=lambda i: loops[i].start):
        lp = loops[i]
        if lp.source is None:
            lp.trips, lp.how = 1.0, "no source loop (1 trip assumed)"
            continue
        hdr = fors[lp.source][1]
        lp.trips, lp.how = 1.0, f"{lp.source[0]}:{lp.source[1]} {hdr}: UNKNOWN trip count (1 assumed)"
        for pat, fn in _CUDA_TRIPS:
            if re.search(pat, hdr):
                lp.trips = float(fn(ns))
                lp.how = f"{lp.source[0]}:{lp.source[1]} {hdr} = {lp.trips:.3g}"
                break
        else:
            _warn_once(f"{name}: {lp.how} (a loop header without a rule in _CUDA_TRIPS: the prediction "
                       "undercounts it)")
    # conv item loops of the fused forward: per level one loop per strip length (FV, FV_SHORT;
    # the planner's vmask picks one at run time), in level order; the one with more FFMA per trip
    # is the FV strip. ns["levels"]: [(items with FV strips, items with FV_SHORT strips, V picked)]
    def ffma(i):  # FFMA of a loop's own instructions (not its nested loops')
        return sum(1 for x in _own(instrs, loops, i) if x.cls == "ffma")

    levels = ns.get("levels")
    if levels is not None:
        conv = [i for i in sorted(range(len(loops)), key=lambda i: loops[i].start)
                if loops[i].source and "it = warp" in fors[loops[i].source][1]]
        if len(conv) == 2 * len(levels):
            for j, (n8, n4, v) in enumerate(levels):
                a, b = conv[2 * j], conv[2 * j + 1]
                i8, i4 = (a, b) if ffma(a) >= ffma(b) else (b, a)
                loops[i8].trips = n8 / _NWARP if v == _FV else 0.0
                loops[i4].trips = n4 / _NWARP if v == _FV_SHORT else 0.0
                for i, vv in ((i8, _FV), (i4, _FV_SHORT)):
                    loops[i].how = re.sub(r" = [^ ]+$", "", loops[i].how) + \
                        f" = {loops[i].trips:.3g} (level {j}, V={vv}{'' if vv == v else ': not taken'})"
        else:
            for i in conv:
                loops[i].how += f" (UNMATCHED: {len(conv)} conv loops for {len(levels)} levels)"
    for (par, key), idxs_all in groups.items():
        if len(idxs_all) < 2 or "it = warp" in fors[key][1]:
            continue

        def widths(i):
            return collections.Counter(x.width for x in instrs
                                       if loops[i].has(x.addr) and x.cls == "ldg")

        def work(i):
            return sum(1 for x in instrs if loops[i].has(x.addr) and x.cls in _WORK)

        if len({frozenset(widths(i)) for i in idxs_all}) == 1:
            # the same accesses: one loop unrolled by the compiler (xu main + remainder), among the
            # copies inlined at the same call sites; a helper inlined at two calls (mma_level for two
            # levels) gives instances, each with its own trips. The unroll factor of each copy: its
            # FFMA over the FFMA of one source iteration where _CUDA_UNROLL_UNIT knows it (the
            # remainder copy may itself be unrolled), else its work over the smallest copy's
            by_site = collections.defaultdict(list)
            for i in idxs_all:
                by_site[call_sites(i)].append(i)
            unit = next((fn(ns) for pat, fn in _CUDA_UNROLL_UNIT if re.search(pat, fors[key][1])), None)
            for idxs in by_site.values():
                if len(idxs) < 2:
                    continue
                w1 = max(1, min(work(i) for i in idxs))
                rem = loops[idxs[0]].trips
                for i in sorted(idxs, key=work, reverse=True):
                    u = max(1, round(ffma(i) / unit) if unit else round(work(i) / w1))
                    t = float(math.floor(rem / u)) if u > 1 else rem
                    loops[i].trips = t
                    rem -= t * u
                    loops[i].how += f" (split: x{u})"
        else:
            idxs = idxs_all
            # different access widths: run-time alternatives (template instances, vector/scalar)
            # (prefer_width may be a tuple of widths in order of preference: the first that one of the
            # alternatives loads at decides -- the level kernel's ctx staging is 8-byte where its dout
            # loads in the epilogue are 16-byte)
            prefs = prefer_width if isinstance(prefer_width, tuple) else (prefer_width,)
            pw = next((w for w in prefs if any(widths(i).get(w, 0) for i in idxs)), prefs[0])
            keep = max(idxs, key=lambda i: widths(i).get(pw, 0))
            for i in idxs:
                if i != keep:
                    loops[i].trips = 0.0
                    loops[i].how += " (alternative not taken)"
    c = count(instrs, loops)
    c["loops"] = [{"start": hex(lp.start), "end": hex(lp.end), "depth": _depth(loops, i), "trips": lp.trips,
                   "how": lp.how} for i, lp in enumerate(loops)]
    return c


def _cuda_launch_time(cub, name, warps, smem, blocks, ns, hbm, prefer_width=None, hw=H100):
    c = _cuda_analyze(cub, name, ns, prefer_width)
    regs = report_regs(cub["res"], name)
    per_sm = occupancy(regs, smem, warps, hw)
    sms = hw["sms"]
    blk_sm = math.ceil(blocks / sms)
    it = c["item"]
    clk = hw["clock_ghz"] * 1e9

    def sm_(k):
        return blk_sm * warps * it.get(k, 0)
    l1b = blk_sm * warps * sum(c["item_bytes"].values())
    l2b = blk_sm * warps * sum(c["item_l2"].values())
    lsu = sum(sm_(k) for k in ("ldg", "stg", "lds", "sts", "ldl_stl", "atom")) * 32
    terms = {
        "issue": sm_("total") / hw["issue_warp_instr_per_clk"] / clk,
        "fp32": sum(sm_(k) for k in ("ffma", "fmul", "fadd")) * 32 / hw["fp32_per_clk"] / clk,
        "mufu": sm_("mufu") * 32 / hw["mufu_per_clk"] / clk,
        "tensor": sm_("hmma") / hw["hmma16816_per_clk"] / clk,
        "int": sm_("int") * 32 / hw["int_per_clk"] / clk,
        "l1": max(lsu / hw["lsu_per_clk"], l1b / hw["l1_bytes_per_clk"]) / clk,
        "l2": l2b * sms / (hw["l2_tb_s"] * 1e12),
        "hbm": hbm / (hw["hbm_tb_s"] * 1e12),
    }
    bound = max(terms, key=terms.get)
    by_class = {k: v * blocks * warps for k, v in it.items()}
    short = re.sub(r"^_ZN8focalnet3fcc\d+", "", name)[:60]
    return {"kernel": short, "config": ns.get("config", ""), "ms": terms[bound] * 1e3, "bound": bound,
            "terms_ms": {k: v * 1e3 for k, v in terms.items()}, "regs": regs, "smem": smem, "spill": 0,
            "warps": warps, "blocks_per_sm": per_sm, "occupancy_warps": per_sm * warps, "programs": blocks,
            "items": blocks, "warp_instr": by_class.get("total", 0), "ffma_warp_instr": by_class.get("ffma", 0),
            "by_class": by_class, "hbm_bytes": hbm, "loops": c["loops"],
            "by_loop": {k: v * blocks * warps for k, v in c["by_loop"].items()},
            "by_loop_class": {k: {q: v * blocks * warps for q, v in cc.items()} for k, cc in c["by_loop_class"].items()}}


def report_regs(res, name):
    from . import report
    return report._parse_res(res, name).get("REG", 0)


def _fused_seg_launch(cub, tname, g, B, C):
    """One launch of fc_fused_kernel for a planned segment g (forward, or the backward's recompute)."""
    seg_ks = g["ks"]
    nl = len(seg_ks)
    spec = (nl, tuple(seg_ks)) in _FUSED_SPECS
    targs = "".join(f"Li{v}E" for v in ([nl] + seg_ks + [0] * (4 - nl))) if spec else "Li0ELi0ELi0ELi0ELi0E"
    name = _cuda_fn_name(cub["sass"], "fc_fused_kernel" + tname + targs)
    nitems, levels = [], []
    for j, k in enumerate(seg_ks):
        orows, ocols = g["TH"] + 2 * g["R"][j + 1], g["TW"] + 2 * g["R"][j + 1]
        n8, n4 = (_cdiv(orows, _GPW) * _cdiv(ocols, V) for V in (_FV, _FV_SHORT))
        levels.append((n8, n4, g["V"][j]))
        nitems.append(n4 if g["V"][j] == _FV_SHORT else n8)
    rows0, cols0 = g["TH"] + 2 * g["R"][0], g["TW"] + 2 * g["R"][0]
    blocks = B * g["ntiles"] * _cdiv(C, _CB)
    ns = {"nl": nl, "kk_mean": sum(k * k for k in seg_ks) / nl, "tpos": g["TH"] * g["TW"],
          "stage_n": rows0 * cols0, "nitems": nitems, "ntiles": g["ntiles"], "grid_trips": 1.0,
          "levels": levels if spec else None,
          "config": f"{g['TH']}x{g['TW']} tile, segment k={','.join(map(str, seg_ks))}"}
    return name, blocks, ns


def _xmap_esize(dtype):
    """Bytes per element of the CUDA workspace's level maps x_1 .. x_{L-1} (WsT<T> in fc_device.cuh)."""
    return 2 if dtype == "bfloat16" else 4


def _cuda_bwd_launches(shape, ks, dtype, cub, tname, vec):
    """The backward's launches (run_bwd): recompute x_1 .. x_{L-1}, prep + dpool, the per-level kernels
    l = L-1 .. 0, the gate and weight-gradient reductions."""
    B, H, W, C = shape
    L = len(ks)
    es = _ESIZE[dtype]
    xm_es = _xmap_esize(dtype)
    npix = B * H * W
    cbl = _cdiv(C, _CB)
    gate = _gate_bytes_per_pixel(L, es)
    plan = cuda_plan_bwd(shape, ks, dtype)
    times = []
    mp = plan["mma"]
    if mp is not None:
        times.append(_mma_launch(cub, tname, shape, ks, mp, True, npix * (C * es + (L - 1) * C * xm_es), vec))
    for g in plan["segs"]:
        src_es = es if g["l0"] == 0 else xm_es
        name, blocks, ns = _fused_seg_launch(cub, tname, g, B, C)
        if mp is not None:
            times.append(_gated_launch(cub, name, blocks, g))
            continue
        hbm = npix * (C * src_es + len(g["ks"]) * C * xm_es)
        times.append(_cuda_launch_time(cub, name, _NWARP, g["smem"], blocks, ns, hbm,
                                       16 if (vec or g["l0"] > 0) else src_es))
    nch = plan["nchunk"]
    blocks = B * nch * cbl
    # FLAT (no division by W): dout contiguous and the gates a slice of the f output, rows back to back
    times.append(_cuda_launch_time(cub, _cuda_fn_name(cub["sass"], "fc_bwd_prep_kernel" + tname + "Lb0ELb1E"), _NWARP, _NT * 4,
                                   blocks, {"grid_trips": 1.0, "prep_trips": H * W / (nch * _NT),
                                            "config": f"{nch} chunks of {_PREP_POS}"},
                                   npix * (C * es + gate + cbl * 4) + B * nch * C * 4, 16 if vec else es))
    n = B * C
    grid = min(_cdiv(n, _NT), 1 << 20)
    times.append(_cuda_launch_time(cub, _cuda_fn_name(cub["sass"], "fc_dpool_finish_kernel"), _NWARP, 0, grid,
                                   {"nchunk": nch, "grid_trips": n / (grid * _NT), "config": "grid_1d(B*C)"},
                                   B * nch * C * 4 + 3 * B * C * 4))
    for l in range(L - 1, -1, -1):
        g = plan["levels"][l]
        k, TH, TW = g["k"], g["TH"], g["TW"]
        p, V = k // 2, _vblock(k)
        name = _cuda_fn_name(cub["sass"], "fc_bwd_level_kernel" + tname + f"Li{k}E")
        blocks = g["nslots"] * cbl
        ns = {"lv_tiles": B * g["ntiles"] / g["nslots"], "kk": k * k, "stage_n": (TH + 4 * p) * (TW + 4 * p),
              "zrzc": (TH + 2 * p) * (TW + 2 * p), "thtw": TH * TW,
              "nitems": [_cdiv(TH + 2 * p, _GPW) * _cdiv(TW + 2 * p, V), _cdiv(TH, _GPW) * _cdiv(TW, V)],
              "wrows": TH / g["NP"], "wcols": TW, "kunit": k, "np": g["NP"], "grid_trips": 1.0,
              "config": f"level {l} k={k}: {TH}x{TW} tile, {g['nslots']} slots"}
        x_es = es if l == 0 else xm_es
        dx_in = C * es + gate if l == L - 1 else C * 4
        dx_out = C * es if l == 0 else C * 4
        # gate partials gg[cb][l][pos]: 4 bytes per position and channel block, full sectors
        hbm = npix * (C * x_es + dx_in + C * es + gate + dx_out + cbl * 4) + g["nslots"] * k * k * C * 4
        m = plan["lvm"][l]
        if m is not None:
            # the tensor-core level kernel; the FMA one behind it only tests its flag
            role = 0 if l == 0 else (2 if l == L - 1 else 1)   # LevelRole: first, middle, last
            mname = _cuda_fn_name(cub["sass"], "fc_bwd_level_mma_kernel" + f"ILi{k}ELi{role}E")
            mns = {"lv_tiles": B * m["ntiles"] / m["nslots"], "mma_stage": (m["xrows"], m["xp"]),
                   "zr": m["nrows"], "zc": m["TW"] + k - 1, "nrowZ": m["nrowZ"], "ncolZ": m["ncolZ"],
                   "nrowT": m["nrowT"], "ncolT": m["ncolT"], "ncolE": m["ncolE"], "TH": m["TH"], "TW": m["TW"],
                   "kk": k * k, "grid_trips": 1.0,
                   "config": f"level {l} k={k}: tensor cores, {m['TH']}x{m['TW']} tile, {m['nslots']} slots"}
            times.append(_cuda_launch_time(cub, mname, _NWARP, m["smem"], m["nslots"] * cbl, mns, hbm,
                                           16 if (l > 0 or vec) else (8, 16)))
            times.append(_gated_launch(cub, name, blocks, g))
            continue
        times.append(_cuda_launch_time(cub, name, _NWARP, g["smem"], blocks, ns, hbm,
                                       16 if (l > 0 or vec) else es))
    ng = npix * (L + 1)
    grid = min(_cdiv(ng, _NT), 1 << 20)
    times.append(_cuda_launch_time(cub, _cuda_fn_name(cub["sass"], "fc_gates_finish_kernel" + tname), _NWARP, 0,
                                   grid, {"cblocks": cbl, "grid_trips": ng / (grid * _NT),
                                          "config": "grid_1d(B*H*W*(L+1))"},
                                   ng * (cbl * 4 + es)))
    for l in range(L):
        g = plan["levels"][l]
        n = g["k"] ** 2 * C
        grid = min(_cdiv(n, _NT), 1 << 20)
        times.append(_cuda_launch_time(cub, _cuda_fn_name(cub["sass"], "fc_gw_finish_kernel"), _NWARP, 0, grid,
                                       {"nslots": g["nslots"], "grid_trips": n / (grid * _NT),
                                        "config": f"level {l}: grid_1d(k*k*C)"},
                                       g["nslots"] * n * 4 + n * 4))
    return times


def _cuda_predict(direction, shape, ks, dtype):
    B, H, W, C = shape
    L = len(ks)
    es = _ESIZE[dtype]
    cub = cuda_cubin()
    tname = {"float32": "If", "bfloat16": "I13__nv_bfloat16", "float16": "I6__half"}[dtype]
    segs = cuda_plan_fwd(shape, list(ks))
    cbl = _cdiv(C, _CB)
    npix = B * H * W
    # the model's ctx is a slice of the f output: pixel stride 2C+L+1; vec16 needs it to be a
    # multiple of 8 (16-bit) or 4 (fp32) elements
    vec = (2 * C + L + 1) % (16 // es) == 0
    times = []
    mp = cuda_plan_mma(shape, list(ks), dtype)
    if mp is not None:
        hbm = npix * (C * es + _gate_bytes_per_pixel(L, es) + C * es) + B * mp["ntiles"] * C * 4
        times.append(_mma_launch(cub, tname, shape, ks, mp, False, hbm, vec))
    for g in segs:
        name, blocks, ns = _fused_seg_launch(cub, tname, g, B, C)
        src_es = es if g["l0"] == 0 else _xmap_esize(dtype)
        hbm = npix * (C * src_es + _gate_bytes_per_pixel(L, es) + C * es) + B * g["ntiles"] * C * 4
        width = 16 if (vec or g["l0"] > 0) else src_es
        if mp is not None:
            # the FMA kernels as the tensor-core forward's fallback: each block reads the flag and
            # returns (its first SASS instructions up to the EXIT; block scheduling not modelled)
            times.append(_gated_launch(cub, name, blocks, g))
            continue
        times.append(_cuda_launch_time(cub, name, _NWARP, g["smem"], blocks, ns, hbm, width))
    nt = mp["ntiles"] if mp is not None else segs[-1]["ntiles"]
    n = B * C
    grid = min(_cdiv(n, _NT), 1 << 20)
    times.append(_cuda_launch_time(cub, _cuda_fn_name(cub["sass"], "fc_pool_finish_kernel"), _NWARP, 0, grid,
                                   {"ntiles": nt, "grid_trips": n / (grid * _NT), "config": "grid_1d(B*C)"},
                                   B * nt * C * 4 + 2 * B * C * 4))
    cpt = _cdiv(cbl, _cdiv(cbl, 8))
    n = npix * _cdiv(cbl, cpt)
    grid = min(_cdiv(n, _NT), 1 << 20)
    out_vec = C % (16 // es) == 0
    times.append(_cuda_launch_time(cub, _cuda_fn_name(cub["sass"], "fc_fwd_epilogue_kernel" + tname), _NWARP, 0,
                                   grid, {"grid_trips": n / (grid * _NT), "epi_cpt": cbl / _cdiv(cbl, cpt),
                                          "config": f"grid_1d(B*H*W*{_cdiv(cbl, cpt)}), {cpt}x8 channels"},
                                   npix * (2 * C * es + _gate_bytes_per_pixel(L, es)),
                                   16 if out_vec else es))
    main_l = times[0]
    config = "; ".join(t["config"] for t in times[:1 if mp is not None else len(segs)])
    if direction != "fwd":
        bwd = _cuda_bwd_launches(shape, ks, dtype, cub, tname, vec)
        times += bwd
        config += "; bwd " + ", ".join(t["config"] for t in bwd if t["config"].startswith("level"))
    return times, config, main_l, [], []


def _mma_launch(cub, tname, shape, ks, mp, rec, hbm, vec):
    """The tensor-core kernel: the forward, or (rec) the backward's recompute of x_1 .. x_{L-1}."""
    B, H, W, C = shape
    L = len(ks)
    targs = "".join(f"Li{v}E" for v in ([L] + list(ks) + [0] * (3 - L))) + ("Lb1E" if rec else "Lb0E")
    name = _cuda_fn_name(cub["sass"], "fc_mma_fwd_kernel" + tname + targs)
    ns = {"nl": L, "mma_stage": (mp["srows"], mp["scols"]), "mma_tile": (mp["TH"], mp["TW"]),
          "mma_last": (mp["nrow"][L - 1], mp["ncol"][L - 1]),
          "mma_rows": mp["nrow"][:L - 1], "mma_cols": mp["ncol"][:L - 1], "grid_trips": 1.0,
          "config": f"tensor cores, {mp['TH']}x{mp['TW']} tile" + (" (recompute)" if rec else "")}
    return _cuda_launch_time(cub, name, _NWARP, mp["smem"], B * mp["ntiles"] * _cdiv(C, _CB), ns, hbm,
                             16 if vec else 8)


def _gated_launch(cub, name, blocks, g, hw=H100):
    """A launch whose blocks only test a flag and exit: the instructions before the first EXIT of
    the kernel, issue-bound (block launch overhead not modelled: docs/cost-model.md, limits)."""
    instrs = parse_sass(cub["sass"], name)
    n = 0
    for x in instrs:
        n += 1
        if x.op == "EXIT":
            break
    warp_instr = blocks * _NWARP * n
    clk = hw["clock_ghz"] * 1e9
    ms = math.ceil(blocks / hw["sms"]) * _NWARP * n / hw["issue_warp_instr_per_clk"] / clk * 1e3
    short = re.sub(r"^_ZN8focalnet3fcc\d+", "", name)[:60]
    return {"kernel": short + " (fallback, exits)", "config": f"{g['TH']}x{g['TW']} tile (gated)", "ms": ms,
            "bound": "issue", "terms_ms": {"issue": ms}, "regs": report_regs(cub["res"], name), "smem": g["smem"],
            "spill": 0, "warps": _NWARP, "blocks_per_sm": 0, "occupancy_warps": 0, "programs": blocks,
            "items": blocks, "warp_instr": warp_instr, "ffma_warp_instr": 0, "by_class": {"total": warp_instr},
            "hbm_bytes": blocks * 4, "loops": []}


def predict_rows(stages=(1, 2, 3, 4), ksets=("SRF", "LRF"), dtypes=DTYPES, directions=("fwd", "fwd+bwd"),
                 backends=("triton", "cuda"), arch=90) -> List[dict]:
    rows = []
    for st in stages:
        for kn in ksets:
            for dt in dtypes:
                for d in directions:
                    for be in backends:
                        try:
                            r = predict(be, d, STAGES[st], KSETS[kn], dt, arch)
                        except NotImplementedError as e:
                            r = {"backend": be, "direction": d, "shape": list(STAGES[st]),
                                 "kernel_sizes": list(KSETS[kn]), "dtype": dt, "predicted_ms": None,
                                 "floor_ms": round(floor(d, STAGES[st], KSETS[kn], dt)["floor_ms"], 4),
                                 "bound": None, "auto": None, "instr_per_elem": None, "ffma_per_elem": None,
                                 "regs": None, "occupancy_warps": None, "config": None, "error": str(e)}
                            try:
                                r["auto"] = auto_backend(KSETS[kn], dt) == be
                            except Exception:
                                pass
                        r["stage"] = st
                        r["kset"] = kn
                        rows.append(r)
    return rows


def predict_tail(shape, L, dtype, arch=90) -> dict:
    """The modulation tail at one FocalNet stage (focalnet_kernels/triton/modulation_tail.py, the global
    term folded in) from its SASS, beside eager's tail (cuBLAS GEMM writing the modulator, then q * it:
    counted at its HBM bytes only, an optimistic bound for eager) and the focal-context forward's
    global-term pass that folding removes (its HBM bytes: read and write out, read g_L)."""
    from .triton import modulation_tail as T
    B, H, W, C = (int(v) for v in shape)
    M, es = B * H * W, _ESIZE[dtype]
    e = T._report_entry(_TDT[dtype], C, L)
    bn, _, _ = T.tail_blocks(C, C)
    progs = _cdiv(M, T._BLOCK_M) * _cdiv(C, bn)
    gate = _gate_bytes_per_pixel(L, es)
    # HBM: x (the local sum), q, out once; the gate's sector; weights and global_h once
    hbm = M * (3 * C * es + gate) + C * C * es + B * C * 4
    t = launch_time(Launch(e["name"], e["config"], progs, progs, hbm, compile_entry(e, arch),
                           dict(e["constexprs"], M=M, N=C, K=C, HW=H * W)))
    bw = H100["hbm_tb_s"] * 1e12
    eager_ms = M * C * es * 5 / bw * 1e3             # GEMM: read x, write h; product: read q, h, write out
    folded_ms = (M * (2 * C * es + gate)) / bw * 1e3  # the global-term pass of the focal-context forward
    # dense bf16/fp16 tensor peak: 4096 flop per clk per SM (989 TFLOPS at 1.83 GHz)
    flops_ms = 2.0 * M * C * C / (H100["sms"] * 4096 * H100["clock_ghz"] * 1e9) * 1e3
    return {"shape": [B, H, W, C], "L": L, "dtype": dtype, "kernel": e["name"], "config": e["config"],
            "predicted_ms": round(t["ms"], 4), "bound": t["bound"], "regs": t["regs"], "spill_bytes": t["spill"],
            "hbm_floor_ms": round(hbm / bw * 1e3, 4), "tensor_ms_at_dense_peak": round(flops_ms, 4),
            "eager_tail_hbm_ms": round(eager_ms, 4), "global_pass_saved_ms": round(folded_ms, 4),
            "prediction": "static model, not a measurement (docs/cost-model.md)"}


def format_tail(rows) -> str:
    hdr = ("stage", "dtype", "tail pred ms", "bound", "regs", "spill", "eager tail (HBM) ms",
           "global pass saved ms", "config")
    body = [(str(r["stage"]), r["dtype"], f"{r['predicted_ms']:.3f}", r["bound"], str(r["regs"]),
             str(r["spill_bytes"]), f"{r['eager_tail_hbm_ms']:.3f}", f"{r['global_pass_saved_ms']:.3f}", r["config"])
            for r in rows]
    w = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(hdr)]
    fmt = "  ".join(f"{{:<{x}}}" for x in w)
    return "\n".join([fmt.format(*hdr), fmt.format(*("-" * x for x in w))] + [fmt.format(*b) for b in body])


def format_rows(rows) -> str:
    hdr = ("stage", "k", "backend", "dtype", "dir", "pred ms", "floor ms", "x floor", "bound", "instr/el",
           "ffma/el", "regs", "warps/SM", "auto", "config")
    body = []
    for r in rows:
        p = r.get("predicted_ms")
        body.append((str(r.get("stage", "")), r.get("kset", ""), r["backend"], r["dtype"], r["direction"],
                     "-" if p is None else f"{p:.3f}", f"{r['floor_ms']:.3f}",
                     "-" if p is None else f"{p / r['floor_ms']:.1f}", str(r.get("bound") or r.get("error", "")),
                     "-" if r.get("instr_per_elem") is None else f"{r['instr_per_elem']:.0f}",
                     "-" if r.get("ffma_per_elem") is None else f"{r['ffma_per_elem']:.0f}",
                     str(r.get("regs")), str(r.get("occupancy_warps")), str(r.get("auto")), str(r.get("config"))))
    w = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(hdr)]
    fmt = "  ".join(f"{{:<{x}}}" for x in w)
    return "\n".join([fmt.format(*hdr), fmt.format(*("-" * x for x in w))] + [fmt.format(*b) for b in body])


_DT_LONG = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def compare(results: dict, backends=("triton", "cuda", "cuda_fma")) -> list:
    """Predicted beside measured for every op case of a GPU suite run (focalnet-bench results.json):
    one dict per (shape, kernel sizes, dtype, direction, backend) that ran, with measured_ms,
    predicted_ms and measured / predicted. This is the calibration the first GPU runs give the model."""
    out = []
    for e in results.get("op") or []:
        if e.get("status") != "ok" or e.get("backend") not in backends:
            continue
        dtype = _DT_LONG.get(e["dtype"], e["dtype"])
        try:
            if e["backend"] == "cuda_fma":  # the CUDA backend with FOCALNET_CUDA_MMA=0
                from unittest import mock
                with mock.patch.dict(os.environ, {"FOCALNET_CUDA_MMA": "0"}):
                    p = predict("cuda", e["direction"], e["shape"], e["kernels"], dtype)
            else:
                p = predict(e["backend"], e["direction"], e["shape"], e["kernels"], dtype)
            pred, bound, instr = p["predicted_ms"], p["bound"], p["instr_per_elem"]
        except Exception as ex:  # e.g. the CUDA backward, which the model does not cover
            pred, bound, instr = None, f"not modelled ({type(ex).__name__})", None
        out.append({"backend": e["backend"], "direction": e["direction"], "shape": e["shape"],
                    "kernel_sizes": e["kernels"], "dtype": dtype, "measured_ms": e["median_ms"],
                    "predicted_ms": pred, "bound": bound, "instr_per_elem": instr,
                    "measured_over_predicted": round(e["median_ms"] / pred, 2) if pred else None})
    return out


def format_compare(rows, device="") -> str:
    lines = [f"measured (GPU suite{', ' + device if device else ''}) vs predicted (static model):",
             f"{'shape':<15} {'k':<8} {'dtype':<9} {'dir':<8} {'backend':<7} {'measured':>9} {'predicted':>9} "
             f"{'meas/pred':>9}  bound"]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        ks = ",".join(map(str, r["kernel_sizes"]))
        pred = f"{r['predicted_ms']:.3f}" if r["predicted_ms"] else "-"
        ratio = str(r["measured_over_predicted"]) if r["measured_over_predicted"] else "-"
        lines.append(f"{shape:<15} {ks:<8} {r['dtype']:<9} {r['direction']:<8} {r['backend']:<7} "
                     f"{r['measured_ms']:9.3f} {pred:>9} {ratio:>9}  {r['bound']}")
    return "\n".join(lines)


def format_breakdown(rows, top=12):
    """Where each launch's instructions go: per element (of the op's B*H*W*C) by source loop."""
    out = []
    for r in rows:
        out.append(f"== {r['backend']} {r['direction']} {r['dtype']} {r['shape']} k={r['kernel_sizes']}: "
                   f"{r['predicted_ms']} ms ({r['bound']}), {r['instr_per_elem']} instr/elem")
        for ln in r["launches"]:
            by = ln.get("instr_per_elem_by_loop")
            if not by:
                continue
            out.append(f"  {ln['kernel']} [{ln['config']}]: {ln['ms']} ms ({ln['bound']})")
            cls = ln.get("instr_per_elem_by_loop_class", {})
            for k, v in list(by.items())[:top]:
                out.append(f"    {v:8.1f}  {k}")
                if cls.get(k):
                    out.append("              " + ", ".join(f"{q} {x}" for q, x in cls[k].items()))
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compare", metavar="RESULTS_JSON",
                    help="predicted beside measured for every op case of a GPU suite run")
    ap.add_argument("--json", action="store_true", help="print the rows as one JSON list")
    ap.add_argument("--dtype", default="float32,bfloat16")
    ap.add_argument("--stage", default="1,2,3,4")
    ap.add_argument("--kset", default="SRF,LRF")
    ap.add_argument("--direction", default="fwd,fwd+bwd")
    ap.add_argument("--backend", default="triton,cuda")
    ap.add_argument("--breakdown", action="store_true",
                    help="per launch of each row, its instructions per element by source loop (CUDA kernels)")
    ap.add_argument("--tail", action="store_true",
                    help="the modulation tail (Triton GEMM + gating, global term folded) per stage instead")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # compiling needs the real @triton.jit functions (report.py does the same)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "focalnet_kernels.cost_model"] + list(argv or sys.argv[1:]),
                               env=env)
    if a.compare:
        with open(a.compare) as f:
            res = json.load(f)
        rows = compare(res, tuple(a.backend.split(",")))
        print(json.dumps(rows) if a.json else format_compare(rows, (res.get("env") or {}).get("device_name", "")))
        return 0
    if a.tail:
        rows = []
        for st in (int(v) for v in a.stage.split(",")):
            for dt in a.dtype.split(","):
                if dt == "float32":
                    continue   # the report compiles the half-precision tail (tensor cores)
                for kn in a.kset.split(","):
                    rows.append(dict(predict_tail(STAGES[st], len(KSETS[kn]), dt), stage=st, kset=kn))
        print(json.dumps(rows) if a.json else format_tail(rows) + "\nPREDICTION (static model), not a measurement")
        return 0
    rows = predict_rows(tuple(int(s) for s in a.stage.split(",")), tuple(a.kset.split(",")),
                        tuple(a.dtype.split(",")), tuple(a.direction.split(",")), tuple(a.backend.split(",")))
    if a.json:
        print(json.dumps(rows))
    elif a.breakdown:
        print(format_breakdown(rows))
    else:
        print(format_rows(rows))
        print("PREDICTION (static model from the sm_90 SASS, H100 SXM5 at "
              f"{H100['clock_ghz']} GHz), not a measurement; method and limits: docs/cost-model.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
