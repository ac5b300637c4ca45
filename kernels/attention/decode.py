"""Triton flash-decoding over a paged KV cache (the case T = 1 of ``naive.paged_attention``).

Row b's one query at position ``p = positions[b]`` attends to the row's held positions ``0..p``.

Design:

* The sequence is cut into splits of ``SPLIT`` positions; ``SPLIT`` depends only on static facts (the table's
  capacity ``M * page_size`` and the head dim, ``decode_split``), never on the data, so a traced program holds one
  kernel for every batch and length. The grid is ``(num_splits, B * KVH)`` with ``num_splits = ceil(capacity /
  SPLIT)``; a program whose split starts at or past the row's held length ``p + 1`` returns at once, so the work
  (and the bytes read) follows the tokens held, not the capacity.
* One program handles the ``G = H / KVH`` query heads of one kv head (GQA by indexing: each K/V tile is loaded once
  for the group), as a ``[G_PAD, D]`` query tile with ``G_PAD = max(16, next_pow2(G))`` rows for ``tl.dot`` (the
  padding rows are zeros and never stored); online softmax over its split in tiles of ``BLOCK_N`` keys, read
  through the block table (one lookup per key, or one per tile when ``page_size % BLOCK_N == 0``).
* It writes its partial result in fp32: the running max ``m`` (log2 domain), the sum ``l`` and the unnormalised
  ``acc [D]`` per query head, into ``[B * H, num_splits]`` / ``[B * H, num_splits, D]`` scratch buffers.
* The merge kernel (one program per (row, query head)) combines only the splits that hold tokens
  (``ceil((p + 1) / SPLIT)``), the rest of the scratch is never read (and never written); a row with ``p < 0``
  (a left pad) gets zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import naive
from .prefill import LOG2E, dot_precision, supports_head_dim

__all__ = ["paged_attention_decode_triton", "decode_split", "decode_tiles", "decode_group_pad"]


@triton.jit
def _paged_decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    table_ptr,
    pos_ptr,
    m_ptr,
    l_ptr,
    acc_ptr,
    H,
    KVH,
    G,
    page_size,
    num_splits,
    stride_qb,
    stride_qh,
    stride_cp,
    stride_ch,
    stride_cs,
    stride_tb,
    D: tl.constexpr,
    G_PAD: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE_ALIGNED: tl.constexpr,
    QK_SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_bk = tl.program_id(1).to(tl.int64)
    b = pid_bk // KVH
    kvh = pid_bk % KVH
    held = tl.load(pos_ptr + b).to(tl.int32) + 1  # positions 0 .. held - 1
    start = pid_s * SPLIT
    if start < held:
        end = tl.minimum(start + SPLIT, held)
        rows = tl.arange(0, G_PAD)
        row_ok = rows < G
        head = kvh * G + rows
        offs_d = tl.arange(0, D)
        offs_n = tl.arange(0, BLOCK_N)
        q_ptrs = q_ptr + b * stride_qb + head[:, None] * stride_qh + offs_d[None, :]
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
        k_base = k_cache_ptr + kvh * stride_ch
        v_base = v_cache_ptr + kvh * stride_ch
        table_row = table_ptr + b * stride_tb

        m_i = tl.full((G_PAD,), -1.0e30, dtype=tl.float32)
        l_i = tl.zeros((G_PAD,), dtype=tl.float32)
        acc = tl.zeros((G_PAD, D), dtype=tl.float32)
        for n0 in tl.range(start, end, BLOCK_N, num_stages=NUM_STAGES):
            kpos = n0 + offs_n
            valid = kpos < end
            if PAGE_ALIGNED:
                page = tl.load(table_row + n0 // page_size).to(tl.int64)
                off = page * stride_cp + (n0 % page_size + offs_n) * stride_cs
            else:
                page = tl.load(table_row + kpos // page_size, mask=valid, other=0).to(tl.int64)
                off = page * stride_cp + (kpos % page_size) * stride_cs
            ptrs = off[:, None] + offs_d[None, :]
            k = tl.load(k_base + ptrs, mask=valid[:, None], other=0.0)
            v = tl.load(v_base + ptrs, mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * QK_SCALE  # [G_PAD, BLOCK_N]
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
            m_i = m_new

        part = (b * H + head) * num_splits + pid_s  # [G_PAD] index into [B * H, num_splits]
        tl.store(m_ptr + part, m_i, mask=row_ok)
        tl.store(l_ptr + part, l_i, mask=row_ok)
        tl.store(acc_ptr + part[:, None] * D + offs_d[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _paged_decode_merge_kernel(
    m_ptr,
    l_ptr,
    acc_ptr,
    pos_ptr,
    o_ptr,
    H,
    num_splits,
    stride_ob,
    stride_oh,
    D: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # b * H + h
    b = pid // H
    h = pid % H
    held = tl.maximum(tl.load(pos_ptr + b).to(tl.int32) + 1, 0)
    n_used = (held + SPLIT - 1) // SPLIT  # splits that hold tokens (the only ones written)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, D)
    m_run = tl.full((), -1.0e30, dtype=tl.float32)
    l_run = tl.zeros((), dtype=tl.float32)
    acc_run = tl.zeros((D,), dtype=tl.float32)
    for s0 in range(0, n_used, BLOCK_S):
        sp = s0 + offs_s
        used = sp < n_used
        idx = pid * num_splits + sp
        m = tl.load(m_ptr + idx, mask=used, other=float("-inf"))
        l = tl.load(l_ptr + idx, mask=used, other=0.0)
        a = tl.load(acc_ptr + idx[:, None] * D + offs_d[None, :], mask=used[:, None], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, 0))
        w = tl.exp2(m - m_new)  # [BLOCK_S]
        alpha = tl.exp2(m_run - m_new)
        l_run = l_run * alpha + tl.sum(w * l, 0)
        acc_run = acc_run * alpha + tl.sum(w[:, None] * a, 0)
        m_run = m_new
    l_safe = tl.where(l_run > 0.0, l_run, 1.0)
    out = acc_run / l_safe
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty))


def decode_group_pad(group: int) -> int:
    return max(16, triton.next_power_of_2(group))


def decode_split(capacity, head_dim: int, device: torch.device) -> int:
    """Positions per split from static facts only: the table's capacity ``M * page_size`` (int or SymInt; only
    ``statically_known_true`` facts are used, never a guard) and the head dim.

    The largest of 16384, 8192, ..., 256 such that the capacity holds 8 splits (16384 from 128K positions up; the
    H200 sweep in the README: longer splits are faster at every measured case, 16384 fastest at B = 1 with 1M and
    4M held and at B = 16 with 64K). A multiple of every key tile. Under the CPU interpreter: 32 (tiny tests cross
    splits)."""
    if device.type != "cuda":
        return 32
    top = 16384 if head_dim <= 128 else 4096
    split = top
    while split > 256 and not statically_known_true(capacity >= 8 * split):
        split //= 2
    return split


def decode_tiles(split: int, head_dim: int, device: torch.device, dtype: torch.dtype = torch.bfloat16
                 ) -> tuple[int, int, int]:
    """``(BLOCK_N, num_warps, num_stages)`` of the split kernel for a split (H200 sweep, README: 64-key tiles, 4
    warps, 2 stages at split 16384; 128 keys, 8 warps, 3 stages at 8192; 128 keys, 4 warps, 2 stages below)."""
    if device.type != "cuda":
        return 16, 1, 1
    if dtype == torch.float32:
        return (64 if head_dim <= 64 else 32), 4, 2
    if head_dim > 128:
        return 32, 4, 3
    if split >= 16384:
        return 64, 4, 2
    if split >= 8192:
        return 128, 8, 3
    return 128, 4, 2


MERGE_BLOCK_S = 32


def paged_attention_decode_triton(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_table: Tensor,
    positions: Tensor,
    scale: float,
    out: Tensor | None = None,
    *,
    split: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    check: bool = True,
) -> Tensor:
    """Flash-decoding: ``q [B, 1, H, D]`` at ``positions [B]`` over each row's held positions ``0..positions[b]``.
    Returns ``o [B, 1, H, D]`` in q.dtype, contiguous (``out`` if given). ``split`` overrides ``decode_split``
    (a multiple of the key tile); ``block_n`` / ``num_warps`` / ``num_stages`` override the launch defaults (tuning);
    ``check``: refuse rows past the table / pages outside the pool (one device sync)."""
    naive.check_paged_inputs(q, k_cache, v_cache, block_table, positions, query=True)
    B, T, H, D = q.shape
    if T != 1:
        raise ValueError(f"paged attention decode: one query per row (T = 1), got T = {T}")
    _, KVH, page_size, _ = k_cache.shape
    if not supports_head_dim(D):
        raise ValueError(f"paged attention (triton): head dim must be a power of two in [16, 256]; got {D}")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("paged attention: k_cache and v_cache need the same strides and a contiguous last dim")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"paged attention (triton): cache dtype {k_cache.dtype} != q dtype {q.dtype}")
    if out is None:
        out = torch.empty(B, 1, H, D, dtype=q.dtype, device=q.device)
    elif out.shape != (B, 1, H, D) or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError(f"paged attention decode: out must be contiguous {q.dtype} {(B, 1, H, D)}")
    if B == 0:
        return out
    from .write import check_rows_fast

    if check:
        check_rows_fast(block_table, positions, 1, page_size, k_cache.shape[0])
    if q.stride(-1) != 1:
        q = q.contiguous()
    block_table = block_table if block_table.stride(-1) == 1 else block_table.contiguous()
    M = block_table.shape[1]
    split = split or decode_split(M * page_size, D, q.device)
    tile_n, tile_warps, tile_stages = decode_tiles(split, D, q.device, q.dtype)
    block_n = block_n or tile_n
    if split % block_n:
        raise ValueError(f"paged attention decode: split {split} is not a multiple of the key tile {block_n}")
    num_splits = triton.cdiv(M * page_size, split)
    G = H // KVH
    m_part = torch.empty(B * H, num_splits, dtype=torch.float32, device=q.device)
    l_part = torch.empty(B * H, num_splits, dtype=torch.float32, device=q.device)
    acc_part = torch.empty(B * H, num_splits, D, dtype=torch.float32, device=q.device)
    _paged_decode_split_kernel[(num_splits, B * KVH)](
        q, k_cache, v_cache, block_table, positions, m_part, l_part, acc_part,
        H, KVH, G, page_size, num_splits, q.stride(0), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
        D=D, G_PAD=decode_group_pad(G), SPLIT=split, BLOCK_N=block_n, PAGE_ALIGNED=page_size % block_n == 0,
        QK_SCALE=float(scale) * LOG2E, DOT_PRECISION=dot_precision(q.dtype, q.device),
        NUM_STAGES=num_stages or tile_stages, num_warps=num_warps or tile_warps,
    )  # fmt: skip
    _paged_decode_merge_kernel[(B * H,)](
        m_part, l_part, acc_part, positions, out, H, num_splits, out.stride(0), out.stride(2),
        D=D, SPLIT=split, BLOCK_S=MERGE_BLOCK_S if q.device.type == "cuda" else 4,
        num_warps=4 if q.device.type == "cuda" else 1,
    )  # fmt: skip
    return out
