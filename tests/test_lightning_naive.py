"""The three reference forms of lightning attention agree with each other and with the definition."""

from __future__ import annotations

import pytest
import torch

from kernels.lightning_attention import lightning_attention_decode, lightning_attention_prefill, naive
from tests.utils import rel_err


def _inputs(B, T, H, D, seed=0, with_state=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=g).to(dtype) for _ in range(3))
    s = torch.rand(H, generator=g) * 0.9 + 0.01  # decay rates in [0.01, 0.91]: fast and slow heads
    state = torch.randn(B, H, D, D, generator=g) if with_state else None
    return q, k, v, s, state


def _definition_fp64(q, k, v, s, state):
    """o_t = sum_{u<=t} exp(-s(t-u)) (q_t.k_u) v_u + exp(-s(t+1)) q_t S0, written as plain sums in float64."""
    q, k, v, s = q.double(), k.double(), v.double(), s.double()
    B, T, H, D = q.shape
    o = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    for t in range(T):
        for u in range(t + 1):
            w = torch.exp(-s * (t - u))  # [H]
            o[:, t] += (w[None, :, None] * (q[:, t] * k[:, u]).sum(-1, keepdim=True)) * v[:, u]
        if state is not None:
            o[:, t] += torch.exp(-s * (t + 1))[None, :, None] * torch.einsum("bhd,bhde->bhe", q[:, t], state.double())
    final = torch.zeros(B, H, D, v.shape[-1], dtype=torch.float64) if state is None else state.double().clone()
    for t in range(T):
        final = torch.exp(-s)[None, :, None, None] * final + torch.einsum("bhd,bhe->bhde", k[:, t], v[:, t])
    return o, final


@pytest.mark.parametrize("T", [1, 5, 17])
@pytest.mark.parametrize("with_state", [False, True])
def test_forms_equal_definition(T, with_state):
    q, k, v, s, state = _inputs(2, T, 3, 4, seed=T, with_state=with_state)
    o_ref, s_ref = _definition_fp64(q, k, v, s, state)
    for form in (naive.lightning_attention_quadratic, naive.lightning_attention_recurrent):
        o, st = form(q, k, v, s, state)
        assert rel_err(o, o_ref) < 1e-5, form.__name__
        assert rel_err(st, s_ref) < 1e-5, form.__name__
    for block in (1, 3, 4, 16):
        o, st = naive.lightning_attention_blockwise(q, k, v, s, state, block_size=block)
        assert rel_err(o, o_ref) < 1e-5, block
        assert rel_err(st, s_ref) < 1e-5, block


@pytest.mark.parametrize("T", [1, 2, 31, 64, 97, 200])
@pytest.mark.parametrize("block", [1, 7, 16, 64, 256])
def test_blockwise_equals_quadratic_and_recurrent(T, block):
    q, k, v, s, state = _inputs(2, T, 3, 8, seed=T * 1000 + block)
    o_q, s_q = naive.lightning_attention_quadratic(q, k, v, s, state)
    o_b, s_b = naive.lightning_attention_blockwise(q, k, v, s, state, block_size=block)
    assert rel_err(o_b, o_q) < 1e-5
    assert rel_err(s_b, s_q) < 1e-5
    if T <= 64:
        o_r, s_r = naive.lightning_attention_recurrent(q, k, v, s, state)
        assert rel_err(o_r, o_q) < 1e-5
        assert rel_err(s_r, s_q) < 1e-5


@pytest.mark.parametrize("split", [1, 13, 29])
def test_state_carried_across_calls(split):
    q, k, v, s, state = _inputs(1, 41, 2, 8, seed=split)
    o_all, s_all = lightning_attention_prefill(q, k, v, s, state)
    o1, s1 = lightning_attention_prefill(q[:, :split], k[:, :split], v[:, :split], s, state)
    o2, s2 = lightning_attention_prefill(q[:, split:], k[:, split:], v[:, split:], s, s1)
    assert rel_err(torch.cat([o1, o2], 1), o_all) < 1e-5
    assert rel_err(s2, s_all) < 1e-5


def test_decode_steps_continue_prefill():
    q, k, v, s, _ = _inputs(2, 12, 3, 8, seed=7)
    o_all, s_all = lightning_attention_prefill(q, k, v, s)
    o, st = lightning_attention_prefill(q[:, :9], k[:, :9], v[:, :9], s)
    for t in range(9, 12):
        o_t, st = lightning_attention_decode(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], s, st)
        assert rel_err(o_t, o_all[:, t : t + 1]) < 1e-5
    assert rel_err(st, s_all) < 1e-5


def test_op_backend_equals_naive():
    q, k, v, s, state = _inputs(2, 19, 3, 8, seed=3)
    o_n, s_n = lightning_attention_prefill(q, k, v, s, state, backend="naive")
    o_o, s_o = lightning_attention_prefill(q, k, v, s, state, backend="op")
    torch.testing.assert_close(o_o, o_n, rtol=0, atol=0)
    torch.testing.assert_close(s_o, s_n, rtol=0, atol=0)
    d_n = lightning_attention_decode(q[:, :1], k[:, :1], v[:, :1], s, state, backend="naive")
    d_o = lightning_attention_decode(q[:, :1], k[:, :1], v[:, :1], s, state, backend="op")
    for a, b in zip(d_o, d_n):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_low_precision_inputs_keep_fp32_state():
    q, k, v, s, state = _inputs(1, 9, 2, 8, seed=5, dtype=torch.bfloat16)
    o, st = lightning_attention_prefill(q, k, v, s, state)
    assert o.dtype == torch.bfloat16 and st.dtype == torch.float32
    o_ref, s_ref = _definition_fp64(q.float(), k.float(), v.float(), s, state)
    assert rel_err(o, o_ref) < 1e-2  # bf16 rounding of the output only
    assert rel_err(st, s_ref) < 1e-5  # state accumulated in fp32 from the bf16 inputs


def test_decay_is_exp_minus_s_per_step():
    """One key, zero queries except at distance d: the output weight is exactly exp(-s d)."""
    T, s_val = 6, 0.37
    q = torch.zeros(1, T, 1, 1)
    k = torch.zeros(1, T, 1, 1)
    v = torch.zeros(1, T, 1, 1)
    k[0, 0], v[0, 0] = 1.0, 1.0
    q[0, :] = 1.0
    o, _ = lightning_attention_prefill(q, k, v, torch.tensor([s_val]))
    expected = torch.exp(-s_val * torch.arange(T, dtype=torch.float32))
    torch.testing.assert_close(o[0, :, 0, 0], expected, rtol=1e-6, atol=0)


def test_bad_inputs_are_named():
    q, k, v, s, state = _inputs(2, 5, 3, 4)
    with pytest.raises(ValueError, match=r"s must be fp32 \[H=3\]"):
        lightning_attention_prefill(q, k, v, s[:2], state)
    with pytest.raises(ValueError, match=r"state must be fp32 \[B=2, H=3, Dk=4, Dv=4\]"):
        lightning_attention_prefill(q, k, v, s, state[:1])
    with pytest.raises(ValueError, match="same shape"):
        lightning_attention_prefill(q, k[:, :4], v, s, state)
    with pytest.raises(ValueError, match="one token"):
        lightning_attention_decode(q, k, v, s, state)
    with pytest.raises(ValueError, match="unknown backend"):
        lightning_attention_prefill(q, k, v, s, state, backend="cuda-magic")
