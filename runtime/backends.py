"""Loading the compiled programs of an engine folder, one loader per backend.

A loader is ``load_programs(folder, manifest, device) -> {"prefill": fn, "decode": fn}`` (and a VL engine's
``"vision": fn(pixel_values, feature_index) -> image_features``) with

    fn(input_ids [B, T] int64, positions [B] int64, block_table [B, M] int32, state: list[Tensor])
        -> (logits [B, 1, V] fp32, list[Tensor])

(a VL prefill takes ``image_embeds`` after the state; an engine built with ``--mixed-step`` has ``"mixed"``, called
as ``export.exporting.MixedProgram``) state tensors in the manifest's ``state_layout`` order, every input contiguous and on ``device`` (the engine-folder
contract, ``export/engine_folder.py``). The returned list is the state after the step: the input tensors
themselves for in-place programs (AOTInductor, eager), new tensors for functional ones (TensorRT). ``BACKEND_LOADERS`` maps a manifest's ``backend`` to its loader, given as
a callable or as ``"module:function"``, imported only when an engine of that backend is loaded (so TensorRT is
needed only by TensorRT engines).
"""

from __future__ import annotations

import importlib
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch

from export.engine_folder import EngineFolderError, program_names

logger = logging.getLogger(__name__)

__all__ = ["BACKEND_LOADERS", "InPlaceProgram", "Program", "load_programs", "load_aoti_programs"]

Program = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, list], tuple]


class InPlaceProgram:
    """A program that updates its state inputs in place and returns the logits (an AOTInductor package, or the
    eager ``PrefillProgram`` / ``DecodeProgram``), behind the runtime protocol: returns ``(logits, state)``."""

    def __init__(self, fn: Callable, name: str = ""):
        self.fn, self.name = fn, name

    def __call__(self, input_ids, positions, block_table, state: list, *extra) -> tuple:
        return self.fn(input_ids, positions, block_table, state, *extra), state


def load_aoti_programs(folder: Path, manifest: dict[str, Any], device: torch.device) -> dict[str, Program]:
    """AOTInductor packages (``prefill.pt2`` / ``decode.pt2``), loaded with ``torch._inductor.aoti_load_package``,
    and the folder's weights (``export/weights.py``: sharded safetensors, checked tensor by tensor), loaded once on
    ``device`` and given to both packages as their constants (``load_constants(user_managed=True)``: no copy).

    Loaded single-threaded (the runtime calls from one thread; this is also what lets a CUDA graph capture the
    call). On the project's H100 image Python must start with ``LD_PRELOAD=/lib/x86_64-linux-gnu/libstdc++.so.6``.
    """
    from export.weights import load_weights, program_constants

    programs = {}
    device_index = device.index if device.type == "cuda" and device.index is not None else -1
    # one copy, shared by both programs; each shard hashed as it is read (read_manifest left them to the loader)
    digests = {s: manifest["files"].get(s, "") for s in manifest["weights"]["shards"]}
    weights = load_weights(folder, manifest["weights"], device, digests=digests)
    if "layer_plan" in manifest:
        return _load_layered(folder, manifest, weights, device_index)
    for name in program_names(manifest):
        path = Path(folder) / manifest["programs"][name]["file"]
        start = time.perf_counter()
        package = _load_package(path, device_index)
        loaded = time.perf_counter()
        check_aoti_settings(path, package, manifest)
        try:
            package.load_constants(program_constants(package.get_constant_fqns(), weights, str(path)),
                                   check_full_update=True, user_managed=True)
        except RuntimeError as e:
            raise EngineFolderError(f"{path}: the folder's weights do not fit the program ({e})"[:600]) from e
        # vision and mixed are called with their own signatures (``export.exporting.VisionProgram``, ``MixedProgram``)
        programs[name] = package if name in ("vision", "mixed") else InPlaceProgram(package, name)
        logger.info("loaded %s (AOTInductor, %s): package %.1fs, constants %.1fs", path, device, loaded - start,
                    time.perf_counter() - loaded)
    return programs


def _load_package(path: Path, device_index: int):
    try:
        return torch._inductor.aoti_load_package(str(path), run_single_threaded=True, device_index=device_index)
    except RuntimeError as e:
        raise EngineFolderError(f"{path}: cannot load the AOTInductor package ({e})"[:600]) from e


def _load_layered(folder: Path, manifest: dict[str, Any], weights: dict, device_index: int) -> dict[str, Program]:
    """An engine of per-kind layer programs (``build.py --layer-programs``): each part package (no constants: the
    layers' tensors are its inputs), composed into prefill / decode by ``runtime.layered.LayeredProgram``."""
    from model.config import MiniMaxConfig

    from .layered import LayeredProgram

    config = MiniMaxConfig.from_dict(manifest["model_config"])
    programs = {}
    for name in program_names(manifest):
        parts = {}
        for kind, rel in manifest["programs"][name]["layer_programs"].items():
            path = Path(folder) / rel
            start = time.perf_counter()
            parts[kind] = package = _load_package(path, device_index)
            check_aoti_settings(path, package, manifest)
            if package.get_constant_fqns():
                raise EngineFolderError(f"{path}: a layer program takes its weights as inputs, but this package "
                                        f"has constants ({', '.join(package.get_constant_fqns()[:3])} ...)")
            logger.info("loaded %s (AOTInductor layer program, %s) in %.1fs", path, kind, time.perf_counter() - start)
        try:
            programs[name] = LayeredProgram(parts, weights, manifest["layer_plan"], config, name)
        except (KeyError, ValueError) as e:
            raise EngineFolderError(f"{folder}: {e}") from e
    return programs


def check_aoti_settings(path: Path, package: Any, manifest: dict[str, Any]) -> None:
    """The build settings compiled into the package (its metadata) must be the manifest's: backend, device, dtype
    and every profile the settings have (max_batch, max_input_len, max_seq_len, ...). A manifest that claims other
    limits than the program was built for is refused."""
    import json

    from export.aoti_lowering import SETTINGS_METADATA_KEY

    try:
        built = json.loads(package.get_metadata()[SETTINGS_METADATA_KEY])
        if not isinstance(built, dict):
            raise TypeError(type(built).__name__)
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise EngineFolderError(f"{path}: the package carries no build settings ({type(e).__name__}: {e}); "
                                "it was not built by this version of build.py: rebuild the engine") from e
    claimed = {"backend": manifest["backend"], "device": manifest["device"], "dtype": manifest["dtype"],
               **manifest["profiles"], "page_size": manifest["paged_kv"]["page_size"],
               "num_pages": manifest["paged_kv"]["num_pages"]}
    differ = [f"{k}: manifest {claimed[k]!r}, program {v!r}" for k, v in sorted(built.items())
              if k in claimed and claimed[k] != v]
    if differ:
        raise EngineFolderError(f"{path}: the manifest does not describe the program it names ({'; '.join(differ)}); "
                                "the manifest was edited or the file replaced: rebuild the engine")


def _refuse_onnx(folder: Path, manifest: dict[str, Any], device: torch.device) -> dict[str, Program]:
    raise EngineFolderError(
        f"{folder}: an 'onnx' engine folder holds ONNX models, which are inputs for trtexec / TensorRT "
        "(build.py --backend tensorrt), not programs this runtime runs; build an 'aoti' or 'tensorrt' engine"
    )


BACKEND_LOADERS: dict[str, Callable[..., dict[str, Program]] | str] = {
    "aoti": load_aoti_programs,
    "tensorrt": "runtime.tensorrt:load_programs",
    "onnx": _refuse_onnx,
}


def _resolve(backend: str, folder: Path) -> Callable[..., dict[str, Program]]:
    if backend not in BACKEND_LOADERS:
        raise EngineFolderError(f"{folder}: backend {backend!r} has no loader; known: {', '.join(BACKEND_LOADERS)}")
    loader = BACKEND_LOADERS[backend]
    if callable(loader):
        return loader
    module_name, _, function = loader.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:  # the module itself, or tensorrt under it, is missing
        raise EngineFolderError(
            f"{folder}: a {backend!r} engine needs {module_name} and its dependencies, which cannot be imported "
            f"here ({type(e).__name__}: {e})"
        ) from e
    if not hasattr(module, function):
        raise EngineFolderError(f"{folder}: {module_name} has no {function}(); cannot load a {backend!r} engine")
    return getattr(module, function)


def load_programs(folder: str | Path, manifest: dict[str, Any], device: torch.device) -> dict[str, Program]:
    """The ``{"prefill": fn, "decode": fn}`` of the engine in ``folder`` (manifest already validated)."""
    folder = Path(folder)
    programs = _resolve(manifest["backend"], folder)(folder, manifest, device)
    missing = set(program_names(manifest)) - set(programs)
    if missing:
        raise EngineFolderError(f"{folder}: the {manifest['backend']!r} loader gave no {sorted(missing)} program")
    return programs
