"""Launcher of the Triton MoE: chains the stages of ``routing.py`` and ``grouped.py``.

    T <= decode_max_tokens (decode):  route -> swiglu_decode -> down_combine_decode                 (3 launches)
    otherwise (grouped):              route -> align -> swiglu_grouped -> down_grouped -> combine   (5 launches)
    grouped with TMA (config ``swiglu_tma`` / ``down_tma``, where ``grouped.tma_supported``): the same chain with
        [permute_rows ->] swiglu_grouped_tma and down_grouped_tma (descriptor loads; optional persistent grid)

The path and the tile sizes are a pure function of the shapes (``default_config``), never of the data, so one
call is a fixed sequence of launches with no host synchronisation (CUDA-graph capturable). Every intermediate has
a static upper-bound shape that depends on T only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import grouped, naive, routing

__all__ = ["MoeTritonConfig", "default_config", "moe_forward_triton"]


@dataclass(frozen=True)
class MoeTritonConfig:
    """Tile sizes of every stage. ``decode_max_tokens``: the largest T that takes the decode path."""

    decode_max_tokens: int = 16
    # router
    route_block_t: int = 32
    route_block_k: int = 128
    route_warps: int = 4
    route_dot: bool = True
    # grouped path
    block_m: int = 64
    swiglu_block_n: int = 128
    swiglu_block_k: int = 64
    swiglu_warps: int = 8
    swiglu_stages: int = 3
    swiglu_interleave: bool = True
    down_block_n: int = 128
    down_block_k: int = 64
    down_warps: int = 8
    down_stages: int = 3
    group_m: int = 8
    align_chunk: int = 256
    # grouped path, descriptor (TMA) kernels per stage: used where ``grouped.tma_supported`` (Hopper+, 16-bit,
    # aligned rows), else the pointer kernels above run with the same tiles. swiglu_permute: x rows are permuted
    # first (``permute_rows``) so that A is TMA-loaded too; *_persistent: one program per multiprocessor.
    swiglu_tma: bool = False
    down_tma: bool = False
    swiglu_permute: bool = False
    swiglu_persistent: bool = False
    down_persistent: bool = False
    # decode path: swiglu_decode, then down_combine_decode
    decode_block_n: int = 32
    decode_block_k: int = 128
    decode_warps: int = 4
    decode_stages: int = 3
    decode_down_block_n: int = 16
    decode_down_block_k: int = 256
    decode_down_warps: int = 4
    decode_down_stages: int = 4
    # split-K of the decode kernels (1: none): each column tile's K range over this many programs, fp32 partial
    # sums, then a small finishing kernel; more programs than multiprocessors at T = 1 (a 9216-wide I in 32-column
    # tiles is 288 programs on 132 SMs: 2.2 waves)
    decode_split: int = 1
    decode_down_split: int = 1
    # W8A8 (experts-fp8): False keeps fp32 accumulation of the fp8 products (promoted every BLOCK_K products, the
    # definition); True leaves Hopper's fast accumulation on (Triton's default on sm_90; ~1.5 % off at MiniMax sizes)
    fp8_fast_accum: bool = False


# Decode tiles (n_tokens <= 16) per weight format. The first sweep (H200, 2026-12-04, no split-K) chose for int8
# SwiGLU 0.078 / 0.697 ms, down 0.053 / 0.497 ms at T = 1 / 16, for fp8 SwiGLU 0.066 / 0.572, down 0.040 / 0.380.
# The second (same day, with split-K; docs/runs/moe_quant_splitk_2026-12-04_h200.log) chose the sets below:
# int8 SwiGLU 0.079 / 0.686, down 0.041 / 0.312; fp8 SwiGLU 0.067 / 0.568, down 0.038 / 0.279; bf16 SwiGLU
# 0.112 / 1.032, down 0.062 / 0.506 (its previous tiles 0.115 / 1.072 and 0.063 / 0.530 in the same run).
_DECODE_TILES = {
    # The decode sweep of 2026-12-04 (H200, `python -m benchmarks.moe_quant --sweep --apply-sweep`, each stage alone
    # from a CUDA graph at T = 1 and 16, split-K candidates 1 / 2 / 4; kernels/moe/README.md): per weight format,
    # the SwiGLU and down tile sets whose T = 1 and T = 16 times, each over that T's best, sum least.
    None: dict(decode_block_n=32, decode_block_k=128, decode_warps=4, decode_stages=3, decode_split=1,  # bf16 / fp32
               decode_down_block_n=64, decode_down_block_k=128, decode_down_warps=4, decode_down_stages=3,
               decode_down_split=4),
    "experts-int8": dict(decode_block_n=64, decode_block_k=128, decode_warps=4, decode_stages=3, decode_split=2,
                         decode_down_block_n=64, decode_down_block_k=256, decode_down_warps=4, decode_down_stages=3,
                         decode_down_split=4),
    "experts-fp8": dict(decode_block_n=32, decode_block_k=128, decode_warps=4, decode_stages=3, decode_split=2,
                        decode_down_block_n=64, decode_down_block_k=256, decode_down_warps=4, decode_down_stages=3,
                        decode_down_split=4),
}  # fmt: skip


def default_config(n_tokens: int, top_k: int, num_experts: int, device: torch.device,
                   mode: str | None = None) -> MoeTritonConfig:
    """Tiles by problem size. On CPU (``TRITON_INTERPRET=1``) small tiles keep the interpreter fast. ``mode``: the
    experts' quantization ("experts-int8" / "experts-fp8"; None: weights in the activations' dtype), which picks
    the decode tiles on CUDA."""
    if device.type != "cuda":
        return MoeTritonConfig(
            route_block_t=16 if n_tokens > 16 else 1,
            route_block_k=32,
            route_warps=1,
            route_dot=n_tokens > 16,
            block_m=16,
            swiglu_block_n=32,
            swiglu_block_k=32,
            down_block_n=32,
            down_block_k=32,
            decode_block_n=16,
            decode_block_k=32,
            decode_down_block_n=16,
            decode_down_block_k=32,
        )
    rows_per_expert = n_tokens * top_k / num_experts
    # Tiles below: the fastest of the sweep of ``benchmarks/moe.py --sweep`` on an H100 (2026-11-26; hidden 6144,
    # E 32 x I 9216, top-2, bf16), see README.md. Classes that were not measured keep reasoned defaults.
    if n_tokens <= 16:  # decode: FMA router (one token per program), selected-expert kernels
        tiles = _DECODE_TILES[mode if mode in _DECODE_TILES else None]
        return MoeTritonConfig(route_block_t=1, route_block_k=512, route_warps=8, route_dot=False, **tiles)
    if rows_per_expert >= 128:
        # compute-bound: 128-row blocks; TMA kernels (x rows permuted first so that both operands of the SwiGLU GEMM
        # are TMA tiles; gate and up as two N = 128 products); persistent down projection with N = 256 tiles.
        # Sweep of 2026-11-26 (second run, TMA kernels): SwiGLU 11.95 / 3.91 ms, down 5.56 / 1.83 ms at T = 16384 /
        # 4096 against 13.51 / 4.35 and 6.78 / 2.09 for the pointer kernels in the same run.
        return MoeTritonConfig(
            route_block_t=64 if rows_per_expert >= 512 else 16,
            block_m=128, swiglu_block_n=128, swiglu_block_k=64, swiglu_warps=8,
            swiglu_stages=3 if rows_per_expert >= 512 else 4,
            swiglu_tma=True, swiglu_permute=True, swiglu_persistent=False,
            down_block_n=256, down_block_k=64, down_warps=8, down_stages=4, down_tma=True, down_persistent=True,
            group_m=8,
        )  # fmt: skip
    if rows_per_expert >= 64:
        # T ~ 1000-2000 (32 experts, top-2): the T = 1024 sweep of 2026-11-26 picked 128-row blocks (64-row ones were
        # not faster), SwiGLU with gathered A (no permutation pass) and a non-persistent down with K = 128 tiles.
        return MoeTritonConfig(
            block_m=128, swiglu_block_n=128, swiglu_block_k=64, swiglu_warps=8, swiglu_stages=4,
            swiglu_tma=True, swiglu_permute=False,
            down_block_n=128, down_block_k=128, down_warps=8, down_stages=3, down_tma=True,
            group_m=8,
        )  # fmt: skip
    # few rows per expert: weight-bandwidth bound, small row blocks waste little
    return MoeTritonConfig(
        block_m=16,
        swiglu_block_n=64,
        swiglu_block_k=128,
        down_block_n=64,
        down_block_k=128,
        swiglu_warps=4,
        down_warps=4,
        swiglu_stages=4,
        down_stages=4,
    )


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, poison: bool) -> Tensor:
    """Uninitialised buffer; ``poison`` fills it (NaN, or a large integer) so that an unwritten element shows."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if poison:
        t.fill_(float("nan") if dtype.is_floating_point else 1 << 30)
    return t


def moe_forward_triton(
    x: Tensor,
    router_weight: Tensor,
    w1: Tensor,
    w3: Tensor,
    w2: Tensor,
    top_k: int,
    *,
    config: MoeTritonConfig | None = None,
    poison: bool = False,
    scales: tuple[Tensor, Tensor, Tensor] | None = None,
    mode: str = "experts-int8",
) -> Tensor:
    """Routed SwiGLU experts with Triton: x [T, hidden] -> y [T, hidden] (x.dtype, new contiguous tensor).

    router_weight [E, hidden] (any float dtype, used in fp32); w1, w3 [E, I, hidden]; w2 [E, hidden, I]
    (contiguous, the dtype of x, or converted while loading). ``config`` overrides ``default_config``;
    ``poison`` fills every buffer allocated here with NaN / garbage first (tests).
    ``scales``: ``(s1, s3, s2)`` fp32 [E, out] when w1, w3, w2 are quantized (the pointer kernels only):
    ``mode="experts-int8"`` (W8A16: the products run in x's dtype on the int8 values, each output column scaled
    after its K loop) or ``"experts-fp8"`` (W8A8: x, and the SwiGLU output h before the down projection, are
    quantized per row to e4m3 by ``grouped.quantize_rows_fp8``; fp8 x fp8 products, fp32 sums scaled by the row's
    and the column's scale).
    """
    naive.check_moe_inputs(x, router_weight, w1, w3, w2, top_k)
    fp8 = scales is not None and mode == "experts-fp8"
    if scales is not None:
        naive.check_quantized_experts(w1, scales[0], w3, scales[1], w2, scales[2], mode)
        s13, s2 = (scales[0].contiguous(), scales[1].contiguous()), scales[2].contiguous()
    else:
        s13 = s2 = None
    T, hidden = x.shape
    E, inter = w1.shape[0], w1.shape[1]
    dev = x.device
    cfg = default_config(T, top_k, E, dev, None if scales is None else mode) if config is None else config
    x = x.contiguous()
    w1, w3, w2 = w1.contiguous(), w3.contiguous(), w2.contiguous()
    y = _empty((T, hidden), x.dtype, dev, poison)
    if T == 0:
        return y

    topk_weights, topk_ids = routing.moe_route_triton(
        x,
        router_weight,
        top_k,
        block_t=cfg.route_block_t,
        block_k=cfg.route_block_k,
        num_warps=cfg.route_warps,
        use_dot=cfg.route_dot,
        out_weights=_empty((T, top_k), torch.float32, dev, poison),
        out_ids=_empty((T, top_k), torch.int32, dev, poison),
    )  # [T, top_k] fp32, int32

    a_in, a_scale = x, None  # the SwiGLU GEMM's A operand (W8A8: x quantized per token)
    if fp8:
        a_in, a_scale = grouped.quantize_rows_fp8(
            x, out=(_empty((T, hidden), torch.float8_e4m3fn, dev, False), _empty((T,), torch.float32, dev, poison)))

    def down_input(h: Tensor) -> tuple[Tensor, Tensor | None]:
        if not fp8:
            return h, None
        return grouped.quantize_rows_fp8(h, out=(_empty(tuple(h.shape), torch.float8_e4m3fn, dev, False),
                                                 _empty((h.shape[0],), torch.float32, dev, poison)))

    if T <= cfg.decode_max_tokens:
        h = grouped.swiglu_decode(
            a_in,
            w1,
            w3,
            topk_ids,
            block_n=cfg.decode_block_n,
            block_k=cfg.decode_block_k,
            num_warps=cfg.decode_warps,
            num_stages=cfg.decode_stages,
            out=_empty((T * top_k, inter), x.dtype, dev, poison),
            scales=s13,
            row_scale=a_scale,
            fp8_precise=not cfg.fp8_fast_accum,
            split=cfg.decode_split,
        )  # [T * top_k, I]
        h, h_scale = down_input(h)
        return grouped.down_combine_decode(
            h,
            w2,
            topk_weights,
            topk_ids,
            out_dtype=x.dtype,
            block_n=cfg.decode_down_block_n,
            block_k=cfg.decode_down_block_k,
            num_warps=cfg.decode_down_warps,
            num_stages=cfg.decode_down_stages,
            out=y,
            scale=s2,
            row_scale=h_scale,
            fp8_precise=not cfg.fp8_fast_accum,
            split=cfg.decode_down_split,
        )  # [T, hidden]

    bm = cfg.block_m
    n_slots = T * top_k
    max_rows = routing.align_max_rows(n_slots, E, bm)
    max_blocks = routing.align_max_blocks(n_slots, E, bm)
    align = routing.moe_align_triton(
        topk_ids,
        E,
        bm,
        chunk=cfg.align_chunk,
        out=routing.AlignResult(
            _empty((max_rows,), torch.int32, dev, poison),
            _empty((n_slots,), torch.int32, dev, poison),
            _empty((max_blocks,), torch.int32, dev, poison),
            _empty((E,), torch.int32, dev, poison),
            _empty((E + 1,), torch.int32, dev, poison),
        ),
    )
    tma = (cfg.swiglu_tma or cfg.down_tma) and scales is None and grouped.tma_supported(x, w1, w3, w2)
    if tma and cfg.swiglu_tma:
        x_perm = None
        if cfg.swiglu_permute:
            x_perm = grouped.permute_rows(
                x, align.sorted_slots, align.expert_offsets, top_k, out=_empty((max_rows, hidden), x.dtype, dev, poison)
            )  # [max_rows, hidden]
        h = grouped.swiglu_grouped_tma(
            x,
            w1,
            w3,
            align.sorted_slots,
            align.block_expert,
            align.expert_offsets,
            top_k,
            block_m=bm,
            block_n=cfg.swiglu_block_n,
            block_k=cfg.swiglu_block_k,
            group_m=cfg.group_m,
            num_warps=cfg.swiglu_warps,
            num_stages=cfg.swiglu_stages,
            x_perm=x_perm,
            persistent=cfg.swiglu_persistent,
            out=_empty((max_rows, inter), x.dtype, dev, poison),
        )  # [max_rows, I]
    else:
        h = grouped.swiglu_grouped(
            a_in,
            w1,
            w3,
            align.sorted_slots,
            align.block_expert,
            top_k,
            block_m=bm,
            block_n=cfg.swiglu_block_n,
            block_k=cfg.swiglu_block_k,
            group_m=cfg.group_m,
            num_warps=cfg.swiglu_warps,
            num_stages=cfg.swiglu_stages,
            interleave=cfg.swiglu_interleave,
            out=_empty((max_rows, inter), x.dtype, dev, poison),
            scales=s13,
            row_scale=a_scale,
            fp8_precise=not cfg.fp8_fast_accum,
        )  # [max_rows, I]
    if tma and cfg.down_tma:
        y_perm = grouped.down_grouped_tma(
            h,
            w2,
            align.sorted_slots,
            align.block_expert,
            align.expert_offsets,
            topk_weights,
            block_m=bm,
            block_n=cfg.down_block_n,
            block_k=cfg.down_block_k,
            group_m=cfg.group_m,
            num_warps=cfg.down_warps,
            num_stages=cfg.down_stages,
            persistent=cfg.down_persistent,
            out=_empty((max_rows, hidden), x.dtype, dev, poison),
        )  # [max_rows, hidden]
    else:
        h, h_scale = down_input(h)
        y_perm = grouped.down_grouped(
            h,
            w2,
            align.sorted_slots,
            align.block_expert,
            topk_weights,
            block_m=bm,
            block_n=cfg.down_block_n,
            block_k=cfg.down_block_k,
            group_m=cfg.group_m,
            num_warps=cfg.down_warps,
            num_stages=cfg.down_stages,
            out=_empty((max_rows, hidden), x.dtype, dev, poison),
            scale=s2,
            row_scale=h_scale,
            fp8_precise=not cfg.fp8_fast_accum,
        )  # [max_rows, hidden]
    return grouped.combine(y_perm, align.inv_perm, T, top_k, out_dtype=x.dtype, out=y)  # [T, hidden]

