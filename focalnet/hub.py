"""Official ImageNet weights by name, through the Hugging Face Hub (optional: ``pip install ".[hub]"``).

``create_model(name, pretrained=...)`` resolves `pretrained` here:

* ``True``: the variant's default source, timm's ``timm/<variant>.<tag>`` repository (the official
  microsoft/FocalNet weights converted to timm's layout, ``model.safetensors``);
* a tag, ``"ms_in1k"`` / ``"ms_in22k"`` (see :data:`PRETRAINED_TAGS`), or the full timm name
  ``"<variant>.<tag>"``;
* ``"hf-hub:<owner>/<repo>[@revision]"`` or a bare repository id ``"<owner>/<repo>"`` (when no such file
  exists): any repository holding ``model.safetensors`` or ``pytorch_model.bin`` in the official, timm or
  Hugging Face layout, e.g. ``microsoft/focalnet-tiny-lrf`` (Hugging Face transformers' conversion of
  the same weights, see :data:`MICROSOFT_REPOS`);
* anything else (a path, a state dict) is not for the hub and loads as before.

Files are fetched with ``huggingface_hub.hf_hub_download``, so the standard cache is used and shared
with timm and transformers; ``HF_HOME``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` are read when the call
is made (huggingface_hub itself reads them once, at import). The file then goes through
:func:`focalnet.read_checkpoint`'s checks, plus its SHA-256 against the cache's blob name (the cache
names large files by their SHA-256): a damaged cache entry raises CheckpointError instead of loading.

The pretrained configurations (input size, crop, interpolation, mean / std, classes) are timm's for
these weights (timm/models/focalnet.py): 224 px, crop_pct 0.9, bicubic, ImageNet mean / std, except
large / xlarge ImageNet-22k (384 px, crop_pct 1.0, 21842 classes), huge fl3 (224 px, 21842 classes)
and huge fl4 (no classifier).
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, Optional, Tuple

from .checkpoint import CheckpointError, StateDict, convert_state_dict, read_checkpoint

__all__ = ["PRETRAINED_TAGS", "MICROSOFT_REPOS", "PretrainedNotFoundError", "default_pretrained_cfg",
           "resolve_pretrained", "download_pretrained", "load_pretrained_state_dict", "hub_cache_dir"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: files looked for in a repository, in this order
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _cfg(variant: str, tag: str, num_classes: int = 1000, size: int = 224, crop_pct: float = 0.9) -> Dict[str, Any]:
    return dict(architecture=variant, tag=tag, hf_hub_id=f"timm/{variant}.{tag}", revision=None,
                num_classes=num_classes, input_size=(3, size, size), crop_pct=crop_pct, interpolation="bicubic",
                mean=IMAGENET_MEAN, std=IMAGENET_STD)


_IN1K = ("focalnet_tiny_srf", "focalnet_tiny_lrf", "focalnet_small_srf", "focalnet_small_lrf",
         "focalnet_base_srf", "focalnet_base_lrf")
_IN22K_384 = ("focalnet_large_fl3", "focalnet_large_fl4", "focalnet_xlarge_fl3", "focalnet_xlarge_fl4")

#: variant -> tag -> pretrained configuration; the first tag is the variant's default (pretrained=True)
PRETRAINED_TAGS: Dict[str, Dict[str, Dict[str, Any]]] = {
    **{v: {"ms_in1k": _cfg(v, "ms_in1k")} for v in _IN1K},
    **{v: {"ms_in22k": _cfg(v, "ms_in22k", num_classes=21842, size=384, crop_pct=1.0)} for v in _IN22K_384},
    "focalnet_huge_fl3": {"ms_in22k": _cfg("focalnet_huge_fl3", "ms_in22k", num_classes=21842)},
    "focalnet_huge_fl4": {"ms_in22k": _cfg("focalnet_huge_fl4", "ms_in22k", num_classes=0)},  # no classifier
}

#: Hugging Face transformers' repositories of the official ImageNet-1k weights -> our variant
#: (microsoft/focalnet-large-lrf-fl3 / -fl4 hold no weights in a form transformers loads)
MICROSOFT_REPOS = {
    "microsoft/focalnet-tiny": "focalnet_tiny_srf", "microsoft/focalnet-tiny-lrf": "focalnet_tiny_lrf",
    "microsoft/focalnet-small": "focalnet_small_srf", "microsoft/focalnet-small-lrf": "focalnet_small_lrf",
    "microsoft/focalnet-base": "focalnet_base_srf", "microsoft/focalnet-base-lrf": "focalnet_base_lrf",
}


class PretrainedNotFoundError(CheckpointError, FileNotFoundError):
    """The weights asked for are neither in the Hugging Face cache nor downloadable right now (offline,
    no network, unknown repository). A CheckpointError and a FileNotFoundError."""


def default_pretrained_cfg(variant: str) -> Optional[Dict[str, Any]]:
    """A copy of the variant's default pretrained configuration (None for a variant without one)."""
    tags = PRETRAINED_TAGS.get(variant)
    return dict(next(iter(tags.values()))) if tags else None


# ------------------------------------------------------------------------------------------------
# what `pretrained` names
# ------------------------------------------------------------------------------------------------
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
_CHECKPOINT_EXT = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".tar", ".pkl")


def _repo_cfg(variant: str, repo: str) -> Dict[str, Any]:
    repo_id, _, revision = repo.partition("@")
    for cfg in PRETRAINED_TAGS.get(variant, {}).values():
        if cfg["hf_hub_id"] == repo_id:
            return dict(cfg, revision=revision or None)
    holder = MICROSOFT_REPOS.get(repo_id) or next(
        (v for v, tags in PRETRAINED_TAGS.items() for c in tags.values() if c["hf_hub_id"] == repo_id), None)
    if holder is not None and holder != variant:
        raise ValueError(f"{repo_id} holds {holder} weights, not {variant}'s")
    # a repository we do not know: the class count is read from the checkpoint's head
    return dict(_cfg(variant, ""), hf_hub_id=repo_id, tag=None, revision=revision or None,
                num_classes=1000 if holder is not None else None)


def resolve_pretrained(variant: str, pretrained) -> Optional[Dict[str, Any]]:
    """The pretrained configuration `pretrained` names for `variant`, or None when it is not a hub
    source (False / None, a path, a state dict). ValueError for a tag the variant does not have."""
    if pretrained is None or pretrained is False:
        return None
    if pretrained is True:
        cfg = default_pretrained_cfg(variant)
        if cfg is None:
            raise ValueError(f"{variant} has no pretrained weights registered; pass pretrained=<path, state dict "
                             f"or 'hf-hub:<repo>'>")
        return cfg
    if not isinstance(pretrained, str):
        return None
    tags = PRETRAINED_TAGS.get(variant, {})
    if pretrained.startswith("hf-hub:"):
        return _repo_cfg(variant, pretrained[len("hf-hub:"):])
    if os.path.exists(pretrained):
        return None
    tag = pretrained[len(variant) + 1:] if pretrained.startswith(variant + ".") else pretrained
    if tag in tags:
        return dict(tags[tag])
    if re.fullmatch(r"\w+", pretrained) or pretrained.startswith(variant + "."):
        known = ", ".join(tags) or "none"
        raise ValueError(f"{pretrained!r} is neither a file nor a pretrained tag of {variant} (its tags: {known}; "
                         f"or pass 'hf-hub:<owner>/<repo>')")
    if _REPO_ID.fullmatch(pretrained) and not pretrained.lower().endswith(_CHECKPOINT_EXT):
        return _repo_cfg(variant, pretrained)
    return None  # a path that does not exist: read_checkpoint says so


# ------------------------------------------------------------------------------------------------
# fetching
# ------------------------------------------------------------------------------------------------
_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_cache_dir() -> str:
    """The Hugging Face hub cache as the environment names it now: HF_HUB_CACHE, else
    HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else
    ~/.cache/huggingface/hub (huggingface_hub's own rule, read at call time instead of import time)."""
    env = os.environ
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not cache:
        home = env.get("HF_HOME") or os.path.join(
            env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
        cache = os.path.join(home, "hub")
    return os.path.expandvars(os.path.expanduser(cache))


def _offline(hf_constants) -> bool:
    env = os.environ
    flag = env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or ""
    return flag.upper() in _TRUE or bool(getattr(hf_constants, "HF_HUB_OFFLINE", False))


def _import_hub():
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError as e:
        raise ImportError('pretrained weights by name need huggingface_hub: pip install ".[hub]" (from a checkout '
                          'of focalnet-kernels) or pip install huggingface_hub safetensors') from e
    try:
        from huggingface_hub import errors
    except ImportError:  # huggingface_hub < 0.23
        from huggingface_hub import utils as errors
    return huggingface_hub, constants, errors


def download_pretrained(cfg: Dict[str, Any], *, cache_dir: Optional[str] = None) -> str:
    """The local path of the configuration's weight file, from the cache or downloaded into it."""
    hf, constants, errors = _import_hub()
    repo, revision = cfg["hf_hub_id"], cfg.get("revision")
    cache = os.fspath(cache_dir) if cache_dir is not None else hub_cache_dir()
    offline = _offline(constants)
    missing = []
    for filename in WEIGHT_FILES:
        try:
            return hf.hf_hub_download(repo, filename, revision=revision, cache_dir=cache, local_files_only=offline)
        except errors.EntryNotFoundError as e:  # not in that repository, or (offline) not in the cache
            missing.append(f"{filename} ({type(e).__name__})")
        except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as e:
            raise PretrainedNotFoundError(f"Hugging Face repository {repo}{'@' + revision if revision else ''} not "
                                          f"found ({type(e).__name__}); a private or gated one needs "
                                          f"`hf auth login` (older: `huggingface-cli login`) first") from e
    where = f"{repo}{'@' + revision if revision else ''}"
    if offline:
        how = (f"HF_HUB_OFFLINE is set, so nothing is downloaded: fetch it where there is network with "
               f"`hf download {where.replace('@', ' --revision ')} {WEIGHT_FILES[0]}` (older huggingface_hub: "
               f"`huggingface-cli download ...`) into this cache (HF_HOME / HF_HUB_CACHE), or unset HF_HUB_OFFLINE")
    else:
        how = "neither file could be downloaded (no network?) and neither is in the cache"
    raise PretrainedNotFoundError(f"pretrained weights for {cfg.get('architecture')} ({cfg.get('tag') or where}): "
                                  f"{where} has no {' or '.join(WEIGHT_FILES)} in the Hugging Face cache {cache} "
                                  f"[{'; '.join(missing)}]; {how}")


def _blob_sha256(path: str) -> Optional[str]:
    """The SHA-256 the hub cache promises for `path`: its blob's name, for files stored with git LFS."""
    name = os.path.basename(os.path.realpath(path))
    return name if re.fullmatch(r"[0-9a-f]{64}", name) else None


def load_pretrained_state_dict(cfg: Dict[str, Any], *, cache_dir: Optional[str] = None) -> Tuple[StateDict, str]:
    """Fetch and verify the weights of a pretrained configuration; (our-layout state dict, file path)."""
    path = download_pretrained(cfg, cache_dir=cache_dir)
    sha256 = _blob_sha256(path)
    try:
        raw = read_checkpoint(path, sha256=sha256)
    except CheckpointError as e:
        raise CheckpointError(f"{e}\n(the Hugging Face cache entry of {cfg['hf_hub_id']} is damaged: delete "
                              f"{os.path.realpath(path)} and fetch it again)") from e
    return convert_state_dict(raw), path


def classes_of(state_dict: StateDict) -> int:
    """The class count of an our-layout state dict's classifier (0 without one)."""
    head = state_dict.get("head.weight")
    return int(head.shape[0]) if head is not None and head.ndim == 2 else 0
