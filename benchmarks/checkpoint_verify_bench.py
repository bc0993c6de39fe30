"""What checkpoint verification costs: reading a FocalNet checkpoint with and without the checks of
`focalnet.read_checkpoint` (issue 12).

    python -m benchmarks.checkpoint_verify_bench [--model focalnet_base_lrf] [--reps 5]

Writes the model's state dict with torch.save (and as safetensors when the package is installed) to a
temporary folder, then times, interleaved round-robin so that background load hits every row alike
(medians of --reps runs, warm page cache):

* read, no checks: ``read_checkpoint(verify=False)`` (torch.load of the file);
* read + CRC-32: the default, the CRC pass in a helper thread while torch.load reads;
* the CRC pass alone (``verify_checkpoint``), i.e. what it would cost run before the load; both also
  with zlib's CRC-32 (what runs where the system has no libdeflate);
* the same with ``sha256=`` (opt-in) and, for safetensors, the header check;
* load_checkpoint into the model, with and without checks.

Wall time shows what a user waits (the CRC pass overlaps torch.load when a core is free); CPU time
(process_time, all threads) shows the work added whatever else runs on the machine.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
import zlib
from typing import Callable, Dict, List, Tuple

import torch

import focalnet
from benchmarks.common import _cpu_name, median
from focalnet import checkpoint


def _zlib(fn: Callable[[], object]) -> Callable[[], object]:
    """fn with the CRC-32 pass forced to zlib's (as on a system without libdeflate)."""
    def run():
        saved = list(checkpoint._CRC32)
        checkpoint._CRC32[:] = [None]
        try:
            return fn()
        finally:
            checkpoint._CRC32[:] = saved
    return run


def _rows(path: str, digest: str, st_path: str, st_digest: str, model) -> Dict[str, Tuple[Callable[[], object], str]]:
    """name -> (what to time, the row it is compared with)."""
    read, load = "torch zip: read, no checks", "torch zip: load_checkpoint, no checks"
    rows = {
        read: (lambda: focalnet.read_checkpoint(path, verify=False), read),
        "torch zip: read + CRC-32 (default)": (lambda: focalnet.read_checkpoint(path), read),
        "torch zip: CRC-32 pass alone": (lambda: focalnet.verify_checkpoint(path), read),
        "torch zip: read + CRC-32, zlib's": (_zlib(lambda: focalnet.read_checkpoint(path)), read),
        "torch zip: CRC-32 pass alone, zlib's": (_zlib(lambda: focalnet.verify_checkpoint(path)), read),
        "torch zip: read + CRC-32 + sha256": (lambda: focalnet.read_checkpoint(path, sha256=digest), read),
        load: (lambda: focalnet.load_checkpoint(model, path, verify=False), load),
        "torch zip: load_checkpoint (default)": (lambda: focalnet.load_checkpoint(model, path), load),
    }
    if st_path:
        st = "safetensors: read, no checks"
        rows.update({
            st: (lambda: focalnet.read_checkpoint(st_path, verify=False), st),
            "safetensors: read + header (default)": (lambda: focalnet.read_checkpoint(st_path), st),
            "safetensors: read + header + sha256": (lambda: focalnet.read_checkpoint(st_path, sha256=st_digest), st),
        })
    return rows


def _time(rows: Dict[str, Tuple[Callable[[], object], str]], reps: int) -> Dict[str, Tuple[List[float], List[float]]]:
    """name -> (wall seconds, CPU seconds of the whole process, all threads) per run."""
    names = list(rows)
    for name in names:  # warm-up: page cache, allocator, imports
        rows[name][0]()
    out: Dict[str, Tuple[List[float], List[float]]] = {n: ([], []) for n in names}
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            w0, c0 = time.perf_counter(), time.process_time()
            rows[name][0]()
            out[name][1].append(time.process_time() - c0)
            out[name][0].append(time.perf_counter() - w0)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="focalnet_base_lrf")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temporary folder)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (load_state_dict's copies; 1 keeps them out of the comparison)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = focalnet.create_model(args.model).eval()
    sd = model.state_dict()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, f"{args.model}.pth")
        torch.save(sd, path)
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        st_path = st_digest = ""
        try:
            from safetensors.torch import save_file
        except ImportError:
            save_file = None
        if save_file is not None:
            st_path = os.path.join(tmp, f"{args.model}.safetensors")
            save_file(sd, st_path)
            with open(st_path, "rb") as f:
                st_digest = hashlib.sha256(f.read()).hexdigest()
        size_mb = os.path.getsize(path) / 1e6
        rows = _rows(path, digest, st_path, st_digest, model)
        times = _time(rows, args.reps)

    load_avg = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"CPU: {_cpu_name()} ({os.cpu_count()} cores), load average {load_avg}; torch {torch.__version__}, "
          f"Python {sys.version.split()[0]}")
    crc = "zlib" if checkpoint._crc32_function() is zlib.crc32 else "libdeflate"
    print(f"CRC-32 by {crc} unless the row says zlib's; torch intra-op threads: {torch.get_num_threads()}")
    print(f"checkpoint: {args.model} state dict, {size_mb:.0f} MB torch.save file, warm page cache, "
          f"medians of {args.reps} interleaved runs")
    width = max(len(n) for n in times)
    print(f"{'':{width}}  {'wall s':>7}  {'vs no checks':>12}  {'CPU s':>6}  {'vs no checks':>12}")
    for name, (wall, cpu) in times.items():
        w, c = median(wall), median(cpu)
        bw, bc = median(times[rows[name][1]][0]), median(times[rows[name][1]][1])
        print(f"{name:{width}}  {w:7.3f}  {w / bw:11.2f}x  {c:6.3f}  {c / bc:11.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
