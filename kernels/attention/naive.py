"""Reference softmax attention over a paged KV cache (the softmax layers of MiniMax-01).

This file is the specification every fast kernel is tested against. Scores, softmax and accumulation are fp32.

Paged KV cache (the layout of vLLM and FlashInfer, heads-major inside a page, "HND"):
    k_cache, v_cache  [P, KVH, page_size, D]   one pool of P pages per softmax layer, model dtype, RoPE applied
    block_table       [B, M] int32             page b's j-th block: tokens j*page_size .. (j+1)*page_size - 1 of
                                               row b live in page block_table[b, j]
    positions         [B] int64                position of the chunk's first token in row b (negative: left pads)

A token of row b at absolute position ``p >= 0`` lives in page ``block_table[b, p // page_size]``, slot
``p % page_size``. A contiguous cache ``[B, KVH, S, D]`` is the special case of an identity table (row b owns pages
``b*M .. b*M + M - 1``; ``S = M * page_size``). Capacity of a row: ``M * page_size`` tokens.

Ops (q [B, T, H, D] with H a multiple of KVH: query head h reads kv head ``h // (H // KVH)``, GQA by indexing):

    paged_kv_write(k_cache, v_cache, k, v, block_table, positions)
        k, v [B, T, KVH, D]: token t of row b (position p = positions[b] + t) is written at its page slot when
        p >= 0; tokens at negative positions (left pads) are not written. In place; nothing else is touched.

    paged_attention(q, k_cache, v_cache, block_table, positions, scale) -> o [B, T, H, D] in q.dtype
        query t of row b at position p = positions[b] + t attends causally to the cache positions 0..p of row b
        (its history and the chunk up to itself, which ``paged_kv_write`` has put there):
            o = softmax_j(scale * q . k_j) v_j over j in [0, p];  a query at p < 0 (a left pad) gives zeros.
        Decode is the case T = 1.

Only the positions a row holds are read (cost follows the tokens held, not the capacity).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "check_paged_inputs",
    "paged_kv_write",
    "paged_attention",
    "gather_row",
    "contiguous_to_paged",
    "paged_decode_partials",
    "paged_decode_merge",
]


def check_paged_inputs(
    q_or_k: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, positions: Tensor, *, query: bool
) -> None:
    """Raise ``ValueError`` naming the tensor whose shape or dtype does not fit the layout above."""
    what = "q" if query else "k"
    if q_or_k.dim() != 4:
        raise ValueError(f"paged attention: {what} must be [B, T, heads, D], got {tuple(q_or_k.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"paged attention: k_cache and v_cache must both be [pages, KVH, page_size, D]; got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    B, T, heads, D = q_or_k.shape
    _, KVH, _, Dc = k_cache.shape
    if Dc != D:
        raise ValueError(f"paged attention: head dim of {what} ({D}) != the cache's ({Dc})")
    if query and heads % KVH:
        raise ValueError(f"paged attention: {heads} query heads are not a multiple of {KVH} kv heads")
    if not query and heads != KVH:
        raise ValueError(f"paged attention: k has {heads} heads, the cache {KVH}")
    if block_table.dim() != 2 or block_table.shape[0] != B or block_table.dtype != torch.int32:
        raise ValueError(f"paged attention: block_table must be int32 [B={B}, M]; got {block_table.dtype} "
                         f"{tuple(block_table.shape)}")
    if positions.shape != (B,) or positions.dtype != torch.int64:
        raise ValueError(f"paged attention: positions must be int64 [B={B}]; got {positions.dtype} "
                         f"{tuple(positions.shape)}")


def _check_rows(block_table: Tensor, positions: Tensor, T: int, page_size: int, num_pages: int) -> None:
    """Refuse rows whose chunk runs past the table, or whose pages lie outside the pool (eager checks)."""
    M = block_table.shape[1]
    for b in range(block_table.shape[0]):
        end = int(positions[b]) + T  # one past the last position of the chunk
        if end > M * page_size:
            raise ValueError(f"paged attention: row {b} reaches position {end - 1}, past the block table's "
                             f"capacity of {M * page_size} tokens ({M} pages of {page_size})")
        used = block_table[b, : max(0, -(-end // page_size))]
        if used.numel() and (int(used.min()) < 0 or int(used.max()) >= num_pages):
            raise ValueError(f"paged attention: row {b}'s block table points outside the pool of {num_pages} pages")


def _slots(positions_b: Tensor, table_b: Tensor, page_size: int) -> tuple[Tensor, Tensor]:
    """(page, slot) of absolute positions ``positions_b`` (>= 0) of one row."""
    return table_b[positions_b // page_size].long(), positions_b % page_size


def paged_kv_write(
    k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, block_table: Tensor, positions: Tensor
) -> None:
    """Write k, v ``[B, T, KVH, D]`` into their page slots, in place (left pads skipped); see the module doc."""
    check_paged_inputs(k, k_cache, v_cache, block_table, positions, query=False)
    B, T = k.shape[:2]
    page_size = k_cache.shape[2]
    _check_rows(block_table, positions, T, page_size, k_cache.shape[0])
    for b in range(B):
        p = int(positions[b]) + torch.arange(T, device=k.device)  # [T]
        real = p >= 0
        if not bool(real.any()):
            continue
        page, slot = _slots(p[real], block_table[b].to(k.device), page_size)  # [n]
        # advanced indexing on dims 0 and 2 puts the index dim first: [n, KVH, D]
        k_cache[page, :, slot] = k[b, real].to(k_cache.dtype)
        v_cache[page, :, slot] = v[b, real].to(v_cache.dtype)


def gather_row(cache: Tensor, table_b: Tensor, length: int) -> Tensor:
    """Positions ``0..length-1`` of one row, contiguous: ``[KVH, length, D]``."""
    page_size = cache.shape[2]
    n_pages = -(-length // page_size)
    pages = cache[table_b[:n_pages].long()]  # [n_pages, KVH, page_size, D]
    return pages.permute(1, 0, 2, 3).reshape(cache.shape[1], n_pages * page_size, cache.shape[3])[:, :length]


def paged_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, positions: Tensor, scale: float
) -> Tensor:
    """Causal softmax attention of ``q [B, T, H, D]`` over each row's cached positions (module doc); fp32 inside."""
    check_paged_inputs(q, k_cache, v_cache, block_table, positions, query=True)
    B, T, H, D = q.shape
    KVH, page_size = k_cache.shape[1], k_cache.shape[2]
    _check_rows(block_table, positions, T, page_size, k_cache.shape[0])
    group = H // KVH
    out = torch.zeros(B, T, H, D, dtype=torch.float32, device=q.device)
    for b in range(B):
        p0 = int(positions[b])
        length = p0 + T  # the row holds positions 0..length-1 once the chunk is written
        if length <= 0:
            continue
        keys = gather_row(k_cache, block_table[b].to(q.device), length).float()  # [KVH, L, D]
        values = gather_row(v_cache, block_table[b].to(q.device), length).float()
        keys = keys.repeat_interleave(group, dim=0)  # [H, L, D] (the spec may repeat; kernels must not)
        values = values.repeat_interleave(group, dim=0)
        qb = q[b].float().transpose(0, 1)  # [H, T, D]
        scores = scale * qb @ keys.transpose(1, 2)  # [H, T, L]
        query_pos = p0 + torch.arange(T, device=q.device)  # [T]
        visible = torch.arange(length, device=q.device)[None, :] <= query_pos[:, None]  # [T, L]
        scores = scores.masked_fill(~visible, float("-inf"))
        real = query_pos >= 0  # pads see nothing: zeros
        probs = torch.softmax(scores[:, real], dim=-1)  # [H, n, L]
        out[b, real] = (probs @ values).transpose(0, 1)  # [n, H, D]
    return out.to(q.dtype)


def paged_decode_partials(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, positions: Tensor, scale: float, split: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The first pass of flash-decoding (``decode.py``'s split kernel) as a definition: the decode case cut along
    the sequence into splits of ``split`` positions, ``num_splits = ceil(M * page_size / split)``.

    For row b, query head h (index ``r = b * H + h``) and split s over the held positions ``[s * split, (s + 1) *
    split) ∩ [0, p]``, with scores in the log2 domain ``z_j = scale * log2(e) * q . k_j``:
        m[r, s] = max_j z_j,   l[r, s] = sum_j 2^(z_j - m),   acc[r, s] = sum_j 2^(z_j - m) v_j      (fp32)
    Splits that hold no position are ``m = -1e30, l = 0, acc = 0`` here; the kernel leaves them unwritten, and
    ``paged_decode_merge`` never reads them. Returns ``(m [B*H, S], l [B*H, S], acc [B*H, S, D])``.
    """
    check_paged_inputs(q, k_cache, v_cache, block_table, positions, query=True)
    B, T, H, D = q.shape
    if T != 1:
        raise ValueError(f"paged decode: one query per row, got T={T}")
    KVH, page_size = k_cache.shape[1], k_cache.shape[2]
    _check_rows(block_table, positions, 1, page_size, k_cache.shape[0])
    S = -(-block_table.shape[1] * page_size // split)
    m = torch.full((B * H, S), -1.0e30, dtype=torch.float32, device=q.device)
    l = torch.zeros(B * H, S, dtype=torch.float32, device=q.device)
    acc = torch.zeros(B * H, S, D, dtype=torch.float32, device=q.device)
    log2e = 1.4426950408889634
    for b in range(B):
        held = int(positions[b]) + 1
        if held <= 0:
            continue
        keys = gather_row(k_cache, block_table[b].to(q.device), held).float().repeat_interleave(H // KVH, dim=0)
        values = gather_row(v_cache, block_table[b].to(q.device), held).float().repeat_interleave(H // KVH, dim=0)
        z = (scale * log2e) * torch.einsum("hd,hjd->hj", q[b, 0].float(), keys)  # [H, held]
        for sp in range(-(-held // split)):
            seg = slice(sp * split, min((sp + 1) * split, held))
            m_s = z[:, seg].max(dim=-1).values  # [H]
            w = torch.exp2(z[:, seg] - m_s[:, None])
            rows = b * H + torch.arange(H, device=q.device)
            m[rows, sp], l[rows, sp] = m_s, w.sum(-1)
            acc[rows, sp] = torch.einsum("hj,hjd->hd", w, values[:, seg])
    return m, l, acc


def paged_decode_merge(q: Tensor, m: Tensor, l: Tensor, acc: Tensor, positions: Tensor, split: int) -> Tensor:
    """The second pass: ``o [B, 1, H, D]`` (q's dtype; ``q`` gives only shape and dtype) from the partials of
    ``paged_decode_partials``, combining only the ``ceil((p + 1) / split)`` splits that hold positions; a row with
    ``p < 0`` gets zeros. Equals ``paged_attention`` at T = 1."""
    B, _, H, D = q.shape
    out = torch.zeros(B, 1, H, D, dtype=torch.float32, device=q.device)
    for b in range(B):
        used = -(-(int(positions[b]) + 1) // split) if int(positions[b]) >= 0 else 0
        if used == 0:
            continue
        rows = slice(b * H, (b + 1) * H)
        mb, lb, ab = m[rows, :used], l[rows, :used], acc[rows, :used]  # [H, used(, D)]
        top = mb.max(dim=-1, keepdim=True).values
        w = torch.exp2(mb - top)
        out[b, 0] = (w[..., None] * ab).sum(1) / (w * lb).sum(-1, keepdim=True)
    return out.to(q.dtype)


def contiguous_to_paged(
    keys: Tensor, values: Tensor, page_size: int, num_pages: int | None = None, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Scatter contiguous ``[B, KVH, S, D]`` caches into a shuffled page pool (a test helper).

    Returns ``(k_cache [P, KVH, page_size, D], v_cache, block_table [B, ceil(S / page_size)] int32)``; pages are
    assigned in a random order (``generator``) so that tests cross non-adjacent pages.
    """
    B, KVH, S, D = keys.shape
    M = -(-S // page_size)
    P = num_pages if num_pages is not None else B * M
    if P < B * M:
        raise ValueError(f"contiguous_to_paged: {P} pages cannot hold {B} rows of {M} pages")
    order = torch.randperm(P, generator=generator)[: B * M].view(B, M)
    k_cache = torch.zeros(P, KVH, page_size, D, dtype=keys.dtype, device=keys.device)
    v_cache = torch.zeros_like(k_cache)
    pad = M * page_size - S
    kp = torch.nn.functional.pad(keys, (0, 0, 0, pad)).view(B, KVH, M, page_size, D).permute(0, 2, 1, 3, 4)
    vp = torch.nn.functional.pad(values, (0, 0, 0, pad)).view(B, KVH, M, page_size, D).permute(0, 2, 1, 3, 4)
    k_cache[order.reshape(-1).to(keys.device)] = kp.reshape(B * M, KVH, page_size, D)
    v_cache[order.reshape(-1).to(keys.device)] = vp.reshape(B * M, KVH, page_size, D)
    return k_cache, v_cache, order.to(torch.int32).to(keys.device)
