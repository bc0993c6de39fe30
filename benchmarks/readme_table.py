"""The README performance table, generated from the latest committed GPU results JSON.

    python -m benchmarks.readme_table                      # print the markdown
    python -m benchmarks.readme_table --write README.md    # replace the block between the markers
    python -m benchmarks.readme_table --json benchmarks/results/<run>/results.json

Only real GPU runs count (suite "gpu", not --dry-run, not --tiny). "Committed" means tracked by git
(`git ls-files`); where git cannot answer (no repository, no git), every results file is considered.
--write replaces the text between `<!-- perf-table:start -->` and `<!-- perf-table:end -->` and
touches nothing else; it fails if the markers are missing.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

START = "<!-- perf-table:start -->"
END = "<!-- perf-table:end -->"
DASH = "–"


def _is_real_gpu(res: Dict) -> bool:
    return res.get("suite") == "gpu" and not res.get("dry_run") and not res.get("tiny")


def _committed(root: Path) -> Optional[set]:
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--", "benchmarks/results"], cwd=root,
                             capture_output=True, text=True, timeout=30)
    except Exception:
        return None
    if out.returncode != 0:
        return None
    return {(root / p).resolve() for p in out.stdout.split("\0") if p}


def find_latest(results_dir: Path, *, committed_only: bool = True) -> Tuple[Optional[Path], List[str]]:
    """(path of the latest real GPU results.json, notes)."""
    runs, notes = find_runs(results_dir, committed_only=committed_only)
    return (runs[0] if runs else None), notes


def find_runs(results_dir: Path, *, committed_only: bool = True) -> Tuple[List[Path], List[str]]:
    """(paths of the real GPU results.json files, newest first; notes)."""
    notes: List[str] = []
    files = sorted(results_dir.glob("*/results.json"))
    if committed_only:
        root = results_dir.resolve().parent.parent
        tracked = _committed(root)
        if tracked is None:
            notes.append("git could not list committed files: considering every results file")
        else:
            files = [f for f in files if f.resolve() in tracked]
    runs = []
    for f in files:
        try:
            res = json.loads(f.read_text())
        except Exception as e:
            notes.append(f"unreadable {f}: {e}")
            continue
        if not _is_real_gpu(res):
            continue
        runs.append(((res.get("env", {}).get("date") or "", f.parent.name), f))
    return [f for _, f in sorted(runs, reverse=True)], notes


def _num(v: Optional[float], spec: str = ",.0f") -> str:
    return DASH if v is None else format(v, spec)


def _ok(entries, **match) -> List[Dict]:
    return [e for e in entries if e.get("status") == "ok" and all(e.get(k) == v for k, v in match.items())]


def _img_s(entries, model, mode, dtype, batch) -> Optional[float]:
    hit = _ok(entries, model=model, mode=mode, dtype=dtype, batch=batch)
    return hit[0]["median_img_s"] if hit else None


def _models_in(entries) -> List[Tuple[str, str]]:
    seen = {}
    for e in entries:
        seen.setdefault(e["model"], e["label"])
    order = {"tiny": 0, "small": 1, "base": 2}

    def key(item):
        name = item[0]
        size = next((s for s in order if f"_{s}" in name), "zz")
        variant = {"srf": 0, "lrf": 1}.get(name.rsplit("_", 1)[-1], 2)
        return (order.get(size, 9), name.startswith("swin"), variant, name)
    return sorted(seen.items(), key=key)


FUSED_MODES = ("fused", "fused:triton", "fused:cuda")


def _fused_modes(entries) -> List[str]:
    """The fused modes that measured something, in a fixed order."""
    return [m for m in FUSED_MODES if _ok(entries, mode=m)]


def _mode_title(entries, mode: str) -> str:
    """'fused (cuda)': the focal_context kernel that ran (from the entries' kernel field)."""
    if mode.startswith("fused:"):
        return f"fused ({mode.split(':', 1)[1]})"
    kernels = {k.split(":")[0] for e in _ok(entries, mode=mode) for k in (e.get("backends_ran") or {})
               if not k.startswith("linear:")}
    return f"fused ({', '.join(sorted(kernels))})" if kernels else mode


def _best(vals: Dict[str, Optional[float]], modes: List[str]) -> Optional[float]:
    got = [vals[m] for m in modes if vals.get(m)]
    return max(got) if got else None


def render(res: Dict, source: str = "") -> str:
    env = res.get("env", {})
    inf = res.get("inference") or []
    dtypes = res.get("dtype") or sorted({e["dtype"] for e in inf})
    head = dtypes[0] if dtypes else "bf16"
    batches = sorted({e["batch"] for e in inf if e["dtype"] == head}, reverse=True)
    bmax = batches[0] if batches else None
    swin_src = res.get("swin_source", "?")
    img = (res.get("config") or {}).get("img_size", 224)
    date = (env.get("date") or "")[:10]
    commit = (env.get("git_commit") or "")[:10]
    lines = [f"*Measured with `focalnet-bench{' --quick' if res.get('quick') else ''}` on **{env.get('device_name')}**, "
             f"{date} (driver {env.get('driver') or '?'}, CUDA {env.get('cuda_runtime') or '?'}, torch {env.get('torch')}, "
             f"triton {env.get('triton') or '-'}, {swin_src} Swin{', commit ' + commit if commit else ''}). "
             f"{head} autocast, {img}², channels-last input, random weights, median of the repetitions; "
             f"source: `{source or 'results.json'}`.*", ""]
    if bmax is not None:
        has = {m for m in ("compile", "fused+compile") if any(e["mode"] == m for e in _ok(inf, dtype=head))}
        fmodes = _fused_modes([e for e in inf if e["dtype"] == head]) or ["fused"]
        cols = ["eager"] + fmodes + [m for m in ("compile", "fused+compile") if m in has]
        titles = {"eager": "eager", "compile": "torch.compile", "fused+compile": "fused + compile"}
        titles.update({m: _mode_title(inf, m) for m in fmodes})
        lines.append(f"| inference, img/s (batch {bmax}) | " + " | ".join(titles[c] for c in cols)
                     + " | fused / eager |")
        lines.append("|---|" + "---:|" * (len(cols) + 1))
        for model, label in _models_in([e for e in inf if e["dtype"] == head and e["batch"] == bmax]):
            vals = {c: _img_s(inf, model, c, head, bmax) for c in cols}
            best = _best(vals, fmodes)
            sp = (best / vals["eager"]) if best and vals.get("eager") else None
            lines.append(f"| {label} | " + " | ".join(_num(vals[c]) for c in cols)
                         + f" | {_num(sp, '.2f') + '×' if sp else DASH} |")
        lines.append("")
        if len(batches) > 1:
            lines.append("| eager → best fused img/s by batch | " + " | ".join(f"batch {b}" for b in batches) + " |")
            lines.append("|---|" + "---:|" * len(batches))
            for model, label in _models_in([e for e in inf if e["dtype"] == head]):
                cells = []
                for b in batches:
                    e_ = _img_s(inf, model, "eager", head, b)
                    f_ = _best({m: _img_s(inf, model, m, head, b) for m in fmodes}, fmodes)
                    cells.append(f"{_num(e_)} → {_num(f_)}" if f_ is not None else _num(e_))
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
            lines.append("")
    tr = res.get("training") or []
    if _ok(tr):
        tb = _ok(tr)[0]["batch"]
        tmodes = _fused_modes(tr) or ["fused"]
        lines.append(f"| training step (fwd + bwd + AdamW, batch {tb}) | eager img/s | "
                     + " | ".join(f"{_mode_title(tr, m)} img/s" for m in tmodes)
                     + " | fused / eager | peak memory eager | peak memory fused |")
        lines.append("|---|" + "---:|" * (len(tmodes) + 4))
        for model, label in _models_in(tr):
            e_ = _ok(tr, model=model, mode="eager")
            ei = e_[0]["median_img_s"] if e_ else None
            em = e_[0].get("peak_mem_bytes") if e_ else None
            fvals = {m: (_ok(tr, model=model, mode=m) or [{}])[0] for m in tmodes}
            fi = _best({m: v.get("median_img_s") for m, v in fvals.items()}, tmodes)
            fm = next((v.get("peak_mem_bytes") for v in fvals.values() if fi and v.get("median_img_s") == fi), None)
            sp = fi / ei if fi and ei else None
            lines.append(f"| {label} | {_num(ei)} | " + " | ".join(_num(fvals[m].get("median_img_s")) for m in tmodes)
                         + f" | {_num(sp, '.2f') + '×' if sp else DASH} | "
                         f"{_num(em / 2 ** 30 if em else None, '.2f')} GiB | "
                         f"{_num(fm / 2 ** 30 if fm else None, '.2f')} GiB |".replace(f"{DASH} GiB", DASH))
        lines.append("")
    ops = [e for e in (res.get("op") or []) if e.get("status") == "ok"]
    if ops:
        size0 = ops[0]["size"]
        backends = [b for b in ("eager", "reference", "reference_compiled", "triton", "cuda", "cuda_fma")
                    if any(e["backend"] == b for e in ops)]
        bw = (res.get("bandwidth") or {}).get("GBps")
        B = ops[0]["shape"][0]
        lines.append(f"| focal_context, B={B}, {ops[0]['dtype']}: ms (% of HBM floor) | "
                     + " | ".join(backends) + " | floor |")
        lines.append("|---|" + "---:|" * (len(backends) + 1))
        cells = list(dict.fromkeys((e["direction"], e["L"], tuple(e["shape"])) for e in ops if e["size"] == size0))
        for direction, L, shape in cells:
            row = []
            for b in backends:
                hit = [e for e in ops if e["backend"] == b and e["direction"] == direction and e["L"] == L
                       and tuple(e["shape"]) == shape]
                if hit:
                    h = hit[0]
                    frac = f" ({100 * h['frac_floor']:.0f}%)" if h.get("frac_floor") else ""
                    row.append(f"{h['median_ms']:.3f}{frac}")
                else:
                    row.append(DASH)
            floor = next((e.get("floor_ms") for e in ops if e["direction"] == direction and e["L"] == L
                          and tuple(e["shape"]) == shape), None)
            lines.append(f"| {direction} {shape[1]}²×{shape[3]}, L={L} | " + " | ".join(row)
                         + f" | {_num(floor, '.3f')} |")
        lines.append("")
        if bw:
            lines.append(f"HBM floor = minimal bytes ({'; '.join(k + ': ' + v.split(' bytes')[0] for k, v in (res.get('op_floor', {}).get('formulas', {})).items() if k != 'time')}) "
                         f"/ the {bw:,.0f} GB/s device-to-device copy rate measured in the same run.")
            lines.append("")
    eq = [e for e in (res.get("equivalence") or []) if e.get("max_rel_fused_vs_eager") is not None]
    if eq:
        per = {}
        for e in eq:
            per[e["dtype"]] = max(per.get(e["dtype"], 0.0), e["max_rel_fused_vs_eager"])
        lines.append("Equivalence, fused vs eager logits (max |Δ| / max |eager|, worst model): "
                     + ", ".join(f"{d} {v:.1e}" for d, v in per.items()) + ".")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def replace_block(text: str, block: str) -> str:
    i, j = text.find(START), text.find(END)
    if i < 0 or j < 0 or j < i:
        raise ValueError(f"the markers {START} ... {END} were not found (in that order)")
    return text[: i + len(START)] + "\n" + block.rstrip("\n") + "\n" + text[j:]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.readme_table", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="use this results.json instead of the latest committed one")
    p.add_argument("--results", type=Path, default=None,
                   help="folder of runs (default: benchmarks/results of the repository)")
    p.add_argument("--any", action="store_true", help="consider uncommitted results files too")
    p.add_argument("--write", type=Path, metavar="README.md", help="replace the marked block in this file")
    p.add_argument("--runs", type=int, default=2,
                   help="how many of the newest runs to render, newest first (default 2: a run that measured a "
                        "subset after a change stands above the broader one before it)")
    args = p.parse_args(argv)
    if args.json:
        paths = [args.json]
    else:
        from benchmarks.common import default_results_root
        results = args.results or default_results_root()
        paths, notes = find_runs(results, committed_only=not args.any and args.results is None)
        for n in notes:
            print(f"readme_table: {n}", file=sys.stderr)
        if not paths:
            print(f"readme_table: no GPU results JSON under {results} "
                  f"({'committed ' if not args.any and args.results is None else ''}runs of the GPU suite, "
                  "not --dry-run)", file=sys.stderr)
            return 1
        paths = paths[:max(1, args.runs)]
    blocks = []
    for i, path in enumerate(paths):
        res = json.loads(Path(path).read_text())
        try:
            rel = Path(path).resolve().relative_to(Path.cwd().resolve())
        except ValueError:
            rel = Path(path)
        block = render(res, source=str(rel))
        blocks.append(block if i == 0 else f"**The run before it** (older code: the commit that added its folder says which):\n\n{block}")
    block = "\n".join(blocks)
    print(block)
    if args.write:
        text = args.write.read_text()
        try:
            new = replace_block(text, block)
        except ValueError as e:
            print(f"readme_table: {args.write}: {e}", file=sys.stderr)
            return 1
        args.write.write_text(new)
        print(f"readme_table: updated {args.write}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
