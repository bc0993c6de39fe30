"""focal_context's argument checks on inputs outside tests/test_hostile.py's grid: tensor layouts other
than strided (sparse, mkldnn), numpy booleans for `normalize`, meta tensors, devices, and kernels
whose strides or dtype differ from ctx (accepted: documented in focal_context's docstring)."""
import pytest
import torch

import focalnet_kernels as fk
from conftest import rel_err

np = pytest.importorskip("numpy")


def _base(seed=0):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(1, 4, 5, 3, generator=g)
    gates = torch.randn(1, 4, 5, 3, generator=g)
    return ctx, gates, [torch.randn(3, 1, 3, 3, generator=g), torch.randn(3, 1, 5, 5, generator=g)]


def _mkldnn(t):
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch built without mkldnn")
    return t.to_mkldnn()


LAYOUTS = {  # name -> (argument, how to make it, layout in the message)
    "ctx sparse_coo": ("ctx", lambda t: t.to_sparse(), "torch.sparse_coo"),
    "ctx sparse_csr": ("ctx", lambda t: t.to_sparse_csr(dense_dim=2), "torch.sparse_csr"),
    "ctx mkldnn": ("ctx", _mkldnn, "torch._mkldnn"),
    "gates sparse_coo": ("gates", lambda t: t.to_sparse(), "torch.sparse_coo"),
    "kernels[1] sparse_coo": ("kernels[1]", lambda t: t.to_sparse(), "torch.sparse_coo"),
    "kernels[0] sparse_csr": ("kernels[0]", lambda t: t.to_sparse_csr(dense_dim=2), "torch.sparse_csr"),
}


@pytest.mark.parametrize("case", sorted(LAYOUTS))
def test_non_strided_layouts_raise_a_named_type_error(case):
    arg, make, layout = LAYOUTS[case]
    ctx, gates, ks = _base()
    if arg == "ctx":
        ctx = make(ctx)
    elif arg == "gates":
        gates = make(gates)
    else:
        i = int(arg[-2])
        ks[i] = make(ks[i])
    with pytest.raises(TypeError) as info:
        fk.focal_context(ctx, gates, ks)
    msg = str(info.value)
    assert f"`{arg}`" in msg and layout in msg and "dense (strided)" in msg, msg


@pytest.mark.parametrize("flag", [True, False])
def test_numpy_bool_normalize_is_accepted(flag):
    ctx, gates, ks = _base()
    want = fk.focal_context(ctx, gates, ks, normalize=flag)
    got = fk.focal_context(ctx, gates, ks, normalize=np.bool_(flag))
    assert torch.equal(got, want)


@pytest.mark.parametrize("value, shown", [
    (np.int64(1), "numpy.int64"), (1, "int"), (None, "NoneType"), ("yes", "str"),
    (torch.tensor(True), "torch.Tensor"),
])
def test_normalize_of_another_type_names_the_qualified_type(value, shown):
    ctx, gates, ks = _base()
    with pytest.raises(TypeError, match="`normalize`") as info:
        fk.focal_context(ctx, gates, ks, normalize=value)
    assert str(info.value).endswith(f"got {shown}"), str(info.value)


def test_numpy_bool_normalize_under_autograd():
    """The flag reaches the op (and its saved backward state) as a Python bool."""
    ctx, gates, ks = _base()
    ctx.requires_grad_(True)
    out = fk.focal_context(ctx, gates, ks, normalize=np.bool_(True))
    (g,) = torch.autograd.grad(out.sum(), ctx)
    ref = ctx.detach().double().requires_grad_(True)
    (want,) = torch.autograd.grad(fk.focal_context_ref(ref, gates.double(), [k.double() for k in ks], True).sum(), ref)
    assert rel_err(g, want) < 1e-5


def test_meta_tensors_give_meta_results_forward_and_backward():
    """All-meta inputs run the op's fake implementation: shapes and dtypes, no data."""
    ctx, gates, ks = _base()
    ctx, gates = ctx.to("meta").requires_grad_(True), gates.to("meta")
    ks = [k.to("meta").requires_grad_(True) for k in ks]
    out = fk.focal_context(ctx, gates, ks)
    assert out.device.type == "meta" and out.shape == ctx.shape and out.dtype == ctx.dtype
    grads = torch.autograd.grad(out.sum(), (ctx, *ks))
    assert [(g.device.type, g.shape) for g in grads] == [("meta", t.shape) for t in (ctx, *ks)]


def test_requires_grad_inputs_on_different_devices_are_named():
    ctx, gates, ks = _base()
    ctx.requires_grad_(True)
    k0 = ks[0].to("meta").requires_grad_(True)
    with pytest.raises(ValueError, match=r"`kernels\[0\]` is on meta but `ctx` is on cpu"):
        fk.focal_context(ctx, gates, [k0, ks[1]])
    with pytest.raises(ValueError, match="`gates` is on meta"):
        fk.focal_context(ctx, gates.to("meta").requires_grad_(True), ks)


def test_non_contiguous_kernels_are_accepted():
    """Kernels may have any strides (a transposed or sliced view of a parameter)."""
    ctx, gates, ks = _base()
    big = torch.randn(3, 1, 6, 6, requires_grad=True)
    views = [big[:, :, ::2, ::2], ks[1].requires_grad_(True).transpose(2, 3)]
    assert not any(v.is_contiguous() for v in views)
    out = fk.focal_context(ctx, gates, views)
    want = fk.focal_context_ref(ctx.double(), gates.double(), [v.detach().double() for v in views])
    assert rel_err(out, want) < 1e-5
    grads = torch.autograd.grad(out.sum(), views)
    assert all(g.shape == v.shape for g, v in zip(grads, views))


@pytest.mark.parametrize("kdtype", [torch.float64, torch.float16, torch.bfloat16])
def test_kernels_of_another_dtype_than_ctx(kdtype):
    """Kernels need not share ctx's dtype: they are used in float32 (float64 with a float64 ctx) and
    their gradients come back in their own dtype."""
    ctx, gates, ks = _base()
    ks = [k.to(kdtype).requires_grad_(True) for k in ks]
    out = fk.focal_context(ctx, gates, ks)
    assert out.dtype == ctx.dtype
    want = fk.focal_context_ref(ctx.double(), gates.double(), [k.detach().double() for k in ks])
    assert rel_err(out, want) < 1e-5
    grads = torch.autograd.grad(out.sum(), ks)
    assert [g.dtype for g in grads] == [kdtype] * len(ks)
