"""Reference mixture-of-experts block of MiniMax-01 (routing + SwiGLU experts), computed in fp32.

This file is the specification the dispatch kernels are tested against.

Shapes:
    x              [T, hidden]        tokens (any float dtype)
    router_weight  [E, hidden]        router ("gate") weight; MiniMax checkpoints store it in fp32
    w1, w3         [E, I, hidden]     gate and up projections of each expert (nn.Linear layout [out, in])
    w2             [E, hidden, I]     down projection of each expert
    top_k          int                experts per token (2 for MiniMax-Text-01)

Routing (HF remote code ``MiniMaxText01SparseMoeBlock``; no bias, no jitter at inference):
    logits  = x @ router_weight^T                  in fp32            [T, E]
    probs   = softmax(logits, -1)                  in fp32
    w, ids  = topk(probs, top_k)                                      [T, top_k]
    w       = w / sum(w, -1)                       renormalised
Experts (SwiGLU): expert_e(x) = (silu(x w1_e^T) * (x w3_e^T)) w2_e^T
Output: y_t = sum_j w[t, j] * expert_{ids[t, j]}(x_t), returned in the dtype of x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["moe_route", "moe_experts", "moe_forward", "check_moe_inputs"]


def check_moe_inputs(x: Tensor, router_weight: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, top_k: int) -> None:
    """Raise ``ValueError`` naming the tensor whose shape does not fit the layout above."""
    if x.dim() != 2:
        raise ValueError(f"moe: x must be [T, hidden]; got {tuple(x.shape)}")
    hidden = x.shape[1]
    if router_weight.dim() != 2 or router_weight.shape[1] != hidden:
        raise ValueError(f"moe: router_weight must be [E, hidden={hidden}]; got {tuple(router_weight.shape)}")
    E = router_weight.shape[0]
    if w1.dim() != 3 or w1.shape[0] != E or w1.shape[2] != hidden:
        raise ValueError(f"moe: w1 must be [E={E}, I, hidden={hidden}]; got {tuple(w1.shape)}")
    I = w1.shape[1]
    if w3.shape != w1.shape:
        raise ValueError(f"moe: w3 must be [E={E}, I={I}, hidden={hidden}]; got {tuple(w3.shape)}")
    if w2.shape != (E, hidden, I):
        raise ValueError(f"moe: w2 must be [E={E}, hidden={hidden}, I={I}]; got {tuple(w2.shape)}")
    if not 1 <= top_k <= E:
        raise ValueError(f"moe: top_k must be in [1, E={E}]; got {top_k}")


def moe_route(x: Tensor, router_weight: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Router: returns ``(weights [T, top_k] fp32, expert ids [T, top_k] int64)``, weights renormalised."""
    logits = x.float() @ router_weight.float().t()  # [T, E]
    probs = torch.softmax(logits, dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, top_k]
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def moe_experts(x: Tensor, weights: Tensor, ids: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
    """Weighted SwiGLU experts for routed tokens. x [T, hidden]; weights, ids [T, top_k] -> [T, hidden] (x.dtype)."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, hidden]
    xf = x.float()
    for e in range(w1.shape[0]):
        token, slot = torch.nonzero(ids == e, as_tuple=True)  # tokens routed to expert e
        if token.numel() == 0:
            continue
        xe = xf[token]  # [n_e, hidden]
        h = F.silu(xe @ w1[e].float().t()) * (xe @ w3[e].float().t())  # [n_e, I]
        ye = h @ w2[e].float().t()  # [n_e, hidden]
        out.index_add_(0, token, ye * weights[token, slot].unsqueeze(-1))
    return out.to(x.dtype)


def moe_forward(x: Tensor, router_weight: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, top_k: int) -> Tensor:
    """Route and run the experts: ``[T, hidden] -> [T, hidden]`` in the dtype of x."""
    check_moe_inputs(x, router_weight, w1, w3, w2, top_k)
    weights, ids = moe_route(x, router_weight, top_k)
    return moe_experts(x, weights, ids, w1, w3, w2)
