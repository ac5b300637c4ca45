"""The second TensorRT path: ``torch_tensorrt.dynamo.compile`` of an exported program, our ops as the same plugins.

Hand-written ``@dynamo_tensorrt_converter`` converters (``supports_dynamic_shapes=True``) turn the model's custom
ops into the plugins that the ONNX path puts in its graphs (namespace ``minimax``, version "1", AOT
implementations: ``ctx.net.add_plugin(trtp.op.minimax.<name>(...), aot=True)``):

    torch.ops.minimax.lightning_prefill -> lightning_prefill        (q, k, v, s, initial_state) -> (o, state)
    torch.ops.minimax.lightning_decode  -> lightning_decode         (q, k, v, s, state) -> (o, state)
    torch.ops.minimax.moe               -> the plugin chain of ``onnx_lowering.moe_plan`` (same plan as ONNX):
        grouped: moe_route -> moe_align -> moe_swiglu_grouped -> moe_down_grouped -> moe_combine
        decode:  moe_route -> moe_swiglu_decode -> moe_down_combine_decode
    torch.ops.minimax.paged_kv_update   -> paged_kv_write (outputs aliased to the pools: in place)
    torch.ops.minimax.paged_attention_prefill -> paged_attention_prefill
    torch.ops.minimax.paged_attention_decode  -> paged_decode_split -> paged_decode_merge

The program compiled is the functional form of the exported one (``onnx_lowering.functional_program``: state
returned as outputs, the KV write as ``paged_kv_update``), as for ONNX.

Why by hand: torch-tensorrt 2.11 switches its QDP generators (``generate_plugin``, ``generate_plugin_converter``,
``custom_op``) off when TensorRT is 10.14/10.15 (``_features.py``; tensorrt_notes.md gotcha 1), and they are
single-output and JIT-only anyway (§2.5). ``dynamo_tensorrt_converter`` itself is not gated.

The wiring of every op (which plugin, which inputs in which order, which attributes, how outputs feed the next
stage) is written once, in ``lightning_call`` / ``moe_chain``, against an ``emit(plugin, inputs, attrs) ->
outputs`` callback. The converters pass an emitter that adds TensorRT plugin layers; the tests pass one that runs
the reference stages (``kernels/moe/stages.py``) and check the chain against the model's op without TensorRT.

``compile_program`` compiles one exported program (``exporting.export_programs``) with explicit typing (dtypes from
the graph: cast the model to bf16 first for a bf16 engine), ``min_block_size=1`` and, by default,
``require_full_compilation=True``; its inputs get one profile each from ``tensorrt_lowering.optimization_profile``
(opt batch 2 where max_batch allows: torch-tensorrt fails when opt == min, pytorch/TensorRT#4103).
``serialize_program`` gives the raw engine bytes instead (``convert_exported_program_to_serialized_trt_engine``; the
engine's tensor names are then torch-tensorrt's, not the engine-folder contract's). Imports of torch_tensorrt and
tensorrt happen inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.export import ExportedProgram

from .engine_folder import BuildSettings, EngineFolderError

logger = logging.getLogger(__name__)

__all__ = [
    "Emit",
    "lightning_call",
    "moe_chain",
    "paged_kv_call",
    "paged_attention_call",
    "checked_emitter",
    "program_inputs",
    "register_converters",
    "compile_program",
    "serialize_program",
    "check_available",
]

Emit = Callable[[str, Sequence[Any], dict[str, int]], Sequence[Any]]

# (settings, program name) of the compilation in progress: the MoE converter needs the program's chain plan.
_ACTIVE: contextvars.ContextVar[tuple[BuildSettings, str] | None] = contextvars.ContextVar("_ACTIVE", default=None)
_registered = False


# ----------------------------------------------------------------------------------------------- wiring (pure)
def lightning_call(emit: Emit, op: str, q, k, v, s, state) -> tuple[Any, Any]:
    """``lightning_prefill`` / ``lightning_decode``: one plugin, the op's inputs in order, ``(o, state)`` out."""
    if op not in ("lightning_prefill", "lightning_decode"):
        raise ValueError(f"{op!r} is not a lightning attention plugin")
    o, new_state = emit(op, [q, k, v, s, state], {})
    return o, new_state


def moe_chain(emit: Emit, x, router_weight, w1, w3, w2, *, top_k: int, num_experts: int, plan: dict[str, Any]):
    """``minimax::moe`` as a chain of plugins (``plan`` from ``onnx_lowering.moe_plan``): returns y [T, hidden]."""
    topk_weights, topk_ids = emit("moe_route", [x, router_weight], {"top_k": top_k})
    if plan["path"] == "decode":
        (h,) = emit("moe_swiglu_decode", [x, w1, w3, topk_ids], {})
        (y,) = emit("moe_down_combine_decode", [h, w2, topk_weights, topk_ids], {})
        return y
    if plan["path"] != "grouped":
        raise ValueError(f"unknown MoE path {plan['path']!r}")
    bm = int(plan["block_m"])
    sorted_slots, inv_perm, block_expert, _counts, _offsets = emit(
        "moe_align", [topk_ids], {"num_experts": num_experts, "block_m": bm})
    (h,) = emit("moe_swiglu_grouped", [x, w1, w3, sorted_slots, block_expert], {"top_k": top_k, "block_m": bm})
    (y_perm,) = emit("moe_down_grouped", [h, w2, sorted_slots, block_expert, topk_weights], {"block_m": bm})
    (y,) = emit("moe_combine", [y_perm, inv_perm], {"top_k": top_k})
    return y


def paged_kv_call(emit: Emit, k_cache, v_cache, k, v, block_table, positions) -> tuple[Any, Any]:
    """``paged_kv_update``: the ``paged_kv_write`` plugin, whose outputs alias the pools (TensorRT writes in place)."""
    k_out, v_out = emit("paged_kv_write", [k_cache, v_cache, k, v, block_table, positions], {})
    return k_out, v_out


def paged_attention_call(emit: Emit, op: str, q, k_cache, v_cache, block_table, positions, scale: float, *,
                         capacity: int, head_dim: int):
    """``paged_attention_prefill`` (one plugin) or ``paged_attention_decode`` (split -> merge, the split of
    ``onnx_lowering.decode_plan`` for this capacity and head dim): returns o."""
    if op == "paged_attention_prefill":
        (o,) = emit(op, [q, k_cache, v_cache, block_table, positions], {"scale": float(scale)})
        return o
    if op != "paged_attention_decode":
        raise ValueError(f"{op!r} is not a paged attention op")
    from .onnx_lowering import decode_plan

    split, _ = decode_plan(capacity, head_dim)
    m, l, acc = emit("paged_decode_split", [q, k_cache, v_cache, block_table, positions],
                     {"split": split, "scale": float(scale)})
    (o,) = emit("paged_decode_merge", [q, m, l, acc, positions], {"split": split})
    return o


def checked_emitter(emit: Emit) -> Emit:
    """Wrap ``emit`` with the plugin contract's checks (``plugins.spec``): known plugin, arity, attribute names,
    number of outputs returned."""
    from plugins.spec import PLUGINS

    def checked(plugin: str, inputs: Sequence[Any], attrs: dict[str, int]) -> Sequence[Any]:
        if plugin not in PLUGINS:
            raise ValueError(f"unknown plugin {plugin!r}; known: {sorted(PLUGINS)}")
        spec = PLUGINS[plugin]
        names = spec.attrs + spec.float_attrs
        if len(inputs) != len(spec.inputs) or set(attrs) != set(names):
            raise ValueError(f"{plugin}: takes inputs {spec.inputs} and attributes {names}; got "
                             f"{len(inputs)} inputs and attributes {sorted(attrs)}")
        outputs = tuple(emit(plugin, inputs, {k: float(v) if k in spec.float_attrs else int(v)
                                              for k, v in attrs.items()}))
        if len(outputs) != len(spec.outputs):
            raise ValueError(f"{plugin}: gave {len(outputs)} outputs, the contract has {spec.outputs}")
        return outputs

    return checked


def program_inputs(program: ExportedProgram, name: str, settings: BuildSettings, opt_batch: int | None = None
                   ) -> list[Any]:
    """``(name, dims)`` of the program's user inputs in call order (names from the ONNX lowering's contract
    naming, dynamic dims as None) and their profile: ``[(name, (min, opt, max))]``."""
    from .onnx_lowering import contract_names
    from .tensorrt_lowering import optimization_profile

    names, _ = contract_names(program, name)
    user = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in set(
        program.graph_signature.user_inputs)]
    if len(user) != len(names):
        raise EngineFolderError(f"{name}: {len(user)} user inputs in the exported program, {len(names)} names")
    dims = [(n, [d if isinstance(d, int) else None for d in node.meta["val"].shape]) for n, node in zip(names, user)]
    opt = min(2, settings.max_batch) if opt_batch is None else opt_batch  # opt == min breaks torch-tensorrt (#4103)
    profile = optimization_profile(dims, name, settings, opt_batch=opt)
    return [(n, profile[n]) for n, _ in dims]


# ----------------------------------------------------------------------------------------------- TensorRT parts
def check_available(settings: BuildSettings) -> None:
    """``EngineFolderError`` unless torch-tensorrt, TensorRT and a CUDA GPU are here and the build is for CUDA."""
    import importlib.util

    if settings.device != "cuda":
        raise EngineFolderError(f"torch-tensorrt builds GPU engines; the build asks for device {settings.device!r}")
    for module in ("tensorrt", "torch_tensorrt"):
        if importlib.util.find_spec(module) is None:
            raise EngineFolderError(f"{module} is not installed (pip install .[tensorrt] from NVIDIA's index; "
                                    "see docs/tensorrt.md)")
    if not torch.cuda.is_available():
        raise EngineFolderError("torch-tensorrt needs a CUDA GPU to build on; none is visible")


def _itensor(ctx, value, name: str, fp32: bool = False):
    """A TensorRT tensor for a converter argument (an ITensor, or a constant such as a weight); ``fp32``: cast to
    float32 where the plugin contract wants it (router weight, decay rates, lightning state)."""
    import tensorrt as trt
    from torch_tensorrt.dynamo.conversion.converter_utils import get_trt_tensor

    if isinstance(value, torch.Tensor) and fp32:
        value = value.float()
    t = get_trt_tensor(ctx, value, name)
    if fp32 and t.dtype != trt.float32:
        cast = ctx.net.add_cast(t, trt.float32)
        cast.name = f"{name}.cast_fp32"
        t = cast.get_output(0)
    return t


def _trt_emitter(ctx, prefix: str) -> Emit:
    import tensorrt.plugin as trtp

    def emit(plugin: str, inputs: Sequence[Any], attrs: dict[str, int]) -> Sequence[Any]:
        layer = ctx.net.add_plugin(getattr(trtp.op.minimax, plugin)(*inputs, **attrs), aot=True)
        if layer is None:
            raise RuntimeError(f"{prefix}: TensorRT refused plugin minimax::{plugin}")
        layer.name = f"{prefix}.{plugin}"
        return [layer.get_output(i) for i in range(layer.num_outputs)]

    return checked_emitter(emit)


def register_converters() -> None:
    """Register the converters of ``torch.ops.minimax.*`` with torch-tensorrt (once per process)."""
    global _registered
    if _registered:
        return
    import importlib

    import plugins
    from torch_tensorrt.dynamo.conversion import dynamo_tensorrt_converter

    importlib.import_module("kernels")  # registers torch.ops.minimax.*
    plugins.register_all()

    def lightning(op: str):
        def convert(ctx, target, args, kwargs, name):
            q, k, v = (_itensor(ctx, a, f"{name}.{n}") for a, n in zip(args[:3], "qkv"))
            s = _itensor(ctx, args[3], f"{name}.s", fp32=True)
            state = _itensor(ctx, args[4], f"{name}.state", fp32=True)
            return tuple(lightning_call(_trt_emitter(ctx, name), op, q, k, v, s, state))

        return convert

    for op in ("lightning_prefill", "lightning_decode"):
        dynamo_tensorrt_converter(getattr(torch.ops.minimax, op).default, supports_dynamic_shapes=True)(lightning(op))

    @dynamo_tensorrt_converter(torch.ops.minimax.moe.default, supports_dynamic_shapes=True)
    def _moe(ctx, target, args, kwargs, name):
        from .onnx_lowering import moe_plan

        active = _ACTIVE.get()
        if active is None:
            raise RuntimeError("minimax::moe is converted only inside compile_program (it needs the program's plan)")
        settings, program = active
        x, router_weight, w1, w3, w2 = args[:5]
        top_k = int(args[5] if len(args) > 5 else kwargs["top_k"])
        num_experts = int(w1.shape[0])
        plan = moe_plan(settings, program, top_k, num_experts)
        tensors = [_itensor(ctx, x, f"{name}.x"), _itensor(ctx, router_weight, f"{name}.router_weight", fp32=True),
                   *(_itensor(ctx, w, f"{name}.{n}") for w, n in ((w1, "w1"), (w3, "w3"), (w2, "w2")))]
        return moe_chain(_trt_emitter(ctx, name), *tensors, top_k=top_k, num_experts=num_experts, plan=plan)

    @dynamo_tensorrt_converter(torch.ops.minimax.paged_kv_update.default, supports_dynamic_shapes=True)
    def _kv_write(ctx, target, args, kwargs, name):
        tensors = [_itensor(ctx, a, f"{name}.{n}") for a, n in
                   zip(args[:6], ("k_cache", "v_cache", "k", "v", "block_table", "positions"))]
        return tuple(paged_kv_call(_trt_emitter(ctx, name), *tensors))

    def attention(op: str):
        def convert(ctx, target, args, kwargs, name):
            q, k_cache, v_cache, table, positions = args[:5]
            scale = float(args[5] if len(args) > 5 else kwargs["scale"])
            capacity = int(table.shape[1]) * int(k_cache.shape[2])
            tensors = [_itensor(ctx, a, f"{name}.{n}") for a, n in
                       zip(args[:5], ("q", "k_cache", "v_cache", "block_table", "positions"))]
            return paged_attention_call(_trt_emitter(ctx, name), op, *tensors, scale, capacity=capacity,
                                        head_dim=int(q.shape[-1]))

        return convert

    for op in ("paged_attention_prefill", "paged_attention_decode"):
        dynamo_tensorrt_converter(getattr(torch.ops.minimax, op).default, supports_dynamic_shapes=True)(attention(op))

    _registered = True
    logger.info("registered torch-tensorrt converters for minimax::lightning_prefill, lightning_decode, moe, "
                "paged_kv_update, paged_attention_prefill, paged_attention_decode")


@contextlib.contextmanager
def _active(settings: BuildSettings, program: str) -> Iterator[None]:
    token = _ACTIVE.set((settings, program))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def _trt_inputs(program: ExportedProgram, name: str, settings: BuildSettings) -> list[Any]:
    """``arg_inputs`` in the program's call structure: ``[input_ids, positions, block_table, [state...]]``."""
    import torch_tensorrt

    dtypes = {n.name: n.meta["val"].dtype for n in program.graph.nodes if n.op == "placeholder"}
    user = [n for n in program.graph_signature.user_inputs]
    inputs = []
    for (tensor, (lo, opt, hi)), node in zip(program_inputs(program, name, settings), user):
        if lo == hi:
            inputs.append(torch_tensorrt.Input(shape=lo, dtype=dtypes[node], name=tensor))
        else:
            inputs.append(torch_tensorrt.Input(min_shape=lo, opt_shape=opt, max_shape=hi, dtype=dtypes[node],
                                               name=tensor))
    return [inputs[0], inputs[1], inputs[2], inputs[3:]]


def _common_settings(settings: BuildSettings, require_full_compilation: bool) -> dict[str, Any]:
    return dict(
        device=torch.device("cuda", torch.cuda.current_device()),
        use_explicit_typing=True,  # strongly typed: precisions from the graph's dtypes
        min_block_size=1,  # our ops are single nodes between small aten segments: convert everything
        require_full_compilation=require_full_compilation,
        disable_tf32=settings.dtype == "float32",  # fp32 engines match eager fp32 (no TF32 matmuls)
    )


def compile_program(program: ExportedProgram, name: str, settings: BuildSettings, *,
                    require_full_compilation: bool = True, timing_cache_path: str | None = None):
    """``torch_tensorrt.dynamo.compile`` of one exported program's functional form; returns the compiled
    ``GraphModule`` (``(input_ids, positions, block_table, state) -> (logits, new state)``)."""
    check_available(settings)
    import torch_tensorrt

    from .onnx_lowering import functional_program

    register_converters()
    program = functional_program(program, name, settings)
    kwargs = _common_settings(settings, require_full_compilation)
    if timing_cache_path is not None:
        kwargs["timing_cache_path"] = str(timing_cache_path)
    with _active(settings, name):
        module = torch_tensorrt.dynamo.compile(program, arg_inputs=_trt_inputs(program, name, settings), **kwargs)
    logger.info("torch-tensorrt compiled %s", name)
    return module


def serialize_program(program: ExportedProgram, name: str, settings: BuildSettings) -> bytes:
    """The whole program as one serialized TensorRT engine (every node needs a converter)."""
    check_available(settings)
    import torch_tensorrt

    from .onnx_lowering import functional_program

    register_converters()
    program = functional_program(program, name, settings)
    with _active(settings, name):
        return torch_tensorrt.dynamo.convert_exported_program_to_serialized_trt_engine(
            program, arg_inputs=_trt_inputs(program, name, settings), **_common_settings(settings, True))
