"""MiniMax-Text-01 and MiniMax-VL-01 in PyTorch: configs, models with explicit-state entry points, checkpoint
loading, the VL image processor."""

from .config import ConfigError, MiniMaxConfig, PRESETS
from .image_processing import MiniMaxVLImageProcessor
from .loading import CheckpointError
from .modeling import MiniMaxForCausalLM
from .state import MiniMaxState
from .vl import MiniMaxVLConfig, MiniMaxVLForConditionalGeneration

__all__ = ["MiniMaxConfig", "MiniMaxForCausalLM", "MiniMaxState", "ConfigError", "CheckpointError", "PRESETS",
           "MiniMaxVLImageProcessor", "MiniMaxVLConfig", "MiniMaxVLForConditionalGeneration"]
