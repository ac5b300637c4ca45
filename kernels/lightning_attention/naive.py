"""Reference lightning attention (MiniMax-01 linear attention with a per-head constant decay).

This file is the specification every fast kernel is tested against. Everything is computed in fp32.

Notation (shapes):
    q, k      [B, T, H, Dk]   queries and keys (any float dtype; SiLU already applied by the layer)
    v         [B, T, H, Dv]   values
    s         [H]  fp32       decay rate per head; the per-step decay factor is exp(-s)
    state     [B, H, Dk, Dv] fp32   S, the running sum of decayed outer products k_u^T v_u
    o         [B, T, H, Dv]   output, in the dtype of q

Semantics (t counted from 0 inside the call, S0 the initial state):
    S_t = exp(-s) * S_{t-1} + k_t^T v_t                       (S_{-1} = S0)
    o_t = q_t S_t
        = sum_{u<=t} exp(-s (t-u)) (q_t . k_u) v_u  +  exp(-s (t+1)) q_t S0
and the final state is S_{T-1}. Hence calling a prefill on two halves with the state carried equals one call on
the whole sequence, and a decode step is a prefill of length 1.

Three algebraically equal forms are given:
    * ``lightning_attention_quadratic``: the masked O(T^2) form;
    * ``lightning_attention_blockwise``: MiniMax's intra-block (decay-masked) / inter-block (through the running
      state) form with any block size (Paper-01 Algorithm 1; HF remote code ``inference``);
    * ``lightning_attention_recurrent``: the token-by-token recurrence, of which
      ``lightning_attention_decode_step`` is one step.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "lightning_attention_quadratic",
    "lightning_attention_blockwise",
    "lightning_attention_recurrent",
    "lightning_attention_decode_step",
    "check_lightning_inputs",
]


def check_lightning_inputs(q: Tensor, k: Tensor, v: Tensor, s: Tensor, state: Tensor | None) -> None:
    """Raise ``ValueError`` naming the tensor whose shape or dtype does not fit the layout above."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"lightning attention: q, k, v must be [B, T, H, D]; got q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    if q.shape != k.shape:
        raise ValueError(f"lightning attention: q {tuple(q.shape)} and k {tuple(k.shape)} must have the same shape")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"lightning attention: v {tuple(v.shape)} must match q {tuple(q.shape)} in [B, T, H]"
        )
    B, _, H, Dk = q.shape
    Dv = v.shape[-1]
    if s.shape != (H,) or s.dtype != torch.float32:
        raise ValueError(f"lightning attention: s must be fp32 [H={H}]; got {s.dtype} {tuple(s.shape)}")
    if state is not None and (state.shape != (B, H, Dk, Dv) or state.dtype != torch.float32):
        raise ValueError(
            f"lightning attention: state must be fp32 [B={B}, H={H}, Dk={Dk}, Dv={Dv}]; "
            f"got {state.dtype} {tuple(state.shape)}"
        )


def _heads_first(x: Tensor) -> Tensor:
    return x.float().transpose(1, 2)  # [B, T, H, D] -> [B, H, T, D] fp32


def _zero_state(q: Tensor, v: Tensor) -> Tensor:
    B, _, H, Dk = q.shape
    return torch.zeros(B, H, Dk, v.shape[-1], dtype=torch.float32, device=q.device)


def lightning_attention_quadratic(
    q: Tensor, k: Tensor, v: Tensor, s: Tensor, initial_state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Masked quadratic form. Returns ``(o [B, T, H, Dv] in q.dtype, final_state [B, H, Dk, Dv] fp32)``."""
    check_lightning_inputs(q, k, v, s, initial_state)
    T = q.shape[1]
    qh, kh, vh = _heads_first(q), _heads_first(k), _heads_first(v)  # [B, H, T, D]
    s3 = s.float().view(-1, 1, 1)  # [H, 1, 1]
    t = torch.arange(T, device=q.device, dtype=torch.float32)
    diff = t[:, None] - t[None, :]  # [T, T] (query - key)
    decay = torch.where(diff >= 0, torch.exp(-s3 * diff.clamp(min=0)), torch.zeros((), device=q.device))  # [H, T, T]
    o = ((qh @ kh.transpose(-1, -2)) * decay) @ vh  # [B, H, T, Dv]
    key_weight = torch.exp(-s3 * (T - 1 - t)[None, :, None])  # [H, T, 1]: weight of key u in the final state
    state = (kh * key_weight).transpose(-1, -2) @ vh  # [B, H, Dk, Dv]
    if initial_state is not None:
        query_weight = torch.exp(-s3 * (t + 1)[None, :, None])  # [H, T, 1]
        o = o + (qh * query_weight) @ initial_state
        state = state + torch.exp(-s.float() * T).view(-1, 1, 1) * initial_state
    return o.transpose(1, 2).to(q.dtype).contiguous(), state.contiguous()


def lightning_attention_blockwise(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    s: Tensor,
    initial_state: Tensor | None = None,
    block_size: int = 256,
) -> tuple[Tensor, Tensor]:
    """Intra-block / inter-block form (any ``block_size`` >= 1; the last block may be partial).

    Inside a block of length m starting at token b0 (j, i in-block positions, 0-based):
        o_intra[j] = sum_{i<=j} exp(-s (j-i)) (q_j . k_i) v_i
        o_inter[j] = exp(-s (j+1)) q_j S            (S: state after token b0-1)
        S         <- exp(-s m) S + sum_i exp(-s (m-1-i)) k_i^T v_i
    Returns ``(o [B, T, H, Dv] in q.dtype, final_state [B, H, Dk, Dv] fp32)``.
    """
    check_lightning_inputs(q, k, v, s, initial_state)
    if block_size < 1:
        raise ValueError(f"lightning attention: block_size must be >= 1, got {block_size}")
    T = q.shape[1]
    qh, kh, vh = _heads_first(q), _heads_first(k), _heads_first(v)
    state = _zero_state(q, v) if initial_state is None else initial_state.float().clone()
    s3 = s.float().view(-1, 1, 1)  # [H, 1, 1]
    outputs = []
    for b0 in range(0, T, block_size):
        m = min(block_size, T - b0)
        qb, kb, vb = qh[:, :, b0 : b0 + m], kh[:, :, b0 : b0 + m], vh[:, :, b0 : b0 + m]  # [B, H, m, D]
        j = torch.arange(m, device=q.device, dtype=torch.float32)
        diff = j[:, None] - j[None, :]
        diag = torch.where(diff >= 0, torch.exp(-s3 * diff.clamp(min=0)), torch.zeros((), device=q.device))
        o_intra = ((qb @ kb.transpose(-1, -2)) * diag) @ vb
        o_inter = (qb * torch.exp(-s3 * (j + 1)[None, :, None])) @ state
        outputs.append(o_intra + o_inter)
        key_weight = torch.exp(-s3 * (m - 1 - j)[None, :, None])  # [H, m, 1]
        state = torch.exp(-s3 * m) * state + (kb * key_weight).transpose(-1, -2) @ vb
    o = torch.cat(outputs, dim=2)  # [B, H, T, Dv]
    return o.transpose(1, 2).to(q.dtype).contiguous(), state.contiguous()


def lightning_attention_decode_step(
    q: Tensor, k: Tensor, v: Tensor, s: Tensor, state: Tensor
) -> tuple[Tensor, Tensor]:
    """One recurrent step for a batch of single tokens.

    q, k, v [B, 1, H, D]; state [B, H, Dk, Dv] fp32 (not modified).
    Returns ``(o [B, 1, H, Dv] in q.dtype, new_state [B, H, Dk, Dv] fp32)`` with
    ``new_state = exp(-s) state + k^T v`` and ``o = q new_state``.
    """
    check_lightning_inputs(q, k, v, s, state)
    if q.shape[1] != 1:
        raise ValueError(f"lightning decode: expected one token per sequence, got q {tuple(q.shape)}")
    qh, kh, vh = _heads_first(q), _heads_first(k), _heads_first(v)  # [B, H, 1, D]
    new_state = torch.exp(-s.float()).view(-1, 1, 1) * state.float() + kh.transpose(-1, -2) @ vh
    o = qh @ new_state  # [B, H, 1, Dv]
    return o.transpose(1, 2).to(q.dtype).contiguous(), new_state.contiguous()


def lightning_attention_recurrent(
    q: Tensor, k: Tensor, v: Tensor, s: Tensor, initial_state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Token-by-token recurrence (the definition). Same returns as the other forms."""
    check_lightning_inputs(q, k, v, s, initial_state)
    state = _zero_state(q, v) if initial_state is None else initial_state.float()
    outputs = []
    for t in range(q.shape[1]):
        o_t, state = lightning_attention_decode_step(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], s, state)
        outputs.append(o_t)
    return torch.cat(outputs, dim=1), state
