"""Checkpoint layouts and loading; equivalence with Hugging Face transformers' FocalNet as an oracle."""
import re

import pytest
import torch

import focalnet
from focalnet import (CheckpointMismatchError, FocalNet, convert_state_dict, create_model, detect_layout,
                      load_checkpoint)



pytestmark = pytest.mark.usefixtures("one_thread")

try:
    from transformers import FocalNetConfig, FocalNetForImageClassification, FocalNetModel
except ImportError:  # only the oracle tests need it; the layout and error tests run without it
    FocalNetConfig = FocalNetForImageClassification = FocalNetModel = None
needs_transformers = pytest.mark.skipif(FocalNetConfig is None, reason="needs transformers (the HF oracle)")

EMBED, DEPTHS, NCLS = 32, [1, 1, 2, 1], 10


def rel(a, b):
    return ((a - b).double().norm() / b.double().norm()).item()


# name -> (HF config overrides, our constructor overrides)
HF_VARIANTS = {
    "tiny_srf": ({}, {}),
    "tiny_lrf": (dict(focal_levels=[3] * 4), dict(focal_levels=3)),
    "layerscale_postln": (dict(use_layerscale=True, use_post_layernorm=True, layerscale_value=0.3),
                          dict(use_layerscale=True, use_postln=True)),
    "conv_embed": (dict(use_conv_embed=True), dict(use_conv_embed=True)),
    "normalize_postln_in_mod": (dict(normalize_modulator=True, use_post_layernorm_in_modulation=True,
                                     focal_levels=[4] * 4, focal_windows=[3, 3, 5, 5]),
                                dict(normalize_modulator=True, use_postln_in_modulation=True, focal_levels=4,
                                     focal_windows=(3, 3, 5, 5))),
}


def make_hf(hf_kw, seed=0, cls=FocalNetForImageClassification, **extra):
    torch.manual_seed(seed)
    kw = dict(embed_dim=EMBED, depths=DEPTHS, focal_levels=[2] * 4, focal_windows=[3] * 4, num_labels=NCLS,
              hidden_sizes=[EMBED * 2, EMBED * 4, EMBED * 8, EMBED * 8])
    kw.update(hf_kw)
    kw.update(extra)
    hf = cls(FocalNetConfig(**kw)).eval()
    with torch.no_grad():  # move away from the structured init (LN = 1/0, layerscale constant ...)
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return hf


def make_ours(our_kw, **extra):
    kw = dict(num_classes=NCLS, embed_dim=EMBED, depths=DEPTHS, focal_levels=2, focal_windows=3)
    kw.update(our_kw)
    kw.update(extra)
    return FocalNet(**kw).eval()


def small(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(num_classes=NCLS, embed_dim=16, depths=(1, 1, 2, 1), focal_levels=(2, 3, 2, 3), drop_path_rate=0.0)
    cfg.update(kw)
    m = FocalNet(**cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers as an independent oracle
# ---------------------------------------------------------------------------------------------
@needs_transformers
@pytest.mark.parametrize("variant", sorted(HF_VARIANTS))
def test_matches_hugging_face(variant):
    hf_kw, our_kw = HF_VARIANTS[variant]
    hf = make_hf(hf_kw)
    ours = make_ours(our_kw)
    assert detect_layout(hf.state_dict()) == "hf"
    res = load_checkpoint(ours, hf.state_dict())
    assert not res.missing_keys and not res.unexpected_keys and not res.mismatched_keys
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        # every HF stage returns (after downsample, before downsample, dims); record the latter
        # (HF's own output_hidden_states_before_downsampling path mis-reshapes, so hook the stages)
        before = {}
        hooks = [st.register_forward_hook(lambda mod, inp, out, i=i: before.__setitem__(i, out[1]))
                 for i, st in enumerate(hf.focalnet.encoder.stages)]
        ref = hf(x, output_hidden_states=True)
        for h in hooks:
            h.remove()
        logits = ours(x)
        assert rel(logits, ref.logits) < 1e-5
        # stage outputs before the downsample ...
        stages = ours.forward_stages(x)
        for i, s in enumerate(stages):
            assert rel(s.flatten(1, 2), before[i]) < 1e-5, i
        # ... and HF's default hidden states: the stem output and every stage's output after its downsample
        stem = ours.patch_embed(x)
        assert rel(stem.permute(0, 3, 1, 2), ref.reshaped_hidden_states[0]) < 1e-5
        for i in range(3):
            down = ours.layers[i].downsample(stages[i].permute(0, 3, 1, 2))
            assert rel(down.permute(0, 3, 1, 2), ref.reshaped_hidden_states[i + 1]) < 1e-5, i
        # features_only backbone: LayerNorm'd pre-downsample maps (norm{i} at identity init here)
        feats = make_ours(our_kw, features_only=True)
        load_checkpoint(feats, hf.state_dict())
        for i, f in enumerate(feats(x)):
            ln = torch.nn.functional.layer_norm(before[i], f.shape[1:2])
            assert rel(f.flatten(2).transpose(1, 2), ln) < 1e-5, i


@needs_transformers
def test_matches_hugging_face_in_train_mode():
    """Same dropout / stochastic-depth semantics and random-number consumption as HF (= official)."""
    hf_kw, our_kw = HF_VARIANTS["layerscale_postln"]
    hf = make_hf(hf_kw, hidden_dropout_prob=0.1, drop_path_rate=0.3).train()
    ours = make_ours(our_kw, drop_rate=0.1, drop_path_rate=0.3).train()
    load_checkpoint(ours, hf.state_dict())
    x = torch.randn(4, 3, 32, 64)
    torch.manual_seed(5)
    ref = hf(x).logits
    torch.manual_seed(5)
    out = ours(x)
    assert rel(out, ref) < 1e-5
    torch.manual_seed(6)
    assert rel(ours(x), ref) > 1e-3  # and the randomness is real


@needs_transformers
def test_hf_bare_model_and_odd_sizes():
    """FocalNetModel keys carry no `focalnet.` prefix; odd input sizes are padded the same way as HF."""
    hf = make_hf({}, cls=FocalNetModel)
    ours = make_ours({}, num_classes=0)
    res = load_checkpoint(ours, hf.state_dict())
    assert res.layout == "hf" and not res.missing_keys
    x = torch.randn(1, 3, 33, 47)
    with torch.no_grad():
        assert rel(ours(x), hf(x).pooler_output) < 1e-5


# ---------------------------------------------------------------------------------------------
# official and timm layouts
# ---------------------------------------------------------------------------------------------
def test_official_round_trip(tmp_path):
    src = small(seed=0, use_layerscale=True, use_postln=True, use_postln_in_modulation=True)
    official = {k: v.clone() for k, v in src.state_dict().items()}  # official layout == ours
    path = tmp_path / "official.pth"
    torch.save({"model": official, "epoch": 300}, path)
    dst = small(seed=1, use_layerscale=True, use_postln=True, use_postln_in_modulation=True)
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        assert not torch.equal(dst(x), src(x))
        res = load_checkpoint(dst, path)
        assert res.layout == "official"
        assert torch.equal(dst(x), src(x))
        assert torch.equal(create_model("focalnet_tiny_srf", pretrained=str(path), num_classes=NCLS, embed_dim=16,
                                        depths=(1, 1, 2, 1), focal_levels=(2, 3, 2, 3), use_layerscale=True,
                                        use_postln=True, use_postln_in_modulation=True).eval()(x), src(x))
    # {"state_dict": ...} wrapper and a DataParallel `module.` prefix
    for wrapped in ({"state_dict": official}, {f"module.{k}": v for k, v in official.items()}):
        dst = small(seed=2, use_layerscale=True, use_postln=True, use_postln_in_modulation=True)
        load_checkpoint(dst, wrapped)
        with torch.no_grad():
            assert torch.equal(dst(x), src(x))


def to_timm(sd, use_postln):
    """Hand-written inverse of the timm -> official mapping (timm's focalnet key layout)."""
    out = {}
    for k, v in sd.items():
        nk = k
        if nk.startswith("patch_embed."):
            nk = "stem." + nk[len("patch_embed."):]
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)$", nk)
        if m:
            nk = f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
        nk = re.sub(r"\.gamma_([12])$", r".ls\1.gamma", nk)
        if use_postln:
            nk = re.sub(r"\.norm([12])\.", r".norm\1_post.", nk)
        nk = nk.replace(".modulation.ln.", ".modulation.norm.")
        if nk.startswith("head."):
            nk = "head.fc." + nk[len("head."):]
        if re.search(r"\.(modulation\.f|modulation\.proj|mlp\.fc1|mlp\.fc2)\.weight$", nk):
            v = v.reshape(*v.shape, 1, 1)
        out[nk] = v
    return out


@pytest.mark.parametrize("kw", [{}, dict(use_layerscale=True, use_postln=True, use_postln_in_modulation=True,
                                          use_conv_embed=True)], ids=["plain", "large-style"])
def test_timm_layout(kw):
    src = small(seed=0, **kw)
    timm_sd = to_timm(src.state_dict(), kw.get("use_postln", False))
    assert "stem.proj.weight" in timm_sd and "layers.1.downsample.proj.weight" in timm_sd
    assert "layers.0.downsample.proj.weight" not in timm_sd
    assert detect_layout(timm_sd) == "timm"
    before = {k: v.clone() for k, v in timm_sd.items()}
    converted = convert_state_dict(timm_sd)
    assert set(converted) == set(src.state_dict())
    assert all(torch.equal(before[k], timm_sd[k]) for k in before)  # pure: input untouched
    dst = small(seed=1, **kw)
    res = load_checkpoint(dst, timm_sd)
    assert res.layout == "timm"
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))


# Our registered variant -> the keyword arguments timm's own focalnet_<name> entry point gives its
# FocalNet class (timm/models/focalnet.py), less embed_dim and depths. timm's entry points set
# embed_dim and depths themselves (passing them again is a TypeError), so the test builds timm's
# FocalNet class directly with a shrunken config. large_fl4 is left out: the official config (ours)
# normalizes the modulator, timm's does not.
TIMM_VARIANTS = {
    "focalnet_tiny_lrf": dict(focal_levels=[3] * 4),
    "focalnet_large_fl3": dict(focal_levels=[3] * 4, focal_windows=[5] * 4, use_post_norm=True,
                               use_overlap_down=True, layerscale_value=1e-4),
    "focalnet_huge_fl4": dict(focal_levels=[4] * 4, use_post_norm=True, use_post_norm_in_modulation=True,
                              use_overlap_down=True, layerscale_value=1e-4),
}


@pytest.mark.parametrize("name", sorted(TIMM_VARIANTS))
def test_against_timm_if_installed(name):
    pytest.importorskip("timm")
    from timm.models.focalnet import FocalNet as TimmFocalNet
    torch.manual_seed(0)
    tm = TimmFocalNet(num_classes=NCLS, embed_dim=16, depths=(1, 1, 2, 1), drop_path_rate=0.0,
                      **TIMM_VARIANTS[name]).eval()
    with torch.no_grad():  # every parameter away from its init (layer scales 1e-4, norms 1 / 0)
        for p in tm.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    ours = create_model(name, num_classes=NCLS, embed_dim=16, depths=(1, 1, 2, 1)).eval()
    res = load_checkpoint(ours, tm.state_dict())
    assert res.layout == "timm"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = tm(x)
        assert rel(ours(x), want) < 1e-5
        # and not trivially: a model left at its own init disagrees
        assert rel(create_model(name, num_classes=NCLS, embed_dim=16, depths=(1, 1, 2, 1)).eval()(x), want) > 1e-2


def test_convert_official_is_identity_and_detects():
    sd = small().state_dict()
    assert detect_layout(sd) == "official" and detect_layout({"model": sd}) == "official"
    conv = convert_state_dict({"model": sd})
    assert list(conv) == list(sd) and all(conv[k] is sd[k] for k in sd)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
def test_garbage_file(tmp_path):
    p = tmp_path / "garbage.pth"
    p.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError, match="garbage.pth") as ei:
        load_checkpoint(small(), p)
    assert "expected a PyTorch checkpoint" in str(ei.value) and ei.value.__cause__ is not None


def test_truncated_file(tmp_path):
    p = tmp_path / "full.pth"
    torch.save({"model": small().state_dict()}, p)
    data = p.read_bytes()
    t = tmp_path / "truncated.pth"
    t.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.pth"):
        load_checkpoint(small(), t)


def test_not_a_dict(tmp_path):
    p = tmp_path / "list.pth"
    torch.save([torch.zeros(3)], p)
    with pytest.raises(ValueError, match="list.pth.*list, not a state dict"):
        load_checkpoint(small(), p)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(small(), tmp_path / "nope.pth")


def test_swin_keys_rejected():
    swin = {"patch_embed.proj.weight": torch.zeros(96, 3, 4, 4),
            "layers.0.blocks.0.attn.qkv.weight": torch.zeros(288, 96),
            "layers.0.blocks.0.attn.relative_position_bias_table": torch.zeros(169, 3),
            "head.weight": torch.zeros(1000, 768)}
    with pytest.raises(ValueError, match="not a FocalNet checkpoint.*Swin"):
        load_checkpoint(small(), {"model": swin})
    with pytest.raises(ValueError, match="not a FocalNet"):
        detect_layout(swin)


def test_head_class_count_mismatch():
    src = small(seed=0, num_classes=21842)
    sd = src.state_dict()
    dst = small(seed=1, num_classes=1000)
    head_before = dst.head.weight.clone()
    with pytest.raises(CheckpointMismatchError) as ei:
        load_checkpoint(dst, sd)
    msg = str(ei.value)
    assert "head.weight" in msg and "num_classes=21842" in msg and "reset_head=True" in msg
    assert isinstance(ei.value, RuntimeError)
    assert torch.equal(dst.head.weight, head_before)  # nothing loaded on error

    res = load_checkpoint(dst, sd, reset_head=True)
    assert sorted(res.skipped_keys) == ["head.bias", "head.weight"] and not res.mismatched_keys
    assert torch.equal(dst.head.weight, head_before)
    assert torch.equal(dst.layers[2].blocks[1].modulation.f.weight, src.layers[2].blocks[1].modulation.f.weight)

    # a head-less model takes the backbone of a classification checkpoint
    nohead = small(seed=1, num_classes=0)
    res = load_checkpoint(nohead, sd)
    assert sorted(res.skipped_keys) == ["head.bias", "head.weight"]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(nohead(x), src.forward_head(src.forward_features(x), pre_logits=True))


def test_strict_false_reports_missing_and_unexpected():
    src = small(seed=0)
    sd = dict(src.state_dict())
    del sd["layers.1.blocks.0.mlp.fc1.weight"]
    sd["layers.9.blocks.0.foo"] = torch.zeros(3)
    dst = small(seed=1)
    with pytest.raises(RuntimeError) as ei:
        load_checkpoint(dst, sd)
    assert "layers.1.blocks.0.mlp.fc1.weight" in str(ei.value) and "layers.9.blocks.0.foo" in str(ei.value)
    res = load_checkpoint(dst, sd, strict=False)
    assert res.missing_keys == ["layers.1.blocks.0.mlp.fc1.weight"]
    assert res.unexpected_keys == ["layers.9.blocks.0.foo"]
    assert torch.equal(dst.layers[1].blocks[0].mlp.fc2.weight, src.layers[1].blocks[0].mlp.fc2.weight)
    assert not torch.equal(dst.layers[1].blocks[0].mlp.fc1.weight, src.layers[1].blocks[0].mlp.fc1.weight)


def test_mis_shaped_key():
    sd = dict(small(seed=0).state_dict())
    sd["layers.0.blocks.0.modulation.focal_layers.0.0.weight"] = torch.zeros(16, 1, 5, 5)
    dst = small(seed=1)
    with pytest.raises(CheckpointMismatchError, match=r"focal_layers\.0\.0\.weight \(checkpoint \[16, 1, 5, 5\], "
                                                      r"model \[16, 1, 3, 3\]\)"):
        load_checkpoint(dst, sd)
    res = load_checkpoint(dst, sd, strict=False)
    assert res.mismatched_keys == [("layers.0.blocks.0.modulation.focal_layers.0.0.weight", (16, 1, 5, 5),
                                    (16, 1, 3, 3))]
    assert not res.missing_keys and not res.unexpected_keys


def test_features_only_takes_classification_checkpoint():
    src = small(seed=0)
    dst = small(seed=1, features_only=True)
    res = load_checkpoint(dst, {"model": src.state_dict()})
    assert sorted(res.skipped_keys) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    assert all(re.match(r"norm\d\.", k) for k in res.missing_keys) and len(res.missing_keys) == 8
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        raw = src.forward_stages(x)
        for i, f in enumerate(dst(x)):
            assert torch.equal(f, getattr(dst, f"norm{i}")(raw[i]).permute(0, 3, 1, 2))


def test_create_model_pretrained_state_dict_and_unknown_layout():
    src = small(seed=0)
    m = focalnet.create_model("focalnet_tiny_srf", pretrained=src.state_dict(), num_classes=NCLS, embed_dim=16,
                              depths=(1, 1, 2, 1), focal_levels=(2, 3, 2, 3))
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), src.state_dict().values()))
    with pytest.raises(ValueError, match="layout"):
        convert_state_dict(src.state_dict(), src_layout="caffe")
