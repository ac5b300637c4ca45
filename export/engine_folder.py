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
    paged_kv         {"page_size", "num_pages", "max_pages_per_seq"}: the KV page pools and block-table width
    state_layout     config.state_layout entries: name, layer, shape (batch as "B"), dtype; lightning states
                     [B, H, D, D] fp32, KV page pools [num_pages, KVH, page_size, D]
    programs         {"prefill"|"decode"(|"vision")(|"mixed"): {"file", "inputs": [{name, shape, dtype}], "outputs": [...]}}
    vision           (MiniMax-VL-01 engines) {"config": MiniMaxVLConfig.to_dict(), "max_tiles", "max_image_tokens"};
                     ``profiles`` then holds ``max_tiles`` too
    versions         torch / triton / tensorrt / onnx versions that built the folder
    weights_sha256   hash of the weights (names, shapes, dtypes and bytes) the engines were built from: in the
                     model's state_dict order, or, for weights converted from a checkpoint, in the order written
    weights          (AOTInductor) the folder's weights apart from the programs: sharded safetensors under
                     ``weights/``, every tensor's shape, dtype and shard (``export/weights.py``)
    files            {relative path: sha256} of every file in the folder but manifest.json, checked on load
                     (a file that is not listed, a program file that is not listed, is refused)

``contract.json`` (written just before the manifest, so listed in ``files`` and hashed) holds every manifest field
but ``files`` as one canonical JSON string; a reader refuses a manifest whose fields differ from it, so editing the
manifest (raising a limit, emptying ``files``) cannot switch a check off. Lowerings may also embed the build
settings in the programs themselves (AOTInductor: the package metadata), which the runtime's loader checks.

Program signatures (tensor names are the same for every backend):
    prefill(input_ids [B, T] int64, positions [B] int64, block_table [B, M] int32, *state) -> logits [B, 1, V] fp32
    decode (input_ids [B, 1] int64, positions [B] int64, block_table [B, M] int32, *state) -> logits [B, 1, V] fp32
``positions[b]`` is the position of the first token of row b; prefill returns the logits of the last position only.
An engine built with ``--mixed-step`` (AOTInductor, text) has a third program, a decode step of R rows and a prefill
chunk of B other rows in one forward (``mixed_io``):
    mixed  (decode_ids [R, 1], decode_positions [R], decode_block_table [R, M], prefill_ids [B, T],
            prefill_positions [B], prefill_block_table [B, M], decode lightning states [R, ...], prefill lightning
            states [B, ...], KV pools) -> logits [R + B, 1, V] fp32 (the decode rows', then the prefill rows' last)
A VL engine's prefill takes ``image_embeds [B, T, hidden]`` (weights' dtype) last: at every position holding the
image token, that placeholder's vector (elsewhere unread); its third program is
    vision (pixel_values [N, C, S, S], feature_index [L] int64) -> image_features [L, hidden]
the tiles of consecutive images and ``model.vl.packing_index`` of their layouts -> their prompt vectors in order.
The state is updated in place (``state_update: "in_place"``, AOTInductor: mutated program inputs), or, for the
functional graphs of ONNX / TensorRT (``"outputs"``), returned as outputs ``<state>.out``. The block table is only
read; the caller (``runtime.Engine``) owns the pages and checks every row against the table and the pool, since
the compiled kernels cannot raise.
Every input must be contiguous: AOTInductor compiles for the example inputs' (contiguous) strides and does not
check them, so a strided view (e.g. ``ids[:, :n]`` of a wider batch) gives wrong results silently.
The folder is written under a temporary name beside its destination (``.NAME.building-PID-XXXX``) and renamed
into place when complete, while an exclusive lock file beside it (``.NAME.lock``) keeps other builds out; a
destination that exists is replaced only when it is an engine folder and the caller asked to overwrite it.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

FORMAT_VERSION = 4  # 2: contract.json, ``files`` covers the whole folder; 3: paged KV cache, state in place;
# 4: AOTInductor programs without constants, the weights as sharded safetensors under weights/
MANIFEST_NAME = "manifest.json"
CONTRACT_NAME = "contract.json"
DEVICES = ("cpu", "cuda")
SYMBOLIC_DIMS = ("B",)  # the symbolic dims a state_layout shape may hold (the runtime substitutes them)

logger = logging.getLogger(__name__)
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
    page_size: int = 256  # KV-cache page size in tokens (capped at max_seq_len)
    num_pages: int | None = None  # pages per pool; None: every row at full capacity (max_batch * max_pages_per_seq)
    max_tiles: int = 0  # VL engines: most 336-pixel tiles one call of the vision program encodes; 0: text only

    def paged_layout(self) -> dict[str, int]:
        """``{"page_size", "num_pages", "max_pages_per_seq"}`` of the paged KV cache these settings build."""
        page_size = min(self.page_size, self.max_seq_len)
        per_seq = -(-self.max_seq_len // page_size)
        num_pages = self.num_pages if self.num_pages is not None else self.max_batch * per_seq
        return {"page_size": page_size, "num_pages": num_pages, "max_pages_per_seq": per_seq}

    def validate(self, max_position_embeddings: int | None = None) -> None:
        if self.backend not in BACKENDS:
            raise EngineFolderError(f"backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.device not in ("cpu", "cuda"):
            raise EngineFolderError(f"device {self.device!r} is not 'cpu' or 'cuda'")
        if self.dtype not in DTYPES:
            raise EngineFolderError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        for name in ("max_batch", "max_input_len", "max_seq_len", "max_tiles"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not -2**31 < value < 2**31:
                raise EngineFolderError(f"{name} must be an integer below 2**31, got {value!r}")
        if self.max_tiles < 0:
            raise EngineFolderError(f"max_tiles must be >= 0 (0: no vision program), got {self.max_tiles}")
        if self.max_batch < 1:
            raise EngineFolderError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_input_len < 2:
            raise EngineFolderError(f"max_input_len must be >= 2 (one-token prompts go through decode), got {self.max_input_len}")
        if self.max_seq_len < self.max_input_len:
            raise EngineFolderError(f"max_seq_len ({self.max_seq_len}) must be >= max_input_len ({self.max_input_len})")
        if isinstance(self.page_size, bool) or not isinstance(self.page_size, int) or not 1 <= self.page_size <= 2**16:
            raise EngineFolderError(f"page_size must be an integer in [1, 65536], got {self.page_size!r}")
        if self.num_pages is not None:
            if isinstance(self.num_pages, bool) or not isinstance(self.num_pages, int) or not 1 <= self.num_pages < 2**31:
                raise EngineFolderError(f"num_pages must be a positive integer below 2**31, got {self.num_pages!r}")
            per_seq = self.paged_layout()["max_pages_per_seq"]
            if self.num_pages < per_seq:
                raise EngineFolderError(f"num_pages ({self.num_pages}) cannot hold one sequence of max_seq_len "
                                        f"{self.max_seq_len} ({per_seq} pages of {self.paged_layout()['page_size']})")
        if max_position_embeddings is not None and self.max_seq_len > max_position_embeddings:
            raise EngineFolderError(
                f"max_seq_len ({self.max_seq_len}) exceeds the model's max_position_embeddings ({max_position_embeddings})"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# expert-weight quantization recorded in the manifest (``model.modeling.QUANTIZATIONS``; kernels/moe/naive.py)
QUANTIZATIONS = ("none", "experts-int8", "experts-fp8")


def program_io(config_dict: dict[str, Any], state_layout: list[dict[str, Any]], program: str,
               paged: dict[str, int], in_place: bool = True, image_embeds: str | None = None) -> dict[str, list]:
    """Input and output tensor descriptions of ``program`` ("B", "T" are the dynamic dims).

    In place (AOTInductor): the state inputs are updated where they lie and the only output is the logits.
    Otherwise (ONNX, TensorRT: graphs are functional) each state input has an output ``<name>.out``.
    ``image_embeds``: the weights' dtype of a VL prefill, whose last input is ``image_embeds [B, T, hidden]``.
    """
    seq = "T" if program == "prefill" else 1
    inputs = [
        {"name": "input_ids", "shape": ["B", seq], "dtype": "int64"},
        {"name": "positions", "shape": ["B"], "dtype": "int64"},
        {"name": "block_table", "shape": ["B", paged["max_pages_per_seq"]], "dtype": "int32"},
    ] + [{"name": e["name"], "shape": e["shape"], "dtype": e["dtype"]} for e in state_layout]
    if image_embeds is not None:
        inputs.append({"name": "image_embeds", "shape": ["B", "T", config_dict["hidden_size"]], "dtype": image_embeds})
    outputs = [{"name": "logits", "shape": ["B", 1, config_dict["vocab_size"]], "dtype": "float32"}]
    if not in_place:
        outputs += [{"name": e["name"] + ".out", "shape": e["shape"], "dtype": e["dtype"]} for e in state_layout]
    return {"inputs": inputs, "outputs": outputs, "state_update": "in_place" if in_place else "outputs"}


def mixed_io(config_dict: dict[str, Any], state_layout: list[dict[str, Any]], paged: dict[str, int]) -> dict[str, list]:
    """The ``mixed`` program's tensors (``R`` decode rows, ``B`` prefill rows of ``T`` tokens; in place): the decode
    rows' ids / positions / block-table rows, the prefill rows', the decode rows' lightning states, the prefill
    rows', the KV pools -> ``logits [R+B, 1, V]``."""
    M = paged["max_pages_per_seq"]
    per_row = [e for e in state_layout if "B" in e["shape"]]
    pools = [e for e in state_layout if "B" not in e["shape"]]

    def rows(prefix: str, dim: str) -> list[dict[str, Any]]:
        return [{"name": f"{prefix}.{e['name']}", "shape": [dim if d == "B" else d for d in e["shape"]],
                 "dtype": e["dtype"]} for e in per_row]

    inputs = [
        {"name": "decode_ids", "shape": ["R", 1], "dtype": "int64"},
        {"name": "decode_positions", "shape": ["R"], "dtype": "int64"},
        {"name": "decode_block_table", "shape": ["R", M], "dtype": "int32"},
        {"name": "prefill_ids", "shape": ["B", "T"], "dtype": "int64"},
        {"name": "prefill_positions", "shape": ["B"], "dtype": "int64"},
        {"name": "prefill_block_table", "shape": ["B", M], "dtype": "int32"},
        *rows("decode", "R"), *rows("prefill", "B"),
        *({"name": e["name"], "shape": e["shape"], "dtype": e["dtype"]} for e in pools),
    ]
    return {"inputs": inputs,
            "outputs": [{"name": "logits", "shape": ["R+B", 1, config_dict["vocab_size"]], "dtype": "float32"}],
            "state_update": "in_place"}


def vision_io(vl_config, settings: BuildSettings) -> dict[str, list]:
    """The vision program's tensors: ``pixel_values [N, C, S, S]`` (N tiles, dynamic) and ``feature_index [L]``
    (int64, dynamic) -> ``image_features [L, hidden]``, all in the weights' dtype but the index."""
    vc = vl_config.vision
    return {"inputs": [{"name": "pixel_values", "shape": ["N", vc.num_channels, vc.image_size, vc.image_size],
                        "dtype": settings.dtype},
                       {"name": "feature_index", "shape": ["L"], "dtype": "int64"}],
            "outputs": [{"name": "image_features", "shape": ["L", vl_config.text.hidden_size], "dtype": settings.dtype}],
            "state_update": "none"}


def symbolic_state_layout(config, settings: BuildSettings) -> list[dict[str, Any]]:
    """``config.state_layout`` for these settings with the batch dim of the per-sequence states as "B"."""
    paged = settings.paged_layout()
    layout = config.state_layout(batch_size=1, max_seq_len=settings.max_seq_len, dtype=settings.dtype,
                                 page_size=paged["page_size"], num_pages=paged["num_pages"])
    for entry in layout:
        if entry["name"].startswith("lightning_state."):
            entry["shape"][0] = "B"
    return layout


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_files(paths: list[Path], workers: int = 4) -> list[str]:
    """``sha256_file`` of each path, ``workers`` files at a time (hashlib releases the GIL: a folder of many
    multi-GB weight shards hashes about ``workers`` times faster)."""
    from concurrent.futures import ThreadPoolExecutor

    if len(paths) < 2:
        return [sha256_file(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(workers, len(paths))) as pool:
        return list(pool.map(sha256_file, paths))


def weights_sha256(module: torch.nn.Module) -> str:
    """Hash of every parameter and buffer: name, shape, dtype and bytes (in state_dict order)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{list(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ destination and build
def is_engine_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder whose manifest says it is an engine folder (``format_version`` and ``backend``
    present, any version): the only kind of folder a build may replace."""
    path = Path(path)
    try:
        if not path.is_dir() or path.is_symlink():
            return False
        manifest = json.loads((path / MANIFEST_NAME).read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "format_version" in manifest and "backend" in manifest


def _destination_path(destination: str | Path) -> Path:
    if not str(destination).strip():
        raise EngineFolderError("the engine folder path is empty")
    if "\0" in str(destination):
        raise EngineFolderError(f"{str(destination)!r}: a path cannot hold a NUL character")
    try:
        return Path(destination).expanduser().resolve()
    except (OSError, RuntimeError, ValueError) as e:
        raise EngineFolderError(f"{destination}: not a usable path ({e})") from e


def _check_destination(destination: Path, overwrite: bool) -> tuple[int, int] | None:
    """Refuse a destination the build must not write; return the identity of the engine folder to replace."""
    try:
        return _check_destination_unchecked(destination, overwrite)
    except OSError as e:  # a name too long, a parent we may not read, ...
        raise EngineFolderError(f"{destination}: cannot use this path ({e.strerror or e})") from e


def _check_destination_unchecked(destination: Path, overwrite: bool) -> tuple[int, int] | None:
    if destination.is_symlink() or (destination.exists() and not destination.is_dir()):
        raise EngineFolderError(f"{destination} exists and is not a folder; refusing to replace it")
    if not destination.exists():
        return None
    if not is_engine_folder(destination):
        raise EngineFolderError(
            f"{destination} already exists and is not an engine folder (no {MANIFEST_NAME} with format_version and "
            f"backend): {'refusing to replace it even with overwrite' if overwrite else 'not touching it'}; "
            "choose a new output folder"
        )
    if not overwrite:
        raise EngineFolderError(f"{destination} already exists (pass --overwrite to replace this engine folder)")
    st = destination.stat()
    return st.st_dev, st.st_ino


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process (or a pid we cannot ask about): leave its folder alone
    return True


_STALE = re.compile(r"^\.(?P<name>.+)\.(?:building|old)-(?P<pid>\d+)-[0-9a-f]+$")


def remove_stale_staging(destination: str | Path) -> list[Path]:
    """Remove the staging (``.NAME.building-PID-*``) and replaced (``.NAME.old-PID-*``) folders beside
    ``destination`` whose build process is dead (killed builds); log each, and where the others are. Call it
    with the destination's lock held."""
    destination = Path(destination)
    removed = []
    try:
        candidates = sorted(destination.parent.glob(f".{glob.escape(destination.name)}.*-*"))
    except OSError:
        return removed
    for path in candidates:
        if not path.is_dir() or path.is_symlink():
            continue
        m = _STALE.match(path.name)
        if m is None or m["name"] != destination.name:
            if path.name.startswith(f".{destination.name}.building-"):
                logger.warning("leaving %s: a staging folder of another build (no owner pid in its name); "
                               "delete it if no build is running", path)
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _pid_alive(pid):
            if pid != os.getpid():
                logger.warning("leaving %s: its build (pid %d) is still running", path, pid)
            continue
        if ".old-" in path.name and not os.path.lexists(destination) and is_engine_folder(path):
            path.rename(destination)  # killed between moving the old engine away and moving the new one in
            logger.warning("restored %s from %s, left by a build (pid %d) that did not finish", destination, path, pid)
            continue
        shutil.rmtree(path, ignore_errors=True)
        logger.warning("removed %s, left by a build (pid %d) that did not finish", path, pid)
        removed.append(path)
    return removed


class DestinationLock:
    """An exclusive, non-blocking ``flock`` on ``.NAME.lock`` beside an engine folder, held for a whole build.

    A second build of the same destination (another process or thread) is refused at once with
    ``EngineFolderError``. The lock file is removed when the lock is released.
    """

    _held: dict[Path, "DestinationLock"] = {}
    _mutex = threading.Lock()

    def __init__(self, destination: Path):
        self.destination = destination
        self.path = destination.with_name(f".{destination.name}.lock")
        self.fd: int | None = None
        self.thread = threading.get_ident()

    @classmethod
    def held(cls, destination: Path) -> "DestinationLock | None":
        """The lock this thread already holds on ``destination``, if any."""
        lock = cls._held.get(destination)
        return lock if lock is not None and lock.thread == threading.get_ident() else None

    def acquire(self) -> "DestinationLock":
        with self._mutex:
            if self.destination in self._held:
                raise EngineFolderError(f"another build in this process is writing {self.destination}")
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise EngineFolderError(
                    f"cannot write beside {self.destination} (lock file {self.path}): {e.strerror or e}") from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # the file may have been removed by the build that held it just before: the lock must be on the
                # file that is at the path now
                if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                    raise BlockingIOError(errno.EWOULDBLOCK, "lock file replaced")
            except (BlockingIOError, FileNotFoundError):
                os.close(fd)
                raise EngineFolderError(
                    f"another build is writing {self.destination} (it holds {self.path}); wait for it to finish"
                ) from None
            except OSError as e:
                os.close(fd)
                raise EngineFolderError(f"cannot lock {self.path}: {e.strerror or e}") from e
            os.write(fd, f"{os.getpid()}\n".encode())
            self.fd = fd
            self._held[self.destination] = self
        return self

    def release(self) -> None:
        with self._mutex:
            if self.fd is None:
                return
            self._held.pop(self.destination, None)
            try:
                os.unlink(self.path)  # while still locked: a waiting opener then sees a replaced file and gives up
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None


@contextmanager
def reserve_destination(destination: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Check that a build may write ``destination`` and keep other builds out until the block ends.

    Refused (``EngineFolderError``, before any work): an empty path, a file, a folder that is not an engine folder
    (even with ``overwrite``), an engine folder without ``overwrite``, a parent that cannot be created or written,
    a destination another build holds. Stale staging folders of dead builds beside it are removed. Yields the
    resolved destination; ``staged_folder`` inside the block reuses the lock.
    """
    destination = _destination_path(destination)
    _check_destination(destination, overwrite)
    try:
        ancestor = destination.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise EngineFolderError(f"cannot create {destination}: {ancestor} is a file, not a folder")
        destination.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EngineFolderError(f"cannot create the folder {destination.parent}: {e.strerror or e}") from e
    if not os.access(destination.parent, os.W_OK | os.X_OK):
        raise EngineFolderError(f"cannot write into {destination.parent} (permission denied)")
    held = DestinationLock.held(destination)
    lock = None if held is not None else DestinationLock(destination).acquire()
    try:
        _check_destination(destination, overwrite)  # again, now that no other build can change it
        remove_stale_staging(destination)
        yield destination
    finally:
        if lock is not None:
            lock.release()


@contextmanager
def staged_folder(destination: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a new folder beside ``destination``; on success rename it into place, on failure (any exception,
    KeyboardInterrupt and SIGTERM turned into one included) delete it.

    A failed build therefore leaves nothing that looks like an engine. The destination must be absent, or an engine
    folder and ``overwrite`` (``reserve_destination``'s rules; its lock is held for the whole block), and is checked
    again just before the rename: a folder that appeared meanwhile, or is no longer the engine folder we were
    told to replace, is left alone and the build is refused. The new folder's mode follows the umask (0o755 for
    the usual 022), not ``mkdtemp``'s 0700.
    """
    with reserve_destination(destination, overwrite) as destination:
        expected = _check_destination(destination, overwrite)
        staging = destination.with_name(f".{destination.name}.building-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            staging.mkdir(mode=0o777)
        except OSError as e:
            raise EngineFolderError(f"cannot create {staging}: {e.strerror or e}") from e
        try:
            yield staging
            try:
                now = _check_destination(destination, overwrite)
            except EngineFolderError as e:
                raise EngineFolderError(f"{destination} changed during the build ({e}); it is left as it is and this "
                                        "build is discarded") from None
            if now != expected:
                raise EngineFolderError(
                    f"{destination} changed during the build (another writer); it is left as it is and this build "
                    "is discarded"
                )
            if now is not None:
                old = destination.with_name(f".{destination.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
                destination.rename(old)
                staging.rename(destination)
                shutil.rmtree(old, ignore_errors=True)
            else:
                staging.rename(destination)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


# -------------------------------------------------------------------------------------------------- manifest
def canonical_json(value: Any) -> str:
    """The one serialisation hashed and compared: sorted keys, no whitespace."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True)


def contract_fields(manifest: dict[str, Any]) -> dict[str, Any]:
    """Every manifest field that ``contract.json`` pins: all but ``files`` (which holds the contract's hash)."""
    return {k: v for k, v in manifest.items() if k != "files"}


def write_manifest(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write ``contract.json``, hash every file in ``folder`` into the manifest, write ``manifest.json`` last."""
    manifest = contract_fields(manifest)
    text = canonical_json(manifest)
    (folder / CONTRACT_NAME).write_text(
        json.dumps({"sha256": hashlib.sha256(text.encode()).hexdigest(), "manifest": text}, indent=1) + "\n")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST_NAME)
    manifest = dict(manifest, files=dict(zip((p.relative_to(folder).as_posix() for p in files), sha256_files(files))))
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _relative_file(path: Path, value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or "\\" in value or "\0" in value:
        raise EngineFolderError(f"{path}: {what} must be a relative file path, got {value!r}")
    parts = Path(value).parts
    if Path(value).is_absolute() or ".." in parts or value != Path(value).as_posix() or parts[0] == ".":
        raise EngineFolderError(f"{path}: {what} {value!r} is not a path inside the engine folder")
    return value


def _check_tensor_list(path: Path, value: Any, what: str) -> None:
    if not isinstance(value, list):
        raise EngineFolderError(f"{path}: {what} must be a list, got {type(value).__name__}")
    for i, e in enumerate(value):
        if not isinstance(e, dict) or not isinstance(e.get("name"), str):
            raise EngineFolderError(f"{path}: {what}[{i}] must be an object with a 'name', got {e!r}"[:300])
        shape = e.get("shape")
        if not isinstance(shape, list) or not all((_is_int(d) and d >= 0) or isinstance(d, str) for d in shape):
            raise EngineFolderError(f"{path}: {what}[{i}] ({e['name']}): shape must be a list of sizes, got {shape!r}")
        if not isinstance(e.get("dtype"), str):
            raise EngineFolderError(f"{path}: {what}[{i}] ({e['name']}): dtype must be a string, got {e.get('dtype')!r}")


def _validate(path: Path, manifest: Any) -> None:
    """Types and structure of every field a reader uses (not the files: see ``read_manifest``)."""
    if not isinstance(manifest, dict):
        raise EngineFolderError(f"{path}: the manifest must be a JSON object, got {type(manifest).__name__}")
    par = manifest.get("parallel")
    if isinstance(par, dict) and "ranks" in par:  # the top of a parallel folder (export.parallel)
        n = par.get("world_size")
        raise EngineFolderError(f"{path.parent}: a tensor-parallel engine of {n} ranks (one engine folder per rank): "
                                f"run it with `torchrun --nproc-per-node {n} -m runtime {path.parent} ...` "
                                "(runtime.parallel)")
    if par is not None:  # a rank's folder of a parallel engine
        ok = (isinstance(par, dict) and _is_int(par.get("world_size")) and par["world_size"] >= 1
              and _is_int(par.get("rank")) and 0 <= par["rank"] < par["world_size"]
              and isinstance(par.get("group_name"), str) and isinstance(par.get("expert_parallel"), bool))
        if not ok:
            raise EngineFolderError(f"{path}: malformed parallel entry {par!r} (world_size, rank in "
                                    "[0, world_size), group_name, expert_parallel)"[:400])
    version = manifest.get("format_version")
    if version != FORMAT_VERSION or not _is_int(version):
        raise EngineFolderError(
            f"{path}: engine format version {version!r}, this code reads version {FORMAT_VERSION}; rebuild the engine"
        )
    for key in ("backend", "device", "dtype", "model_config", "profiles", "paged_kv", "state_layout", "programs",
                "files"):
        if key not in manifest:
            raise EngineFolderError(f"{path}: missing field {key!r}")
    for key, allowed in (("backend", BACKENDS), ("device", DEVICES), ("dtype", tuple(DTYPES))):
        if not isinstance(manifest[key], str) or manifest[key] not in allowed:
            kind = "unknown" if isinstance(manifest[key], str) else "malformed"
            raise EngineFolderError(f"{path}: {kind} {key} {manifest[key]!r} (known: {', '.join(allowed)})"[:400])
    quantization = manifest.get("quantization", "none")  # absent in folders of earlier builds: none
    if quantization not in QUANTIZATIONS:
        raise EngineFolderError(f"{path}: unknown quantization {quantization!r} (known: {', '.join(QUANTIZATIONS)})"[:400])
    if not isinstance(manifest["model_config"], dict):
        raise EngineFolderError(f"{path}: model_config must be an object")
    from model.config import ConfigError, MiniMaxConfig  # the config only, not the model

    try:
        MiniMaxConfig.from_dict(manifest["model_config"])
    except ConfigError as e:
        raise EngineFolderError(f"{path}: model_config: {e}") from e
    profiles = manifest["profiles"]
    if not isinstance(profiles, dict):
        raise EngineFolderError(f"{path}: profiles must be an object")
    for key, low in (("max_batch", 1), ("max_input_len", 2), ("max_seq_len", 2)):
        if key not in profiles:
            raise EngineFolderError(f"{path}: profiles has no {key!r}")
        if not _is_int(profiles[key]) or profiles[key] < low:
            raise EngineFolderError(f"{path}: profiles.{key} must be an integer >= {low}, got {profiles[key]!r}")
    if profiles["max_seq_len"] < profiles["max_input_len"]:
        raise EngineFolderError(f"{path}: profiles.max_seq_len is smaller than profiles.max_input_len")
    paged = manifest["paged_kv"]
    if not isinstance(paged, dict):
        raise EngineFolderError(f"{path}: paged_kv must be an object")
    for key in ("page_size", "num_pages", "max_pages_per_seq"):
        if not _is_int(paged.get(key)) or paged[key] < 1:
            raise EngineFolderError(f"{path}: paged_kv.{key} must be an integer >= 1, got {paged.get(key)!r}")
    if paged["page_size"] * paged["max_pages_per_seq"] < profiles["max_seq_len"]:
        raise EngineFolderError(f"{path}: paged_kv: {paged['max_pages_per_seq']} pages of {paged['page_size']} "
                                f"tokens cannot hold profiles.max_seq_len {profiles['max_seq_len']}")
    layout = manifest["state_layout"]
    _check_tensor_list(path, layout, "state_layout")
    for i, e in enumerate(layout):
        if e["dtype"] not in DTYPES:
            raise EngineFolderError(f"{path}: state_layout[{i}] ({e['name']}): unknown dtype {e['dtype']!r}")
        if not all(_is_int(d) or d in SYMBOLIC_DIMS for d in e["shape"]):
            raise EngineFolderError(f"{path}: state_layout[{i}] ({e['name']}): shape {e['shape']!r} holds a dim that "
                                    f"is neither a size nor one of {SYMBOLIC_DIMS}")
    programs = manifest["programs"]
    if not isinstance(programs, dict):
        raise EngineFolderError(f"{path}: programs must be an object")
    if "vision" in manifest:
        _validate_vision(path, manifest)
    for program in program_names(manifest):
        if program not in programs:
            raise EngineFolderError(f"{path}: no {program!r} program")
        entry = programs[program]
        if not isinstance(entry, dict):
            raise EngineFolderError(f"{path}: programs.{program} must be an object")
        _relative_file(path, entry.get("file"), f"programs.{program}.file")
        if "layer_programs" in entry:  # made of per-kind layer programs (export/layered.py)
            parts = entry["layer_programs"]
            if "layer_plan" not in manifest or not isinstance(parts, dict) or not parts:
                raise EngineFolderError(f"{path}: programs.{program}.layer_programs needs a non-empty object and the "
                                        "manifest's layer_plan")
            for kind, rel in parts.items():
                _relative_file(path, rel, f"programs.{program}.layer_programs.{kind}")
        for key in ("inputs", "outputs"):
            if key in entry:
                _check_tensor_list(path, entry[key], f"programs.{program}.{key}")
    if "mixed" in programs and (manifest["backend"] != "aoti" or "vision" in manifest or "layer_plan" in manifest
                                or "parallel" in manifest):
        raise EngineFolderError(f"{path}: a 'mixed' program belongs to AOTInductor text engines on one rank with "
                                "whole programs only")
    if "layer_plan" in manifest:
        _validate_layer_plan(path, manifest)
    if "weights" in manifest:
        from .weights import check_entry

        check_entry(path, manifest["weights"])
    elif manifest["backend"] == "aoti":
        raise EngineFolderError(f"{path}: an 'aoti' engine folder needs a 'weights' entry (its programs hold none)")
    files = manifest["files"]
    if not isinstance(files, dict):
        raise EngineFolderError(f"{path}: files must be an object {{path: sha256}}")
    for rel, digest in files.items():
        _relative_file(path, rel, "files entry")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise EngineFolderError(f"{path}: files[{rel!r}] is not a sha256 hex digest")


def program_names(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The programs an engine folder holds: prefill and decode, a VL engine's vision program, and the ``mixed``
    program of an engine built with it (``build.py --mixed-step``)."""
    programs = manifest.get("programs")
    mixed = isinstance(programs, dict) and "mixed" in programs
    return PROGRAMS + (("vision",) if "vision" in manifest else ()) + (("mixed",) if mixed else ())


def _validate_layer_plan(path: Path, manifest: dict[str, Any]) -> None:
    """``layer_plan``: ``{"layer_types": [kind per layer], "weights": {kind: [tensor names relative to the
    layer]}}``, one kind per layer of ``model_config``, each kind with its part in prefill and decode."""
    from model.config import LIGHTNING, MiniMaxConfig

    plan = manifest["layer_plan"]
    if not isinstance(plan, dict) or not isinstance(plan.get("layer_types"), list) or not isinstance(
            plan.get("weights"), dict):
        raise EngineFolderError(f"{path}: layer_plan must be an object with 'layer_types' (list) and 'weights'")
    config = MiniMaxConfig.from_dict(manifest["model_config"])
    want = ["lightning" if t == LIGHTNING else "softmax" for t in config.layer_types]
    if plan["layer_types"] != want:
        raise EngineFolderError(f"{path}: layer_plan.layer_types does not follow model_config's layer_types")
    for kind in set(want):
        names = plan["weights"].get(kind)
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            raise EngineFolderError(f"{path}: layer_plan.weights.{kind} must be a non-empty list of tensor names")
        for program in PROGRAMS:
            if kind not in manifest["programs"][program].get("layer_programs", {}):
                raise EngineFolderError(f"{path}: programs.{program}.layer_programs has no {kind!r} part")


def _validate_vision(path: Path, manifest: dict[str, Any]) -> None:
    """A VL engine's ``vision`` entry: ``{"config": MiniMaxVLConfig.to_dict(), "max_tiles", "max_image_tokens"}``,
    its text config the manifest's ``model_config``, its ``max_tiles`` the profiles'."""
    vision = manifest["vision"]
    if not isinstance(vision, dict) or not isinstance(vision.get("config"), dict):
        raise EngineFolderError(f"{path}: vision must be an object with a 'config' object")
    from model.config import ConfigError
    from model.vl import MiniMaxVLConfig

    try:
        config = MiniMaxVLConfig.from_dict(vision["config"])
    except ConfigError as e:
        raise EngineFolderError(f"{path}: vision.config: {e}") from e
    if canonical_json(config.text.to_dict()) != canonical_json(manifest["model_config"]):
        raise EngineFolderError(f"{path}: vision.config's text_config is not the manifest's model_config")
    for key in ("max_tiles", "max_image_tokens"):
        if not _is_int(vision.get(key)) or vision[key] < 1:
            raise EngineFolderError(f"{path}: vision.{key} must be an integer >= 1, got {vision.get(key)!r}")
    if manifest["profiles"].get("max_tiles") != vision["max_tiles"]:
        raise EngineFolderError(f"{path}: vision.max_tiles {vision['max_tiles']} is not profiles.max_tiles "
                                f"{manifest['profiles'].get('max_tiles')!r}")


def read_manifest(folder: str | Path, verify_files: bool = True, hash_weights: bool = True) -> dict[str, Any]:
    """Read and validate ``manifest.json``: version, the types of every field, ``files`` covering the whole folder,
    the manifest equal to ``contract.json``, and (optionally) every file's hash. ``EngineFolderError`` otherwise.

    ``hash_weights=False`` leaves the weight shards' hashes to the caller: the runtime's weight loader
    (``export.weights.load_weights``) hashes each shard as it reads it, so a load reads the weights once."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    try:
        if not path.is_file():
            raise EngineFolderError(f"{folder}: no {MANIFEST_NAME}: not an engine folder (or an incomplete build)")
        raw = path.read_bytes()
    except OSError as e:
        raise EngineFolderError(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise EngineFolderError(f"{path}: not UTF-8 text ({e})") from e
    except (ValueError, RecursionError) as e:
        raise EngineFolderError(f"{path}: not valid JSON ({e})"[:400]) from e
    _validate(path, manifest)
    files: dict[str, str] = manifest["files"]
    # every file must be listed (so emptying ``files`` is refused) and every listed file must be there
    try:
        present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink()}
    except OSError as e:
        raise EngineFolderError(f"{folder}: cannot list the folder ({e.strerror or e})") from e
    present.discard(MANIFEST_NAME)
    for program in program_names(manifest):
        rel = manifest["programs"][program]["file"]
        if rel not in files:
            raise EngineFolderError(f"{path}: the {program} program file {rel} is not listed in 'files'")
    if CONTRACT_NAME not in files:
        raise EngineFolderError(f"{path}: {CONTRACT_NAME} is not listed in 'files'")
    unlisted = sorted(present - set(files))
    if unlisted:
        raise EngineFolderError(f"{path}: files in the folder that the manifest does not list: "
                                f"{', '.join(unlisted[:5])}{' ...' if len(unlisted) > 5 else ''}")
    deferred = set(manifest["weights"]["shards"]) if "weights" in manifest and not hash_weights else set()
    for rel, digest in files.items():
        file = folder / rel
        if not file.is_file() or file.is_symlink():
            raise EngineFolderError(f"{folder}: file {rel} listed in the manifest is missing")
        if verify_files and rel not in deferred and sha256_file(file) != digest:
            raise EngineFolderError(f"{folder}: file {rel} does not match its hash in the manifest (modified or corrupt)")
    _check_contract(folder, manifest)
    return manifest


def _check_contract(folder: Path, manifest: dict[str, Any]) -> None:
    """The manifest's fields must equal, as whole JSON values, those ``contract.json`` pinned at build time."""
    path = folder / CONTRACT_NAME
    try:
        contract = json.loads(path.read_bytes().decode("utf-8"))
        text = contract["manifest"]
        pinned = json.loads(text)
        if hashlib.sha256(text.encode()).hexdigest() != contract["sha256"] or not isinstance(pinned, dict):
            raise ValueError("hash mismatch")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise EngineFolderError(f"{path}: unreadable or damaged ({type(e).__name__}: {e})"[:400]) from e
    fields = contract_fields(manifest)
    if canonical_json(fields) == canonical_json(pinned):
        return
    changed = []
    for key in sorted(set(fields) | set(pinned)):
        a, b = fields.get(key, _MISSING), pinned.get(key, _MISSING)
        if a is _MISSING or b is _MISSING or canonical_json(a) != canonical_json(b):
            if isinstance(a, dict) and isinstance(b, dict):
                changed += [f"{key}.{k}" for k in sorted(set(a) | set(b))
                            if k not in a or k not in b or canonical_json(a[k]) != canonical_json(b[k])]
            else:
                changed.append(key + (" (added)" if b is _MISSING else " (removed)" if a is _MISSING else ""))
    raise EngineFolderError(
        f"{folder / MANIFEST_NAME}: fields differ from what the engine was built with ({CONTRACT_NAME}): "
        f"{', '.join(changed)}; the manifest was edited: rebuild the engine or restore the manifest"
    )


_MISSING = object()
