"""Triton prefill attention over a paged KV cache (FlashAttention-2 style; semantics: ``naive.paged_attention``).

A chunk of T queries of row b at positions ``p..p+T-1`` (``p = positions[b]``) attends causally to the cache's
positions ``0..p+T-1`` of that row, read through the block table: key ``j`` lives in page ``table[b, j // page_size]``,
slot ``j % page_size`` (``page_size`` is a runtime value; a key tile may cross pages).

Design:

* **GQA by indexing.** One program handles one kv head of one row and a tile of ``BLOCK_M`` query rows; a row is a
  (query token, query head of the group) pair, token-major: row r is token ``t0 + r // G_PAD``, head
  ``kvh * G + r % G_PAD`` (``G = H / KVH`` padded to a power of two, padding rows masked). Each K/V tile is loaded
  once for all G heads that read it (``BLOCK_M // G_PAD`` tokens x G heads per tile); the cache is never repeated.
* **Online softmax in fp32** in the log2 domain (``exp2``, scores scaled by ``scale * log2(e)``), fp32 accumulator,
  tensor-core operands in the input dtype (``p`` rounded to bf16/fp16 for ``p @ V``, as FlashAttention does).
* **Causal tile skipping.** Keys ``0..q_first`` (q_first: the tile's first query position) are visible to every
  row of the tile: that part runs without masks; the next one or two key tiles, up to the tile's last query
  position, are masked per row; nothing past the last query position is loaded.
* **Pages.** Per key: one table lookup (``[BLOCK_N]`` int32 gather, L1-resident) and a gather of ``D``-wide rows.
  When ``page_size % BLOCK_N == 0`` (``PAGE_ALIGNED``, a launch-time fact) a tile lies in one page: one scalar
  lookup per tile and a contiguous ``[BLOCK_N, D]`` block.
* **Ragged rows.** Per-row start positions; a query at a negative position (a left pad) sees no key and gets zeros.
* Grid ``(ceil(T / BLOCK_T), B * KVH)``, query tiles in reverse order (the longest causal rows start first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import naive

__all__ = [
    "PrefillConfig",
    "default_prefill_config",
    "supports_head_dim",
    "paged_attention_prefill_triton",
    "group_pad",
]

LOG2E = 1.4426950408889634


@triton.jit
def _load_kv_tile(
    k_base, v_base, table_row, n0, n_end, page_size, stride_cp, stride_cs,
    D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_ALIGNED: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """Keys/values of positions n0 .. n0 + BLOCK_N - 1 ([BLOCK_N, D] each), zeros at positions >= n_end if MASKED."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    kpos = n0 + offs_n
    if PAGE_ALIGNED:
        page = tl.load(table_row + n0 // page_size).to(tl.int64)
        off = page * stride_cp + (n0 % page_size + offs_n) * stride_cs
    else:
        if MASKED:
            page = tl.load(table_row + kpos // page_size, mask=kpos < n_end, other=0).to(tl.int64)
        else:
            page = tl.load(table_row + kpos // page_size).to(tl.int64)
        off = page * stride_cp + (kpos % page_size) * stride_cs
    ptrs = off[:, None] + offs_d[None, :]
    if MASKED:
        valid = (kpos < n_end)[:, None]
        k = tl.load(k_base + ptrs, mask=valid, other=0.0)
        v = tl.load(v_base + ptrs, mask=valid, other=0.0)
    else:
        k = tl.load(k_base + ptrs)
        v = tl.load(v_base + ptrs)
    return k, v


@triton.jit
def _paged_prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    table_ptr,
    pos_ptr,
    o_ptr,
    T,
    KVH,
    G,
    page_size,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_ob,
    stride_ot,
    stride_oh,
    stride_cp,
    stride_ch,
    stride_cs,
    stride_tb,
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
    BLOCK_T: tl.constexpr = BLOCK_M // G_PAD  # query tokens per tile
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # reverse: the longest causal rows first
    pid_bk = tl.program_id(1).to(tl.int64)
    b = pid_bk // KVH
    kvh = pid_bk % KVH
    p0 = tl.load(pos_ptr + b).to(tl.int32)  # position of the chunk's first token (negative: left pads)
    t0 = pid_m * BLOCK_T

    rows = tl.arange(0, BLOCK_M)
    tok = t0 + rows // G_PAD  # [BLOCK_M] token in the chunk
    g = rows % G_PAD
    row_ok = (tok < T) & (g < G)
    qpos = p0 + tok  # [BLOCK_M] query position
    head = kvh * G + g
    offs_d = tl.arange(0, D)
    q_off = b * stride_qb + tok.to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None], other=0.0)

    q_first = p0 + t0
    q_last = tl.minimum(q_first + BLOCK_T - 1, p0 + T - 1)
    n_end = q_last + 1  # keys 0 .. q_last (none when the whole tile is left padding)
    n_full = (tl.maximum(q_first + 1, 0) // BLOCK_N) * BLOCK_N  # keys < n_full: visible to every row

    k_base = k_cache_ptr + kvh * stride_ch
    v_base = v_cache_ptr + kvh * stride_ch
    table_row = table_ptr + b * stride_tb

    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)

    for n0 in tl.range(0, n_full, BLOCK_N, num_stages=NUM_STAGES):
        k, v = _load_kv_tile(k_base, v_base, table_row, n0, n_end, page_size, stride_cp, stride_cs,
                             D, BLOCK_N, PAGE_ALIGNED, False)  # fmt: skip
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if FOLD_SCALE:  # scale > 0: max before scaling, then one FMA per score (as FlashAttention's Triton kernels)
            m_new = tl.maximum(m_i, tl.max(s, 1) * QK_SCALE)
            p = tl.exp2(s * QK_SCALE - m_new[:, None])
        else:
            s = s * QK_SCALE
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    offs_n = tl.arange(0, BLOCK_N)
    for n0 in tl.range(n_full, n_end, BLOCK_N):
        k, v = _load_kv_tile(k_base, v_base, table_row, n0, n_end, page_size, stride_cp, stride_cs,
                             D, BLOCK_N, PAGE_ALIGNED, True)  # fmt: skip
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * QK_SCALE
        visible = (n0 + offs_n)[None, :] <= qpos[:, None]  # causal (also hides keys >= n_end, and pads' rows)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # rows that saw no key (left pads): zeros
    out = acc / l_safe[:, None]
    o_off = b * stride_ob + tok.to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


@dataclass(frozen=True)
class PrefillConfig:
    """Launch parameters (a tuning choice; every choice gives the same result up to rounding)."""

    block_m: int = 128  # query rows (token x group head) per program
    block_n: int = 64  # keys per tile
    num_warps: int = 8
    num_stages: int = 3
    fold_scale: bool = True  # (when scale > 0) row max of the raw scores, then one FMA per score


def default_prefill_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> PrefillConfig:
    """Launch parameters from static facts only (head dim, dtype, device): the traced path uses the same."""
    if device.type != "cuda":
        return PrefillConfig(block_m=16, block_n=16, num_warps=1, num_stages=1)  # CPU interpreter: small tiles
    wide = dtype == torch.float32
    if head_dim >= 256:
        return PrefillConfig(64, 32, 4, 2 if not wide else 1)
    if head_dim >= 128:
        # H200, H=64, KVH=8, bf16 (kernels/attention/README.md): 128 x 128 tiles, 8 warps, 3 stages were fastest
        return PrefillConfig(128, 128, 8, 3) if not wide else PrefillConfig(128, 64, 8, 1)
    return PrefillConfig(128, 64, 4, 3 if not wide else 2)


def _is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def supports_head_dim(head_dim: int) -> bool:
    """Whether the Triton kernels take this head dim (powers of two in [16, 256]: tl.dot needs >= 16)."""
    return _is_pow2(head_dim) and 16 <= head_dim <= 256


def group_pad(group: int) -> int:
    """The query-head group padded to a power of two (rows of a tile)."""
    return triton.next_power_of_2(group)


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    return "tf32x3" if (dtype == torch.float32 and device.type == "cuda") else "tf32"


def tile_shape(cfg: PrefillConfig, group: int) -> tuple[int, int, int]:
    """(G_PAD, BLOCK_M, BLOCK_T) of a configuration for a GQA group size."""
    g_pad = group_pad(group)
    block_m = max(cfg.block_m, g_pad)
    return g_pad, block_m, block_m // g_pad


def paged_attention_prefill_triton(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_table: Tensor,
    positions: Tensor,
    scale: float,
    out: Tensor | None = None,
    *,
    config: PrefillConfig | None = None,
    check: bool = True,
) -> Tensor:
    """Causal attention of a chunk ``q [B, T, H, D]`` over each row's cache ``0..positions[b]+T-1`` (the chunk's
    own K/V already written, ``paged_kv_write``). Returns ``o [B, T, H, D]`` in q.dtype, contiguous (``out`` if
    given: contiguous, that shape and dtype). ``check``: refuse rows past the table / pages outside the pool (one
    device sync)."""
    naive.check_paged_inputs(q, k_cache, v_cache, block_table, positions, query=True)
    B, T, H, D = q.shape
    _, KVH, page_size, _ = k_cache.shape
    if not supports_head_dim(D):
        raise ValueError(f"paged attention (triton): head dim must be a power of two in [16, 256]; got {D}")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("paged attention: k_cache and v_cache need the same strides and a contiguous last dim")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"paged attention (triton): cache dtype {k_cache.dtype} != q dtype {q.dtype}")
    if out is None:
        out = torch.empty(B, T, H, D, dtype=q.dtype, device=q.device)
    elif out.shape != (B, T, H, D) or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError(f"paged attention: out must be contiguous {q.dtype} {(B, T, H, D)}")
    if B == 0 or T == 0:
        return out
    from .write import check_rows_fast

    if check:
        check_rows_fast(block_table, positions, T, page_size, k_cache.shape[0])
    if q.stride(-1) != 1:
        q = q.contiguous()
    block_table = block_table if block_table.stride(-1) == 1 else block_table.contiguous()
    cfg = config or default_prefill_config(D, q.dtype, q.device)
    G = H // KVH
    g_pad, block_m, block_t = tile_shape(cfg, G)
    _paged_prefill_kernel[(triton.cdiv(T, block_t), B * KVH)](
        q, k_cache, v_cache, block_table, positions, out, T, KVH, G, page_size,
        q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
        D=D, G_PAD=g_pad, BLOCK_M=block_m, BLOCK_N=cfg.block_n, PAGE_ALIGNED=page_size % cfg.block_n == 0,
        QK_SCALE=float(scale) * LOG2E, DOT_PRECISION=dot_precision(q.dtype, q.device), NUM_STAGES=cfg.num_stages,
        FOLD_SCALE=cfg.fold_scale and scale > 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out
