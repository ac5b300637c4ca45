"""TensorRT plugins for softmax attention over the paged KV cache: ``minimax::paged_kv_write``,
``minimax::paged_attention_prefill``, ``minimax::paged_decode_split`` and ``minimax::paged_decode_merge``.

Each plugin is one launch of a Triton kernel of ``kernels/attention/`` (``write.py``, ``prefill.py``, ``decode.py``)
through a thin entry kernel with TensorRT's AOT argument order (inputs, int32 extra args, outputs) that calls the
kernel as a device function; decode is two plugins (the split pass and the merge), as flash-decoding is two
kernels. TensorRT tensors are contiguous, so every stride comes from the shape: the head counts, head dim, page
size, pages per row and pool size are build-time constants (fixed network dims), the chunk length T is the extra
arg of the write and the prefill, and the batch B enters the grid only.

``paged_kv_write`` declares each output an alias of its cache input (``TensorDesc.aliased()``): the kernel stores
the new tokens into the pool where it lies, and the engine's ``<cache>.out`` is the input's memory. Row checks
(capacity, pool bounds) are the runtime's, as for the traced kernels.

``plan_*`` need no TensorRT (tests use them on ints and launch them under the interpreter or on the GPU);
``register`` imports it lazily. No ``from __future__ import annotations``: ``tensorrt.plugin`` reads the registered
functions' annotations as classes.
"""

from collections.abc import Mapping, Sequence

import torch
import triton
import triton.language as tl

from kernels.attention import decode as decode_kernels
from kernels.attention import prefill as prefill_kernels
from kernels.attention.decode import _paged_decode_merge_kernel, _paged_decode_split_kernel
from kernels.attention.prefill import LOG2E, _paged_prefill_kernel
from kernels.attention.write import _paged_kv_write_kernel

from .algebra import Dim, cdiv, next_pow2, static
from .payload import KernelPlan
from .spec import PLUGINS, check_call, decode_splits

__all__ = ["plan_paged_kv_write", "plan_paged_attention_prefill", "plan_paged_decode_split",
           "plan_paged_decode_merge", "PLANNERS", "TACTICS", "register"]

_CUDA = torch.device("cuda")


@triton.jit
def paged_kv_write_entry(
    k_cache,  # [P, KVH, PG, D]
    v_cache,
    k,  # [B, T, KVH, D]
    v,
    block_table,  # [B, M] int32
    positions,  # [B] int64
    T,  # int32 extra arg
    k_cache_out,  # aliases k_cache
    v_cache_out,  # aliases v_cache
    KVH: tl.constexpr,
    PG: tl.constexpr,
    M: tl.constexpr,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    seq = T.to(tl.int64) * (KVH * D)
    _paged_kv_write_kernel(
        k_cache_out, v_cache_out, k, v, block_table, positions, KVH, PG,
        seq, KVH * D, D,  # k strides (b, t, h)
        seq, KVH * D, D,  # v
        KVH * PG * D, PG * D, D,  # cache strides (page, head, slot)
        M,  # table row stride
        D=D, BLOCK_H=BLOCK_H,
    )  # fmt: skip


@triton.jit
def paged_attention_prefill_entry(
    q,  # [B, T, H, D]
    k_cache,
    v_cache,
    block_table,
    positions,
    T,  # int32 extra arg
    o,  # [B, T, H, D]
    H: tl.constexpr,
    KVH: tl.constexpr,
    PG: tl.constexpr,
    M: tl.constexpr,
    D: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE_ALIGNED: tl.constexpr,
    QK_SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    FOLD_SCALE: tl.constexpr,
):
    seq = T.to(tl.int64) * (H * D)
    _paged_prefill_kernel(
        q, k_cache, v_cache, block_table, positions, o, T, KVH, H // KVH, PG,
        seq, H * D, D,  # q strides (b, t, h)
        seq, H * D, D,  # o
        KVH * PG * D, PG * D, D, M,
        D=D, G_PAD=G_PAD, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, PAGE_ALIGNED=PAGE_ALIGNED, QK_SCALE=QK_SCALE,
        DOT_PRECISION=DOT_PRECISION, NUM_STAGES=NUM_STAGES, FOLD_SCALE=FOLD_SCALE,
    )  # fmt: skip


@triton.jit
def paged_decode_split_entry(
    q,  # [B, 1, H, D]
    k_cache,
    v_cache,
    block_table,
    positions,
    m,  # [B * H, NS] f32
    l,  # [B * H, NS] f32
    acc,  # [B * H, NS, D] f32
    H: tl.constexpr,
    KVH: tl.constexpr,
    PG: tl.constexpr,
    M: tl.constexpr,
    NS: tl.constexpr,
    D: tl.constexpr,
    G_PAD: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE_ALIGNED: tl.constexpr,
    QK_SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    _paged_decode_split_kernel(
        q, k_cache, v_cache, block_table, positions, m, l, acc, H, KVH, H // KVH, PG, NS,
        H * D, D,  # q strides (b, h)
        KVH * PG * D, PG * D, D, M,
        D=D, G_PAD=G_PAD, SPLIT=SPLIT, BLOCK_N=BLOCK_N, PAGE_ALIGNED=PAGE_ALIGNED, QK_SCALE=QK_SCALE,
        DOT_PRECISION=DOT_PRECISION, NUM_STAGES=NUM_STAGES,
    )  # fmt: skip


@triton.jit
def paged_decode_merge_entry(
    q,  # [B, 1, H, D]: gives the output's shape and dtype only (not read)
    m,
    l,
    acc,
    positions,
    o,  # [B, 1, H, D]
    H: tl.constexpr,
    NS: tl.constexpr,
    D: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    _paged_decode_merge_kernel(m, l, acc, positions, o, H, NS, H * D, D, D=D, SPLIT=SPLIT, BLOCK_S=BLOCK_S)


def _io(name: str, dtypes: Sequence[torch.dtype]):
    spec = PLUGINS[name]
    out = spec.output_dtypes(dtypes)
    return tuple(zip(spec.inputs, dtypes)), tuple(zip(spec.outputs, out))


def _cache_dims(name: str, shapes: Sequence[tuple[Dim, ...]], query: str) -> dict[str, int]:
    """Build-time constants: heads H (or KVH of k), KVH, page size PG, head dim D, pages per row M."""
    q, cache, table = shapes[0], shapes[1], shapes[3]
    heads = static(q[2], f"{name}: {query} dim 2 (heads)")
    d = static(q[3], f"{name}: {query} dim 3 (head dim)")
    kvh = static(cache[1], f"{name}: k_cache dim 1 (kv heads)")
    pg = static(cache[2], f"{name}: k_cache dim 2 (page size)")
    dc = static(cache[3], f"{name}: k_cache dim 3 (head dim)")
    m = static(table[1], f"{name}: block_table dim 1 (pages per row)")
    static(cache[0], f"{name}: k_cache dim 0 (pool pages)")
    if dc != d:
        raise ValueError(f"{name}: head dim of {query} ({d}) != the cache's ({dc})")
    if not prefill_kernels.supports_head_dim(d):
        raise ValueError(f"{name}: head dim must be a power of two in [16, 256]; got {d}")
    if heads % kvh:
        raise ValueError(f"{name}: {heads} heads of {query} are not a multiple of {kvh} kv heads")
    return {"H": heads, "KVH": kvh, "PG": pg, "D": d, "M": m}


def _same_cache_dtype(name: str, dtypes: Sequence[torch.dtype]) -> None:
    if not (dtypes[0] == dtypes[1] == dtypes[2]):
        raise ValueError(f"{name}: q/k, k_cache and v_cache must share a dtype; got {dtypes[:3]}")


TACTICS: dict[str, tuple[int, ...]] = {"paged_kv_write": (1,), "paged_attention_prefill": (1,),
                                       "paged_decode_split": (1,), "paged_decode_merge": (1,)}


def plan_paged_kv_write(
    dtypes: Sequence[torch.dtype], shapes: Sequence[tuple[Dim, ...]], attrs: Mapping[str, int], tactic: int = 1
) -> KernelPlan:
    """k_cache, v_cache, k, v, block_table, positions -> (k_cache, v_cache) in place; grid (T, B); extra (T,)."""
    name = "paged_kv_write"
    check_call(PLUGINS[name], shapes, attrs)
    k_shape = shapes[2]
    b, t = k_shape[0], k_shape[1]
    reordered = [shapes[2], shapes[0], shapes[1], shapes[4]]  # k as the "query", then caches, then the table
    dims = _cache_dims(name, reordered, "k")
    if dims["H"] != dims["KVH"]:
        raise ValueError(f"{name}: k has {dims['H']} heads, the cache {dims['KVH']}")
    if not (dtypes[0] == dtypes[1] == dtypes[2] == dtypes[3]):
        raise ValueError(f"{name}: k, v and the caches must share a dtype; got {dtypes[:4]}")
    inputs, outputs = _io(name, dtypes)
    kvh, d = dims["KVH"], dims["D"]
    return KernelPlan(
        plugin=name, fn=paged_kv_write_entry, inputs=inputs, extra_args=(("T", t),), outputs=outputs,
        constexprs=dict(KVH=kvh, PG=dims["PG"], M=dims["M"], D=d, BLOCK_H=next_pow2(kvh)),
        grid=(t, b, 1), num_warps=4 if kvh * d >= 1024 else 1, num_stages=1, tactic=tactic,
    )  # fmt: skip


def plan_paged_attention_prefill(
    dtypes: Sequence[torch.dtype], shapes: Sequence[tuple[Dim, ...]], attrs: Mapping[str, float], tactic: int = 1
) -> KernelPlan:
    """q, k_cache, v_cache, block_table, positions -> o; grid (cdiv(T, BLOCK_T), B * KVH); extra args (T,)."""
    name = "paged_attention_prefill"
    check_call(PLUGINS[name], shapes, attrs)
    _same_cache_dtype(name, dtypes)
    dims = _cache_dims(name, shapes, "q")
    b, t = shapes[0][0], shapes[0][1]
    cfg = prefill_kernels.default_prefill_config(dims["D"], dtypes[0], _CUDA)
    g_pad, block_m, block_t = prefill_kernels.tile_shape(cfg, dims["H"] // dims["KVH"])
    scale = float(attrs["scale"])
    inputs, outputs = _io(name, dtypes)
    return KernelPlan(
        plugin=name, fn=paged_attention_prefill_entry, inputs=inputs, extra_args=(("T", t),), outputs=outputs,
        constexprs=dict(
            H=dims["H"], KVH=dims["KVH"], PG=dims["PG"], M=dims["M"], D=dims["D"], G_PAD=g_pad, BLOCK_M=block_m,
            BLOCK_N=cfg.block_n, PAGE_ALIGNED=dims["PG"] % cfg.block_n == 0, QK_SCALE=scale * LOG2E,
            DOT_PRECISION=prefill_kernels.dot_precision(dtypes[0], _CUDA), NUM_STAGES=cfg.num_stages,
            FOLD_SCALE=cfg.fold_scale,
        ),
        grid=(cdiv(t, block_t), b * dims["KVH"], 1), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        tactic=tactic,
    )  # fmt: skip


def _check_split(name: str, dims: Mapping[str, int], split: int) -> int:
    want = decode_kernels.decode_split(dims["M"] * dims["PG"], dims["D"], _CUDA)
    if split != want:  # the ONNX lowering writes the kernel's own split; another one is a stale graph
        raise ValueError(f"{name}: split {split} is not the decode kernel's split {want} for a capacity of "
                         f"{dims['M'] * dims['PG']} positions at head dim {dims['D']}; re-export the graph")
    return split


def plan_paged_decode_split(
    dtypes: Sequence[torch.dtype], shapes: Sequence[tuple[Dim, ...]], attrs: Mapping[str, float], tactic: int = 1
) -> KernelPlan:
    """q [B, 1, H, D], caches, block_table, positions -> m, l, acc partials; grid (NS, B * KVH)."""
    name = "paged_decode_split"
    check_call(PLUGINS[name], shapes, attrs)
    _same_cache_dtype(name, dtypes)
    dims = _cache_dims(name, shapes, "q")
    if static(shapes[0][1], f"{name}: q dim 1 (tokens)") != 1:
        raise ValueError(f"{name}: q must be [B, 1, H, D] (one query per row)")
    split = _check_split(name, dims, int(attrs["split"]))
    ns = decode_splits(dims["M"], dims["PG"], split)
    block_n, num_warps, num_stages = decode_kernels.decode_tiles(split, dims["D"], _CUDA, dtypes[0])
    inputs, outputs = _io(name, dtypes)
    return KernelPlan(
        plugin=name, fn=paged_decode_split_entry, inputs=inputs, extra_args=(), outputs=outputs,
        constexprs=dict(
            H=dims["H"], KVH=dims["KVH"], PG=dims["PG"], M=dims["M"], NS=ns, D=dims["D"],
            G_PAD=decode_kernels.decode_group_pad(dims["H"] // dims["KVH"]), SPLIT=split, BLOCK_N=block_n,
            PAGE_ALIGNED=dims["PG"] % block_n == 0, QK_SCALE=float(attrs["scale"]) * LOG2E,
            DOT_PRECISION=prefill_kernels.dot_precision(dtypes[0], _CUDA),
            NUM_STAGES=num_stages,
        ),
        grid=(ns, shapes[0][0] * dims["KVH"], 1), num_warps=num_warps, num_stages=1, tactic=tactic,
    )  # fmt: skip


def plan_paged_decode_merge(
    dtypes: Sequence[torch.dtype], shapes: Sequence[tuple[Dim, ...]], attrs: Mapping[str, int], tactic: int = 1
) -> KernelPlan:
    """q (shape and dtype), m, l, acc, positions -> o [B, 1, H, D]; grid (B * H,)."""
    name = "paged_decode_merge"
    check_call(PLUGINS[name], shapes, attrs)
    q, m = shapes[0], shapes[1]
    h = static(q[2], f"{name}: q dim 2 (heads)")
    d = static(q[3], f"{name}: q dim 3 (head dim)")
    ns = static(m[1], f"{name}: m dim 1 (splits)")
    if static(shapes[3][2], f"{name}: acc dim 2 (head dim)") != d:
        raise ValueError(f"{name}: acc head dim != q's ({d})")
    inputs, outputs = _io(name, dtypes)
    return KernelPlan(
        plugin=name, fn=paged_decode_merge_entry, inputs=inputs, extra_args=(), outputs=outputs,
        constexprs=dict(H=h, NS=ns, D=d, SPLIT=int(attrs["split"]), BLOCK_S=decode_kernels.MERGE_BLOCK_S),
        grid=(q[0] * h, 1, 1), num_warps=4, num_stages=1, tactic=tactic,
    )  # fmt: skip


PLANNERS = {
    "paged_kv_write": plan_paged_kv_write,
    "paged_attention_prefill": plan_paged_attention_prefill,
    "paged_decode_split": plan_paged_decode_split,
    "paged_decode_merge": plan_paged_decode_merge,
}


def register() -> None:
    """Register the four plugins with ``tensorrt.plugin`` (register, autotune, aot_impl). Needs TensorRT >= 10.9
    (``TensorDesc.aliased()`` for the in-place write)."""
    from typing import List, Tuple, Union

    import tensorrt.plugin as trtp

    from . import _trt

    TD = trtp.TensorDesc
    Combos = List[trtp.AutoTuneCombination]
    Aot = Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]

    @trtp.register("minimax::paged_kv_write")
    def _write_desc(k_cache: TD, v_cache: TD, k: TD, v: TD, block_table: TD, positions: TD) -> Tuple[TD, TD]:
        return _trt.output_descs("paged_kv_write", (k_cache, v_cache, k, v, block_table, positions), {})

    @trtp.autotune("minimax::paged_kv_write")
    def _write_tune(k_cache: TD, v_cache: TD, k: TD, v: TD, block_table: TD, positions: TD,
                    outputs: Tuple[TD, TD]) -> Combos:
        return _trt.combinations("paged_kv_write", TACTICS["paged_kv_write"])

    @trtp.aot_impl("minimax::paged_kv_write")
    def _write_aot(k_cache: TD, v_cache: TD, k: TD, v: TD, block_table: TD, positions: TD, outputs: Tuple[TD, TD],
                   tactic: int) -> Aot:
        return _trt.aot("paged_kv_write", (k_cache, v_cache, k, v, block_table, positions), {}, tactic)

    @trtp.register("minimax::paged_attention_prefill")
    def _prefill_desc(q: TD, k_cache: TD, v_cache: TD, block_table: TD, positions: TD, scale: float) -> TD:
        return _trt.output_descs("paged_attention_prefill", (q, k_cache, v_cache, block_table, positions),
                                 {"scale": scale})

    @trtp.autotune("minimax::paged_attention_prefill")
    def _prefill_tune(q: TD, k_cache: TD, v_cache: TD, block_table: TD, positions: TD, scale: float,
                      outputs: Tuple[TD]) -> Combos:
        return _trt.combinations("paged_attention_prefill", TACTICS["paged_attention_prefill"])

    @trtp.aot_impl("minimax::paged_attention_prefill")
    def _prefill_aot(q: TD, k_cache: TD, v_cache: TD, block_table: TD, positions: TD, scale: float,
                     outputs: Tuple[TD], tactic: int) -> Aot:
        return _trt.aot("paged_attention_prefill", (q, k_cache, v_cache, block_table, positions), {"scale": scale},
                        tactic)

    @trtp.register("minimax::paged_decode_split")
    def _split_desc(q: TD, k_cache: TD, v_cache: TD, block_table: TD, positions: TD, split: int,
                    scale: float) -> Tuple[TD, TD, TD]:
        return _trt.output_descs("paged_decode_split", (q, k_cache, v_cache, block_table, positions),
                                 {"split": split, "scale": scale})

    @trtp.autotune("minimax::paged_decode_split")
    def _split_tune(q: TD, k_cache: TD, v_cache: TD, block_table: TD, positions: TD, split: int, scale: float,
                    outputs: Tuple[TD, TD, TD]) -> Combos:
        return _trt.combinations("paged_decode_split", TACTICS["paged_decode_split"])

    @trtp.aot_impl("minimax::paged_decode_split")
    def _split_aot(q: TD, k_cache: TD, v_cache: TD, block_table: TD, positions: TD, split: int, scale: float,
                   outputs: Tuple[TD, TD, TD], tactic: int) -> Aot:
        return _trt.aot("paged_decode_split", (q, k_cache, v_cache, block_table, positions),
                        {"split": split, "scale": scale}, tactic)

    @trtp.register("minimax::paged_decode_merge")
    def _merge_desc(q: TD, m: TD, l: TD, acc: TD, positions: TD, split: int) -> TD:
        return _trt.output_descs("paged_decode_merge", (q, m, l, acc, positions), {"split": split})

    @trtp.autotune("minimax::paged_decode_merge")
    def _merge_tune(q: TD, m: TD, l: TD, acc: TD, positions: TD, split: int, outputs: Tuple[TD]) -> Combos:
        return _trt.combinations("paged_decode_merge", TACTICS["paged_decode_merge"])

    @trtp.aot_impl("minimax::paged_decode_merge")
    def _merge_aot(q: TD, m: TD, l: TD, acc: TD, positions: TD, split: int, outputs: Tuple[TD],
                   tactic: int) -> Aot:
        return _trt.aot("paged_decode_merge", (q, m, l, acc, positions), {"split": split}, tactic)
