"""A fused model's life beyond one forward: torch.save / torch.load, pickle and copy.deepcopy after
`set_fused(True)` (our model) or `focalnet_kernels.fuse` (a Hugging Face model), fusing twice,
switching `set_fused` in the middle of training, and activation checkpointing through the fused op.

Every test proves the fused kernel ran (focalnet_kernels.backend_calls of a non-reference backend
grows), so none passes on a silent fallback to the eager path."""
import copy
import io
import os
import pickle

import pytest
import torch

import focalnet
import focalnet_kernels as fk
from conftest import kernel_backends, rel_err, run_fresh_python

pytestmark = pytest.mark.usefixtures("one_thread")

BACKEND = kernel_backends()[:1]   # the native CPU kernel where built (else Triton, interpreted)


@pytest.fixture
def fused_backend(backend):
    """Force the first fused backend that runs here; returns a counter of its calls since now."""
    if not BACKEND:
        pytest.skip("no fused backend runs here")
    name = BACKEND[0]
    backend(name)

    class Calls:
        def __init__(self):
            self.start = {d: fk.backend_calls[f"{name}:{d}"] for d in ("fwd", "bwd")}

        def __call__(self, direction):
            """Calls of the fused backend in `direction` ('fwd' or 'bwd') since the last call."""
            now = fk.backend_calls[f"{name}:{direction}"]
            n, self.start[direction] = now - self.start[direction], now
            return n

    return Calls()


def _ours(seed=0, **kw):
    cfg = dict(num_classes=5, embed_dim=8, depths=(1, 2), focal_levels=(2, 3), drop_path_rate=0.0)
    cfg.update(kw)
    torch.manual_seed(seed)
    model = focalnet.FocalNet(**cfg)
    with torch.no_grad():  # away from the structured init
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _hf(seed=0):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.FocalNetConfig(embed_dim=8, depths=[1, 2], hidden_sizes=[8, 16], focal_levels=[2, 3],
                                      focal_windows=[3, 3], num_labels=5, image_size=32)
    torch.manual_seed(seed)
    return transformers.FocalNetForImageClassification(cfg)


def _logits(model, x):
    out = model(x)
    return getattr(out, "logits", out)


def _modulations(model):
    return [m for m in model.modules() if hasattr(m, "focal_layers")]


def _torch_save_load(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


COPIERS = {"deepcopy": copy.deepcopy, "pickle": lambda m: pickle.loads(pickle.dumps(m)),
           "torch.save": _torch_save_load}

# fuse() swaps a third-party modulation's class for a subclass made at run time
# (focalnet_kernels.fuse.Fused<Name>), which pickle cannot find by name: its instances pickle as
# (original class, kind) and the subclass is made again on load, also in a fresh process.

# ---------------------------------------------------------------------------------------------
# save / load, pickle, deepcopy
# ---------------------------------------------------------------------------------------------
def _check_copy(model, copied, x, calls, blocks):
    """copied is a fused, independent model computing what model computes, on the fused kernel,
    forward and backward."""
    assert fk.is_fused(copied)
    with torch.no_grad():
        want = _logits(model, x)
    calls("fwd")
    got = _logits(copied, x)
    assert calls("fwd") == blocks
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got.square().sum().backward()
    assert calls("bwd") == blocks
    assert all(p.grad is None for p in model.parameters())   # no parameter is shared
    with torch.no_grad():
        next(copied.parameters()).add_(1.0)
    assert not torch.equal(next(copied.parameters()), next(model.parameters()))


@pytest.mark.parametrize("how", list(COPIERS))
def test_copy_of_our_fused_model(how, fused_backend):
    model = _ours().set_fused(True).eval()
    _check_copy(model, COPIERS[how](model), torch.randn(2, 3, 20, 27), fused_backend, blocks=3)


@pytest.mark.parametrize("how", list(COPIERS))
def test_copy_of_a_fused_transformers_model(how, fused_backend):
    model = fk.fuse(_hf()).eval()
    _check_copy(model, COPIERS[how](model), torch.randn(2, 3, 20, 27), fused_backend, blocks=3)


LOAD_IN_A_FRESH_PROCESS = """
import sys, torch
import focalnet_kernels as fk
model, x, want = torch.load(sys.argv[1], weights_only=False)   # fuse() never ran in this process
n = fk.backend_calls["cpu:fwd"]
with torch.no_grad():
    out = model(x)
got = getattr(out, "logits", out)
assert fk.is_fused(model) and fk.backend_calls["cpu:fwd"] - n == 3, fk.backend_calls
torch.testing.assert_close(got, want, rtol=0, atol=0)
fk.unfuse(model)
assert not fk.is_fused(model)
print("ok")
"""


@pytest.mark.skipif("cpu" not in BACKEND, reason="the fresh process runs the native CPU kernel")
@pytest.mark.parametrize("which", ["ours", "transformers"])
def test_torch_load_in_a_fresh_process(which, tmp_path):
    model = (_ours().set_fused(True) if which == "ours" else fk.fuse(_hf())).eval()
    x = torch.randn(1, 3, 24, 24)
    with torch.no_grad():
        want = _logits(model, x)
    torch.save((model, x, want), tmp_path / "model.pt")
    env = {**os.environ, "FOCALNET_KERNELS_BACKEND": "cpu", "OMP_NUM_THREADS": "1"}
    out = run_fresh_python(LOAD_IN_A_FRESH_PROCESS, tmp_path / "model.pt", env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# fusing twice
# ---------------------------------------------------------------------------------------------
def test_fuse_twice_is_idempotent_on_a_transformers_model(fused_backend):
    model = _hf().eval()
    original = type(_modulations(model)[0])
    x = torch.randn(2, 3, 21, 30)
    fk.fuse(model)
    fused_class = type(_modulations(model)[0])
    with torch.no_grad():
        once = _logits(model, x)
        assert fused_backend("fwd") == 3
        assert fk.fuse(model) is model
        twice = _logits(model, x)
    assert fused_backend("fwd") == 3   # one fused call per modulation: nothing wraps twice
    torch.testing.assert_close(twice, once, rtol=0, atol=0)
    for m in _modulations(model):
        assert type(m) is fused_class and fused_class.__bases__ == (original,)
    fk.unfuse(model)   # one unfuse undoes it all
    assert not fk.is_fused(model) and all(type(m) is original for m in _modulations(model))
    fk.fuse(model)
    assert all(type(m) is fused_class for m in _modulations(model))   # the cached class again


def test_fuse_twice_is_idempotent_on_our_model(fused_backend):
    model = _ours().eval()
    x = torch.randn(2, 3, 21, 30)
    with torch.no_grad():
        once = fk.fuse(model)(x)
        assert fused_backend("fwd") == 3
        twice = fk.fuse(fk.fuse(model))(x)
    assert fused_backend("fwd") == 3
    assert model.use_fused and all(type(m) is focalnet.FocalModulation for m in model.modulations())
    torch.testing.assert_close(twice, once, rtol=0, atol=0)
    fk.unfuse(model)
    assert not model.use_fused


# ---------------------------------------------------------------------------------------------
# switching in the middle of training
# ---------------------------------------------------------------------------------------------
def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_grads_close(got, want, tol):
    assert got.keys() == want.keys()
    for n in want:
        assert rel_err(got[n], want[n]) < tol, (n, rel_err(got[n], want[n]))


def test_set_fused_toggled_during_training(fused_backend):
    """Steps fused, eager, fused, fused on one model; every step's gradients equal those of an
    all-eager twin (same data, same SGD with momentum), and only the fused steps run the kernel."""
    toggled, twin = _ours().train(), _ours().train()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (toggled, twin)]
    g = torch.Generator().manual_seed(1)
    for step, fused in enumerate([True, False, True, True]):
        x, y = torch.randn(2, 3, 24, 28, generator=g), torch.randint(0, 5, (2,), generator=g)
        grads = []
        for model, opt in zip((toggled.set_fused(fused), twin), opts):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            grads.append(_grads(model))
            opt.step()
            if model is toggled:  # (a backward may recompute the fused forward: at least one call per block)
                fwd, bwd = fused_backend("fwd"), fused_backend("bwd")
                if fused:
                    assert fwd >= 3 and bwd == 3, (step, fwd, bwd)
                else:
                    assert fwd == bwd == 0, (step, fwd, bwd)
        _assert_grads_close(*grads, tol=1e-4)
    for (n, p), q in zip(toggled.named_parameters(), twin.parameters()):
        assert rel_err(p, q) < 1e-5, n


# ---------------------------------------------------------------------------------------------
# activation checkpointing through the fused op
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["set_grad_checkpointing", "use_checkpoint"])
def test_checkpointing_with_the_fused_op(how, fused_backend):
    """Stochastic depth and dropout on: the checkpointed fused model gives the same loss and
    gradients as without checkpointing, and its backward recomputes the fused forward."""
    kw = dict(drop_path_rate=0.3, drop_rate=0.1, use_fused=True)
    plain = _ours(**kw).train()
    ckpt = _ours(**kw, use_checkpoint=how == "use_checkpoint").train()
    if how == "set_grad_checkpointing":
        assert ckpt.set_grad_checkpointing(True) is ckpt
    assert all(layer.use_checkpoint for layer in ckpt.layers)
    x = torch.randn(3, 3, 24, 20)
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(7)   # same dropout and stochastic-depth draws
        loss = model(x).square().sum()
        loss.backward()
        results.append((loss.detach(), _grads(model), fused_backend("fwd"), fused_backend("bwd")))
    (loss0, grads0, fwd0, bwd0), (loss1, grads1, fwd1, bwd1) = results
    assert fwd0 >= 3 and bwd0 == bwd1 == 3
    assert fwd1 == fwd0 + 3   # the backward ran each checkpointed block's fused forward again
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    _assert_grads_close(grads1, grads0, tol=1e-6)


def test_checkpointed_fused_gradients_equal_eager(fused_backend):
    eager = _ours().train()
    fused = _ours(use_fused=True).set_grad_checkpointing(True).train()
    x, y = torch.randn(2, 3, 19, 26), torch.tensor([0, 3])
    for model in (eager, fused):
        torch.nn.functional.cross_entropy(model(x), y).backward()
    assert fused_backend("fwd") >= 6 and fused_backend("bwd") == 3   # forward, and again in the backward
    _assert_grads_close(_grads(fused), _grads(eager), tol=1e-4)
