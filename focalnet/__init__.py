"""FocalNet models on top of the `focalnet_kernels` fused focal-context kernel.

Public API: `create_model`, `list_models`, `FocalNet`, `load_checkpoint`, `read_checkpoint`,
`verify_checkpoint`, `convert_state_dict`, `detect_layout`, `CheckpointError`. State dicts use the
official microsoft/FocalNet layout; timm and Hugging Face checkpoints are converted on load.
"""
from .checkpoint import (CheckpointError, CheckpointMismatchError, LoadResult, convert_state_dict,  # noqa: F401
                         detect_layout, load_checkpoint, read_checkpoint, verify_checkpoint)
from .hub import PRETRAINED_TAGS, PretrainedNotFoundError  # noqa: F401
from .model import FocalModulation, FocalNet, FocalNetBlock  # noqa: F401
from .registry import MODEL_CONFIGS, create_model, list_models, model_config  # noqa: F401

__all__ = ["create_model", "list_models", "model_config", "MODEL_CONFIGS", "FocalNet", "FocalNetBlock",
           "FocalModulation", "load_checkpoint", "read_checkpoint", "convert_state_dict", "detect_layout",
           "verify_checkpoint", "LoadResult", "CheckpointError", "CheckpointMismatchError", "PRETRAINED_TAGS",
           "PretrainedNotFoundError"]
