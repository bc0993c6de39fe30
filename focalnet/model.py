"""FocalNet (Focal Modulation Networks, Yang et al. 2022) with an optional fused focal-context stage.

Numerically this is the official microsoft/FocalNet classification model (same op order, same
dropout / stochastic-depth semantics and random-number consumption), with these additions:

* tokens are kept channels-last (B, H, W, C) inside the blocks;
* any input size: H and W are zero-padded on the right/bottom up to a multiple of the patch size
  before the stem (4) and before every downsample (2), as the official detection backbone and
  Hugging Face transformers do; for inputs that are already multiples nothing changes;
* ``use_fused=True`` routes the focal-context stage (depthwise convs, GELUs, gating, global
  context, normalisation) through ``focalnet_kernels.focal_context``, and the block's projections
  (f, h, proj, and the MLP with GELU as fc1's epilogue) through ``focalnet_kernels.linear``
  (oneDNN for CPU inference, F.linear otherwise);
* ``features_only=True`` turns the model into a dense backbone (see :class:`FocalNet`).

The state-dict layout is the official one (``patch_embed``, ``layers.i.blocks.j``,
``layers.i.downsample`` at the END of stage i, ``norm``, ``head``).
"""
from __future__ import annotations

import collections.abc
import math
import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as torch_checkpoint
from torch import Tensor

import focalnet_kernels

__all__ = ["FocalNet", "FocalModulation", "FocalNetBlock", "FocalNetStage", "PatchEmbed", "DropPath", "Mlp"]


def drop_path(x: Tensor, drop_prob: float = 0.0, training: bool = False) -> Tensor:
    """Stochastic depth per sample: each sample's residual branch is kept with prob 1 - drop_prob.

    Same formulation as the timm version used by the official code (and by Hugging Face):
    ``x / keep * floor(keep + U[0,1))`` with one uniform draw per sample.
    """
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = torch.floor(keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device))
    return x.div(keep_prob) * mask


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout (on channels-last tokens). With use_fused the two
    projections go through ``focalnet_kernels.mlp_gelu`` (GELU as fc1's epilogue; in training the
    GELU output is recomputed in the backward instead of saved), or, with an active inner dropout,
    two ``focalnet_kernels.linear`` calls."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0, use_fused: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)
        self.use_fused = bool(use_fused)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_fused and not (self.training and self.drop.p > 0):
            return self.drop(focalnet_kernels.mlp_gelu(x, self.fc1.weight, self.fc1.bias, self.fc2.weight,
                                                       self.fc2.bias))
        if self.use_fused:
            h = focalnet_kernels.linear(x, self.fc1.weight, self.fc1.bias, activation="gelu")
            return self.drop(focalnet_kernels.linear(self.drop(h), self.fc2.weight, self.fc2.bias))
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class FocalModulation(nn.Module):
    """Focal modulation on channels-last tokens x: (B, H, W, C) -> (B, H, W, C).

    Parameters (official names): ``f`` Linear C -> 2C + L + 1; ``focal_layers[l]`` =
    Sequential(depthwise Conv2d k_l x k_l without bias, GELU), k_l = focal_factor * l + focal_window;
    ``h`` 1x1 Conv2d C -> C; ``ln`` (only with use_postln_in_modulation); ``proj`` Linear C -> C.
    """

    def __init__(self, dim: int, focal_window: int, focal_level: int, focal_factor: int = 2,
                 bias: bool = True, proj_drop: float = 0.0, use_postln_in_modulation: bool = False,
                 normalize_modulator: bool = False, use_fused: bool = False):
        super().__init__()
        dim = _check_int("dim", dim, 1)
        focal_window = _check_window("focal_window", focal_window)
        focal_level = _check_level("focal_level", focal_level)
        focal_factor = _check_factor("focal_factor", focal_factor)
        proj_drop = _check_prob("proj_drop", proj_drop)
        bias, use_postln_in_modulation, normalize_modulator, use_fused = _check_bools(
            bias=bias, use_postln_in_modulation=use_postln_in_modulation, normalize_modulator=normalize_modulator,
            use_fused=use_fused)
        self.dim = dim
        self.focal_window = focal_window
        self.focal_level = focal_level
        self.focal_factor = focal_factor
        self.use_postln_in_modulation = use_postln_in_modulation
        self.normalize_modulator = normalize_modulator
        self.use_fused = bool(use_fused)

        self.f = nn.Linear(dim, 2 * dim + focal_level + 1, bias=bias)
        self.h = nn.Conv2d(dim, dim, kernel_size=1, stride=1, bias=bias)
        self.act = nn.GELU()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.kernel_sizes = [focal_factor * k + focal_window for k in range(focal_level)]
        self.focal_layers = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, dim, kernel_size=k, stride=1, groups=dim, padding=k // 2, bias=False),
                          nn.GELU())
            for k in self.kernel_sizes)
        if use_postln_in_modulation:
            self.ln = nn.LayerNorm(dim)

    def _context_eager(self, y: Tensor) -> Tensor:
        """Official formulation, channels-first; returns q * modulator as (B, H, W, C)."""
        C, L = self.dim, self.focal_level
        y = y.permute(0, 3, 1, 2).contiguous()
        q, ctx, gates = torch.split(y, (C, C, L + 1), 1)
        ctx_all = 0
        for level in range(L):
            ctx = self.focal_layers[level](ctx)
            ctx_all = ctx_all + ctx * gates[:, level:level + 1]
        ctx_global = self.act(ctx.mean(2, keepdim=True).mean(3, keepdim=True))
        ctx_all = ctx_all + ctx_global * gates[:, L:]
        if self.normalize_modulator:
            ctx_all = ctx_all / (L + 1)
        out = q * self.h(ctx_all)
        return out.permute(0, 2, 3, 1).contiguous()

    def _context_fused(self, y: Tensor, proj: bool = False) -> Tensor:
        """Fused focal modulation from the f output (channels-last throughout): q * modulator, and
        proj applied to it when `proj` (``focalnet_kernels.focal_modulation``)."""
        C = self.dim
        return focalnet_kernels.focal_modulation(
            y, [layer[0].weight for layer in self.focal_layers], self.h.weight.reshape(C, C), self.h.bias,
            self.proj.weight if proj else None, self.proj.bias if proj else None,
            normalize=self.normalize_modulator)

    def forward(self, x: Tensor) -> Tensor:
        if not self.use_fused:
            out = self._context_eager(self.f(x))
            if self.use_postln_in_modulation:
                out = self.ln(out)
            return self.proj_drop(self.proj(out))
        y = focalnet_kernels.linear(x, self.f.weight, self.f.bias)
        if not self.use_postln_in_modulation:
            return self.proj_drop(self._context_fused(y, proj=True))
        out = self.ln(self._context_fused(y))
        return self.proj_drop(focalnet_kernels.linear(out, self.proj.weight, self.proj.bias))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, kernel_sizes={self.kernel_sizes}, normalize_modulator={self.normalize_modulator}, "
                f"use_fused={self.use_fused}")


class FocalNetBlock(nn.Module):
    """Pre-norm (or, with use_postln, post-norm) FocalNet block on (B, H, W, C) tokens."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop: float = 0.0, drop_path: float = 0.0,
                 focal_level: int = 2, focal_window: int = 3, focal_factor: int = 2,
                 use_layerscale: bool = False, layerscale_value: float = 1e-4, use_postln: bool = False,
                 use_postln_in_modulation: bool = False, normalize_modulator: bool = False,
                 use_fused: bool = False):
        super().__init__()
        dim = _check_int("dim", dim, 1)  # the modulation checks the focal arguments and its flags
        mlp_ratio = _check_mlp_ratio("mlp_ratio", mlp_ratio, dim)
        drop, drop_path = _check_prob("drop", drop), _check_prob("drop_path", drop_path)
        use_layerscale, use_postln = _check_bools(use_layerscale=use_layerscale, use_postln=use_postln)
        layerscale_value = _check_finite("layerscale_value", layerscale_value)
        self.dim = dim
        self.use_postln = use_postln
        self.norm1 = nn.LayerNorm(dim)
        self.modulation = FocalModulation(
            dim, focal_window=focal_window, focal_level=focal_level, focal_factor=focal_factor,
            proj_drop=drop, use_postln_in_modulation=use_postln_in_modulation,
            normalize_modulator=normalize_modulator, use_fused=use_fused)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop, use_fused=use_fused)
        self.use_layerscale = use_layerscale
        if use_layerscale:
            self.gamma_1 = nn.Parameter(layerscale_value * torch.ones(dim))
            self.gamma_2 = nn.Parameter(layerscale_value * torch.ones(dim))
        else:
            self.gamma_1 = 1.0
            self.gamma_2 = 1.0

    def forward(self, x: Tensor) -> Tensor:
        if self.use_postln:
            y = self.norm1(self.modulation(x))
        else:
            y = self.modulation(self.norm1(x))
        if self.use_layerscale:  # without layerscale gamma is the constant 1.0 (exact no-op)
            y = self.gamma_1 * y
        x = x + self.drop_path(y)
        if self.use_postln:
            y = self.norm2(self.mlp(x))
        else:
            y = self.mlp(self.norm2(x))
        if self.use_layerscale:
            y = self.gamma_2 * y
        return x + self.drop_path(y)


def _pad_to_multiple_nchw(x: Tensor, multiple: int) -> Tensor:
    H, W = x.shape[-2:]
    ph, pw = (-H) % multiple, (-W) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    return x


class PatchEmbed(nn.Module):
    """Stem (patch 4) or downsample (patch 2): pad to a multiple of the patch, conv, LayerNorm.

    Input NCHW, output channels-last (B, H', W', C_out). use_conv_embed: 7x7 s4 p2 (stem) or
    3x3 s2 p1 (downsample) overlapping convolutions, as in the official classification code.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, use_conv_embed: bool = False,
                 is_stem: bool = False):
        super().__init__()
        use_conv_embed, is_stem = _check_bools(use_conv_embed=use_conv_embed, is_stem=is_stem)
        patch_size = _check_patch_size(patch_size, use_conv_embed, is_stem)
        in_chans, embed_dim = _check_int("in_chans", in_chans, 1), _check_int("embed_dim", embed_dim, 1)
        self.patch_size = patch_size
        if use_conv_embed:
            kernel_size, padding, stride = (7, 2, 4) if is_stem else (3, 1, 2)
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel_size, stride=stride, padding=padding)
        else:
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(_pad_to_multiple_nchw(x, self.patch_size))
        return self.norm(x.permute(0, 2, 3, 1))


class FocalNetStage(nn.Module):
    """Blocks of one stage, then (except for the last stage) the 2x downsample."""

    def __init__(self, dim: int, out_dim: Optional[int], depth: int, drop_path: Sequence[float],
                 use_conv_embed: bool = False, use_checkpoint: bool = False, **block_kwargs):
        super().__init__()
        dim, depth = _check_int("dim", dim, 1), _check_int("depth", depth, 1)
        out_dim = None if out_dim is None else _check_int("out_dim", out_dim, 1, " or None (last stage)")
        drop_path = _check_sequence("drop_path", drop_path, "rates, one per block")
        if len(drop_path) != depth:
            raise ValueError(f"drop_path needs one rate per block ({depth}), got {len(drop_path)}: {drop_path}")
        use_conv_embed, use_checkpoint = _check_bools(use_conv_embed=use_conv_embed, use_checkpoint=use_checkpoint)
        self.dim = dim
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(FocalNetBlock(dim, drop_path=drop_path[i], **block_kwargs) for i in range(depth))
        self.downsample = (PatchEmbed(2, dim, out_dim, use_conv_embed=use_conv_embed, is_stem=False)
                           if out_dim is not None else None)

    def _run_blocks(self, x: Tensor) -> Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """x: (B, H, W, C). Returns (output before downsample, output after downsample)."""
        if self.use_checkpoint and torch.is_grad_enabled() and len(self.blocks) > 0:
            x = torch_checkpoint.checkpoint(self._run_blocks, x, use_reentrant=False)
        else:
            x = self._run_blocks(x)
        if self.downsample is None:
            return x, x
        return x, self.downsample(x.permute(0, 3, 1, 2))


# ----- argument validation ---------------------------------------------------------------------
# Every constructor checks its arguments before it builds anything: TypeError for a wrong type,
# ValueError for a wrong value, the message naming the argument and what it takes. Ints are
# numbers.Integral (numpy ints too) but not bool; bools are bool or numpy.bool_ only (a string such
# as "no" or an int is refused, never read as truthy); values are stored as plain Python values.
try:
    import numpy as _np
    _BOOLS: tuple = (bool, _np.bool_)
except ImportError:  # pragma: no cover - numpy is optional for torch
    _BOOLS = (bool,)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, _BOOLS)


def _check_int(name: str, value, minimum: int, why: str = "") -> int:
    expected = f"an int >= {minimum}{why}"
    if not _is_int(value):
        raise TypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be {expected}, got {value}")
    return int(value)


def _check_real(name: str, value, expected: str, ok) -> float:
    """A real number (not bool) for which ok(float(value)) holds."""
    if not isinstance(value, numbers.Real) or isinstance(value, _BOOLS):
        raise TypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")
    if not ok(float(value)):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return float(value)


def _check_prob(name: str, value) -> float:
    return _check_real(name, value, "a real number in [0, 1)", lambda v: 0.0 <= v < 1.0)


def _check_finite(name: str, value) -> float:
    return _check_real(name, value, "a finite real number", math.isfinite)


def _check_mlp_ratio(name: str, value, dim: int) -> float:
    return _check_real(name, value, f"a finite real > 0 with int({dim} * {name}) >= 1 (the MLP's hidden width)",
                       lambda v: math.isfinite(v) and int(dim * v) >= 1)


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, _BOOLS):
        raise TypeError(f"{name} must be a bool (True or False), got {value!r} ({type(value).__name__})")
    return bool(value)


def _check_bools(**flags) -> Tuple[bool, ...]:
    """_check_bool of every keyword argument, in order."""
    return tuple(_check_bool(name, value) for name, value in flags.items())


def _check_level(name: str, value) -> int:
    return _check_int(name, value, 1)


def _check_window(name: str, value) -> int:
    value = _check_int(name, value, 1, " and odd")
    if value % 2 == 0:
        raise ValueError(f"{name} must be an odd int >= 1 (a depthwise kernel k = focal_factor * level + "
                         f"focal_window keeps the map size with its padding k // 2 only when k is odd), got {value}")
    return value


def _check_factor(name: str, value) -> int:
    value = _check_int(name, value, 0, " and even")
    if value % 2:
        raise ValueError(f"{name} must be an even int >= 0 (the kernel sizes focal_factor * level + focal_window "
                         f"must stay odd at every level; the official models use 2), got {value}")
    return value


def _check_patch_size(patch_size, use_conv_embed: bool, is_stem: bool) -> int:
    patch_size = _check_int("patch_size", patch_size, 1)
    conv_patch = 4 if is_stem else 2
    if use_conv_embed and patch_size != conv_patch:
        raise ValueError(f"patch_size must be {conv_patch} with use_conv_embed=True (the overlapping "
                         f"{'7x7 stride-4 stem' if is_stem else '3x3 stride-2 downsample'}), got {patch_size}")
    return patch_size


def _check_sequence(name: str, value, what: str) -> list:
    if isinstance(value, (str, bytes)) or not isinstance(value, collections.abc.Sequence):
        raise TypeError(f"{name} must be a sequence (list or tuple) of {what}, got {value!r} ({type(value).__name__})")
    return list(value)


def _check_depths(depths) -> List[int]:
    depths = _check_sequence("depths", depths, "ints >= 1, the blocks of each stage")
    if not depths:
        raise ValueError("depths must be a non-empty sequence of ints >= 1 (the blocks of each stage), got "
                         f"{depths!r}")
    return [_check_int(f"depths[{i}]", d, 1, " (a stage without blocks is not supported)")
            for i, d in enumerate(depths)]


def _per_stage(value, n: int, name: str, check) -> list:
    """An int for every stage, or a sequence of one value per stage; check(name, v) validates each."""
    if _is_int(value):
        return [check(name, value)] * n
    value = _check_sequence(name, value, "ints, one per stage (or a single int for all)")
    if len(value) != n:
        raise ValueError(f"{name} needs one value per stage ({n}, as many as depths), got {len(value)}: {value}")
    return [check(f"{name}[{i}]", v) for i, v in enumerate(value)]


def _check_out_indices(out_indices, n: int, features_only: bool) -> Tuple[int, ...]:
    """Stage indices (checked for type always, for value with features_only), sorted: the maps come
    out in stage order."""
    if out_indices is None:
        return tuple(range(n)) if features_only else ()
    out_indices = _check_sequence("out_indices", out_indices, "stage indices (ints) or None (every stage)")
    for i, v in enumerate(out_indices):
        if not _is_int(v):
            raise TypeError(f"out_indices[{i}] must be an int stage index, got {v!r} ({type(v).__name__})")
    if not features_only:
        return ()
    idx = [int(i) for i in out_indices]
    if not idx or not all(0 <= i < n for i in idx) or len(set(idx)) != len(idx):
        raise ValueError(f"out_indices must be a non-empty subset of 0..{n - 1} without repeats, "
                         f"got {tuple(idx)}")
    return tuple(sorted(idx))


class FocalNet(nn.Module):
    """Focal Modulation Network.

    Args:
        in_chans, num_classes (0: no head, ``head`` is nn.Identity), embed_dim (stage 0 width; doubles
        per stage), depths, mlp_ratio, drop_rate (dropout after the stem and in every block),
        drop_path_rate (linear stochastic-depth rule over all blocks), focal_levels / focal_windows (an
        int or one per stage), focal_factor, use_conv_embed, use_layerscale, layerscale_value,
        use_postln, use_postln_in_modulation, normalize_modulator, use_fused (focal-context stage via
        focalnet_kernels.focal_context), use_checkpoint (per-stage non-reentrant activation checkpointing).
        features_only: the model becomes a dense backbone, like the official detection backbone: no
        final ``norm`` / ``head``; for every stage i in ``out_indices`` a LayerNorm ``norm{i}`` is applied
        to the output of stage i *before* its downsample, and ``forward`` returns the list of these maps
        as NCHW tensors (strides 4, 8, 16, 32 of the padded input), in stage order (out_indices: None
        means every stage).

    Every argument is checked before anything is built: a wrong type raises TypeError, a wrong value
    ValueError, naming the argument. Ints are ints (numpy ints too, not bools) and flags bools (or
    numpy.bool_; not strings or ints). depths: a non-empty sequence of ints >= 1 (a stage without
    blocks is refused: no official model has one); focal_windows: odd ints >= 1 and focal_factor an
    even int >= 0, so that every kernel size focal_factor * level + focal_window is odd (an even one
    would change the map size under the 'same' padding k // 2); mlp_ratio: a finite real with
    int(embed_dim * mlp_ratio) >= 1; drop_rate, drop_path_rate in [0, 1); layerscale_value finite;
    patch_size an int >= 1 (4 with use_conv_embed, whose stem is the official 7x7 stride-4 conv).
    Kernel sizes above the fused kernels' 15 are valid: the fused path runs them on the reference
    (warning once).
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, embed_dim: int = 96,
                 depths: Sequence[int] = (2, 2, 6, 2), mlp_ratio: float = 4.0, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, focal_levels: Union[int, Sequence[int]] = 2,
                 focal_windows: Union[int, Sequence[int]] = 3, focal_factor: int = 2,
                 use_conv_embed: bool = False, use_layerscale: bool = False, layerscale_value: float = 1e-4,
                 use_postln: bool = False, use_postln_in_modulation: bool = False,
                 normalize_modulator: bool = False, use_fused: bool = False, use_checkpoint: bool = False,
                 features_only: bool = False, out_indices: Optional[Sequence[int]] = None, patch_size: int = 4):
        super().__init__()
        # every argument is checked before anything is built (see "argument validation" above)
        depths = _check_depths(depths)
        n = len(depths)
        in_chans = _check_int("in_chans", in_chans, 1)
        num_classes = _check_int("num_classes", num_classes, 0, " (0: no head)")
        embed_dim = _check_int("embed_dim", embed_dim, 1)
        mlp_ratio = _check_mlp_ratio("mlp_ratio", mlp_ratio, embed_dim)  # stage 0 has the narrowest MLP
        drop_rate = _check_prob("drop_rate", drop_rate)
        drop_path_rate = _check_prob("drop_path_rate", drop_path_rate)
        focal_levels = _per_stage(focal_levels, n, "focal_levels", _check_level)
        focal_windows = _per_stage(focal_windows, n, "focal_windows", _check_window)
        focal_factor = _check_factor("focal_factor", focal_factor)
        layerscale_value = _check_finite("layerscale_value", layerscale_value)
        (use_conv_embed, use_layerscale, use_postln, use_postln_in_modulation, normalize_modulator, use_fused,
         use_checkpoint, features_only) = _check_bools(
            use_conv_embed=use_conv_embed, use_layerscale=use_layerscale, use_postln=use_postln,
            use_postln_in_modulation=use_postln_in_modulation, normalize_modulator=normalize_modulator,
            use_fused=use_fused, use_checkpoint=use_checkpoint, features_only=features_only)
        patch_size = _check_patch_size(patch_size, use_conv_embed, is_stem=True)
        out_indices = _check_out_indices(out_indices, n, features_only)

        self.num_layers = n
        self.embed_dims = [embed_dim * 2 ** i for i in range(n)]
        self.num_features = self.embed_dims[-1]
        self.num_classes = num_classes
        self.features_only = features_only

        self.patch_embed = PatchEmbed(patch_size, in_chans, self.embed_dims[0], use_conv_embed=use_conv_embed,
                                      is_stem=True)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [v.item() for v in torch.linspace(0, drop_path_rate, sum(depths), device="cpu")]
        self.layers = nn.ModuleList()
        for i in range(n):
            self.layers.append(FocalNetStage(
                self.embed_dims[i], self.embed_dims[i + 1] if i < n - 1 else None, depths[i],
                drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])], use_conv_embed=use_conv_embed,
                use_checkpoint=use_checkpoint, mlp_ratio=mlp_ratio, drop=drop_rate,
                focal_level=focal_levels[i], focal_window=focal_windows[i], focal_factor=focal_factor,
                use_layerscale=use_layerscale, layerscale_value=layerscale_value, use_postln=use_postln,
                use_postln_in_modulation=use_postln_in_modulation, normalize_modulator=normalize_modulator,
                use_fused=use_fused))

        if features_only:
            self.out_indices = out_indices
            for i in out_indices:
                self.add_module(f"norm{i}", nn.LayerNorm(self.embed_dims[i]))
            self.feature_info = [dict(num_chs=self.embed_dims[i], reduction=patch_size * 2 ** i,
                                      module=f"layers.{i}") for i in out_indices]
        else:
            self.out_indices = ()
            self.norm = nn.LayerNorm(self.num_features)
            self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # as official: Linear trunc-normal(0.02) with zero bias, LayerNorm (1, 0), convs PyTorch default
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ----- fused switch -------------------------------------------------------------------------
    def modulations(self) -> List[FocalModulation]:
        return [m for m in self.modules() if isinstance(m, FocalModulation)]

    def set_fused(self, flag: bool = True) -> "FocalNet":
        """Switch every FocalModulation (focal context on focal_context, projections on
        focalnet_kernels.linear) and every Mlp (linear with the GELU epilogue) together."""
        flag = _check_bool("flag", flag)
        for m in self.modules():
            if isinstance(m, (FocalModulation, Mlp)):
                m.use_fused = flag
        return self

    @property
    def use_fused(self) -> bool:
        """True when every FocalModulation uses the fused focal-context kernel."""
        mods = self.modulations()
        return bool(mods) and all(m.use_fused for m in mods)

    def set_grad_checkpointing(self, enable: bool = True) -> "FocalNet":
        enable = _check_bool("enable", enable)
        for layer in self.layers:
            layer.use_checkpoint = enable
        return self

    # ----- forward ------------------------------------------------------------------------------
    def forward_stages(self, x: Tensor) -> List[Tensor]:
        """Raw output of every stage before its downsample, channels-last (B, H_i, W_i, C_i)."""
        x = self.pos_drop(self.patch_embed(x))
        outs = []
        for layer in self.layers:
            before, x = layer(x)
            outs.append(before)
        return outs

    def forward_features(self, x: Tensor) -> Tensor:
        """Final normalised tokens (B, H/32, W/32, C) (not available with features_only)."""
        if self.features_only:
            raise RuntimeError("forward_features is not available with features_only=True; call forward")
        x = self.pos_drop(self.patch_embed(x))
        for layer in self.layers:
            _, x = layer(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.flatten(1, 2).mean(1)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor):
        if self.features_only:
            outs = []
            h = self.pos_drop(self.patch_embed(x))
            for i, layer in enumerate(self.layers):
                before, h = layer(h)
                if i in self.out_indices:
                    outs.append(getattr(self, f"norm{i}")(before).permute(0, 3, 1, 2).contiguous())
                if i >= max(self.out_indices):
                    break
            return outs
        return self.forward_head(self.forward_features(x))
