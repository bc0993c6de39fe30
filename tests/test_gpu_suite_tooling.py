"""The GPU suite's tooling, checked on the CPU: its --plan dry run, the source stamp that decides whether
the prepared wheel may be installed, the deadline plugin that ends a time-boxed pytest run cleanly,
and the ncu counter parser (on a synthetic CSV in ncu's --page raw layout)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from benchmarks import gpu_profile, source_stamp

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_plan_runs_without_gpu():
    env = dict(os.environ, SUITE_SECONDS="420", PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--plan"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    for tier in ("0. install", "1. smoke tests", "2. ncu counters", "3. benchmark", "4. other GPU tests"):
        assert tier in out, out
    assert "gpu plan, budget" in out, out  # the benchmark's own plan within the budget given
    # the budget the benchmark gets leaves the other tiers their time inside SUITE_SECONDS
    budget = int(out.split("3. benchmark: --budget ")[1].split()[0])
    assert 30 <= budget <= 420 - 15 - 100 - 60 - 90


def _tree(tmp_path):
    for rel, text in {"setup.py": "x", "focalnet/a.py": "a", "focalnet_kernels/b.py": "b",
                      "csrc/c.cu": "c", "benchmarks/d.py": "d"}.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def test_source_stamp_tracks_sources_only(tmp_path):
    root = _tree(tmp_path)
    s0 = source_stamp.stamp(str(root))
    assert s0 == source_stamp.stamp(str(root))
    (root / "focalnet" / "__pycache__").mkdir()
    (root / "focalnet" / "__pycache__" / "a.cpython-312.pyc").write_text("junk")
    (root / "benchmarks" / "results").mkdir()
    (root / "benchmarks" / "results" / "r.py").write_text("results are not sources")
    (root / "focalnet_kernels" / "_C.so").write_text("binary")
    assert source_stamp.stamp(str(root)) == s0
    (root / "csrc" / "c.cu").write_text("c changed")
    assert source_stamp.stamp(str(root)) != s0
    (root / "csrc" / "c.cu").write_text("c")
    assert source_stamp.stamp(str(root)) == s0
    (root / "focalnet" / "new.py").write_text("")
    assert source_stamp.stamp(str(root)) != s0


def test_source_stamp_script_matches_module():
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "source_stamp.py"), str(ROOT)],
                       capture_output=True, text=True, check=True)
    assert p.stdout.strip() == source_stamp.stamp(str(ROOT))


def test_deadline_plugin_skips_tests_after_the_deadline(tmp_path):
    (tmp_path / "test_x.py").write_text(textwrap.dedent("""
        def test_a():
            pass
        def test_b():
            pass
    """))
    env = dict(os.environ, PYTHONPATH=str(ROOT), FOCALNET_TEST_DEADLINE=str(time.time() - 1))
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "benchmarks.pytest_deadline", "-p",
                        "no:cacheprovider", "-rs", str(tmp_path)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout
    assert "2 skipped" in p.stdout and "time budget" in p.stdout, p.stdout
    env["FOCALNET_TEST_DEADLINE"] = str(time.time() + 3600)
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "benchmarks.pytest_deadline", "-p",
                        "no:cacheprovider", str(tmp_path)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert "2 passed" in p.stdout, p.stdout


def _ncu_csv(rows):
    hdr = ['"ID"', '"Kernel Name"'] + [f'"{m}"' for m in gpu_profile.METRICS]
    units = ['""', '""'] + ['"x"'] * len(gpu_profile.METRICS)
    lines = ["==PROF== Connected to process", ",".join(hdr), ",".join(units)]
    for i, (name, vals) in enumerate(rows):
        lines.append(",".join([f'"{i}"', f'"{name}"'] + [f'"{v}"' for v in vals]))
    return "\n".join(lines)


def test_ncu_parser_splits_phases_and_normalises_per_element():
    B, H, W, C = 2, 4, 4, 8
    n = B * H * W * C  # 256 output elements
    # time ns, warp instr, thread ffma, dram read, dram write, regs, occupancy %, grid
    k = lambda t, inst, ffma: [f"{t:,}", f"{inst:,}", ffma, 512, 256, 96, 40, 132]  # noqa: E731
    rows = [("spin_kernel", k(1, 1, 0)), ("_fwd_local_kernel", k(3000, 80, 2560)),
            ("_fwd_global_kernel", k(1000, 8, 0)),
            ("spin_kernel", k(1, 1, 0)), ("_bwd_kernel", k(2000, 16, 512)),
            ("spin_kernel", k(1, 1, 0)), ("fc_fused_kernel", k(500, 8, 256)),
            ("spin_kernel", k(1, 1, 0)), ("fc_bwd_level_kernel", k(500, 8, 256))]
    table = gpu_profile.parse(_ncu_csv(rows), B, H, W, C, [3, 5])
    lines = {ln.split()[0]: ln.split() for ln in table.splitlines()[2:]}
    assert set(lines) == {"triton:fwd", "triton:bwd", "cuda:fwd", "cuda:bwd"}, table
    fwd = lines["triton:fwd"]
    assert float(fwd[1]) == pytest.approx(0.004)                    # 3000 + 1000 ns
    assert float(fwd[2]) == pytest.approx((80 + 8) * 32 / n, abs=0.05)  # warp instr x 32 / elements
    assert float(fwd[3]) == pytest.approx(2560 / n, abs=0.05)
    assert float(fwd[4]) == pytest.approx(2 * 768 / n, abs=0.05)
    assert "_fwd_local_kernel (96, 40%, 75%)" in table


def test_ncu_parser_without_rows_says_so():
    assert "no ncu rows" in gpu_profile.parse("==PROF== nothing\n", 1, 1, 1, 1, [3])


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_prepare_refuses_without_python312(tmp_path):
    env = dict(os.environ, PY=str(tmp_path / "no-such-python"))
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_prepare.sh")], env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and "CPython 3.12" in p.stdout, p.stdout + p.stderr
