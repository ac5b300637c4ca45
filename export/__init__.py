"""torch.export of the model's prefill/decode, the engine-folder contract and the lowerings (AOTInductor, ONNX, TensorRT)."""

from .engine_folder import BuildSettings, EngineFolderError, read_manifest
from .exporting import build_engine, check_lowering, export_programs

__all__ = ["BuildSettings", "EngineFolderError", "read_manifest", "build_engine", "check_lowering", "export_programs"]
