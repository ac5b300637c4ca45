"""CPU evaluation of the ONNX graphs of ``onnx_lowering.py`` with ``onnx.reference.ReferenceEvaluator``.

The graphs hold TensorRT-plugin nodes (domain ``minimax``) that no ONNX runtime knows; here each is an ``OpRun``
class (class name = op type, ``op_domain = "minimax"``) backed by our reference kernels: lightning attention from
``kernels/lightning_attention/naive.py``, paged attention from ``kernels/attention/naive.py`` and the MoE stages
from ``kernels/moe/stages.py`` (the ``_int8`` stages on the dequantized weights). The standard ops run in
onnx's numpy reference implementation. This is the parity oracle of the ONNX folder on a machine without TensorRT
(slow: for tiny models and tests; fp32 graphs — numpy has no bfloat16).

The collective nodes of tensor-parallel rank graphs run the TensorRT plugins' bodies (``plugins/collectives.py``)
in this process's torch.distributed world: evaluate every rank's graph at once, one process per rank (gloo).

Every plugin node is also checked against the contract: ``plugin_namespace == "minimax"``, ``plugin_version == "1"``,
``aot == 1``, and the input count of its op type; anything else raises ``ValueError`` naming the node.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from kernels.attention import naive as attention
from kernels.lightning_attention import naive as lightning
from kernels.moe import stages

from .onnx_lowering import COLLECTIVE_ATTRIBUTES, COLLECTIVE_OPS, DOMAIN, FLOAT_ATTRIBUTES, PLUGIN_ATTRIBUTES, PLUGIN_OPS

__all__ = ["CUSTOM_OPS", "reference_evaluator", "OnnxReferenceProgram"]


def _torch(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.array(a, copy=True, order="C"))  # a writable copy: the evaluator may reuse a


def _numpy(*tensors: Tensor) -> tuple[np.ndarray, ...]:
    return tuple(t.contiguous().numpy() for t in tensors)


def _make_op(op_type: str, fn):
    """An ``OpRun`` subclass for plugin node ``op_type``; ``fn(*torch inputs, **int attributes)`` -> tensors."""
    from onnx.reference.op_run import OpRun

    n_inputs = len(PLUGIN_OPS[op_type][0])
    int_attrs = PLUGIN_OPS[op_type][2]
    float_attrs = FLOAT_ATTRIBUTES.get(op_type, [])

    def _run(self, *inputs, plugin_namespace=None, plugin_version=None, aot=None, **attrs):
        got = {"plugin_namespace": plugin_namespace, "plugin_version": plugin_version, "aot": aot}
        if isinstance(got["plugin_namespace"], bytes):
            got["plugin_namespace"] = got["plugin_namespace"].decode()
        if isinstance(got["plugin_version"], bytes):
            got["plugin_version"] = got["plugin_version"].decode()
        if got != PLUGIN_ATTRIBUTES:
            raise ValueError(f"{DOMAIN}::{op_type} node {self.onnx_node.name!r}: plugin attributes {got}, "
                             f"expected {PLUGIN_ATTRIBUTES}")
        if len(inputs) != n_inputs or sorted(attrs) != sorted(int_attrs + float_attrs):
            raise ValueError(f"{DOMAIN}::{op_type} node {self.onnx_node.name!r}: {len(inputs)} inputs and attributes "
                             f"{sorted(attrs)}, expected {n_inputs} inputs and {sorted(int_attrs + float_attrs)}")
        with torch.no_grad():
            out = fn(*(_torch(a) for a in inputs),
                     **{k: float(v) if k in float_attrs else int(v) for k, v in attrs.items()})
        return _numpy(*(out if isinstance(out, tuple) else (out,)))

    return type(op_type, (OpRun,), {"op_domain": DOMAIN, "_run": _run})


def _paged_kv_write(k_cache, v_cache, k, v, block_table, positions):
    """The functional node: new pools with the tokens written (the TensorRT plugin aliases them to its inputs)."""
    k_new, v_new = k_cache.clone(), v_cache.clone()
    attention.paged_kv_write(k_new, v_new, k, v, block_table, positions)
    return k_new, v_new


def _deq(q: Tensor, scale: Tensor) -> Tensor:
    """int8 expert weights as the stages' reference takes them: ``q * scale`` per output channel (fp32)."""
    from kernels.moe.naive import dequantize_weight

    return dequantize_weight(q, scale)


def _custom_ops() -> list[type]:
    impls = {
        "lightning_prefill": lambda q, k, v, s, state: lightning.lightning_attention_blockwise(q, k, v, s, state),
        "lightning_decode": lightning.lightning_attention_decode_step,
        "moe_route": lambda x, router, top_k: stages.moe_route(x, router, top_k),
        "moe_align": lambda ids, num_experts, block_m: stages.moe_align(ids, num_experts, block_m),
        "moe_swiglu_grouped": stages.moe_swiglu_grouped,
        "moe_down_grouped": stages.moe_down_grouped,
        "moe_combine": stages.moe_combine,
        "moe_swiglu_decode": stages.moe_swiglu_decode,
        "moe_down_combine_decode": stages.moe_down_combine_decode,
        "moe_swiglu_grouped_int8": lambda x, w1, w3, s1, s3, slots, be, top_k, block_m: stages.moe_swiglu_grouped(
            x, _deq(w1, s1), _deq(w3, s3), slots, be, top_k, block_m),
        "moe_down_grouped_int8": lambda h, w2, s2, slots, be, weights, block_m: stages.moe_down_grouped(
            h, _deq(w2, s2), slots, be, weights, block_m),
        "moe_swiglu_decode_int8": lambda x, w1, w3, s1, s3, ids: stages.moe_swiglu_decode(
            x, _deq(w1, s1), _deq(w3, s3), ids),
        "moe_down_combine_decode_int8": lambda h, w2, s2, weights, ids: stages.moe_down_combine_decode(
            h, _deq(w2, s2), weights, ids),
        "paged_kv_write": _paged_kv_write,
        "paged_attention_prefill": attention.paged_attention,
        "paged_decode_split": attention.paged_decode_partials,
        "paged_decode_merge": attention.paged_decode_merge,
    }
    assert set(impls) == set(PLUGIN_OPS)
    return [_make_op(op_type, fn) for op_type, fn in impls.items()]


def _collective_op(op_type: str) -> type:
    """The collective nodes of a tensor-parallel rank's graphs, run by the TensorRT plugins' own bodies
    (``plugins.collectives.all_reduce_into`` / ``all_gather_into``) in this process's torch.distributed world
    (gloo on the CPU): the graphs of every rank must be evaluated together, one process per rank."""
    from onnx.reference.op_run import OpRun

    from plugins import collectives

    def _run(self, x, plugin_namespace=None, plugin_version=None, aot=None, world_size=None, group_name=None):
        got = {k: v.decode() if isinstance(v, bytes) else v for k, v in
               (("plugin_namespace", plugin_namespace), ("plugin_version", plugin_version), ("aot", aot))}
        if got != COLLECTIVE_ATTRIBUTES or world_size is None or group_name is None:
            raise ValueError(f"{DOMAIN}::{op_type} node {self.onnx_node.name!r}: attributes {got}, world_size "
                             f"{world_size}, group_name {group_name!r}; expected {COLLECTIVE_ATTRIBUTES} and both")
        group_name = group_name.decode() if isinstance(group_name, bytes) else group_name
        what = f"{DOMAIN}::{op_type} node {self.onnx_node.name!r}"
        t = _torch(x)
        if op_type == "all_reduce":
            out = collectives.all_reduce_into(t, t.clone(), group_name, int(world_size), what)
        else:
            out = collectives.all_gather_into(t, t.new_empty((int(world_size) * t.shape[0], *t.shape[1:])),
                                              group_name, int(world_size), what)
        return _numpy(out)

    return type(op_type, (OpRun,), {"op_domain": DOMAIN, "_run": _run})


CUSTOM_OPS: list[type] = _custom_ops() + [_collective_op(op_type) for op_type in COLLECTIVE_OPS]


def reference_evaluator(model: str | Path, **kwargs):
    """A ``ReferenceEvaluator`` of the .onnx file ``model`` (external data is read from beside it)."""
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(str(model), new_ops=CUSTOM_OPS, **kwargs)


class OnnxReferenceProgram:
    """An engine-folder program (``prefill.onnx`` / ``decode.onnx``) as a callable with the exported program's
    functional signature: ``(input_ids, positions, block_table, state list) -> (logits, new state list)``, torch
    tensors in and out."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.session = reference_evaluator(self.path)
        self.input_names = list(self.session.input_names)
        self.output_names = list(self.session.output_names)

    def __call__(self, input_ids: Tensor, positions: Tensor, block_table: Tensor,
                 state: Sequence[Tensor], *extra: Tensor) -> tuple[Tensor, list[Tensor]]:
        tensors = [input_ids, positions, block_table, *state, *extra]  # (a VL prefill: image_embeds last)
        if len(tensors) != len(self.input_names):
            raise ValueError(f"{self.path.name}: {len(tensors)} inputs given, the graph takes "
                             f"{len(self.input_names)} ({', '.join(self.input_names)})")
        feeds = {name: t.detach().cpu().contiguous().numpy() for name, t in zip(self.input_names, tensors)}
        outputs = [_torch(a) for a in self.session.run(None, feeds)]
        return outputs[0], outputs[1:]
