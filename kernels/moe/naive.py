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

Quantized experts (``build.py --quantize``; routing unchanged, router in fp32 as above). Each expert matrix W
[out, in] (w1_e, w3_e: [I, hidden]; w2_e: [hidden, I]) is stored as Q [out, in] with one fp32 scale per output
channel s [out] (the rows of the nn.Linear layout):
    experts-int8 (W8A16, vLLM's ``experts_int8``):  s = absmax(W[o, :]) / 127,  Q = clamp(round(W / s), -127, 127) int8
    experts-fp8  (weights, e4m3):                    s = absmax(W[o, :]) / 448,  Q = float8_e4m3fn(W / s)
(an all-zero row has s = 1 and Q = 0). Dequantized: W~[o, i] = Q[o, i] * s[o]. With per-output-channel scales the
scale factors out of each dot product: x . W~[o, :] = s[o] * (x . Q[o, :]), so kernels multiply their fp32
accumulators by s once per output column, after the K loop ("dequantisation in registers").
    W8A16: y = the formula above with W~ in place of W, activations as they are.
    W8A8 (fp8 weights and activations): before each expert GEMM its input rows (x_t for w1/w3, the SwiGLU output
    h for w2) are quantized per row: a[t] = absmax(row_t) / 448, row_q = float8_e4m3fn(row_t / a[t]) (a = 1 for an
    all-zero row); the product is a[t] * s[o] * (row_q . Q[o, :]), accumulated in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["moe_route", "moe_experts", "moe_forward", "check_moe_inputs", "QUANT_MODES", "quantize_weight",
           "dequantize_weight", "quantize_rows_fp8", "check_quantized_experts", "moe_experts_quantized",
           "moe_forward_quantized"]

QUANT_MODES = ("experts-int8", "experts-fp8")
_QMAX = {"experts-int8": 127.0, "experts-fp8": 448.0}  # 448: the largest finite float8_e4m3fn


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


def moe_forward_ep(x: Tensor, router_weight: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, top_k: int,
                   expert_start: int, scales: tuple[Tensor, Tensor, Tensor] | None = None,
                   mode: str = "none") -> Tensor:
    """One rank's share of an expert-parallel MoE: route over all ``router_weight.shape[0]`` experts (as the
    unsplit block does), then run only the experts this rank holds, ``expert_start .. expert_start + E_local - 1``
    (``w1.shape[0]`` of them; quantized with ``scales`` (s1, s3, s2) in ``mode``): the sum over the ranks of their
    outputs is ``moe_forward``. ``[T, hidden] -> [T, hidden]`` in the dtype of x."""
    E, E_local = router_weight.shape[0], w1.shape[0]
    if not 0 <= expert_start <= E - E_local:
        raise ValueError(f"moe (expert parallel): experts {expert_start}..{expert_start + E_local - 1} are outside "
                         f"the router's {E}")
    if x.dim() != 2 or router_weight.shape[1] != x.shape[1]:
        raise ValueError(f"moe (expert parallel): x [T, hidden] and router_weight [E, hidden] expected; got "
                         f"{tuple(x.shape)}, {tuple(router_weight.shape)}")
    weights, ids = moe_route(x, router_weight, top_k)
    local = ids - expert_start  # ids of other ranks' experts fall outside 0..E_local-1: no expert takes them
    if scales is None:
        return moe_experts(x, weights, local, w1, w3, w2)
    return moe_experts_quantized(x, weights, local, w1, scales[0], w3, scales[1], w2, scales[2], mode)


# ------------------------------------------------------------------------------------------------ quantized experts


def _check_mode(mode: str) -> None:
    if mode not in QUANT_MODES:
        raise ValueError(f"moe: unknown quantization {mode!r}; available: {', '.join(QUANT_MODES)}")


def _row_scale(w: Tensor, qmax: float) -> Tensor:
    amax = w.abs().amax(dim=-1)
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def quantize_weight(w: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """``w [..., out, in]`` (any float dtype) -> ``(q [..., out, in], scale [..., out] fp32)`` per output channel:
    int8 for ``experts-int8``, ``float8_e4m3fn`` for ``experts-fp8`` (see the module doc)."""
    _check_mode(mode)
    wf = w.float()
    scale = _row_scale(wf, _QMAX[mode])
    scaled = wf / scale[..., None]
    if mode == "experts-int8":
        q = torch.round(scaled).clamp_(-127, 127).to(torch.int8)
    else:
        q = scaled.clamp_(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_weight(q: Tensor, scale: Tensor) -> Tensor:
    """``q [..., out, in]``, ``scale [..., out]`` -> fp32 ``q * scale`` (the weights the quantized experts use)."""
    return q.float() * scale.float()[..., None]


def quantize_rows_fp8(a: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row fp8 quantization of activations (W8A8): ``a [R, K]`` -> ``(a_q [R, K] e4m3, scale [R] fp32)``."""
    af = a.float()
    scale = _row_scale(af, 448.0)
    return (af / scale[:, None]).clamp_(-448.0, 448.0).to(torch.float8_e4m3fn), scale


def _fake_quant_rows(a: Tensor) -> Tensor:
    """``a`` after the W8A8 activation round trip, in fp32: ``a_q * scale``."""
    q, scale = quantize_rows_fp8(a)
    return q.float() * scale[:, None]


def check_quantized_experts(w1: Tensor, s1: Tensor, w3: Tensor, s3: Tensor, w2: Tensor, s2: Tensor,
                            mode: str) -> None:
    """Raise ``ValueError`` naming the tensor whose dtype or shape does not fit ``mode`` (weights [E, out, in] of
    int8 / float8_e4m3fn, scales [E, out] fp32)."""
    _check_mode(mode)
    want = torch.int8 if mode == "experts-int8" else torch.float8_e4m3fn
    for name, q, sc in (("w1", w1, s1), ("w3", w3, s3), ("w2", w2, s2)):
        if q.dtype != want:
            raise ValueError(f"moe ({mode}): {name} must be {want}; got {q.dtype}")
        if sc.dtype != torch.float32 or sc.shape != q.shape[:2]:
            raise ValueError(f"moe ({mode}): {name}_scale must be fp32 [E, out] = {tuple(q.shape[:2])}; got "
                             f"{sc.dtype} {tuple(sc.shape)}")


def moe_experts_quantized(x: Tensor, weights: Tensor, ids: Tensor, w1: Tensor, s1: Tensor, w3: Tensor, s3: Tensor,
                          w2: Tensor, s2: Tensor, mode: str) -> Tensor:
    """``moe_experts`` over quantized expert weights (module doc), in fp32; returns x.dtype."""
    check_quantized_experts(w1, s1, w3, s3, w2, s2, mode)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    xf = x.float()
    for e in range(w1.shape[0]):
        token, slot = torch.nonzero(ids == e, as_tuple=True)
        if token.numel() == 0:
            continue
        xe = xf[token]
        if mode == "experts-fp8":
            xe = _fake_quant_rows(xe)
        h = F.silu(xe @ dequantize_weight(w1[e], s1[e]).t()) * (xe @ dequantize_weight(w3[e], s3[e]).t())
        # h is held in the activations' dtype between the two products (as the kernels hold it), and W8A8
        # quantizes that value: a bf16 h and an fp32 h round to different e4m3 values in ~3 % of elements
        h = h.to(x.dtype).float()
        if mode == "experts-fp8":
            h = _fake_quant_rows(h)
        ye = h @ dequantize_weight(w2[e], s2[e]).t()
        out.index_add_(0, token, ye * weights[token, slot].unsqueeze(-1))
    return out.to(x.dtype)


def moe_forward_quantized(x: Tensor, router_weight: Tensor, w1: Tensor, s1: Tensor, w3: Tensor, s3: Tensor,
                          w2: Tensor, s2: Tensor, top_k: int, mode: str) -> Tensor:
    """Route (unchanged) and run the quantized experts: ``[T, hidden] -> [T, hidden]`` in the dtype of x."""
    check_moe_inputs(x, router_weight, w1, w3, w2, top_k)
    weights, ids = moe_route(x, router_weight, top_k)
    return moe_experts_quantized(x, weights, ids, w1, s1, w3, s3, w2, s2, mode)
