"""FocalNet models on top of the `focalnet_kernels` fused focal-context kernel.

Public API: `create_model`, `list_models`, `FocalNet`, `load_checkpoint`, `convert_state_dict`,
`detect_layout`. State dicts use the official microsoft/FocalNet layout; timm and Hugging Face
checkpoints are converted on load.
"""
from .checkpoint import (CheckpointMismatchError, LoadResult, convert_state_dict, detect_layout,  # noqa: F401
                         load_checkpoint, read_checkpoint)
from .model import FocalModulation, FocalNet, FocalNetBlock  # noqa: F401
from .registry import MODEL_CONFIGS, create_model, list_models, model_config  # noqa: F401

__all__ = ["create_model", "list_models", "model_config", "MODEL_CONFIGS", "FocalNet", "FocalNetBlock",
           "FocalModulation", "load_checkpoint", "read_checkpoint", "convert_state_dict", "detect_layout",
           "LoadResult", "CheckpointMismatchError"]
