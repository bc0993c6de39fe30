"""FocalNet model: registry, parameter counts, shapes, gradients, fused switch, dropout semantics."""
import math

import pytest
import torch
import torch.nn as nn

import focalnet
import focalnet_kernels
from focalnet import FocalModulation, FocalNet, create_model, list_models
from focalnet.model import drop_path



pytestmark = pytest.mark.usefixtures("one_thread")

ALL_NAMES = ["focalnet_tiny_srf", "focalnet_tiny_lrf", "focalnet_small_srf", "focalnet_small_lrf",
             "focalnet_base_srf", "focalnet_base_lrf", "focalnet_large_fl3", "focalnet_large_fl4",
             "focalnet_xlarge_fl3", "focalnet_xlarge_fl4", "focalnet_huge_fl3", "focalnet_huge_fl4"]

# paper Table 1 (ImageNet-1K), millions of parameters
PAPER_PARAMS = {"focalnet_tiny_srf": 28.4, "focalnet_tiny_lrf": 28.6, "focalnet_small_srf": 49.9,
                "focalnet_small_lrf": 50.3, "focalnet_base_srf": 88.1, "focalnet_base_lrf": 88.7}


def small(**kw):
    """A tiny FocalNet that runs in milliseconds; every option can be overridden."""
    cfg = dict(num_classes=7, embed_dim=16, depths=(1, 1, 2, 1), focal_levels=(2, 3, 2, 3),
               focal_windows=(3, 3, 3, 3), drop_path_rate=0.0)
    cfg.update(kw)
    return FocalNet(**cfg)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _fast_backend():
    """The native CPU kernel when built, else the library's eager reference: the Triton interpreter
    (the default CPU dispatch under tests/conftest.py) is too slow for whole-model runs. Kernel
    correctness per backend is tested by the kernel tests; here the model's use of the op is."""
    from focalnet_kernels import ops
    return "cpu" if ops._native_available("cpu") else "reference"


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------
def test_list_models_has_every_variant():
    assert sorted(list_models()) == sorted(ALL_NAMES)


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_param_counts_match_paper(name):
    with torch.device("meta"):
        model = create_model(name)
    assert abs(n_params(model) / 1e6 - PAPER_PARAMS[name]) <= 0.1 + 1e-9, n_params(model)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_variant_builds_on_meta(name):
    with torch.device("meta"):
        model = create_model(name)
    cfg = focalnet.model_config(name)
    mods = model.modulations()
    assert len(mods) == sum(cfg["depths"])
    assert all(m.focal_level == cfg["focal_levels"][0] for m in mods)
    assert model.head.out_features == 1000
    big = name.split("_")[1] in ("large", "xlarge", "huge")
    assert model.patch_embed.proj.kernel_size == ((7, 7) if big else (4, 4))
    assert isinstance(model.layers[0].blocks[0].gamma_1, nn.Parameter) == big
    assert model.layers[0].blocks[0].use_postln == big
    assert hasattr(mods[0], "ln") == name.startswith("focalnet_huge")
    assert mods[0].normalize_modulator == (name == "focalnet_large_fl4")
    if name.endswith("fl3") and not name.startswith("focalnet_huge"):
        assert mods[0].kernel_sizes == [5, 7, 9]


def test_unknown_name_lists_close_names():
    with pytest.raises(ValueError, match="focalnet_tiny_srf"):
        create_model("focalnet_tiny_srff")


def test_overrides(monkeypatch):
    monkeypatch.setenv("FOCALNET_KERNELS_BACKEND", _fast_backend())
    with torch.device("meta"):
        m = create_model("focalnet_tiny_srf", focal_levels=3, num_classes=0)
    assert isinstance(m.head, nn.Identity)
    assert all(mod.kernel_sizes == [3, 5, 7] for mod in m.modulations())
    m = create_model("focalnet_tiny_lrf", embed_dim=8, depths=(1, 1, 1, 1), num_classes=0, use_fused=True).eval()
    assert m.use_fused
    with torch.no_grad():
        assert m(torch.randn(2, 3, 32, 32)).shape == (2, 64)


# ---------------------------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------------------------
def _expected_hw(h, w):
    out = []
    h, w = math.ceil(h / 4), math.ceil(w / 4)
    for _ in range(4):
        out.append((h, w))
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return out


@pytest.mark.parametrize("conv_embed", [False, True])
@pytest.mark.parametrize("hw", [(33, 47), (1, 1), (64, 96)])
def test_any_input_size(conv_embed, hw):
    torch.manual_seed(0)
    m = small(use_conv_embed=conv_embed).eval()
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        y = m(x)
        stages = m.forward_stages(x)
    assert y.shape == (1, 7) and torch.isfinite(y).all()
    assert [tuple(s.shape[1:3]) for s in stages] == _expected_hw(*hw)


def test_features_only_shapes_and_norms():
    torch.manual_seed(0)
    m = small(features_only=True).eval()
    assert not hasattr(m, "head") and not hasattr(m, "norm")
    assert [n for n, _ in m.named_children() if n.startswith("norm")] == ["norm0", "norm1", "norm2", "norm3"]
    x = torch.randn(2, 3, 33, 47)
    with torch.no_grad():
        feats = m(x)
        raw = m.forward_stages(x)
    for i, (f, (h, w)) in enumerate(zip(feats, _expected_hw(33, 47))):
        assert f.shape == (2, 16 * 2 ** i, h, w) and f.is_contiguous()
        ref = getattr(m, f"norm{i}")(raw[i]).permute(0, 3, 1, 2)
        torch.testing.assert_close(f, ref, rtol=0, atol=0)
    assert [fi["reduction"] for fi in m.feature_info] == [4, 8, 16, 32]

    m2 = small(features_only=True, out_indices=(1, 3)).eval()
    with torch.no_grad():
        feats = m2(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(1, 32, 8, 8), (1, 128, 2, 2)]
    with pytest.raises(ValueError):
        small(features_only=True, out_indices=(4,))


# ---------------------------------------------------------------------------------------------
# gradients, fused switch
# ---------------------------------------------------------------------------------------------
FULL = dict(use_layerscale=True, use_postln=True, use_postln_in_modulation=True, normalize_modulator=True,
            use_conv_embed=True)


@pytest.mark.parametrize("kw", [{}, FULL], ids=["plain", "all-options"])
def test_gradients_reach_every_parameter(kw):
    torch.manual_seed(0)
    m = small(**kw).train()
    m(torch.randn(2, 3, 32, 40)).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_set_fused_toggles_every_modulation():
    m = small()
    mods = [mod for mod in m.modules() if isinstance(mod, FocalModulation)]
    assert len(mods) == 5 and not m.use_fused
    assert m.set_fused(True) is m
    assert m.use_fused and all(mod.use_fused for mod in mods)
    m.set_fused(False)
    assert not m.use_fused and not any(mod.use_fused for mod in mods)
    assert small(use_fused=True).use_fused


@pytest.mark.parametrize("kw", [{}, FULL], ids=["plain", "all-options"])
def test_fused_matches_eager(kw, monkeypatch):
    monkeypatch.setenv("FOCALNET_KERNELS_BACKEND", _fast_backend())
    torch.manual_seed(0)
    m = small(**kw).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))  # layerscale 1e-4 would hide the branch otherwise
    x = torch.randn(2, 3, 40, 56)

    calls = []
    real = focalnet_kernels.focal_context

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(focalnet_kernels.recompute, "focal_context", spy)  # focal_modulation calls it
    with torch.no_grad():
        eager = m(x)
        assert not calls
        fused = m.set_fused(True)(x)
    assert len(calls) == 5
    assert rel(fused, eager) < 1e-5

    # gradients of the fused path agree with eager autograd
    grads = {}
    for flag in (False, True):
        m.set_fused(flag).zero_grad()
        m(x).square().sum().backward()
        grads[flag] = {n: p.grad.clone() for n, p in m.named_parameters()}
    for n in grads[False]:
        assert rel(grads[True][n], grads[False][n]) < 1e-4, n


def test_fused_passes_channels_last_view(monkeypatch):
    """The fused path hands the slice view of f's output to the kernel, without a copy.
    (Runs on the default dispatch, whatever backend that picks, on a tiny input.)"""
    seen = {}
    real = focalnet_kernels.focal_context

    def spy(ctx, gates, kernels, *, normalize=False):
        seen.update(ctx=ctx, gates=gates, kernels=kernels, normalize=normalize)
        return real(ctx, gates, kernels, normalize=normalize)

    monkeypatch.setattr(focalnet_kernels.recompute, "focal_context", spy)  # focal_modulation calls it
    m = small(normalize_modulator=True, use_fused=True).eval()
    with torch.no_grad():
        m(torch.randn(1, 3, 16, 16))
    C = 128  # last call: stage 3
    assert seen["ctx"].shape == (1, 1, 1, C) and seen["gates"].shape == (1, 1, 1, 4)
    assert seen["ctx"].stride()[-1] == 1 and seen["ctx"].stride()[-2] == 2 * C + 4
    assert [tuple(k.shape) for k in seen["kernels"]] == [(C, 1, 3, 3), (C, 1, 5, 5), (C, 1, 7, 7)]
    assert seen["normalize"] is True


# ---------------------------------------------------------------------------------------------
# train / eval semantics
# ---------------------------------------------------------------------------------------------
def test_drop_path_is_per_sample():
    torch.manual_seed(0)
    x = torch.randn(64, 3, 4, 5) + 3
    y = drop_path(x, 0.5, training=True)
    kept = [bool((y[i] != 0).all()) for i in range(64)]
    for i in range(64):
        if kept[i]:
            torch.testing.assert_close(y[i], x[i] / 0.5)
        else:
            assert (y[i] == 0).all()
    assert 10 < sum(kept) < 54
    assert drop_path(x, 0.5, training=False) is x


def test_train_mode_stochastic_eval_deterministic():
    torch.manual_seed(0)
    m = small(drop_path_rate=0.5, drop_rate=0.1)
    x = torch.randn(4, 3, 32, 32)
    m.train()
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(2)
    b = m(x)
    torch.manual_seed(1)
    a2 = m(x)
    assert not torch.equal(a, b)
    assert torch.equal(a, a2)  # same seed, same masks
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(x), m(x))
    # stochastic depth rule: linear from 0 to drop_path_rate over all blocks
    rates = [getattr(blk.drop_path, "drop_prob", 0.0) for layer in m.layers for blk in layer.blocks]
    assert rates == pytest.approx([0.0, 0.125, 0.25, 0.375, 0.5])


def test_train_without_dropout_equals_eval():
    torch.manual_seed(0)
    m = small()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m.train()(x), m.eval()(x))


def test_activation_checkpointing_same_result_and_grads():
    torch.manual_seed(0)
    m = small(drop_path_rate=0.2, drop_rate=0.1).train()
    x = torch.randn(2, 3, 32, 32)
    out = {}
    for flag in (False, True):
        m.set_grad_checkpointing(flag).zero_grad()
        torch.manual_seed(3)
        y = m(x)
        y.square().sum().backward()
        out[flag] = (y.detach(), [p.grad.clone() for p in m.parameters()])
    torch.testing.assert_close(out[True][0], out[False][0], rtol=0, atol=0)
    for g1, g0 in zip(out[True][1], out[False][1]):
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-7)
    assert small(use_checkpoint=True).layers[2].use_checkpoint


def test_state_dict_is_official_layout():
    m = small(**FULL)
    keys = set(m.state_dict())
    for k in ["patch_embed.proj.weight", "patch_embed.norm.weight", "layers.0.blocks.0.norm1.weight",
              "layers.0.blocks.0.modulation.f.weight", "layers.0.blocks.0.modulation.h.weight",
              "layers.0.blocks.0.modulation.proj.weight", "layers.0.blocks.0.modulation.focal_layers.1.0.weight",
              "layers.0.blocks.0.modulation.ln.weight", "layers.0.blocks.0.norm2.bias",
              "layers.0.blocks.0.mlp.fc1.weight", "layers.0.blocks.0.mlp.fc2.bias", "layers.0.blocks.0.gamma_1",
              "layers.0.blocks.0.gamma_2", "layers.2.downsample.proj.weight", "layers.2.downsample.norm.bias",
              "norm.weight", "head.weight", "head.bias"]:
        assert k in keys, k
    assert not any(k.startswith("layers.3.downsample") for k in keys)
    sd = m.state_dict()
    assert sd["layers.0.blocks.0.modulation.h.weight"].shape == (16, 16, 1, 1)
    assert sd["layers.0.blocks.0.modulation.f.weight"].shape == (2 * 16 + 3, 16)
    assert "layers.0.blocks.0.gamma_1" not in small().state_dict()
    assert "layers.0.blocks.0.modulation.ln.weight" not in small().state_dict()
