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
so a writer holds at most one shard in memory whatever the model size. Reading (``load_weights``) checks every
tensor the manifest lists against its shard's safetensors header (a missing shard, a missing tensor, another shape,
dtype or byte range is refused, naming the shard and the tensor) before copying anything, then reads each shard
once, sequentially, in large chunks: each chunk is hashed (against the manifest's ``files``) and copied into the
tensors it holds; on CUDA through two pinned staging buffers per worker with asynchronous copies on the worker's
stream, so the read of one chunk overlaps the host-to-device copy of the previous one; several shards at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

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
        if t.numel():  # the bytes in place (a copy would double the peak for a 5 GB LM head)
            self._hash.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
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
                or t.get("dtype") not in (*DTYPES, "int32", "int64", "int8", "float8_e4m3fn")):
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


_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn}
CHUNK_BYTES = 64 << 20  # bytes per staged read (two staging buffers per worker)
LOAD_WORKERS = 4  # shards read, hashed and copied at once


def _read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(offset of the data, header) of a safetensors file; ``EngineFolderError`` for a damaged one."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            size = path.stat().st_size
            if n <= 1 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit the file ({size} bytes)")
            header = json.loads(f.read(n).decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError("header is not an object")
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise EngineFolderError(f"{path}: not a readable safetensors shard ({type(e).__name__}: {e})"[:400]) from e
    return 8 + n, header


def _shard_jobs(path: Path, names: list[str], entry: Mapping[str, Any], header: dict[str, Any], data_start: int,
                dest: Callable[[str], Tensor]) -> list[tuple[int, int, Tensor]]:
    """(file offset begin, end, destination bytes) for each named tensor, checked against the header first."""
    jobs = []
    size = path.stat().st_size
    for name in names:
        spec = entry["tensors"][name]
        info = header.get(name)
        if not isinstance(info, dict):
            raise EngineFolderError(f"{path}: weight {name!r} is missing from the shard")
        dtype = _ST_DTYPES.get(info.get("dtype"))
        want = DTYPES.get(spec["dtype"]) or getattr(torch, spec["dtype"])
        if info.get("shape") != spec["shape"] or dtype != want:
            raise EngineFolderError(f"{path}: weight {name!r} is {dtype or info.get('dtype')} {info.get('shape')}, the "
                                    f"manifest says {spec['dtype']} {spec['shape']}")
        begin, end = (data_start + int(o) for o in info["data_offsets"])
        nbytes = want.itemsize * math.prod(spec["shape"])
        if end - begin != nbytes or end > size:
            raise EngineFolderError(f"{path}: weight {name!r} has {end - begin} bytes at {begin}, expected {nbytes} "
                                    f"within the file's {size}")
        target = dest(name)
        if nbytes:
            jobs.append((begin, end, target.view(-1).view(torch.uint8)))
    return sorted(jobs, key=lambda j: j[0])


class _Stager:
    """Two staging buffers (pinned on CUDA) and a copy stream: chunk i+1 is read while chunk i is copied."""

    def __init__(self, device: torch.device, chunk: int):
        cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.buffers = [torch.empty(chunk, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
        self.events = [torch.cuda.Event() if cuda else None for _ in range(2)]
        self.views = [memoryview(b.numpy()) for b in self.buffers]

    def stream_file(self, path: Path, jobs: list[tuple[int, int, Tensor]], hasher: Any, stop: threading.Event) -> int:
        """Read the whole file once in chunks: hash every byte, copy the jobs' byte ranges to their destinations."""
        size, pos, j, i, copied = path.stat().st_size, 0, 0, 0, 0
        with open(path, "rb", buffering=0) as f:
            while pos < size:
                if stop.is_set():
                    raise _Stopped()
                k = i % 2
                if self.events[k] is not None:
                    self.events[k].synchronize()  # its previous copies are done: the buffer may be refilled
                n = f.readinto(self.views[k][: min(len(self.views[k]), size - pos)])
                if not n:
                    raise EngineFolderError(f"{path}: file ended at byte {pos} of {size} while loading")
                if hasher is not None:
                    hasher.update(self.views[k][:n])
                buf = self.buffers[k]
                while j < len(jobs) and jobs[j][0] < pos + n:
                    begin, end, dst = jobs[j]
                    a, b = max(begin, pos), min(end, pos + n)
                    if a < b:
                        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
                            dst[a - begin : b - begin].copy_(buf[a - pos : b - pos], non_blocking=self.stream is not None)
                        copied += b - a
                    if end <= pos + n:
                        j += 1
                    else:
                        break
                if self.events[k] is not None:
                    self.events[k].record(self.stream)
                pos += n
                i += 1
        if self.stream is not None:
            self.stream.synchronize()
        return copied


class _Stopped(Exception):
    pass


def load_weights(folder: str | Path, entry: Mapping[str, Any], device: torch.device,
                 names: Iterable[str] | None = None, digests: Mapping[str, str] | None = None,
                 workers: int = LOAD_WORKERS, chunk_bytes: int = CHUNK_BYTES) -> dict[str, Tensor]:
    """The tensors of the ``weights`` entry (``names``: a subset), checked against the shards, on ``device``.

    Each shard is read once, sequentially, in ``chunk_bytes`` chunks into two staging buffers (pinned on CUDA,
    copied to the device asynchronously on the worker's stream while the next chunk is read); ``workers`` shards
    at a time. Before any byte is copied, every tensor's name, dtype, shape and byte range are checked against the
    shard's header; with ``digests`` (``{shard: sha256}``, the manifest's ``files``) each shard is hashed as it is
    read and refused if it does not match. Errors name the shard and the tensor (``EngineFolderError``).
    """
    folder = Path(folder)
    device = torch.device(device)
    stacked = entry.get("stacked", {})
    part_of = {p: (name, i) for name, t in stacked.items() for i, p in enumerate(t["parts"])}
    if names is None:
        names = [n for n in entry["tensors"] if n not in part_of] + list(stacked)
    names = list(names)
    unknown = [n for n in names if n not in entry["tensors"] and n not in stacked]
    if unknown:
        raise EngineFolderError(f"{folder}: the programs need weights the manifest does not list: {unknown[:5]}"
                                f"{' ...' if len(unknown) > 5 else ''}")
    out: dict[str, Tensor] = {}
    for name in names:  # every destination allocated up front, filled by the shard streams
        spec = stacked[name] if name in stacked else entry["tensors"][name]
        out[name] = torch.empty(spec["shape"], dtype=DTYPES.get(spec["dtype"]) or getattr(torch, spec["dtype"]),
                                device=device)
    wanted = [n for n in names if n not in stacked] + [p for n in names if n in stacked for p in stacked[n]["parts"]]

    def dest(name: str) -> Tensor:
        if name in part_of:
            whole, index = part_of[name]
            return out[whole][index]
        return out[name]

    by_shard: dict[str, list[str]] = {}
    for name in wanted:
        by_shard.setdefault(entry["tensors"][name]["shard"], []).append(name)
    if digests is not None:  # shards that hold none of the wanted tensors are still checked
        for shard in entry["shards"]:
            by_shard.setdefault(shard, [])
    total = sum((folder / s).stat().st_size for s in by_shard if (folder / s).is_file())
    start = time.perf_counter()
    stop = threading.Event()
    done_bytes = [0, 0]  # file bytes read, tensor bytes copied
    lock = threading.Lock()
    bar = _progress_bar(total)

    def load_shard(shard: str, stager: _Stager) -> None:
        path = folder / shard
        shard_names = by_shard[shard]
        if not path.is_file():
            held = f" (it holds {shard_names[0]!r} and {len(shard_names) - 1} more tensors)" if shard_names else ""
            raise EngineFolderError(f"{path}: weight shard is missing{held}")
        data_start, header = _read_header(path)
        jobs = _shard_jobs(path, shard_names, entry, header, data_start, dest)
        hasher = hashlib.sha256() if digests is not None else None
        copied = stager.stream_file(path, jobs, hasher, stop)
        if hasher is not None and hasher.hexdigest() != digests.get(shard):
            raise EngineFolderError(f"{path}: weight shard does not match its hash in the manifest (modified or "
                                    f"corrupt)")
        with lock:
            done_bytes[0] += path.stat().st_size
            done_bytes[1] += copied
            elapsed = time.perf_counter() - start
            if bar is not None:
                bar.update(path.stat().st_size)
            logger.info("weights: %s loaded (%d tensors; %.2f of %.2f GB, %.1fs, %.2f GB/s)", shard, len(shard_names),
                        done_bytes[0] / 1e9, total / 1e9, elapsed, done_bytes[0] / max(elapsed, 1e-9) / 1e9)

    shards = sorted(by_shard)
    n_workers = max(1, min(workers, len(shards)))
    largest = max(((folder / s).stat().st_size for s in shards if (folder / s).is_file()), default=1)
    stagers = [_Stager(device, max(1, min(chunk_bytes, largest))) for _ in range(n_workers)]
    queue = list(reversed(shards))

    def worker(stager: _Stager) -> None:
        while True:
            with lock:
                if not queue or stop.is_set():
                    return
                shard = queue.pop()
            try:
                load_shard(shard, stager)
            except BaseException:
                stop.set()
                raise

    try:
        with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="weights") as pool:
            futures = [pool.submit(worker, s) for s in stagers]
            errors = []
            for fut in futures:
                try:
                    fut.result()
                except _Stopped:
                    pass
                except BaseException as e:  # the first real error wins; the others were stopped by it
                    errors.append(e)
            if errors:
                raise errors[0]
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - start
    logger.info("weights: %d tensors, %.1f MB to %s in %.1fs (%.2f GB/s from %d shards, %d at a time%s)", len(out),
                done_bytes[1] / 1e6, device, elapsed, done_bytes[0] / max(elapsed, 1e-9) / 1e9, len(shards),
                n_workers, ", hashed" if digests is not None else "")
    return out


def _progress_bar(total: int):
    """A byte progress bar on an interactive terminal (tqdm, which transformers brings); None otherwise."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, desc="loading weights")


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
