"""The paged-attention spec (``kernels/attention/naive.py``) against an independent dense definition.

The dense definition: a contiguous ``[B, KVH, S, D]`` cache, keys repeated per query head, an explicit causal mask
over absolute positions, float64 softmax. The spec must equal it for shuffled page pools, pages crossed mid-chunk,
left pads (negative start positions) and rows with history, and refuse rows past the table or outside the pool.
"""

from __future__ import annotations

import math

import pytest
import torch

import kernels  # noqa: F401  (registers torch.ops.minimax.*)
from kernels.attention import naive
from tests.utils import rel_err


def _dense_reference(q, keys, values, positions, scale):
    """q [B, T, H, D]; keys/values [B, KVH, S, D] contiguous (position j at index j); float64 throughout."""
    B, T, H, D = q.shape
    KVH = keys.shape[1]
    out = torch.zeros(B, T, H, D, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            p = int(positions[b]) + t
            if p < 0:
                continue
            for h in range(H):
                kh = keys[b, h // (H // KVH), : p + 1].double()  # [p+1, D]
                vh = values[b, h // (H // KVH), : p + 1].double()
                w = torch.softmax(scale * kh @ q[b, t, h].double(), dim=0)
                out[b, t, h] = w @ vh
    return out


def _case(B, T, H, KVH, D, S, page_size, starts, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, KVH, S, D, generator=g)
    values = torch.randn(B, KVH, S, D, generator=g)
    q = torch.randn(B, T, H, D, generator=g)
    k_cache, v_cache, table = naive.contiguous_to_paged(keys, values, page_size, num_pages=B * -(-S // page_size) + 3,
                                                        generator=g)
    return q, keys, values, k_cache, v_cache, table, torch.tensor(starts, dtype=torch.long)


@pytest.mark.parametrize("H, KVH", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("page_size", [1, 4, 5])
def test_prefill_spec_matches_dense_definition(H, KVH, page_size):
    # row 0: left pads (start -3), row 1: history (start 6), chunk of 7 crossing pages of 4/5
    T, S, D = 7, 16, 8
    q, keys, values, kc, vc, table, pos = _case(2, T, H, KVH, D, S, page_size, [-3, 6], seed=H + page_size)
    scale = 1 / math.sqrt(D)
    out = naive.paged_attention(q, kc, vc, table, pos, scale)
    ref = _dense_reference(q, keys, values, pos, scale)
    assert rel_err(out, ref) < 1e-6
    assert out[0, :3].abs().max() == 0  # pads give zeros


def test_decode_spec_matches_dense_definition_and_reads_only_held_tokens():
    q, keys, values, kc, vc, table, pos = _case(3, 1, 8, 2, 16, 24, 4, [0, 9, 23], seed=3)
    scale = 0.3
    ref = _dense_reference(q, keys, values, pos, scale)
    # poison everything a row does not hold: the result must not change (nothing past positions[b] is read)
    for b in range(3):
        held = int(pos[b]) + 1
        for j in range(held, 24):
            page, slot = int(table[b, j // 4]), j % 4
            kc[page, :, slot] = float("nan")
            vc[page, :, slot] = float("nan")
    out = naive.paged_attention(q, kc, vc, table, pos, scale)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-6


def test_write_then_attend_equals_attention_over_the_whole_sequence():
    """Chunked: write chunk 1, attend; write chunk 2, attend == dense causal attention over the concatenation."""
    g = torch.Generator().manual_seed(5)
    B, H, KVH, D, page_size = 2, 4, 2, 8, 3
    L1, L2 = 5, 4
    k = torch.randn(B, L1 + L2, KVH, D, generator=g)
    v = torch.randn(B, L1 + L2, KVH, D, generator=g)
    q = torch.randn(B, L1 + L2, H, D, generator=g)
    M = -(-(L1 + L2) // page_size)
    table = torch.randperm(B * M + 2, generator=g)[: B * M].view(B, M).to(torch.int32)
    kc = torch.full((B * M + 2, KVH, page_size, D), float("nan"))  # unwritten slots poisoned
    vc = kc.clone()
    outs = []
    for c0, c1 in ((0, L1), (L1, L1 + L2)):
        pos = torch.full((B,), c0, dtype=torch.long)
        torch.ops.minimax.paged_kv_write(kc, vc, k[:, c0:c1].contiguous(), v[:, c0:c1].contiguous(), table, pos)
        outs.append(torch.ops.minimax.paged_attention_prefill(q[:, c0:c1].contiguous(), kc, vc, table, pos, 0.5))
    out = torch.cat(outs, dim=1)
    ref = _dense_reference(q, k.transpose(1, 2), v.transpose(1, 2), torch.zeros(B, dtype=torch.long), 0.5)
    assert rel_err(out, ref) < 1e-6


def test_write_skips_left_pads_and_touches_nothing_else():
    g = torch.Generator().manual_seed(1)
    kc = torch.randn(6, 2, 4, 8, generator=g)
    vc = torch.randn(6, 2, 4, 8, generator=g)
    before_k, before_v = kc.clone(), vc.clone()
    table = torch.tensor([[4, 1], [0, 5]], dtype=torch.int32)
    k = torch.randn(2, 3, 2, 8, generator=g)
    v = torch.randn(2, 3, 2, 8, generator=g)
    naive.paged_kv_write(kc, vc, k, v, table, torch.tensor([-2, 3]))
    expect_k, expect_v = before_k.clone(), before_v.clone()
    expect_k[4, :, 0], expect_v[4, :, 0] = k[0, 2], v[0, 2]  # row 0: only its token at position 0
    for t, p in enumerate((3, 4, 5)):  # row 1: positions 3 (page 0, slot 3), 4 and 5 (page 5, slots 0, 1)
        page, slot = int(table[1, p // 4]), p % 4
        expect_k[page, :, slot], expect_v[page, :, slot] = k[1, t], v[1, t]
    assert torch.equal(kc, expect_k) and torch.equal(vc, expect_v)


def test_refuses_rows_past_the_table_and_pages_outside_the_pool():
    kc = torch.zeros(4, 1, 4, 8)
    q = torch.zeros(1, 2, 2, 8)
    table = torch.tensor([[0, 1]], dtype=torch.int32)  # capacity 8 tokens
    with pytest.raises(ValueError, match="row 0 reaches position 8, past the block table's capacity of 8"):
        naive.paged_attention(q, kc, kc, table, torch.tensor([7]), 1.0)
    with pytest.raises(ValueError, match="row 0's block table points outside the pool of 4 pages"):
        naive.paged_attention(q, kc, kc, torch.tensor([[0, 9]], dtype=torch.int32), torch.tensor([3]), 1.0)
    with pytest.raises(ValueError, match="block_table must be int32"):
        naive.paged_attention(q, kc, kc, table.long(), torch.tensor([0]), 1.0)
    with pytest.raises(ValueError, match="3 query heads are not a multiple of 2 kv heads"):
        naive.paged_attention(torch.zeros(1, 2, 3, 8), torch.zeros(4, 2, 4, 8), torch.zeros(4, 2, 4, 8), table,
                              torch.tensor([0]), 1.0)
