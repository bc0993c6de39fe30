"""The benchmark harness itself (fast, CPU): the GPU code path in --dry-run, the CPU default on tiny
models, the time budget, and the README table generator."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import readme_table
from benchmarks.__main__ import main
from benchmarks.op_bench import floor_bytes

TOP_KEYS = {"schema", "suite", "quick", "dry_run", "partial", "env", "config", "device", "dtype", "batch",
            "swin_source", "timing", "op_floor", "bandwidth", "inference", "training", "op", "equivalence",
            "skipped", "sections", "models", "total_elapsed_s", "files"}
ENV_KEYS = {"date", "command_line", "git_commit", "torch", "triton", "device_name", "driver", "focalnet_kernels"}
SAMPLE_KEYS = {"model", "mode", "dtype", "batch", "status", "samples_ms", "samples_img_s", "median_ms",
               "median_img_s", "iters_per_sample"}


def _strict_json(path: Path) -> dict:
    def bad(c):
        raise AssertionError(f"{path} is not strict JSON: {c}")
    return json.loads(path.read_text(), parse_constant=bad)


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dry")
    rc = main(["--dry-run", "--models", "focalnet_tiny_lrf,swin_tiny", "--out", str(out)])
    return rc, out


def test_dry_run_writes_json_png_table(dry_run):
    rc, out = dry_run
    assert rc == 0, (out / "table.txt").read_text()
    res = _strict_json(out / "results.json")
    assert TOP_KEYS <= set(res), TOP_KEYS - set(res)
    assert ENV_KEYS <= set(res["env"]), ENV_KEYS - set(res["env"])
    assert res["suite"] == "gpu" and res["dry_run"] is True and res["partial"] is False
    assert res["swin_source"] in ("timm", "transformers")
    assert res["bandwidth"]["GBps"] > 0 and res["bandwidth"]["samples_ms"]
    assert all(s["status"] == "ok" for s in res["sections"]), res["sections"]

    inf = res["inference"]
    modes = {(e["model"], e["mode"]) for e in inf}
    for mode in ("eager", "fused", "compile", "fused+compile"):
        assert ("focalnet_tiny_lrf", mode) in modes, modes
    assert ("swin_tiny", "eager") in modes and ("swin_tiny", "compile") in modes
    for e in inf:
        assert SAMPLE_KEYS <= set(e), SAMPLE_KEYS - set(e)
        assert e["status"] == "ok", e
        assert len(e["samples_ms"]) == res["config"]["reps"] and e["median_img_s"] > 0
    compiled = [e for e in inf if "compile" in e["mode"]]
    assert compiled and all(e["compile_s"] is not None for e in compiled)
    fused = [e for e in inf if e["mode"] == "fused"]
    assert fused and all(sum(e["backends_ran"].values()) > 0 for e in fused), "the fused path never called the op"

    tr = res["training"]
    assert {e["mode"] for e in tr if e["model"] == "focalnet_tiny_lrf"} >= {"eager", "fused"}
    assert all(e["status"] == "ok" and "peak_mem_bytes" in e for e in tr)
    assert all(e["saved_activation_bytes"] > 0 for e in tr), [e.get("saved_activation_note") for e in tr]

    eq = [e for e in res["equivalence"] if e.get("max_rel_fused_vs_eager") is not None]
    assert {e["dtype"] for e in eq} == {"bf16", "fp16"}
    assert all(e["max_rel_fused_vs_eager"] < 5e-2 for e in eq), eq

    ops = res["op"]
    assert {e["direction"] for e in ops} == {"fwd", "fwd+bwd"}
    assert {"eager", "reference", "reference_compiled"} <= {e["backend"] for e in ops if e["status"] == "ok"}
    for e in ops:
        if e["status"] == "ok":
            B, H, W, C = e["shape"]
            assert e["floor_bytes"] == floor_bytes(B, H, W, C, e["L"], 2, e["direction"])
            assert e["median_ms"] > 0 and e["samples_ms"] and e["frac_floor"] > 0
    assert set(res["op_floor"]["formulas"]) >= {"fwd", "fwd+bwd"}
    # backends that cannot run on CPU tensors are skipped with a reason, not silently dropped
    assert any("cuda" in s["item"] and s["reason"] for s in res["skipped"])

    if _has_matplotlib():
        png = (out / "results.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    else:  # the PNG is optional on machines without matplotlib: the JSON says why it is missing
        assert res["files"]["png"] is None and "matplotlib" in res["png_problem"]
    table = (out / "table.txt").read_text()
    assert "Inference" in table and "focal_context op" in table and "FocalNet-T LRF" in table
    assert "saved activations MiB" in table


def test_cpu_default_path_tiny(tmp_path, capsys):
    rc = main(["--suite", "cpu", "--tiny", "--quick", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    for s in ("Inference", "img/s", "FocalNet-T SRF", "FocalNet-T LRF", "Swin-T", "fused", "Swin from:"):
        assert s in printed, s
    res = _strict_json(tmp_path / "results.json")
    assert res["suite"] == "cpu" and res["dtype"] == ["fp32"] and res["training"] == []
    main_group = [e for e in res["inference"] if not e["group"].startswith("peers")]
    assert {e["mode"] for e in main_group} == {"eager", "fused-ctx", "fused"}
    assert all(e["status"] == "ok" for e in res["inference"])
    # the peers group: eager and fused beside torch.compile and ONNX Runtime of the same eager model,
    # interleaved, with their outputs checked against the group's eager member
    peers = {e["mode"]: e for e in res["inference"] if e["group"].startswith("peers")}
    assert set(peers) == {"eager", "fused", "compile", "onnxruntime"}
    assert all(e["model"] == "focalnet_tiny_lrf" and e["median_img_s"] > 0 for e in peers.values())
    assert peers["onnxruntime"]["built_with"].startswith("onnxruntime ") and peers["onnxruntime"]["compile_s"] > 0
    assert peers["compile"]["built_with"].startswith("torch.compile")
    (eq,) = [e for e in res["equivalence"] if "max_rel_vs_eager" in e and "onnxruntime" in e["max_rel_vs_eager"]]
    assert eq["max_rel_vs_eager"]["onnxruntime"] < 1e-4 and eq["max_rel_vs_eager"]["fused"] < 1e-4
    # fused-ctx keeps the projections on torch's GEMM, fused uses focalnet_kernels.linear
    by_mode = {e["mode"]: e["backends_ran"] for e in main_group if e["model"].startswith("focalnet")}
    assert by_mode["fused-ctx"].get("linear:torch", 0) > 0 and "linear:onednn" not in by_mode["fused-ctx"]
    assert by_mode["fused"].get("linear:onednn", 0) > 0 or not _onednn()
    assert (tmp_path / "results.png").is_file() or not _has_matplotlib()


def _onednn():
    import importlib
    return importlib.import_module("focalnet_kernels.linear")._ONEDNN_LINEAR is not None


def test_linear_bench_runs(capsys):
    from benchmarks import linear_bench
    linear_bench.main(["--batch", "1", "--reps", "1"])
    out = capsys.readouterr().out
    assert "fc1+gelu" in out and "model total" in out and out.count("x  ") >= 20


def test_budget_skips_are_recorded(tmp_path):
    rc = main(["--dry-run", "--budget", "1", "--out", str(tmp_path)])
    assert rc == 0
    res = _strict_json(tmp_path / "results.json")
    assert res["sections"] and all(s["status"] == "skipped" for s in res["sections"])
    assert all("time budget" in s["reason"] for s in res["skipped"])
    assert res["inference"] == [] and res["op"] == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_gpu_suite_without_gpu_says_so():
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        main(["--suite", "gpu"])


# ------------------------------------------------------------------------------------------------
# README table
# ------------------------------------------------------------------------------------------------
def _sample_results(date: str, *, dry_run: bool = False) -> dict:
    def inf(model, label, mode, batch, img_s):
        return dict(model=model, label=label, mode=mode, dtype="bf16", batch=batch, status="ok",
                    median_img_s=img_s, median_ms=batch / img_s * 1e3, samples_ms=[batch / img_s * 1e3])

    def op(direction, backend, shape, ms, frac):
        return dict(size="tiny", stage=0, shape=shape, L=3, kernels=[3, 5, 7], dtype="bf16", direction=direction,
                    backend=backend, status="ok", median_ms=ms, floor_ms=ms * frac, frac_floor=frac)

    return {
        "schema": "focalnet-bench/1", "suite": "gpu", "quick": False, "dry_run": dry_run, "tiny": dry_run,
        "env": {"device_name": "NVIDIA H100 80GB HBM3", "date": date, "driver": "550.54.15",
                "cuda_runtime": "12.8", "torch": "2.11.0", "triton": "3.6.0", "git_commit": "0123456789abcdef"},
        "config": {"img_size": 224}, "dtype": ["bf16", "fp16"], "swin_source": "timm",
        "bandwidth": {"GBps": 3000.0},
        "op_floor": {"formulas": {"fwd": "B*H*W*(C + (L+1) + C)*e bytes: ...",
                                  "fwd+bwd": "B*H*W*(5*C + 3*(L+1))*e bytes: ...", "time": "..."}},
        "inference": [inf("focalnet_tiny_srf", "FocalNet-T SRF", "eager", 256, 3100.0),
                      inf("focalnet_tiny_srf", "FocalNet-T SRF", "fused", 256, 4321.0),
                      inf("focalnet_tiny_srf", "FocalNet-T SRF", "compile", 256, 5000.0),
                      inf("focalnet_tiny_srf", "FocalNet-T SRF", "fused+compile", 256, 5555.0),
                      inf("focalnet_tiny_srf", "FocalNet-T SRF", "eager", 64, 2900.0),
                      inf("focalnet_tiny_srf", "FocalNet-T SRF", "fused", 64, 3900.0),
                      inf("swin_tiny", "Swin-T", "eager", 256, 2800.0),
                      inf("swin_tiny", "Swin-T", "compile", 256, 4900.0),
                      inf("swin_tiny", "Swin-T", "eager", 64, 2500.0)],
        "training": [dict(inf("focalnet_tiny_srf", "FocalNet-T SRF", "eager", 128, 900.0), peak_mem_bytes=9 * 2 ** 30),
                     dict(inf("focalnet_tiny_srf", "FocalNet-T SRF", "fused", 128, 1200.0), peak_mem_bytes=6 * 2 ** 30)],
        "op": [op("fwd", "reference", [256, 56, 56, 96], 1.5, 0.07), op("fwd", "triton", [256, 56, 56, 96], 0.125, 0.84),
               op("fwd+bwd", "triton", [256, 56, 56, 96], 0.5, 0.6)],
        "equivalence": [dict(model="focalnet_tiny_srf", label="FocalNet-T SRF", dtype="bf16", batch=8,
                             max_rel_fused_vs_eager=3.1e-3)],
    }


def _write_run(root: Path, name: str, res: dict) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps(res))
    return d / "results.json"


def test_readme_table_renders_and_writes(tmp_path, capsys):
    results = tmp_path / "results"
    _write_run(results, "20250101-000000-nvidia-h100-80gb-hbm3", _sample_results("2025-01-01T00:00:00+00:00"))
    _write_run(results, "20250102-000000-cpu-dryrun", _sample_results("2025-01-02T00:00:00+00:00", dry_run=True))
    assert readme_table.main(["--results", str(results)]) == 0
    md = capsys.readouterr().out
    assert "NVIDIA H100 80GB HBM3" in md and "2025-01-01" in md and "2025-01-02" not in md
    assert "| FocalNet-T SRF | 3,100 | 4,321 | 5,000 | 5,555 | 1.39× |" in md
    assert "| Swin-T | 2,800 | – | 4,900 | – | – |" in md
    assert "3,100 → 4,321" in md and "1.33×" in md and "9.00 GiB" in md
    assert "0.125 (84%)" in md and "3,000 GB/s" in md and "bf16 3.1e-03" in md

    readme = tmp_path / "README.md"
    readme.write_text("# title\n\nintro\n\n" + readme_table.START + "\nold table\n" + readme_table.END + "\n\nrest\n")
    assert readme_table.main(["--results", str(results), "--write", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# title\n\nintro\n\n" + readme_table.START + "\n")
    assert text.endswith(readme_table.END + "\n\nrest\n")
    assert "old table" not in text and "| FocalNet-T SRF | 3,100 |" in text
    # idempotent
    assert readme_table.main(["--results", str(results), "--write", str(readme)]) == 0
    assert readme.read_text() == text

    no_markers = tmp_path / "OTHER.md"
    no_markers.write_text("nothing to replace\n")
    assert readme_table.main(["--results", str(results), "--write", str(no_markers)]) == 1
    assert no_markers.read_text() == "nothing to replace\n"


def test_readme_table_shows_every_fused_kernel_and_the_best(tmp_path, capsys):
    """A run that measured the fused model per kernel (fused = the auto pick, fused:cuda forced): one
    column each, titled by the kernel that ran, and the speed-up of the best; training likewise."""
    res = _sample_results("2025-01-01T00:00:00+00:00")
    for e in res["inference"] + res["training"]:
        if e["mode"] == "fused":
            e["backends_ran"] = {"triton:fwd": 12, "linear:torch": 60}
    cuda_inf = dict(res["inference"][1], mode="fused:cuda", median_img_s=4650.0, backends_ran={"cuda:fwd": 12})
    cuda_tr = dict(res["training"][1], mode="fused:cuda", median_img_s=1350.0, peak_mem_bytes=5 * 2 ** 30)
    res["inference"].append(cuda_inf)
    res["training"].append(cuda_tr)
    _write_run(tmp_path / "results", "20250101-000000-nvidia-h100-80gb-hbm3", res)
    assert readme_table.main(["--results", str(tmp_path / "results")]) == 0
    md = capsys.readouterr().out
    assert "| eager | fused (triton) | fused (cuda) | torch.compile |" in md, md
    assert "| FocalNet-T SRF | 3,100 | 4,321 | 4,650 | 5,000 | 5,555 | 1.50× |" in md, md
    assert "| FocalNet-T SRF | 900 | 1,200 | 1,350 | 1.50× | 9.00 GiB | 5.00 GiB |" in md, md


def test_readme_table_renders_the_newest_runs_newest_first(tmp_path, capsys):
    results = tmp_path / "results"
    _write_run(results, "20250101-000000-nvidia-h100-80gb-hbm3", _sample_results("2025-01-01T00:00:00+00:00"))
    newer = _sample_results("2025-01-03T00:00:00+00:00")
    newer["inference"] = newer["inference"][:2]
    _write_run(results, "20250103-000000-nvidia-h100-80gb-hbm3", newer)
    assert readme_table.main(["--results", str(results)]) == 0
    md = capsys.readouterr().out
    i, j = md.index("2025-01-03"), md.index("2025-01-01")
    assert i < j and "The run before it" in md[i:j + 200], md
    assert readme_table.main(["--results", str(results), "--runs", "1"]) == 0
    assert "2025-01-01" not in capsys.readouterr().out


def test_readme_table_without_gpu_results(tmp_path):
    results = tmp_path / "results"
    _write_run(results, "x-dryrun", _sample_results("2025-01-02T00:00:00+00:00", dry_run=True))
    assert readme_table.main(["--results", str(results)]) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_suite_tiny_on_cuda(tmp_path):
    """The GPU suite's CUDA code path (events, L2 flush, peak memory, Triton/CUDA backends) on tiny models."""
    rc = main(["--suite", "gpu", "--quick", "--tiny", "--batch", "2", "--modes", "eager,fused,compile,fused+compile",
               "--compile-backend", "eager", "--budget", "0", "--out", str(tmp_path)])
    res = _strict_json(tmp_path / "results.json")
    assert rc == 0, [s for s in res["sections"] if s["status"] != "ok"]
    assert res["device"]["type"] == "cuda" and res["env"]["device_name"]
    assert res["bandwidth"]["GBps"] > 50
    assert res["inference"] and all(e["status"] == "ok" for e in res["inference"]), \
        [(e["model"], e["mode"], e.get("reason")) for e in res["inference"] if e["status"] != "ok"]
    assert res["training"] and all(e["status"] == "ok" and e["peak_mem_bytes"] > 0 for e in res["training"])
    bad = [(e["backend"], e["direction"], e["shape"], e.get("reason")) for e in res["op"] if e["status"] != "ok"]
    assert not bad, bad
    tail = res["tail"]
    assert tail and all(e["status"] == "ok" for e in tail), [e for e in tail if e["status"] != "ok"]
    assert all(e["max_rel_vs_modulation_eager"] < 5e-2 for e in tail if e["variant"] == "modulation_fused")
    ran = {e["backend"] for e in res["op"]}
    skipped = " ".join(s["item"] for s in res["skipped"])
    for b in ("triton", "cuda"):
        assert b in ran or f"backend {b}" in skipped, (b, ran, res["skipped"])
    assert (tmp_path / "results.png").is_file() or not _has_matplotlib()


def _op_entry(L, ks, backend, direction, ms, shape=(2, 56, 56, 96), dtype="bf16"):
    return dict(L=L, kernels=list(ks), backend=backend, direction=direction, median_ms=ms, status="ok",
                shape=list(shape), dtype=dtype)


def test_cuda_preference_picks_measured_winner_and_writes(tmp_path, capsys):
    """The auto table comes from measurements: cuda only where it is faster beyond the margin over
    the cases both backends ran; --write replaces exactly the marked block of ops.py."""
    from benchmarks import cuda_preference as cp
    ops_src = (Path(cp.OPS_FILE)).read_text()
    assert cp.BEGIN in ops_src and cp.END in ops_src
    res = {"device": {"type": "cuda", "name": "NVIDIA H100"}, "op": [
        _op_entry(2, (3, 5), "triton", "fwd", 1.0), _op_entry(2, (3, 5), "cuda", "fwd", 0.5),
        _op_entry(2, (3, 5), "triton", "fwd+bwd", 3.0), _op_entry(2, (3, 5), "cuda", "fwd+bwd", 2.0),
        _op_entry(3, (3, 5, 7), "triton", "fwd", 1.0), _op_entry(3, (3, 5, 7), "cuda", "fwd", 0.99),
        _op_entry(3, (3, 5, 7), "cuda", "fwd+bwd", 0.1),          # no triton twin: not compared
        _op_entry(4, (3, 5, 7, 9), "cuda", "fwd", 0.1),           # cuda only: no entry
        dict(_op_entry(2, (3, 5), "cuda", "fwd", 0.01), status="error"),
    ]}
    choice = cp.compare([res], margin=0.03)
    assert choice[(2, (3, 5))]["pick"] == "cuda" and choice[(2, (3, 5))]["cases"] == 2
    assert choice[(3, (3, 5, 7))]["pick"] == "triton"          # 1% faster is within the margin
    assert (4, (3, 5, 7, 9)) not in choice
    path = tmp_path / "results.json"
    path.write_text(json.dumps(res))
    ops_copy = tmp_path / "ops.py"
    ops_copy.write_text(ops_src)
    assert cp.main([str(path), "--write", "--ops-file", str(ops_copy)]) == 0
    new = ops_copy.read_text()
    ns = {}
    block = new[new.index(cp.BEGIN):new.index(cp.END)]
    exec(block, ns)
    assert ns["_CUDA_PREFERENCE"] == {(2, (3, 5)): "cuda", (3, (3, 5, 7)): "triton"}
    assert new.replace(block, "") == ops_src.replace(ops_src[ops_src.index(cp.BEGIN):ops_src.index(cp.END)], "")
    assert "NVIDIA H100" in block


def test_cuda_preference_without_gpu_results(tmp_path, capsys):
    from benchmarks import cuda_preference as cp
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"device": {"type": "cpu"}, "op": [_op_entry(2, (3, 5), "cpu", "fwd", 1.0)]}))
    assert cp.main([str(path)]) == 1
    assert "no configuration was measured" in capsys.readouterr().err


def test_cuda_fma_backend_times_the_cuda_backend_without_tensor_cores():
    # the GPU suite times both CUDA forwards: cuda (tensor cores for fp16/bf16) and cuda_fma
    from benchmarks import op_bench
    assert "cuda_fma" in op_bench.OP_BACKENDS
    assert op_bench._backend_env("cuda_fma") == {"FOCALNET_KERNELS_BACKEND": "cuda", "FOCALNET_CUDA_MMA": "0"}
    assert op_bench._backend_env("cuda") == {"FOCALNET_KERNELS_BACKEND": "cuda"}
    assert op_bench._backend_env("eager") == {}
    cpu = torch.device("cpu")
    assert "CUDA tensors" in op_bench.backend_skip_reason("cuda_fma", cpu, torch.bfloat16, 3, "inductor")
    import os
    before = dict(os.environ)
    with op_bench._env(op_bench._backend_env("cuda_fma")):
        assert os.environ["FOCALNET_CUDA_MMA"] == "0" and os.environ["FOCALNET_KERNELS_BACKEND"] == "cuda"
    assert dict(os.environ) == before


@pytest.mark.skipif(not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton tail needs a GPU or the interpreter")
def test_tail_bench_cell_runs_every_variant():
    """benchmarks/tail_bench.py on one small shape: every variant runs, the fused modulation equals eager's."""
    from benchmarks import tail_bench
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rows = tail_bench.run_cell(2, 5, 6, 32, 3, torch.float32, torch.device(dev), n=2)
    assert [r["variant"] for r in rows] == list(tail_bench.VARIANTS)
    assert all(r["status"] == "ok" and r["median_ms"] > 0 for r in rows), rows
    assert rows[-1]["max_rel_vs_modulation_eager"] < 1e-5
