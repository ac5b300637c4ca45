"""The plugin contract: names, inputs, outputs, attributes, shape and dtype rules of every TensorRT plugin.

This table is the single source for the registration (``plugins/*.register``), the ONNX lowering (node op types,
input/output order, attributes) and the tests. Namespace ``minimax``, version ``"1"``. Shapes (T tokens, B batch,
H heads, Dk/Dv head dims, E experts, I intermediate, S = T * top_k slots, R = S + E (block_m - 1) padded rows,
NB = cdiv(R, block_m) row blocks):

| plugin                  | inputs                                                     | attrs               | outputs |
|-------------------------|------------------------------------------------------------|---------------------|---------|
| lightning_prefill       | q, k [B,T,H,Dk], v [B,T,H,Dv], s [H] f32, initial_state [B,H,Dk,Dv] f32 | —     | o [B,T,H,Dv], final_state f32 |
| lightning_decode        | q, k, v [B,1,H,D*], s [H] f32, state [B,H,Dk,Dv] f32         | —                   | o [B,1,H,Dv], new_state f32 |
| moe_route               | x [T,hidden], router_weight [E,hidden] f32                   | top_k               | topk_weights [T,top_k] f32, topk_ids i32 |
| moe_align               | topk_ids [T,top_k] i32                                       | num_experts, block_m | sorted_slots [R], inv_perm [S], block_expert [NB], expert_counts [E], expert_offsets [E+1] (i32) |
| moe_swiglu_grouped      | x, w1 [E,I,hidden], w3, sorted_slots [R], block_expert [NB]  | top_k, block_m      | h [R,I] |
| moe_down_grouped        | h [R,I], w2 [E,hidden,I], sorted_slots, block_expert, topk_weights [T,top_k] | block_m | y_perm [R,hidden] |
| moe_combine             | y_perm [R,hidden], inv_perm [S]                              | top_k               | y [T,hidden] |
| moe_swiglu_decode       | x, w1, w3, topk_ids                                          | —                   | h [S,I] |
| moe_down_combine_decode | h [S,I], w2, topk_weights, topk_ids                          | —                   | y [T,hidden] |
| moe_swiglu_grouped_int8 | x, w1, w3 [E,I,hidden] i8, w1_scale, w3_scale [E,I] f32, sorted_slots, block_expert | top_k, block_m | h [R,I] |
| moe_down_grouped_int8   | h, w2 [E,hidden,I] i8, w2_scale [E,hidden] f32, sorted_slots, block_expert, topk_weights | block_m | y_perm [R,hidden] |
| moe_swiglu_decode_int8  | x, w1, w3 i8, w1_scale, w3_scale f32, topk_ids               | —                   | h [S,I] |
| moe_down_combine_decode_int8 | h, w2 i8, w2_scale f32, topk_weights, topk_ids          | —                   | y [T,hidden] |
| paged_kv_write          | k_cache, v_cache [P,KVH,PG,D], k, v [B,T,KVH,D], block_table [B,M] i32, positions [B] i64 | — | k_cache_out, v_cache_out (aliases of the inputs: in place) |
| paged_attention_prefill | q [B,T,H,D], k_cache, v_cache, block_table, positions        | scale (float)       | o [B,T,H,D] |
| paged_decode_split      | q [B,1,H,D], k_cache, v_cache, block_table, positions        | split, scale (float) | m, l [B*H,NS] f32, acc [B*H,NS,D] f32 |
| paged_decode_merge      | q [B,1,H,D], m, l, acc, positions                            | split               | o [B,1,H,D] |

(The ``_int8`` MoE stages: the same kernels on int8 expert weights with one fp32 scale per output channel, applied
to the fp32 sums: ``kernels/moe/naive.py``, "Quantized experts", experts-int8. Paged attention: P pages of PG tokens, M pages per row, NS = cdiv(M * PG, split) splits; semantics in
``kernels/attention/naive.py``, the decode partials in ``naive.paged_decode_partials``.)

Shape rules take a list of input shapes whose dims are ints or TensorRT ``ShapeExpr``s (see ``algebra.py``) and
must not branch on dim values: TensorRT also calls them with placeholder ("fake") dims. Dtypes are torch dtypes
here; ``register`` maps them to TensorRT's. Nothing here imports tensorrt.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .algebra import Dim, cdiv

__all__ = ["NAMESPACE", "VERSION", "PluginSpec", "PLUGINS", "FLOAT_DTYPES", "check_call"]

NAMESPACE = "minimax"
VERSION = "1"
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # activations / weights the kernels take

Shape = tuple[Dim, ...]
f32, i32 = torch.float32, torch.int32


@dataclass(frozen=True)
class PluginSpec:
    """One plugin. ``dtype_combinations``: each entry gives the dtype of every input, then of every output."""

    name: str
    inputs: tuple[str, ...]
    input_ranks: tuple[int, ...]
    outputs: tuple[str, ...]
    attrs: tuple[str, ...]  # all attributes are ints
    output_shapes: Callable[[Sequence[Shape], Mapping[str, int]], tuple[Shape, ...]]
    dtype_combinations: tuple[tuple[torch.dtype, ...], ...]
    float_attrs: tuple[str, ...] = ()  # float attributes (the softmax scale)
    aliases: tuple[int | None, ...] = ()  # per output: the input it aliases (written in place), or None

    @property
    def plugin_id(self) -> str:
        return f"{NAMESPACE}::{self.name}"

    def output_dtypes(self, input_dtypes: Sequence[torch.dtype]) -> tuple[torch.dtype, ...]:
        """Output dtypes for the given input dtypes; ``ValueError`` when the combination is not supported."""
        n = len(self.inputs)
        for combo in self.dtype_combinations:
            if tuple(combo[:n]) == tuple(input_dtypes):
                return tuple(combo[n:])
        allowed = sorted({tuple(str(d).removeprefix("torch.") for d in c[:n]) for c in self.dtype_combinations})
        got = tuple(str(d).removeprefix("torch.") for d in input_dtypes)
        raise ValueError(f"{self.name}: input dtypes {dict(zip(self.inputs, got))} are not supported; allowed: {allowed}")


def check_call(spec: PluginSpec, shapes: Sequence[Shape], attrs: Mapping[str, int]) -> None:
    """Arity, rank and attribute checks (``ValueError`` naming the plugin and the tensor or attribute)."""
    if len(shapes) != len(spec.inputs):
        raise ValueError(f"{spec.name}: expected {len(spec.inputs)} inputs {spec.inputs}; got {len(shapes)}")
    for name, rank, shape in zip(spec.inputs, spec.input_ranks, shapes):
        if len(shape) != rank:
            raise ValueError(f"{spec.name}: input '{name}' must have rank {rank}; got shape {tuple(shape)}")
    names = spec.attrs + spec.float_attrs
    missing = set(names) - set(attrs)
    extra = set(attrs) - set(names)
    if missing or extra:
        raise ValueError(f"{spec.name}: attributes must be {names}; missing {sorted(missing)}, unknown {sorted(extra)}")
    for a in spec.attrs:
        if not isinstance(attrs[a], int) or isinstance(attrs[a], bool) or attrs[a] < 1:
            raise ValueError(f"{spec.name}: attribute '{a}' must be a positive int; got {attrs[a]!r}")
    for a in spec.float_attrs:
        value = attrs[a]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < float(value) < float("inf"):
            raise ValueError(f"{spec.name}: attribute '{a}' must be a positive finite float; got {value!r}")


# --- shape rules (symbolic operand on the left; no branching on dim values) ---------------------------------------


def _lightning_shapes(shapes, attrs):
    (b, t, h, dk), v = shapes[0], shapes[2]
    dv = v[3]
    return (b, t, h, dv), (b, h, dk, dv)


def _route_shapes(shapes, attrs):
    t = shapes[0][0]
    k = attrs["top_k"]
    return (t, k), (t, k)


def align_sizes(n_tokens: Dim, top_k: Dim, num_experts: int, block_m: int) -> tuple[Dim, Dim, Dim]:
    """(S, R, NB): slots, padded-row bound and row-block bound of the alignment (``routing.align_max_rows``)."""
    n_slots = n_tokens * top_k
    max_rows = n_slots + num_experts * (block_m - 1)
    return n_slots, max_rows, cdiv(max_rows, block_m)


def _align_shapes(shapes, attrs):
    t, k = shapes[0]
    e, bm = attrs["num_experts"], attrs["block_m"]
    s, r, nb = align_sizes(t, k, e, bm)
    return (r,), (s,), (nb,), (e,), (e + 1,)


def _swiglu_grouped_shapes(shapes, attrs):
    return ((shapes[3][0], shapes[1][1]),)  # [R, I]


def _down_grouped_shapes(shapes, attrs):
    return ((shapes[0][0], shapes[1][1]),)  # [R, hidden]


def _combine_shapes(shapes, attrs):
    return ((shapes[1][0] // attrs["top_k"], shapes[0][1]),)  # [S / top_k, hidden]


def _swiglu_decode_shapes(shapes, attrs):
    t, k = shapes[3]
    return ((t * k, shapes[1][1]),)  # [T * top_k, I]


def _down_combine_decode_shapes(shapes, attrs):
    return ((shapes[2][0], shapes[1][1]),)  # [T, hidden]


def _swiglu_grouped_int8_shapes(shapes, attrs):
    return ((shapes[5][0], shapes[1][1]),)  # [R, I]


def _swiglu_decode_int8_shapes(shapes, attrs):
    t, k = shapes[5]
    return ((t * k, shapes[1][1]),)  # [T * top_k, I]


def _down_combine_decode_int8_shapes(shapes, attrs):
    return ((shapes[3][0], shapes[1][1]),)  # [T, hidden]


def _paged_write_shapes(shapes, attrs):
    return tuple(shapes[0]), tuple(shapes[1])  # the pools, written in place


def _same_as_q(shapes, attrs):
    return (tuple(shapes[0]),)


def decode_splits(max_pages: Dim, page_size: Dim, split: int) -> Dim:
    """NS: splits of ``split`` positions over a row's capacity ``M * page_size``."""
    return cdiv(max_pages * page_size, split)


def _decode_split_shapes(shapes, attrs):
    (b, _, h, d), cache, table = shapes[0], shapes[1], shapes[3]
    ns = decode_splits(table[1], cache[2], attrs["split"])
    return (b * h, ns), (b * h, ns), (b * h, ns, d)


_LIGHTNING_DTYPES = tuple((d, d, d, f32, f32, d, f32) for d in FLOAT_DTYPES)
i64, i8 = torch.int64, torch.int8

PLUGINS: dict[str, PluginSpec] = {
    s.name: s
    for s in (
        PluginSpec(
            "lightning_prefill",
            ("q", "k", "v", "s", "initial_state"),
            (4, 4, 4, 1, 4),
            ("o", "final_state"),
            (),
            _lightning_shapes,
            _LIGHTNING_DTYPES,
        ),
        PluginSpec(
            "lightning_decode",
            ("q", "k", "v", "s", "state"),
            (4, 4, 4, 1, 4),
            ("o", "new_state"),
            (),
            _lightning_shapes,
            _LIGHTNING_DTYPES,
        ),
        PluginSpec(
            "moe_route",
            ("x", "router_weight"),
            (2, 2),
            ("topk_weights", "topk_ids"),
            ("top_k",),
            _route_shapes,
            tuple((d, f32, f32, i32) for d in FLOAT_DTYPES),
        ),
        PluginSpec(
            "moe_align",
            ("topk_ids",),
            (2,),
            ("sorted_slots", "inv_perm", "block_expert", "expert_counts", "expert_offsets"),
            ("num_experts", "block_m"),
            _align_shapes,
            ((i32,) * 6,),
        ),
        PluginSpec(
            "moe_swiglu_grouped",
            ("x", "w1", "w3", "sorted_slots", "block_expert"),
            (2, 3, 3, 1, 1),
            ("h",),
            ("top_k", "block_m"),
            _swiglu_grouped_shapes,
            tuple((d, d, d, i32, i32, d) for d in FLOAT_DTYPES),
        ),
        PluginSpec(
            "moe_down_grouped",
            ("h", "w2", "sorted_slots", "block_expert", "topk_weights"),
            (2, 3, 1, 1, 2),
            ("y_perm",),
            ("block_m",),
            _down_grouped_shapes,
            tuple((d, d, i32, i32, f32, d) for d in FLOAT_DTYPES),
        ),
        PluginSpec(
            "moe_combine",
            ("y_perm", "inv_perm"),
            (2, 1),
            ("y",),
            ("top_k",),
            _combine_shapes,
            tuple((d, i32, d) for d in FLOAT_DTYPES),
        ),
        PluginSpec(
            "moe_swiglu_decode",
            ("x", "w1", "w3", "topk_ids"),
            (2, 3, 3, 2),
            ("h",),
            (),
            _swiglu_decode_shapes,
            tuple((d, d, d, i32, d) for d in FLOAT_DTYPES),
        ),
        PluginSpec(
            "moe_down_combine_decode",
            ("h", "w2", "topk_weights", "topk_ids"),
            (2, 3, 2, 2),
            ("y",),
            (),
            _down_combine_decode_shapes,
            tuple((d, d, f32, i32, d) for d in FLOAT_DTYPES),
        ),
        PluginSpec(
            "moe_swiglu_grouped_int8",
            ("x", "w1", "w3", "w1_scale", "w3_scale", "sorted_slots", "block_expert"),
            (2, 3, 3, 2, 2, 1, 1),
            ("h",),
            ("top_k", "block_m"),
            _swiglu_grouped_int8_shapes,
            tuple((d, i8, i8, f32, f32, i32, i32, d) for d in FLOAT_DTYPES),
        ),
        PluginSpec(
            "moe_down_grouped_int8",
            ("h", "w2", "w2_scale", "sorted_slots", "block_expert", "topk_weights"),
            (2, 3, 2, 1, 1, 2),
            ("y_perm",),
            ("block_m",),
            _down_grouped_shapes,
            tuple((d, i8, f32, i32, i32, f32, d) for d in FLOAT_DTYPES),
        ),
        PluginSpec(
            "moe_swiglu_decode_int8",
            ("x", "w1", "w3", "w1_scale", "w3_scale", "topk_ids"),
            (2, 3, 3, 2, 2, 2),
            ("h",),
            (),
            _swiglu_decode_int8_shapes,
            tuple((d, i8, i8, f32, f32, i32, d) for d in FLOAT_DTYPES),
        ),
        PluginSpec(
            "moe_down_combine_decode_int8",
            ("h", "w2", "w2_scale", "topk_weights", "topk_ids"),
            (2, 3, 2, 2, 2),
            ("y",),
            (),
            _down_combine_decode_int8_shapes,
            tuple((d, i8, f32, f32, i32, d) for d in FLOAT_DTYPES),
        ),
        PluginSpec(
            "paged_kv_write",
            ("k_cache", "v_cache", "k", "v", "block_table", "positions"),
            (4, 4, 4, 4, 2, 1),
            ("k_cache_out", "v_cache_out"),
            (),
            _paged_write_shapes,
            tuple((d, d, d, d, i32, i64, d, d) for d in FLOAT_DTYPES),
            aliases=(0, 1),
        ),
        PluginSpec(
            "paged_attention_prefill",
            ("q", "k_cache", "v_cache", "block_table", "positions"),
            (4, 4, 4, 2, 1),
            ("o",),
            (),
            _same_as_q,
            tuple((d, d, d, i32, i64, d) for d in FLOAT_DTYPES),
            float_attrs=("scale",),
        ),
        PluginSpec(
            "paged_decode_split",
            ("q", "k_cache", "v_cache", "block_table", "positions"),
            (4, 4, 4, 2, 1),
            ("m", "l", "acc"),
            ("split",),
            _decode_split_shapes,
            tuple((d, d, d, i32, i64, f32, f32, f32) for d in FLOAT_DTYPES),
            float_attrs=("scale",),
        ),
        PluginSpec(
            "paged_decode_merge",
            ("q", "m", "l", "acc", "positions"),
            (4, 2, 2, 3, 1),
            ("o",),
            ("split",),
            _same_as_q,
            tuple((d, f32, f32, f32, i64, d) for d in FLOAT_DTYPES),
        ),
    )
}
