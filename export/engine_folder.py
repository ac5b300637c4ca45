"""The engine-folder contract: the one place that defines what ``export/`` writes and ``runtime/`` reads.

An engine folder holds the compiled artefacts of two programs, ``prefill`` and ``decode``, the exported programs
they were lowered from (``exported/*.pt2``, the single source of every lowering) and ``manifest.json``:

    format_version   int, FORMAT_VERSION; a reader refuses any other
    backend          "aoti" | "tensorrt" | "onnx"
    device           "cpu" | "cuda"
    dtype            weights / KV-cache dtype ("float32", "bfloat16", "float16")
    model_config     MiniMaxConfig.to_dict()
    profiles         {"max_batch", "max_input_len", "max_seq_len"}: batch in [1, max_batch], prefill chunk length
                     in [2, max_input_len], context (KV cache) length max_seq_len
    state_layout     config.state_layout(batch "B", max_seq_len) entries: name, layer, shape (batch as "B"), dtype
    programs         {"prefill"|"decode": {"file", "inputs": [{name, shape, dtype}], "outputs": [...]}}
    versions         torch / triton / tensorrt / onnx versions that built the folder
    weights_sha256   hash of the weights (names, shapes, dtypes and bytes) the engines were built from
    files            {relative path: sha256} of every artefact, checked on load

Program signatures (tensor names are the same for every backend):
    prefill(input_ids [B, T] int64, positions [B] int64, *state) -> (logits [B, 1, V] fp32, *state_out)
    decode (input_ids [B, 1] int64, positions [B] int64, *state) -> (logits [B, 1, V] fp32, *state_out)
``positions[b]`` is the position of the first token of row b; prefill returns the logits of the last position only.
Every input must be contiguous: AOTInductor compiles for the example inputs' (contiguous) strides and does not
check them, so a strided view (e.g. ``ids[:, :n]`` of a wider batch) gives wrong results silently.
The folder is written under a temporary name beside its destination and renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
BACKENDS = ("aoti", "tensorrt", "onnx")
PROGRAMS = ("prefill", "decode")


class EngineFolderError(ValueError):
    """An engine folder that cannot be used; the message names the folder and the problem."""


@dataclass(frozen=True)
class BuildSettings:
    """What an engine is built for. ``validate`` refuses impossible combinations before any work starts."""

    backend: str = "aoti"
    device: str = "cpu"
    dtype: str = "float32"
    max_batch: int = 4
    max_input_len: int = 64
    max_seq_len: int = 128

    def validate(self, max_position_embeddings: int | None = None) -> None:
        if self.backend not in BACKENDS:
            raise EngineFolderError(f"backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.device not in ("cpu", "cuda"):
            raise EngineFolderError(f"device {self.device!r} is not 'cpu' or 'cuda'")
        if self.dtype not in DTYPES:
            raise EngineFolderError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.max_batch < 1:
            raise EngineFolderError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_input_len < 2:
            raise EngineFolderError(f"max_input_len must be >= 2 (one-token prompts go through decode), got {self.max_input_len}")
        if self.max_seq_len < self.max_input_len:
            raise EngineFolderError(f"max_seq_len ({self.max_seq_len}) must be >= max_input_len ({self.max_input_len})")
        if max_position_embeddings is not None and self.max_seq_len > max_position_embeddings:
            raise EngineFolderError(
                f"max_seq_len ({self.max_seq_len}) exceeds the model's max_position_embeddings ({max_position_embeddings})"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def program_io(config_dict: dict[str, Any], state_layout: list[dict[str, Any]], program: str) -> dict[str, list]:
    """Input and output tensor descriptions of ``program`` ("B", "T" are the dynamic dims)."""
    seq = "T" if program == "prefill" else 1
    inputs = [
        {"name": "input_ids", "shape": ["B", seq], "dtype": "int64"},
        {"name": "positions", "shape": ["B"], "dtype": "int64"},
    ] + [{"name": e["name"], "shape": e["shape"], "dtype": e["dtype"]} for e in state_layout]
    outputs = [{"name": "logits", "shape": ["B", 1, config_dict["vocab_size"]], "dtype": "float32"}] + [
        {"name": e["name"] + ".out", "shape": e["shape"], "dtype": e["dtype"]} for e in state_layout
    ]
    return {"inputs": inputs, "outputs": outputs}


def symbolic_state_layout(config, settings: BuildSettings) -> list[dict[str, Any]]:
    layout = config.state_layout(batch_size=1, max_seq_len=settings.max_seq_len, dtype=settings.dtype)
    for entry in layout:
        entry["shape"][0] = "B"
    return layout


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_sha256(module: torch.nn.Module) -> str:
    """Hash of every parameter and buffer: name, shape, dtype and bytes (in state_dict order)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{list(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@contextmanager
def staged_folder(destination: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``destination``; on success rename it into place, on failure delete it.

    A failed build therefore leaves nothing that looks like an engine. An existing destination is refused unless
    ``overwrite``, in which case it is replaced only after the new folder is complete.
    """
    destination = Path(destination).resolve()
    if destination.exists() and not overwrite:
        raise EngineFolderError(f"{destination} already exists (pass overwrite to replace it)")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.building-", dir=destination.parent))
    try:
        yield staging
        if destination.exists():
            old = destination.with_name(f".{destination.name}.old-{os.getpid()}")
            destination.rename(old)
            staging.rename(destination)
            shutil.rmtree(old)
        else:
            staging.rename(destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_manifest(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash every file already in ``folder`` into the manifest, write ``manifest.json`` last and return it."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    manifest = dict(manifest, files={str(p.relative_to(folder)): sha256_file(p) for p in files})
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(folder: str | Path, verify_files: bool = True) -> dict[str, Any]:
    """Read and validate ``manifest.json``: version, backend, programs, and (optionally) every file's hash."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise EngineFolderError(f"{folder}: no {MANIFEST_NAME}: not an engine folder (or an incomplete build)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EngineFolderError(f"{path}: not valid JSON ({e})") from e
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise EngineFolderError(
            f"{path}: engine format version {version!r}, this code reads version {FORMAT_VERSION}; rebuild the engine"
        )
    for key in ("backend", "device", "dtype", "model_config", "profiles", "state_layout", "programs", "files"):
        if key not in manifest:
            raise EngineFolderError(f"{path}: missing field {key!r}")
    if manifest["backend"] not in BACKENDS:
        raise EngineFolderError(f"{path}: unknown backend {manifest['backend']!r}")
    for program in PROGRAMS:
        if program not in manifest["programs"]:
            raise EngineFolderError(f"{path}: no {program!r} program")
    for rel, digest in manifest["files"].items():
        file = folder / rel
        if not file.is_file():
            raise EngineFolderError(f"{folder}: file {rel} listed in the manifest is missing")
        if verify_files and sha256_file(file) != digest:
            raise EngineFolderError(f"{folder}: file {rel} does not match its hash in the manifest (modified or corrupt)")
    return manifest
