"""AOTInductor lowering: each exported program becomes one ``.pt2`` package (CPU or CUDA).

Lowering-module protocol (see ``exporting.LOWERINGS``): ``check_available(settings)`` raises ``EngineFolderError``
when this backend cannot build for ``settings`` here (called before any long work), and
``lower(program, folder, name, settings)`` writes the artefacts of program ``name`` into ``folder`` and returns the
manifest entries of that program (at least ``"file"``, the artefact the runtime loads, relative to ``folder``).

AOTInductor packages are compiled without their weights (``package_constants_in_so=False``): ``build_engine``
writes the weights once, as the folder's sharded safetensors (``export/weights.py``), and the runtime loads them
and hands them to both packages (``load_constants(..., user_managed=True)``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch.export import ExportedProgram

from .engine_folder import BuildSettings


def check_available(settings: BuildSettings) -> None:
    """AOTInductor ships with torch: always available (a CUDA build needs a GPU, checked by the caller)."""


# Package metadata key holding the build settings (canonical JSON of ``dataclasses.asdict(settings)``): the limits
# the program was compiled for, kept inside the program; ``runtime.backends`` checks them against the manifest.
SETTINGS_METADATA_KEY = "minimax.build_settings"


def lower(program: ExportedProgram, folder: Path, name: str, settings: BuildSettings) -> dict[str, Any]:
    path = folder / f"{name}.pt2"
    built = json.dumps(dataclasses.asdict(settings), sort_keys=True, separators=(",", ":"), default=str)
    metadata = {SETTINGS_METADATA_KEY: built, "minimax.program": name}
    # Compiled without its constants: the weights are the folder's (``export/weights.py``), given to the package at
    # load with ``load_constants`` (one copy on the device for both programs; the package holds code only).
    torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs={
        "aot_inductor.metadata": metadata, "aot_inductor.package_constants_in_so": False})
    return {"file": path.name, "constants": "weights"}
