"""The reference MoE agrees with a dense formulation written independently (every expert on every token)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.moe import moe_forward, naive
from tests.utils import rel_err


def _weights(T, hidden, I, E, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, hidden, generator=g)
    router = torch.randn(E, hidden, generator=g)
    w1 = torch.randn(E, I, hidden, generator=g) / hidden**0.5
    w3 = torch.randn(E, I, hidden, generator=g) / hidden**0.5
    w2 = torch.randn(E, hidden, I, generator=g) / I**0.5
    return x, router, w1, w3, w2


def _dense_fp64(x, router, w1, w3, w2, top_k):
    x, router, w1, w3, w2 = (t.double() for t in (x, router, w1, w3, w2))
    probs = torch.softmax(x @ router.T, -1)  # [T, E]
    kth = probs.topk(top_k, -1).values[:, -1:]  # k-th largest probability per token
    gates = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    gates = gates / gates.sum(-1, keepdim=True)  # renormalised over the selected experts
    h = F.silu(torch.einsum("th,eih->tei", x, w1)) * torch.einsum("th,eih->tei", x, w3)  # [T, E, I]
    y = torch.einsum("tei,ehi->teh", h, w2)  # [T, E, hidden]
    return (gates[..., None] * y).sum(1)


@pytest.mark.parametrize("T", [1, 7, 33])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_matches_dense_formulation(T, top_k):
    x, router, w1, w3, w2 = _weights(T, 24, 40, 5, seed=T + 10 * top_k)
    out = moe_forward(x, router, w1, w3, w2, top_k)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel_err(out, _dense_fp64(x, router, w1, w3, w2, top_k)) < 1e-5


def test_routing_renormalises_and_is_fp32():
    x, router, *_ = _weights(11, 24, 8, 6, seed=1)
    w, ids = naive.moe_route(x.bfloat16(), router, 2)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w.sum(-1), torch.ones(11), rtol=0, atol=1e-6)
    probs = torch.softmax(x.bfloat16().float() @ router.T, -1)
    assert torch.equal(ids, probs.topk(2, -1).indices)
    assert (w[:, 0] >= w[:, 1]).all()


def test_all_tokens_to_one_expert_and_empty_experts():
    x, router, w1, w3, w2 = _weights(9, 24, 40, 4, seed=2)
    router = router.clone()
    router[2] = 50 * x.mean(0) / x.mean(0).norm()  # expert 2 dominates every token
    router[3] = -router[2]  # expert 3 never chosen
    x = x + x.mean(0)  # make every token align with expert 2's router row
    _, ids = naive.moe_route(x, router, 1)
    assert (ids == 2).all()
    for top_k in (1, 2):
        out = moe_forward(x, router, w1, w3, w2, top_k)
        assert rel_err(out, _dense_fp64(x, router, w1, w3, w2, top_k)) < 1e-5


def test_op_backend_equals_naive():
    x, router, w1, w3, w2 = _weights(13, 24, 40, 5, seed=3)
    torch.testing.assert_close(
        moe_forward(x, router, w1, w3, w2, 2, backend="op"), moe_forward(x, router, w1, w3, w2, 2), rtol=0, atol=0
    )


def test_bad_shapes_are_named():
    x, router, w1, w3, w2 = _weights(3, 24, 40, 5)
    with pytest.raises(ValueError, match=r"w2 must be \[E=5, hidden=24, I=40\]"):
        moe_forward(x, router, w1, w3, w2.transpose(1, 2), 2)
    with pytest.raises(ValueError, match=r"top_k must be in \[1, E=5\]"):
        moe_forward(x, router, w1, w3, w2, 6)
    with pytest.raises(ValueError, match="router_weight"):
        moe_forward(x, router[:, :5], w1, w3, w2, 2)
