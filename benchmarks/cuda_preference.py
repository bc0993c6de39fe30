"""The `auto` table for CUDA tensors (`focalnet_kernels.ops._CUDA_PREFERENCE`) from GPU suite results.

    python -m benchmarks.cuda_preference [RESULTS.json ...] [--margin 0.03] [--write]

Reads the op section of GPU suite runs (default: the newest benchmarks/results/*/results.json whose
device is a GPU), and for every focal configuration (L, kernel sizes) measured on both the `triton` and
the `cuda` backend compares their summed median times over every shape, dtype and direction measured
for both (forward and forward+backward, so training and inference both count). `cuda` is chosen only
where it is faster by more than --margin (relative); otherwise the configuration stays on the default,
Triton. Prints the evidence per configuration; --write replaces the table between the markers in
focalnet_kernels/ops.py (with the source run and device in a comment), so the choice in the code is
always a measured one.
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
OPS_FILE = ROOT / "focalnet_kernels" / "ops.py"
BEGIN, END = "# cuda-preference:begin", "# cuda-preference:end"

Key = Tuple[int, Tuple[int, ...]]


def newest_gpu_results(root: Path = ROOT / "benchmarks" / "results") -> Optional[Path]:
    found = []
    for p in root.glob("*/results.json"):
        try:
            dev = json.loads(p.read_text()).get("device", {})
        except (OSError, ValueError):
            continue
        if dev.get("type") == "cuda":
            found.append(p)
    return max(found, key=lambda p: p.parent.name) if found else None


def compare(results: Sequence[Dict], margin: float = 0.03) -> Dict[Key, Dict]:
    """Per (L, kernels): summed medians of triton and cuda over the cases both measured, and the pick."""
    times: Dict[Key, Dict] = collections.defaultdict(lambda: collections.defaultdict(dict))
    for res in results:
        for e in res.get("op") or []:
            if e.get("status") != "ok" or e.get("backend") not in ("triton", "cuda") or e.get("median_ms") is None:
                continue
            key = (int(e["L"]), tuple(int(k) for k in e["kernels"]))
            case = (tuple(e["shape"]), e["dtype"], e["direction"])
            times[key][case][e["backend"]] = float(e["median_ms"])
    out: Dict[Key, Dict] = {}
    for key, cases in sorted(times.items()):
        both = {c: v for c, v in cases.items() if "triton" in v and "cuda" in v}
        if not both:
            continue
        t = sum(v["triton"] for v in both.values())
        c = sum(v["cuda"] for v in both.values())
        wins = sum(v["cuda"] < v["triton"] for v in both.values())
        pick = "cuda" if c < t * (1.0 - margin) else "triton"
        out[key] = dict(triton_ms=t, cuda_ms=c, cases=len(both), cuda_wins=wins, pick=pick)
    return out


def table_source(choice: Dict[Key, Dict], origin: str) -> str:
    lines = [BEGIN, f"# Measured: {origin}. Regenerate with python -m benchmarks.cuda_preference --write.",
             "_CUDA_PREFERENCE: dict = {"]
    for key, v in choice.items():
        lines.append(f"    {key!r}: {v['pick']!r},   # triton {v['triton_ms']:.3f} ms, cuda {v['cuda_ms']:.3f} ms "
                     f"over {v['cases']} cases")
    lines.append("}")
    lines.append(END)
    return "\n".join(lines)


def write_table(text: str, ops_file: Path = OPS_FILE) -> None:
    src = ops_file.read_text()
    pat = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pat.search(src):
        raise SystemExit(f"{ops_file}: markers {BEGIN!r} / {END!r} not found")
    ops_file.write_text(pat.sub(lambda _m: text, src, count=1))


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="*", help="results.json of GPU suite runs (default: the newest GPU run)")
    p.add_argument("--margin", type=float, default=0.03, help="cuda must be faster by this fraction")
    p.add_argument("--write", action="store_true", help="rewrite the table in focalnet_kernels/ops.py")
    p.add_argument("--ops-file", type=Path, default=OPS_FILE, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    paths = [Path(r) for r in args.results]
    if not paths:
        newest = newest_gpu_results()
        if newest is None:
            print("cuda_preference: no GPU suite results under benchmarks/results/ (run bash benchmarks/gpu_suite.sh "
                  "on a GPU first); the table stays as it is", file=sys.stderr)
            return 1
        paths = [newest]
    results = [json.loads(pth.read_text()) for pth in paths]
    choice = compare(results, args.margin)
    if not choice:
        print("cuda_preference: no configuration was measured on both triton and cuda in "
              + ", ".join(map(str, paths)), file=sys.stderr)
        return 1
    devices = sorted({(r.get("device") or {}).get("name", "?") for r in results})
    origin = f"{', '.join(devices)}, {', '.join(pth.parent.name for pth in paths)}"
    print(f"{'L, kernels':<22} {'triton ms':>10} {'cuda ms':>10} {'cases':>6} {'cuda wins':>10}  pick")
    for key, v in choice.items():
        print(f"{str(key):<22} {v['triton_ms']:10.3f} {v['cuda_ms']:10.3f} {v['cases']:6d} {v['cuda_wins']:10d}  {v['pick']}")
    text = table_source(choice, origin)
    if args.write:
        write_table(text, args.ops_file)
        print(f"wrote the table into {args.ops_file}")
    else:
        print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
