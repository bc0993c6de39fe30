"""Text tables, the JSON file and the PNG chart of a benchmark run."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence


def _fmt(v, spec: str = ".1f", none: str = "-") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return none
    return format(v, spec)


def _table(headers: Sequence[str], rows: List[Sequence[str]], align: Optional[str] = None) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    align = align or "l" * len(headers)

    def line(cells):
        return "  ".join(str(c).ljust(w) if a == "l" else str(c).rjust(w) for c, w, a in zip(cells, widths, align))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _eager_index(entries: List[Dict]) -> Dict:
    """The eager result of the same model in the same group (task), the reference of 'vs eager'."""
    return {(e.get("group"), e["model"], e["dtype"], e["batch"]): e.get("median_img_s") for e in entries
            if e["mode"] == "eager" and e.get("status") == "ok"}


def _backend_str(e: Dict) -> str:
    ran = e.get("backends_ran") or {}
    # focal_context keys are "<backend>:fwd|bwd" (keep the backend); linear keys "linear:<backend>"
    names = sorted({k if k.startswith("linear:") else k.split(":")[0] for k in ran})
    return ",".join(names)


def inference_table(res: Dict, kind: str = "inference") -> str:
    entries = res.get(kind) or []
    if not entries:
        return ""
    eager = _eager_index(entries)
    rows = []
    for e in entries:
        base = eager.get((e.get("group"), e["model"], e["dtype"], e["batch"]))
        sp = (e["median_img_s"] / base) if (base and e.get("median_img_s")) else None
        if e.get("status") != "ok":
            status = f"{e.get('status')}: {(e.get('reason') or '')[:60]}"
        else:
            status = ""
        comp = e.get("compile_s")
        row = [e["label"], e["mode"], e["dtype"], str(e["batch"]), _fmt(e.get("median_img_s")),
               _fmt(e.get("median_ms"), ".2f"), _fmt(sp, ".2f") + ("x" if sp else "")]
        if kind == "training":
            row += [_fmt(e[k] / 2 ** 20 if e.get(k) else None, ".0f")
                    for k in ("saved_activation_bytes", "peak_mem_bytes")]
        else:
            row.append(_fmt(comp, ".1f"))
        row += [_backend_str(e) or "-", status]
        rows.append(row)
    head = ["model", "mode", "dtype", "batch", "img/s", "ms/iter", "vs eager"]
    head += ["saved activations MiB", "peak MiB"] if kind == "training" else ["compile s"]
    head += ["kernel", "status"]
    return _table(head, rows, "llllrrr" + "r" * (len(head) - 9) + "ll")


def op_table(res: Dict) -> str:
    entries = res.get("op") or []
    if not entries:
        return ""
    rows = []
    for e in entries:
        B, H, W, C = e["shape"]
        rows.append([f"{B}x{H}x{W}x{C}", str(e["L"]), e["dtype"], e["direction"], e["backend"],
                     _fmt(e.get("median_ms"), ".3f"), _fmt(e.get("effective_GBps"), ".3g"),
                     _fmt(100 * e["frac_floor"] if e.get("frac_floor") else None, ".1f"),
                     _fmt(e.get("rel_err_vs_fp32_ref"), ".1e"),
                     "" if e.get("status") == "ok" else f"{e.get('status')}: {(e.get('reason') or '')[:60]}"])
    return _table(["B x H x W x C", "L", "dtype", "dir", "backend", "ms", "GB/s", "% floor", "rel err", "status"],
                  rows, "lllllrrrrl")


def equivalence_table(res: Dict) -> str:
    entries = res.get("equivalence") or []
    if not entries:
        return ""
    rows = []
    for e in entries:
        others = ", ".join(f"{k} {v:.1e}" for k, v in (e.get("max_rel_vs_eager") or {}).items()
                           if k != "fused")
        rows.append([e["label"], e["dtype"], str(e["batch"]), _fmt(e.get("max_rel_fused_vs_eager"), ".2e"),
                     _fmt(e.get("max_rel_eager_vs_fp32"), ".2e"), _fmt(e.get("max_rel_fused_vs_fp32"), ".2e"),
                     others or ("" if e.get("status", "ok") == "ok" else f"error: {e.get('reason', '')[:60]}")])
    return _table(["model", "dtype", "batch", "fused vs eager", "eager vs fp32", "fused vs fp32", "other modes vs eager"],
                  rows, "lllrrrl")


def render_text(res: Dict) -> str:
    env = res.get("env", {})
    parts = [f"focalnet-bench {res['suite']} suite{' (quick)' if res.get('quick') else ''}"
             f"{' (dry run: tiny models, CPU tensors; numbers mean nothing)' if res.get('dry_run') else ''}",
             f"device: {env.get('device_name')}  driver: {env.get('driver') or '-'}  torch {env.get('torch')}  "
             f"triton {env.get('triton') or '-'}  commit {(env.get('git_commit') or '-')[:12]}  {env.get('date')}",
             f"Swin from: {res.get('swin_source')}  "
             + "  ".join(f"{m}: {i.get('attention', i.get('source'))}" for m, i in (res.get('models') or {}).items()
                         if m.startswith('swin'))]
    bw = res.get("bandwidth")
    if bw and bw.get("GBps"):
        parts.append(f"device-to-device copy bandwidth: {bw['GBps']:.1f} GB/s")
    for title, body in (("Inference (median of repetitions)", inference_table(res)),
                        ("Training step: forward + backward + AdamW", inference_table(res, "training")),
                        ("Equivalence: max relative logit difference", equivalence_table(res)),
                        ("focal_context op (fraction of the HBM floor: 100% = at the floor)", op_table(res))):
        if body:
            parts += ["", title, body]
    secs = [x for x in res.get("sections") or [] if x.get("status") != "skipped"]
    if secs:
        parts += ["", "Sections (elapsed / planned seconds):"]
        parts += [f"  {x.get('elapsed_s', 0):6.1f} / {x.get('est_s', 0):5.0f}  {x['status']:6s} {x['name']}"
                  + (f"  ({x['reason'][:80]})" if x.get("reason") else "") for x in secs]
    sk = res.get("skipped") or []
    if sk:
        parts += ["", f"Skipped ({len(sk)}):"] + [f"  - {s['item']}: {s['reason']}" for s in sk[:40]]
        if len(sk) > 40:
            parts.append(f"  ... and {len(sk) - 40} more (see the JSON)")
    parts.append("")
    parts.append(f"total {res.get('total_elapsed_s', 0):.1f} s")
    return "\n".join(parts)


def _clean(o):
    """Strict JSON: NaN / inf become null, tuples lists, unknown objects strings."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if o is None or isinstance(o, (str, int, bool)):
        return o
    return str(o)


def write_json(res: Dict, path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_clean(res), indent=1, allow_nan=False))
    tmp.replace(path)  # atomic: a reader (or a kill) never sees half a file


def write_png(res: Dict, path: Path) -> Optional[str]:
    """The chart; returns None on success, else why no PNG was written (matplotlib missing...)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return f"matplotlib is not available: {e}"
    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    title = (f"focalnet-bench {res['suite']}{' quick' if res.get('quick') else ''}"
             f"{' DRY RUN' if res.get('dry_run') else ''} - {res.get('env', {}).get('device_name')} - "
             f"{res.get('env', {}).get('date', '')[:10]}")
    fig.suptitle(title)

    def bars(ax, entries, value, ylabel, ttl):
        entries = [e for e in entries if e.get(value) is not None]
        if not entries:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(ttl)
            return
        labels = [f"{e['label']}\n{e['mode']} {e['dtype']} b{e['batch']}" for e in entries]
        vals = [e[value] for e in entries]
        colors = ["tab:gray" if e["mode"] == "eager" else "tab:blue" if "compile" not in e["mode"] else "tab:green"
                  for e in entries]
        colors = ["tab:orange" if e["model"].startswith("swin") else c for e, c in zip(entries, colors)]
        ax.bar(range(len(vals)), vals, color=colors)
        ax.set_xticks(range(len(vals)))
        ax.set_xticklabels(labels, rotation=90, fontsize=6)
        ax.set_ylabel(ylabel)
        ax.set_title(ttl)

    inf = [e for e in res.get("inference") or [] if e.get("status") == "ok"]
    if inf:  # the headline: first dtype, largest batch
        d0 = inf[0]["dtype"]
        bmax = max(e["batch"] for e in inf if e["dtype"] == d0)
        inf = [e for e in inf if e["dtype"] == d0 and e["batch"] == bmax]
    bars(axes[0][0], inf, "median_img_s", "img/s", "inference throughput (headline dtype, largest batch)")
    tr = [e for e in res.get("training") or [] if e.get("status") == "ok"]
    bars(axes[0][1], tr, "median_img_s", "img/s", "training step throughput")
    for ax, direction in ((axes[1][0], "fwd"), (axes[1][1], "fwd+bwd")):
        ops = [e for e in res.get("op") or [] if e.get("status") == "ok" and e["direction"] == direction]
        if not ops:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(f"focal_context {direction}")
            continue
        use_floor = all(e.get("frac_floor") for e in ops)
        backends = list(dict.fromkeys(e["backend"] for e in ops))
        cells = list(dict.fromkeys((tuple(e["shape"]), e["L"], e["dtype"]) for e in ops))
        width = 0.8 / max(1, len(backends))
        for j, b in enumerate(backends):
            vals = []
            for c in cells:
                hit = [e for e in ops if e["backend"] == b and (tuple(e["shape"]), e["L"], e["dtype"]) == c]
                v = (100 * hit[0]["frac_floor"] if use_floor else hit[0]["median_ms"]) if hit else 0.0
                vals.append(v)
            ax.bar([i + j * width for i in range(len(cells))], vals, width=width, label=b)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cells))])
        ax.set_xticklabels([f"{s[1]}x{s[2]}x{s[3]}\nL={L} {d}" for s, L, d in cells], rotation=90, fontsize=6)
        ax.set_ylabel("% of HBM floor" if use_floor else "ms")
        ax.set_title(f"focal_context {direction} (B={cells[0][0][0]})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
