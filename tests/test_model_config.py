"""FocalNet's constructor space, as properties.

Valid space: tiny configurations drawn over every constructor argument build, run, and the fused
model (use_fused=True, same weights) gives the eager model's output and parameter gradients.
Invalid space: one argument at a time replaced by a bad value raises TypeError (wrong type) or
ValueError (wrong value) whose message names the argument - never another exception, never later.
"""
import math
import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import focalnet
from focalnet import FocalModulation, FocalNet, FocalNetBlock
from focalnet.model import FocalNetStage, PatchEmbed
from focalnet_kernels import ops
from conftest import run_fresh_python

pytestmark = pytest.mark.usefixtures("one_thread")

FLAGS = ("use_conv_embed", "use_layerscale", "use_postln", "use_postln_in_modulation", "normalize_modulator",
         "use_checkpoint", "features_only")


# ---------------------------------------------------------------------------------------------
# the valid space
# ---------------------------------------------------------------------------------------------
def _per_stage(draw, n, elements):
    """An int for every stage, or one value per stage."""
    return draw(st.one_of(elements, st.lists(elements, min_size=n, max_size=n).map(tuple)))


@st.composite
def valid_config(draw):
    n = draw(st.integers(1, 4))
    cfg = dict(
        in_chans=draw(st.integers(1, 3)), num_classes=draw(st.integers(0, 5)), embed_dim=draw(st.integers(4, 16)),
        depths=tuple(draw(st.lists(st.integers(1, 2), min_size=n, max_size=n))),
        mlp_ratio=draw(st.sampled_from([0.25, 1, 1.5, 4.0])),
        drop_rate=draw(st.sampled_from([0.0, 0.1])), drop_path_rate=draw(st.sampled_from([0.0, 0.2])),
        focal_levels=_per_stage(draw, n, st.integers(1, 3)),
        focal_windows=_per_stage(draw, n, st.sampled_from([1, 3, 5])),
        focal_factor=draw(st.sampled_from([0, 2])), layerscale_value=draw(st.sampled_from([1e-4, 0.5, 1])))
    cfg.update({flag: draw(st.booleans()) for flag in FLAGS})
    # the conv stem is the official 7x7 stride-4 one: patch size 4 only
    cfg["patch_size"] = 4 if cfg["use_conv_embed"] else draw(st.integers(1, 4))
    if cfg["features_only"]:
        cfg["out_indices"] = tuple(draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True)))
    hw = (draw(st.integers(1, 13)), draw(st.integers(1, 13)))
    return cfg, hw, draw(st.integers(0, 2 ** 31 - 1))


def _kernel_sizes(cfg, n):
    levels, windows = cfg["focal_levels"], cfg["focal_windows"]
    levels = [levels] * n if isinstance(levels, int) else levels
    windows = [windows] * n if isinstance(windows, int) else windows
    return [[cfg["focal_factor"] * l + w for l in range(L)] for L, w in zip(levels, windows)]


def _fused_blocks(cfg):
    """How many of the blocks that run the native/Triton kernels take (the others fall back to the
    reference); a features_only model stops after its last output stage."""
    n = len(cfg["depths"])
    run = max(cfg["out_indices"]) + 1 if cfg["features_only"] else n
    ks = _kernel_sizes(cfg, n)
    return sum(d for d, k in zip(cfg["depths"][:run], ks) if ops._supported_by_kernels(torch.empty(0), k) is None)


def _flat(out):
    return torch.cat([o.flatten() for o in out]) if isinstance(out, list) else out.flatten()


def _run(model, x, seed):
    """Output (flattened) and parameter gradients of a random linear function of it."""
    model.zero_grad()
    out = _flat(model(x))
    (out * torch.randn(out.numel(), generator=torch.Generator().manual_seed(seed))).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _close(a, b, what):
    err = (a.double() - b.double()).norm().item()
    assert err <= 1e-4 * b.double().norm().item() + 1e-6, (what, err, b.norm().item())


@pytest.fixture
def fast_auto(monkeypatch):
    """auto dispatch where it picks the native CPU kernel; else the reference (the Triton
    interpreter is too slow for whole models, and a forced backend refuses kernel size 1)."""
    monkeypatch.setenv("FOCALNET_KERNELS_BACKEND", "auto" if ops._native_available("cpu") else "reference")


# the largest output drawn: every stage a feature map, patch 1, 13x13
LARGEST = (dict(in_chans=3, num_classes=0, embed_dim=16, depths=(2, 2, 2, 2), mlp_ratio=4.0, drop_rate=0.1,
                drop_path_rate=0.2, focal_levels=3, focal_windows=5, focal_factor=2, layerscale_value=0.5,
                use_conv_embed=False, use_layerscale=True, use_postln=True, use_postln_in_modulation=True,
                normalize_modulator=True, use_checkpoint=True, features_only=True, patch_size=1,
                out_indices=(0, 1, 2, 3)), (13, 13), 5)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=valid_config())
@example(case=LARGEST)
def test_valid_configs_build_and_fused_equals_eager(fast_auto, case):
    cfg, hw, seed = case
    torch.manual_seed(seed % 1000)
    model = FocalNet(**cfg).eval()  # eval: dropout and stochastic depth off, deterministic
    with torch.no_grad():
        for p in model.parameters():  # away from the structured init (layerscale 1e-4 hides a branch)
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg["in_chans"], *hw, generator=g)
    eager = _run(model, x, seed)

    calls = ops.backend_calls.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # kernel size 1: the reference, with a warning
        fused = _run(model.set_fused(True), x, seed)
    assert model.use_fused
    if ops.select_backend(x, [3]) != "reference":  # the fast backend ran for every block it supports
        name = ops.select_backend(x, [3])
        assert ops.backend_calls[f"{name}:fwd"] - calls[f"{name}:fwd"] >= _fused_blocks(cfg)
        assert ops.backend_calls[f"{name}:bwd"] - calls[f"{name}:bwd"] >= _fused_blocks(cfg)

    _close(fused[0], eager[0], "output")
    assert fused[1].keys() == eager[1].keys()
    for n in eager[1]:
        _close(fused[1][n], eager[1][n], n)


LARGE_KERNELS = """
import warnings, torch
from focalnet import FocalNet
torch.manual_seed(0)
model = FocalNet(num_classes=3, embed_dim=4, depths=(1,), focal_levels=3, focal_windows=13, drop_path_rate=0.0).eval()
assert model.modulations()[0].kernel_sizes == [13, 15, 17]
x = torch.randn(1, 3, 20, 24)
with torch.no_grad():
    want = model(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [model.set_fused(True)(x) for _ in range(3)]
for g in got:
    torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-6)
print([str(w.message) for w in caught if "fused kernel" in str(w.message)])
"""


def test_large_kernels_are_valid_and_fall_back_with_one_warning():
    """Kernel sizes above the fused kernels' 15 are valid (eager runs them); the fused path runs
    them on the reference and warns once (a fresh interpreter: the warning is once per process)."""
    env = {**os.environ, "FOCALNET_KERNELS_BACKEND": "auto", "OMP_NUM_THREADS": "1"}
    out = run_fresh_python(LARGE_KERNELS, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == str(
        ["focal_context: no fused kernel for kernel sizes [17] (kernels take 3..15); using the eager reference"])


def test_numpy_scalars_are_accepted_and_stored_as_python_values():
    model = FocalNet(in_chans=np.int64(2), num_classes=np.int32(3), embed_dim=np.int64(4), depths=np.array([1, 1]).tolist(),
                     focal_levels=(np.int64(1), 2), focal_windows=np.int16(3), mlp_ratio=np.float32(2.0),
                     drop_path_rate=np.float64(0.1), use_fused=np.bool_(True), use_layerscale=np.bool_(False),
                     patch_size=np.int64(2))
    assert model.use_fused is True and type(model.modulations()[0].use_fused) is bool
    assert model.layers[0].blocks[0].mlp.fc1.out_features == 8
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 2, 9, 9)).shape == (1, 3)


def test_out_indices_are_kept_in_stage_order():
    """Any number of stages with the default focal_levels / focal_windows / out_indices (every stage)."""
    assert FocalNet(embed_dim=4, depths=(1, 1, 1), features_only=True).out_indices == (0, 1, 2)
    model = FocalNet(num_classes=0, embed_dim=4, depths=(1, 1, 1), features_only=True, out_indices=[2, 0])
    assert model.out_indices == (0, 2)
    assert [f["module"] for f in model.feature_info] == ["layers.0", "layers.2"]
    with torch.no_grad():
        assert [f.shape[1] for f in model.eval()(torch.randn(1, 3, 16, 16))] == [4, 16]


# ---------------------------------------------------------------------------------------------
# the invalid space
# ---------------------------------------------------------------------------------------------
T, V = TypeError, ValueError
NOT_A_BOOL = [("no", T), ("yes", T), (1, T), (0, T), (1.0, T), (None, T), (np.int64(1), T), (torch.tensor(True), T)]
NOT_A_PROB = [(-0.1, V), (1.0, V), (1.5, V), (math.nan, V), (math.inf, V), ("0.1", T), (True, T), (None, T),
              (torch.tensor(0.1), T)]
#: argument -> [(bad value, expected exception)], against a valid 2-stage configuration
BAD = {
    "in_chans": [(0, V), (-1, V), (3.0, T), ("3", T), (True, T), (None, T)],
    "num_classes": [(-1, V), (2.5, T), ("7", T), (False, T), (None, T)],
    "embed_dim": [(0, V), (-8, V), (8.0, T), ("8", T), (True, T), (None, T)],
    "depths": [((), V), ([], V), ((1, 0), V), ((1, -1), V), (2, T), ("22", T), ((1, 1.0), T), ((True, 1), T),
               (None, T), ({1: 1, 2: 1}, T)],
    "mlp_ratio": [(0, V), (-1.0, V), (0.01, V), (math.nan, V), (math.inf, V), ("4", T), (True, T), (None, T)],
    "drop_rate": NOT_A_PROB,
    "drop_path_rate": NOT_A_PROB,
    "focal_levels": [(0, V), (-1, V), ((2, 0), V), ((2,), V), ((2, 2, 2), V), ((), V), (2.0, T), ((2, 2.5), T),
                     ("2", T), (True, T), (None, T), ((2, None), T)],
    "focal_windows": [(0, V), (4, V), (-3, V), ((3, 4), V), ((3,), V), ((3, 0), V), (3.0, T), ("3", T),
                      (True, T), ((3, "3"), T), (None, T)],
    "focal_factor": [(-2, V), (1, V), (3, V), (2.0, T), ("2", T), (True, T), (None, T)],
    "layerscale_value": [(math.nan, V), (math.inf, V), (-math.inf, V), ("1e-4", T), (True, T), (None, T)],
    "patch_size": [(0, V), (-4, V), (4.0, T), ("4", T), ((4, 4), T), (True, T), (None, T)],
    "out_indices": [(0, T), ("0", T), ((0.0,), T), ((0, None), T), ({0, 1}, T)],
    **{flag: NOT_A_BOOL for flag in FLAGS + ("use_fused",)},
}
#: bad values that need another argument set to be wrong (the others are wrong in any configuration)
BAD_WITH = [
    ("out_indices", (4,), V, dict(features_only=True)),   # at most 4 stages are drawn
    ("out_indices", (-1,), V, dict(features_only=True)),
    ("out_indices", (), V, dict(features_only=True)),
    ("out_indices", (0, 0), V, dict(features_only=True)),
    ("patch_size", 2, V, dict(use_conv_embed=True)),   # the conv stem is 7x7 stride 4
    ("mlp_ratio", 0.2, V, dict(embed_dim=4)),            # hidden width int(4 * 0.2) = 0
]
CASES = [(arg, value, exc, {}) for arg, bad in BAD.items() for value, exc in bad] + BAD_WITH
BASE = dict(num_classes=3, embed_dim=8, depths=(1, 1), focal_levels=2, focal_windows=3, drop_path_rate=0.0)


def _expect_refusal(build, arg, exc):
    """build() must raise exactly `exc` (TypeError or ValueError), naming `arg`."""
    with pytest.raises((TypeError, ValueError)) as info:
        build()
    assert info.type is exc, (arg, info.type, str(info.value))
    assert arg in str(info.value), (arg, str(info.value))


@pytest.mark.parametrize("arg,value,exc,extra", CASES, ids=[f"{c[0]}={c[1]!r}" for c in CASES])
def test_every_bad_argument_is_refused_up_front(arg, value, exc, extra):
    with torch.device("meta"):  # a value the constructor misses still builds fast (and the test fails)
        _expect_refusal(lambda: FocalNet(**{**BASE, **extra, arg: value}), arg, exc)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(valid_config(), st.sampled_from(CASES))
def test_bad_argument_in_any_valid_config_is_refused(case, bad):
    cfg, _, _ = case
    arg, value, exc, extra = bad
    if isinstance(value, tuple) and arg in ("focal_levels", "focal_windows"):
        # per-stage values are written for 2 stages, as BASE has: the other per-stage argument, which the
        # drawn config may give per stage for its own stage count, becomes one value for all stages
        other = "focal_windows" if arg == "focal_levels" else "focal_levels"
        ov = cfg[other]
        extra = {"depths": (1, 2), other: ov[0] if isinstance(ov, (tuple, list)) else ov}
    with torch.device("meta"):
        _expect_refusal(lambda: FocalNet(**{**cfg, **extra, arg: value}), arg, exc)


@pytest.mark.parametrize("arg,value,exc", [("use_fused", "no", T), ("embed_dim", 0, V), ("focal_windows", 4, V),
                                           ("focal_factor", -2, V), ("depths", (), V), ("patch_size", 0, V)])
def test_create_model_overrides_are_validated(arg, value, exc):
    with torch.device("meta"):
        _expect_refusal(lambda: focalnet.create_model("focalnet_tiny_srf", **{arg: value}), arg, exc)


# the parts of the model are public too: each validates its own arguments
PARTS = [
    (lambda v: FocalModulation(8, focal_window=v, focal_level=2), "focal_window", [(4, V), (0, V), (3.0, T)]),
    (lambda v: FocalModulation(8, focal_window=3, focal_level=v), "focal_level", [(0, V), (2.0, T)]),
    (lambda v: FocalModulation(8, 3, 2, focal_factor=v), "focal_factor", [(1, V), (-2, V), ("2", T)]),
    (lambda v: FocalModulation(v, 3, 2), "dim", [(0, V), (8.0, T)]),
    (lambda v: FocalModulation(8, 3, 2, use_fused=v), "use_fused", [("no", T), (1, T)]),
    (lambda v: FocalModulation(8, 3, 2, proj_drop=v), "proj_drop", [(1.0, V), ("0", T)]),
    (lambda v: FocalNetBlock(8, mlp_ratio=v), "mlp_ratio", [(0, V), (0.1, V), ("4", T)]),
    (lambda v: FocalNetBlock(8, drop_path=v), "drop_path", [(-0.5, V), (None, T)]),
    (lambda v: FocalNetBlock(8, use_postln=v), "use_postln", [("no", T)]),
    (lambda v: FocalNetBlock(8, use_layerscale=True, layerscale_value=v), "layerscale_value", [(math.nan, V)]),
    (lambda v: PatchEmbed(v, 3, 8), "patch_size", [(0, V), (2.5, T)]),
    (lambda v: PatchEmbed(4, v, 8), "in_chans", [(0, V)]),
    (lambda v: PatchEmbed(4, 3, v), "embed_dim", [(0, V)]),
    (lambda v: FocalNetStage(8, None, v, drop_path=[0.0]), "depth", [(0, V), (1.0, T)]),
    (lambda v: FocalNetStage(8, None, 2, drop_path=v), "drop_path", [([0.0], V), (0.0, T)]),
]
PART_CASES = [(build, arg, value, exc) for build, arg, bad in PARTS for value, exc in bad]


@pytest.mark.parametrize("build,arg,value,exc", PART_CASES, ids=[f"{c[1]}={c[2]!r}" for c in PART_CASES])
def test_model_parts_validate_their_arguments(build, arg, value, exc):
    with torch.device("meta"):
        _expect_refusal(lambda: build(value), arg, exc)


@pytest.mark.parametrize("method,value", [("set_fused", "no"), ("set_fused", 1), ("set_fused", None),
                                          ("set_grad_checkpointing", "yes"), ("set_grad_checkpointing", 0)])
def test_switches_take_bools_only(method, value):
    with torch.device("meta"):
        model = FocalNet(**BASE)
    arg = {"set_fused": "flag", "set_grad_checkpointing": "enable"}[method]
    _expect_refusal(lambda: getattr(model, method)(value), arg, TypeError)
    assert not model.use_fused and not model.layers[0].use_checkpoint
    getattr(model, method)(np.bool_(True))
    assert (model.use_fused if method == "set_fused" else model.layers[0].use_checkpoint) is True
