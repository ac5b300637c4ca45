"""Pure-PyTorch reference of each stage of the MoE chain, with exactly the I/O of the TensorRT plugin contract.

The ONNX lowering (``export/onnx_lowering.py``) replaces every ``minimax::moe`` node by a chain of plugin nodes
(namespace ``minimax``, version ``1``), and the Triton kernels of ``routing.py`` / ``grouped.py`` implement each
link. These functions are the specification of each link: the ONNX reference evaluator
(``export/onnx_reference.py``) runs them, and the tests compare them with ``naive.moe_forward`` (the whole chain)
and with the Triton stages (each link). Math is fp32; tensors handed from one stage to the next are stored in the
dtype the kernels store them in (x.dtype for h, y_perm and y), so the chain equals ``naive.moe_forward`` exactly
up to fp32 rounding for fp32 inputs.

A slot is one (token, k) pair with flat index s = token * top_k + k; S = T * top_k slots.
Static upper-bound sizes (functions of T only, so every plugin output has a static shape):
    R  = S + E * (block_m - 1)      rows of the expert-sorted, block-padded layout
    NB = cdiv(R, block_m)           blocks of block_m rows

    grouped chain (prefill):  moe_route -> moe_align -> moe_swiglu_grouped -> moe_down_grouped -> moe_combine
    decode chain (few tokens): moe_route -> moe_swiglu_decode -> moe_down_combine_decode

| stage                   | inputs                                               | outputs                             |
|-------------------------|------------------------------------------------------|-------------------------------------|
| moe_route               | x [T, hidden], router_weight [E, hidden]; top_k      | topk_weights [T, top_k] fp32,       |
|                         |                                                      | topk_ids [T, top_k] int32           |
| moe_align               | topk_ids; num_experts, block_m                       | sorted_slots [R], inv_perm [S],     |
|                         |                                                      | block_expert [NB], expert_counts    |
|                         |                                                      | [E], expert_offsets [E + 1] (int32) |
| moe_swiglu_grouped      | x, w1 [E, I, hidden], w3, sorted_slots, block_expert;| h [R, I] (x.dtype)                  |
|                         | top_k, block_m                                       |                                     |
| moe_down_grouped        | h, w2 [E, hidden, I], sorted_slots, block_expert,    | y_perm [R, hidden] (h.dtype)        |
|                         | topk_weights; block_m                                |                                     |
| moe_combine             | y_perm, inv_perm; top_k                              | y [T, hidden] (y_perm.dtype)        |
| moe_swiglu_decode       | x, w1, w3, topk_ids                                  | h [S, I] (x.dtype, slot order)      |
| moe_down_combine_decode | h, w2, topk_weights, topk_ids                        | y [T, hidden] (h.dtype)             |

Alignment layout (identical to ``routing.moe_align_triton``): experts' row ranges follow each other in expert
order, each padded to a multiple of block_m rows; inside a range the slots are in slot order; padding rows and the
unused tail hold the sentinel S; block_expert is -1 for blocks past the last used row. Rows of h / y_perm that hold
no slot are unspecified in the kernels; here they are zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import naive

__all__ = [
    "align_sizes",
    "moe_route",
    "moe_align",
    "moe_swiglu_grouped",
    "moe_down_grouped",
    "moe_combine",
    "moe_swiglu_decode",
    "moe_down_combine_decode",
    "moe_forward_stages",
]


def align_sizes(n_slots: int, num_experts: int, block_m: int) -> tuple[int, int]:
    """``(R, NB)``: static bounds of the padded rows and of the row blocks for ``n_slots`` slots."""
    rows = n_slots + num_experts * (block_m - 1)
    return rows, -(-rows // block_m)


def _check_ids(stage: str, topk_ids: Tensor, num_experts: int) -> None:
    if topk_ids.dim() != 2:
        raise ValueError(f"{stage}: topk_ids must be [T, top_k]; got {tuple(topk_ids.shape)}")
    if topk_ids.numel() and (int(topk_ids.min()) < 0 or int(topk_ids.max()) >= num_experts):
        raise ValueError(
            f"{stage}: topk_ids must lie in [0, E={num_experts}); got values in "
            f"[{int(topk_ids.min())}, {int(topk_ids.max())}]"
        )


def _check_block_m(stage: str, block_m: int) -> None:
    if block_m < 1:
        raise ValueError(f"{stage}: block_m must be >= 1; got {block_m}")


def _swiglu(x: Tensor, w1: Tensor, w3: Tensor) -> Tensor:
    """silu(x w1^T) * (x w3^T) in fp32: x [n, hidden], w1/w3 [I, hidden] -> [n, I]."""
    xf = x.float()
    return F.silu(xf @ w1.float().t()) * (xf @ w3.float().t())


def moe_route(x: Tensor, router_weight: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Router: ``(topk_weights [T, top_k] fp32, topk_ids [T, top_k] int32)`` (semantics of ``naive.moe_route``)."""
    if x.dim() != 2 or router_weight.dim() != 2 or router_weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"moe_route: x must be [T, hidden] and router_weight [E, hidden]; got x {tuple(x.shape)}, "
            f"router_weight {tuple(router_weight.shape)}"
        )
    if not 1 <= top_k <= router_weight.shape[0]:
        raise ValueError(f"moe_route: top_k must be in [1, E={router_weight.shape[0]}]; got {top_k}")
    weights, ids = naive.moe_route(x, router_weight, top_k)
    return weights.contiguous(), ids.to(torch.int32).contiguous()


def moe_align(topk_ids: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Group slots by expert: ``(sorted_slots [R], inv_perm [S], block_expert [NB], expert_counts [E],
    expert_offsets [E + 1])``, all int32 (layout in the module docstring)."""
    _check_ids("moe_align", topk_ids, num_experts)
    _check_block_m("moe_align", block_m)
    dev = topk_ids.device
    ids = topk_ids.reshape(-1).long()  # [S]
    n_slots = ids.numel()
    rows, n_blocks = align_sizes(n_slots, num_experts, block_m)
    counts = torch.bincount(ids, minlength=num_experts)  # [E]
    padded = (counts + block_m - 1) // block_m * block_m
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(padded, 0)])  # [E + 1]: first row of each expert
    count_starts = torch.cumsum(counts, 0) - counts  # first position of each expert in the sorted slot list
    order = torch.sort(ids, stable=True).indices  # slots sorted by expert, slot order inside an expert
    expert_of = ids[order]
    rank = torch.arange(n_slots, device=dev) - count_starts[expert_of]
    row = offsets[expert_of] + rank  # [S]: permuted row of the slot order[i]
    sorted_slots = torch.full((rows,), n_slots, dtype=torch.int64, device=dev)
    sorted_slots[row] = order
    inv_perm = torch.empty(n_slots, dtype=torch.int64, device=dev)
    inv_perm[order] = row
    block_start = torch.arange(n_blocks, device=dev) * block_m
    block_expert = torch.searchsorted(offsets[1:], block_start, right=True)  # expert whose range holds the block
    block_expert = torch.where(block_start < offsets[-1], block_expert, -1)
    return tuple(t.to(torch.int32).contiguous() for t in (sorted_slots, inv_perm, block_expert, counts, offsets))


def _row_experts(stage: str, sorted_slots: Tensor, block_expert: Tensor, block_m: int, n_slots: int) -> Tensor:
    """Expert of each permuted row, -1 for rows that hold no slot; checks the alignment tensors' sizes."""
    _check_block_m(stage, block_m)
    rows = sorted_slots.shape[0]
    if sorted_slots.dim() != 1 or block_expert.dim() != 1 or block_expert.shape[0] * block_m < rows:
        raise ValueError(
            f"{stage}: sorted_slots [R] and block_expert [NB >= R / block_m={block_m}] expected; got sorted_slots "
            f"{tuple(sorted_slots.shape)}, block_expert {tuple(block_expert.shape)}"
        )
    slots = sorted_slots.long()
    expert = block_expert.long()[torch.arange(rows, device=slots.device) // block_m]
    return torch.where((slots >= 0) & (slots < n_slots), expert, -1)


def moe_swiglu_grouped(
    x: Tensor, w1: Tensor, w3: Tensor, sorted_slots: Tensor, block_expert: Tensor, top_k: int, block_m: int
) -> Tensor:
    """h [R, I] (x.dtype): row r holds silu(x_t w1_e^T) * (x_t w3_e^T) for its slot s = t * top_k + k and the
    expert e of its block; rows without a slot are zero."""
    T = x.shape[0]
    E, inter = w1.shape[0], w1.shape[1]
    row_expert = _row_experts("moe_swiglu_grouped", sorted_slots, block_expert, block_m, T * top_k)
    tokens = sorted_slots.long() // top_k
    h = torch.zeros((sorted_slots.shape[0], inter), dtype=torch.float32, device=x.device)
    for e in range(E):
        r = torch.nonzero(row_expert == e).flatten()
        if r.numel():
            h[r] = _swiglu(x[tokens[r]], w1[e], w3[e])
    return h.to(x.dtype)


def moe_down_grouped(
    h: Tensor, w2: Tensor, sorted_slots: Tensor, block_expert: Tensor, topk_weights: Tensor, block_m: int
) -> Tensor:
    """y_perm [R, hidden] (h.dtype): row r = topk_weights[s] * (h_r w2_e^T) for its slot s; rows without a slot
    are zero."""
    E, hidden = w2.shape[0], w2.shape[1]
    weights = topk_weights.reshape(-1).float()  # [S]
    row_expert = _row_experts("moe_down_grouped", sorted_slots, block_expert, block_m, weights.numel())
    y = torch.zeros((sorted_slots.shape[0], hidden), dtype=torch.float32, device=h.device)
    for e in range(E):
        r = torch.nonzero(row_expert == e).flatten()
        if r.numel():
            y[r] = (h[r].float() @ w2[e].float().t()) * weights[sorted_slots[r].long()].unsqueeze(-1)
    return y.to(h.dtype)


def moe_combine(y_perm: Tensor, inv_perm: Tensor, top_k: int) -> Tensor:
    """y [T, hidden] (y_perm.dtype): y_t = sum_k y_perm[inv_perm[t * top_k + k]], summed in fp32; a negative
    ``inv_perm`` entry (a slot no expert here took: expert parallelism) adds nothing."""
    if inv_perm.dim() != 1 or inv_perm.numel() % top_k:
        raise ValueError(f"moe_combine: inv_perm must be [T * top_k={top_k}]; got {tuple(inv_perm.shape)}")
    T = inv_perm.numel() // top_k
    rows = inv_perm.long()
    gathered = y_perm.float()[rows.clamp(min=0)]  # [S, hidden], slot order
    gathered = torch.where((rows >= 0).unsqueeze(-1), gathered, 0.0)
    return gathered.view(T, top_k, -1).sum(1).to(y_perm.dtype)


def moe_swiglu_decode(x: Tensor, w1: Tensor, w3: Tensor, topk_ids: Tensor) -> Tensor:
    """h [S, I] (x.dtype, slot order): h_s = silu(x_t w1_e^T) * (x_t w3_e^T), s = t * top_k + k, e = topk_ids[t, k]."""
    _check_ids("moe_swiglu_decode", topk_ids, w1.shape[0])
    top_k = topk_ids.shape[1]
    ids = topk_ids.reshape(-1).long()  # [S]
    h = torch.zeros((ids.numel(), w1.shape[1]), dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():
        s = torch.nonzero(ids == e).flatten()
        h[s] = _swiglu(x[s // top_k], w1[e], w3[e])
    return h.to(x.dtype)


def moe_down_combine_decode(h: Tensor, w2: Tensor, topk_weights: Tensor, topk_ids: Tensor) -> Tensor:
    """y [T, hidden] (h.dtype): y_t = sum_k topk_weights[t, k] * (h_{t * top_k + k} w2_e^T), summed in fp32."""
    _check_ids("moe_down_combine_decode", topk_ids, w2.shape[0])
    T, top_k = topk_ids.shape
    ids = topk_ids.reshape(-1).long()
    weights = topk_weights.reshape(-1).float()
    y_slots = torch.zeros((ids.numel(), w2.shape[1]), dtype=torch.float32, device=h.device)
    for e in ids.unique().tolist():
        s = torch.nonzero(ids == e).flatten()
        y_slots[s] = (h[s].float() @ w2[e].float().t()) * weights[s].unsqueeze(-1)
    return y_slots.view(T, top_k, -1).sum(1).to(h.dtype)


def moe_forward_stages(
    x: Tensor, router_weight: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, top_k: int, *, path: str, block_m: int = 16
) -> Tensor:
    """The whole chain: ``path="grouped"`` (route, align, swiglu_grouped, down_grouped, combine) or ``"decode"``
    (route, swiglu_decode, down_combine_decode). Equals ``naive.moe_forward``."""
    naive.check_moe_inputs(x, router_weight, w1, w3, w2, top_k)
    topk_weights, topk_ids = moe_route(x, router_weight, top_k)
    if path == "decode":
        h = moe_swiglu_decode(x, w1, w3, topk_ids)
        return moe_down_combine_decode(h, w2, topk_weights, topk_ids)
    if path != "grouped":
        raise ValueError(f"moe_forward_stages: path must be 'grouped' or 'decode'; got {path!r}")
    sorted_slots, inv_perm, block_expert, _, _ = moe_align(topk_ids, w1.shape[0], block_m)
    h = moe_swiglu_grouped(x, w1, w3, sorted_slots, block_expert, top_k, block_m)
    y_perm = moe_down_grouped(h, w2, sorted_slots, block_expert, topk_weights, block_m)
    return moe_combine(y_perm, inv_perm, top_k)
