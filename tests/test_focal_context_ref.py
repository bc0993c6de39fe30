"""The eager reference and the public entry point: a hand-written fp64 loop, the explicit backward
formulas (gradcheck), strided views, and every validation error."""
import math

import pytest
import torch

import focalnet_kernels as fk
from focalnet_kernels import reference
from conftest import rel_err


def _loop_focal_context(ctx, gates, kernels, normalize):
    """Plain Python loops over every element: an independent fp64 oracle."""
    B, H, W, C = ctx.shape
    L = len(kernels)
    x = ctx.double().clone()
    acc = torch.zeros(B, H, W, C, dtype=torch.float64)
    gelu = lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2)))  # noqa: E731
    for l in range(L):
        k = kernels[l].shape[-1]
        p = k // 2
        y = torch.zeros_like(x)
        for b in range(B):
            for h in range(H):
                for w in range(W):
                    for c in range(C):
                        s = 0.0
                        for i in range(k):
                            for j in range(k):
                                hh, ww = h + i - p, w + j - p
                                if 0 <= hh < H and 0 <= ww < W:
                                    s += float(kernels[l][c, 0, i, j]) * float(x[b, hh, ww, c])
                        y[b, h, w, c] = gelu(s)
        x = y
        acc += x * gates[..., l : l + 1].double()
    for b in range(B):
        for c in range(C):
            acc[b, :, :, c] += gelu(float(x[b, :, :, c].mean())) * gates[b, :, :, L].double()
    return acc / (L + 1) if normalize else acc


@pytest.mark.parametrize("normalize", [False, True])
def test_reference_matches_loop(normalize):
    torch.manual_seed(0)
    B, H, W, C = 2, 5, 4, 3
    ctx = torch.randn(B, H, W, C, dtype=torch.float64)
    gates = torch.randn(B, H, W, 3, dtype=torch.float64)
    kernels = [torch.randn(C, 1, 3, 3, dtype=torch.float64), torch.randn(C, 1, 5, 5, dtype=torch.float64)]
    want = _loop_focal_context(ctx, gates, kernels, normalize)
    assert rel_err(fk.focal_context_ref(ctx, gates, kernels, normalize), want) < 1e-12
    assert rel_err(fk.focal_context(ctx, gates, kernels, normalize=normalize), want) < 1e-12


def test_contract_forward_matches_plain_reference():
    torch.manual_seed(1)
    ctx = torch.randn(2, 7, 9, 6, dtype=torch.float64)
    gates = torch.randn(2, 7, 9, 4, dtype=torch.float64)
    ws = [torch.randn(6, k, k, dtype=torch.float64) for k in (3, 5, 7)]
    out, pooled = reference.focal_context_fwd_ref(ctx, gates, ws, True)
    want = fk.focal_context_ref(ctx, gates, [w[:, None] for w in ws], True)
    assert rel_err(out, want) < 1e-12
    assert pooled.shape == (2, 6)


def test_gradcheck_explicit_backward(backend):
    """fp64 gradcheck of the op's registered backward (explicit formulas every kernel follows)."""
    backend("reference")
    torch.manual_seed(2)
    B, H, W, C, L = 2, 5, 6, 3, 2
    f_out = torch.randn(B, H, W, 2 * C + L + 1, dtype=torch.float64, requires_grad=True)
    ks = [torch.randn(C, 1, k, k, dtype=torch.float64, requires_grad=True) for k in (3, 5)]

    def f(y, k0, k1):
        return fk.focal_context(y[..., C : 2 * C], y[..., 2 * C :], [k0, k1], normalize=True)

    assert torch.autograd.gradcheck(f, (f_out, *ks))


def test_strided_and_channels_first_views():
    torch.manual_seed(3)
    B, H, W, C = 2, 6, 7, 4
    f_out = torch.randn(B, H, W, 2 * C + 3, dtype=torch.float64)
    ks = [torch.randn(C, 1, 3, 3, dtype=torch.float64), torch.randn(C, 1, 5, 5, dtype=torch.float64)]
    ctx, gates = f_out[..., C : 2 * C], f_out[..., 2 * C :]
    want = fk.focal_context_ref(ctx.contiguous(), gates.contiguous(), ks)
    assert rel_err(fk.focal_context(ctx, gates, ks), want) < 1e-12
    ctx_cf = ctx.permute(0, 3, 1, 2).contiguous()  # channels-first storage seen as B×H×W×C
    assert rel_err(fk.focal_context(ctx_cf.permute(0, 2, 3, 1), gates, ks), want) < 1e-12


def _good():
    ctx = torch.randn(1, 4, 4, 3)
    gates = torch.randn(1, 4, 4, 3)
    ks = [torch.randn(3, 1, 3, 3), torch.randn(3, 1, 5, 5)]
    return ctx, gates, ks


@pytest.mark.parametrize("mutate, exc, match", [
    (lambda a: ("x", a[1], a[2]), TypeError, "`ctx`"),
    (lambda a: (a[0].int(), a[1], a[2]), TypeError, "`ctx`"),
    (lambda a: (a[0][0], a[1], a[2]), ValueError, "`ctx`"),
    (lambda a: (a[0], a[1].double(), a[2]), TypeError, "`gates`"),
    (lambda a: (a[0], a[1][..., :2], a[2]), ValueError, "`gates`"),
    (lambda a: (a[0], a[1], []), ValueError, "`kernels`"),
    (lambda a: (a[0], a[1], a[2][0]), TypeError, "`kernels`"),
    (lambda a: (a[0], a[1], [a[2][0], torch.randn(4, 1, 5, 5)]), ValueError, r"`kernels\[1\]`"),
    (lambda a: (a[0], a[1], [a[2][0], torch.randn(3, 1, 4, 4)]), ValueError, "odd"),
    (lambda a: (a[0], a[1], [a[2][0], torch.randn(3, 1, 3, 5)]), ValueError, "square"),
    (lambda a: (a[0], a[1], [a[2][0], torch.randn(3, 1, 5, 5).long()]), TypeError, r"`kernels\[1\]`"),
    (lambda a: (a[0], a[1], [a[2][0], torch.randn(3, 5, 5)]), ValueError, r"`kernels\[1\]`"),
])
def test_validation_errors(mutate, exc, match):
    ctx, gates, ks = mutate(_good())
    with pytest.raises(exc, match=match):
        fk.focal_context(ctx, gates, ks)


def test_normalize_must_be_bool():
    ctx, gates, ks = _good()
    with pytest.raises(TypeError, match="`normalize`"):
        fk.focal_context(ctx, gates, ks, normalize=1)


def test_empty_batch_and_bad_backend_name(monkeypatch):
    ctx, gates, ks = _good()
    out = fk.focal_context(ctx[:0], gates[:0], ks)
    assert out.shape == (0, 4, 4, 3)
    monkeypatch.setenv("FOCALNET_KERNELS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="FOCALNET_KERNELS_BACKEND"):
        fk.focal_context(ctx, gates, ks)


def test_nan_inf_propagate_reference():
    ctx, gates, ks = _good()
    ctx[0, 1, 1, 0] = float("nan")
    ctx[0, 3, 3, 1] = float("inf")
    out = fk.focal_context(ctx.double(), gates.double(), [k.double() for k in ks])
    want = fk.focal_context_ref(ctx.double(), gates.double(), [k.double() for k in ks])
    torch.testing.assert_close(out, want, equal_nan=True)
    assert out.isnan().any()
