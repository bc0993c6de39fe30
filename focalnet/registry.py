"""Named FocalNet variants (official configs) and `create_model`."""
from __future__ import annotations

import difflib
from typing import Any, Dict, List

from . import hub
from .checkpoint import load_checkpoint
from .model import FocalNet

_SRF = dict(focal_levels=(2, 2, 2, 2), focal_windows=(3, 3, 3, 3))
_LRF = dict(focal_levels=(3, 3, 3, 3), focal_windows=(3, 3, 3, 3))
_T, _S = dict(depths=(2, 2, 6, 2)), dict(depths=(2, 2, 18, 2))
_BIG = dict(depths=(2, 2, 18, 2), use_conv_embed=True, use_postln=True, use_layerscale=True)
_FL3W5 = dict(focal_levels=(3, 3, 3, 3), focal_windows=(5, 5, 5, 5))
_FL4 = dict(focal_levels=(4, 4, 4, 4), focal_windows=(3, 3, 3, 3))

#: name -> FocalNet constructor arguments (every variant defaults to num_classes=1000).
MODEL_CONFIGS: Dict[str, Dict[str, Any]] = {
    "focalnet_tiny_srf": dict(embed_dim=96, **_T, **_SRF),
    "focalnet_tiny_lrf": dict(embed_dim=96, **_T, **_LRF),
    "focalnet_small_srf": dict(embed_dim=96, **_S, **_SRF),
    "focalnet_small_lrf": dict(embed_dim=96, **_S, **_LRF),
    "focalnet_base_srf": dict(embed_dim=128, **_S, **_SRF),
    "focalnet_base_lrf": dict(embed_dim=128, **_S, **_LRF),
    "focalnet_large_fl3": dict(embed_dim=192, **_BIG, **_FL3W5),
    "focalnet_large_fl4": dict(embed_dim=192, **_BIG, **_FL4, normalize_modulator=True),  # official yaml
    "focalnet_xlarge_fl3": dict(embed_dim=256, **_BIG, **_FL3W5),
    "focalnet_xlarge_fl4": dict(embed_dim=256, **_BIG, **_FL4),
    "focalnet_huge_fl3": dict(embed_dim=352, **_BIG, **_LRF, use_postln_in_modulation=True),
    "focalnet_huge_fl4": dict(embed_dim=352, **_BIG, **_FL4, use_postln_in_modulation=True),
}


def list_models() -> List[str]:
    return sorted(MODEL_CONFIGS)


def model_config(name: str) -> Dict[str, Any]:
    """A copy of the registered constructor arguments of `name` (TypeError if not a str, ValueError if unknown)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str naming a FocalNet variant ({', '.join(list_models())}), "
                        f"got {type(name).__name__} {name!r}")
    if name not in MODEL_CONFIGS:
        close = difflib.get_close_matches(name, MODEL_CONFIGS, n=5, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown FocalNet variant {name!r}{hint} (known: {', '.join(list_models())})")
    return dict(num_classes=1000, **MODEL_CONFIGS[name])


def create_model(name: str, *, pretrained=None, use_fused: bool = False, strict: bool = True,
                 reset_head: bool = False, **overrides) -> FocalNet:
    """Build a registered variant; `overrides` replace any constructor argument.

    pretrained:

    * None / False: no weights (the model's own initialisation);
    * True, a tag (``"ms_in1k"``, ``"ms_in22k"``: :data:`focalnet.hub.PRETRAINED_TAGS`), ``"hf-hub:<repo>"``
      or a repository id: the official ImageNet weights fetched by name from the Hugging Face Hub (needs
      the ``hub`` extra; see :mod:`focalnet.hub`: cache, ``HF_HUB_OFFLINE``, verification). ``num_classes``
      follows the weights (1000, 21842, or 0 for huge_fl4) unless given; given and different, the
      checkpoint's classifier is left out (as ``reset_head=True``);
    * a checkpoint path or a state dict (official, timm or Hugging Face layout), loaded with
      :func:`focalnet.load_checkpoint` (``strict`` and ``reset_head`` are passed through).

    The model gets ``pretrained_cfg`` (as timm's models do): a dict with ``input_size``, ``mean``, ``std``,
    ``crop_pct``, ``interpolation``, ``num_classes`` (the weights'), ``hf_hub_id`` and ``tag`` of the hub
    weights loaded, or of the variant's default weights when none were fetched by name.
    """
    cfg = model_config(name)
    source = hub.resolve_pretrained(name, pretrained)
    pretrained_cfg = source if source is not None else hub.default_pretrained_cfg(name)
    if source is not None:
        pretrained, _ = hub.load_pretrained_state_dict(source)
        if source.get("num_classes") is None:  # a repository we have no configuration for
            source["num_classes"] = hub.classes_of(pretrained)
        cfg["num_classes"] = source["num_classes"]
        reset_head = reset_head or overrides.get("num_classes", source["num_classes"]) != source["num_classes"]
    cfg.update(overrides)
    model = FocalNet(use_fused=use_fused, **cfg)
    if pretrained is not None and pretrained is not False:
        load_checkpoint(model, pretrained, strict=strict, reset_head=reset_head)
    model.pretrained_cfg = dict(pretrained_cfg) if pretrained_cfg is not None else None
    return model
