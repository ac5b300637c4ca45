"""Traceable launches of the paged-attention Triton kernels: the bodies that ``minimax::paged_kv_write``,
``minimax::paged_attention_prefill`` and ``minimax::paged_attention_decode`` (``torch.library.triton_op``s) run when
traced (``torch.export`` fake propagation, AOTInductor / ``torch.compile`` lowering), so that Inductor compiles the
kernels into its output.

The kernels of ``write.py``, ``prefill.py`` and ``decode.py`` are launched through ``torch.library.wrap_triton``,
with only PyTorch ops besides. B and T may be symbolic (the batch and chunk dims of an export range), and so may the
table width M; no choice depends on them except through ``statically_known_true`` (never a guard):

* write: grid ``(T, B)``; the kernel stores into the ``k_cache`` / ``v_cache`` arguments themselves (no copy: a
  cache whose last dim is not statically contiguous is refused, since a copy would hide the write), so torch's
  analysis of user-kernel mutations reports exactly those two tensors as mutated.
* prefill: the tile configuration (``prefill.default_prefill_config``) from head dim, dtype and device; T is a
  runtime scalar, the grid ``(ceil(T / BLOCK_T), B * KVH)``; the one-lookup-per-tile page path only when
  ``page_size % BLOCK_N == 0`` is statically known.
* decode: ``decode.decode_split`` from the capacity ``M * page_size`` (the largest split such that the capacity
  statically holds 16 of them) and the head dim; scratch ``[B * H, num_splits(, D)]`` fp32.

The eager launchers' range checks (rows past the table, pages outside the pool) are data-dependent and are not
made here: a traced program relies on its caller (the runtime) for them.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import decode, prefill, write

__all__ = ["paged_kv_write_traceable", "paged_attention_prefill_traceable", "paged_attention_decode_traceable"]


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if statically_known_true(x.stride(-1) == 1) else x.contiguous()


def _check_caches(k_cache: Tensor, v_cache: Tensor, what: str) -> None:
    same = all(statically_known_true(a == b) for a, b in zip(k_cache.stride(), v_cache.stride()))
    if not (same and statically_known_true(k_cache.stride(-1) == 1)):
        raise ValueError(f"{what} (triton): k_cache and v_cache need the same strides and a contiguous last dim")


def _check_head_dim(D: int, what: str) -> None:
    if not prefill.supports_head_dim(D):
        raise ValueError(f"{what} (triton): head dim must be a power of two in [16, 256]; got {D}")


def paged_kv_write_traceable(
    k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, block_table: Tensor, positions: Tensor
) -> None:
    """Same contract as ``write.paged_kv_write_triton`` (in place); B and T may be symbolic."""
    from torch.library import wrap_triton

    B, T, KVH, D = k.shape
    _check_head_dim(D, "paged kv write")
    _check_caches(k_cache, v_cache, "paged kv write")
    k, v, block_table = _last_dim_contiguous(k), _last_dim_contiguous(v), _last_dim_contiguous(block_table)
    positions = positions.contiguous()
    page_size = k_cache.shape[2]
    block_h = 1 << max(0, (int(KVH) - 1).bit_length())
    wrap_triton(write._paged_kv_write_kernel)[(T, B)](
        k_cache, v_cache, k, v, block_table, positions, KVH, page_size,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
        D=D, BLOCK_H=block_h, num_warps=4 if KVH * D >= 1024 else 1,
    )  # fmt: skip


def _page_aligned(page_size, block_n: int) -> bool:
    return bool(statically_known_true(page_size % block_n == 0))


def paged_attention_prefill_traceable(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, positions: Tensor, scale: float
) -> Tensor:
    """Same contract as ``prefill.paged_attention_prefill_triton``; B and T may be symbolic."""
    from torch.library import wrap_triton

    B, T, H, D = q.shape
    _, KVH, page_size, _ = k_cache.shape
    _check_head_dim(D, "paged attention")
    _check_caches(k_cache, v_cache, "paged attention")
    if k_cache.dtype != q.dtype:
        raise ValueError(f"paged attention (triton): cache dtype {k_cache.dtype} != q dtype {q.dtype}")
    q, block_table = _last_dim_contiguous(q), _last_dim_contiguous(block_table)
    positions = positions.contiguous()
    cfg = prefill.default_prefill_config(D, q.dtype, q.device)
    G = H // KVH
    g_pad, block_m, block_t = prefill.tile_shape(cfg, G)
    o = torch.empty((B, T, H, D), dtype=q.dtype, device=q.device)
    wrap_triton(prefill._paged_prefill_kernel)[((T + block_t - 1) // block_t, B * KVH)](
        q, k_cache, v_cache, block_table, positions, o, T, KVH, G, page_size,
        q.stride(0), q.stride(1), q.stride(2), o.stride(0), o.stride(1), o.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
        D=D, G_PAD=g_pad, BLOCK_M=block_m, BLOCK_N=cfg.block_n, PAGE_ALIGNED=_page_aligned(page_size, cfg.block_n),
        QK_SCALE=float(scale) * prefill.LOG2E,
        DOT_PRECISION=prefill.dot_precision(q.dtype, q.device), NUM_STAGES=cfg.num_stages,
        FOLD_SCALE=cfg.fold_scale and float(scale) > 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return o


def paged_attention_decode_traceable(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, positions: Tensor, scale: float
) -> Tensor:
    """Same contract as ``decode.paged_attention_decode_triton``; B (and M) may be symbolic."""
    from torch.library import wrap_triton

    B, T, H, D = q.shape
    _, KVH, page_size, _ = k_cache.shape
    _check_head_dim(D, "paged attention decode")
    _check_caches(k_cache, v_cache, "paged attention decode")
    if not statically_known_true(T == 1):
        raise ValueError("paged attention decode: one query per row (T = 1)")
    if k_cache.dtype != q.dtype:
        raise ValueError(f"paged attention (triton): cache dtype {k_cache.dtype} != q dtype {q.dtype}")
    q, block_table = _last_dim_contiguous(q), _last_dim_contiguous(block_table)
    positions = positions.contiguous()
    capacity = block_table.shape[1] * page_size
    split = decode.decode_split(capacity, D, q.device)
    block_n, num_warps, num_stages = decode.decode_tiles(split, D, q.device, q.dtype)
    num_splits = (capacity + split - 1) // split
    G = H // KVH
    o = torch.empty((B, 1, H, D), dtype=q.dtype, device=q.device)
    m_part = torch.empty((B * H, num_splits), dtype=torch.float32, device=q.device)
    l_part = torch.empty((B * H, num_splits), dtype=torch.float32, device=q.device)
    acc_part = torch.empty((B * H, num_splits, D), dtype=torch.float32, device=q.device)
    wrap_triton(decode._paged_decode_split_kernel)[(num_splits, B * KVH)](
        q, k_cache, v_cache, block_table, positions, m_part, l_part, acc_part,
        H, KVH, G, page_size, num_splits, q.stride(0), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
        D=D, G_PAD=decode.decode_group_pad(G), SPLIT=split, BLOCK_N=block_n,
        PAGE_ALIGNED=_page_aligned(page_size, block_n), QK_SCALE=float(scale) * prefill.LOG2E,
        DOT_PRECISION=prefill.dot_precision(q.dtype, q.device),
        NUM_STAGES=num_stages, num_warps=num_warps,
    )  # fmt: skip
    wrap_triton(decode._paged_decode_merge_kernel)[(B * H,)](
        m_part, l_part, acc_part, positions, o, H, num_splits, o.stride(0), o.stride(2),
        D=D, SPLIT=split, BLOCK_S=decode.MERGE_BLOCK_S if q.device.type == "cuda" else 4,
        num_warps=4 if q.device.type == "cuda" else 1,
    )  # fmt: skip
    return o
