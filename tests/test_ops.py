"""Custom ops: opcheck (schema, fake kernels with the real strides) and one exported node per op call."""

from __future__ import annotations

import pytest
import torch

import kernels  # noqa: F401
from model import MiniMaxConfig, MiniMaxForCausalLM


def _lightning_args(B=2, T=11, H=3, D=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, generator=g).to(dtype) for _ in range(3))
    return q, k, v, torch.rand(H, generator=g), torch.randn(B, H, D, D, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_lightning(dtype):
    q, k, v, s, state = _lightning_args(dtype=dtype)
    torch.library.opcheck(torch.ops.minimax.lightning_prefill.default, (q, k, v, s, state))
    torch.library.opcheck(torch.ops.minimax.lightning_decode.default, (q[:, :1], k[:, :1], v[:, :1], s, state))


def test_lightning_decode_in_place_op_equals_the_functional_one():
    """``minimax::lightning_decode_`` overwrites its state with ``lightning_decode``'s new state and returns its
    output (the reference path here; the Triton kernels in tests/test_lightning_triton.py); opcheck on the mutation."""
    q, k, v, s, state = _lightning_args()
    q, k, v = q[:, :1], k[:, :1], v[:, :1]
    o_ref, new_ref = torch.ops.minimax.lightning_decode(q, k, v, s, state)
    inplace = state.clone()
    o = torch.ops.minimax.lightning_decode_(q, k, v, s, inplace)
    assert torch.equal(o, o_ref) and torch.equal(inplace, new_ref) and not torch.equal(inplace, state)
    torch.library.opcheck(torch.ops.minimax.lightning_decode_.default, (q, k, v, s, state.clone()))


def test_opcheck_lightning_strided_inputs():
    """The model passes q, k, v as views of one [B, T, H, 3D] tensor: outputs must still be contiguous."""
    B, T, H, D = 2, 9, 3, 8
    qkv = torch.randn(B, T, H, 3 * D)
    q, k, v = qkv.split(D, dim=-1)
    s, state = torch.rand(H), torch.randn(B, H, D, D)
    torch.library.opcheck(torch.ops.minimax.lightning_prefill.default, (q, k, v, s, state))
    o, new_state = torch.ops.minimax.lightning_prefill(q, k, v, s, state)
    assert o.is_contiguous() and new_state.is_contiguous()


def test_opcheck_moe():
    g = torch.Generator().manual_seed(0)
    T, hidden, I, E = 7, 16, 24, 4
    args = (
        torch.randn(T, hidden, generator=g),
        torch.randn(E, hidden, generator=g),
        torch.randn(E, I, hidden, generator=g),
        torch.randn(E, I, hidden, generator=g),
        torch.randn(E, hidden, I, generator=g),
        2,
    )
    torch.library.opcheck(torch.ops.minimax.moe.default, args)


def _op_counts(graph_module):
    counts: dict[str, int] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith("minimax."):
            counts[str(node.target)] = counts.get(str(node.target), 0) + 1
    return counts


def test_export_keeps_one_node_per_op_call():
    config = MiniMaxConfig.preset("tiny")
    model = MiniMaxForCausalLM(config).init_random_weights(0).eval()
    n_lin, n_soft, n_layers = len(config.lightning_layers), len(config.softmax_layers), config.num_hidden_layers
    B, T, S = 2, 5, 16
    state = model.new_state(B, S, page_size=4)

    class Prefill(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, state):
            return self.m.prefill(input_ids, state)

    class Decode(Prefill):
        def forward(self, input_ids, positions, state):
            return self.m.decode(input_ids, positions, state)

    def writes(gm, op=torch.ops.minimax.paged_kv_write.default):  # an in-place op, functionalised
        return sum(1 for n in gm.graph.nodes if n.op == "call_function" and "auto_functionalized" in str(n.target)
                   and n.args[0] is op)

    ids = torch.randint(0, config.vocab_size, (B, T))
    batch, seq = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("seq", min=2, max=S)
    # MiniMaxState fields in order: lightning states (per row), key / value page pools (static), block table
    state_dims = [[{0: batch}] * n_lin, [None] * n_soft, [None] * n_soft, {0: batch}]
    ep = torch.export.export(Prefill(model), (ids, state.clone()), dynamic_shapes=({0: batch, 1: seq}, state_dims))
    ep = ep.run_decompositions()
    assert _op_counts(ep.graph_module) == {"minimax.lightning_prefill.default": n_lin, "minimax.moe.default": n_layers,
                                           "minimax.paged_attention_prefill.default": n_soft}
    assert writes(ep.graph_module) == n_soft
    exported_state = state.clone()
    exported_logits, _ = ep.module()(ids, exported_state)
    eager_logits, eager_state = model.prefill(ids, state)
    torch.testing.assert_close(exported_logits, eager_logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(exported_state.flatten(), eager_state.flatten()):  # the exported program updated its inputs
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    positions = torch.full((B,), T, dtype=torch.long)
    ep_dec = torch.export.export(
        Decode(model), (ids[:, :1], positions, eager_state.clone()),
        dynamic_shapes=({0: batch}, {0: batch}, state_dims)
    ).run_decompositions()
    assert _op_counts(ep_dec.graph_module) == {"minimax.moe.default": n_layers,
                                               "minimax.paged_attention_decode.default": n_soft}
    assert writes(ep_dec.graph_module) == n_soft
    assert writes(ep_dec.graph_module, torch.ops.minimax.lightning_decode_.default) == n_lin  # in place, no copy_
    assert not any(n.target is torch.ops.aten.copy_.default for n in ep_dec.graph_module.graph.nodes)
    logits_b, _ = ep_dec.module()(ids[:, :1], positions, eager_state.clone())
    logits_a, _ = model.decode(ids[:, :1], positions, eager_state)
    torch.testing.assert_close(logits_b, logits_a, rtol=1e-5, atol=1e-5)
