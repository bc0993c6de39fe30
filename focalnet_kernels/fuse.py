"""Route the focal modulations of a model you already have through `focal_context`, in place.

`fuse(model)` recognises, by structure, the focal-modulation modules of
- Hugging Face transformers (`FocalNetModulation`: projection_in / projection_context / projection_out),
- timm >= 0.9 (`FocalModulation`, channels-first, 1×1 convs f / h / proj, optional LayerNorm2d `norm`),
- the official microsoft/FocalNet code and older timm (`FocalModulation`, Linear f / proj, 1×1 conv h),
- this project's model (anything with `set_fused`), which is simply switched to its fused path.
Each recognised module's class is swapped for a subclass whose forward runs the modulation through
`focal_modulation` (the fused op, then h and the output projection with their inputs recomputed in the
backward) and the input projection through `focalnet_kernels.linear`; the parameters, buffers and
state-dict keys stay exactly as they were, and `unfuse` swaps the class back.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .linear import linear
from .recompute import focal_modulation

_FUSED_CLASSES: Dict[type, type] = {}


def _levels(m) -> int:
    return len(m.focal_layers)


def _weights(m):
    return [layer[0].weight for layer in m.focal_layers]


def _as_2d(mod: nn.Module):
    """(weight [out, in], bias) of a plain nn.Linear or of a (timm's 1x1) nn.Conv2d; None for any other
    module (a quantised or LoRA Linear, say), which is then called as it is."""
    if type(mod) is nn.Linear:
        return mod.weight, mod.bias
    if isinstance(mod, nn.Conv2d):
        return mod.weight.reshape(mod.weight.shape[0], -1), mod.bias
    return None


def _project(mod: nn.Module, x):
    """A plain Linear (or 1x1 conv, on channels-last x) through focalnet_kernels.linear; any other
    module is called as it is."""
    wb = _as_2d(mod)
    return mod(x) if wb is None else linear(x, *wb)


def _modulate(m, y, h_conv, proj: Optional[nn.Module] = None):
    """From the f-projection output (B,H,W,2C+L+1, channels-last) to q * h(ctx_all), through
    focalnet_kernels.focal_modulation; then `proj` when given (inside it when proj is a plain
    Linear or 1x1 conv, whose input is then recomputed in the backward instead of saved)."""
    C = h_conv.weight.shape[0]
    pw = _as_2d(proj) if proj is not None else None
    out = focal_modulation(y, _weights(m), h_conv.weight.reshape(C, C), h_conv.bias, *(pw or (None, None)),
                           normalize=bool(m.normalize_modulator))
    return out if proj is None or pw is not None else proj(out)


def _fused_forward_hf(self, hidden_state):
    y = _project(self.projection_in, hidden_state)
    if not self.use_post_layernorm_in_modulation:
        return self.projection_dropout(_modulate(self, y, self.projection_context, self.projection_out))
    x = self.layernorm(_modulate(self, y, self.projection_context))
    return self.projection_dropout(_project(self.projection_out, x))


def _fused_forward_official(self, x):
    y = _project(self.f, x)
    if not getattr(self, "use_postln_in_modulation", False):
        return self.proj_drop(_modulate(self, y, self.h, self.proj))
    return self.proj_drop(_project(self.proj, self.ln(_modulate(self, y, self.h))))


def _fused_forward_timm(self, x):
    # timm keeps NCHW maps; the fused op wants channels-last, so the three 1×1 convs run as Linears
    # on channels-last tokens (same math) and the result goes back to NCHW.
    y = _project(self.f, x.permute(0, 2, 3, 1))
    norm = self.norm
    if isinstance(norm, nn.Identity):
        return self.proj_drop(_modulate(self, y, self.h, self.proj).permute(0, 3, 1, 2))
    if not (isinstance(norm, nn.LayerNorm) or type(norm).__name__ in ("LayerNorm2d", "LayerNorm")):
        raise TypeError(f"fuse: timm FocalModulation with an unsupported norm {type(norm).__name__}")
    out = _modulate(self, y, self.h)
    out = F.layer_norm(out, (out.shape[-1],), norm.weight, norm.bias, norm.eps)
    return self.proj_drop(_project(self.proj, out).permute(0, 3, 1, 2))


_FORWARDS: Dict[str, Callable] = {"transformers": _fused_forward_hf, "timm": _fused_forward_timm,
                                   "official": _fused_forward_official}


def _kind(m: nn.Module) -> Optional[str]:
    if not hasattr(m, "focal_layers") or not isinstance(getattr(m, "focal_layers"), nn.ModuleList):
        return None
    if hasattr(m, "projection_in") and hasattr(m, "projection_context"):
        return "transformers"
    if hasattr(m, "f") and hasattr(m, "h") and hasattr(m, "proj"):
        if isinstance(m.f, nn.Conv2d):
            return "timm"
        if isinstance(m.f, nn.Linear):
            return "official"
    return None


def _fused_class(cls: type, kind: str) -> type:
    """The fused subclass of `cls` (made once per class and kept): its forward is the fused one of `kind`.
    It is made at run time, so pickle cannot find it by name: its instances pickle as the original,
    importable class plus `kind` (_reduce_fused), and unpickling makes the subclass again (_new_fused),
    also in a process where fuse() never ran."""
    fused_cls = _FUSED_CLASSES.get(cls)
    if fused_cls is None:
        fused_cls = type(f"Fused{cls.__name__}", (cls,), {
            "forward": _FORWARDS[kind], "_focalnet_fused": True, "_focalnet_unfused_class": cls,
            "_focalnet_kind": kind, "__reduce_ex__": _reduce_fused})
        _FUSED_CLASSES[cls] = fused_cls
    return fused_cls


def _new_fused(cls: type, kind: str):
    return object.__new__(_fused_class(cls, kind))


def _reduce_fused(self, protocol):
    # object's own reduction (copyreg.__newobj__, state, ...) with the constructor call replaced
    rv = object.__reduce_ex__(self, max(protocol, 2))
    return (_new_fused, (type(self)._focalnet_unfused_class, type(self)._focalnet_kind)) + tuple(rv[2:])


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
        m.__class__ = _fused_class(type(m), kind)
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
