"""Model builders of the benchmark: FocalNet (this project) and Swin (timm, else transformers)."""
from __future__ import annotations

import re
from typing import Dict, List, Tuple

import torch
from torch import nn

SIZES = ("tiny", "small", "base")
SIZE_LETTER = {"tiny": "T", "small": "S", "base": "B"}

#: Swin configurations (Liu et al. 2021), the sizes FocalNet-T/S/B are compared with.
SWIN = {
    "tiny": dict(timm="swin_tiny_patch4_window7_224", embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "small": dict(timm="swin_small_patch4_window7_224", embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "base": dict(timm="swin_base_patch4_window7_224", embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
}

#: Overrides that make every model tiny (tests, --dry-run, --tiny): 64x64 images, one block per stage.
TINY_IMG = 64
TINY_FOCALNET = dict(embed_dim=16, depths=(1, 1, 1, 1), num_classes=10)
TINY_SWIN = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=2, num_classes=10)


def is_swin(name: str) -> bool:
    return name.startswith("swin")


def canonical(name: str) -> str:
    """focalnet_tiny_srf stays; swin_t / swin-tiny / swin_tiny_patch4_window7_224 -> swin_tiny."""
    n = name.strip().lower().replace("-", "_")
    if n.startswith("swin"):
        m = re.match(r"swin_?(t|s|b|tiny|small|base)(_|$)", n)
        if not m:
            raise ValueError(f"unknown Swin model {name!r} (use swin_tiny, swin_small or swin_base)")
        return "swin_" + {"t": "tiny", "s": "small", "b": "base"}.get(m.group(1), m.group(1))
    n = {"focalnet_t_srf": "focalnet_tiny_srf", "focalnet_t_lrf": "focalnet_tiny_lrf",
         "focalnet_s_srf": "focalnet_small_srf", "focalnet_s_lrf": "focalnet_small_lrf",
         "focalnet_b_srf": "focalnet_base_srf", "focalnet_b_lrf": "focalnet_base_lrf"}.get(n, n)
    import focalnet
    if n not in focalnet.list_models():
        raise ValueError(f"unknown model {name!r}; FocalNet variants: {', '.join(focalnet.list_models())}; "
                         "Swin: swin_tiny, swin_small, swin_base")
    return n


def size_of(name: str) -> str:
    for s in SIZES:
        if f"_{s}" in name:
            return s
    return "other"


def label(name: str) -> str:
    """focalnet_tiny_lrf -> FocalNet-T LRF, swin_small -> Swin-S."""
    size = size_of(name)
    letter = SIZE_LETTER.get(size, size)
    if is_swin(name):
        return f"Swin-{letter}"
    rest = name.split("_")[2:] if size in SIZE_LETTER else name.split("_")[1:]
    return f"FocalNet-{letter} " + " ".join(r.upper() for r in rest) if size in SIZE_LETTER else name


def swin_source() -> str:
    """'timm' when timm imports, else 'transformers'."""
    try:
        import timm  # noqa: F401
        return "timm"
    except Exception:
        return "transformers"


class _Logits(nn.Module):
    """Makes a Hugging Face classifier return its logits tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


def build_focalnet(name: str, *, tiny: bool) -> Tuple[nn.Module, Dict]:
    import focalnet
    over = dict(TINY_FOCALNET) if tiny else {}
    model = focalnet.create_model(name, pretrained=None, use_fused=False, **over)
    params = sum(p.numel() for p in model.parameters())
    return model, {"source": "focalnet (this project)", "overrides": {k: list(v) if isinstance(v, tuple) else v
                                                                       for k, v in over.items()},
                   "params": params}


def build_swin(name: str, *, tiny: bool, img_size: int) -> Tuple[nn.Module, Dict]:
    size = name.split("_")[1]
    cfg = dict(SWIN[size])
    src = swin_source()
    info: Dict = {"source": src}
    if src == "timm":
        import timm
        kw = dict(TINY_SWIN, img_size=img_size) if tiny else {}
        model = timm.create_model(cfg["timm"], pretrained=False, **kw)
        # timm marks Swin's fused attention "experimental" (off unless TIMM_FUSED_ATTN=2): switch SDPA on.
        n_attn = 0
        for m in model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = True
                n_attn += 1
        info.update(timm_name=cfg["timm"], overrides=kw, attention=f"F.scaled_dot_product_attention "
                    f"(fused_attn=True on {n_attn} modules)" if n_attn else "timm default (no fused_attn flag)")
    else:
        from transformers import SwinConfig, SwinForImageClassification
        if tiny:
            conf = SwinConfig(image_size=img_size, embed_dim=TINY_SWIN["embed_dim"], depths=list(TINY_SWIN["depths"]),
                              num_heads=list(TINY_SWIN["num_heads"]), window_size=TINY_SWIN["window_size"],
                              num_labels=TINY_SWIN["num_classes"])
        else:
            conf = SwinConfig(image_size=img_size, embed_dim=cfg["embed_dim"], depths=list(cfg["depths"]),
                              num_heads=list(cfg["num_heads"]), window_size=7, num_labels=1000)
        hf = None
        try:  # SDPA where this transformers version implements it for Swin
            hf = SwinForImageClassification._from_config(conf, attn_implementation="sdpa")
        except Exception:
            hf = None
        if hf is None:
            hf = SwinForImageClassification(conf)
        model = _Logits(hf)
        info.update(hf_class="SwinForImageClassification(SwinConfig(...)), random init, no download",
                    attention=str(getattr(hf.config, "_attn_implementation", "eager")))
    info["params"] = sum(p.numel() for p in model.parameters())
    return model, info


def build(name: str, *, tiny: bool, img_size: int) -> Tuple[nn.Module, Dict]:
    if is_swin(name):
        return build_swin(name, tiny=tiny, img_size=img_size)
    return build_focalnet(name, tiny=tiny)


def fused_capable(name: str) -> bool:
    return not is_swin(name)


def sizes_in(models: List[str]) -> List[str]:
    seen = []
    for s in SIZES + ("other",):
        if any(size_of(m) == s for m in models) and s not in seen:
            seen.append(s)
    return seen


def stage_shapes(name_or_size: str, *, tiny: bool, img_size: int) -> List[Tuple[int, int, int]]:
    """(H, W, C) of the four stages: 56²×96 .. 7²×768 for T/S, ×128.. for B (224² input)."""
    size = name_or_size if name_or_size in SIZES else size_of(name_or_size)
    embed = TINY_FOCALNET["embed_dim"] if tiny else (128 if size == "base" else 96)
    r = img_size // 4
    return [(r >> i, r >> i, embed << i) for i in range(4)]
