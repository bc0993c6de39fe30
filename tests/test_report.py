"""The compile report: every shipped forward config compiles for sm_80 and sm_90 without spills.

No GPU needed: triton.compile with a GPUTarget + the cuobjdump of Triton's wheel.  collect()
runs the compiles in a subprocess without TRITON_INTERPRET, so this works after the interpreter
tests set it.  To stay fast it compiles, per (dtype, config), the entry with the most levels
(the register-heaviest specialisation) plus the global kernel; `python -m focalnet_kernels.report`
compiles them all.
"""
import importlib
import os

import pytest

pytest.importorskip("triton")

FWD = "focalnet_kernels.triton.focal_context_fwd"


def _cuobjdump_available():
    import triton
    return os.access(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                  "cuobjdump"), os.X_OK)


pytestmark = pytest.mark.skipif(not _cuobjdump_available(), reason="no cuobjdump in triton wheel")


def _fwd_subset():
    from focalnet_kernels import report
    entries = importlib.import_module(FWD).REPORT_KERNELS
    worst = {}
    for e in entries:
        sig = e["signature"]
        dt = sig.get("ctx_ptr", sig.get("out_ptr"))
        k = (e["fn"].__name__, dt, e["config"], "slice" in e["name"])
        if k not in worst or e["constexprs"].get("L", 0) > worst[k]["constexprs"].get("L", 0):
            worst[k] = e
    return entries, [report.entry_key(e) for e in worst.values()]


@pytest.fixture(scope="module")
def rows():
    from focalnet_kernels import report
    _, select = _fwd_subset()
    return report.collect(archs=(80, 90), select=select, modules=[FWD], jobs=2), select


def test_every_shipped_config_compiles_without_spills(rows):
    rows, select = rows
    fwd_mod = importlib.import_module(FWD)
    got = [r for r in rows if r.get("ok") is not None]
    bad = [r for r in got if not r["ok"]]
    assert not bad, bad[0].get("error")
    # one row per selected entry and arch
    assert {(f"{r['kernel']} @ {r['config']}", r["arch"]) for r in got} == \
        {(s, a) for s in select for a in (80, 90)}
    for r in got:
        assert r["regs"] > 0
        assert r["spill_bytes"] == 0 and r["local"] == 0 and r["stack"] == 0, r
        assert r["regs"] <= 255
    # every autotune config of the local kernel is among the compiled ones, on both archs
    shipped = {f"{c.kwargs['TILE_H']}x{c.kwargs['TILE_W']} c{c.kwargs['BLOCK_C']} w{c.num_warps} "
               f"s{c.num_stages}" for c in fwd_mod._GPU_CONFIGS}
    for arch in (80, 90):
        compiled = {r["config"] for r in got if r["arch"] == arch and r["kernel"].startswith(
            "fwd_local[bf16")}
        assert shipped <= compiled, (arch, shipped - compiled)
    # aligned contiguous bf16: the hot loads are 16-byte vectors
    for r in got:
        if r["kernel"].startswith("fwd_local[bf16") and "slice" not in r["kernel"]:
            assert r["ldg128"] >= 2 * r["ldg_narrow"], r


def test_report_prints_a_table(rows):
    from focalnet_kernels import report
    rows, _ = rows
    text = report.format_table(rows)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["kernel", "config", "sm", "regs"]
    assert any("fwd_local" in ln and " 90 " in ln for ln in lines)
    assert any("fwd_global" in ln and " 80 " in ln for ln in lines)
    print("\n" + text)


def test_report_kernels_format():
    """The fwd export follows the format documented in focal_context_fwd.py: every argument of
    fn is typed in signature or given in constexprs, never both."""
    for e in importlib.import_module(FWD).REPORT_KERNELS:
        assert {"name", "config", "fn", "signature", "constexprs", "attrs", "num_warps",
                "num_stages"} <= set(e)
        for a in e["fn"].arg_names:
            assert (a in e["constexprs"]) != (a in e["signature"]), (e["name"], a)
        assert set(e["attrs"]) <= set(e["signature"])


BWD = "focalnet_kernels.triton.focal_context_bwd"


def test_every_shipped_backward_config_compiles_without_spills():
    from focalnet_kernels import report
    bwd = importlib.import_module(BWD)
    rows = report.collect(archs=(80, 90), modules=[BWD], jobs=2)
    got = [r for r in rows if r.get("ok") is not None]
    bad = [r for r in got if not r["ok"]]
    assert not bad, bad[0].get("error")
    for r in got:
        assert r["spill_bytes"] == 0 and r["local"] == 0 and r["stack"] == 0, r
    # collect() compiles in a subprocess without the interpreter: every GPU config is there
    shipped = {f"{th}x{tw} c{bc} w{nw}" for th, tw, bc, nw in bwd._GPU_TILE_CONFIGS}
    compiled = {" ".join(r["config"].split()[:3]) for r in got}
    assert shipped <= compiled, shipped - compiled
    # the step kernel: exactly the configs it runs (the fp32 channel block is capped), per dtype,
    # for the top and a non-top step, on both archs
    for dt, es in (("bf16", 2), ("fp32", 4)):
        runs = {f"{th}x{tw} c{bc} w{nw}" for th, tw, bc, nw in _step_configs_run(bwd, es)}
        for arch in (80, 90):
            for kind in ("top", "up="):
                step = {" ".join(r["config"].split()[:3]) for r in got if r["arch"] == arch
                        and r["kernel"].startswith(f"bwd_step[{dt}") and kind in r["kernel"]}
                if dt == "fp32" and kind == "top":
                    assert step and step <= runs, (dt, arch, step)
                else:
                    assert step == runs, (dt, arch, kind, step, runs)
    # the step kernel's map loads stay 16-byte vectors (the narrow ones: gates, grad_gates)
    for r in got:
        if r["kernel"].startswith("bwd_step"):
            assert r["ldg128"] >= 4 * r["ldg_narrow"], r


def _step_configs_run(bwd, esize):
    """The step kernel's GPU configs as the autotuner runs them: its early prune (kernel sizes
    passed the Triton 3.6 way, as keyword arguments), then its heuristics."""
    import torch
    import triton
    dout = torch.empty(1, dtype={2: torch.bfloat16, 4: torch.float32}[esize])
    given = [triton.Config({"TILE_H": th, "TILE_W": tw, "BLOCK_C": bc}, num_warps=nw,
                           num_stages=bwd._NUM_STAGES) for th, tw, bc, nw in bwd._GPU_TILE_CONFIGS]
    kept = bwd._bwd_step_kernel.early_config_prune(given, {"dout_ptr": dout}, KOUT=5, KIN=7, TOP=False)
    return [(c.kwargs["TILE_H"], c.kwargs["TILE_W"],
             bwd._step_heuristic_block_c({**c.all_kwargs(), "dout_ptr": dout}), c.num_warps)
            for c in kept]


def test_step_skips_the_8x16_tile_where_it_spilled():
    """_STEP_SPILL_SKIP: the 8x16 tile is not offered to the level-0 step of fp16/bf16 calls (x_0 is
    16-bit ctx) nor to the fp32 top step, the two variants that spilled there; every other step keeps it."""
    import torch
    import triton
    bwd = importlib.import_module(BWD)
    given = [triton.Config({"TILE_H": th, "TILE_W": tw, "BLOCK_C": bc}, num_warps=nw,
                           num_stages=bwd._NUM_STAGES) for th, tw, bc, nw in bwd._GPU_TILE_CONFIGS]

    def tiles(dout_dtype, x_dtype, top):
        nargs = {"dout_ptr": torch.empty(1, dtype=dout_dtype), "x_ptr": torch.empty(1, dtype=x_dtype)}
        kept = bwd._bwd_step_kernel.early_config_prune(given, nargs, KOUT=3, KIN=1 if top else 5, TOP=top)
        return {(c.kwargs["TILE_H"], c.kwargs["TILE_W"]) for c in kept}
    every = {(th, tw) for th, tw, _, _ in bwd._GPU_TILE_CONFIGS}
    assert (8, 16) in every
    assert tiles(torch.bfloat16, torch.bfloat16, False) == every - {(8, 16)}
    assert tiles(torch.float16, torch.float16, True) == every - {(8, 16)}
    assert tiles(torch.float32, torch.float32, True) == every - {(8, 16)}
    assert tiles(torch.bfloat16, torch.float32, False) == every   # levels > 0 read the fp32 scratch
    assert tiles(torch.bfloat16, torch.float32, True) == every
    assert tiles(torch.float32, torch.float32, False) == every


def test_step_configs_are_the_ones_that_run():
    """The step kernel keeps every tile for every dtype (only the two variants of
    test_step_skips_the_8x16_tile_where_it_spilled lose one);
    fp32 runs at 8 elements of a [TILE, BLOCK_C] tile per thread, 16-bit inputs at 16; the cap is
    idempotent (prune + heuristics apply it once) and also applies to the unpruned first config
    that runs when autotuning is off."""
    import torch
    bwd = importlib.import_module(BWD)
    for es in (2, 4):
        runs = _step_configs_run(bwd, es)
        assert [c[:2] + c[3:] for c in runs] == [c[:2] + c[3:] for c in bwd._GPU_TILE_CONFIGS]
        for th, tw, bc, nw in runs:
            assert th * tw * bc == (16 if es == 2 else 8) * 32 * nw, (es, th, tw, bc, nw)
    assert _step_configs_run(bwd, 2) == [tuple(c) for c in bwd._GPU_TILE_CONFIGS]
    th, tw, bc, nw = bwd._GPU_TILE_CONFIGS[0]
    args = {"TILE_H": th, "TILE_W": tw, "BLOCK_C": bc, "num_warps": nw}
    assert bwd._step_heuristic_block_c({**args, "dout_ptr": torch.empty(1)}) == bc // 2
    assert bwd._step_heuristic_block_c({**args, "dout_ptr": torch.empty(1, dtype=torch.float16)}) == bc


def test_one_pixel_maps_compile_for_sm90():
    """H = W = 1 (and H = 1, W = 1) as Triton specialised them before the shape arguments were
    unspecialised (an argument equal to 1 became a constant): `HW.to(tl.float32)` in the forward's
    global kernel did not compile then."""
    from focalnet_kernels import report
    entries = [e for m in (FWD, BWD) for e in importlib.import_module(m).REPORT_KERNELS
               if "=1]" in e["name"] and ("fwd_global" in e["name"] or "H=W=1" in e["name"])]
    assert any("fwd_global" in e["name"] and "H=W=1" in e["name"] for e in entries)
    rows = report.collect(archs=(90,), select=[report.entry_key(e) for e in entries],
                          modules=[FWD, BWD], jobs=2)
    got = [r for r in rows if r.get("ok") is not None]
    assert len(got) == len(entries)
    bad = [r for r in got if not r["ok"]]
    assert not bad, (bad[0]["kernel"], bad[0].get("error"))


def test_compile_count_of_the_benchmark():
    """The report counts the variants a set of calls compiles; shapes and batch sizes no longer
    multiply them (B = 256 and B = 2 of the same stage compile the same kernels)."""
    from focalnet_kernels import report
    bench = report._bench_calls()
    n = report.compile_count(bench)["variants"]
    small = [(2,) + c[1:] for c in bench]
    assert report.compile_count(small)["variants"] == n
    # the forward kernels do not depend on the image size either (the backward step kernel keeps
    # its stride specialisation, so its count may change with W * C)
    other = [(c[0], c[1] + 3, c[2] + 5) + c[3:] for c in bench]
    fwd_n = {k: v for k, v in report.compile_count(bench)["per_kernel"].items() if "fwd" in k}
    assert {k: v for k, v in report.compile_count(other)["per_kernel"].items() if "fwd" in k} == fwd_n
    assert report.compile_count(bench, pinned=True)["variants"] <= 60
