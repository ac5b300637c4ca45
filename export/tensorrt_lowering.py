"""TensorRT lowering: exported program -> ONNX (with plugin nodes) -> TensorRT ONNX parser -> ``{name}.plan``.

The primary TensorRT path of ``build.py --backend tensorrt``. For each program (``prefill``, ``decode``):

1. ``export.onnx_lowering.lower`` writes ``{name}.onnx`` (+ external weights) into the engine folder, with our ops
   as custom-domain nodes (op type = plugin name, ``plugin_namespace="minimax"``, ``plugin_version="1"``,
   ``aot=1``). The ONNX file stays in the folder: it is what the plan was parsed from (trtexec / polygraphy input).
2. ``plugins.register_all()`` registers the TensorRT Python plugins (QDP, AOT implementations) in this process,
   so that the parser's fallback plugin importer finds ``minimax::<op>`` version "1".
3. A STRONGLY_TYPED network (precisions come from the ONNX tensor dtypes: bf16 weights stay bf16; no deprecated
   FP16/BF16 builder flags), parsed with ``OnnxParser.parse_from_file`` (external data resolved beside the file).
4. One optimization profile per engine (``optimization_profile``): batch in [1, max_batch] for every input;
   prefill ``input_ids`` T in [2, max_input_len]; decode T = 1. Opt shapes: batch 1 (the project's latency target
   is batch-1 decode) and T = max_input_len (chunked prefill runs full chunks).
5. A timing cache ``timing.cache`` in the engine folder: read if present (the first program of this build wrote
   it, or the folder being replaced by an ``--overwrite`` rebuild had one), used by the builder and written back
   after each build, so the second program and later rebuilds reuse the first one's kernel timings.
6. ``build_serialized_network`` -> ``{name}.plan``. Builder progress and TensorRT's log go to ``logging``.

Every decision that does not need TensorRT (profile shapes per input name, parser flags, network flags, workspace
limit, timing-cache location) is a pure function here, tested in CI without TensorRT (``tests/test_tensorrt.py``).
TensorRT itself is imported lazily: this module imports without it, and ``check_available`` refuses clearly.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from torch.export import ExportedProgram

from .engine_folder import BuildSettings, EngineFolderError

logger = logging.getLogger(__name__)

__all__ = [
    "MIN_TENSORRT",
    "TIMING_CACHE_NAME",
    "BuildPlan",
    "check_available",
    "lower",
    "optimization_profile",
    "parser_flags",
    "workspace_limit",
    "timing_cache_sources",
    "plan_build",
    "build_serialized_engine",
]

# AOT Python plugins (``@trtp.aot_impl``) and ``PREFER_AOT_PYTHON_PLUGINS`` arrived in TensorRT 10.9
# (tensorrt_notes.md §1.1); the pinned version (pyproject ``[tensorrt]``) is 10.15.
MIN_TENSORRT = (10, 9)
TIMING_CACHE_NAME = "timing.cache"
INSTALL_HINT = "pip install .[tensorrt] from NVIDIA's index; see docs/tensorrt.md"

DimLike = int | str | None  # static extent, or a dynamic one (ONNX dim_param, TensorRT -1, None)


# ----------------------------------------------------------------------------------------------- pure decisions
def optimization_profile(
    inputs: Sequence[tuple[str, Sequence[DimLike]]],
    program: str,
    settings: BuildSettings,
    opt_batch: int = 1,
    opt_input_len: int | None = None,
    max_image_tokens: int | None = None,
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """``{input name: (min, opt, max)}`` of the one optimization profile of ``program``'s engine.

    ``inputs`` are the network's inputs in order, each ``(name, dims)`` with a dynamic extent given as -1, None or
    a symbol string (ONNX ``dim_param``, or the engine-folder contract's "B"/"T"). The contract
    (``engine_folder.program_io``) fixes which dims are dynamic: dim 0 of every input but the KV page pools
    (``key_cache.*``, ``value_cache.*``: static) is the batch B, in [1, max_batch]; dim 1 of ``input_ids`` is T, in [2, max_input_len] for prefill and exactly 1 for decode.
    Any other dynamic extent is an error (the export has a shape the engine-folder contract does not know).
    A VL prefill's ``image_embeds [B, T, hidden]`` follows input_ids; the VL ``vision`` program's inputs are
    ``pixel_values`` (dim 0: tiles N in [1, max_tiles]) and ``feature_index`` (dim 0: vectors L in [2,
    max_image_tokens]), opt at the largest call (a whole worst-case image).
    """
    if program == "vision":
        return _vision_profile(inputs, settings, max_image_tokens)
    if program not in ("prefill", "decode"):
        raise EngineFolderError(f"program {program!r} is not 'prefill' or 'decode' (or a VL engine's 'vision')")
    opt_input_len = settings.max_input_len if opt_input_len is None else opt_input_len
    if not 1 <= opt_batch <= settings.max_batch:
        raise EngineFolderError(f"opt batch {opt_batch} is outside [1, max_batch={settings.max_batch}]")
    if program == "prefill" and not 2 <= opt_input_len <= settings.max_input_len:
        raise EngineFolderError(f"opt input length {opt_input_len} is outside [2, max_input_len={settings.max_input_len}]")
    ranges = {"B": (1, opt_batch, settings.max_batch)}
    ranges["T"] = (2, opt_input_len, settings.max_input_len) if program == "prefill" else (1, 1, 1)
    profile = {}
    for name, dims in inputs:
        dims = list(dims)
        if not dims:
            raise EngineFolderError(f"{program} input {name!r} is a scalar; every engine input starts with the batch")
        mins, opts, maxs = [], [], []
        for axis, d in enumerate(dims):
            dynamic = d is None or isinstance(d, str) or d < 0
            pool = name.startswith(("key_cache.", "value_cache."))  # KV page pools: every dim static
            symbol = "B" if axis == 0 and not pool else (
                "T" if name in ("input_ids", "image_embeds") and axis == 1 else None)
            if symbol is None:
                if dynamic:
                    raise EngineFolderError(
                        f"{program} input {name!r} has a dynamic dim {axis} ({d!r}) in shape {dims}; only the "
                        "batch (dim 0) and the prefill length (input_ids dim 1) may be dynamic"
                    )
                lo = mid = hi = d
            else:
                lo, mid, hi = ranges[symbol]
                if not dynamic and not lo == hi == d:  # a static extent is fine only where the range is one value
                    raise EngineFolderError(
                        f"{program} input {name!r} has a static {symbol} = {d} (dim {axis}), but the engine must "
                        f"accept {symbol} in [{lo}, {hi}]: the export specialised a dimension it should keep dynamic"
                    )
            mins.append(lo)
            opts.append(mid)
            maxs.append(hi)
        profile[name] = (tuple(mins), tuple(opts), tuple(maxs))
    return profile


def _vision_profile(inputs: Sequence[tuple[str, Sequence[DimLike]]], settings: BuildSettings,
                    max_image_tokens: int | None) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    if settings.max_tiles < 1 or max_image_tokens is None or max_image_tokens < 2:
        raise EngineFolderError(f"vision: the profile needs max_tiles >= 1 and max_image_tokens >= 2, got "
                                f"{settings.max_tiles} and {max_image_tokens}")
    ranges = {"pixel_values": (1, settings.max_tiles, settings.max_tiles),
              "feature_index": (2, max_image_tokens, max_image_tokens)}
    if [name for name, _ in inputs] != list(ranges):
        raise EngineFolderError(f"vision: inputs {[name for name, _ in inputs]}, expected {list(ranges)}")
    profile = {}
    for name, dims in inputs:
        dims = list(dims)
        for axis, d in enumerate(dims[1:], start=1):
            if d is None or isinstance(d, str) or d < 0:
                raise EngineFolderError(f"vision input {name!r} has a dynamic dim {axis} ({d!r}) in shape {dims}; "
                                        "only dim 0 (tiles, vectors) may be dynamic")
        lo, mid, hi = ranges[name]
        profile[name] = tuple(tuple([v, *dims[1:]]) for v in (lo, mid, hi))
    return profile


def parser_flags(plugin_names: Sequence[str]) -> list[str]:
    """``OnnxParserFlag`` names to set: ``ENABLE_PLUGIN_OVERRIDE`` (TensorRT 10.15) only when a plugin shares its
    name with a standard ONNX operator; otherwise the parser already prefers a registered plugin for the node's
    ``plugin_namespace`` (notes §1.7), and overriding standard ops would be a surprise."""
    import onnx.defs

    clashes = [n for n in plugin_names if onnx.defs.has(n)]
    if clashes:
        logger.info("plugins %s share names with ONNX operators: enabling ENABLE_PLUGIN_OVERRIDE", clashes)
        return ["ENABLE_PLUGIN_OVERRIDE"]
    return []


def workspace_limit(total_device_memory: int, weight_bytes: int) -> int:
    """Builder WORKSPACE pool limit (bytes): half of what the weights leave (the builder holds the parsed weights and
    the engine's copy), clamped to [256 MiB, 8 GiB]; tactics needing more scratch are skipped, not failed."""
    lo, hi = 256 << 20, 8 << 30
    spare = (total_device_memory - 2 * weight_bytes) // 2
    return int(min(hi, max(lo, spare)))


_STAGING = re.compile(r"^\.(?P<name>.+)\.building-[^/]*$")


def timing_cache_sources(folder: Path) -> list[Path]:
    """Where a timing cache may already exist, best first: ``folder/timing.cache`` (written by the build of the
    first program), then the same file in the engine folder this staged build replaces (``staged_folder`` builds in
    ``.{name}.building-*`` beside the destination ``{name}``; an ``--overwrite`` rebuild thus reuses old timings)."""
    folder = Path(folder)
    sources = [folder / TIMING_CACHE_NAME]
    m = _STAGING.match(folder.name)
    if m:
        sources.append(folder.parent / m.group("name") / TIMING_CACHE_NAME)
    return sources


@dataclass(frozen=True)
class BuildPlan:
    """Everything the TensorRT build of one program uses, decided without TensorRT."""

    program: str
    network_flags: tuple[str, ...] = ("STRONGLY_TYPED", "PREFER_AOT_PYTHON_PLUGINS")
    parser_flags: tuple[str, ...] = ()
    workspace_bytes: int = 1 << 30
    builder_optimization_level: int = 3  # TensorRT's default: the full tactic search
    tf32: bool = True  # TF32 matmuls for fp32 tensors (TensorRT's default); off for fp32 builds (eager parity)
    opt_batch: int = 1
    opt_input_len: int | None = None  # None: max_input_len
    max_image_tokens: int | None = None  # the vision program's feature_index bound
    timing_cache: str = TIMING_CACHE_NAME
    # weight-stripped plans: the weights stay in the folder's ONNX external data (written once, shared by both
    # programs) and are refit into the deserialized engine at load (runtime/tensorrt.py); REFIT_IDENTICAL keeps the
    # optimisations of a non-refittable build, since the refit weights are the build's own
    builder_flags: tuple[str, ...] = ("STRIP_PLAN", "REFIT_IDENTICAL")
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def weights_stripped(self) -> bool:
        return "STRIP_PLAN" in self.builder_flags


def plan_build(program: str, settings: BuildSettings, plugin_names: Sequence[str], total_device_memory: int,
               weight_bytes: int, strip_weights: bool = True) -> BuildPlan:
    """The ``BuildPlan`` of ``program``; ``EngineFolderError`` for a request TensorRT cannot build.
    ``strip_weights=False`` bakes the weights into the plan (a self-contained plan, twice the folder size)."""
    settings.validate()
    if settings.backend != "tensorrt":
        raise EngineFolderError(f"tensorrt lowering called for backend {settings.backend!r}")
    if settings.device != "cuda":
        raise EngineFolderError(f"backend 'tensorrt' builds GPU engines; --device is {settings.device!r}")
    return BuildPlan(
        program=program,
        parser_flags=tuple(parser_flags(plugin_names)),
        workspace_bytes=workspace_limit(total_device_memory, weight_bytes),
        tf32=settings.dtype != "float32",
        builder_flags=("STRIP_PLAN", "REFIT_IDENTICAL") if strip_weights else (),
        notes={
            "precision": f"strongly typed: tensor dtypes from the ONNX graph ({settings.dtype} weights)",
            "plugins": "AOT (ONNX nodes carry aot=1; PREFER_AOT_PYTHON_PLUGINS as well); a tensor-parallel rank's "
                       "all_reduce / all_gather nodes (aot=0) take the JIT plugins of plugins/collectives.py",
        },
    )


def dim_upper_bound(program: ExportedProgram, input_index: int, axis: int) -> int:
    """The export's upper bound of dim ``axis`` of user input ``input_index`` (its ``Dim``'s max)."""
    specs = [s for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == specs[input_index].arg.name)
    d = node.meta["val"].shape[axis]
    if isinstance(d, int):
        return d
    return int(program.range_constraints[d.node.expr].upper)


def registered_plugin_names() -> list[str]:
    """Op types of our plugins (``plugins.spec.PLUGINS``, and the tensor-parallel collectives of
    ``plugins.collectives``), without the namespace."""
    from plugins.collectives import COLLECTIVES
    from plugins.spec import PLUGINS

    return sorted({str(getattr(spec, "name", key)).split("::")[-1] for key, spec in PLUGINS.items()} | set(COLLECTIVES))


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def check_tensorrt_version(version: str) -> None:
    if _version_tuple(version)[:2] < MIN_TENSORRT:
        raise EngineFolderError(
            f"TensorRT {version} is too old: AOT Python plugins need >= {'.'.join(map(str, MIN_TENSORRT))} "
            f"({INSTALL_HINT})"
        )


# ----------------------------------------------------------------------------------------------- lowering protocol
def check_available(settings: BuildSettings) -> None:
    """Refuse (``EngineFolderError``) before any long work when a TensorRT engine cannot be built here."""
    if settings.device != "cuda":
        raise EngineFolderError(f"backend 'tensorrt' builds GPU engines; the build asks for device {settings.device!r}")
    if importlib.util.find_spec("tensorrt") is None:
        raise EngineFolderError(f"backend 'tensorrt' is not available: TensorRT is not installed ({INSTALL_HINT})")
    import torch

    if not torch.cuda.is_available():
        raise EngineFolderError("backend 'tensorrt' needs a CUDA GPU to build on; none is visible")
    import tensorrt as trt

    check_tensorrt_version(trt.__version__)
    for module in ("plugins", "export.onnx_lowering"):
        if importlib.util.find_spec(module) is None:
            raise EngineFolderError(f"backend 'tensorrt' needs {module}, which is missing from this checkout")
    from . import onnx_lowering

    onnx_lowering.check_available(settings)


def lower(program: ExportedProgram, folder: Path, name: str, settings: BuildSettings) -> dict[str, Any]:
    """Write ``{name}.onnx`` (+ data) and ``{name}.plan`` into ``folder``; update ``timing.cache``."""
    import torch

    from . import onnx_lowering

    folder = Path(folder)
    start = time.perf_counter()
    onnx_entries = onnx_lowering.lower(program, folder, name, settings)
    onnx_path = folder / onnx_entries["file"]
    logger.info("%s: ONNX written (%s) in %.1fs", name, onnx_path.name, time.perf_counter() - start)

    plugin_names = registered_plugin_names()
    weight_bytes = sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name.startswith(name))
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    plan = plan_build(name, settings, plugin_names, total, weight_bytes)
    if name == "vision":  # the packing index's bound, as the export set it
        plan = dataclasses.replace(plan, max_image_tokens=dim_upper_bound(program, 1, 0))

    cache_in = None
    for source in timing_cache_sources(folder):
        if source.is_file():
            cache_in = source.read_bytes()
            logger.info("%s: reusing timing cache %s (%d bytes)", name, source, len(cache_in))
            break

    start = time.perf_counter()
    engine_bytes, cache_out, profile = build_serialized_engine(onnx_path, plan, settings, cache_in)
    plan_path = folder / f"{name}.plan"
    with open(plan_path, "wb") as f:
        f.write(engine_bytes)
    (folder / plan.timing_cache).write_bytes(cache_out)
    logger.info("%s: TensorRT engine %s (%.1f MiB) built in %.1fs", name, plan_path.name,
                plan_path.stat().st_size / 2**20, time.perf_counter() - start)
    import tensorrt as trt

    return {
        "file": plan_path.name,
        "state_update": "outputs",  # functional engine I/O; the KV pools' outputs alias their inputs (in place)
        "onnx": onnx_entries,
        "timing_cache": plan.timing_cache,
        "optimization_profile": {n: {"min": list(a), "opt": list(b), "max": list(c)} for n, (a, b, c) in profile.items()},
        # a stripped plan is refit at load from this ONNX graph's initializers (its external data in the folder)
        "refit_from": onnx_entries["file"] if plan.weights_stripped else None,
        "tensorrt": {"version": trt.__version__, "network_flags": list(plan.network_flags),
                     "builder_flags": list(plan.builder_flags),
                     "parser_flags": list(plan.parser_flags), "workspace_bytes": plan.workspace_bytes,
                     "builder_optimization_level": plan.builder_optimization_level, "tf32": plan.tf32},
    }


# ----------------------------------------------------------------------------------------------- TensorRT calls
_TRT_LOG_LEVELS = {"INTERNAL_ERROR": logging.CRITICAL, "ERROR": logging.ERROR, "WARNING": logging.WARNING,
                   "INFO": logging.DEBUG, "VERBOSE": logging.DEBUG}  # TensorRT's INFO is chatty: debug here


def trt_logger():
    """A ``trt.ILogger`` forwarding TensorRT's messages to ``logging`` (logger ``export.tensorrt_lowering.trt``)."""
    import tensorrt as trt

    log = logging.getLogger(__name__ + ".trt")

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            log.log(_TRT_LOG_LEVELS.get(getattr(severity, "name", str(severity)), logging.INFO), "%s", msg)

    return _Logger()


def _progress_monitor(program: str):
    """A ``trt.IProgressMonitor`` logging the builder's top-level phases (INFO) and steps (DEBUG)."""
    import tensorrt as trt

    class _Progress(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self._start: dict[str, float] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self._start[phase_name] = time.perf_counter()
            logger.log(logging.INFO if parent_phase is None else logging.DEBUG,
                       "%s: TensorRT %s (%d steps)", program, phase_name, num_steps)

        def step_complete(self, phase_name, step):
            logger.debug("%s: TensorRT %s step %d", program, phase_name, step)
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            elapsed = time.perf_counter() - self._start.pop(phase_name, time.perf_counter())
            logger.debug("%s: TensorRT %s done in %.1fs", program, phase_name, elapsed)

    return _Progress()


def build_serialized_engine(onnx_path: Path, plan: BuildPlan, settings: BuildSettings, timing_cache: bytes | None):
    """Parse ``onnx_path`` and build its engine: ``(plan bytes, timing-cache bytes, profile shapes)``."""
    import tensorrt as trt

    import plugins

    plugins.register_all()  # before parsing: the parser's plugin importer looks the creators up
    log = trt_logger()
    builder = trt.Builder(log)
    flags = 0
    for flag in plan.network_flags:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, flag))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, log)
    for flag in plan.parser_flags:
        parser.set_flag(getattr(trt.OnnxParserFlag, flag))
    start = time.perf_counter()
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineFolderError(f"{onnx_path}: the TensorRT ONNX parser failed:\n{errors}")
    logger.info("%s: parsed %s (%d layers) in %.1fs", plan.program, onnx_path.name, network.num_layers,
                time.perf_counter() - start)

    inputs = [(network.get_input(i).name, tuple(network.get_input(i).shape)) for i in range(network.num_inputs)]
    shapes = optimization_profile(inputs, plan.program, settings, plan.opt_batch, plan.opt_input_len,
                                  plan.max_image_tokens)
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    config.builder_optimization_level = plan.builder_optimization_level
    if not plan.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    config.progress_monitor = _progress_monitor(plan.program)
    cache = config.create_timing_cache(timing_cache or b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        logger.warning("%s: the timing cache was made for another device or TensorRT version; starting a new one",
                       plan.program)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineFolderError(f"{onnx_path}: TensorRT could not build the {plan.program} engine (see the log above)")
    cache_bytes = bytes(memoryview(config.get_timing_cache().serialize()))
    return memoryview(serialized), cache_bytes, shapes
