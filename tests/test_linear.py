"""focalnet_kernels.linear (oneDNN for fp32 CPU, F.linear otherwise) against an fp64 linear_ref: odd
shapes, strided inputs, no bias, the GELU epilogue, the training path's gradients, NaN / Inf, which
backend ran, the fallback rules (dtype, autocast, subclasses, env), torch.compile, argument
validation, and the fused model using it."""
import importlib

import pytest
import torch

from focalnet_kernels import linear, linear_ref, ops, select_linear_backend
from conftest import rel_err

lin_mod = importlib.import_module("focalnet_kernels.linear")   # the module (the package exports the function)

ONEDNN = lin_mod._ONEDNN_LINEAR is not None
needs_onednn = pytest.mark.skipif(not ONEDNN, reason="this torch build has no oneDNN (mkldnn) linear")


def _inputs(shape, k, n, seed, strided=False, bias=True):
    """strided: x every other row of a wider tensor with a feature slice of a bigger last dim, the
    weight a transposed view, the bias every other element (a strided bias once gave wrong sums)."""
    g = torch.Generator().manual_seed(seed)
    if strided:
        x = torch.randn(*shape[:-1], 2, k + 5, generator=g)[..., 0, 2:k + 2]
        w = (torch.randn(k, n, generator=g) / k ** 0.5).t()
        b = torch.randn(2 * n, generator=g)[::2] if bias else None
    else:
        x = torch.randn(*shape[:-1], k, generator=g)
        w = torch.randn(n, k, generator=g) / k ** 0.5
        b = torch.randn(n, generator=g) if bias else None
    return x, w, b


CASES = [((7,), 1, 1), ((3, 5), 24, 40), ((2, 7, 9), 96, 196), ((1, 13, 11), 33, 129), ((2, 3, 5, 7), 17, 65)]


@needs_onednn
@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_onednn_matches_fp64(case, bias, strided, activation):
    shape, k, n = CASES[case]
    x, w, b = _inputs(shape + (k,), k, n, seed=case, strided=strided, bias=bias)
    before = ops.backend_calls["linear:onednn"]
    with torch.no_grad():
        y = linear(x, w, b, activation=activation)
    assert ops.backend_calls["linear:onednn"] == before + 1, "oneDNN did not run"
    ref = linear_ref(x.double(), w.double(), None if b is None else b.double(), activation=activation)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert rel_err(y, ref) < 1e-5


@needs_onednn
@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("case", [((4, 6), 24, 40), ((2, 5, 7), 96, 33), ((3, 3, 3), 40, 96), ((2, 50), 8, 24),
                                  ((3, 40), 24, 8)])
def test_training_path_grads_match_fp64(case, activation):
    """With a gradient, oneDNN runs forward and backward (grad_x, grad_w in both orientations of
    _grad_weight - (2, 50) x 8 -> 24 takes the transposed one - grad_b): every gradient against fp64
    autograd of linear_ref, strided x and dy."""
    shape, k, n = case
    x, w, b = _inputs(shape + (k,), k, n, seed=3, strided=True)
    x.requires_grad_(True)
    w.requires_grad_(True)
    b.requires_grad_(True)
    before = ops.backend_calls["linear:onednn"]
    y = linear(x, w, b, activation=activation)
    assert ops.backend_calls["linear:onednn"] == before + 1 and y.requires_grad
    g = torch.Generator().manual_seed(4)
    dy = torch.randn(*shape, 2 * n, generator=g)[..., ::2]          # non-contiguous upstream grad
    y.backward(dy)
    xd, wd, bd = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    yd = linear_ref(xd, wd, bd, activation=activation)
    yd.backward(dy.double())
    assert rel_err(y, yd) < 1e-5
    for name, got, ref in (("x", x.grad, xd.grad), ("w", w.grad, wd.grad), ("b", b.grad, bd.grad)):
        assert got.shape == ref.shape and rel_err(got, ref) < 1e-5, name


@needs_onednn
def test_training_path_partial_grads_and_no_double_backward():
    x, w, b = _inputs((5, 24), 24, 40, seed=5)
    w.requires_grad_(True)                                      # frozen x and bias
    y = linear(x, w, b, activation="gelu")
    (gw,) = torch.autograd.grad(y.sum(), [w], create_graph=False)
    wd = w.detach().double().requires_grad_(True)
    (gwd,) = torch.autograd.grad(linear_ref(x.double(), wd, b.double(), activation="gelu").sum(), [wd])
    assert rel_err(gw, gwd) < 1e-5
    y = linear(x, w, b)
    (g1,) = torch.autograd.grad(y.square().sum(), [w], create_graph=True)
    with pytest.raises(RuntimeError):
        g1.sum().backward()                                     # once_differentiable: says so


def test_tensor_subclass_uses_torch():
    class Sub(torch.Tensor):
        pass
    x, w, b = _inputs((5, 24), 24, 8, seed=6)
    with torch.no_grad():
        assert select_linear_backend(x.as_subclass(Sub), w, b) == "torch"


def test_other_dtypes_use_torch():
    x, w, b = _inputs((5, 24), 24, 8, seed=4)
    with torch.no_grad():
        assert select_linear_backend(x.double(), w.double(), b.double()) == "torch"
        assert select_linear_backend(x.bfloat16(), w.bfloat16(), b.bfloat16()) == "torch"
        y = linear(x.double(), w.double(), b.double(), activation="gelu")
    assert y.dtype == torch.float64


@needs_onednn
def test_nan_inf_rows():
    x, w, b = _inputs((6, 24), 24, 40, seed=5)
    x[1, 3] = float("nan")
    x[4, 0] = float("inf")
    with torch.no_grad():
        y = linear(x, w, b)
        g = linear(x, w, b, activation="gelu")
    ref = linear_ref(x.double(), w.double(), b.double())
    for out in (y, g):
        assert out[1].isnan().all()
        assert not torch.isfinite(out[4]).any()
        keep = [0, 2, 3, 5]
        assert torch.isfinite(out[keep]).all()
    assert torch.equal(y[4].isinf(), ref[4].isinf()) and torch.equal(y[4].sign(), ref[4].sign().float())


def test_env_backends(monkeypatch):
    x, w, b = _inputs((5, 24), 24, 8, seed=6)
    monkeypatch.setenv("FOCALNET_LINEAR_BACKEND", "torch")
    with torch.no_grad():
        assert select_linear_backend(x, w, b) == "torch"
    monkeypatch.setenv("FOCALNET_LINEAR_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FOCALNET_LINEAR_BACKEND"):
        linear(x, w, b)
    monkeypatch.setenv("FOCALNET_LINEAR_BACKEND", "onednn")
    with pytest.raises(RuntimeError, match="fp32 only"):
        linear(x.double(), w.double(), b.double())


@needs_onednn
def test_cpu_autocast_keeps_torch_policy():
    x, w, b = _inputs((5, 24), 24, 8, seed=10)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert select_linear_backend(x, w, b) == "torch"
        y = linear(x, w, b)
    assert y.dtype == torch.bfloat16   # what F.linear gives under CPU autocast


@needs_onednn
def test_mkldnn_disabled_flag():
    x, w, b = _inputs((5, 24), 24, 8, seed=7)
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
        assert select_linear_backend(x, w, b) == "torch"
    with torch.no_grad():
        assert select_linear_backend(x, w, b) == "onednn"


def test_validation():
    x, w, b = _inputs((5, 24), 24, 8, seed=8)
    with pytest.raises(ValueError, match="activation"):
        linear(x, w, b, activation="relu")
    with pytest.raises(ValueError, match="weight must be 2-D"):
        linear(x, w[0], b)
    with pytest.raises(ValueError, match="in_features=24"):
        linear(x[:, :20], w, b)
    with pytest.raises(ValueError, match="bias must have shape"):
        linear(x, w, b[:3])
    with pytest.raises(TypeError):
        linear(x.numpy(), w, b)


def test_compile_fullgraph_no_grad():
    x, w, b = _inputs((2, 7, 24), 24, 40, seed=9)
    f = torch.compile(lambda t: linear(t, w, b, activation="gelu"), fullgraph=True, backend="eager")
    with torch.no_grad():
        got = f(x)
    assert rel_err(got, linear_ref(x.double(), w.double(), b.double(), activation="gelu")) < 1e-5


@needs_onednn
def test_fused_model_runs_onednn_and_matches_eager():
    import focalnet
    torch.manual_seed(0)
    m = focalnet.create_model("focalnet_tiny_srf", embed_dim=32, depths=(1, 1, 1, 1), num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
        m.set_fused(True)
        before = ops.backend_calls["linear:onednn"]
        got = m(x)
    # per block: f, h, proj, fc1 (+GELU), fc2
    assert ops.backend_calls["linear:onednn"] - before == 4 * 5
    assert rel_err(got, ref) < 1e-5
