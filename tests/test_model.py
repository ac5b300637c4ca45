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
    """A batch whose rows sit at different positions equals each row decoded alone."""
    V = tiny.config.vocab_size
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, V, (1, 9), generator=g), torch.randint(0, V, (1, 14), generator=g)
    full_a, full_b = tiny(a), tiny(b)
    _, sa = tiny.prefill(a[:, :8], tiny.new_state(1, 16))
    _, sb = tiny.prefill(b[:, :13], tiny.new_state(1, 16))
    batched = MiniMaxState(*(list(map(lambda x, y: torch.cat([x, y]), f1, f2)) for f1, f2 in
                             ((sa.lightning, sb.lightning), (sa.key_cache, sb.key_cache), (sa.value_cache, sb.value_cache))))
    step, _ = tiny.decode(torch.cat([a[:, 8:9], b[:, 13:14]]), torch.tensor([8, 13]), batched)
    assert rel_err(step[0, 0], full_a[0, 8]) < 1e-5
    assert rel_err(step[1, 0], full_b[0, 13]) < 1e-5


@torch.no_grad()
def test_prefill_is_pure(tiny):
    ids = torch.randint(0, tiny.config.vocab_size, (1, 7))
    state = tiny.new_state(1, 8)
    for t in state.flatten():
        t.normal_()
    before = [t.clone() for t in state.flatten()]
    tiny.prefill(ids, state)
    tiny.decode(ids[:, :1], torch.tensor([3]), state)
    assert all(torch.equal(a, b) for a, b in zip(before, state.flatten()))


@torch.no_grad()
def test_last_logits_only(tiny):
    ids = torch.randint(0, tiny.config.vocab_size, (2, 9))
    all_logits, _ = tiny.prefill(ids, tiny.new_state(2, 9))
    last, _ = tiny.prefill(ids, tiny.new_state(2, 9), last_logits_only=True)
    torch.testing.assert_close(last, all_logits[:, -1:])  # same values; only GEMM rounding differs


def test_partial_rope_rotates_only_rotary_dims_in_pairs_half_apart():
    B, H, T, D, r = 1, 2, 5, 16, 8
    x = torch.randn(B, H, T, D)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, r, 2).float() / r))
    pos = torch.arange(T).float()[None]
    freqs = pos[..., None] * inv_freq  # [B, T, r/2]
    emb = torch.cat((freqs, freqs), -1)
    y = apply_partial_rope(x, emb.cos(), emb.sin())
    assert torch.equal(y[..., r:], x[..., r:])  # pass-through dims untouched
    # pair (i, i + r/2) is rotated by angle pos * inv_freq[i], as a complex multiplication
    z = torch.complex(x[..., : r // 2], x[..., r // 2 : r]) * torch.polar(torch.ones_like(freqs), freqs)[:, None]
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
