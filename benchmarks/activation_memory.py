"""Saved activations of one training forward: the bytes autograd keeps for the backward.

    python -m benchmarks.activation_memory                      # FocalNet-T SRF/LRF eager and fused, Swin-T
    python -m benchmarks.activation_memory --swin-python /path/to/python   # Swin from another venv (timm)
    python -m benchmarks.activation_memory --time-against REV   # fused train step: this tree vs model.py at REV

What is counted: every tensor autograd saves during one forward in train mode (collected with
``torch.autograd.graph.saved_tensors_hooks``), deduplicated by storage (``untyped_storage().data_ptr()``,
counted with the storage's ``nbytes``: a view saved for the backward keeps its whole base alive, and
three views of one tensor cost it once). Parameters and buffers are saved too (a Linear keeps its
weight) but they are not activations and exist anyway: their storages are left out. The input batch
is counted (the stem convolution saves it). This is device-independent (the same tensors are saved on
CPU and GPU); it is not the allocator's peak, which adds the transient buffers of forward and backward.

The timing mode (--time-against) measures one training step (forward, cross-entropy, backward; no
optimizer) of the fused FocalNet-T LRF built from this tree and from ``focalnet/model.py`` of another
revision (loaded with ``git show``; both run on the same ``focalnet_kernels``), same weights and input,
interleaved one step each, and prints the medians.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import models as M
from .common import ab_samples, device_name, median

DEFAULT_MODELS = ("focalnet_tiny_srf", "focalnet_tiny_lrf", "swin_tiny")
MIB = 2 ** 20
NOTE = ("unique storages autograd saves in one train-mode forward (saved_tensors_hooks), parameters and "
        "buffers excluded, the input batch included")


def saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> Dict[str, int]:
    """Bytes of the unique storages autograd saves for the backward in one forward of `model` on `x`
    (parameters and buffers of `model` excluded). The model's mode (train/eval) is left as it is; the
    graph is dropped before returning."""
    skip = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    storages: Dict[int, int] = {}
    n_saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal n_saved
        n_saved += 1
        s = t.untyped_storage()
        if s.data_ptr() not in skip:   # alive until the graph is freed: no address is reused meanwhile
            storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return {"bytes": sum(storages.values()), "storages": len(storages), "saved_tensors": n_saved}


def _model_pair(name: str, img_size: int):
    """(label, {mode: model}) with the same weights; FocalNet gets a fused twin."""
    torch.manual_seed(0)
    model, info = M.build(name, tiny=False, img_size=img_size)
    model.train()
    label = M.label(name) + ("" if not M.is_swin(name) else f" ({info.get('source')})")
    if not M.fused_capable(name):
        return label, {"eager": model}
    import copy
    return label, {"eager": model, "fused": copy.deepcopy(model).set_fused(True)}


def measure(names: Sequence[str], batch: int, img_size: int) -> List[Dict]:
    rows = []
    for name in names:
        label, mods = _model_pair(name, img_size)
        x = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))
        eager = None
        for mode, mod in mods.items():
            r = saved_activation_bytes(mod, x)
            eager = r["bytes"] if mode == "eager" else eager
            rows.append(dict(model=name, label=label, mode=mode, batch=batch, img_size=img_size,
                             saved_bytes=r["bytes"], storages=r["storages"], saved_tensors=r["saved_tensors"],
                             vs_eager=r["bytes"] / eager if eager else None))
    return rows


def _measure_elsewhere(python: str, names: Sequence[str], batch: int, img_size: int) -> List[Dict]:
    """The same measurement run by another interpreter (a venv with timm, say), from this tree."""
    root = Path(__file__).resolve().parent.parent
    cmd = [python, "-m", "benchmarks.activation_memory", "--json", "--models", ",".join(names),
           "--batch", str(batch), "--img", str(img_size)]
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    for r in rows:
        r["python"] = python
    return rows


def render(rows: List[Dict]) -> str:
    lines = [f"{'model':24s} {'mode':6s} {'saved MiB':>10s} {'vs eager':>9s} {'storages':>9s}"]
    for r in rows:
        ratio = f"{r['vs_eager']:.2f}x" if r.get("vs_eager") and r["mode"] != "eager" else ""
        lines.append(f"{r['label']:24s} {r['mode']:6s} {r['saved_bytes'] / MIB:10.1f} {ratio:>9s} {r['storages']:9d}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# step time: this tree's fused model vs focalnet/model.py at another revision
# ------------------------------------------------------------------------------------------------
def _model_module_at(rev: str):
    """focalnet/model.py as it was at `rev`, imported as a module of its own."""
    root = Path(__file__).resolve().parent.parent
    src = subprocess.run(["git", "show", f"{rev}:focalnet/model.py"], cwd=root, capture_output=True,
                         text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "focalnet_model_at_rev.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("focalnet_model_at_rev", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def time_against(rev: str, name: str, batch: int, img_size: int, reps: int) -> Dict:
    import focalnet
    old_model = _model_module_at(rev)
    torch.manual_seed(0)
    new = focalnet.create_model(name, use_fused=True).train()
    old = old_model.FocalNet(use_fused=True, **focalnet.model_config(name)).train()
    old.load_state_dict(new.state_dict())
    x = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(2))

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
        return run

    t_old, t_new = ab_samples(step(old), step(new), reps)
    return dict(model=name, batch=batch, img_size=img_size, rev=rev, reps=reps, old_ms=median(t_old) * 1e3,
                new_ms=median(t_new) * 1e3, paired_ratio=median([n / o for n, o in zip(t_new, t_old)]),
                old_samples_ms=[t * 1e3 for t in t_old],
                new_samples_ms=[t * 1e3 for t in t_new],
                saved_old_bytes=saved_activation_bytes(old, x)["bytes"],
                saved_new_bytes=saved_activation_bytes(new, x)["bytes"])


def _isa() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:
        return "?"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.activation_memory", description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--swin-python", default=None,
                    help="measure the Swin models with this interpreter (e.g. a venv with timm)")
    ap.add_argument("--json", action="store_true", help="print the rows as one JSON line")
    ap.add_argument("--time-against", metavar="REV", default=None,
                    help="time the fused train step of this tree against focalnet/model.py at REV")
    ap.add_argument("--time-model", default="focalnet_tiny_lrf")
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args(argv)
    names = [M.canonical(n) for n in args.models.split(",") if n]
    if args.time_against:
        r = time_against(args.time_against, args.time_model, args.batch, args.img, args.reps)
        print(f"{M.label(r['model'])} train step (forward, cross-entropy, backward), fused, batch {r['batch']}, "
              f"{r['img_size']}², fp32, {device_name(torch.device('cpu'))} ({_isa()}), "
              f"{torch.get_num_threads()} threads, median of {r['reps']} interleaved steps:")
        for label, ms, saved in ((f"model.py at {r['rev']}", r["old_ms"], r["saved_old_bytes"]),
                                 ("this tree", r["new_ms"], r["saved_new_bytes"])):
            print(f"  {label:30s} {ms:9.1f} ms   saved activations {saved / MIB:6.1f} MiB")
        print(f"  this tree / {r['rev']}: {r['new_ms'] / r['old_ms']:.3f}x (ratio of medians), "
              f"{r['paired_ratio']:.3f}x (median of the per-repetition ratios)")
        return 0
    elsewhere = [n for n in names if M.is_swin(n)] if args.swin_python else []
    rows = measure([n for n in names if n not in elsewhere], args.batch, args.img)
    if elsewhere:
        rows += _measure_elsewhere(args.swin_python, elsewhere, args.batch, args.img)
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"Saved activations of one training forward, batch {args.batch}, {args.img}², fp32 "
          f"(torch {torch.__version__}): {NOTE}.")
    print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
