"""Hostile and odd inputs: property-based tests over the valid argument space (against the fp64
reference) and over the invalid space (the error contract: ValueError/TypeError naming the argument)."""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import focalnet_kernels as fk
from conftest import rel_err

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))


@st.composite
def valid_case(draw):
    B = draw(st.integers(0, 2))
    H = draw(st.integers(1, 9))
    W = draw(st.integers(1, 9))
    C = draw(st.integers(1, 12))
    L = draw(st.integers(1, 4))
    ks = [draw(st.sampled_from([3, 5, 7])) for _ in range(L)]
    layout = draw(st.sampled_from(["contiguous", "f_view", "channels_first", "transposed_hw"]))
    normalize = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return B, H, W, C, ks, layout, normalize, seed


def _make(B, H, W, C, ks, layout, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    L = len(ks)
    if layout == "f_view":
        y = torch.randn(B, H, W, 2 * C + L + 1, generator=g, dtype=dtype)
        ctx, gates = y[..., C : 2 * C], y[..., 2 * C :]
    elif layout == "channels_first":
        ctx = torch.randn(B, C, H, W, generator=g, dtype=dtype).permute(0, 2, 3, 1)
        gates = torch.randn(B, L + 1, H, W, generator=g, dtype=dtype).permute(0, 2, 3, 1)
    elif layout == "transposed_hw":
        ctx = torch.randn(B, W, H, C, generator=g, dtype=dtype).transpose(1, 2)
        gates = torch.randn(B, W, H, L + 1, generator=g, dtype=dtype).transpose(1, 2)
    else:
        ctx = torch.randn(B, H, W, C, generator=g, dtype=dtype)
        gates = torch.randn(B, H, W, L + 1, generator=g, dtype=dtype)
    kernels = [torch.randn(C, 1, k, k, generator=g, dtype=dtype) * (1.0 / k) for k in ks]
    return ctx, gates, kernels


@pytest.mark.skipif(os.environ.get("FOCALNET_KERNELS_BACKEND", "auto") not in ("auto", "cpu"),
                    reason="this property runs the auto backend")
@SETTINGS
@given(valid_case())
def test_valid_space_matches_reference(case):
    B, H, W, C, ks, layout, normalize, seed = case
    ctx, gates, kernels = _make(B, H, W, C, ks, layout, seed)
    for t in (ctx, gates, *kernels):
        t.requires_grad_(True)
    out = fk.focal_context(ctx, gates, kernels, normalize=normalize)
    want = fk.focal_context_ref(ctx.double(), gates.double(), [k.double() for k in kernels], normalize)
    assert out.shape == (B, H, W, C) and out.dtype == ctx.dtype
    if B == 0:
        return
    assert rel_err(out, want) < 1e-5
    gout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (ctx, gates, *kernels), gout)
    want_grads = torch.autograd.grad(want, (ctx, gates, *kernels), gout.double())
    for a, b in zip(grads, want_grads):
        assert rel_err(a, b) < 1e-5


def _base():
    ctx = torch.randn(1, 4, 5, 3)
    return ctx, torch.randn(1, 4, 5, 3), [torch.randn(3, 1, 3, 3), torch.randn(3, 1, 5, 5)]


BAD = {
    "ctx int": (lambda c, g, k: (c.int(), g, k), TypeError, "`ctx`"),
    "ctx bool": (lambda c, g, k: (c > 0, g, k), TypeError, "`ctx`"),
    "ctx rank 3": (lambda c, g, k: (c[0], g, k), ValueError, "`ctx`"),
    "ctx rank 5": (lambda c, g, k: (c[None], g, k), ValueError, "`ctx`"),
    "ctx list": (lambda c, g, k: (c.tolist(), g, k), TypeError, "`ctx`"),
    "gates dtype mixed": (lambda c, g, k: (c, g.half(), k), TypeError, "`gates`"),
    "gates wrong L": (lambda c, g, k: (c, g[..., :2], k), ValueError, "`gates`"),
    "gates wrong H": (lambda c, g, k: (c, g[:, :3], k), ValueError, "`gates`"),
    "kernels empty (L=0)": (lambda c, g, k: (c, g[..., :1], []), ValueError, "`kernels`"),
    "kernels tensor": (lambda c, g, k: (c, g, torch.stack([k[0], k[0]])), TypeError, "`kernels`"),
    "kernel C mismatch": (lambda c, g, k: (c, g, [k[0], torch.randn(4, 1, 5, 5)]), ValueError, r"kernels\[1\]"),
    "kernel even": (lambda c, g, k: (c, g, [k[0], torch.randn(3, 1, 4, 4)]), ValueError, r"kernels\[1\]"),
    "kernel non-square": (lambda c, g, k: (c, g, [torch.randn(3, 1, 3, 5), k[1]]), ValueError, r"kernels\[0\]"),
    "kernel int": (lambda c, g, k: (c, g, [k[0].long(), k[1]]), TypeError, r"kernels\[0\]"),
    "kernel not tensor": (lambda c, g, k: (c, g, [k[0], "w"]), TypeError, r"kernels\[1\]"),
    "kernel rank": (lambda c, g, k: (c, g, [k[0][:, 0], k[1]]), ValueError, r"kernels\[0\]"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_invalid_inputs_raise_named_errors(case):
    mutate, exc, match = BAD[case]
    with pytest.raises(exc, match=match):
        fk.focal_context(*mutate(*_base()))


@SETTINGS
@given(st.integers(1, 3), st.integers(-3, 3), st.sampled_from([torch.int32, torch.int64, torch.uint8]))
def test_invalid_space_never_crashes(extra_rank, c_delta, int_dtype):
    ctx, gates, ks = _base()
    bad_calls = [
        (ctx.reshape((1,) * extra_rank + ctx.shape), gates, ks),
        (ctx.to(int_dtype), gates, ks),
        (ctx, gates, [torch.randn(3 + c_delta if c_delta else 4, 1, 3, 3), ks[1]]),
    ]
    for args in bad_calls:
        with pytest.raises((ValueError, TypeError)):
            fk.focal_context(*args)


def test_one_by_one_image_and_requires_grad_on_some_inputs():
    ctx, gates, ks = _base()
    ctx, gates = ctx[:, :1, :1].clone(), gates[:, :1, :1].clone()
    ctx.requires_grad_(True)  # gates and kernels do not require grad
    out = fk.focal_context(ctx, gates, ks)
    want = fk.focal_context_ref(ctx.double(), gates.double(), [k.double() for k in ks])
    assert rel_err(out, want) < 1e-5
    (g,) = torch.autograd.grad(out.sum(), (ctx,))
    (wg,) = torch.autograd.grad(want.sum(), (ctx,))
    assert rel_err(g, wg) < 1e-5


def test_overlapping_strides_read_only():
    """An expanded (overlapping, stride-0) ctx is a valid read-only input."""
    _, gates, ks = _base()
    row = torch.randn(1, 1, 5, 3)
    ctx = row.expand(1, 4, 5, 3)
    out = fk.focal_context(ctx, gates, ks)
    want = fk.focal_context_ref(ctx.contiguous().double(), gates.double(), [k.double() for k in ks])
    assert rel_err(out, want) < 1e-5


def test_different_devices_named():
    ctx, gates, ks = _base()
    meta = gates.to("meta")
    with pytest.raises(ValueError, match="`gates`"):
        fk.focal_context(ctx, meta, ks)
    with pytest.raises(ValueError, match=r"`kernels\[0\]`"):
        fk.focal_context(ctx, gates, [ks[0].to("meta"), ks[1]])
