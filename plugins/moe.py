"""TensorRT plugins for the MiniMax MoE: one plugin per stage of ``kernels/moe/dispatch.py``.

    grouped path (prefill): moe_route -> moe_align -> moe_swiglu_grouped -> moe_down_grouped -> moe_combine
    decode path:            moe_route -> moe_swiglu_decode -> moe_down_combine_decode
    int8 experts (W8A16):   the same chains with moe_{swiglu,down}_grouped_int8 / moe_swiglu_decode_int8 /
                            moe_down_combine_decode_int8: the same kernels given the fp32 scales of the int8 weights

Each plugin launches exactly one Triton kernel of ``kernels/moe/{routing,grouped}.py`` through a thin entry kernel
with TensorRT's AOT argument order (inputs, int32 extra args, outputs). Every intermediate has a static upper-bound
shape (R = T top_k + E (block_m - 1) rows, NB = cdiv(R, block_m) blocks), so the chain has no data-dependent
shapes. Token counts are extra args (dynamic); hidden and I are extra args too (their values are build-time
constants, so a multiple of 16 is passed to the compiler as such); E, top_k, block_m and the tiles are constexprs.

Tactics (1-based) are the tile sets ``kernels.moe.dispatch.default_config`` picks for representative token counts
(``TACTIC_TOKENS``); TensorRT may time them at the profile's opt shape. The decode stages hold the tokens of one
program in ``T_PAD`` = 16 rows (``DECODE_MAX_TOKENS``, the dispatch's decode limit) unless T is a build-time
constant: their profile must keep T <= 16 (``autotune`` checks the profile's max).

``plan_*`` need no TensorRT; ``register`` imports it lazily. No ``from __future__ import annotations`` here:
``tensorrt.plugin`` reads the registered functions' annotations as classes.
"""

from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import partial

import torch
import triton
import triton.language as tl

from kernels.moe.dispatch import MoeTritonConfig, default_config
from kernels.moe.grouped import (
    _combine_kernel,
    _down_combine_decode_kernel,
    _down_grouped_kernel,
    _fit_smem,
    _swiglu_decode_kernel,
    _swiglu_grouped_kernel,
)
from kernels.moe.routing import _align_kernel, _route_kernel

from .algebra import Dim, cdiv, is_static, next_pow2, static
from .payload import KernelPlan
from .spec import PLUGINS, align_sizes, check_call

__all__ = ["PLANNERS", "TACTICS", "TACTIC_TOKENS", "DECODE_MAX_TOKENS", "stage_config", "register"]

_CUDA = torch.device("cuda")
DECODE_MAX_TOKENS = MoeTritonConfig().decode_max_tokens  # 16
TACTIC_TOKENS: dict[str, tuple[int, ...]] = {
    "moe_route": (1, 256, 4096, 16384),
    "moe_align": (1024,),
    "moe_swiglu_grouped": (256, 1024, 4096, 16384),
    "moe_down_grouped": (256, 1024, 4096, 16384),
    "moe_combine": (1024,),
    "moe_swiglu_decode": (1,),
    "moe_down_combine_decode": (1,),
}
for _stage in ("moe_swiglu_grouped", "moe_down_grouped", "moe_swiglu_decode", "moe_down_combine_decode"):
    TACTIC_TOKENS[f"{_stage}_int8"] = TACTIC_TOKENS[_stage]  # int8 experts: the same kernels, the same tiles
TACTICS: dict[str, tuple[int, ...]] = {n: tuple(range(1, len(t) + 1)) for n, t in TACTIC_TOKENS.items()}
COMBINE_BLOCK_T, COMBINE_BLOCK_H, COMBINE_WARPS = 4, 1024, 4  # grouped.combine's defaults (Triton's 4 warps)
ALIGN_WARPS = 4


# --- entry kernels: TensorRT order (inputs, int32 extra args, outputs), then constexprs ------------------------------


@triton.jit
def moe_route_entry(
    x, router_weight, n_tokens, hidden, topk_weights, topk_ids,
    NUM_EXPERTS: tl.constexpr, E_PAD: tl.constexpr, TOP_K: tl.constexpr, K_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_DOT: tl.constexpr,
):  # fmt: skip
    _route_kernel(
        x, router_weight, topk_weights, topk_ids, n_tokens, hidden,
        NUM_EXPERTS=NUM_EXPERTS, E_PAD=E_PAD, TOP_K=TOP_K, K_PAD=K_PAD, BLOCK_T=BLOCK_T, BLOCK_K=BLOCK_K,
        DOT_PRECISION=DOT_PRECISION, USE_DOT=USE_DOT,
    )  # fmt: skip


@triton.jit
def moe_align_entry(
    topk_ids, n_slots, max_rows, max_blocks,
    sorted_slots, inv_perm, block_expert, expert_counts, expert_offsets,
    NUM_EXPERTS: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    _align_kernel(
        topk_ids, sorted_slots, inv_perm, block_expert, expert_counts, expert_offsets, n_slots, max_rows, max_blocks,
        NUM_EXPERTS=NUM_EXPERTS, E_PAD=E_PAD, BLOCK_M=BLOCK_M, CHUNK=CHUNK,
    )  # fmt: skip


@triton.jit
def moe_swiglu_grouped_entry(
    x, w1, w3, sorted_slots, block_expert, n_slots, hidden, inter, max_blocks, h,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERLEAVE: tl.constexpr,
):  # fmt: skip
    _swiglu_grouped_kernel(
        x, w1, w3, h, sorted_slots, block_expert, n_slots, hidden, inter, max_blocks,
        TOP_K=TOP_K, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M, EVEN_K=EVEN_K,
        DOT_PRECISION=DOT_PRECISION, INTERLEAVE=INTERLEAVE,
    )  # fmt: skip


@triton.jit
def moe_down_grouped_entry(
    h, w2, sorted_slots, block_expert, topk_weights, n_slots, hidden, inter, max_blocks, y_perm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    _down_grouped_kernel(
        h, w2, y_perm, sorted_slots, block_expert, topk_weights, n_slots, hidden, inter, max_blocks,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M, EVEN_K=EVEN_K, DOT_PRECISION=DOT_PRECISION,
    )  # fmt: skip


@triton.jit
def moe_combine_entry(
    y_perm, inv_perm, n_tokens, hidden, y,
    TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    _combine_kernel(y_perm, inv_perm, y, n_tokens, hidden, TOP_K=TOP_K, BLOCK_T=BLOCK_T, BLOCK_H=BLOCK_H)


@triton.jit
def moe_swiglu_decode_entry(
    x, w1, w3, topk_ids, n_tokens, hidden, inter, h,
    NUM_EXPERTS: tl.constexpr, TOP_K: tl.constexpr, K_PAD: tl.constexpr, T_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    _swiglu_decode_kernel(
        x, w1, w3, h, topk_ids, n_tokens, hidden, inter,
        NUM_EXPERTS=NUM_EXPERTS, TOP_K=TOP_K, K_PAD=K_PAD, T_PAD=T_PAD, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        EVEN_K=EVEN_K, DOT_PRECISION=DOT_PRECISION,
    )  # fmt: skip


@triton.jit
def moe_down_combine_decode_entry(
    h, w2, topk_weights, topk_ids, n_tokens, hidden, inter, y,
    NUM_EXPERTS: tl.constexpr, TOP_K: tl.constexpr, K_PAD: tl.constexpr, T_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    _down_combine_decode_kernel(
        h, w2, topk_weights, topk_ids, y, n_tokens, hidden, inter,
        NUM_EXPERTS=NUM_EXPERTS, TOP_K=TOP_K, K_PAD=K_PAD, T_PAD=T_PAD, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        EVEN_K=EVEN_K, DOT_PRECISION=DOT_PRECISION,
    )  # fmt: skip


@triton.jit
def moe_swiglu_grouped_int8_entry(
    x, w1, w3, w1_scale, w3_scale, sorted_slots, block_expert, n_slots, hidden, inter, max_blocks, h,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERLEAVE: tl.constexpr,
):  # fmt: skip
    _swiglu_grouped_kernel(
        x, w1, w3, h, sorted_slots, block_expert, n_slots, hidden, inter, max_blocks,
        TOP_K=TOP_K, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M, EVEN_K=EVEN_K,
        DOT_PRECISION=DOT_PRECISION, INTERLEAVE=INTERLEAVE, s1_ptr=w1_scale, s3_ptr=w3_scale,
    )  # fmt: skip


@triton.jit
def moe_down_grouped_int8_entry(
    h, w2, w2_scale, sorted_slots, block_expert, topk_weights, n_slots, hidden, inter, max_blocks, y_perm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    _down_grouped_kernel(
        h, w2, y_perm, sorted_slots, block_expert, topk_weights, n_slots, hidden, inter, max_blocks,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M, EVEN_K=EVEN_K, DOT_PRECISION=DOT_PRECISION,
        s2_ptr=w2_scale,
    )  # fmt: skip


@triton.jit
def moe_swiglu_decode_int8_entry(
    x, w1, w3, w1_scale, w3_scale, topk_ids, n_tokens, hidden, inter, h,
    NUM_EXPERTS: tl.constexpr, TOP_K: tl.constexpr, K_PAD: tl.constexpr, T_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    _swiglu_decode_kernel(
        x, w1, w3, h, topk_ids, n_tokens, hidden, inter,
        NUM_EXPERTS=NUM_EXPERTS, TOP_K=TOP_K, K_PAD=K_PAD, T_PAD=T_PAD, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        EVEN_K=EVEN_K, DOT_PRECISION=DOT_PRECISION, s1_ptr=w1_scale, s3_ptr=w3_scale,
    )  # fmt: skip


@triton.jit
def moe_down_combine_decode_int8_entry(
    h, w2, w2_scale, topk_weights, topk_ids, n_tokens, hidden, inter, y,
    NUM_EXPERTS: tl.constexpr, TOP_K: tl.constexpr, K_PAD: tl.constexpr, T_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    _down_combine_decode_kernel(
        h, w2, topk_weights, topk_ids, y, n_tokens, hidden, inter,
        NUM_EXPERTS=NUM_EXPERTS, TOP_K=TOP_K, K_PAD=K_PAD, T_PAD=T_PAD, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        EVEN_K=EVEN_K, DOT_PRECISION=DOT_PRECISION, s2_ptr=w2_scale,
    )  # fmt: skip


# --- planners --------------------------------------------------------------------------------------------------------

Shapes = Sequence[tuple[Dim, ...]]


def stage_config(name: str, tactic: int, top_k: int, num_experts: int) -> MoeTritonConfig:
    """The dispatch's tile choice for the tactic's representative token count (on the GPU)."""
    if tactic not in TACTICS[name]:
        raise ValueError(f"{name}: unknown tactic {tactic}; valid: {TACTICS[name]}")
    return default_config(TACTIC_TOKENS[name][tactic - 1], top_k, num_experts, _CUDA)


def _io(name: str, dtypes: Sequence[torch.dtype]):
    spec = PLUGINS[name]
    return tuple(zip(spec.inputs, dtypes)), tuple(zip(spec.outputs, spec.output_dtypes(dtypes)))


def _agree(name: str, what: str, *dims: tuple[str, Dim]) -> int:
    """One build-time value for a dimension that several inputs share; ``ValueError`` naming them otherwise."""
    values = {label: static(d, f"{name}: {label}") for label, d in dims}
    if len(set(values.values())) != 1:
        raise ValueError(f"{name}: {what} disagree: {values}")
    return next(iter(values.values()))


def _dot_precision(dtype: torch.dtype) -> str:
    return "tf32x3" if dtype == torch.float32 else "tf32"  # fp32 on the GPU as in grouped._dot_precision


def _check_top_k(name: str, top_k: int, num_experts: int) -> None:
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"{name}: top_k must be in [1, E={num_experts}]; got {top_k}")


def plan_moe_route(dtypes, shapes: Shapes, attrs: Mapping[str, int], tactic: int = 1) -> KernelPlan:
    name = "moe_route"
    check_call(PLUGINS[name], shapes, attrs)
    (t, hx), (e, hr) = shapes
    hidden = _agree(name, "hidden sizes", ("x dim 1", hx), ("router_weight dim 1", hr))
    e = static(e, f"{name}: router_weight dim 0 (experts)")
    top_k = attrs["top_k"]
    _check_top_k(name, top_k, e)
    cfg = stage_config(name, tactic, top_k, e)
    inputs, outputs = _io(name, dtypes)
    return KernelPlan(
        name, moe_route_entry, inputs, (("n_tokens", t), ("hidden", hidden)), outputs,
        dict(NUM_EXPERTS=e, E_PAD=max(16, next_pow2(e)), TOP_K=top_k, K_PAD=next_pow2(max(top_k, 2)),
             BLOCK_T=cfg.route_block_t, BLOCK_K=cfg.route_block_k, DOT_PRECISION="tf32x3", USE_DOT=cfg.route_dot),
        grid=(cdiv(t, cfg.route_block_t), 1, 1), num_warps=cfg.route_warps, num_stages=3, tactic=tactic,
    )  # fmt: skip


def plan_moe_align(dtypes, shapes: Shapes, attrs: Mapping[str, int], tactic: int = 1) -> KernelPlan:
    name = "moe_align"
    check_call(PLUGINS[name], shapes, attrs)
    t, k = shapes[0]
    e, bm = attrs["num_experts"], attrs["block_m"]
    _check_top_k(name, static(k, f"{name}: topk_ids dim 1 (top_k)"), e)
    n_slots, max_rows, max_blocks = align_sizes(t, k, e, bm)
    cfg = stage_config(name, tactic, static(k, "top_k"), e)
    inputs, outputs = _io(name, dtypes)
    return KernelPlan(
        name, moe_align_entry, inputs, (("n_slots", n_slots), ("max_rows", max_rows), ("max_blocks", max_blocks)),
        outputs, dict(NUM_EXPERTS=e, E_PAD=max(2, next_pow2(e)), BLOCK_M=bm, CHUNK=cfg.align_chunk),
        grid=(e, 1, 1), num_warps=ALIGN_WARPS, num_stages=3, tactic=tactic,
    )  # fmt: skip


def _grouped_dims(name: str, x_or_h: tuple[Dim, ...], w: tuple[Dim, ...], gate: bool) -> tuple[int, int, int]:
    """(E, I, hidden) of the grouped/decode GEMMs from x [T, hidden] + w1 [E, I, hidden], or h [*, I] + w2."""
    e = static(w[0], f"{name}: {'w1' if gate else 'w2'} dim 0 (experts)")
    if gate:
        inter = static(w[1], f"{name}: w1 dim 1 (I)")
        hidden = _agree(name, "hidden sizes", ("x dim 1", x_or_h[1]), ("w1 dim 2", w[2]))
    else:
        hidden = static(w[1], f"{name}: w2 dim 1 (hidden)")
        inter = _agree(name, "intermediate sizes", ("h dim 1", x_or_h[1]), ("w2 dim 2", w[2]))
    return e, inter, hidden


def _check_w3(name: str, w1: tuple[Dim, ...], w3: tuple[Dim, ...]) -> None:
    for i, (a, b) in enumerate(zip(w1, w3)):
        if is_static(a) and is_static(b) and static(a, "w1") != static(b, "w3"):
            raise ValueError(f"{name}: w3 must have w1's shape; dim {i}: w1 {static(a, 'w1')}, w3 {static(b, 'w3')}")


def _check_scales(name: str, scales: Sequence[tuple[str, tuple[Dim, ...]]], e: int, out: int) -> None:
    """int8 stages: each scale tensor is [E, out] (one fp32 scale per output channel of each expert)."""
    for label, shape in scales:
        got = tuple(static(d, f"{name}: {label} dim {i}") for i, d in enumerate(shape))
        if got != (e, out):
            raise ValueError(f"{name}: {label} must be [E={e}, {out}]; got {list(got)}")


def plan_moe_swiglu_grouped(dtypes, shapes: Shapes, attrs: Mapping[str, int], tactic: int = 1,
                            name: str = "moe_swiglu_grouped") -> KernelPlan:
    check_call(PLUGINS[name], shapes, attrs)
    int8 = name.endswith("_int8")
    x, w1, w3 = shapes[:3]
    block_expert = shapes[-1]
    e, inter, hidden = _grouped_dims(name, x, w1, gate=True)
    _check_w3(name, w1, w3)
    if int8:
        _check_scales(name, (("w1_scale", shapes[3]), ("w3_scale", shapes[4])), e, inter)
    top_k, bm = attrs["top_k"], attrs["block_m"]
    _check_top_k(name, top_k, e)
    cfg = replace(stage_config(name, tactic, top_k, e), block_m=bm)
    stages, block_k = _fit_smem(cfg.swiglu_stages, cfg.swiglu_block_k, (bm + 2 * cfg.swiglu_block_n) * dtypes[0].itemsize)
    max_blocks = block_expert[0]
    inputs, outputs = _io(name, dtypes)
    return KernelPlan(
        name, moe_swiglu_grouped_int8_entry if int8 else moe_swiglu_grouped_entry, inputs,
        (("n_slots", x[0] * top_k), ("hidden", hidden), ("inter", inter), ("max_blocks", max_blocks)), outputs,
        dict(TOP_K=top_k, BLOCK_M=bm, BLOCK_N=cfg.swiglu_block_n, BLOCK_K=block_k, GROUP_M=cfg.group_m,
             EVEN_K=hidden % block_k == 0, DOT_PRECISION=_dot_precision(dtypes[0]), INTERLEAVE=cfg.swiglu_interleave),
        grid=(max_blocks * cdiv(inter, cfg.swiglu_block_n), 1, 1), num_warps=cfg.swiglu_warps, num_stages=stages,
        tactic=tactic,
    )  # fmt: skip


def plan_moe_down_grouped(dtypes, shapes: Shapes, attrs: Mapping[str, int], tactic: int = 1,
                          name: str = "moe_down_grouped") -> KernelPlan:
    check_call(PLUGINS[name], shapes, attrs)
    int8 = name.endswith("_int8")
    h, w2 = shapes[:2]
    block_expert, topk_weights = shapes[-2:]
    e, inter, hidden = _grouped_dims(name, h, w2, gate=False)
    if int8:
        _check_scales(name, (("w2_scale", shapes[2]),), e, hidden)
    top_k = static(topk_weights[1], f"{name}: topk_weights dim 1 (top_k)")
    _check_top_k(name, top_k, e)
    bm = attrs["block_m"]
    cfg = replace(stage_config(name, tactic, top_k, e), block_m=bm)
    stages, block_k = _fit_smem(cfg.down_stages, cfg.down_block_k, (bm + cfg.down_block_n) * dtypes[0].itemsize)
    max_blocks = block_expert[0]
    inputs, outputs = _io(name, dtypes)
    return KernelPlan(
        name, moe_down_grouped_int8_entry if int8 else moe_down_grouped_entry, inputs,
        (("n_slots", topk_weights[0] * top_k), ("hidden", hidden), ("inter", inter), ("max_blocks", max_blocks)),
        outputs,
        dict(BLOCK_M=bm, BLOCK_N=cfg.down_block_n, BLOCK_K=block_k, GROUP_M=cfg.group_m, EVEN_K=inter % block_k == 0,
             DOT_PRECISION=_dot_precision(dtypes[0])),
        grid=(max_blocks * cdiv(hidden, cfg.down_block_n), 1, 1), num_warps=cfg.down_warps, num_stages=stages,
        tactic=tactic,
    )  # fmt: skip


def plan_moe_combine(dtypes, shapes: Shapes, attrs: Mapping[str, int], tactic: int = 1) -> KernelPlan:
    name = "moe_combine"
    check_call(PLUGINS[name], shapes, attrs)
    if tactic not in TACTICS[name]:
        raise ValueError(f"{name}: unknown tactic {tactic}; valid: {TACTICS[name]}")
    (_, hidden), (n_slots,) = shapes
    hidden = static(hidden, f"{name}: y_perm dim 1 (hidden)")
    top_k = attrs["top_k"]
    t = n_slots // top_k
    block_h = min(COMBINE_BLOCK_H, next_pow2(hidden))
    inputs, outputs = _io(name, dtypes)
    return KernelPlan(
        name, moe_combine_entry, inputs, (("n_tokens", t), ("hidden", hidden)), outputs,
        dict(TOP_K=top_k, BLOCK_T=COMBINE_BLOCK_T, BLOCK_H=block_h),
        grid=(cdiv(t, COMBINE_BLOCK_T), cdiv(hidden, block_h), 1), num_warps=COMBINE_WARPS, num_stages=3,
        tactic=tactic,
    )  # fmt: skip


def _t_pad(name: str, t: Dim) -> int:
    if not is_static(t):
        return DECODE_MAX_TOKENS
    n = static(t, f"{name}: tokens")
    return max(16, next_pow2(n))


def plan_moe_swiglu_decode(dtypes, shapes: Shapes, attrs: Mapping[str, int], tactic: int = 1,
                           name: str = "moe_swiglu_decode") -> KernelPlan:
    check_call(PLUGINS[name], shapes, attrs)
    int8 = name.endswith("_int8")
    x, w1, w3 = shapes[:3]
    topk_ids = shapes[-1]
    e, inter, hidden = _grouped_dims(name, x, w1, gate=True)
    _check_w3(name, w1, w3)
    if int8:
        _check_scales(name, (("w1_scale", shapes[3]), ("w3_scale", shapes[4])), e, inter)
    top_k = static(topk_ids[1], f"{name}: topk_ids dim 1 (top_k)")
    _check_top_k(name, top_k, e)
    cfg = stage_config(name, tactic, top_k, e)
    t_pad = _t_pad(name, x[0])
    stages, block_k = _fit_smem(cfg.decode_stages, cfg.decode_block_k, (t_pad + 2 * cfg.decode_block_n) * dtypes[0].itemsize)
    inputs, outputs = _io(name, dtypes)
    return KernelPlan(
        name, moe_swiglu_decode_int8_entry if int8 else moe_swiglu_decode_entry, inputs, (("n_tokens", x[0]), ("hidden", hidden), ("inter", inter)), outputs,
        dict(NUM_EXPERTS=e, TOP_K=top_k, K_PAD=next_pow2(max(top_k, 2)), T_PAD=t_pad, BLOCK_N=cfg.decode_block_n,
             BLOCK_K=block_k, EVEN_K=hidden % block_k == 0, DOT_PRECISION=_dot_precision(dtypes[0])),
        grid=(cdiv(inter, cfg.decode_block_n), 1, 1), num_warps=cfg.decode_warps, num_stages=stages, tactic=tactic,
    )  # fmt: skip


def plan_moe_down_combine_decode(dtypes, shapes: Shapes, attrs: Mapping[str, int], tactic: int = 1,
                                 name: str = "moe_down_combine_decode") -> KernelPlan:
    check_call(PLUGINS[name], shapes, attrs)
    int8 = name.endswith("_int8")
    h, w2 = shapes[:2]
    topk_weights, topk_ids = shapes[-2:]
    e, inter, hidden = _grouped_dims(name, h, w2, gate=False)
    if int8:
        _check_scales(name, (("w2_scale", shapes[2]),), e, hidden)
    top_k = _agree(name, "top_k", ("topk_weights dim 1", topk_weights[1]), ("topk_ids dim 1", topk_ids[1]))
    _check_top_k(name, top_k, e)
    cfg = stage_config(name, tactic, top_k, e)
    t = topk_ids[0]
    t_pad = _t_pad(name, t)
    stages, block_k = _fit_smem(
        cfg.decode_down_stages, cfg.decode_down_block_k, (t_pad + cfg.decode_down_block_n) * dtypes[0].itemsize
    )
    inputs, outputs = _io(name, dtypes)
    return KernelPlan(
        name, moe_down_combine_decode_int8_entry if int8 else moe_down_combine_decode_entry, inputs, (("n_tokens", t), ("hidden", hidden), ("inter", inter)), outputs,
        dict(NUM_EXPERTS=e, TOP_K=top_k, K_PAD=next_pow2(max(top_k, 2)), T_PAD=t_pad,
             BLOCK_N=cfg.decode_down_block_n, BLOCK_K=block_k, EVEN_K=inter % block_k == 0,
             DOT_PRECISION=_dot_precision(dtypes[0])),
        grid=(cdiv(hidden, cfg.decode_down_block_n), 1, 1), num_warps=cfg.decode_down_warps, num_stages=stages,
        tactic=tactic,
    )  # fmt: skip


PLANNERS = {
    "moe_route": plan_moe_route,
    "moe_align": plan_moe_align,
    "moe_swiglu_grouped": plan_moe_swiglu_grouped,
    "moe_down_grouped": plan_moe_down_grouped,
    "moe_combine": plan_moe_combine,
    "moe_swiglu_decode": plan_moe_swiglu_decode,
    "moe_down_combine_decode": plan_moe_down_combine_decode,
}
for _stage in ("moe_swiglu_grouped", "moe_down_grouped", "moe_swiglu_decode", "moe_down_combine_decode"):
    PLANNERS[f"{_stage}_int8"] = partial(PLANNERS[_stage], name=f"{_stage}_int8")


def _check_decode_profile(name: str, tokens: "object") -> None:
    """autotune: the decode stages keep T_PAD = 16 token rows per program; refuse a profile that allows more."""
    shape = tokens.shape
    t_max = shape.max[0] if shape.is_dynamic else shape[0]
    if t_max > DECODE_MAX_TOKENS:
        raise ValueError(
            f"{name}: the decode plugins take at most {DECODE_MAX_TOKENS} tokens; the profile allows T up to {t_max} "
            "(use the grouped path for prefill)"
        )


def register() -> None:
    """Register the eleven MoE plugins (seven stages, four of them also over int8 experts) with ``tensorrt.plugin``
    (register, autotune, aot_impl). TensorRT >= 10.9."""
    from typing import List, Tuple, Union

    import tensorrt.plugin as trtp

    from . import _trt

    TD = trtp.TensorDesc
    Combos = List[trtp.AutoTuneCombination]
    Aot = Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]

    # moe_route
    @trtp.register("minimax::moe_route")
    def _route_desc(x: TD, router_weight: TD, top_k: int) -> Tuple[TD, TD]:
        return _trt.output_descs("moe_route", (x, router_weight), {"top_k": top_k})

    @trtp.autotune("minimax::moe_route")
    def _route_tune(x: TD, router_weight: TD, top_k: int, outputs: Tuple[TD, TD]) -> Combos:
        return _trt.combinations("moe_route", TACTICS["moe_route"])

    @trtp.aot_impl("minimax::moe_route")
    def _route_aot(x: TD, router_weight: TD, top_k: int, outputs: Tuple[TD, TD], tactic: int) -> Aot:
        return _trt.aot("moe_route", (x, router_weight), {"top_k": top_k}, tactic)

    # moe_align
    @trtp.register("minimax::moe_align")
    def _align_desc(topk_ids: TD, num_experts: int, block_m: int) -> Tuple[TD, TD, TD, TD, TD]:
        return _trt.output_descs("moe_align", (topk_ids,), {"num_experts": num_experts, "block_m": block_m})

    @trtp.autotune("minimax::moe_align")
    def _align_tune(topk_ids: TD, num_experts: int, block_m: int, outputs: Tuple[TD, TD, TD, TD, TD]) -> Combos:
        return _trt.combinations("moe_align", TACTICS["moe_align"])

    @trtp.aot_impl("minimax::moe_align")
    def _align_aot(
        topk_ids: TD, num_experts: int, block_m: int, outputs: Tuple[TD, TD, TD, TD, TD], tactic: int
    ) -> Aot:
        return _trt.aot("moe_align", (topk_ids,), {"num_experts": num_experts, "block_m": block_m}, tactic)

    # moe_swiglu_grouped
    @trtp.register("minimax::moe_swiglu_grouped")
    def _swiglu_desc(x: TD, w1: TD, w3: TD, sorted_slots: TD, block_expert: TD, top_k: int, block_m: int) -> TD:
        return _trt.output_descs(
            "moe_swiglu_grouped", (x, w1, w3, sorted_slots, block_expert), {"top_k": top_k, "block_m": block_m}
        )

    @trtp.autotune("minimax::moe_swiglu_grouped")
    def _swiglu_tune(
        x: TD, w1: TD, w3: TD, sorted_slots: TD, block_expert: TD, top_k: int, block_m: int, outputs: Tuple[TD]
    ) -> Combos:
        return _trt.combinations("moe_swiglu_grouped", TACTICS["moe_swiglu_grouped"])

    @trtp.aot_impl("minimax::moe_swiglu_grouped")
    def _swiglu_aot(
        x: TD, w1: TD, w3: TD, sorted_slots: TD, block_expert: TD, top_k: int, block_m: int, outputs: Tuple[TD],
        tactic: int,
    ) -> Aot:  # fmt: skip
        return _trt.aot(
            "moe_swiglu_grouped", (x, w1, w3, sorted_slots, block_expert), {"top_k": top_k, "block_m": block_m}, tactic
        )

    # moe_down_grouped
    @trtp.register("minimax::moe_down_grouped")
    def _down_desc(h: TD, w2: TD, sorted_slots: TD, block_expert: TD, topk_weights: TD, block_m: int) -> TD:
        return _trt.output_descs(
            "moe_down_grouped", (h, w2, sorted_slots, block_expert, topk_weights), {"block_m": block_m}
        )

    @trtp.autotune("minimax::moe_down_grouped")
    def _down_tune(
        h: TD, w2: TD, sorted_slots: TD, block_expert: TD, topk_weights: TD, block_m: int, outputs: Tuple[TD]
    ) -> Combos:
        return _trt.combinations("moe_down_grouped", TACTICS["moe_down_grouped"])

    @trtp.aot_impl("minimax::moe_down_grouped")
    def _down_aot(
        h: TD, w2: TD, sorted_slots: TD, block_expert: TD, topk_weights: TD, block_m: int, outputs: Tuple[TD],
        tactic: int,
    ) -> Aot:  # fmt: skip
        return _trt.aot(
            "moe_down_grouped", (h, w2, sorted_slots, block_expert, topk_weights), {"block_m": block_m}, tactic
        )

    # moe_combine
    @trtp.register("minimax::moe_combine")
    def _combine_desc(y_perm: TD, inv_perm: TD, top_k: int) -> TD:
        return _trt.output_descs("moe_combine", (y_perm, inv_perm), {"top_k": top_k})

    @trtp.autotune("minimax::moe_combine")
    def _combine_tune(y_perm: TD, inv_perm: TD, top_k: int, outputs: Tuple[TD]) -> Combos:
        return _trt.combinations("moe_combine", TACTICS["moe_combine"])

    @trtp.aot_impl("minimax::moe_combine")
    def _combine_aot(y_perm: TD, inv_perm: TD, top_k: int, outputs: Tuple[TD], tactic: int) -> Aot:
        return _trt.aot("moe_combine", (y_perm, inv_perm), {"top_k": top_k}, tactic)

    # moe_swiglu_decode
    @trtp.register("minimax::moe_swiglu_decode")
    def _swiglu_dec_desc(x: TD, w1: TD, w3: TD, topk_ids: TD) -> TD:
        return _trt.output_descs("moe_swiglu_decode", (x, w1, w3, topk_ids), {})

    @trtp.autotune("minimax::moe_swiglu_decode")
    def _swiglu_dec_tune(x: TD, w1: TD, w3: TD, topk_ids: TD, outputs: Tuple[TD]) -> Combos:
        _check_decode_profile("moe_swiglu_decode", x)
        return _trt.combinations("moe_swiglu_decode", TACTICS["moe_swiglu_decode"])

    @trtp.aot_impl("minimax::moe_swiglu_decode")
    def _swiglu_dec_aot(x: TD, w1: TD, w3: TD, topk_ids: TD, outputs: Tuple[TD], tactic: int) -> Aot:
        return _trt.aot("moe_swiglu_decode", (x, w1, w3, topk_ids), {}, tactic)

    # moe_down_combine_decode
    @trtp.register("minimax::moe_down_combine_decode")
    def _down_dec_desc(h: TD, w2: TD, topk_weights: TD, topk_ids: TD) -> TD:
        return _trt.output_descs("moe_down_combine_decode", (h, w2, topk_weights, topk_ids), {})

    @trtp.autotune("minimax::moe_down_combine_decode")
    def _down_dec_tune(h: TD, w2: TD, topk_weights: TD, topk_ids: TD, outputs: Tuple[TD]) -> Combos:
        _check_decode_profile("moe_down_combine_decode", topk_ids)
        return _trt.combinations("moe_down_combine_decode", TACTICS["moe_down_combine_decode"])

    @trtp.aot_impl("minimax::moe_down_combine_decode")
    def _down_dec_aot(h: TD, w2: TD, topk_weights: TD, topk_ids: TD, outputs: Tuple[TD], tactic: int) -> Aot:
        return _trt.aot("moe_down_combine_decode", (h, w2, topk_weights, topk_ids), {}, tactic)

    # int8 experts (W8A16): the stages above with per-output-channel fp32 scales
    @trtp.register("minimax::moe_swiglu_grouped_int8")
    def _swiglu_q_desc(x: TD, w1: TD, w3: TD, w1_scale: TD, w3_scale: TD, sorted_slots: TD, block_expert: TD,
                       top_k: int, block_m: int) -> TD:
        return _trt.output_descs("moe_swiglu_grouped_int8", (x, w1, w3, w1_scale, w3_scale, sorted_slots, block_expert),
                                 {"top_k": top_k, "block_m": block_m})

    @trtp.autotune("minimax::moe_swiglu_grouped_int8")
    def _swiglu_q_tune(x: TD, w1: TD, w3: TD, w1_scale: TD, w3_scale: TD, sorted_slots: TD, block_expert: TD,
                       top_k: int, block_m: int, outputs: Tuple[TD]) -> Combos:
        return _trt.combinations("moe_swiglu_grouped_int8", TACTICS["moe_swiglu_grouped_int8"])

    @trtp.aot_impl("minimax::moe_swiglu_grouped_int8")
    def _swiglu_q_aot(x: TD, w1: TD, w3: TD, w1_scale: TD, w3_scale: TD, sorted_slots: TD, block_expert: TD,
                      top_k: int, block_m: int, outputs: Tuple[TD], tactic: int) -> Aot:
        return _trt.aot("moe_swiglu_grouped_int8", (x, w1, w3, w1_scale, w3_scale, sorted_slots, block_expert),
                        {"top_k": top_k, "block_m": block_m}, tactic)

    @trtp.register("minimax::moe_down_grouped_int8")
    def _down_q_desc(h: TD, w2: TD, w2_scale: TD, sorted_slots: TD, block_expert: TD, topk_weights: TD,
                     block_m: int) -> TD:
        return _trt.output_descs("moe_down_grouped_int8", (h, w2, w2_scale, sorted_slots, block_expert, topk_weights),
                                 {"block_m": block_m})

    @trtp.autotune("minimax::moe_down_grouped_int8")
    def _down_q_tune(h: TD, w2: TD, w2_scale: TD, sorted_slots: TD, block_expert: TD, topk_weights: TD,
                     block_m: int, outputs: Tuple[TD]) -> Combos:
        return _trt.combinations("moe_down_grouped_int8", TACTICS["moe_down_grouped_int8"])

    @trtp.aot_impl("minimax::moe_down_grouped_int8")
    def _down_q_aot(h: TD, w2: TD, w2_scale: TD, sorted_slots: TD, block_expert: TD, topk_weights: TD,
                    block_m: int, outputs: Tuple[TD], tactic: int) -> Aot:
        return _trt.aot("moe_down_grouped_int8", (h, w2, w2_scale, sorted_slots, block_expert, topk_weights),
                        {"block_m": block_m}, tactic)

    @trtp.register("minimax::moe_swiglu_decode_int8")
    def _swiglu_dec_q_desc(x: TD, w1: TD, w3: TD, w1_scale: TD, w3_scale: TD, topk_ids: TD) -> TD:
        return _trt.output_descs("moe_swiglu_decode_int8", (x, w1, w3, w1_scale, w3_scale, topk_ids), {})

    @trtp.autotune("minimax::moe_swiglu_decode_int8")
    def _swiglu_dec_q_tune(x: TD, w1: TD, w3: TD, w1_scale: TD, w3_scale: TD, topk_ids: TD,
                           outputs: Tuple[TD]) -> Combos:
        _check_decode_profile("moe_swiglu_decode_int8", x)
        return _trt.combinations("moe_swiglu_decode_int8", TACTICS["moe_swiglu_decode_int8"])

    @trtp.aot_impl("minimax::moe_swiglu_decode_int8")
    def _swiglu_dec_q_aot(x: TD, w1: TD, w3: TD, w1_scale: TD, w3_scale: TD, topk_ids: TD, outputs: Tuple[TD],
                          tactic: int) -> Aot:
        return _trt.aot("moe_swiglu_decode_int8", (x, w1, w3, w1_scale, w3_scale, topk_ids), {}, tactic)

    @trtp.register("minimax::moe_down_combine_decode_int8")
    def _down_dec_q_desc(h: TD, w2: TD, w2_scale: TD, topk_weights: TD, topk_ids: TD) -> TD:
        return _trt.output_descs("moe_down_combine_decode_int8", (h, w2, w2_scale, topk_weights, topk_ids), {})

    @trtp.autotune("minimax::moe_down_combine_decode_int8")
    def _down_dec_q_tune(h: TD, w2: TD, w2_scale: TD, topk_weights: TD, topk_ids: TD, outputs: Tuple[TD]) -> Combos:
        _check_decode_profile("moe_down_combine_decode_int8", topk_ids)
        return _trt.combinations("moe_down_combine_decode_int8", TACTICS["moe_down_combine_decode_int8"])

    @trtp.aot_impl("minimax::moe_down_combine_decode_int8")
    def _down_dec_q_aot(h: TD, w2: TD, w2_scale: TD, topk_weights: TD, topk_ids: TD, outputs: Tuple[TD],
                        tactic: int) -> Aot:
        return _trt.aot("moe_down_combine_decode_int8", (h, w2, w2_scale, topk_weights, topk_ids), {}, tactic)
