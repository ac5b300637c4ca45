"""MiniMax-Text-01 in PyTorch: config, model with explicit-state entry points, checkpoint loading."""

from .config import ConfigError, MiniMaxConfig, PRESETS
from .image_processing import MiniMaxVLImageProcessor
from .loading import CheckpointError
from .modeling import MiniMaxForCausalLM
from .state import MiniMaxState

__all__ = ["MiniMaxConfig", "MiniMaxForCausalLM", "MiniMaxState", "ConfigError", "CheckpointError", "PRESETS",
           "MiniMaxVLImageProcessor"]
