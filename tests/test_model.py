"""The model's explicit-state entry points: decode after prefill and chunked prefill equal the whole forward."""

from __future__ import annotations

import pytest
import torch

from model import MiniMaxConfig, MiniMaxForCausalLM, MiniMaxState
from model.modeling import apply_partial_rope
from tests.utils import rel_err


@pytest.fixture(scope="module")
def tiny():
    config = MiniMaxConfig.preset("tiny")
    return MiniMaxForCausalLM(config).init_random_weights(seed=1, std=0.1).eval()


@torch.no_grad()
@pytest.mark.parametrize("prompt_len", [1, 6, 17])
def test_decode_after_prefill_equals_whole_forward_at_every_position(tiny, prompt_len):
    B, T = 2, 23  # 23 > block size 16 of the tiny preset: several lightning blocks
    ids = torch.randint(0, tiny.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(prompt_len))
    full = tiny(ids)  # [B, T, V]
    state = tiny.new_state(B, max_seq_len=32)
    logits, state = tiny.prefill(ids[:, :prompt_len], state)
    assert rel_err(logits, full[:, :prompt_len]) < 1e-5
    for t in range(prompt_len, T):
        step, state = tiny.decode(ids[:, t : t + 1], torch.full((B,), t), state)
        assert rel_err(step[:, 0], full[:, t]) < 1e-5, t


@torch.no_grad()
def test_chunked_prefill_equals_one_prefill(tiny):
    B, T = 2, 29
    ids = torch.randint(0, tiny.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    whole, whole_state = tiny.prefill(ids, tiny.new_state(B, 40))
    state, parts, start = tiny.new_state(B, 40), [], 0
    for end in (5, 21, 29):
        logits, state = tiny.prefill(ids[:, start:end], state, positions=torch.full((B,), start))
        parts.append(logits)
        start = end
    assert rel_err(torch.cat(parts, 1), whole) < 1e-5
    for a, b in zip(state.flatten(), whole_state.flatten()):
        assert rel_err(a, b) < 1e-5


@torch.no_grad()
def test_sequences_at_different_positions_decode_independently(tiny):
    """A batch whose rows sit at different positions, with pages scattered in one pool, equals each row alone."""
    V = tiny.config.vocab_size
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, V, (1, 9), generator=g), torch.randint(0, V, (1, 14), generator=g)
    full_a, full_b = tiny(a), tiny(b)
    _, sa = tiny.prefill(a[:, :8], tiny.new_state(1, 16, page_size=4))
    _, sb = tiny.prefill(b[:, :13], tiny.new_state(1, 16, page_size=4))
    # one pool of 8 pages: row 0's pages are sa's, placed at 5, 1, 6, 2; row 1's at 7, 3, 0, 4
    order = torch.tensor([[5, 1, 6, 2], [7, 3, 0, 4]], dtype=torch.int32)
    pools = []
    for ka, kb in zip(sa.key_cache + sa.value_cache, sb.key_cache + sb.value_cache):
        pool = torch.full((8, *ka.shape[1:]), float("nan"))
        pool[order[0].long()] = ka[sa.block_table[0].long()]
        pool[order[1].long()] = kb[sb.block_table[0].long()]
        pools.append(pool)
    n = len(sa.key_cache)
    batched = MiniMaxState([torch.cat([x, y]) for x, y in zip(sa.lightning, sb.lightning)], pools[:n], pools[n:],
                           order)
    # positions not held yet (8.., 13..) are NaN in the pool: the kernels must not read them
    for pool in pools:
        pool[order[0, 2:].long()] = float("nan")  # row 0 holds 8 positions = pages 0, 1 of its table
        pool[order[1, 3:].long(), :, 1:] = float("nan")  # row 1 holds 13 = pages 0..2 and slot 0 of page 3
    step, _ = tiny.decode(torch.cat([a[:, 8:9], b[:, 13:14]]), torch.tensor([8, 13]), batched)
    assert rel_err(step[0, 0], full_a[0, 8]) < 1e-5
    assert rel_err(step[1, 0], full_b[0, 13]) < 1e-5


@torch.no_grad()
def test_prefill_and_decode_update_the_state_in_place(tiny):
    """The state tensors are updated where they lie (same storage), the block table is not written, pages of
    other rows are not touched, and the result equals a fresh state's."""
    ids = torch.randint(0, tiny.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(5))
    expect, _ = tiny.prefill(ids, tiny.new_state(1, 8, page_size=4))
    state = tiny.new_state(1, 8, page_size=4)
    spare = torch.randn(2, *state.key_cache[0].shape[1:])  # two more pages owned by nobody
    state.key_cache = [torch.cat([k, spare]) for k in state.key_cache]
    state.value_cache = [torch.cat([v, spare]) for v in state.value_cache]
    table = state.block_table.clone()
    pointers = [t.data_ptr() for t in state.flatten()]
    before = [t.clone() for t in state.flatten()]
    logits, out = tiny.prefill(ids, state)
    assert out is state and [t.data_ptr() for t in state.flatten()] == pointers
    assert torch.equal(state.block_table, table)
    assert rel_err(logits, expect) == 0
    changed = [not torch.equal(a, b) for a, b in zip(before, state.flatten())]
    assert all(changed), "every lightning state and pool is written"
    for k in state.key_cache + state.value_cache:
        assert torch.equal(k[2:], spare), "pages outside the block table are not touched"
    tiny.decode(ids[:, :1], torch.tensor([7]), state)
    assert [t.data_ptr() for t in state.flatten()] == pointers


@torch.no_grad()
def test_last_logits_only(tiny):
    ids = torch.randint(0, tiny.config.vocab_size, (2, 9))
    all_logits, _ = tiny.prefill(ids, tiny.new_state(2, 9))
    last, _ = tiny.prefill(ids, tiny.new_state(2, 9), last_logits_only=True)
    torch.testing.assert_close(last, all_logits[:, -1:])  # same values; only GEMM rounding differs


def test_partial_rope_rotates_only_rotary_dims_in_pairs_half_apart():
    B, T, H, D, r = 1, 5, 2, 16, 8
    x = torch.randn(B, T, H, D)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, r, 2).float() / r))
    pos = torch.arange(T).float()[None]
    freqs = pos[..., None] * inv_freq  # [B, T, r/2]
    emb = torch.cat((freqs, freqs), -1)
    y = apply_partial_rope(x, emb.cos(), emb.sin())
    assert torch.equal(y[..., r:], x[..., r:])  # pass-through dims untouched
    # pair (i, i + r/2) is rotated by angle pos * inv_freq[i], as a complex multiplication
    z = torch.complex(x[..., : r // 2], x[..., r // 2 : r]) * torch.polar(torch.ones_like(freqs), freqs)[:, :, None]
    torch.testing.assert_close(y[..., : r // 2], z.real, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y[..., r // 2 : r], z.imag, rtol=1e-6, atol=1e-6)


def test_lightning_decay_buffers_follow_the_config(tiny):
    for i in tiny.config.lightning_layers:
        expected = torch.tensor(tiny.config.lightning_decay_rates(i), dtype=torch.float32)
        assert torch.equal(tiny.model.layers[i].self_attn.decay_rate, expected)


@torch.no_grad()
def test_bfloat16_model_tracks_fp32(tiny):
    ids = torch.randint(0, tiny.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(5))
    bf16 = MiniMaxForCausalLM(tiny.config, dtype=torch.bfloat16).eval()
    bf16.load_state_dict({k: v.to(bf16.state_dict()[k].dtype) for k, v in tiny.state_dict().items()})
    assert bf16.lm_head.weight.dtype == torch.float32  # LM head and router gates stay fp32
    assert bf16.model.layers[0].block_sparse_moe.gate.weight.dtype == torch.float32
    state = bf16.new_state(2, 11)
    assert state.lightning[0].dtype == torch.float32 and state.key_cache[0].dtype == torch.bfloat16
    logits = bf16(ids)
    assert logits.dtype == torch.float32
    assert rel_err(logits, tiny(ids)) < 5e-2


def test_decode_refuses_more_than_one_token(tiny):
    with pytest.raises(ValueError, match="one token per sequence"):
        tiny.decode(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, dtype=torch.long), tiny.new_state(1, 4))


def test_kernel_choice_is_reported_per_device():
    import dataclasses

    from model.modeling import kernel_choice

    config = MiniMaxConfig.preset("tiny")
    assert kernel_choice(config, "cpu") == {"lightning attention": "reference (naive.py)", "moe": "reference (naive.py)"}
    assert kernel_choice(config, "cuda")["lightning attention"].startswith("triton")
    odd = dataclasses.replace(config, head_dim=24, rotary_dim=8)
    assert "head_dim 24 is not a power of two" in kernel_choice(odd, "cuda")["lightning attention"]
