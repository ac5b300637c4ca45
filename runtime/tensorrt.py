"""Runs the TensorRT engines of an engine folder (``backend: "tensorrt"``): ``load_programs(folder, manifest, device)``.

Each program (``prefill.plan``, ``decode.plan``) is deserialized with ``trt.Runtime`` after
``plugins.register_all()`` (our plugins are AOT: the engine carries their PTX and needs no Python, but registering
first is harmless and is what a JIT plugin would need). A program is called like the AOTInductor ones:

    fn(input_ids [B, T] int64, positions [B] int64, block_table [B, M] int32, state: list[Tensor])
        -> (logits [B, 1, V] fp32, list[Tensor])

Binding: tensors are bound by the manifest's names (``inputs``/``outputs`` of the program: ``input_ids``,
``positions``, ``block_table``, the state names; ``logits``, ``<state>.out``) with ``set_input_shape`` + ``set_tensor_address``;
output buffers are torch tensors of the shapes the context reports once the input shapes are set; the engine runs
with ``execute_async_v3`` on the current torch stream. Before the first call the engine's I/O (names, direction,
dtypes) is checked against the manifest, and every call's inputs against the profile (clear errors, nothing runs).

State in and out: engine outputs alias inputs where the engine says so (``ICudaEngine.get_aliased_input_tensor``).
The KV page pools are such outputs: the ``paged_kv_write`` plugin declares ``<pool>.out`` an alias of ``<pool>``
(``TensorDesc.aliased()``), so the output is bound to the input's address, the engine writes the new tokens in
place and the input tensor itself is returned. The lightning states are not aliased: each gets its own output
buffer and the next call reads it (double-buffering).

CUDA graph: ``decode`` is captured in a CUDA graph for the batch size of its first call (re-captured when the batch
size changes, or when the caller's pools are other tensors than the captured ones), on an execution context of its
own, with two static sets of the non-aliased states (A -> B and B -> A graphs, ping-pong) and the caller's pools
bound in place: a call whose states are the set the previous call returned replays with no copy; other state
tensors are copied into set A first. The returned states therefore belong to the program and stay valid until the
next-but-one decode call (pass them back, as ``runtime.Engine`` does, or clone them); logits are returned as a new
tensor. If capture fails (an engine with operations not allowed under capture), decode falls back to plain
enqueues and says so once in the log. ``load_programs(..., cuda_graph=False)`` turns capture off.

The parts that need no TensorRT (dtype tables, the manifest binding, shape resolution and checks, the alias and
ping-pong decisions) are pure and tested in CI (``tests/test_tensorrt.py``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from export.engine_folder import EngineFolderError

logger = logging.getLogger(__name__)

__all__ = [
    "TRT_TO_TORCH",
    "MANIFEST_DTYPES",
    "torch_dtype",
    "TensorSpec",
    "ProgramBinding",
    "EngineTensor",
    "TensorRTProgram",
    "DecodeGraph",
    "pingpong_source",
    "load_programs",
]

INSTALL_HINT = "pip install .[tensorrt] from NVIDIA's index; see docs/tensorrt.md"

# trt.DataType member name -> torch dtype (``trt.DataType.BF16.name == "BF16"``; tensorrt_notes.md §6).
TRT_TO_TORCH: dict[str, torch.dtype] = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT64": torch.int64,
    "INT32": torch.int32,
    "INT8": torch.int8,
    "UINT8": torch.uint8,
    "BOOL": torch.bool,
    "FP8": torch.float8_e4m3fn,
}
# dtype names the manifest uses (torch's names without "torch.").
MANIFEST_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}  # fmt: skip
# TensorRT requires bound addresses aligned to 256 bytes (NvInferRuntime.h, setTensorAddress).
ADDRESS_ALIGNMENT = 256


def torch_dtype(trt_dtype: Any) -> torch.dtype:
    """The torch dtype of a ``trt.DataType`` (or of its member name, e.g. ``"BF16"``)."""
    name = trt_dtype if isinstance(trt_dtype, str) else getattr(trt_dtype, "name", str(trt_dtype))
    name = name.split(".")[-1]
    if name not in TRT_TO_TORCH:
        raise EngineFolderError(f"TensorRT dtype {name} has no torch equivalent here (known: {', '.join(TRT_TO_TORCH)})")
    return TRT_TO_TORCH[name]


@dataclass(frozen=True)
class TensorSpec:
    """One engine I/O tensor as the manifest declares it: symbolic shape ("B", "T" or ints) and dtype."""

    name: str
    shape: tuple[int | str, ...]
    dtype: torch.dtype

    def resolve(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(sizes[d] if isinstance(d, str) else int(d) for d in self.shape)


@dataclass(frozen=True)
class EngineTensor:
    """What the engine says of one I/O tensor (from ``ICudaEngine``), for checking against the manifest."""

    name: str
    is_input: bool
    dtype: torch.dtype
    aliased_input: str | None = None


@dataclass(frozen=True)
class ProgramBinding:
    """The manifest's description of one program: tensor names in call order, shapes, dtypes, profile limits."""

    program: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch: int
    max_input_len: int
    extra: int = 0  # inputs after the state: a VL prefill's image_embeds

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any], program: str) -> "ProgramBinding":
        try:
            entry = manifest["programs"][program]
            specs = []
            for key in ("inputs", "outputs"):
                specs.append(tuple(TensorSpec(t["name"], tuple(t["shape"]), MANIFEST_DTYPES[t["dtype"]])
                                   for t in entry[key]))
            profiles = manifest["profiles"]
            extra = int(program == "prefill" and bool(specs[0]) and specs[0][-1].name == "image_embeds")
            binding = cls(program, specs[0], specs[1], int(profiles["max_batch"]), int(profiles["max_input_len"]),
                          extra)
        except KeyError as e:
            raise EngineFolderError(f"manifest: program {program!r} lacks {e} (inputs/outputs/profiles)") from e
        names = [t.name for t in binding.inputs[:3]]
        if (names != ["input_ids", "positions", "block_table"] or not binding.outputs
                or binding.outputs[0].name != "logits"):
            raise EngineFolderError(f"manifest: program {program!r} does not follow the engine-folder contract "
                                    f"(inputs start {names}, outputs start {binding.outputs[:1]})")
        if len(binding.outputs) != len(binding.inputs) - 2 - binding.extra:
            raise EngineFolderError(f"manifest: program {program!r} has {len(binding.state_inputs)} state inputs "
                                    f"but {len(binding.outputs) - 1} state outputs")
        return binding

    @property
    def state_inputs(self) -> tuple[TensorSpec, ...]:
        return self.inputs[3:len(self.inputs) - self.extra]

    @property
    def state_outputs(self) -> tuple[TensorSpec, ...]:
        return self.outputs[1:]

    def shapes(self, batch: int, seq: int) -> dict[str, tuple[int, ...]]:
        """Concrete shape of every input and output for batch ``batch`` and length ``seq``."""
        sizes = {"B": batch, "T": seq}
        return {t.name: t.resolve(sizes) for t in self.inputs + self.outputs}

    def check_engine(self, engine: Sequence[EngineTensor], where: str) -> None:
        """Refuse an engine whose I/O differs from the manifest (names, direction, dtypes)."""
        found = {t.name: t for t in engine}
        expected = {t.name: (True, t.dtype) for t in self.inputs} | {t.name: (False, t.dtype) for t in self.outputs}
        missing = [n for n in expected if n not in found]
        extra = [n for n in found if n not in expected]
        if missing or extra:
            raise EngineFolderError(f"{where}: engine tensors differ from the manifest: missing {missing}, "
                                    f"unexpected {extra}")
        for name, (is_input, dtype) in expected.items():
            t = found[name]
            if t.is_input != is_input or t.dtype != dtype:
                raise EngineFolderError(
                    f"{where}: tensor {name!r} is an engine {'input' if t.is_input else 'output'} of {t.dtype}, the "
                    f"manifest says {'input' if is_input else 'output'} of {dtype}"
                )
            if t.aliased_input is not None and t.aliased_input not in {s.name for s in self.inputs}:
                raise EngineFolderError(f"{where}: output {name!r} aliases unknown input {t.aliased_input!r}")

    def check_call(self, input_ids: Tensor, positions: Tensor, block_table: Tensor, state: Sequence[Tensor],
                   device: torch.device, extra: Sequence[Tensor] = ()) -> tuple[int, int]:
        """Validate one call's inputs; return ``(B, T)``. Errors name the tensor, its shape and the limit."""
        where = f"{self.program}"
        if input_ids.dim() != 2 or input_ids.dtype != torch.int64:
            raise ValueError(f"{where}: input_ids must be [B, T] int64, got {tuple(input_ids.shape)} {input_ids.dtype}")
        B, T = input_ids.shape
        if not 1 <= B <= self.max_batch:
            raise ValueError(f"{where}: batch {B} is outside the engine's range [1, max_batch={self.max_batch}]")
        if self.program == "decode" and T != 1:
            raise ValueError(f"{where}: input_ids must be [B, 1], got {tuple(input_ids.shape)}")
        if self.program == "prefill" and not 2 <= T <= self.max_input_len:
            raise ValueError(f"{where}: input_ids length {T} is outside the engine's range "
                             f"[2, max_input_len={self.max_input_len}]")
        if len(state) != len(self.state_inputs):
            raise ValueError(f"{where}: {len(state)} state tensors given, the engine takes {len(self.state_inputs)}")
        if len(extra) != self.extra:
            raise ValueError(f"{where}: {len(extra)} inputs after the state given, the engine takes {self.extra}"
                             f"{' (image_embeds)' if self.extra else ''}")
        shapes = self.shapes(B, T)
        for spec, t in zip(self.inputs, (input_ids, positions, block_table, *state, *extra)):
            if tuple(t.shape) != shapes[spec.name] or t.dtype != spec.dtype:
                raise ValueError(f"{where}: {spec.name} must be {list(shapes[spec.name])} {spec.dtype}, got "
                                 f"{list(t.shape)} {t.dtype}")
            if t.device != device:
                raise ValueError(f"{where}: {spec.name} is on {t.device}, the engine runs on {device}")
        return B, T


@dataclass(frozen=True)
class VisionBinding:
    """The manifest's VL ``vision`` program: ``pixel_values [N, C, S, S]``, ``feature_index [L]`` ->
    ``image_features [L, hidden]``; N in [1, max_tiles], L in [2, max_image_tokens]."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_tiles: int
    max_image_tokens: int

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> "VisionBinding":
        try:
            entry = manifest["programs"]["vision"]
            specs = [tuple(TensorSpec(t["name"], tuple(t["shape"]), MANIFEST_DTYPES[t["dtype"]]) for t in entry[key])
                     for key in ("inputs", "outputs")]
            binding = cls(specs[0], specs[1], int(manifest["vision"]["max_tiles"]),
                          int(manifest["vision"]["max_image_tokens"]))
        except KeyError as e:
            raise EngineFolderError(f"manifest: the vision program lacks {e}") from e
        if [t.name for t in binding.inputs] != ["pixel_values", "feature_index"] or \
                [t.name for t in binding.outputs] != ["image_features"]:
            raise EngineFolderError("manifest: the vision program does not follow the engine-folder contract "
                                    "(pixel_values, feature_index -> image_features)")
        return binding

    def check_call(self, pixel_values: Tensor, feature_index: Tensor, device: torch.device) -> dict[str, tuple]:
        """Validate one call; return every tensor's concrete shape."""
        N, L = (pixel_values.shape[0] if pixel_values.dim() else 0), (feature_index.shape[0] if feature_index.dim() else 0)
        if not 1 <= N <= self.max_tiles:
            raise ValueError(f"vision: {N} tiles, the engine takes [1, max_tiles={self.max_tiles}]")
        if not 2 <= L <= self.max_image_tokens:
            raise ValueError(f"vision: {L} vectors, the engine takes [2, max_image_tokens={self.max_image_tokens}]")
        shapes = {t.name: t.resolve({"N": N, "L": L}) for t in self.inputs + self.outputs}
        for spec, t in zip(self.inputs, (pixel_values, feature_index)):
            if tuple(t.shape) != shapes[spec.name] or t.dtype != spec.dtype or t.device != device:
                raise ValueError(f"vision: {spec.name} must be {list(shapes[spec.name])} {spec.dtype} on {device}, "
                                 f"got {list(t.shape)} {t.dtype} on {t.device}")
        return shapes


def bindable(t: Tensor) -> Tensor:
    """``t`` itself if TensorRT can read it in place (contiguous, 256-byte aligned), else a contiguous copy."""
    if t.is_contiguous() and t.data_ptr() % ADDRESS_ALIGNMENT == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)  # a fresh allocation: contiguous and aligned


def pingpong_source(state: Sequence[Tensor], sets: Sequence[Sequence[Tensor]]) -> int | None:
    """Index of the static set that ``state`` is (every tensor the same storage and shape), or None."""
    for i, static in enumerate(sets):
        if len(static) == len(state) and all(
            a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.dtype == b.dtype for a, b in zip(static, state)
        ):
            return i
    return None


# ----------------------------------------------------------------------------------------------- TensorRT parts
def _trt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise EngineFolderError(f"a 'tensorrt' engine needs TensorRT, which is not installed ({INSTALL_HINT})") from e
    return trt


def _trt_logger(trt):
    log = logging.getLogger(__name__ + ".trt")
    levels = {"INTERNAL_ERROR": logging.CRITICAL, "ERROR": logging.ERROR, "WARNING": logging.WARNING,
              "INFO": logging.DEBUG, "VERBOSE": logging.DEBUG}

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            log.log(levels.get(getattr(severity, "name", str(severity)), logging.INFO), "%s", msg)

    return _Logger()


def engine_tensors(engine) -> list[EngineTensor]:
    """The I/O tensors of a ``trt.ICudaEngine`` as ``EngineTensor``s."""
    trt = _trt()
    out = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        aliased = engine.get_aliased_input_tensor(name) if hasattr(engine, "get_aliased_input_tensor") else None
        out.append(EngineTensor(name, engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                                torch_dtype(engine.get_tensor_dtype(name)), aliased or None))
    return out


class TensorRTProgram:
    """One deserialized engine plus its execution context, callable with the engine-folder signature."""

    def __init__(self, engine, binding: ProgramBinding, device: torch.device, where: str, runtime=None):
        self.engine, self.binding, self.device, self.where = engine, binding, device, where
        self.runtime = runtime  # the trt.Runtime that deserialized the engine must outlive it
        tensors = engine_tensors(engine)
        binding.check_engine(tensors, where)
        self.aliases = {t.name: t.aliased_input for t in tensors if t.aliased_input}
        if engine.num_optimization_profiles != 1:
            raise EngineFolderError(f"{where}: {engine.num_optimization_profiles} optimization profiles; this runtime "
                                    "expects one engine per program with one profile")
        self.context = self.new_context()

    def new_context(self):
        with torch.cuda.device(self.device):
            context = self.engine.create_execution_context()
        if context is None:
            raise RuntimeError(f"{self.where}: TensorRT could not create an execution context (out of GPU memory?)")
        return context

    def bind(self, context, inputs: Mapping[str, Tensor], outputs: Mapping[str, Tensor] | None = None
             ) -> dict[str, Tensor]:
        """Set shapes and addresses on ``context``; allocate missing outputs; return the outputs by name."""
        for name, t in inputs.items():
            if not context.set_input_shape(name, tuple(t.shape)):
                raise ValueError(f"{self.where}: TensorRT refused shape {tuple(t.shape)} for input {name!r}")
            context.set_tensor_address(name, t.data_ptr())
        result = dict(outputs or {})
        for spec in self.binding.outputs:
            if spec.name in self.aliases:
                result[spec.name] = inputs[self.aliases[spec.name]]
            elif spec.name not in result:
                shape = tuple(context.get_tensor_shape(spec.name))
                if any(d < 0 for d in shape):
                    raise RuntimeError(f"{self.where}: output {spec.name!r} has unresolved shape {shape}")
                result[spec.name] = torch.empty(shape, dtype=spec.dtype, device=self.device)
            context.set_tensor_address(spec.name, result[spec.name].data_ptr())
        return result

    def inputs(self, input_ids: Tensor, positions: Tensor, block_table: Tensor, state: Sequence[Tensor],
               *extra: Tensor) -> dict[str, Tensor]:
        tensors = (input_ids, positions, block_table, *state, *extra)
        bound = {}
        for spec, t in zip(self.binding.inputs, tensors):
            b = bindable(t)
            if b is not t and spec.name in self.aliased_inputs:  # a copy would take the in-place write
                raise ValueError(f"{self.where}: {spec.name} is written in place and must be contiguous and "
                                 f"{ADDRESS_ALIGNMENT}-byte aligned")
            bound[spec.name] = b
        return bound

    @property
    def aliased_inputs(self) -> set[str]:
        return set(self.aliases.values())

    def __call__(self, input_ids: Tensor, positions: Tensor, block_table: Tensor, state: Sequence[Tensor],
                 *extra: Tensor) -> tuple[Tensor, list[Tensor]]:
        self.binding.check_call(input_ids, positions, block_table, state, self.device, extra)
        outputs = self.bind(self.context, self.inputs(input_ids, positions, block_table, state, *extra))
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.where}: TensorRT execute_async_v3 failed (see the log)")
        return outputs["logits"], [outputs[s.name] for s in self.binding.state_outputs]


class TensorRTVision:
    """The VL vision engine, called as ``fn(pixel_values, feature_index) -> image_features``."""

    def __init__(self, engine, binding: VisionBinding, device: torch.device, where: str, runtime=None):
        self.engine, self.binding, self.device, self.where, self.runtime = engine, binding, device, where, runtime
        found = {t.name: t for t in engine_tensors(engine)}
        expected = {t.name: (True, t.dtype) for t in binding.inputs} | {t.name: (False, t.dtype) for t in binding.outputs}
        if set(found) != set(expected) or any((found[n].is_input, found[n].dtype) != v for n, v in expected.items()):
            raise EngineFolderError(f"{where}: engine tensors {sorted(found)} differ from the manifest's vision "
                                    f"program {sorted(expected)} (names, direction or dtypes)")
        with torch.cuda.device(device):
            self.context = engine.create_execution_context()
        if self.context is None:
            raise RuntimeError(f"{where}: TensorRT could not create an execution context (out of GPU memory?)")

    def __call__(self, pixel_values: Tensor, feature_index: Tensor) -> Tensor:
        shapes = self.binding.check_call(pixel_values, feature_index, self.device)
        out = torch.empty(shapes["image_features"], dtype=self.binding.outputs[0].dtype, device=self.device)
        for name, t in (("pixel_values", bindable(pixel_values)), ("feature_index", bindable(feature_index))):
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise ValueError(f"{self.where}: TensorRT refused shape {tuple(t.shape)} for input {name!r}")
            self.context.set_tensor_address(name, t.data_ptr())
        self.context.set_tensor_address("image_features", out.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError(f"{self.where}: TensorRT execute_async_v3 failed (see the log)")
        return out


class DecodeGraph:
    """The decode step of one batch size captured in two CUDA graphs (non-aliased state set 0 -> 1 and 1 -> 0), with
    the aliased states (the KV pools) bound in place: the tensors of the call that captured it."""

    def __init__(self, program: TensorRTProgram, batch: int, state: Sequence[Tensor]):
        self.program, self.batch = program, batch
        b, dev = program.binding, program.device
        shapes = b.shapes(batch, 1)
        aliased = program.aliased_inputs
        self.in_place = [s.name in aliased for s in b.state_inputs]
        self.shared = [t if inplace else None for t, inplace in zip(state, self.in_place)]  # the caller's pools
        self.context = program.new_context()
        self.input_ids = torch.zeros(shapes["input_ids"], dtype=torch.int64, device=dev)
        # -1: the warm-up and capture steps below are left pads, which write no KV (the pools bound here are the
        # caller's, holding its rows) and attend to nothing
        self.positions = torch.full(shapes["positions"], -1, dtype=torch.int64, device=dev)
        self.block_table = torch.zeros(shapes["block_table"], dtype=torch.int32, device=dev)
        self.sets = [[torch.zeros(shapes[s.name], dtype=s.dtype, device=dev) for s, inplace in
                      zip(b.state_inputs, self.in_place) if not inplace] for _ in (0, 1)]
        self.logits = torch.empty(shapes["logits"], dtype=b.outputs[0].dtype, device=dev)
        self.graphs = []
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))  # the static buffers' zero fills come first
        for src in (0, 1):
            ins = {s.name: t for s, t in zip(b.inputs, (self.input_ids, self.positions, self.block_table,
                                                        *self._state(src)))}
            outs = {"logits": self.logits} | {
                s.name: t for s, t in zip(b.state_outputs, self._state(1 - src)) if s.name not in program.aliases}
            program.bind(self.context, ins, outs)
            with torch.cuda.stream(stream):  # warm-up enqueue outside capture (as trtexec does), then capture
                # (at positions -1: nothing is written into the caller's pools)
                if not self.context.execute_async_v3(stream.cuda_stream):
                    raise RuntimeError("warm-up enqueue failed")
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                self.context.execute_async_v3(stream.cuda_stream)
            self.graphs.append(graph)
        for t in self.sets[0] + self.sets[1]:
            t.zero_()

    def _state(self, which: int) -> list[Tensor]:
        """The full state list with set ``which`` in the non-aliased places and the shared pools in the others."""
        it = iter(self.sets[which])
        return [shared if inplace else next(it) for shared, inplace in zip(self.shared, self.in_place)]

    def matches(self, state: Sequence[Tensor]) -> bool:
        """Whether ``state``'s aliased tensors are the ones this graph writes (else it must be captured again)."""
        return all(not inplace or t.data_ptr() == shared.data_ptr()
                   for t, shared, inplace in zip(state, self.shared, self.in_place))

    def __call__(self, input_ids: Tensor, positions: Tensor, block_table: Tensor, state: Sequence[Tensor]
                 ) -> tuple[Tensor, list[Tensor]]:
        self.input_ids.copy_(input_ids)
        self.positions.copy_(positions)
        self.block_table.copy_(block_table)
        own = [t for t, inplace in zip(state, self.in_place) if not inplace]
        src = pingpong_source(own, self.sets)
        if src is None:
            for static, t in zip(self.sets[0], own):
                static.copy_(t)
            src = 0
        self.graphs[src].replay()
        return self.logits.clone(), self._state(1 - src)


class GraphedDecode:
    """``decode`` through ``DecodeGraph`` (captured per batch size and pool set, lazily), falling back to plain
    enqueues."""

    def __init__(self, program: TensorRTProgram):
        self.program = program
        self.graph: DecodeGraph | None = None
        self.enabled = True

    def __call__(self, input_ids: Tensor, positions: Tensor, block_table: Tensor, state: Sequence[Tensor]
                 ) -> tuple[Tensor, list[Tensor]]:
        B, _ = self.program.binding.check_call(input_ids, positions, block_table, state, self.program.device)
        if self.enabled and (self.graph is None or self.graph.batch != B or not self.graph.matches(state)):
            self.graph = None
            try:
                self.graph = DecodeGraph(self.program, B, state)
                logger.info("%s: decode captured in a CUDA graph for batch %d", self.program.where, B)
            except Exception as e:  # capture not possible for this engine: plain enqueues from now on
                self.enabled = False
                logger.warning("%s: CUDA-graph capture of decode failed (%s: %s); running without graphs",
                               self.program.where, type(e).__name__, e)
        if self.graph is not None:
            return self.graph(input_ids, positions, block_table, state)
        return self.program(input_ids, positions, block_table, state)


def refit_stripped_engine(trt, engine, plan_path: Path, onnx_path: Path) -> None:
    """Put the weights back into a weight-stripped plan's engine: every refittable weight from the ONNX graph it
    was built from (initializers read from the folder's external data), then ``refit_cuda_engine``.
    ``EngineFolderError`` naming the files and the weights when the graph does not supply them all."""
    start = time.perf_counter()
    if not onnx_path.is_file():
        raise EngineFolderError(f"{plan_path}: weight-stripped plan, but {onnx_path.name} (its weights) is missing")
    log = _trt_logger(trt)
    refitter = trt.Refitter(engine, log)
    parser_refitter = trt.OnnxParserRefitter(refitter, log)
    if not parser_refitter.refit_from_file(str(onnx_path)):
        errors = "; ".join(str(parser_refitter.get_error(i)) for i in range(parser_refitter.num_errors))
        raise EngineFolderError(f"{plan_path}: refitting its weights from {onnx_path.name} failed: {errors}")
    missing = refitter.get_missing_weights()
    if missing:
        raise EngineFolderError(f"{plan_path}: {len(missing)} weights not supplied by {onnx_path.name}: "
                                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if not refitter.refit_cuda_engine():
        raise EngineFolderError(f"{plan_path}: TensorRT could not refit the engine from {onnx_path.name} (see the log)")
    logger.info("%s: weights refit from %s in %.1fs", plan_path.name, onnx_path.name, time.perf_counter() - start)


def load_programs(folder: str | Path, manifest: Mapping[str, Any], device: torch.device, cuda_graph: bool = True
                  ) -> dict[str, Callable]:
    """``{"prefill": fn, "decode": fn}`` of a TensorRT engine folder (manifest already validated)."""
    folder, device = Path(folder), torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise EngineFolderError(f"{folder}: a TensorRT engine runs on a CUDA GPU; device is {device} "
                                f"(CUDA available: {torch.cuda.is_available()})")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    trt = _trt()
    import plugins

    plugins.register_all()  # before deserializing: needed by JIT plugins, harmless for our AOT ones
    built_with = ((manifest["programs"]["prefill"].get("tensorrt") or {}).get("version"))
    if built_with and built_with != trt.__version__:
        logger.warning("%s was built with TensorRT %s, this is %s: plans only load in the version that built them",
                       folder, built_with, trt.__version__)
    runtime = trt.Runtime(_trt_logger(trt))
    programs: dict[str, Callable] = {}
    for name in ("prefill", "decode", *(("vision",) if "vision" in manifest else ())):
        path = folder / manifest["programs"][name]["file"]
        with torch.cuda.device(device):
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise EngineFolderError(f"{path}: TensorRT {trt.__version__} could not deserialize this plan (built by "
                                    f"TensorRT {built_with} on another GPU or version? see the log)")
        refit_from = manifest["programs"][name].get("refit_from")
        if refit_from:
            with torch.cuda.device(device):
                refit_stripped_engine(trt, engine, path, folder / refit_from)
        if name == "vision":
            programs[name] = TensorRTVision(engine, VisionBinding.from_manifest(manifest), device, str(path), runtime)
        else:
            programs[name] = TensorRTProgram(engine, ProgramBinding.from_manifest(manifest, name), device, str(path),
                                             runtime)
        logger.info("loaded %s (TensorRT %s, %s)", path, trt.__version__, device)
    if cuda_graph:
        programs["decode"] = GraphedDecode(programs["decode"])
    return programs
