"""Triton expert GEMMs of the MiniMax MoE: grouped (prefill) and selected-expert (decode) paths.

Semantics are those of ``naive.moe_experts``: y_t = sum_j w[t, j] * (silu(x_t w1_e^T) * (x_t w3_e^T)) w2_e^T with
e = ids[t, j]. Products run on the tensor cores in the input dtype with fp32 accumulation; the SwiGLU activation h
is stored in the input dtype between the two GEMMs; the top-k sum runs in fp32. fp32 inputs use tf32x3 products
on the GPU (exact fp32 under ``TRITON_INTERPRET=1``).

Grouped path (many tokens), over the permutation of ``routing.moe_align_triton`` (rows grouped by expert, each
expert's range padded to BLOCK_M rows):
  stage 3 ``swiglu_grouped``: one launch, grid ``max_blocks * cdiv(I, BLOCK_N)``. A program takes one BLOCK_M-row
      block (one expert) and one BLOCK_N slice of I, gathers the block's token rows of x, and accumulates the gate
      (w1) and up (w3) products together (each x tile loaded once; by default as one N = 2 BLOCK_N product over
      interleaved w1/w3 rows), then writes h = silu(gate) * up.
      reads x [T, hidden], w1/w3 [E, I, hidden]; writes h [max_rows, I]
  stage 4 ``down_grouped``: one launch, grid ``max_blocks * cdiv(hidden, BLOCK_N)``: h rows (contiguous, no
      gather) times w2 of the block's expert, each row scaled by its routing weight.
      reads h, w2 [E, hidden, I], topk_weights; writes y_perm [max_rows, hidden] (permuted order)
  stage 5 ``combine``: one launch, grid ``(cdiv(T, BLOCK_T), cdiv(hidden, BLOCK_H))``: y_t = sum_j
      y_perm[inv_perm[t * top_k + j]] in fp32. No atomics: every output element is written once, so the result
      does not depend on scheduling.   reads y_perm, inv_perm; writes y [T, hidden]
  Programs whose block is past the last used one (block_expert == -1) return at once, so the grids can be sized by
  the static bound max_blocks. Within a group of GROUP_M blocks the block index runs fastest, so the blocks of one
  expert run together and share each weight tile through L2.

Decode path (few tokens; no alignment stage, no padding rows, every selected expert's weights read once):
  ``swiglu_decode``: grid ``cdiv(I, BLOCK_N)``. Each program loops over the E experts, skips those no token chose,
      and for a chosen one multiplies the (masked) rows of all T tokens by its BLOCK_N slice of w1 and w3, writing
      h for the slots routed to it.   reads x, topk_ids, w1/w3; writes h [T * top_k, I] (slot order)
  ``down_combine_decode``: grid ``cdiv(hidden, BLOCK_N)``. Each program loops over the chosen experts, multiplies
      the slots' h rows by its slice of w2, scales by the routing weights and sums over top_k in registers: the
      combine is fused.   reads h, w2, topk_ids, topk_weights; writes y [T, hidden]
  All programs of one launch read the same set of experts, so the work is balanced whatever the routing.

Scalar kernel arguments are integers (token/slot counts, dims); E, top_k and tile sizes are compile-time constants.
Weights must be contiguous in the documented layouts.

Quantized experts (``naive.py``, "Quantized experts"; the pointer kernels only, the TMA variants stay 16-bit): the
four GEMM kernels take optional ``s1_ptr`` / ``s3_ptr`` / ``s2_ptr`` (fp32 [E, out] per-output-channel scales of
int8 or e4m3 weights) and ``sa_ptr`` (fp32 per-row scales of an e4m3 A operand). Weights are loaded in their
stored type and converted in registers to A's type (int8 -> bf16 is exact), the products accumulate in fp32, and
the scales multiply the fp32 sums once per output column / row after the K loop. ``None`` (the default) compiles
the unquantized specialisation, so the existing launches and the TensorRT entry kernels are unchanged. W8A8 needs
A in e4m3: ``quantize_rows_fp8`` (one program per row) quantizes x before the SwiGLU GEMM and h before the down
GEMM, rounding in fp32 arithmetic to the e4m3 grid (``_round_e4m3``) so that the store's conversion is exact.
"""

from __future__ import annotations

import importlib.util

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = [
    "swiglu_grouped",
    "down_grouped",
    "combine",
    "swiglu_decode",
    "down_combine_decode",
    "permute_rows",
    "swiglu_grouped_tma",
    "down_grouped_tma",
    "tma_supported",
    "quantize_rows_fp8",
]


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, FP8_PRECISE: tl.constexpr):
    """``acc + a @ b``. e4m3 operands on Hopper: Triton's default there is the tensor cores' fast accumulation
    (about 14 bits kept across the whole K loop: 1.4-1.7 % relative error on MiniMax's MoE, H200, 2026-12-04);
    ``FP8_PRECISE`` promotes the partial sums to fp32 after every BLOCK_K products (``max_num_imprecise_acc``), the
    fp32 accumulation ``naive.py`` specifies. Other dtypes: a plain ``tl.dot``."""
    if a.dtype == tl.float8e4nv and FP8_PRECISE:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION, max_num_imprecise_acc=BLOCK_K)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _grouped_pid(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M consecutive row blocks sweep the column tiles together (L2 reuse of both)."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _swiglu_grouped_kernel(
    x_ptr,  # [T, hidden]
    w1_ptr,  # [E, I, hidden]
    w3_ptr,  # [E, I, hidden]
    h_ptr,  # [max_rows, I]
    sorted_slots_ptr,  # [max_rows] int32
    block_expert_ptr,  # [max_blocks] int32
    n_slots,
    hidden,
    inter,
    max_blocks,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERLEAVE: tl.constexpr,
    s1_ptr=None,  # [E, I] fp32 per-output-channel scales of quantized w1 (None: w1 in the activations' dtype)
    s3_ptr=None,  # [E, I] fp32, with s1
    sa_ptr=None,  # [T] fp32 per-token scales of fp8 x (W8A8; None: x as it is)
    FP8_PRECISE: tl.constexpr = True,  # fp8 products: fp32 accumulation (False: Hopper's fast accumulation)
):
    pid_m, pid_n = _grouped_pid(tl.program_id(0), max_blocks, tl.cdiv(inter, BLOCK_N), GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(sorted_slots_ptr + offs_m)
    row_valid = slot < n_slots
    token = tl.where(row_valid, slot // TOP_K, 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < inter
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = x_ptr + token.to(tl.int64)[:, None] * hidden + offs_k[None, :]  # [BLOCK_M, BLOCK_K] gathered rows
    if INTERLEAVE:
        # One [BLOCK_K, 2 * BLOCK_N] weight tile whose even columns are rows of w1 and odd columns the same rows of
        # w3: a single N = 2 * BLOCK_N tensor-core product per K step (wider than two N = BLOCK_N ones).
        offs_c = tl.arange(0, 2 * BLOCK_N)
        col_n = pid_n * BLOCK_N + offs_c // 2
        c_mask = col_n < inter
        w_off = expert.to(tl.int64) * inter * hidden + col_n.to(tl.int64)[None, :] * hidden + offs_k[:, None]
        b_ptrs = tl.where((offs_c % 2 == 0)[None, :], w1_ptr + w_off, w3_ptr + w_off)  # [BLOCK_K, 2 * BLOCK_N]
        acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=row_valid[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=c_mask[None, :], other=0.0)
            else:
                k_mask = (k0 + offs_k) < hidden
                a = tl.load(a_ptrs, mask=row_valid[:, None] & k_mask[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_mask[:, None] & c_mask[None, :], other=0.0)
            acc = _mma(a, b.to(a.dtype), acc, DOT_PRECISION, BLOCK_K, FP8_PRECISE)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        acc_gate, acc_up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))  # column 2n + j -> (n, j)
    else:
        w_off = expert.to(tl.int64) * inter * hidden + offs_n.to(tl.int64)[None, :] * hidden + offs_k[:, None]
        b1_ptrs = w1_ptr + w_off  # [BLOCK_K, BLOCK_N] view of w1[e, n, k]
        b3_ptrs = w3_ptr + w_off
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=row_valid[:, None], other=0.0)
                b1 = tl.load(b1_ptrs, mask=n_mask[None, :], other=0.0)
                b3 = tl.load(b3_ptrs, mask=n_mask[None, :], other=0.0)
            else:
                k_mask = (k0 + offs_k) < hidden
                a = tl.load(a_ptrs, mask=row_valid[:, None] & k_mask[None, :], other=0.0)
                b1 = tl.load(b1_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                b3 = tl.load(b3_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc_gate = _mma(a, b1.to(a.dtype), acc_gate, DOT_PRECISION, BLOCK_K, FP8_PRECISE)
            acc_up = _mma(a, b3.to(a.dtype), acc_up, DOT_PRECISION, BLOCK_K, FP8_PRECISE)
            a_ptrs += BLOCK_K
            b1_ptrs += BLOCK_K
            b3_ptrs += BLOCK_K
    if s1_ptr is not None:  # quantized weights: one scale per output column, applied to the fp32 sums
        s_off = expert.to(tl.int64) * inter + offs_n
        acc_gate = acc_gate * tl.load(s1_ptr + s_off, mask=n_mask, other=0.0)[None, :]
        acc_up = acc_up * tl.load(s3_ptr + s_off, mask=n_mask, other=0.0)[None, :]
    if sa_ptr is not None:  # fp8 activations: one scale per token row
        sa = tl.load(sa_ptr + token, mask=row_valid, other=0.0)
        acc_gate = acc_gate * sa[:, None]
        acc_up = acc_up * sa[:, None]
    h = acc_gate * tl.sigmoid(acc_gate) * acc_up  # silu(gate) * up; padding rows give 0
    h_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * inter + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=n_mask[None, :])


@triton.jit
def _down_grouped_kernel(
    h_ptr,  # [max_rows, I]
    w2_ptr,  # [E, hidden, I]
    y_perm_ptr,  # [max_rows, hidden]
    sorted_slots_ptr,  # [max_rows] int32
    block_expert_ptr,  # [max_blocks] int32
    topk_weights_ptr,  # [S] fp32
    n_slots,
    hidden,
    inter,
    max_blocks,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    s2_ptr=None,  # [E, hidden] fp32 per-output-channel scales of quantized w2 (None: w2 in the activations' dtype)
    sa_ptr=None,  # [max_rows] fp32 per-row scales of fp8 h (W8A8; None: h as it is)
    FP8_PRECISE: tl.constexpr = True,
):
    pid_m, pid_n = _grouped_pid(tl.program_id(0), max_blocks, tl.cdiv(hidden, BLOCK_N), GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(sorted_slots_ptr + offs_m)
    row_valid = slot < n_slots
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * inter + offs_k[None, :]  # [BLOCK_M, BLOCK_K], rows in place
    b_ptrs = w2_ptr + expert.to(tl.int64) * hidden * inter + offs_n.to(tl.int64)[None, :] * inter + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs, mask=n_mask[None, :], other=0.0)
        else:
            k_mask = (k0 + offs_k) < inter
            a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = _mma(a, b.to(a.dtype), acc, DOT_PRECISION, BLOCK_K, FP8_PRECISE)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if s2_ptr is not None:
        acc = acc * tl.load(s2_ptr + expert.to(tl.int64) * hidden + offs_n, mask=n_mask, other=0.0)[None, :]
    if sa_ptr is not None:
        acc = acc * tl.load(sa_ptr + offs_m)[:, None]
    weight = tl.load(topk_weights_ptr + slot, mask=row_valid, other=0.0)  # routing weight of each row
    acc = acc * weight[:, None]
    y_ptrs = y_perm_ptr + offs_m.to(tl.int64)[:, None] * hidden + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_perm_ptr.dtype.element_ty), mask=n_mask[None, :])


@triton.jit
def _combine_kernel(
    y_perm_ptr,  # [max_rows, hidden]
    inv_perm_ptr,  # [S] int32
    y_ptr,  # [T, hidden]
    n_tokens,
    hidden,
    TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_mask = offs_t < n_tokens
    mask = t_mask[:, None] & (offs_h[None, :] < hidden)
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        # a negative row is a slot no expert here took (expert parallelism: another rank's expert): it adds nothing
        row = tl.load(inv_perm_ptr + offs_t * TOP_K + j, mask=t_mask, other=-1)
        acc += tl.load(y_perm_ptr + row.to(tl.int64)[:, None] * hidden + offs_h[None, :],
                       mask=mask & (row[:, None] >= 0), other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_t.to(tl.int64)[:, None] * hidden + offs_h[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_decode_kernel(
    x_ptr,  # [T, hidden]
    w1_ptr,  # [E, I, hidden]
    w3_ptr,  # [E, I, hidden]
    h_ptr,  # [T * TOP_K, I] (slot order)
    topk_ids_ptr,  # [T, TOP_K] int32
    n_tokens,
    hidden,
    inter,
    NUM_EXPERTS: tl.constexpr,
    TOP_K: tl.constexpr,
    K_PAD: tl.constexpr,
    T_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    s1_ptr=None,  # [E, I] fp32 scales of quantized w1 (None: w1 in the activations' dtype)
    s3_ptr=None,  # [E, I] fp32, with s1
    sa_ptr=None,  # [T] fp32 per-token scales of fp8 x (W8A8)
    FP8_PRECISE: tl.constexpr = True,
    SPLIT: tl.constexpr = 1,  # > 1: split-K, program (n, s) sums K chunk s into h_ptr = partials [SPLIT, 2, S, I]
):
    offs_t = tl.arange(0, T_PAD)
    offs_j = tl.arange(0, K_PAD)
    t_mask = offs_t < n_tokens
    ids = tl.load(
        topk_ids_ptr + offs_t[:, None] * TOP_K + offs_j[None, :],
        mask=t_mask[:, None] & (offs_j[None, :] < TOP_K),
        other=-1,
    )  # [T_PAD, K_PAD]
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < inter
    offs_k = tl.arange(0, BLOCK_K)
    # this program's K range: all of it, or chunk s of SPLIT (whole BLOCK_K tiles, so EVEN_K holds per chunk)
    if SPLIT == 1:
        k_begin = 0
        k_end = hidden
    else:
        k_chunk = tl.cdiv(tl.cdiv(hidden, BLOCK_K), SPLIT) * BLOCK_K
        k_begin = tl.program_id(1) * k_chunk
        k_end = tl.minimum(k_begin + k_chunk, hidden)
    for e in range(NUM_EXPERTS):
        match = ids == e
        chosen = tl.max(match.to(tl.int32), axis=1) > 0  # [T_PAD]: token t routed to e (at most one slot)
        if tl.max(chosen.to(tl.int32), axis=0) > 0:  # skip experts no token chose: their weights are never read
            a_ptrs = x_ptr + offs_t.to(tl.int64)[:, None] * hidden + k_begin + offs_k[None, :]
            w_off = tl.cast(e, tl.int64) * inter * hidden + offs_n.to(tl.int64)[None, :] * hidden + k_begin \
                + offs_k[:, None]
            b1_ptrs = w1_ptr + w_off
            b3_ptrs = w3_ptr + w_off
            acc_gate = tl.zeros((T_PAD, BLOCK_N), dtype=tl.float32)
            acc_up = tl.zeros((T_PAD, BLOCK_N), dtype=tl.float32)
            for k0 in range(k_begin, k_end, BLOCK_K):
                if EVEN_K:
                    a = tl.load(a_ptrs, mask=chosen[:, None], other=0.0)
                    b1 = tl.load(b1_ptrs, mask=n_mask[None, :], other=0.0)
                    b3 = tl.load(b3_ptrs, mask=n_mask[None, :], other=0.0)
                else:
                    k_mask = (k0 + offs_k) < hidden
                    a = tl.load(a_ptrs, mask=chosen[:, None] & k_mask[None, :], other=0.0)
                    b1 = tl.load(b1_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                    b3 = tl.load(b3_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                acc_gate = _mma(a, b1.to(a.dtype), acc_gate, DOT_PRECISION, BLOCK_K, FP8_PRECISE)
                acc_up = _mma(a, b3.to(a.dtype), acc_up, DOT_PRECISION, BLOCK_K, FP8_PRECISE)
                a_ptrs += BLOCK_K
                b1_ptrs += BLOCK_K
                b3_ptrs += BLOCK_K
            if s1_ptr is not None:
                s_off = tl.cast(e, tl.int64) * inter + offs_n
                acc_gate = acc_gate * tl.load(s1_ptr + s_off, mask=n_mask, other=0.0)[None, :]
                acc_up = acc_up * tl.load(s3_ptr + s_off, mask=n_mask, other=0.0)[None, :]
            if sa_ptr is not None:
                sa = tl.load(sa_ptr + offs_t, mask=chosen, other=0.0)
                acc_gate = acc_gate * sa[:, None]
                acc_up = acc_up * sa[:, None]
            slot = offs_t * TOP_K + tl.sum(tl.where(match, offs_j[None, :], 0), axis=1)  # [T_PAD]
            out_mask = chosen[:, None] & n_mask[None, :]
            if SPLIT == 1:
                h = acc_gate * tl.sigmoid(acc_gate) * acc_up
                h_ptrs = h_ptr + slot.to(tl.int64)[:, None] * inter + offs_n[None, :]
                tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=out_mask)
            else:  # fp32 partial sums of gate and up (scales are linear: applied here already)
                n_slots = n_tokens * TOP_K
                p_ptrs = h_ptr + (tl.program_id(1).to(tl.int64) * 2 * n_slots + slot.to(tl.int64)[:, None]) * inter \
                    + offs_n[None, :]
                tl.store(p_ptrs, acc_gate, mask=out_mask)
                tl.store(p_ptrs + n_slots * inter, acc_up, mask=out_mask)


@triton.jit
def _down_combine_decode_kernel(
    h_ptr,  # [T * TOP_K, I] (slot order)
    w2_ptr,  # [E, hidden, I]
    topk_weights_ptr,  # [T, TOP_K] fp32
    topk_ids_ptr,  # [T, TOP_K] int32
    y_ptr,  # [T, hidden]
    n_tokens,
    hidden,
    inter,
    NUM_EXPERTS: tl.constexpr,
    TOP_K: tl.constexpr,
    K_PAD: tl.constexpr,
    T_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    s2_ptr=None,  # [E, hidden] fp32 scales of quantized w2 (None: w2 in the activations' dtype)
    sa_ptr=None,  # [T * TOP_K] fp32 per-slot scales of fp8 h (W8A8)
    FP8_PRECISE: tl.constexpr = True,
    SPLIT: tl.constexpr = 1,  # > 1: split-K, program (n, s) sums K chunk s into y_ptr = fp32 partials [SPLIT, T, hidden]
):
    offs_t = tl.arange(0, T_PAD)
    offs_j = tl.arange(0, K_PAD)
    t_mask = offs_t < n_tokens
    tk_offs = offs_t[:, None] * TOP_K + offs_j[None, :]
    tk_mask = t_mask[:, None] & (offs_j[None, :] < TOP_K)
    ids = tl.load(topk_ids_ptr + tk_offs, mask=tk_mask, other=-1)  # [T_PAD, K_PAD]
    wts = tl.load(topk_weights_ptr + tk_offs, mask=tk_mask, other=0.0)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)
    if SPLIT == 1:  # this program's K range (see _swiglu_decode_kernel)
        k_begin = 0
        k_end = inter
    else:
        k_chunk = tl.cdiv(tl.cdiv(inter, BLOCK_K), SPLIT) * BLOCK_K
        k_begin = tl.program_id(1) * k_chunk
        k_end = tl.minimum(k_begin + k_chunk, inter)
    acc = tl.zeros((T_PAD, BLOCK_N), dtype=tl.float32)
    for e in range(NUM_EXPERTS):
        match = ids == e
        chosen = tl.max(match.to(tl.int32), axis=1) > 0
        if tl.max(chosen.to(tl.int32), axis=0) > 0:
            slot = offs_t * TOP_K + tl.sum(tl.where(match, offs_j[None, :], 0), axis=1)
            weight = tl.sum(tl.where(match, wts, 0.0), axis=1)  # [T_PAD]: routing weight of (t, e), 0 if not chosen
            a_ptrs = h_ptr + slot.to(tl.int64)[:, None] * inter + k_begin + offs_k[None, :]
            b_ptrs = w2_ptr + tl.cast(e, tl.int64) * hidden * inter + offs_n.to(tl.int64)[None, :] * inter + k_begin \
                + offs_k[:, None]
            acc_e = tl.zeros((T_PAD, BLOCK_N), dtype=tl.float32)
            for k0 in range(k_begin, k_end, BLOCK_K):
                if EVEN_K:
                    a = tl.load(a_ptrs, mask=chosen[:, None], other=0.0)
                    b = tl.load(b_ptrs, mask=n_mask[None, :], other=0.0)
                else:
                    k_mask = (k0 + offs_k) < inter
                    a = tl.load(a_ptrs, mask=chosen[:, None] & k_mask[None, :], other=0.0)
                    b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                acc_e = _mma(a, b.to(a.dtype), acc_e, DOT_PRECISION, BLOCK_K, FP8_PRECISE)
                a_ptrs += BLOCK_K
                b_ptrs += BLOCK_K
            if s2_ptr is not None:
                s_row = tl.load(s2_ptr + tl.cast(e, tl.int64) * hidden + offs_n, mask=n_mask, other=0.0)
                acc_e = acc_e * s_row[None, :]
            if sa_ptr is not None:
                acc_e = acc_e * tl.load(sa_ptr + slot, mask=chosen, other=0.0)[:, None]
            acc += acc_e * weight[:, None]
    y_ptrs = y_ptr + (tl.program_id(1).to(tl.int64) * n_tokens + offs_t.to(tl.int64)[:, None]) * hidden \
        + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=t_mask[:, None] & n_mask[None, :])


@triton.jit
def _swiglu_split_finish_kernel(
    p_ptr,  # [SPLIT, 2, S, I] fp32 partial sums of gate and up (_swiglu_decode_kernel with SPLIT > 1)
    h_ptr,  # [S, I]
    n_elems,  # S * I
    SPLIT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """h = silu(gate) * up from the split-K partial sums (slots no expert took hold garbage; never read)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elems
    gate = tl.zeros((BLOCK,), dtype=tl.float32)
    up = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        gate += tl.load(p_ptr + s * 2 * n_elems + offs, mask=mask, other=0.0)
        up += tl.load(p_ptr + (s * 2 + 1) * n_elems + offs, mask=mask, other=0.0)
    tl.store(h_ptr + offs, (gate * tl.sigmoid(gate) * up).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _split_sum_kernel(
    p_ptr,  # [SPLIT, n] fp32 partial sums
    y_ptr,  # [n]
    n_elems,
    SPLIT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """y = sum over the SPLIT partials (fixed order: reproducible), cast to y's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elems
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(p_ptr + s * n_elems + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _round_e4m3(v):
    """fp32 values in [-448, 448] rounded to the nearest e4m3 value (ties to even), in fp32 arithmetic: the cast
    that follows is then exact. (Triton's interpreter rounds fp32 -> e4m3 wrongly when rounding up crosses a power
    of two, e.g. -31.6 -> -16; on the GPU the hardware conversion gives the same values as this.)"""
    bits = v.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # the binade's exponent; subnormals share 2^-6's spacing
    ulp = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits: spacing 2^(e-3), exact
    x = v / ulp  # exact (a power of two), |x| < 16
    r = (x + 12582912.0) - 12582912.0  # 1.5 * 2^23: fp32 addition rounds x to an integer, ties to even
    return r * ulp


@triton.jit
def _quantize_rows_fp8_kernel(
    a_ptr,  # [R, K] activations
    q_ptr,  # [R, K] float8_e4m3fn
    s_ptr,  # [R] fp32
    n_cols,
    BLOCK: tl.constexpr,
):
    """W8A8 activations (``naive.quantize_rows_fp8``): one program per row; scale = absmax / 448 (1 for a zero
    row), q = e4m3(a / scale)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for c0 in range(0, n_cols, BLOCK):
        a = tl.load(a_ptr + row * n_cols + c0 + offs, mask=c0 + offs < n_cols, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(a))
    m = tl.max(amax, axis=0)
    scale = tl.where(m > 0, m / 448.0, 1.0)
    tl.store(s_ptr + row, scale)
    for c0 in range(0, n_cols, BLOCK):
        mask = c0 + offs < n_cols
        a = tl.load(a_ptr + row * n_cols + c0 + offs, mask=mask, other=0.0).to(tl.float32)
        q = _round_e4m3(tl.minimum(tl.maximum(a / scale, -448.0), 448.0))
        tl.store(q_ptr + row * n_cols + c0 + offs, q.to(q_ptr.dtype.element_ty), mask=mask)


def quantize_rows_fp8(a: Tensor, *, block: int = 1024, out: tuple[Tensor, Tensor] | None = None
                      ) -> tuple[Tensor, Tensor]:
    """``a [R, K]`` -> ``(q [R, K] float8_e4m3fn, scale [R] fp32)``, one launch of R programs."""
    R, K = a.shape
    q, scale = out if out is not None else (torch.empty((R, K), dtype=torch.float8_e4m3fn, device=a.device),
                                            torch.empty((R,), dtype=torch.float32, device=a.device))
    if R:
        _quantize_rows_fp8_kernel[(R,)](a, q, scale, K, BLOCK=min(block, _next_pow2(K)))
    return q, scale


# ------------------------------------------------------------------------------------------------ TMA variants
# Tensor-descriptor (TMA on Hopper) versions of stages 3 and 4, plus an optional row permutation of x so that the
# A operand of stage 3 is TMA-loadable too. New kernels beside the pointer-based ones above (whose parameter lists
# and grids the TensorRT plugins rely on). Weights are read through host-built descriptors of the 2-D views
# w1/w3 [E * I, hidden] and w2 [E * hidden, I]: a [BLOCK_N, BLOCK_K] tile at row ``expert * N + n0`` (a tile that
# runs past the expert's last row reads the next expert's rows or TMA's zero fill, and those output columns are
# masked at the store). The grid is either one program per tile or persistent (``num_programs`` programs stride
# over the tiles); either way the number of tiles comes from ``expert_offsets[E]`` (rows in use), read on the
# device, so no program visits an unused block and the launch stays free of host synchronisation.


@triton.jit
def _permute_rows_kernel(
    x_ptr,  # [T, hidden]
    x_perm_ptr,  # [max_rows, hidden]
    sorted_slots_ptr,  # [max_rows] int32
    expert_offsets_ptr,  # [E + 1] int32
    n_slots,
    hidden,
    NUM_EXPERTS: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """x_perm[r] = x[sorted_slots[r] // TOP_K] for the rows in use; padding rows get zeros, rows past the last
    used one are not written (no kernel reads them)."""
    rows_used = tl.load(expert_offsets_ptr + NUM_EXPERTS)
    r0 = tl.program_id(0) * BLOCK_R
    if r0 >= rows_used:
        return
    offs_r = r0 + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rows_used
    slot = tl.load(sorted_slots_ptr + offs_r, mask=r_mask, other=n_slots)
    valid = slot < n_slots
    token = tl.where(valid, slot // TOP_K, 0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < hidden
    v = tl.load(x_ptr + token.to(tl.int64)[:, None] * hidden + offs_h[None, :], mask=valid[:, None] & h_mask[None, :], other=0.0)
    tl.store(x_perm_ptr + offs_r.to(tl.int64)[:, None] * hidden + offs_h[None, :], v, mask=r_mask[:, None] & h_mask[None, :])


@triton.jit
def _swiglu_grouped_tma_kernel(
    a_src,  # A_GATHER: x [T, hidden] (pointer); else descriptor of x_perm [max_rows, hidden], block [BLOCK_M, BLOCK_K]
    w1_desc,  # descriptor of w1 viewed [E * I, hidden], block [BLOCK_N, BLOCK_K]
    w3_desc,  # same for w3
    h_ptr,  # [max_rows, I]
    sorted_slots_ptr,  # [max_rows] int32
    block_expert_ptr,  # [max_blocks] int32
    expert_offsets_ptr,  # [E + 1] int32
    n_slots,
    hidden,
    inter,
    num_programs,
    NUM_EXPERTS: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    A_GATHER: tl.constexpr,
    FLATTEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    used_blocks = tl.load(expert_offsets_ptr + NUM_EXPERTS) // BLOCK_M
    num_pid_n = tl.cdiv(inter, BLOCK_N)
    num_tiles = used_blocks * num_pid_n
    k_tiles = tl.cdiv(hidden, BLOCK_K)
    offs_k = tl.arange(0, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_tiles, num_programs, flatten=FLATTEN):
        pid_m, pid_n = _grouped_pid(tile, used_blocks, num_pid_n, GROUP_M)
        expert = tl.load(block_expert_ptr + pid_m)
        row0 = pid_m * BLOCK_M
        w_row0 = expert * inter + pid_n * BLOCK_N
        offs_m = row0 + tl.arange(0, BLOCK_M)
        slot = tl.load(sorted_slots_ptr + offs_m)
        row_valid = slot < n_slots
        token = tl.where(row_valid, slot // TOP_K, 0)
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            k0 = ki * BLOCK_K
            if A_GATHER:  # token rows of x gathered with pointer loads (cp.async)
                a = tl.load(
                    a_src + token.to(tl.int64)[:, None] * hidden + (k0 + offs_k)[None, :],
                    mask=row_valid[:, None] & ((k0 + offs_k) < hidden)[None, :],
                    other=0.0,
                )
            else:  # pre-permuted rows (padding rows are zeros): one TMA tile
                a = a_src.load([row0, k0])
            b1 = w1_desc.load([w_row0, k0])  # [BLOCK_N, BLOCK_K]
            b3 = w3_desc.load([w_row0, k0])
            acc_gate = tl.dot(a, b1.T, acc_gate, input_precision=DOT_PRECISION)
            acc_up = tl.dot(a, b3.T, acc_up, input_precision=DOT_PRECISION)
        h = acc_gate * tl.sigmoid(acc_gate) * acc_up
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        h_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * inter + offs_n[None, :]
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=(offs_n < inter)[None, :])


@triton.jit
def _down_grouped_tma_kernel(
    h_desc,  # descriptor of h [max_rows, I], block [BLOCK_M, BLOCK_K]
    w2_desc,  # descriptor of w2 viewed [E * hidden, I], block [BLOCK_N, BLOCK_K]
    y_perm_ptr,  # [max_rows, hidden]
    sorted_slots_ptr,  # [max_rows] int32
    block_expert_ptr,  # [max_blocks] int32
    expert_offsets_ptr,  # [E + 1] int32
    topk_weights_ptr,  # [S] fp32
    n_slots,
    hidden,
    inter,
    num_programs,
    NUM_EXPERTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    FLATTEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    used_blocks = tl.load(expert_offsets_ptr + NUM_EXPERTS) // BLOCK_M
    num_pid_n = tl.cdiv(hidden, BLOCK_N)
    num_tiles = used_blocks * num_pid_n
    k_tiles = tl.cdiv(inter, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_tiles, num_programs, flatten=FLATTEN):
        pid_m, pid_n = _grouped_pid(tile, used_blocks, num_pid_n, GROUP_M)
        expert = tl.load(block_expert_ptr + pid_m)
        row0 = pid_m * BLOCK_M
        w_row0 = expert * hidden + pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            k0 = ki * BLOCK_K
            a = h_desc.load([row0, k0])  # [BLOCK_M, BLOCK_K]
            b = w2_desc.load([w_row0, k0])  # [BLOCK_N, BLOCK_K]
            acc = tl.dot(a, b.T, acc, input_precision=DOT_PRECISION)
        offs_m = row0 + tl.arange(0, BLOCK_M)
        slot = tl.load(sorted_slots_ptr + offs_m)
        weight = tl.load(topk_weights_ptr + slot, mask=slot < n_slots, other=0.0)  # routing weight of each row
        acc = acc * weight[:, None]
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        y_ptrs = y_perm_ptr + offs_m.to(tl.int64)[:, None] * hidden + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_perm_ptr.dtype.element_ty), mask=(offs_n < hidden)[None, :])


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


_SMEM_BUDGET = 200 * 1024  # bytes of pipelined operand tiles per program (H100/H200: 227 KB per block)


def _fit_smem(num_stages: int, block_k: int, bytes_per_k: int) -> tuple[int, int]:
    """Fewer stages (down to 2), then a shorter K tile (down to 16), until the operand buffers fit in shared memory
    (fp32 operands or many decode rows would otherwise ask for more than the chip has)."""
    while num_stages * block_k * bytes_per_k > _SMEM_BUDGET and (num_stages > 2 or block_k > 16):
        if num_stages > 2:
            num_stages -= 1
        else:
            block_k //= 2
    return num_stages, block_k


def _dot_precision(a: Tensor) -> str:
    """fp32 operands on the GPU use tf32x3 (close to fp32); 16-bit operands ignore the setting."""
    return "tf32x3" if (a.dtype == torch.float32 and a.device.type == "cuda") else "tf32"


def swiglu_grouped(
    x: Tensor,
    w1: Tensor,
    w3: Tensor,
    sorted_slots: Tensor,
    block_expert: Tensor,
    top_k: int,
    *,
    block_m: int,
    block_n: int,
    block_k: int,
    group_m: int = 8,
    num_warps: int = 4,
    num_stages: int = 3,
    interleave: bool = True,
    out: Tensor | None = None,
    scales: tuple[Tensor, Tensor] | None = None,
    row_scale: Tensor | None = None,
    fp8_precise: bool = True,
) -> Tensor:
    """Stage 3: x [T, hidden], w1/w3 [E, I, hidden], alignment -> h [max_rows, I] (x.dtype, permuted rows).

    ``interleave``: one product against a [BLOCK_K, 2 BLOCK_N] tile of interleaved w1/w3 rows (else two products).
    ``scales``: ``(s1, s3)`` [E, I] fp32 when w1/w3 are quantized (``naive.quantize_weight``); ``row_scale``
    [T] fp32 when x is fp8 (W8A8: pass ``out`` in the activations' dtype).
    """
    T, hidden = x.shape
    inter = w1.shape[1]
    max_rows = sorted_slots.shape[0]  # blocks in use end at or before max_rows
    max_blocks = block_expert.shape[0]
    h = torch.empty((max_rows, inter), dtype=x.dtype, device=x.device) if out is None else out
    num_stages, block_k = _fit_smem(num_stages, block_k, (block_m + 2 * block_n) * x.element_size())
    grid = (max_blocks * triton.cdiv(inter, block_n),)
    _swiglu_grouped_kernel[grid](
        x,
        w1,
        w3,
        h,
        sorted_slots,
        block_expert,
        T * top_k,
        hidden,
        inter,
        max_blocks,
        TOP_K=top_k,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=group_m,
        EVEN_K=hidden % block_k == 0,
        DOT_PRECISION=_dot_precision(x),
        INTERLEAVE=interleave,
        s1_ptr=None if scales is None else scales[0],
        s3_ptr=None if scales is None else scales[1],
        sa_ptr=row_scale,
        FP8_PRECISE=fp8_precise,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return h


def down_grouped(
    h: Tensor,
    w2: Tensor,
    sorted_slots: Tensor,
    block_expert: Tensor,
    topk_weights: Tensor,
    *,
    block_m: int,
    block_n: int,
    block_k: int,
    group_m: int = 8,
    num_warps: int = 4,
    num_stages: int = 3,
    out: Tensor | None = None,
    scale: Tensor | None = None,
    row_scale: Tensor | None = None,
    fp8_precise: bool = True,
) -> Tensor:
    """Stage 4: h [rows, I], w2 [E, hidden, I] -> y_perm [rows, hidden] (h.dtype, weighted, permuted rows).
    ``scale``: s2 [E, hidden] fp32 when w2 is quantized; ``row_scale`` [rows] when h is fp8 (pass ``out``)."""
    rows, inter = h.shape
    hidden = w2.shape[1]
    max_blocks = block_expert.shape[0]
    y_perm = torch.empty((rows, hidden), dtype=h.dtype, device=h.device) if out is None else out
    num_stages, block_k = _fit_smem(num_stages, block_k, (block_m + block_n) * h.element_size())
    grid = (max_blocks * triton.cdiv(hidden, block_n),)
    _down_grouped_kernel[grid](
        h,
        w2,
        y_perm,
        sorted_slots,
        block_expert,
        topk_weights,
        topk_weights.numel(),
        hidden,
        inter,
        max_blocks,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=group_m,
        EVEN_K=inter % block_k == 0,
        DOT_PRECISION=_dot_precision(h),
        s2_ptr=scale,
        sa_ptr=row_scale,
        FP8_PRECISE=fp8_precise,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return y_perm


def combine(
    y_perm: Tensor,
    inv_perm: Tensor,
    n_tokens: int,
    top_k: int,
    *,
    out_dtype: torch.dtype,
    block_t: int = 4,
    block_h: int = 1024,
    out: Tensor | None = None,
) -> Tensor:
    """Stage 5: y_perm [rows, hidden], inv_perm [T * top_k] -> y [T, hidden] (out_dtype), top-k summed in fp32; a
    slot whose ``inv_perm`` is negative (taken by no expert here) adds nothing."""
    hidden = y_perm.shape[1]
    y = torch.empty((n_tokens, hidden), dtype=out_dtype, device=y_perm.device) if out is None else out
    block_h = min(block_h, _next_pow2(hidden))
    grid = (triton.cdiv(n_tokens, block_t), triton.cdiv(hidden, block_h))
    _combine_kernel[grid](y_perm, inv_perm, y, n_tokens, hidden, TOP_K=top_k, BLOCK_T=block_t, BLOCK_H=block_h)
    return y


def swiglu_decode(
    x: Tensor,
    w1: Tensor,
    w3: Tensor,
    topk_ids: Tensor,
    *,
    block_n: int,
    block_k: int,
    num_warps: int = 4,
    num_stages: int = 4,
    out: Tensor | None = None,
    scales: tuple[Tensor, Tensor] | None = None,
    row_scale: Tensor | None = None,
    fp8_precise: bool = True,
    split: int = 1,
) -> Tensor:
    """Decode SwiGLU: x [T, hidden], topk_ids [T, top_k] -> h [T * top_k, I] (x.dtype, slot order).
    ``scales``: ``(s1, s3)`` [E, I] fp32 when w1/w3 are quantized; ``row_scale`` [T] when x is fp8. ``split`` > 1: split-K over ``split`` programs per column tile (more programs than multiprocessors at small
    T), fp32 partial sums, then ``_swiglu_split_finish_kernel``."""
    T, hidden = x.shape
    E, inter = w1.shape[0], w1.shape[1]
    top_k = topk_ids.shape[1]
    h = torch.empty((T * top_k, inter), dtype=x.dtype, device=x.device) if out is None else out
    t_pad = max(16, _next_pow2(T))
    num_stages, block_k = _fit_smem(num_stages, block_k, (t_pad + 2 * block_n) * x.element_size())
    target = h if split == 1 else torch.empty((split, 2, T * top_k, inter), dtype=torch.float32, device=x.device)
    _swiglu_decode_kernel[(triton.cdiv(inter, block_n), split)](
        x,
        w1,
        w3,
        target,
        topk_ids,
        T,
        hidden,
        inter,
        NUM_EXPERTS=E,
        TOP_K=top_k,
        K_PAD=_next_pow2(max(top_k, 2)),
        T_PAD=t_pad,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        EVEN_K=hidden % block_k == 0,
        DOT_PRECISION=_dot_precision(x),
        s1_ptr=None if scales is None else scales[0],
        s3_ptr=None if scales is None else scales[1],
        sa_ptr=row_scale,
        FP8_PRECISE=fp8_precise,
        SPLIT=split,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if split > 1:
        n = T * top_k * inter
        _swiglu_split_finish_kernel[(triton.cdiv(n, SPLIT_BLOCK),)](target, h, n, SPLIT=split, BLOCK=SPLIT_BLOCK)
    return h


SPLIT_BLOCK = 1024  # elements per program of the split-K finishing kernels


def down_combine_decode(
    h: Tensor,
    w2: Tensor,
    topk_weights: Tensor,
    topk_ids: Tensor,
    *,
    out_dtype: torch.dtype,
    block_n: int,
    block_k: int,
    num_warps: int = 4,
    num_stages: int = 4,
    out: Tensor | None = None,
    scale: Tensor | None = None,
    row_scale: Tensor | None = None,
    fp8_precise: bool = True,
    split: int = 1,
) -> Tensor:
    """Decode down projection + combine: h [T * top_k, I] -> y [T, hidden] (out_dtype).
    ``scale``: s2 [E, hidden] fp32 when w2 is quantized; ``row_scale`` [T * top_k] when h is fp8. ``split`` > 1:
    split-K (fp32 partial sums [split, T, hidden], then ``_split_sum_kernel`` in a fixed order)."""
    T, top_k = topk_ids.shape
    E, hidden, inter = w2.shape
    y = torch.empty((T, hidden), dtype=out_dtype, device=h.device) if out is None else out
    t_pad = max(16, _next_pow2(T))
    num_stages, block_k = _fit_smem(num_stages, block_k, (t_pad + block_n) * h.element_size())
    target = y if split == 1 else torch.empty((split, T, hidden), dtype=torch.float32, device=h.device)
    _down_combine_decode_kernel[(triton.cdiv(hidden, block_n), split)](
        h,
        w2,
        topk_weights,
        topk_ids,
        target,
        T,
        hidden,
        inter,
        NUM_EXPERTS=E,
        TOP_K=top_k,
        K_PAD=_next_pow2(max(top_k, 2)),
        T_PAD=t_pad,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        EVEN_K=inter % block_k == 0,
        DOT_PRECISION=_dot_precision(h),
        s2_ptr=scale,
        sa_ptr=row_scale,
        FP8_PRECISE=fp8_precise,
        SPLIT=split,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if split > 1:
        n = T * hidden
        _split_sum_kernel[(triton.cdiv(n, SPLIT_BLOCK),)](target, y, n, SPLIT=split, BLOCK=SPLIT_BLOCK)
    return y


# ------------------------------------------------------------------------------------------------ TMA launchers


def tma_supported(*tensors: Tensor) -> bool:
    """Whether the descriptor kernels can take these tensors: 16-byte aligned bases and row strides, and on CUDA a
    Hopper-or-newer device with 16-bit operands (fp32 keeps the pointer kernels and their tf32x3 products). CPU
    tensors (``TRITON_INTERPRET=1``) qualify in any float dtype."""
    if importlib.util.find_spec("triton.tools.tensor_descriptor") is None:  # pragma: no cover - older Triton
        return False
    for t in tensors:
        if t.data_ptr() % 16 or (t.stride(-2) * t.element_size()) % 16 or t.stride(-1) != 1:
            return False
        if t.is_cuda and (t.dtype not in (torch.bfloat16, torch.float16)
                          or torch.cuda.get_device_capability(t.device)[0] < 9):
            return False
    return True


def _desc(t2d: Tensor, block: tuple[int, int]):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(t2d, list(t2d.shape), list(t2d.stride()), list(block))


_SM_COUNT: dict[int, int] = {}


def _programs(n_tiles_bound: int, device: torch.device, persistent: bool) -> int:
    """Grid size: one program per tile of the static bound, or (persistent) one per multiprocessor."""
    if not persistent:
        return n_tiles_bound
    if device.type != "cuda":
        return min(n_tiles_bound, 4)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return min(n_tiles_bound, _SM_COUNT[idx])


def permute_rows(
    x: Tensor,
    sorted_slots: Tensor,
    expert_offsets: Tensor,
    top_k: int,
    *,
    block_r: int = 16,
    block_h: int = 512,
    out: Tensor | None = None,
) -> Tensor:
    """x [T, hidden] -> x_perm [max_rows, hidden]: row r holds x[sorted_slots[r] // top_k], zeros for padding rows;
    rows past ``expert_offsets[E]`` are left unwritten (no kernel reads them)."""
    T, hidden = x.shape
    max_rows = sorted_slots.shape[0]
    E = expert_offsets.shape[0] - 1
    x_perm = torch.empty((max_rows, hidden), dtype=x.dtype, device=x.device) if out is None else out
    block_h = min(block_h, _next_pow2(hidden))
    grid = (triton.cdiv(max_rows, block_r), triton.cdiv(hidden, block_h))
    _permute_rows_kernel[grid](
        x, x_perm, sorted_slots, expert_offsets, T * top_k, hidden,
        NUM_EXPERTS=E, TOP_K=top_k, BLOCK_R=block_r, BLOCK_H=block_h,
    )  # fmt: skip
    return x_perm


def swiglu_grouped_tma(
    x: Tensor,
    w1: Tensor,
    w3: Tensor,
    sorted_slots: Tensor,
    block_expert: Tensor,
    expert_offsets: Tensor,
    top_k: int,
    *,
    block_m: int,
    block_n: int,
    block_k: int,
    group_m: int = 8,
    num_warps: int = 8,
    num_stages: int = 4,
    x_perm: Tensor | None = None,
    persistent: bool = False,
    flatten: bool = False,
    out: Tensor | None = None,
) -> Tensor:
    """Stage 3 with descriptor (TMA) loads of w1/w3 tiles: same result as ``swiglu_grouped`` (two products, gate
    and up, per K step). ``x_perm`` (from ``permute_rows``): A is TMA-loaded from it; else the token rows of x are
    gathered with pointer loads. ``persistent``: one program per multiprocessor strides over the tiles."""
    T, hidden = x.shape
    E, inter = w1.shape[0], w1.shape[1]
    max_rows = sorted_slots.shape[0]
    max_blocks = block_expert.shape[0]
    h = torch.empty((max_rows, inter), dtype=x.dtype, device=x.device) if out is None else out
    num_stages, block_k = _fit_smem(num_stages, block_k, (block_m + 2 * block_n) * x.element_size())
    a_src = x if x_perm is None else _desc(x_perm, (block_m, block_k))
    n_prog = _programs(max_blocks * triton.cdiv(inter, block_n), x.device, persistent)
    _swiglu_grouped_tma_kernel[(n_prog,)](
        a_src,
        _desc(w1.view(E * inter, hidden), (block_n, block_k)),
        _desc(w3.view(E * inter, hidden), (block_n, block_k)),
        h,
        sorted_slots,
        block_expert,
        expert_offsets,
        T * top_k,
        hidden,
        inter,
        n_prog,
        NUM_EXPERTS=E,
        TOP_K=top_k,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=group_m,
        A_GATHER=x_perm is None,
        FLATTEN=flatten,
        DOT_PRECISION=_dot_precision(x),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return h


def down_grouped_tma(
    h: Tensor,
    w2: Tensor,
    sorted_slots: Tensor,
    block_expert: Tensor,
    expert_offsets: Tensor,
    topk_weights: Tensor,
    *,
    block_m: int,
    block_n: int,
    block_k: int,
    group_m: int = 8,
    num_warps: int = 8,
    num_stages: int = 4,
    persistent: bool = False,
    flatten: bool = False,
    out: Tensor | None = None,
) -> Tensor:
    """Stage 4 with descriptor (TMA) loads of the h and w2 tiles: same result as ``down_grouped``."""
    rows, inter = h.shape
    E, hidden = w2.shape[0], w2.shape[1]
    max_blocks = block_expert.shape[0]
    y_perm = torch.empty((rows, hidden), dtype=h.dtype, device=h.device) if out is None else out
    num_stages, block_k = _fit_smem(num_stages, block_k, (block_m + block_n) * h.element_size())
    n_prog = _programs(max_blocks * triton.cdiv(hidden, block_n), h.device, persistent)
    _down_grouped_tma_kernel[(n_prog,)](
        _desc(h, (block_m, block_k)),
        _desc(w2.view(E * hidden, inter), (block_n, block_k)),
        y_perm,
        sorted_slots,
        block_expert,
        expert_offsets,
        topk_weights,
        topk_weights.numel(),
        hidden,
        inter,
        n_prog,
        NUM_EXPERTS=E,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=group_m,
        FLATTEN=flatten,
        DOT_PRECISION=_dot_precision(h),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return y_perm
