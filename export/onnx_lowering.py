"""ONNX lowering: each exported program becomes one ``.onnx`` graph whose custom ops are TensorRT-plugin nodes.

What the ONNX folder is for: it is the input of TensorRT. ``trtexec --onnx=prefill.onnx`` or polygraphy, with our
plugins registered, and the TensorRT lowering (``export/tensorrt_lowering.py``, which calls ``lower`` below to get
the graphs it parses) build engines from it. This project's runtime does not execute ONNX folders; on a machine
without TensorRT the graphs are checked structurally and evaluated numerically on the CPU by
``export/onnx_reference.py`` (``onnx.reference`` with our reference kernels as custom ops).

Lowering (``torch.onnx.export(program, dynamo=True, custom_translation_table=...)``): dynamic batch ``B`` and
prefill length ``T`` are kept (graph inputs carry dims named "B" and "T"); tensor names are the engine-folder
contract's (``engine_folder.program_io``: input_ids, positions, state names -> logits, "<state>.out"; the
protocol does not pass the config, so ``contract_names`` reads the layer plan from the program's parameter names
and checks it against the program's inputs); weights
are initializers, written to an external data file ``<program>.onnx.data`` beside the graph when they exceed
``EXTERNAL_DATA_THRESHOLD`` bytes. The model's custom ops become nodes of domain ``minimax`` (opset import
``("minimax", 1)``) whose op type, input/output order and attributes are exactly the TensorRT plugins'
(namespace "minimax", version "1"); every node carries ``plugin_namespace="minimax"``, ``plugin_version="1"``
and ``aot=1`` (the ONNX parser's plugin importer then picks the AOT implementation; tensorrt_notes.md §1.7):

    minimax::lightning_prefill(q, k, v, s, initial_state) -> lightning_prefill node: (o, final_state)
    minimax::lightning_decode(q, k, v, s, state)         -> lightning_decode node: (o, new_state)
    minimax::moe(x, router_weight, w1, w3, w2, top_k)    -> a chain of plugin nodes (``kernels/moe/stages.py``):
        grouped: moe_route -> moe_align -> moe_swiglu_grouped -> moe_down_grouped -> moe_combine
        decode:  moe_route -> moe_swiglu_decode -> moe_down_combine_decode
    minimax::moe_quantized(x, router_weight, w1, s1, w3, s3, w2, s2, top_k, "experts-int8")
                                                          -> the same chains with the ``_int8`` GEMM stages (int8
                                                             weights and their fp32 scales as inputs)

    minimax::paged_kv_write(k_cache, v_cache, k, v, block_table, positions) (in place, see below)
                                                          -> paged_kv_write node: (k_cache_out, v_cache_out)
    minimax::paged_attention_prefill(q, k_cache, v_cache, block_table, positions, scale)
                                                          -> paged_attention_prefill node: o
    minimax::paged_attention_decode(...)                  -> paged_decode_split (m, l, acc partials, ``split``
                                                             positions each) -> paged_decode_merge: o

A tensor-parallel rank's programs (``export/parallel.py``) also hold torch's functional collectives; they become
the two collective plugin nodes (``plugins/collectives.py``: JIT plugins around torch.distributed, ``aot = 0``,
attributes ``world_size`` and ``group_name``):

    _c10d_functional.all_reduce(x, "sum", group)          -> all_reduce node: y
    _c10d_functional.all_gather_into_tensor(x, n, group)  -> all_gather node: y (dim 0)
    _c10d_functional.wait_tensor(x)                       -> Identity (removed by the optimizer)

State: the exported programs update their state inputs in place (mutated inputs), which ONNX cannot say. The
lowering first derives a functional program from the exported one (``functional_program``: re-exported with the
state cloned and returned, then ``paged_kv_write``'s functionalized calls rewritten into the functional
``minimax::paged_kv_update`` and ``lightning_decode_``'s into ``lightning_decode``), so every state input has an
output ``<state>.out``. The ``paged_kv_write`` plugin
declares each output an alias of its cache input (TensorRT ``TensorDesc.aliased()``), so that a TensorRT engine
writes the new tokens into the pool in place and copies nothing; the lightning states are returned as new tensors.

The decode program takes the decode chain when every step has at most ``decode_max_tokens`` tokens (max_batch
<= 16, ``kernels/moe/dispatch.py``), as the Triton launcher does; the prefill program always takes the grouped
chain. ``block_m`` (rows per expert block of the grouped chain) is ``dispatch.default_config(n, top_k, E,
cuda).block_m`` for the program's largest token count n (prefill: max_batch * max_input_len; decode:
max_batch): the plugins run on the GPU, the largest chunks are where the grouped GEMMs spend their time, and
any block_m gives the same result (only the padding changes). It is recorded in the manifest entry.

Each custom node type has a registered ONNX ``OpSchema`` (domain "minimax", version 1): with it the onnxscript
tracer emits the node from a plain translation function, and ``onnx.checker`` checks the nodes' inputs, outputs
and attributes (notes §4). Intermediate tensors between plugin nodes get their dtype and symbolic shape
(``R = S + E*(block_m-1)`` rows etc.) in the graph's value_info.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import operator
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.export import ExportedProgram

from .engine_folder import BuildSettings, EngineFolderError

logger = logging.getLogger(__name__)

__all__ = [
    "DOMAIN",
    "PLUGIN_VERSION",
    "PLUGIN_ATTRIBUTES",
    "EXTERNAL_DATA_THRESHOLD",
    "PLUGIN_OPS",
    "COLLECTIVE_OPS",
    "COLLECTIVE_ATTRIBUTES",
    "FLOAT_ATTRIBUTES",
    "check_available",
    "functional_program",
    "lower",
    "moe_plan",
    "register_schemas",
    "save_onnx",
    "to_onnx",
]

DOMAIN = "minimax"  # ONNX node domain = TensorRT plugin namespace
PLUGIN_VERSION = "1"
PLUGIN_ATTRIBUTES = {"plugin_namespace": DOMAIN, "plugin_version": PLUGIN_VERSION, "aot": 1}
EXTERNAL_DATA_THRESHOLD = 1 << 30  # bytes of initializers above which weights go to <program>.onnx.data
OPSET = 18  # ai.onnx opset of torch's onnxscript library (TORCHLIB_OPSET); no TensorRT parser has been run on it here

_FLOAT = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]

# op type -> (inputs [(name, type or "T")], outputs [(name, type or "T")], int attributes). "T" is the activation
# dtype (fp32 / fp16 / bf16), the same for every "T" tensor of a node. The plugin contract: do not change.
PLUGIN_OPS: dict[str, tuple[list[tuple[str, str]], list[tuple[str, str]], list[str]]] = {
    "lightning_prefill": (
        [("q", "T"), ("k", "T"), ("v", "T"), ("s", "tensor(float)"), ("initial_state", "tensor(float)")],
        [("o", "T"), ("final_state", "tensor(float)")],
        [],
    ),
    "lightning_decode": (
        [("q", "T"), ("k", "T"), ("v", "T"), ("s", "tensor(float)"), ("state", "tensor(float)")],
        [("o", "T"), ("new_state", "tensor(float)")],
        [],
    ),
    "paged_kv_write": (
        [("k_cache", "T"), ("v_cache", "T"), ("k", "T"), ("v", "T"), ("block_table", "tensor(int32)"),
         ("positions", "tensor(int64)")],
        [("k_cache_out", "T"), ("v_cache_out", "T")],
        [],
    ),
    "paged_attention_prefill": (
        [("q", "T"), ("k_cache", "T"), ("v_cache", "T"), ("block_table", "tensor(int32)"),
         ("positions", "tensor(int64)")],
        [("o", "T")],
        [],
    ),
    "paged_decode_split": (
        [("q", "T"), ("k_cache", "T"), ("v_cache", "T"), ("block_table", "tensor(int32)"),
         ("positions", "tensor(int64)")],
        [("m", "tensor(float)"), ("l", "tensor(float)"), ("acc", "tensor(float)")],
        ["split"],
    ),
    "paged_decode_merge": (
        [("q", "T"), ("m", "tensor(float)"), ("l", "tensor(float)"), ("acc", "tensor(float)"),
         ("positions", "tensor(int64)")],
        [("o", "T")],
        ["split"],
    ),
    "moe_route": (
        [("x", "T"), ("router_weight", "tensor(float)")],
        [("topk_weights", "tensor(float)"), ("topk_ids", "tensor(int32)")],
        ["top_k"],
    ),
    "moe_align": (
        [("topk_ids", "tensor(int32)")],
        [("sorted_slots", "tensor(int32)"), ("inv_perm", "tensor(int32)"), ("block_expert", "tensor(int32)"),
         ("expert_counts", "tensor(int32)"), ("expert_offsets", "tensor(int32)")],
        ["num_experts", "block_m"],
    ),
    "moe_swiglu_grouped": (
        [("x", "T"), ("w1", "T"), ("w3", "T"), ("sorted_slots", "tensor(int32)"), ("block_expert", "tensor(int32)")],
        [("h", "T")],
        ["top_k", "block_m"],
    ),
    "moe_down_grouped": (
        [("h", "T"), ("w2", "T"), ("sorted_slots", "tensor(int32)"), ("block_expert", "tensor(int32)"),
         ("topk_weights", "tensor(float)")],
        [("y_perm", "T")],
        ["block_m"],
    ),
    "moe_combine": ([("y_perm", "T"), ("inv_perm", "tensor(int32)")], [("y", "T")], ["top_k"]),
    "moe_swiglu_decode": (
        [("x", "T"), ("w1", "T"), ("w3", "T"), ("topk_ids", "tensor(int32)")],
        [("h", "T")],
        [],
    ),
    "moe_down_combine_decode": (
        [("h", "T"), ("w2", "T"), ("topk_weights", "tensor(float)"), ("topk_ids", "tensor(int32)")],
        [("y", "T")],
        [],
    ),
    "moe_swiglu_grouped_int8": (
        [("x", "T"), ("w1", "tensor(int8)"), ("w3", "tensor(int8)"), ("w1_scale", "tensor(float)"),
         ("w3_scale", "tensor(float)"), ("sorted_slots", "tensor(int32)"), ("block_expert", "tensor(int32)")],
        [("h", "T")],
        ["top_k", "block_m"],
    ),
    "moe_down_grouped_int8": (
        [("h", "T"), ("w2", "tensor(int8)"), ("w2_scale", "tensor(float)"), ("sorted_slots", "tensor(int32)"),
         ("block_expert", "tensor(int32)"), ("topk_weights", "tensor(float)")],
        [("y_perm", "T")],
        ["block_m"],
    ),
    "moe_swiglu_decode_int8": (
        [("x", "T"), ("w1", "tensor(int8)"), ("w3", "tensor(int8)"), ("w1_scale", "tensor(float)"),
         ("w3_scale", "tensor(float)"), ("topk_ids", "tensor(int32)")],
        [("h", "T")],
        [],
    ),
    "moe_down_combine_decode_int8": (
        [("h", "T"), ("w2", "tensor(int8)"), ("w2_scale", "tensor(float)"), ("topk_weights", "tensor(float)"),
         ("topk_ids", "tensor(int32)")],
        [("y", "T")],
        [],
    ),
}  # fmt: skip

# The collectives of a tensor-parallel rank's programs (``plugins/collectives.py``: TensorRT JIT plugins around
# torch.distributed). One input x and one output y of the activation dtype; attributes ``world_size`` (int) and
# ``group_name`` (string) besides the plugin ones, with ``aot = 0`` (the plugins have a Python implementation only).
# all_reduce: y = sum over the ranks of x; all_gather: the ranks' x concatenated along dim 0.
COLLECTIVE_OPS = ("all_reduce", "all_gather")
COLLECTIVE_ATTRIBUTES = {"plugin_namespace": DOMAIN, "plugin_version": PLUGIN_VERSION, "aot": 0}

# op type -> float attributes (the plugin contract too): the softmax scale of the attention nodes.
FLOAT_ATTRIBUTES: dict[str, list[str]] = {"paged_attention_prefill": ["scale"], "paged_decode_split": ["scale"]}


def check_available(settings: BuildSettings) -> None:
    """Refuse (``EngineFolderError``) when onnx or onnxscript is missing; the graphs themselves need no GPU."""
    missing = [pkg for pkg in ("onnx", "onnxscript") if importlib.util.find_spec(pkg) is None]
    if missing:
        raise EngineFolderError(
            f"backend 'onnx' needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
            f"installed (pip install .[dev])"
        )


def register_schemas() -> None:
    """Register an ONNX ``OpSchema`` (domain ``minimax``, version 1) for every plugin op, once per process."""
    import onnx
    from onnx.defs import OpSchema

    for op_type, (inputs, outputs, int_attrs) in PLUGIN_OPS.items():
        if onnx.defs.has(op_type, DOMAIN):
            continue
        attributes = [
            OpSchema.Attribute("plugin_namespace", OpSchema.AttrType.STRING, "TensorRT plugin namespace", required=True),
            OpSchema.Attribute("plugin_version", OpSchema.AttrType.STRING, "TensorRT plugin version", required=True),
            OpSchema.Attribute("aot", OpSchema.AttrType.INT, "1: TensorRT uses the AOT implementation", required=True),
        ] + [OpSchema.Attribute(a, OpSchema.AttrType.INT, a, required=True) for a in int_attrs] + [
            OpSchema.Attribute(a, OpSchema.AttrType.FLOAT, a, required=True) for a in FLOAT_ATTRIBUTES.get(op_type, ())]
        schema = OpSchema(
            op_type,
            DOMAIN,
            1,
            doc=f"TensorRT plugin {DOMAIN}::{op_type} v{PLUGIN_VERSION} (semantics: kernels/moe/stages.py, "
            "kernels/lightning_attention/naive.py, kernels/attention/naive.py)",
            inputs=[OpSchema.FormalParameter(name, type_str) for name, type_str in inputs],
            outputs=[OpSchema.FormalParameter(name, type_str) for name, type_str in outputs],
            type_constraints=[("T", _FLOAT, "activation dtype")],
            attributes=attributes,
        )
        onnx.defs.register_schema(schema)
    for op_type in COLLECTIVE_OPS:
        if onnx.defs.has(op_type, DOMAIN):
            continue
        onnx.defs.register_schema(OpSchema(
            op_type, DOMAIN, 1,
            doc=f"TensorRT plugin {DOMAIN}::{op_type} v{PLUGIN_VERSION} (JIT, torch.distributed; plugins/collectives.py)",
            inputs=[OpSchema.FormalParameter("x", "T")], outputs=[OpSchema.FormalParameter("y", "T")],
            type_constraints=[("T", _FLOAT, "activation dtype")],
            attributes=[
                OpSchema.Attribute("plugin_namespace", OpSchema.AttrType.STRING, "TensorRT plugin namespace", required=True),
                OpSchema.Attribute("plugin_version", OpSchema.AttrType.STRING, "TensorRT plugin version", required=True),
                OpSchema.Attribute("aot", OpSchema.AttrType.INT, "0: the plugin's JIT implementation", required=True),
                OpSchema.Attribute("world_size", OpSchema.AttrType.INT, "ranks of the group", required=True),
                OpSchema.Attribute("group_name", OpSchema.AttrType.STRING, "torch.distributed group name", required=True),
            ],
        ))  # fmt: skip


def moe_plan(settings: BuildSettings, program: str, top_k: int, num_experts: int) -> dict[str, Any]:
    """The MoE chain of ``program``: ``{"path": "grouped"|"decode", "block_m": int|None, "tokens": n}`` (see the
    module docstring for the choice)."""
    from kernels.moe.dispatch import MoeTritonConfig, default_config

    if program == "decode" and settings.max_batch <= MoeTritonConfig().decode_max_tokens:
        return {"path": "decode", "block_m": None, "tokens": settings.max_batch}
    tokens = settings.max_batch * (settings.max_input_len if program == "prefill" else 1)
    block_m = default_config(tokens, top_k, num_experts, torch.device("cuda")).block_m
    return {"path": "grouped", "block_m": block_m, "tokens": tokens}


# ------------------------------------------------------------------------------------------- translation


def _dim(d) -> str | int:
    """An ir dimension as an int or its symbolic expression (a string)."""
    return d if isinstance(d, int) else str(d.value)


def _group(a: str) -> str:
    return f"({a})" if re.search(r"[+\-/]", a) else a


def _mul(a: str | int, b: int) -> str | int:
    return a * b if isinstance(a, int) else f"{_group(a)}*{b}"


def _add(a: str | int, b: int) -> str | int:
    return a + b if isinstance(a, int) else (a if b == 0 else f"{a}+{b}")


def _cdiv(a: str | int, b: int) -> str | int:
    return -(-a // b) if isinstance(a, int) else f"ceil({_group(a)}/{b})"


def _annotate(value, dtype, shape: list) -> None:
    """Set dtype and (symbolic) shape of an intermediate value, so that the graph's value_info describes it."""
    from onnxscript import ir

    value.dtype = dtype
    value.shape = ir.Shape([ir.SymbolicDim(d) if isinstance(d, str) else d for d in shape])


def _translation_table(plan: dict[str, Any]) -> dict:
    """``custom_translation_table`` for the exporter: our three custom ops -> plugin nodes."""
    import onnxscript
    from onnxscript import ir

    register_schemas()
    op = onnxscript.values.Opset(DOMAIN, 1)
    attrs = PLUGIN_ATTRIBUTES

    def lightning_prefill(q, k, v, s, initial_state):
        o, state = op.lightning_prefill(q, k, v, s, initial_state, **attrs)
        _annotate(o, q.dtype, [*q.shape[:3], v.shape[3]])
        _annotate(state, ir.DataType.FLOAT, list(initial_state.shape))
        return o, state

    def lightning_decode(q, k, v, s, state):
        o, new_state = op.lightning_decode(q, k, v, s, state, **attrs)
        _annotate(o, q.dtype, [*q.shape[:3], v.shape[3]])
        _annotate(new_state, ir.DataType.FLOAT, list(state.shape))
        return o, new_state

    def moe(x, router_weight, w1, w3, w2, top_k: int, scales=None):
        tokens, hidden = _dim(x.shape[0]), x.shape[1]
        E, inter = w1.shape[0], w1.shape[1]
        slots = _mul(tokens, top_k)
        topk_weights, topk_ids = op.moe_route(x, router_weight, top_k=top_k, **attrs)
        _annotate(topk_weights, ir.DataType.FLOAT, [tokens, top_k])
        _annotate(topk_ids, ir.DataType.INT32, [tokens, top_k])
        s13, s2 = ((), ()) if scales is None else (scales[:2], scales[2:])  # int8 stages: the scales after w
        q = "" if scales is None else "_int8"
        if plan["path"] == "decode":
            h = getattr(op, f"moe_swiglu_decode{q}")(x, w1, w3, *s13, topk_ids, **attrs)
            _annotate(h, x.dtype, [slots, inter])
            y = getattr(op, f"moe_down_combine_decode{q}")(h, w2, *s2, topk_weights, topk_ids, **attrs)
            _annotate(y, x.dtype, [tokens, hidden])
            return y
        bm = plan["block_m"]
        rows = _add(slots, E * (bm - 1))
        blocks = _cdiv(rows, bm)
        sorted_slots, inv_perm, block_expert, counts, offsets = op.moe_align(
            topk_ids, num_experts=E, block_m=bm, **attrs
        )
        for value, shape in ((sorted_slots, [rows]), (inv_perm, [slots]), (block_expert, [blocks]),
                             (counts, [E]), (offsets, [E + 1])):  # fmt: skip
            _annotate(value, ir.DataType.INT32, shape)
        h = getattr(op, f"moe_swiglu_grouped{q}")(x, w1, w3, *s13, sorted_slots, block_expert, top_k=top_k,
                                                  block_m=bm, **attrs)
        _annotate(h, x.dtype, [rows, inter])
        y_perm = getattr(op, f"moe_down_grouped{q}")(h, w2, *s2, sorted_slots, block_expert, topk_weights,
                                                     block_m=bm, **attrs)
        _annotate(y_perm, x.dtype, [rows, hidden])
        y = op.moe_combine(y_perm, inv_perm, top_k=top_k, **attrs)
        _annotate(y, x.dtype, [tokens, hidden])
        return y

    def moe_quantized(x, router_weight, w1, s1, w3, s3, w2, s2, top_k: int, mode: str):
        if mode != "experts-int8":
            raise EngineFolderError(f"onnx: minimax::moe_quantized {mode!r} has no plugin nodes (experts-int8 only)")
        return moe(x, router_weight, w1, w3, w2, top_k, scales=(s1, s3, s2))

    def paged_kv_update(k_cache, v_cache, k, v, block_table, positions):
        k_out, v_out = op.paged_kv_write(k_cache, v_cache, k, v, block_table, positions, **attrs)
        _annotate(k_out, k_cache.dtype, list(k_cache.shape))
        _annotate(v_out, v_cache.dtype, list(v_cache.shape))
        return k_out, v_out

    def paged_attention_prefill(q, k_cache, v_cache, block_table, positions, scale: float):
        o = op.paged_attention_prefill(q, k_cache, v_cache, block_table, positions, scale=float(scale), **attrs)
        _annotate(o, q.dtype, list(q.shape))
        return o

    def paged_attention_decode(q, k_cache, v_cache, block_table, positions, scale: float):
        rows = _mul(_dim(q.shape[0]), q.shape[2])  # B * H
        split, n_splits = decode_plan(block_table.shape[1] * k_cache.shape[2], q.shape[3])
        m, l, acc = op.paged_decode_split(q, k_cache, v_cache, block_table, positions, split=split,
                                          scale=float(scale), **attrs)
        _annotate(m, ir.DataType.FLOAT, [rows, n_splits])
        _annotate(l, ir.DataType.FLOAT, [rows, n_splits])
        _annotate(acc, ir.DataType.FLOAT, [rows, n_splits, q.shape[3]])
        o = op.paged_decode_merge(q, m, l, acc, positions, split=split, **attrs)
        _annotate(o, q.dtype, list(q.shape))
        return o

    def _world_size(group_name: str, what: str) -> int:
        import torch.distributed as dist

        from plugins.collectives import CollectiveError, process_group

        try:  # the build's (fake) world of the rank: its size is the plugin's attribute
            group = process_group(group_name, None, what)
        except CollectiveError as e:
            raise EngineFolderError(f"onnx: {e}") from None
        return dist.get_world_size(group)

    def all_reduce(x, reduce_op: str, group_name: str):
        if reduce_op != "sum":
            raise EngineFolderError(f"onnx: _c10d_functional.all_reduce with reduce_op {reduce_op!r} has no plugin "
                                    "(minimax::all_reduce sums)")
        n = _world_size(group_name, "_c10d_functional.all_reduce")
        y = op.all_reduce(x, world_size=n, group_name=group_name, **COLLECTIVE_ATTRIBUTES)
        _annotate(y, x.dtype, list(x.shape))
        return y

    def all_gather_into_tensor(x, group_size: int, group_name: str):
        n = _world_size(group_name, "_c10d_functional.all_gather_into_tensor")
        if n != group_size:
            raise EngineFolderError(f"onnx: all_gather_into_tensor over {group_size} ranks in a {n}-rank group")
        y = op.all_gather(x, world_size=n, group_name=group_name, **COLLECTIVE_ATTRIBUTES)
        _annotate(y, x.dtype, [_mul(_dim(x.shape[0]), n), *x.shape[1:]])
        return y

    def wait_tensor(x):  # the plugins complete on the engine's stream: nothing to wait for
        from onnxscript import opset18

        return opset18.Identity(x)

    return {
        torch.ops._c10d_functional.all_reduce.default: all_reduce,
        torch.ops._c10d_functional.all_gather_into_tensor.default: all_gather_into_tensor,
        torch.ops._c10d_functional.wait_tensor.default: wait_tensor,
        torch.ops.minimax.lightning_prefill.default: lightning_prefill,
        torch.ops.minimax.lightning_decode.default: lightning_decode,
        torch.ops.minimax.moe.default: moe,
        torch.ops.minimax.moe_quantized.default: moe_quantized,
        torch.ops.minimax.paged_kv_update.default: paged_kv_update,
        torch.ops.minimax.paged_attention_prefill.default: paged_attention_prefill,
        torch.ops.minimax.paged_attention_decode.default: paged_attention_decode,
    }


def decode_plan(capacity: int, head_dim: int) -> tuple[int, int]:
    """``(split, num_splits)`` of the decode nodes: the CUDA kernel's split for this capacity (``M * page_size``)
    and head dim (``kernels/attention/decode.decode_split``; the plugins run on the GPU)."""
    from kernels.attention.decode import decode_split

    split = decode_split(int(capacity), int(head_dim), torch.device("cuda"))
    return split, -(-int(capacity) // split)


def functional_program(program: ExportedProgram, name: str, settings: BuildSettings) -> ExportedProgram:
    """The exported program with its in-place state updates made functional (see the module docstring):
    ``(input_ids, positions, block_table, state) -> (logits, new state)``, the KV writes as
    ``minimax::paged_kv_update`` nodes."""

    from .exporting import dynamic_shapes

    if program.example_inputs is None:
        raise EngineFolderError(f"{name}: the exported program carries no example inputs; export it again")
    args, _ = program.example_inputs
    inputs, _ = contract_names(program, name)
    n_lin = sum(n.startswith("lightning_state.") for n in inputs)
    n_soft = sum(n.startswith("key_cache.") for n in inputs)
    vl = inputs[-1] == "image_embeds"
    inner = program.module()

    class Functional(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, positions, block_table, state):
            state = [t.clone() for t in state]
            logits = self.inner(input_ids, positions, block_table, state)
            return logits, state

    class FunctionalVL(Functional):  # a VL prefill: image_embeds after the state, as the exported program
        def forward(self, input_ids, positions, block_table, state, image_embeds):
            state = [t.clone() for t in state]
            logits = self.inner(input_ids, positions, block_table, state, image_embeds)
            return logits, state

    with torch.no_grad():
        ep = torch.export.export(FunctionalVL() if vl else Functional(), args,
                                 dynamic_shapes=dynamic_shapes(n_lin, n_soft, settings, name, vl=vl))
        ep = ep.run_decompositions({})
    graph = ep.graph
    for node in list(graph.nodes):
        if not (node.op == "call_function" and node.target is torch.ops.higher_order.auto_functionalized_v2):
            continue
        if node.args[0] is torch.ops.minimax.lightning_decode_.default:
            _functional_lightning_decode(graph, node, name)
            continue
        if node.args[0] is not torch.ops.minimax.paged_kv_write.default:
            raise EngineFolderError(f"{name}: unexpected in-place op {node.args[0]} in the program")
        kw = node.kwargs
        bases = kw["_all_bases"]
        k_base, v_base = bases[kw["_k_cache_base_index"]], bases[kw["_v_cache_base_index"]]
        with graph.inserting_before(node):
            update = graph.call_function(torch.ops.minimax.paged_kv_update.default,
                                         (k_base, v_base, kw["k"], kw["v"], kw["block_table"], kw["positions"]))
            update.meta["val"] = (k_base.meta["val"], v_base.meta["val"])
        for user in list(node.users):
            if user.target is not operator.getitem or user.args[1] not in (1, 2):
                raise EngineFolderError(f"{name}: unexpected use {user} of the KV write")
            with graph.inserting_before(user):
                # auto_functionalized_v2 returns (op output, *bases): the bases are k_cache (1), v_cache (2)
                index = [kw["_k_cache_base_index"], kw["_v_cache_base_index"]].index(user.args[1] - 1)
                replacement = graph.call_function(operator.getitem, (update, index))
                replacement.meta = dict(user.meta)
            user.replace_all_uses_with(replacement)
            graph.erase_node(user)
        graph.erase_node(node)
    graph.lint()
    ep.graph_module.recompile()
    return ep


# ------------------------------------------------------------------------------------------- names


# the text decoder's layers (``model.layers.N``; a VL model's vision tower has ``encoder.layers.N.self_attn`` too)
_LIGHTNING_PARAM = re.compile(r"(?:^|\.)model\.layers\.(\d+)\.self_attn\.qkv_proj\.weight$")
_SOFTMAX_PARAM = re.compile(r"(?:^|\.)model\.layers\.(\d+)\.self_attn\.q_proj\.weight$")


def contract_names(program: ExportedProgram, name: str) -> tuple[list[str], list[str]]:
    """Input and output tensor names of the engine-folder contract for ``program``.

    The state order is ``MiniMaxConfig.state_layout``'s (lightning states by layer, then key caches, then value
    caches of the softmax layers); the layer plan is read from the program's parameter names and checked against
    its inputs (count, rank, lightning states fp32).
    """
    lightning, softmax = [], []
    for key in program.state_dict:
        if m := _LIGHTNING_PARAM.search(key):
            lightning.append(int(m.group(1)))
        elif m := _SOFTMAX_PARAM.search(key):
            softmax.append(int(m.group(1)))
    lightning, softmax = sorted(lightning), sorted(softmax)
    states = ([f"lightning_state.{i}" for i in lightning] + [f"key_cache.{i}" for i in softmax]
              + [f"value_cache.{i}" for i in softmax])  # fmt: skip
    user_inputs = [s for s in program.graph_signature.input_specs if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    extra = []
    if name == "prefill" and len(user_inputs) == 4 + len(states):  # a VL prefill: image_embeds [B, T, hidden] last
        meta = placeholders[user_inputs[-1].arg.name].meta["val"]
        if meta.dim() != 3 or not meta.dtype.is_floating_point:
            raise EngineFolderError(f"{name}: the input after the state is {meta.dtype} {tuple(meta.shape)}, not "
                                    "image_embeds [B, T, hidden]")
        extra = ["image_embeds"]
        user_inputs = user_inputs[:-1]
    if len(user_inputs) != 3 + len(states):
        raise EngineFolderError(
            f"{name}: the exported program has {len(user_inputs)} inputs, the layer plan "
            f"({len(lightning)} lightning + {len(softmax)} softmax layers) gives 3 + {len(states)}"
        )
    for spec, state in zip(user_inputs[3:], states):
        meta = placeholders[spec.arg.name].meta["val"]
        if meta.dim() != 4 or (state.startswith("lightning") and meta.dtype != torch.float32):
            raise EngineFolderError(
                f"{name}: input {spec.arg.name} ({state}) is {meta.dtype} {tuple(meta.shape)}, not a 4-d state"
                f"{' in fp32' if state.startswith('lightning') else ''}"
            )
    inputs = ["input_ids", "positions", "block_table", *states, *extra]
    return inputs, ["logits", *(s + ".out" for s in states)]


def _rename_dims(model, name: str, labels: Sequence[tuple[int, int, str]] = ((0, 0, "B"), (0, 1, "T"))) -> None:
    """Name the dynamic dims everywhere from the symbols of ``labels`` ``(input, axis, name)``: by default "B"
    (batch) and "T" (prefill length) from input_ids'; the vision program's "N" (tiles) and "L" (vectors)."""
    symbols = {}
    for index, axis, label in labels:
        value = model.graph.inputs[index]
        if axis >= len(value.shape):
            continue
        d = value.shape[axis]
        if not isinstance(d, int):
            symbols[str(d.value)] = label
    if not symbols:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, symbols)) + r")\b")

    def rename(value) -> None:
        if value is None or value.shape is None:
            return
        dims = [d if isinstance(d, int) or d.value is None else pattern.sub(lambda m: symbols[m.group(1)], d.value)
                for d in value.shape]  # fmt: skip
        from onnxscript import ir

        value.shape = ir.Shape(dims)

    for value in [*model.graph.inputs, *model.graph.outputs]:
        rename(value)
    for node in model.graph:
        for value in node.outputs:
            rename(value)


def to_onnx(program: ExportedProgram, name: str, settings: BuildSettings, optimize: bool = True):
    """Export ``program`` to an ``onnxscript.ir.Model`` with plugin nodes and contract names; returns
    ``(ir model, moe plan)``. ``optimize=False`` skips onnxscript's optimizer (whose constant folding reads the
    weights: off for a program whose weights are meta tensors)."""
    import warnings

    inputs, outputs = contract_names(program, name)
    top_k, experts = _moe_sizes(program)
    program = functional_program(program, name, settings)
    plan = moe_plan(settings, name, top_k, experts)
    logger.info("onnx %s: moe chain %s%s", name, plan["path"],
                f", block_m {plan['block_m']} (for {plan['tokens']} tokens)" if plan["block_m"] else "")
    start = time.perf_counter()
    with warnings.catch_warnings(), _quiet("onnxscript", "onnx_ir", "torch.onnx"), \
            _quiet("torch.onnx._internal.exporter._registration", level=logging.ERROR):  # "torchvision is not installed"
        warnings.simplefilter("ignore", FutureWarning)
        onnx_program = torch.onnx.export(
            program,
            dynamo=True,
            custom_translation_table=_translation_table(plan),
            input_names=inputs,
            output_names=outputs,
            opset_version=OPSET,
            optimize=optimize,
            verbose=False,
        )
    logger.info("onnx %s: exported in %.1fs", name, time.perf_counter() - start)
    model = onnx_program.model
    _rename_dims(model, name)
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in model.graph if n.domain not in ("", DOMAIN)})
    if foreign:
        raise EngineFolderError(f"{name}: the ONNX graph has nodes TensorRT cannot parse: {', '.join(foreign)}")
    got_in = [v.name for v in model.graph.inputs]
    got_out = [v.name for v in model.graph.outputs]
    if got_in != inputs or got_out != outputs:
        raise EngineFolderError(f"{name}: ONNX graph names {got_in} -> {got_out}, expected {inputs} -> {outputs}")
    return model, plan


@contextlib.contextmanager
def _quiet(*names: str, level: int = logging.WARNING):
    """The exporter's passes log every rewrite at INFO; keep our build log readable (warnings still show)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), level))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _functional_lightning_decode(graph, node, name: str) -> None:
    """``auto_functionalized_v2(lightning_decode_, ...)`` -> the functional ``lightning_decode`` (the plugin node):
    its output 0 is the attention output, its base (output 1) the new state."""
    kw = node.kwargs
    state = kw["_all_bases"][kw["_state_base_index"]]
    with graph.inserting_before(node):
        call = graph.call_function(torch.ops.minimax.lightning_decode.default,
                                   (kw["q"], kw["k"], kw["v"], kw["s"], state))
        call.meta["val"] = (node.meta["val"][0], state.meta["val"])  # (o, the state's new value)
    for user in list(node.users):
        if user.target is not operator.getitem or user.args[1] not in (0, 1):
            raise EngineFolderError(f"{name}: unexpected use {user} of the in-place lightning decode")
        with graph.inserting_before(user):
            replacement = graph.call_function(operator.getitem, (call, user.args[1]))
            replacement.meta = dict(user.meta)
        user.replace_all_uses_with(replacement)
        graph.erase_node(user)
    graph.erase_node(node)


def _moe_sizes(program: ExportedProgram) -> tuple[int, int]:
    """(top_k, num_experts) of the program's ``minimax::moe`` / ``moe_quantized`` nodes (all layers share them)."""
    top_k_arg = {torch.ops.minimax.moe.default: 5, torch.ops.minimax.moe_quantized.default: 8}
    sizes = {(n.args[top_k_arg[n.target]], n.args[2].meta["val"].shape[0]) for n in program.graph.nodes
             if n.op == "call_function" and n.target in top_k_arg}  # fmt: skip
    if len(sizes) != 1:
        raise EngineFolderError(f"expected minimax::moe nodes of one (top_k, num_experts); found {sorted(sizes)}")
    return sizes.pop()


def save_onnx(model, path: Path) -> str | None:
    """Write ``model`` to ``path``; its initializers go to ``<path name>.data`` beside it when they exceed
    ``EXTERNAL_DATA_THRESHOLD`` bytes. Checked with ``onnx.checker`` (by path, so external data works).
    Returns the external data file name (relative to the folder) or None."""
    import onnx
    from onnxscript import ir

    weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    data = f"{path.name}.data" if weight_bytes > EXTERNAL_DATA_THRESHOLD else None
    start = time.perf_counter()
    if data:
        ir.save(model, path, external_data=data)
    else:
        ir.save(model, path)
    register_schemas()  # the checker then checks our nodes against their schemas too
    onnx.checker.check_model(str(path), full_check=True)
    logger.info("onnx: wrote %s (%.1f MB of weights%s), checked, in %.1fs", path.name, weight_bytes / 1e6,
                f" in {data}" if data else "", time.perf_counter() - start)
    return data


WEIGHTS_DATA = "weights.onnx.data"  # the external data both graphs of a skeleton build share
VISION_WEIGHTS_DATA = "vision.weights.onnx.data"  # a VL skeleton build's vision graph's (other tensors, own layout)
DATA_ALIGN = 64  # bytes; each tensor of WEIGHTS_DATA starts at a multiple
_IR_TORCH_DTYPES = {"FLOAT": "float32", "BFLOAT16": "bfloat16", "FLOAT16": "float16", "INT64": "int64",
                    "INT32": "int32", "INT8": "int8"}  # int8: quantized experts


def weight_name(initializer: str) -> str:
    """The folder weight an initializer holds (``functional_program`` wraps the program as ``inner``, whose
    constants are ``model.<weight>``; the vision program is exported as it is: ``model.<weight>``)."""
    if initializer.startswith("inner.model."):
        return initializer[len("inner.model."):]
    return initializer.removeprefix("model.")


def weights_layout(model) -> dict[str, dict[str, Any]]:
    """Where each of the graph's initializers lives in ``WEIGHTS_DATA``: ``{weight: {offset, nbytes, shape, dtype}}``,
    in name order, each aligned to ``DATA_ALIGN`` bytes (a pure function of the tensors' names, shapes and dtypes,
    so both programs of a folder, which hold the same tensors, get the same layout)."""
    specs = {}
    for v in model.graph.initializers.values():
        t = v.const_value
        dtype = _IR_TORCH_DTYPES.get(t.dtype.name)
        if dtype is None:
            raise EngineFolderError(f"initializer {v.name}: dtype {t.dtype} has no external-data layout")
        specs[weight_name(v.name)] = {"shape": [int(d) for d in t.shape], "dtype": dtype, "nbytes": int(t.nbytes)}
    layout, offset = {}, 0
    for name in sorted(specs):
        offset = -(-offset // DATA_ALIGN) * DATA_ALIGN
        layout[name] = {"offset": offset, **specs[name]}
        offset += specs[name]["nbytes"]
    return layout


def save_onnx_external(model, path: Path, layout: dict[str, dict[str, Any]], data_name: str = WEIGHTS_DATA) -> None:
    """Write the graph with every initializer an external reference into ``WEIGHTS_DATA`` (no weight is read:
    the initializers may be meta tensors); its structure checked with ``onnx.checker`` (without the data)."""
    import onnx
    from onnxscript import ir

    for v in model.graph.initializers.values():
        e = layout[weight_name(v.name)]
        v.const_value = ir.ExternalTensor(data_name, e["offset"], e["nbytes"], v.const_value.dtype,
                                          shape=v.const_value.shape, name=v.name, base_dir=str(path.parent))
    ir.save(model, path)
    register_schemas()
    data = path.parent / data_name
    if not data.exists():
        data.touch()  # the checker wants the file to exist; the converter fills it (ExternalDataWriter)
    onnx.checker.check_model(str(path))  # by path: external references resolved beside the graph, not read


class RoutingWriter:
    """``ExternalDataWriter``s of a folder's data files behind one writer interface: each tensor goes to the file
    whose layout holds it (Text-01: one file; a VL skeleton build: the text graphs' and the vision graph's).
    ``sha256``: the one file's hash, or the hash of the files' hashes in file order."""

    def __init__(self, folder: Path, layouts: dict[str, dict[str, dict[str, Any]]]):
        self.writers = {data: ExternalDataWriter(Path(folder) / data, layout) for data, layout in sorted(layouts.items())}
        self._owner = {name: w for w in self.writers.values() for name in w.layout}

    def _writer(self, name: str) -> "ExternalDataWriter":
        if name not in self._owner:
            raise EngineFolderError(f"weight {name!r} is not an initializer of the graphs")
        return self._owner[name]

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self._writer(name).add(name, tensor)

    def add_part(self, name: str, index: int, count: int, tensor: torch.Tensor) -> None:
        self._writer(name).add_part(name, index, count, tensor)

    @property
    def sha256(self) -> str:
        import hashlib

        if len(self.writers) == 1:
            return next(iter(self.writers.values())).sha256
        return hashlib.sha256("|".join(w.sha256 for w in self.writers.values()).encode()).hexdigest()

    def close(self) -> None:
        for w in self.writers.values():
            w.close()


class ExternalDataWriter:
    """Writes converted weights (``model.loading.convert_checkpoint``'s writer interface: ``add`` / ``add_part``)
    into ``WEIGHTS_DATA`` at the layout's offsets, one tensor at a time (a stacked tensor part by part); checks each
    tensor against the layout and, on ``close``, that every byte of every tensor was written. ``sha256``: the running
    hash of names, shapes, dtypes and bytes in write order (the manifest's ``weights_sha256``)."""

    def __init__(self, path: Path, layout: dict[str, dict[str, Any]]):
        import hashlib

        self.path, self.layout = Path(path), layout
        self._file = open(self.path, "wb")
        total = max((e["offset"] + e["nbytes"] for e in layout.values()), default=0)
        self._file.truncate(total)
        self._full: set[str] = set()
        self._parts: dict[str, set[int]] = {}
        self._hash = hashlib.sha256()
        self.bytes_written = 0

    def _write(self, name: str, offset: int, tensor: torch.Tensor) -> None:
        t = tensor.detach().cpu().contiguous()
        data = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b""
        self._hash.update(f"{name}|{list(t.shape)}|{t.dtype}|".encode())
        self._hash.update(data)
        os.pwrite(self._file.fileno(), data, offset)
        self.bytes_written += len(data)

    def _spec(self, name: str) -> dict[str, Any]:
        if name not in self.layout:
            raise EngineFolderError(f"{self.path}: weight {name!r} is not an initializer of the graphs")
        return self.layout[name]

    def add(self, name: str, tensor: torch.Tensor) -> None:
        e = self._spec(name)
        if list(tensor.shape) != e["shape"] or str(tensor.dtype).removeprefix("torch.") != e["dtype"]:
            raise EngineFolderError(f"{self.path}: weight {name!r} is {tensor.dtype} {list(tensor.shape)}, the "
                                    f"graphs hold {e['dtype']} {e['shape']}")
        self._write(name, e["offset"], tensor)
        self._full.add(name)

    def add_part(self, name: str, index: int, count: int, tensor: torch.Tensor) -> None:
        e = self._spec(name)
        if [count, *tensor.shape] != e["shape"] or str(tensor.dtype).removeprefix("torch.") != e["dtype"]:
            raise EngineFolderError(f"{self.path}: part {index} of {name!r} is {tensor.dtype} "
                                    f"{list(tensor.shape)}, the graphs hold {e['dtype']} {e['shape']} in {count}")
        self._write(f"{name}.{index}", e["offset"] + index * (e["nbytes"] // count), tensor)
        self._parts.setdefault(name, set()).add(index)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        missing = [n for n, e in self.layout.items()
                   if n not in self._full and len(self._parts.get(n, ())) != (e["shape"] or [1])[0]]
        if missing:
            raise EngineFolderError(f"{self.path}: weights not written: {missing[:5]}{' ...' if len(missing) > 5 else ''}")


VISION_INPUTS = ["pixel_values", "feature_index"]
VISION_OUTPUTS = ["image_features"]


def vision_to_onnx(program: ExportedProgram, optimize: bool = True):
    """The VL vision program (``exporting.VisionProgram``: CLIP tower, projector, packing gather) as an
    ``onnxscript.ir.Model``: standard ops only (no plugin), dims "N" (tiles) and "L" (prompt vectors)."""
    import warnings

    start = time.perf_counter()
    with warnings.catch_warnings(), _quiet("onnxscript", "onnx_ir", "torch.onnx"), \
            _quiet("torch.onnx._internal.exporter._registration", level=logging.ERROR):
        warnings.simplefilter("ignore", FutureWarning)
        onnx_program = torch.onnx.export(program, dynamo=True, input_names=VISION_INPUTS,
                                         output_names=VISION_OUTPUTS, opset_version=OPSET, optimize=optimize,
                                         verbose=False)
    logger.info("onnx vision: exported in %.1fs", time.perf_counter() - start)
    model = onnx_program.model
    _rename_dims(model, "vision", labels=((0, 0, "N"), (1, 0, "L")))
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in model.graph if n.domain != ""})
    if foreign:
        raise EngineFolderError(f"vision: the ONNX graph has nodes outside the standard domain: {', '.join(foreign)}")
    got_in, got_out = [v.name for v in model.graph.inputs], [v.name for v in model.graph.outputs]
    if got_in != VISION_INPUTS or got_out != VISION_OUTPUTS:
        raise EngineFolderError(f"vision: ONNX graph names {got_in} -> {got_out}, expected {VISION_INPUTS} -> "
                                f"{VISION_OUTPUTS}")
    return model


def lower(program: ExportedProgram, folder: Path, name: str, settings: BuildSettings) -> dict[str, Any]:
    """Write ``<name>.onnx`` (+ ``<name>.onnx.data`` when the weights are large) into ``folder``, checked with
    ``onnx.checker``. Returns the manifest entries of the program.

    A program whose weights are meta tensors (a skeleton build: ``build.py --checkpoint``) is lowered without the
    optimizer and written with its initializers as references into the shared ``WEIGHTS_DATA`` (entry
    ``weights_layout``), which the checkpoint converter then fills (``ExternalDataWriter``)."""
    if name == "vision":
        entries = {"file": "vision.onnx", "opset": OPSET, "state_update": "none"}
        if any(t.device.type == "meta" for t in program.state_dict.values()):  # its own external data file
            model = vision_to_onnx(program, optimize=False)
            layout = weights_layout(model)
            save_onnx_external(model, folder / "vision.onnx", layout, VISION_WEIGHTS_DATA)
            return {**entries, "external_data": VISION_WEIGHTS_DATA, "weights_layout": layout}
        return {**entries, "external_data": save_onnx(vision_to_onnx(program), folder / "vision.onnx")}
    if any(t.device.type == "meta" for t in program.state_dict.values()):
        model, plan = to_onnx(program, name, settings, optimize=False)
        layout = weights_layout(model)
        save_onnx_external(model, folder / f"{name}.onnx", layout)
        entries = {"weights_layout": layout}
        data = WEIGHTS_DATA
    else:
        model, plan = to_onnx(program, name, settings)
        data = save_onnx(model, folder / f"{name}.onnx")
        entries = {}
    return {**entries,
        "file": f"{name}.onnx",
        "external_data": data,
        "opset": OPSET,
        "plugin_namespace": DOMAIN,
        "plugin_version": PLUGIN_VERSION,
        "moe_path": plan["path"],
        "moe_block_m": plan["block_m"],
        "state_update": "outputs",
    }
