"""focalnet_kernels.fuse on models users already have (Hugging Face transformers here; timm where it
imports): state dict unchanged, outputs and gradients match the unfused model, the fused op ran."""
import pytest
import torch

import focalnet_kernels as fk
from conftest import kernel_backends, rel_err

transformers = pytest.importorskip("transformers")  # a [test] dependency: present in CI


def _hf_model(**kw):
    cfg = dict(embed_dim=16, depths=[1, 2], hidden_sizes=[16, 32], focal_levels=[2, 3], focal_windows=[3, 3],
               num_labels=5, image_size=32)
    cfg.update(kw)
    torch.manual_seed(0)
    return transformers.FocalNetForImageClassification(transformers.FocalNetConfig(**cfg))


@pytest.mark.parametrize("name", kernel_backends())
@pytest.mark.parametrize("variant", [{}, dict(use_layerscale=True, use_post_layernorm=True,
                                              normalize_modulator=True, use_post_layernorm_in_modulation=True)])
def test_fuse_transformers_matches(name, variant, backend, forbid_eager_dwconv_later):
    backend(name)
    model = _hf_model(**variant).eval()
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 30, 37)
    with torch.no_grad():
        want = model(x).logits
    fk.fuse(model)
    assert fk.is_fused(model)
    assert keys.keys() == model.state_dict().keys()
    with forbid_eager_dwconv_later():
        with torch.no_grad():
            got = model(x).logits
    assert rel_err(got, want) < 1e-5
    fk.unfuse(model)
    assert not fk.is_fused(model)
    with torch.no_grad():
        assert rel_err(model(x).logits, want) < 1e-6


@pytest.mark.parametrize("name", kernel_backends())
def test_fuse_transformers_training_gradients(name, backend, forbid_eager_dwconv_later):
    backend(name)
    ref = _hf_model().train()
    fused = fk.fuse(_hf_model().train())
    x = torch.randn(2, 3, 24, 28)
    y = torch.tensor([1, 3])
    torch.nn.functional.cross_entropy(ref(x).logits, y).backward()
    with forbid_eager_dwconv_later():
        torch.nn.functional.cross_entropy(fused(x).logits, y).backward()
    ref_params = dict(ref.named_parameters())
    for n, p in fused.named_parameters():
        assert p.grad is not None, n
        assert rel_err(p.grad, ref_params[n].grad) < 1e-4, n


def test_fuse_refuses_unknown_module():
    with pytest.raises(TypeError, match="no focal modulation"):
        fk.fuse(torch.nn.Sequential(torch.nn.Linear(3, 3)))


# timm's focalnet_* entry points set embed_dim and depths themselves (passing them again is a
# TypeError), so the test builds timm's FocalNet class directly with a small config.
TIMM_VARIANTS = [dict(),   # focalnet_*_srf: 2 levels, window 3
                 dict(focal_levels=[3] * 4, use_post_norm=True,
                      use_post_norm_in_modulation=True, normalize_modulator=True, layerscale_value=0.3)]


@pytest.mark.parametrize("name", kernel_backends())
@pytest.mark.parametrize("variant", range(len(TIMM_VARIANTS)))
def test_fuse_timm_if_available(name, variant, backend, forbid_eager_dwconv_later):
    pytest.importorskip("timm", reason="timm does not import here; covered by the GPU suite")
    from timm.models.focalnet import FocalNet as TimmFocalNet
    backend(name)
    torch.manual_seed(0)
    model = TimmFocalNet(num_classes=7, embed_dim=16, depths=(1, 1, 1, 1), drop_path_rate=0.0,
                         **TIMM_VARIANTS[variant]).eval()
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 32, 40)
    with torch.no_grad():
        want = model(x)
        fk.fuse(model)
        assert fk.is_fused(model)
        assert keys.keys() == model.state_dict().keys()
        assert all(torch.equal(keys[k], v) for k, v in model.state_dict().items())
        with forbid_eager_dwconv_later():
            got = model(x)
        assert rel_err(got, want) < 1e-5
        fk.unfuse(model)
        assert not fk.is_fused(model)
        assert rel_err(model(x), want) < 1e-6
