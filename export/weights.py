"""The weights of an engine folder, kept apart from its programs: sharded safetensors in the layout the kernels use.

    weights/weights-00001.safetensors, weights-00002.safetensors, ...

Tensor names are the model's (``MiniMaxForCausalLM.named_parameters()`` and ``named_buffers()``: stacked experts,
fp32 router gates and LM head, the derived decay and RoPE buffers), so one set serves every program of the folder
(the programs are compiled without their constants and name them ``model.<name>``: they wrap the model as
``.model``). The manifest's ``weights`` entry lists every tensor with its shape, dtype and shard:

    {"format": "safetensors", "shards": ["weights/weights-00001.safetensors", ...],
     "tensors": {name: {"shape": [...], "dtype": "bfloat16", "shard": "weights/weights-00001.safetensors"}},
     "stacked": {name: {"shape": [E, ...], "dtype": ..., "parts": [name of part 0, part 1, ...]}}}

``stacked`` (written by the checkpoint converter, ``model.loading.convert_checkpoint``): a tensor stored as its
slices along dim 0 (the experts of a layer, one part each, as the checkpoint holds them), stacked on load into one
device tensor; so that a conversion never holds more than one expert.

and the manifest's ``files`` holds each shard's sha256, checked on load like every file of the folder.

Writing streams: ``ShardWriter.add`` takes one tensor at a time and writes a shard when it reaches ``shard_bytes``,
so a writer holds at most one shard in memory whatever the model size. Reading (``load_weights``) opens each shard
memory-mapped (``safetensors.safe_open``), checks every tensor the manifest lists against it (a missing shard, a
missing tensor, another shape or dtype is refused, naming the shard and the tensor), and moves it to the device:
on CUDA through pinned host memory with asynchronous copies (one stream, synchronised at the end).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from .engine_folder import DTYPES, EngineFolderError

logger = logging.getLogger(__name__)

__all__ = ["WEIGHTS_DIR", "SHARD_BYTES", "ShardWriter", "write_weights", "load_weights", "model_tensors",
           "program_constants"]

WEIGHTS_DIR = "weights"
SHARD_BYTES = 2 << 30  # a shard closes once it holds this many bytes
PROGRAM_PREFIX = "model."  # the programs wrap the model as ``.model``: constant ``model.<name>`` is weight ``<name>``
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def _dtype_name(dtype: torch.dtype) -> str:
    if dtype in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype]
    return str(dtype).removeprefix("torch.")


def model_tensors(model: torch.nn.Module) -> Iterable[tuple[str, Tensor]]:
    """Every parameter and buffer of the model, by name (what the compiled programs take as constants)."""
    yield from model.named_parameters()
    yield from model.named_buffers()


class ShardWriter:
    """Writes tensors into ``folder/weights/weights-NNNNN.safetensors`` shards of about ``shard_bytes`` each."""

    def __init__(self, folder: str | Path, shard_bytes: int = SHARD_BYTES):
        self.folder = Path(folder)
        (self.folder / WEIGHTS_DIR).mkdir(parents=True, exist_ok=True)
        self.shard_bytes = shard_bytes
        self.shards: list[str] = []
        self.tensors: dict[str, dict[str, Any]] = {}
        self.stacked: dict[str, dict[str, Any]] = {}
        self._pending: dict[str, Tensor] = {}
        self._pending_bytes = 0
        self.bytes_written = 0
        self._hash = hashlib.sha256()  # names, shapes, dtypes and bytes in the order written

    def add(self, name: str, tensor: Tensor) -> None:
        if name in self.tensors or name in self._pending:
            raise EngineFolderError(f"weights: tensor {name!r} written twice")
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        self._hash.update(f"{name}|{list(t.shape)}|{t.dtype}|".encode())
        self._hash.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        self._pending[name] = t
        self._pending_bytes += t.numel() * t.element_size()
        if self._pending_bytes >= self.shard_bytes:
            self.flush()

    def add_part(self, name: str, index: int, count: int, tensor: Tensor) -> None:
        """Slice ``index`` of ``count`` of the stacked tensor ``name`` (dim 0); the parts may come in any order."""
        entry = self.stacked.setdefault(name, {"shape": [count, *tensor.shape], "dtype": _dtype_name(tensor.dtype),
                                                "parts": [None] * count})
        if entry["shape"] != [count, *tensor.shape] or entry["dtype"] != _dtype_name(tensor.dtype):
            raise EngineFolderError(f"weights: part {index} of {name!r} is {tensor.dtype} {list(tensor.shape)}, the "
                                    f"others {entry['dtype']} {entry['shape'][1:]}")
        part = f"{name}.{index}"
        entry["parts"][index] = part
        self.add(part, tensor)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def flush(self) -> None:
        if not self._pending:
            return
        from safetensors.torch import save_file

        rel = f"{WEIGHTS_DIR}/weights-{len(self.shards) + 1:05d}.safetensors"
        start = time.perf_counter()
        save_file(self._pending, str(self.folder / rel))
        for name, t in self._pending.items():
            self.tensors[name] = {"shape": list(t.shape), "dtype": _dtype_name(t.dtype), "shard": rel}
        self.shards.append(rel)
        self.bytes_written += self._pending_bytes
        logger.info("weights: wrote %s (%d tensors, %.1f MB) in %.1fs", rel, len(self._pending),
                    self._pending_bytes / 1e6, time.perf_counter() - start)
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> dict[str, Any]:
        """Write the last shard; return the manifest's ``weights`` entry."""
        self.flush()
        incomplete = {n: e["parts"].index(None) for n, e in self.stacked.items() if None in e["parts"]}
        if incomplete:
            raise EngineFolderError(f"weights: stacked tensors with missing parts (first missing index): {incomplete}")
        entry = {"format": "safetensors", "shards": list(self.shards), "tensors": dict(self.tensors)}
        if self.stacked:
            entry["stacked"] = dict(self.stacked)
        return entry


def write_weights(folder: str | Path, tensors: Iterable[tuple[str, Tensor]], shard_bytes: int = SHARD_BYTES
                  ) -> dict[str, Any]:
    """Write ``tensors`` (name, tensor) as shards under ``folder/weights``; returns the manifest entry."""
    writer = ShardWriter(folder, shard_bytes)
    for name, t in tensors:
        writer.add(name, t)
    return writer.close()


def check_entry(path: Path, entry: Any) -> None:
    """Structure of the manifest's ``weights`` entry (``EngineFolderError`` naming the field)."""
    if not isinstance(entry, dict) or entry.get("format") != "safetensors":
        raise EngineFolderError(f"{path}: weights must be an object with format 'safetensors'")
    shards, tensors = entry.get("shards"), entry.get("tensors")
    if not isinstance(shards, list) or not all(isinstance(s, str) for s in shards):
        raise EngineFolderError(f"{path}: weights.shards must be a list of file names")
    if not isinstance(tensors, dict):
        raise EngineFolderError(f"{path}: weights.tensors must be an object")
    for name, t in tensors.items():
        if (not isinstance(t, dict) or t.get("shard") not in shards or not isinstance(t.get("shape"), list)
                or t.get("dtype") not in (*DTYPES, "int32", "int64")):
            raise EngineFolderError(f"{path}: weights.tensors[{name!r}] must name a listed shard, a shape and a "
                                    f"dtype; got {t!r}"[:400])
    stacked = entry.get("stacked", {})
    if not isinstance(stacked, dict):
        raise EngineFolderError(f"{path}: weights.stacked must be an object")
    for name, t in stacked.items():
        parts = t.get("parts") if isinstance(t, dict) else None
        if (not isinstance(parts, list) or not isinstance(t.get("shape"), list) or not t["shape"]
                or len(parts) != t["shape"][0] or not all(p in tensors for p in parts)):
            raise EngineFolderError(f"{path}: weights.stacked[{name!r}] must list one stored part per slice of its "
                                    f"shape; got {t!r}"[:400])


def load_weights(folder: str | Path, entry: Mapping[str, Any], device: torch.device,
                 names: Iterable[str] | None = None) -> dict[str, Tensor]:
    """The tensors of the ``weights`` entry (``names``: a subset), checked against the shards, on ``device``."""
    from safetensors import safe_open

    folder = Path(folder)
    device = torch.device(device)
    stacked = entry.get("stacked", {})
    part_of = {p: (name, i) for name, t in stacked.items() for i, p in enumerate(t["parts"])}
    if names is None:
        names = [n for n in entry["tensors"] if n not in part_of] + list(stacked)
    names = list(names)
    unknown = [n for n in names if n not in entry["tensors"] and n not in stacked]
    out: dict[str, Tensor] = {}
    for name in names:  # stacked tensors: allocated whole on the device, filled part by part below
        if name in stacked:
            spec = stacked[name]
            out[name] = torch.empty(spec["shape"], dtype=DTYPES.get(spec["dtype"]) or getattr(torch, spec["dtype"]),
                                    device=device)
    wanted = [n for n in names if n not in stacked] + [p for n in names if n in stacked for p in stacked[n]["parts"]]
    if unknown:
        raise EngineFolderError(f"{folder}: the programs need weights the manifest does not list: {unknown[:5]}"
                                f"{' ...' if len(unknown) > 5 else ''}")
    by_shard: dict[str, list[str]] = {}
    for name in wanted:
        by_shard.setdefault(entry["tensors"][name]["shard"], []).append(name)
    start, nbytes = time.perf_counter(), 0
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    for i, (shard, shard_names) in enumerate(sorted(by_shard.items())):
        path = folder / shard
        if not path.is_file():
            raise EngineFolderError(f"{path}: weight shard is missing (it holds {shard_names[0]!r} and "
                                    f"{len(shard_names) - 1} more tensors)")
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types for a damaged header
            raise EngineFolderError(f"{path}: not a readable safetensors shard ({type(e).__name__}: {e})"[:400]) from e
        with handle as f:
            present = set(f.keys())
            for name in shard_names:
                spec = entry["tensors"][name]
                if name not in present:
                    raise EngineFolderError(f"{path}: weight {name!r} is missing from the shard")
                t = f.get_tensor(name)
                want_dtype = DTYPES.get(spec["dtype"]) or getattr(torch, spec["dtype"])
                if list(t.shape) != spec["shape"] or t.dtype != want_dtype:
                    raise EngineFolderError(f"{path}: weight {name!r} is {t.dtype} {list(t.shape)}, the manifest says "
                                            f"{spec['dtype']} {spec['shape']}")
                if name in part_of:  # a slice of a stacked tensor: copied into its place
                    whole, index = part_of[name]
                    src = t.pin_memory() if stream is not None else t
                    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                        out[whole][index].copy_(src, non_blocking=stream is not None)
                else:
                    if stream is not None:
                        host = t.pin_memory()
                        with torch.cuda.stream(stream):
                            t = host.to(device, non_blocking=True)
                    out[name] = t
                nbytes += t.numel() * t.element_size()
        logger.info("weights: shard %d/%d %s loaded (%.1f MB so far, %.1fs)", i + 1, len(by_shard), shard,
                    nbytes / 1e6, time.perf_counter() - start)
    if stream is not None:
        stream.synchronize()
    elapsed = time.perf_counter() - start
    logger.info("weights: %d tensors, %.1f MB to %s in %.1fs (%.2f GB/s)", len(out), nbytes / 1e6, device, elapsed,
                nbytes / max(elapsed, 1e-9) / 1e9)
    return out


def program_constants(fqns: Iterable[str], weights: Mapping[str, Tensor], where: str) -> dict[str, Tensor]:
    """The ``{constant fqn: tensor}`` mapping a program without packaged constants is given at load."""
    mapping, missing = {}, []
    for fqn in fqns:
        name = fqn.removeprefix(PROGRAM_PREFIX)
        if name in weights:
            mapping[fqn] = weights[name]
        else:
            missing.append(fqn)
    if missing:
        raise EngineFolderError(f"{where}: the program needs constants the folder's weights do not hold: "
                                f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return mapping
