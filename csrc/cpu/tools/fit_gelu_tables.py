"""Generate the piecewise-polynomial GELU tables of the AVX-512 CPU kernels.

    python csrc/cpu/tools/fit_gelu_tables.py > /tmp/tables.inc   # then paste into kernels.inc

Phi(-a) = erfc(a / sqrt2) / 2 and phi(a) = exp(-a^2 / 2) / sqrt(2 pi) on a in [0, 8), split into 32
intervals of width 1/4; on each, a degree-5 polynomial in u = a - k/4 (u in [0, 1/4)) fitted by least
squares at 26 Chebyshev nodes in double precision, coefficients rounded to fp32. The kernels pick
interval k's coefficients with a 32-entry vector permute (two zmm registers per coefficient).
The script also reports the error of the fp32 evaluation (Horner with fp32 rounding) on a dense
grid: about 3e-8 absolute for both (the rounding of values near 1/2), ~3e-6 relative for Phi(-a)
up to a = 5.
"""
import math

import numpy as np

DEG, N, H = 5, 32, 0.25


def phi_neg(a):
    return 0.5 * math.erfc(a / math.sqrt(2.0))


def pdf(a):
    return math.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)


def fit(fn):
    m = DEG + 21
    t = np.cos(np.pi * (np.arange(m) + 0.5) / m)
    u = (t + 1.0) / 2.0 * H
    rows = []
    for k in range(N):
        y = np.array([fn(k * H + x) for x in u])
        rows.append(np.polynomial.polynomial.polyfit(u, y, DEG))
    return np.array(rows).astype(np.float32)   # [interval][power]


def eval_fp32(co, a):
    idx = np.minimum((a * np.float32(4)).astype(np.int32), N - 1)
    u = (a - idx.astype(np.float32) * np.float32(H)).astype(np.float32)
    c = co[idx]
    q = c[:, DEG]
    for j in range(DEG - 1, -1, -1):
        q = (q * u + c[:, j]).astype(np.float32)
    return q


def c_array(name, co):
    lines = [f"alignas(64) constexpr float {name}[{DEG + 1}][{N}] = {{"]
    for j in range(DEG + 1):
        vals = ", ".join(f"{float(v):.9g}f" for v in co[:, j])
        lines.append(f"    {{{vals}}},")
    lines.append("};")
    return "\n".join(lines)


def main():
    a = np.linspace(0.0, 8.0, 400001, dtype=np.float64)[:-1].astype(np.float32)
    for name, fn in (("kPhiNegTab", phi_neg), ("kPdfTab", pdf)):
        co = fit(fn)
        ref = np.array([fn(float(x)) for x in a])
        err = np.abs(eval_fp32(co, a) - ref)
        print(f"// {name}: max abs error {err.max():.2e}, max rel error (a < 5) "
              f"{(err[a < 5] / ref[a < 5]).max():.2e}")
        print(c_array(name, co))


if __name__ == "__main__":
    main()
