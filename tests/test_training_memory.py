"""The memory-lean training functions (focalnet_kernels.recompute) and what they save.

mlp_gelu, modulation_tail and focal_modulation recompute the GELU output, the modulator and the
projection's input in the backward: their gradients (gradcheck, fp64) and the fused model's
parameter and input gradients (fp64, against the eager model) must be those of the plain
composition, and a training forward must save exactly the tensors they claim to keep."""
import copy

import pytest
import torch
import torch.nn.functional as F

import focalnet
import focalnet_kernels
from benchmarks.activation_memory import saved_activation_bytes
from focalnet_kernels import focal_modulation, mlp_gelu, modulation_tail
from focalnet_kernels.linear import _ONEDNN_LINEAR
from conftest import kernel_backends, rel_err


def _r(*shape, g, dtype=torch.float64):
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(True)


def _mlp_args(dtype=torch.float64, bias=True, seed=0, lead=(2, 3, 4), C=5, hidden=7, out=6):
    g = torch.Generator().manual_seed(seed)
    return (_r(*lead, C, g=g, dtype=dtype), _r(hidden, C, g=g, dtype=dtype),
            _r(hidden, g=g, dtype=dtype) if bias else None, _r(out, hidden, g=g, dtype=dtype),
            _r(out, g=g, dtype=dtype) if bias else None)


def _mlp_plain(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def _tail_args(dtype=torch.float64, seed=0, C=5, L=2, proj=True, h_bias=True):
    """y (whose first C channels are q: a strided view, as in the model), ctx_all, h, proj."""
    g = torch.Generator().manual_seed(seed)
    y = _r(2, 3, 4, 2 * C + L + 1, g=g, dtype=dtype)
    return (y, _r(2, 3, 4, C, g=g, dtype=dtype), _r(C, C, g=g, dtype=dtype),
            _r(C, g=g, dtype=dtype) if h_bias else None,
            _r(4, C, g=g, dtype=dtype) if proj else None, _r(4, g=g, dtype=dtype) if proj else None)


def _tail_plain(q, ctx_all, hw, hb, pw, pb):
    out = q * F.linear(ctx_all, hw, hb)
    return out if pw is None else F.linear(out, pw, pb)


# ------------------------------------------------------------------------------------------------
# gradients of each function (fp64)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_mlp_gelu_gradcheck(bias):
    args = _mlp_args(bias=bias)
    assert torch.autograd.gradcheck(mlp_gelu, args)
    assert rel_err(mlp_gelu(*args), _mlp_plain(*args)) < 1e-14


@pytest.mark.parametrize("proj", [True, False])
@pytest.mark.parametrize("h_bias", [True, False])
def test_modulation_tail_gradcheck(proj, h_bias):
    y, *rest = _tail_args(proj=proj, h_bias=h_bias)
    C = rest[0].shape[-1]

    def fn(y, ctx_all, hw, hb, pw, pb):
        return modulation_tail(y[..., :C], ctx_all, hw, hb, pw, pb)

    assert torch.autograd.gradcheck(fn, (y, *rest))
    assert rel_err(fn(y, *rest), _tail_plain(y[..., :C], *rest)) < 1e-14


def test_modulation_tail_partial_grads():
    """Only some inputs need a gradient (frozen weights, a detached q): the others stay None."""
    y, ctx_all, hw, hb, pw, pb = _tail_args()
    C = hw.shape[0]
    for t in (hw, hb, pw, pb):
        t.requires_grad_(False)
    q = y.detach()[..., :C]
    modulation_tail(q, ctx_all, hw, hb, pw, pb).sum().backward()
    ref = ctx_all.grad.clone()
    ctx_all.grad = None
    _tail_plain(q, ctx_all, hw, hb, pw, pb).sum().backward()
    assert rel_err(ref, ctx_all.grad) < 1e-14 and hw.grad is None and pw.grad is None


@pytest.mark.parametrize("normalize", [False, True])
def test_focal_modulation_gradcheck(normalize):
    g = torch.Generator().manual_seed(5)
    C, L = 3, 2
    y = _r(1, 5, 4, 2 * C + L + 1, g=g)
    kernels = [_r(C, 1, k, k, g=g) for k in (3, 5)]
    hw, hb, pw, pb = _r(C, C, g=g), _r(C, g=g), _r(2, C, g=g), _r(2, g=g)

    def fn(y, k0, k1, hw, hb, pw, pb):
        return focal_modulation(y, [k0, k1], hw, hb, pw, pb, normalize=normalize)

    assert torch.autograd.gradcheck(fn, (y, *kernels, hw, hb, pw, pb))
    ref = focalnet_kernels.focal_context_ref(y[..., C:2 * C], y[..., 2 * C:], kernels, normalize)
    assert rel_err(fn(y, *kernels, hw, hb, pw, pb), _tail_plain(y[..., :C], ref, hw, hb, pw, pb)) < 1e-13


def test_argument_errors():
    x, w1, b1, w2, b2 = _mlp_args()
    with pytest.raises(ValueError, match="fc2"):
        mlp_gelu(x, w1, b1, w2[:, :3], b2)
    y, ctx_all, hw, hb, pw, pb = _tail_args()
    with pytest.raises(ValueError, match="differ in shape"):
        modulation_tail(y[..., :4], ctx_all, hw, hb)
    with pytest.raises(ValueError, match="proj_bias without"):
        modulation_tail(y[..., :5], ctx_all, hw, hb, None, pb)
    with pytest.raises(ValueError, match=r"2C \+ L \+ 1"):
        focal_modulation(y[..., :-1], [torch.randn(5, 1, 3, 3, dtype=torch.float64)] * 2, hw, hb)


# ------------------------------------------------------------------------------------------------
# the fused model against the eager one: gradients of every parameter and of the input (fp64)
# ------------------------------------------------------------------------------------------------
VARIANTS = [dict(), dict(focal_levels=(2, 2, 2, 2), use_layerscale=True, use_postln=True,
                         normalize_modulator=True, use_postln_in_modulation=True)]


def _pair(dtype=torch.float64, **kw):
    cfg = dict(embed_dim=8, depths=(1, 1, 2, 1), num_classes=7, drop_path_rate=0.0)
    cfg.update(kw)
    torch.manual_seed(0)
    eager = focalnet.create_model("focalnet_tiny_lrf", **cfg).to(dtype)
    fused = copy.deepcopy(eager).set_fused(True)
    return eager, fused


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_model_gradients_equal_eager_fp64(variant):
    eager, fused = _pair(**variant)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 40, 36, generator=g, dtype=torch.float64)
    y = torch.tensor([1, 6])
    grads = {}
    for name, model in (("eager", eager), ("fused", fused)):
        xi = x.clone().requires_grad_(True)
        F.cross_entropy(model(xi), y).backward()
        grads[name] = dict(model.named_parameters()), xi.grad
    (pe, xe), (pf, xf) = grads["eager"], grads["fused"]
    assert rel_err(xf, xe) < 1e-11
    for k, p in pf.items():
        assert p.grad is not None, k
        assert rel_err(p.grad, pe[k].grad) < 1e-11, k


@pytest.mark.skipif(not kernel_backends(), reason="no fused CPU backend here")
def test_fp32_functions_match_plain_composition():
    """fp32 on the CPU: the GEMMs run on oneDNN where `linear` would (counted), within rounding."""
    before = focalnet_kernels.backend_calls["linear:onednn"]
    for fn, plain, args in ((mlp_gelu, _mlp_plain, _mlp_args(torch.float32, lead=(64,), C=32, hidden=128, out=32)),
                            (lambda y, *a: modulation_tail(y[..., :32], *a), lambda y, *a: _tail_plain(y[..., :32], *a),
                             _tail_args(torch.float32, C=32))):
        out = fn(*args)
        gout = torch.randn_like(out)
        got = torch.autograd.grad(out, args, gout)
        ref_out = plain(*args)
        ref = torch.autograd.grad(ref_out, args, gout)
        assert rel_err(out, ref_out) < 1e-5
        for a, b in zip(got, ref):
            assert rel_err(a, b) < 1e-5
    if _ONEDNN_LINEAR is not None and torch.backends.mkldnn.enabled:
        assert focalnet_kernels.backend_calls["linear:onednn"] > before


def test_inference_path_is_the_plain_linear_chain():
    """Without a gradient nothing is saved and no Function runs: the GELU stays fc1's epilogue."""
    x, w1, b1, w2, b2 = (t.detach().float() for t in _mlp_args(lead=(16,), C=8, hidden=32, out=8))
    with torch.no_grad():
        out = mlp_gelu(x, w1, b1, w2, b2)
        ref = focalnet_kernels.linear(focalnet_kernels.linear(x, w1, b1, activation="gelu"), w2, b2)
    assert out.grad_fn is None and torch.equal(out, ref)


def test_inner_dropout_keeps_the_eager_formulation():
    """An Mlp with dropout between GELU and fc2 (training) is not a plain chain: the fused Mlp keeps
    the linear calls, and draws the same dropout masks as the eager one."""
    mlp = focalnet.model.Mlp(8, 32, drop=0.5).train()
    fused = copy.deepcopy(mlp)
    fused.use_fused = True
    x = torch.randn(3, 5, 8)
    torch.manual_seed(3)
    ref = mlp(x)
    torch.manual_seed(3)
    assert rel_err(fused(x), ref) < 1e-6


def test_autocast_bf16_cpu_trains():
    """Under autocast the GEMM operands are cast as autocast casts F.linear's: forward and backward
    run, parameter gradients keep the parameters' dtype and follow the eager model's."""
    eager, fused = _pair(torch.float32)
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([1, 6])
    for model in (eager, fused):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
    ref = dict(eager.named_parameters())
    for k, p in fused.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, k
        assert rel_err(p.grad, ref[k].grad) < 5e-2, k


@pytest.mark.skipif(not kernel_backends(), reason="no fused CPU backend here")
def test_compile_fullgraph_training_of_the_functions():
    """dynamo traces both Functions (forward and backward) without a graph break or a recompile."""
    torch._dynamo.reset()

    def step(x, w1, b1, w2, b2, y, ctx_all, hw, hb, pw, pb):
        return (mlp_gelu(x, w1, b1, w2, b2).square().sum()
                + modulation_tail(y[..., :5], ctx_all, hw, hb, pw, pb).square().sum())

    compiled = torch.compile(step, fullgraph=True)
    for seed in (0, 1, 2):
        args = _mlp_args(torch.float32, seed=seed) + _tail_args(torch.float32, seed=seed)
        with torch._dynamo.config.patch(error_on_recompile=seed > 0):
            got = torch.autograd.grad(compiled(*args), args)
        ref = torch.autograd.grad(step(*args), args)
        for a, b in zip(got, ref):
            assert rel_err(a, b) < 1e-5


# ------------------------------------------------------------------------------------------------
# what a training forward saves
# ------------------------------------------------------------------------------------------------
def _saved(module, x):
    return saved_activation_bytes(module, x)["bytes"]


def test_mlp_saves_its_input_and_the_pre_activation_only():
    mlp = focalnet.model.Mlp(16, 64).train()
    mlp.use_fused = True
    x = torch.randn(2, 5, 5, 16, requires_grad=True)
    assert _saved(mlp, x) == 4 * 50 * (16 + 64)


@pytest.mark.skipif(not kernel_backends(), reason="no fused CPU backend here")
@pytest.mark.parametrize("L", [2, 3])
def test_modulation_saves_input_f_output_and_context_only(L):
    """x (f's input), y = f(x) (q, ctx and the gates are views of it), ctx_all and the pooled global
    context (B x C): modulator, q * modulator and the proj input are recomputed."""
    B, H, W, C = 2, 6, 5, 16
    mod = focalnet.FocalModulation(C, focal_window=3, focal_level=L, use_fused=True).train()
    x = torch.randn(B, H, W, C, requires_grad=True)
    assert _saved(mod, x) == 4 * (B * H * W * (C + (2 * C + L + 1) + C) + B * C)


@pytest.mark.parametrize("name", ["focalnet_tiny_srf", "focalnet_tiny_lrf"])
def test_fused_model_saves_at_most_0_6_of_eager(name):
    torch.manual_seed(0)
    eager = focalnet.create_model(name, embed_dim=32, depths=(1, 1, 2, 1), num_classes=10).train()
    fused = copy.deepcopy(eager).set_fused(True)
    x = torch.randn(2, 3, 64, 64)
    assert _saved(fused, x) <= 0.6 * _saved(eager, x)


# ------------------------------------------------------------------------------------------------
# second order: the backward is differentiable (gradient penalties, gradgradcheck)
# ------------------------------------------------------------------------------------------------
def test_mlp_gelu_gradgradcheck():
    assert torch.autograd.gradgradcheck(mlp_gelu, _mlp_args(lead=(2, 3)))


@pytest.mark.parametrize("proj", [True, False])
def test_modulation_tail_gradgradcheck(proj):
    y, *rest = _tail_args(proj=proj)
    assert torch.autograd.gradgradcheck(lambda y, *a: modulation_tail(y[..., :5], *a), (y, *rest))


def test_gradient_penalty_fp32_matches_plain_composition():
    """create_graph=True in fp32 (the forward on oneDNN where it runs): the second-order gradient of
    a gradient penalty equals the plain composition's."""
    args = _mlp_args(torch.float32, lead=(16,), C=8, hidden=32, out=8)
    res = []
    for fn in (mlp_gelu, _mlp_plain):
        first = torch.autograd.grad(fn(*args).square().sum(), args, create_graph=True)
        res.append(torch.autograd.grad(sum(g.square().sum() for g in first), args))
    for a, b in zip(*res):
        assert rel_err(a, b) < 1e-5
