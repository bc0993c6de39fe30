"""Checkpoint reading, layout detection and conversion to our (= the official) state-dict layout.

Layouts (see docs in shared notes §3):

* ``official`` (microsoft/FocalNet): ``patch_embed``, ``layers.i.blocks.j.{norm1, modulation.{f, h, proj,
  focal_layers.k.0, ln}, norm2, mlp.fc1, mlp.fc2, gamma_1, gamma_2}``, ``layers.i.downsample`` at the END
  of stage i, ``norm``, ``head``. Usually wrapped as ``{"model": state_dict}``. Identical to ours.
* ``timm``: ``stem``, ``layers.{i+1}.downsample`` at the START of the next stage, ``ls1.gamma`` /
  ``ls2.gamma``, ``norm1_post`` / ``norm2_post`` (post-norm models), ``modulation.norm``, ``head.fc``,
  and f / proj / fc1 / fc2 stored as 1x1 convolutions ([out, in, 1, 1]).
* ``hf`` (Hugging Face transformers): optional ``focalnet.`` prefix (classification / backbone / MIM
  models), ``embeddings.patch_embeddings.projection``, ``embeddings.norm``,
  ``encoder.stages.i.layers.j.modulation.{projection_in, projection_context, projection_out, layernorm}``,
  ``encoder.stages.i.downsample.{projection, norm}``, ``layernorm``, ``classifier``.

Every conversion is a pure function ``state_dict -> state_dict`` (new dict, tensors shared / reshaped).
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = ["LAYOUTS", "LoadResult", "CheckpointMismatchError", "read_checkpoint", "unwrap_state_dict",
           "detect_layout", "convert_state_dict", "timm_to_official", "hf_to_official", "load_checkpoint"]

LAYOUTS = ("official", "timm", "hf")
StateDict = Dict[str, Tensor]


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's keys / shapes do not match the model (strict loading)."""


@dataclass
class LoadResult:
    """What `load_checkpoint` did (like torch's `_IncompatibleKeys`, plus shapes and skipped keys)."""
    missing_keys: List[str] = field(default_factory=list)
    unexpected_keys: List[str] = field(default_factory=list)
    #: (key, checkpoint shape, model shape) for every key present on both sides with different shapes
    mismatched_keys: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    #: checkpoint keys deliberately not loaded (classifier parts the model does not have, reset_head)
    skipped_keys: List[str] = field(default_factory=list)
    layout: str = ""


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
_EXPECTED = ("a PyTorch checkpoint (torch.save) holding a FocalNet state dict, optionally wrapped as "
             "{'model': state_dict} or {'state_dict': state_dict}")


def read_checkpoint(path: Union[str, os.PathLike]) -> StateDict:
    """torch.load(path, weights_only=True) and unwrap; ValueError for anything that is not a checkpoint."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path!r}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # garbage bytes, truncated zip / pickle, unsupported pickled objects ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        hint = ""
        if "weights_only" in str(e):
            hint = (" (it pickles objects other than tensors; if you trust the file, torch.load it with "
                    "weights_only=False yourself and pass the state dict)")
        raise ValueError(f"{path!r} could not be read as a checkpoint ({type(e).__name__}: {msg}){hint}; "
                         f"expected {_EXPECTED}") from e
    return unwrap_state_dict(obj, source=repr(path))


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def unwrap_state_dict(obj, source: str = "the checkpoint") -> StateDict:
    """Return the flat name -> tensor dict inside `obj` ({'model': ...}, {'state_dict': ...} or flat).

    A common ``module.`` prefix (DataParallel / DDP) is stripped.
    """
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_state_dict", "module"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and not _is_state_dict(obj):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source} holds a {type(obj).__name__}, not a state dict; expected {_EXPECTED}")
    sd = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not sd or not all(isinstance(k, str) for k in sd):
        raise ValueError(f"{source} holds no name -> tensor entries; expected {_EXPECTED}")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


# ------------------------------------------------------------------------------------------------
# layout detection
# ------------------------------------------------------------------------------------------------
def detect_layout(state_dict) -> str:
    """'official', 'timm' or 'hf' (also accepts the wrapped forms); ValueError if not a FocalNet."""
    sd = unwrap_state_dict(state_dict) if not _is_state_dict(state_dict) else state_dict
    keys = list(sd)
    if any(".modulation.projection_in." in k for k in keys) or any(
            k.startswith(("focalnet.embeddings.", "embeddings.patch_embeddings.")) for k in keys):
        return "hf"
    has_mod = any(re.search(r"(^|\.)layers\.\d+\.blocks\.\d+\.modulation\.f\.weight$", k) for k in keys)
    if has_mod:
        timm_marks = ("stem.proj.", "head.fc.", ".ls1.gamma", ".ls2.gamma", "_post.", ".modulation.norm.")
        if any(k.startswith("stem.") for k in keys) or any(m in k for k in keys for m in timm_marks):
            return "timm"
        if any(k.endswith("modulation.f.weight") and sd[k].ndim == 4 for k in keys):
            return "timm"
        return "official"
    sample = ", ".join(keys[:4])
    kind = ""
    if any(re.search(r"\.attn\.|relative_position|\.qkv\.", k) for k in keys):
        kind = " (its keys look like an attention model, e.g. Swin / ViT)"
    raise ValueError(f"the state dict is not a FocalNet checkpoint{kind}: no focal-modulation keys "
                     f"(official '...blocks.j.modulation.f.weight', timm, or Hugging Face "
                     f"'...modulation.projection_in.weight') among {len(keys)} keys, e.g. {sample}")


# ------------------------------------------------------------------------------------------------
# conversions (pure)
# ------------------------------------------------------------------------------------------------
_LINEAR_AS_CONV = re.compile(r"\.(modulation\.f|modulation\.proj|mlp\.fc1|mlp\.fc2)\.weight$")


def timm_to_official(state_dict: StateDict) -> StateDict:
    out: StateDict = {}
    for k, v in state_dict.items():
        nk = k
        if nk.startswith("stem."):
            nk = "patch_embed." + nk[len("stem."):]
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)$", nk)
        if m:  # timm: downsample at the start of stage i+1  ->  official: end of stage i
            nk = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
        nk = re.sub(r"\.ls([12])\.gamma$", r".gamma_\1", nk)
        nk = re.sub(r"\.norm([12])_post\.", r".norm\1.", nk)
        nk = nk.replace(".modulation.norm.", ".modulation.ln.")
        if nk.startswith("head.fc."):
            nk = "head." + nk[len("head.fc."):]
        if v.ndim == 4 and v.shape[2:] == (1, 1) and _LINEAR_AS_CONV.search(nk):
            v = v.reshape(v.shape[0], v.shape[1])
        out[nk] = v
    return out


_HF_RULES = [
    (re.compile(r"^embeddings\.patch_embeddings\.projection\."), "patch_embed.proj."),
    (re.compile(r"^embeddings\.norm\."), "patch_embed.norm."),
    (re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\."), r"layers.\1.blocks.\2."),
    (re.compile(r"^encoder\.stages\.(\d+)\.downsample\.projection\."), r"layers.\1.downsample.proj."),
    (re.compile(r"^encoder\.stages\.(\d+)\.downsample\.norm\."), r"layers.\1.downsample.norm."),
    (re.compile(r"\.modulation\.projection_in\."), ".modulation.f."),
    (re.compile(r"\.modulation\.projection_context\."), ".modulation.h."),
    (re.compile(r"\.modulation\.projection_out\."), ".modulation.proj."),
    (re.compile(r"\.modulation\.layernorm\."), ".modulation.ln."),
    (re.compile(r"^layernorm\."), "norm."),
    (re.compile(r"^classifier\."), "head."),
]


def hf_to_official(state_dict: StateDict) -> StateDict:
    out: StateDict = {}
    for k, v in state_dict.items():
        nk = k[len("focalnet."):] if k.startswith("focalnet.") else k
        for pattern, repl in _HF_RULES:
            nk = pattern.sub(repl, nk)
        out[nk] = v
    return out


_CONVERTERS = {"official": dict, "timm": timm_to_official, "hf": hf_to_official}


def convert_state_dict(state_dict, src_layout: Optional[str] = None) -> StateDict:
    """Convert an official / timm / Hugging Face state dict (wrapped or not) to our layout."""
    sd = unwrap_state_dict(state_dict)
    layout = src_layout or detect_layout(sd)
    if layout not in _CONVERTERS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; expected one of {LAYOUTS}")
    return _CONVERTERS[layout](sd)


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------
def _fmt_shape(s) -> str:
    return "[" + ", ".join(str(d) for d in s) + "]"


def load_checkpoint(model: nn.Module, path_or_state_dict, strict: bool = True, reset_head: bool = False,
                    src_layout: Optional[str] = None) -> LoadResult:
    """Load an official / timm / Hugging Face FocalNet checkpoint (path or dict) into `model`.

    * Classifier keys the model has no place for are skipped, not reported as unexpected: ``head.*``
      when the model has no head (num_classes=0 or features_only) and ``norm.*`` with features_only.
      With features_only the per-output ``norm{i}`` layers, absent from classification checkpoints,
      keep their initialisation (listed in `missing_keys`, not an error).
    * reset_head=True: ``head.*`` tensors whose shape differs from the model's are skipped and the
      model keeps its own head.
    * strict=True: any missing, unexpected or mis-shaped key raises ONE CheckpointMismatchError
      (a RuntimeError) listing all of them; strict=False loads what matches and reports the rest.
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        source = repr(os.fspath(path_or_state_dict))
        raw = read_checkpoint(path_or_state_dict)
    else:
        source = "the given state dict"
        raw = unwrap_state_dict(path_or_state_dict, source=source)
    layout = src_layout or detect_layout(raw)
    sd = convert_state_dict(raw, layout)

    own = model.state_dict()
    result = LoadResult(layout=layout)
    features_only = bool(getattr(model, "features_only", False))
    no_head = not any(k.startswith("head.") for k in own)
    optional_missing = set()
    if features_only:
        optional_missing = {k for k in own if re.match(r"norm\d+\.", k)}

    to_load: StateDict = {}
    for k, v in sd.items():
        if (no_head and k.startswith("head.")) or (features_only and k.startswith("norm.") and k not in own):
            result.skipped_keys.append(k)
            continue
        if k not in own:
            result.unexpected_keys.append(k)
            continue
        if tuple(v.shape) != tuple(own[k].shape):
            if reset_head and k.startswith("head."):
                result.skipped_keys.append(k)
                continue
            result.mismatched_keys.append((k, tuple(v.shape), tuple(own[k].shape)))
            continue
        to_load[k] = v
    mismatched = {k for k, _, _ in result.mismatched_keys}
    result.missing_keys = [k for k in own if k not in sd and k not in mismatched]
    hard_missing = [k for k in result.missing_keys if k not in optional_missing]

    if strict and (hard_missing or result.unexpected_keys or result.mismatched_keys):
        lines = [f"error loading {source} ({layout} layout) into {type(model).__name__}:"]
        if hard_missing:
            lines.append(f"  missing keys ({len(hard_missing)}): {', '.join(hard_missing)}")
        if result.unexpected_keys:
            lines.append(f"  unexpected keys ({len(result.unexpected_keys)}): {', '.join(result.unexpected_keys)}")
        if result.mismatched_keys:
            lines.append(f"  mis-shaped keys ({len(result.mismatched_keys)}): " + ", ".join(
                f"{k} (checkpoint {_fmt_shape(a)}, model {_fmt_shape(b)})" for k, a, b in result.mismatched_keys))
            head = [(k, a, b) for k, a, b in result.mismatched_keys if k.startswith("head.")]
            if head:
                n_ckpt, n_model = head[0][1][0], head[0][2][0]
                lines.append(f"  the checkpoint's head has {n_ckpt} classes and the model's {n_model}: build the "
                             f"model with num_classes={n_ckpt}, or pass reset_head=True (or strict=False) to keep "
                             f"the model's own freshly initialised head")
        raise CheckpointMismatchError("\n".join(lines))

    model.load_state_dict(to_load, strict=False)
    return result
