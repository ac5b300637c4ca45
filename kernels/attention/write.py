"""Triton write of new K/V tokens into a paged KV cache, in place (semantics: ``naive.paged_kv_write``).

One program per (token, row): it reads the token's position ``positions[b] + t``, returns at once for a left pad
(negative position), else looks its page up in the block table and stores the ``[KVH, D]`` keys and values at
``(page, :, slot)`` of both caches. The kernel stores into ``k_cache`` / ``v_cache`` themselves (the pointers are
those arguments), so torch's analysis of user-kernel mutations sees both as mutated (``traced.py``). No ``.to()``
on scalar arguments (torch 2.11's mutation analysis compiles the kernel with scalars as Python ints): program ids
and loaded values are widened instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import naive

__all__ = ["paged_kv_write_triton", "check_rows_fast"]


@triton.jit
def _paged_kv_write_kernel(
    k_cache_ptr,
    v_cache_ptr,
    k_ptr,
    v_ptr,
    table_ptr,
    pos_ptr,
    KVH,
    page_size,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_cp,
    stride_ch,
    stride_cs,
    stride_tb,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    pos = tl.load(pos_ptr + b) + t  # int64 absolute position
    if pos >= 0:
        page = tl.load(table_ptr + b * stride_tb + pos // page_size).to(tl.int64)
        slot = pos % page_size
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, D)
        mask = (offs_h < KVH)[:, None]
        src_k = k_ptr + b * stride_kb + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :]
        src_v = v_ptr + b * stride_vb + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :]
        dst = page * stride_cp + slot * stride_cs + offs_h[:, None] * stride_ch + offs_d[None, :]
        kx = tl.load(src_k, mask=mask)
        vx = tl.load(src_v, mask=mask)
        tl.store(k_cache_ptr + dst, kx.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst, vx.to(v_cache_ptr.dtype.element_ty), mask=mask)


def check_rows_fast(block_table: Tensor, positions: Tensor, T: int, page_size: int, num_pages: int) -> None:
    """``naive._check_rows`` with one device sync: refuse a chunk past the table's capacity, or used table entries
    outside the pool."""
    M = block_table.shape[1]
    end = positions.to(block_table.device) + T  # [B] one past the chunk's last position
    used = torch.arange(M, device=block_table.device)[None, :] * page_size < end[:, None]  # [B, M] pages in use
    bad_page = (used & ((block_table < 0) | (block_table >= num_pages))).any(1)
    bad_end = end > M * page_size
    bad = bad_end | bad_page
    if bool(bad.any()):
        naive._check_rows(block_table.cpu(), positions.cpu(), T, page_size, num_pages)  # raises, naming the row
        raise ValueError("paged attention: block table or positions out of range")  # pragma: no cover


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def paged_kv_write_triton(
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor,
    v: Tensor,
    block_table: Tensor,
    positions: Tensor,
    *,
    check: bool = True,
) -> None:
    """Write k, v ``[B, T, KVH, D]`` into their page slots of ``k_cache`` / ``v_cache`` ``[P, KVH, page_size, D]``
    (in place; tokens at negative positions are skipped). ``check``: refuse rows past the table or pages outside
    the pool (one device sync)."""
    naive.check_paged_inputs(k, k_cache, v_cache, block_table, positions, query=False)
    if v.shape != k.shape:
        raise ValueError(f"paged kv write: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("paged kv write: k_cache and v_cache need the same strides and a contiguous last dim")
    B, T, KVH, D = k.shape
    from .prefill import supports_head_dim

    if not supports_head_dim(D):
        raise ValueError(f"paged kv write (triton): head dim must be a power of two in [16, 256]; got {D}")
    if B == 0 or T == 0:
        return
    page_size = k_cache.shape[2]
    if check:
        check_rows_fast(block_table, positions, T, page_size, k_cache.shape[0])
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    block_table = _last_dim_contiguous(block_table)
    _paged_kv_write_kernel[(T, B)](
        k_cache, v_cache, k, v, block_table, positions, KVH, page_size,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
        D=D, BLOCK_H=triton.next_power_of_2(KVH), num_warps=4 if KVH * D >= 1024 else 1,
    )  # fmt: skip
