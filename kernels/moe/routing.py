"""Triton routing for the MiniMax MoE: router (stage 1) and expert alignment / token permutation (stage 2).

Semantics are those of ``naive.moe_route`` plus the grouping that the grouped GEMMs of ``grouped.py`` read.

Stage 1, ``moe_route_triton`` — one launch, grid ``cdiv(T, BLOCK_T)``:
    logits = x @ router_weight^T in fp32 (many tokens: tensor cores with tf32x3 products, never plain tf32; a few
    tokens: fp32 FMAs), softmax over E, top-k by repeated argmax
    (ties go to the lowest expert index), weights renormalised to sum 1.
    reads  x [T, hidden], router_weight [E, hidden]
    writes topk_weights [T, top_k] fp32, topk_ids [T, top_k] int32

Stage 2, ``moe_align_triton`` — one launch, grid ``E``, one program per expert, no grid-wide synchronisation:
    a slot is one (token, k) pair, flat index s = token * top_k + k, S = T * top_k slots in all.
    pass 1 (every program, redundantly): per-expert counts; each expert's range is padded to a multiple of BLOCK_M
            rows; the exclusive prefix sum of the padded counts gives each expert's first row.
    pass 2 (program e): each slot of expert e gets row = first row of e + its rank among e's slots (a running
            cumulative sum in slot order, so the permutation is deterministic); e's padding rows get the sentinel S
            and e's blocks their expert id. Program 0 also writes counts, offsets and the unused tail.
    reads  topk_ids [S]
    writes sorted_slots   [max_rows]        slot stored at each permuted row, S for padding
           inv_perm       [S]               permuted row of each slot (sorted_slots[inv_perm[s]] == s)
           block_expert   [max_blocks]      expert of each BLOCK_M-row block, -1 past the last used block
           expert_counts  [E]               slots routed to each expert
           expert_offsets [E + 1]           first row of each expert, expert_offsets[E] = rows in use
    max_rows = S + E * (BLOCK_M - 1) bounds the padded total, max_blocks = cdiv(max_rows, BLOCK_M): both are
    functions of T alone, so every buffer has a static upper-bound shape (TensorRT plugin outputs).

Neither stage synchronises with the host; both are CUDA-graph capturable. Scalar kernel arguments are integers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["moe_route_triton", "moe_align_triton", "AlignResult", "align_max_rows", "align_max_blocks"]


@triton.jit
def _route_kernel(
    x_ptr,  # [T, hidden]
    router_ptr,  # [E, hidden]
    topk_weights_ptr,  # [T, TOP_K] fp32
    topk_ids_ptr,  # [T, TOP_K] int32
    n_tokens,
    hidden,
    NUM_EXPERTS: tl.constexpr,
    E_PAD: tl.constexpr,
    TOP_K: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, E_PAD)
    offs_k = tl.arange(0, BLOCK_K)
    t_mask = offs_t < n_tokens
    e_mask = offs_e < NUM_EXPERTS

    x_ptrs = x_ptr + offs_t.to(tl.int64)[:, None] * hidden + offs_k[None, :]  # [BLOCK_T, BLOCK_K]
    if USE_DOT:  # many tokens: tensor cores
        r_ptrs = router_ptr + offs_e[None, :] * hidden + offs_k[:, None]  # [BLOCK_K, E_PAD]
        logits = tl.zeros((BLOCK_T, E_PAD), dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            k_mask = (k0 + offs_k) < hidden
            xt = tl.load(x_ptrs, mask=t_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            rt = tl.load(r_ptrs, mask=k_mask[:, None] & e_mask[None, :], other=0.0).to(tl.float32)
            # fp32 router as in the reference: never plain tf32 (a flipped top-k choice is not a rounding error);
            # tf32x3 on the GPU (x is bf16, exact in tf32, so only the router's low bits are split off)
            logits = tl.dot(xt, rt, logits, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_K
            r_ptrs += BLOCK_K
    else:
        # few tokens (decode): a [BLOCK_T, E, BLOCK_K] fp32 FMA accumulator, reduced over K once at the end. The
        # K reduction is spread over all threads (a tensor-core product of 16 x 32 tiles would run it as one long
        # dependent chain per warp), and the next router tile is loaded before the current one is used, so one
        # program streams router_weight with loads in flight.
        r_ptrs = router_ptr + offs_e[:, None] * hidden + offs_k[None, :]  # [E_PAD, BLOCK_K]
        acc = tl.zeros((BLOCK_T, E_PAD, BLOCK_K), dtype=tl.float32)
        xt = tl.load(x_ptrs, mask=t_mask[:, None] & (offs_k[None, :] < hidden), other=0.0)
        rt = tl.load(r_ptrs, mask=e_mask[:, None] & (offs_k[None, :] < hidden), other=0.0)
        for k0 in range(0, hidden, BLOCK_K):
            x_ptrs += BLOCK_K
            r_ptrs += BLOCK_K
            k_next = (k0 + BLOCK_K + offs_k) < hidden
            xt_next = tl.load(x_ptrs, mask=t_mask[:, None] & k_next[None, :], other=0.0)
            rt_next = tl.load(r_ptrs, mask=e_mask[:, None] & k_next[None, :], other=0.0)
            acc += xt.to(tl.float32)[:, None, :] * rt.to(tl.float32)[None, :, :]
            xt = xt_next
            rt = rt_next
        logits = tl.sum(acc, axis=2)  # [BLOCK_T, E_PAD]

    logits = tl.where(e_mask[None, :], logits, float("-inf"))
    m = tl.max(logits, axis=1)
    p = tl.exp(logits - m[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    # NaN (from non-finite x) -> 0, so the choice below always yields top_k distinct experts in [0, E): the
    # later stages index with these ids (the weights stay NaN, and so does the output, as in the reference)
    p = tl.where(p == p, p, 0.0)
    p = tl.where(e_mask[None, :], p, -1.0)  # padding experts below every probability

    offs_j = tl.arange(0, K_PAD)
    sel_w = tl.zeros((BLOCK_T, K_PAD), dtype=tl.float32)
    sel_id = tl.zeros((BLOCK_T, K_PAD), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(p, axis=1)  # [BLOCK_T]
        idx = tl.min(tl.where(p == best[:, None], offs_e[None, :], E_PAD), axis=1)  # lowest index among ties
        idx = tl.minimum(idx, NUM_EXPERTS - 1)
        sel_w = tl.where(offs_j[None, :] == j, best[:, None], sel_w)
        sel_id = tl.where(offs_j[None, :] == j, idx[:, None], sel_id)
        p = tl.where(offs_e[None, :] == idx[:, None], -2.0, p)  # taken: never chosen again
    sel_w = sel_w / tl.sum(sel_w, axis=1)[:, None]  # renormalise (the columns past TOP_K are 0)

    out_offs = offs_t[:, None] * TOP_K + offs_j[None, :]
    out_mask = t_mask[:, None] & (offs_j[None, :] < TOP_K)
    tl.store(topk_weights_ptr + out_offs, sel_w, mask=out_mask)
    tl.store(topk_ids_ptr + out_offs, sel_id, mask=out_mask)


@triton.jit
def _align_kernel(
    topk_ids_ptr,  # [S] int32, S = T * top_k
    sorted_slots_ptr,  # [max_rows] int32
    inv_perm_ptr,  # [S] int32
    block_expert_ptr,  # [max_blocks] int32
    expert_counts_ptr,  # [E] int32
    expert_offsets_ptr,  # [E + 1] int32
    n_slots,
    max_rows,
    max_blocks,
    NUM_EXPERTS: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    CHUNK: tl.constexpr,
):
    # One program per expert. Each counts all slots (the ids are small and L2-resident), so every program knows
    # every expert's start without any grid-wide synchronisation; then it places only its own expert's slots.
    # All writes of different programs are disjoint.
    e = tl.program_id(0)
    offs_e = tl.arange(0, E_PAD)
    e_mask = offs_e < NUM_EXPERTS
    offs_c = tl.arange(0, CHUNK)

    # pass 1: slots per expert
    counts = tl.zeros((E_PAD,), dtype=tl.int32)
    for s0 in range(0, n_slots, CHUNK):
        s = s0 + offs_c
        ids = tl.load(topk_ids_ptr + s, mask=s < n_slots, other=-1)
        counts += tl.sum((ids[:, None] == offs_e[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    starts = tl.cumsum(padded, axis=0) - padded  # exclusive prefix sum: first row of each expert
    total = tl.sum(padded, axis=0)
    start = tl.sum(tl.where(offs_e == e, starts, 0), axis=0)
    count = tl.sum(tl.where(offs_e == e, counts, 0), axis=0)
    end = start + (count + BLOCK_M - 1) // BLOCK_M * BLOCK_M

    # pass 2: row of each of this expert's slots = its first row + rank among its slots (slot order)
    running = start
    for s0 in range(0, n_slots, CHUNK):
        s = s0 + offs_c
        ids = tl.load(topk_ids_ptr + s, mask=s < n_slots, other=-1)
        mine = (ids == e).to(tl.int32)
        row = running + tl.cumsum(mine, axis=0) - 1
        tl.store(sorted_slots_ptr + row, s, mask=mine > 0)
        tl.store(inv_perm_ptr + s, row, mask=mine > 0)
        running += tl.sum(mine, axis=0)
    # padding rows at the end of the range (fewer than BLOCK_M), and the expert of the range's blocks
    offs_m = tl.arange(0, BLOCK_M)
    pad = start + count + offs_m
    tl.store(sorted_slots_ptr + pad, tl.zeros((BLOCK_M,), dtype=tl.int32) + n_slots, mask=pad < end)
    for b0 in range(start // BLOCK_M, end // BLOCK_M, CHUNK):
        b = b0 + offs_c
        tl.store(block_expert_ptr + b, tl.zeros((CHUNK,), dtype=tl.int32) + e, mask=b < end // BLOCK_M)

    if e == 0:  # shared outputs: counts, offsets, the unused tail rows and blocks
        tl.store(expert_counts_ptr + offs_e, counts, mask=e_mask)
        tl.store(expert_offsets_ptr + offs_e, starts, mask=e_mask)
        tl.store(expert_offsets_ptr + NUM_EXPERTS, total)
        for r0 in range(0, max_rows, CHUNK):
            r = r0 + offs_c
            tail = (r >= total) & (r < max_rows)
            tl.store(sorted_slots_ptr + r, tl.zeros((CHUNK,), dtype=tl.int32) + n_slots, mask=tail)
        for b0 in range(0, max_blocks, CHUNK):
            b = b0 + offs_c
            tl.store(block_expert_ptr + b, tl.zeros((CHUNK,), dtype=tl.int32) - 1, mask=(b * BLOCK_M >= total) & (b < max_blocks))


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def moe_route_triton(
    x: Tensor,
    router_weight: Tensor,
    top_k: int,
    *,
    block_t: int = 32,
    block_k: int = 128,
    num_warps: int = 4,
    use_dot: bool = True,
    out_weights: Tensor | None = None,
    out_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Router: x [T, hidden], router_weight [E, hidden] -> (topk_weights [T, top_k] fp32, topk_ids [T, top_k] int32).

    ``use_dot``: tensor-core logits (tiles of block_t >= 16 tokens); else fp32 FMA (any power-of-two block_t; the
    fast choice for a few tokens). ``out_weights`` / ``out_ids`` (optional, contiguous) receive the results.
    """
    T, hidden = x.shape
    E = router_weight.shape[0]
    x = x.contiguous()
    router_weight = router_weight.contiguous()
    weights = torch.empty((T, top_k), dtype=torch.float32, device=x.device) if out_weights is None else out_weights
    ids = torch.empty((T, top_k), dtype=torch.int32, device=x.device) if out_ids is None else out_ids
    if T == 0:
        return weights, ids
    grid = (triton.cdiv(T, block_t),)
    _route_kernel[grid](
        x,
        router_weight,
        weights,
        ids,
        T,
        hidden,
        NUM_EXPERTS=E,
        E_PAD=max(16, _next_pow2(E)),
        TOP_K=top_k,
        K_PAD=_next_pow2(max(top_k, 2)),
        BLOCK_T=block_t,
        BLOCK_K=block_k,
        DOT_PRECISION="tf32x3" if x.device.type == "cuda" else "ieee",
        USE_DOT=use_dot,
        num_warps=num_warps,
    )
    return weights, ids


class AlignResult(NamedTuple):
    """Output of ``moe_align_triton`` (int32 tensors; S = number of slots = T * top_k)."""

    sorted_slots: Tensor  # [max_rows]: slot at each permuted row, S for padding
    inv_perm: Tensor  # [S]: permuted row of each slot
    block_expert: Tensor  # [max_blocks]: expert of each block of block_m rows, -1 if unused
    expert_counts: Tensor  # [E]
    expert_offsets: Tensor  # [E + 1]: first row of each expert; [E] = rows in use


def align_max_rows(n_slots: int, num_experts: int, block_m: int) -> int:
    """Static upper bound of the padded row count: every expert pads by at most block_m - 1 rows."""
    return n_slots + num_experts * (block_m - 1)


def align_max_blocks(n_slots: int, num_experts: int, block_m: int) -> int:
    return triton.cdiv(align_max_rows(n_slots, num_experts, block_m), block_m)


def moe_align_triton(
    topk_ids: Tensor,
    num_experts: int,
    block_m: int,
    *,
    chunk: int = 256,
    num_warps: int = 4,
    out: AlignResult | None = None,
) -> AlignResult:
    """Group slots by expert: topk_ids [T, top_k] (int32) -> ``AlignResult`` (see the module docstring).

    ``out`` (optional) holds preallocated output buffers of the shapes above.
    """
    topk_ids = topk_ids.contiguous()
    n_slots = topk_ids.numel()
    max_rows = align_max_rows(n_slots, num_experts, block_m)
    max_blocks = align_max_blocks(n_slots, num_experts, block_m)
    dev = topk_ids.device
    if out is None:
        out = AlignResult(
            torch.empty(max_rows, dtype=torch.int32, device=dev),
            torch.empty(n_slots, dtype=torch.int32, device=dev),
            torch.empty(max_blocks, dtype=torch.int32, device=dev),
            torch.empty(num_experts, dtype=torch.int32, device=dev),
            torch.empty(num_experts + 1, dtype=torch.int32, device=dev),
        )
    _align_kernel[(num_experts,)](
        topk_ids,
        out.sorted_slots,
        out.inv_perm,
        out.block_expert,
        out.expert_counts,
        out.expert_offsets,
        n_slots,
        max_rows,
        max_blocks,
        NUM_EXPERTS=num_experts,
        E_PAD=max(2, _next_pow2(num_experts)),
        BLOCK_M=block_m,
        CHUNK=chunk,
        num_warps=num_warps,
    )
    return out
