"""The AVX-512 CPU kernels' GELU tables are what csrc/cpu/tools/fit_gelu_tables.py generates (so the
error it reports is the error of the shipped tables), and that error is as documented.

The comparison is by value, not by text: the shipped literals are parsed to float32 and compared with
the generator's least-squares coefficients in double precision, before its rounding to float32. The
fit itself is not bit-reproducible across numpy/LAPACK builds: numpy 2.4.6 and 2.5.5 give doubles that
differ by up to 3e-11 of an interval's largest coefficient, and the shipped tables differ from either's
float32 rounding in 2 of 384 values by one ulp (the old text comparison failed under both). So each shipped value must be the float32 nearest to the generator's double
up to a slack of 2e-10 of that interval's largest coefficient (7x the observed spread). Regenerating
with another degree, interval count or node set fails, and so does editing any coefficient by more
than half a float32 ulp plus that slack (so a 1-ulp edit of any coefficient above ~1% of its
interval's largest, unless the generator's double lies within the slack of a rounding midpoint)."""
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
np = pytest.importorskip("numpy")

NAMES = (("kPhiNegTab", "phi_neg"), ("kPdfTab", "pdf"))
SLACK = 2e-10  # of an interval's largest |coefficient|: the fit's spread across numpy builds is 3e-11


def _load_tool():
    spec = importlib.util.spec_from_file_location("fit_gelu_tables", ROOT / "csrc/cpu/tools/fit_gelu_tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _shipped_tables():
    """{name: float32 [power][interval]} parsed from the literals in the kernels' source."""
    text = (ROOT / "csrc/cpu/focal_context_cpu_kernels.inc").read_text()
    out = {}
    for m in re.finditer(r"alignas\(64\) constexpr float (\w+)\[(\d+)\]\[(\d+)\] = \{(.*?)\n\};", text, re.S):
        rows = re.findall(r"\{([^{}]*)\}", m.group(4))
        vals = [[float(v.strip().rstrip("f")) for v in r.split(",") if v.strip()] for r in rows]
        arr = np.array(vals, dtype=np.float64)
        assert arr.shape == (int(m.group(2)), int(m.group(3))), m.group(1)
        out[m.group(1)] = arr.astype(np.float32)   # as the C++ compiler rounds each literal
    return out


def _generator_doubles(tool, fn, monkeypatch):
    """The generator's coefficients [interval][power] before its rounding to float32 (its polyfit
    results, recorded), and its own float32 output."""
    seen = []
    real = np.polynomial.polynomial.polyfit

    def polyfit(*args, **kw):
        seen.append(np.asarray(real(*args, **kw), dtype=np.float64))
        return seen[-1]

    with monkeypatch.context() as m:
        m.setattr(np.polynomial.polynomial, "polyfit", polyfit)
        co32 = tool.fit(fn)
    dbl = np.array(seen)
    assert dbl.shape == co32.shape and np.array_equal(dbl.astype(np.float32), co32)
    return dbl, co32


def test_tables_in_kernels_match_the_generator(monkeypatch):
    tool = _load_tool()
    shipped = _shipped_tables()
    assert set(shipped) == {name for name, _ in NAMES}
    for name, fn_name in NAMES:
        dbl, co32 = _generator_doubles(tool, getattr(tool, fn_name), monkeypatch)
        got = shipped[name].T                                   # -> [interval][power], as fit() returns
        assert got.shape == dbl.shape == (tool.N, tool.DEG + 1), name
        half_ulp = 0.5 * np.spacing(np.abs(got)).astype(np.float64)
        slack = SLACK * np.abs(dbl).max(axis=1, keepdims=True)
        dev = np.abs(got.astype(np.float64) - dbl)
        bad = np.argwhere(dev > half_ulp + slack)
        assert bad.size == 0, (
            f"{name} differs from the generator's coefficients at [interval, power] {bad[:5].tolist()}: "
            f"shipped {[float(got[tuple(i)]) for i in bad[:5]]}, generated {[float(dbl[tuple(i)]) for i in bad[:5]]}")
        # and the generator's text for these values parses back to the same float32s (its printing
        # is not numpy's: Python's format of a float, 9 significant digits, round-trips a float32)
        text = tool.c_array(name, co32)
        reparsed = [float(v.rstrip("f")) for v in re.findall(r"-?[0-9.]+(?:e[-+]?\d+)?f", text.split("=", 1)[1])]
        assert np.array_equal(np.array(reparsed, dtype=np.float32), co32.T.ravel())


def test_table_error_as_documented():
    tool = _load_tool()
    a = np.linspace(0.0, 8.0, 20001, dtype=np.float64)[:-1].astype(np.float32)
    for fn in (tool.phi_neg, tool.pdf):
        ref = np.array([fn(float(x)) for x in a])
        err = np.abs(tool.eval_fp32(tool.fit(fn), a) - ref)
        assert err.max() < 4e-8
