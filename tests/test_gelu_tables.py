"""The AVX-512 CPU kernels' GELU tables are exactly what csrc/cpu/tools/fit_gelu_tables.py generates
(so the error it reports is the error of the shipped tables), and that error is as documented."""
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
np = pytest.importorskip("numpy")


def _load_tool():
    spec = importlib.util.spec_from_file_location("fit_gelu_tables", ROOT / "csrc/cpu/tools/fit_gelu_tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _arrays(text):
    return {m.group(1): m.group(0) for m in re.finditer(r"alignas\(64\) constexpr float (\w+)\[6\]\[32\] = \{.*?\n\};",
                                                      text, re.S)}


def test_tables_in_kernels_match_the_generator():
    tool = _load_tool()
    generated = "\n".join(tool.c_array(name, tool.fit(fn)) for name, fn in
                          (("kPhiNegTab", tool.phi_neg), ("kPdfTab", tool.pdf)))
    shipped = _arrays((ROOT / "csrc/cpu/focal_context_cpu_kernels.inc").read_text())
    want = _arrays(generated)
    assert set(want) == {"kPhiNegTab", "kPdfTab"} and set(shipped) == set(want)
    for name in want:
        assert shipped[name] == want[name], f"{name} differs from the generator's output"


def test_table_error_as_documented():
    tool = _load_tool()
    a = np.linspace(0.0, 8.0, 20001, dtype=np.float64)[:-1].astype(np.float32)
    for fn in (tool.phi_neg, tool.pdf):
        ref = np.array([fn(float(x)) for x in a])
        err = np.abs(tool.eval_fp32(tool.fit(fn), a) - ref)
        assert err.max() < 4e-8
