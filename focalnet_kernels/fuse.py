"""Route the focal modulations of a model you already have through `focal_context`, in place.

`fuse(model)` recognises, by structure, the focal-modulation modules of
- Hugging Face transformers (`FocalNetModulation`: projection_in / projection_context / projection_out),
- timm >= 0.9 (`FocalModulation`, channels-first, 1×1 convs f / h / proj, optional LayerNorm2d `norm`),
- the official microsoft/FocalNet code and older timm (`FocalModulation`, Linear f / proj, 1×1 conv h),
- this project's model (anything with `set_fused`), which is simply switched to its fused path.
Each recognised module's class is swapped for a subclass whose forward calls the fused op (and runs
its projections through `focalnet_kernels.linear`); the
parameters, buffers and state-dict keys stay exactly as they were, and `unfuse` swaps the class back.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .linear import linear
from .ops import focal_context

_FUSED_CLASSES: Dict[type, type] = {}


def _levels(m) -> int:
    return len(m.focal_layers)


def _weights(m):
    return [layer[0].weight for layer in m.focal_layers]


def _modulate(m, y, h_conv):
    """From the f-projection output (B,H,W,2C+L+1, channels-last) to q * h(ctx_all)."""
    C = h_conv.weight.shape[0]
    q, ctx, gates = y[..., :C], y[..., C : 2 * C], y[..., 2 * C :]
    ctx_all = focal_context(ctx, gates, _weights(m), normalize=bool(m.normalize_modulator))
    return q * linear(ctx_all, h_conv.weight.reshape(C, C), h_conv.bias)


def _project(mod: nn.Module, x):
    """A plain nn.Linear through focalnet_kernels.linear; any other module (a quantised or LoRA
    Linear, say) is called as it is."""
    if type(mod) is nn.Linear:
        return linear(x, mod.weight, mod.bias)
    return mod(x)


def _fused_forward_hf(self, hidden_state):
    x = _modulate(self, _project(self.projection_in, hidden_state), self.projection_context)
    if self.use_post_layernorm_in_modulation:
        x = self.layernorm(x)
    return self.projection_dropout(_project(self.projection_out, x))


def _fused_forward_official(self, x):
    x = _modulate(self, _project(self.f, x), self.h)
    if getattr(self, "use_postln_in_modulation", False):
        x = self.ln(x)
    return self.proj_drop(_project(self.proj, x))


def _conv1x1_as_linear(conv: nn.Conv2d, x_cl):
    return linear(x_cl, conv.weight.reshape(conv.weight.shape[0], -1), conv.bias)


def _fused_forward_timm(self, x):
    # timm keeps NCHW maps; the fused op wants channels-last, so the three 1×1 convs run as Linears
    # on channels-last tokens (same math) and the result goes back to NCHW.
    y = _conv1x1_as_linear(self.f, x.permute(0, 2, 3, 1))
    out = _modulate(self, y, self.h)
    norm = self.norm
    if isinstance(norm, nn.LayerNorm) or type(norm).__name__ in ("LayerNorm2d", "LayerNorm"):
        out = F.layer_norm(out, (out.shape[-1],), norm.weight, norm.bias, norm.eps)
    elif not isinstance(norm, nn.Identity):
        raise TypeError(f"fuse: timm FocalModulation with an unsupported norm {type(norm).__name__}")
    out = _conv1x1_as_linear(self.proj, out).permute(0, 3, 1, 2)
    return self.proj_drop(out)


def _kind(m: nn.Module) -> Optional[Tuple[str, Callable]]:
    if not hasattr(m, "focal_layers") or not isinstance(getattr(m, "focal_layers"), nn.ModuleList):
        return None
    if hasattr(m, "projection_in") and hasattr(m, "projection_context"):
        return "transformers", _fused_forward_hf
    if hasattr(m, "f") and hasattr(m, "h") and hasattr(m, "proj"):
        if isinstance(m.f, nn.Conv2d):
            return "timm", _fused_forward_timm
        if isinstance(m.f, nn.Linear):
            return "official", _fused_forward_official
    return None


def _check_supported(name: str, m: nn.Module) -> None:
    for i, layer in enumerate(m.focal_layers):
        conv = layer[0] if isinstance(layer, nn.Sequential) and len(layer) >= 1 else None
        ok = (isinstance(conv, nn.Conv2d) and conv.groups == conv.in_channels == conv.out_channels
              and conv.bias is None and conv.stride == (1, 1) and conv.dilation == (1, 1)
              and conv.kernel_size[0] == conv.kernel_size[1] and conv.kernel_size[0] % 2 == 1
              and conv.padding == (conv.kernel_size[0] // 2,) * 2
              and len(layer) == 2 and isinstance(layer[1], nn.GELU) and layer[1].approximate == "none")
        if not ok:
            raise TypeError(f"fuse: {name}.focal_layers[{i}] is not a bias-free depthwise 'same' conv "
                            f"followed by exact GELU; cannot fuse it")


def fuse(model: nn.Module) -> nn.Module:
    """Route every focal modulation of `model` through the fused op, in place; returns `model`."""
    if hasattr(model, "set_fused") and callable(model.set_fused):
        model.set_fused(True)
        return model
    found = 0
    for name, m in model.named_modules():
        if getattr(m, "_focalnet_fused", False):
            found += 1
            continue
        kind = _kind(m)
        if kind is None:
            continue
        _check_supported(name or type(m).__name__, m)
        cls = type(m)
        fused_cls = _FUSED_CLASSES.get(cls)
        if fused_cls is None:
            fused_cls = type(f"Fused{cls.__name__}", (cls,), {
                "forward": kind[1], "_focalnet_fused": True, "_focalnet_unfused_class": cls,
                "_focalnet_kind": kind[0]})
            _FUSED_CLASSES[cls] = fused_cls
        m.__class__ = fused_cls
        found += 1
    if found == 0:
        raise TypeError(f"fuse: found no focal modulation module in {type(model).__name__}: expected a "
                        "FocalNet from timm, Hugging Face transformers, microsoft/FocalNet or focalnet")
    return model


def unfuse(model: nn.Module) -> nn.Module:
    """Undo `fuse`: every fused modulation gets its original class (and eager forward) back."""
    if hasattr(model, "set_fused") and callable(model.set_fused):
        model.set_fused(False)
        return model
    for m in model.modules():
        if getattr(type(m), "_focalnet_fused", False):
            m.__class__ = type(m)._focalnet_unfused_class
    return model


def is_fused(model: nn.Module) -> bool:
    if hasattr(model, "use_fused"):
        return bool(model.use_fused)
    return any(getattr(type(m), "_focalnet_fused", False) for m in model.modules())
