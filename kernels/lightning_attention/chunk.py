"""Triton prefill for lightning attention: one pass over q, k, v with the fp32 state carried on chip.

Semantics are those of ``naive.py`` (o_t = q_t S_t, S_t = exp(-s) S_{t-1} + k_t^T v_t, S_{-1} = S0).

Design: one program per (batch, head, slice of BLOCK_V value columns). It walks the sequence in blocks of
BLOCK_T tokens, in order, keeping its [Dk, BLOCK_V] slice of the state in fp32 registers. For a block of m tokens
starting after state S (in-block positions j, i, 0-based):

    o[j] = sum_{i<=j} exp(-s (j-i)) (q_j . k_i) v_i        intra: (q k^T * decay mask) @ v   (tensor cores)
         + exp(-s (j+1)) (q_j S)                           inter: row-scaled q @ S        (tensor cores)
    S   <- exp(-s m) S + k^T (exp(-s (m-1-i)) v_i)          the key weights are folded into v (smaller than k)

so q, k, v are read once (k and q once per value slice; the slices of one head run side by side and share them
through L2), o is written once, and the state is read and written once per call. There is no inter-block state
buffer in global memory (the chunked scheme of FLA writes one [Dk, Dv] state per 64-token chunk).

Precision: products accumulate in fp32; the operands of the tensor-core products are in the input dtype (so the
state S and the masked score matrix are rounded to bf16/fp16 for the product, as FLA does), fp32 inputs use
``tf32x3`` on the GPU (close to fp32) and exact fp32 under ``TRITON_INTERPRET=1``.

Any T (the last block is masked), any B, strided q/k/v (last dim contiguous), Dk and Dv powers of two (16..256).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["PrefillConfig", "default_prefill_config", "lightning_prefill_triton", "supports_head_dims"]

_LOG2E = 1.4426950408889634


@triton.jit
def _lightning_prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    s_ptr,
    state_in_ptr,
    o_ptr,
    state_out_ptr,
    T,
    H,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_ob,
    stride_ot,
    stride_oh,
    stride_sb,
    stride_sh,
    stride_sk,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    HAS_INITIAL_STATE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    pid_v = tl.program_id(0)  # value slice: fastest, so the slices of one head run together and share q, k in L2
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H

    offs_t = tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, DK)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)

    # log2 of the per-step decay: exp(-s x) = exp2(neg_rate x)
    neg_rate = -tl.load(s_ptr + h).to(tl.float32) * 1.4426950408889634
    diff = (offs_t[:, None] - offs_t[None, :]).to(tl.float32)  # query minus key position
    intra_decay = tl.where(diff >= 0, tl.exp2(neg_rate * tl.maximum(diff, 0.0)), 0.0)  # [BLOCK_T, BLOCK_T]
    q_decay = tl.exp2(neg_rate * (offs_t + 1).to(tl.float32))  # [BLOCK_T]: weight of S for query j

    q_base = q_ptr + b * stride_qb + h * stride_qh
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    o_base = o_ptr + b * stride_ob + h * stride_oh

    state_offs = offs_k[:, None] * stride_sk + offs_v[None, :]  # [DK, BLOCK_V]
    if HAS_INITIAL_STATE:
        state = tl.load(state_in_ptr + b * stride_sb + h * stride_sh + state_offs).to(tl.float32)
    else:
        state = tl.zeros((DK, BLOCK_V), dtype=tl.float32)

    for t0 in tl.range(0, T, BLOCK_T, num_stages=NUM_STAGES):
        rows = t0 + offs_t
        valid = rows < T
        q = tl.load(q_base + rows[:, None] * stride_qt + offs_k[None, :], mask=valid[:, None], other=0.0)
        k = tl.load(k_base + rows[:, None] * stride_kt + offs_k[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_base + rows[:, None] * stride_vt + offs_v[None, :], mask=valid[:, None], other=0.0)

        # inter: contribution of everything before this block, through the state
        acc = tl.dot(q, state.to(q.dtype), input_precision=DOT_PRECISION)  # [BLOCK_T, BLOCK_V]
        acc = acc * q_decay[:, None]
        # intra: causal, decay-masked scores of this block
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * intra_decay  # [BLOCK_T, BLOCK_T]
        acc = tl.dot(scores.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        tl.store(o_base + rows[:, None] * stride_ot + offs_v[None, :], acc.to(o_ptr.dtype.element_ty), mask=valid[:, None])

        # state update; m = valid tokens in this block (BLOCK_T except for the last one)
        m = tl.minimum(T - t0, BLOCK_T).to(tl.float32)
        key_pos = tl.maximum(m - 1.0 - offs_t.to(tl.float32), 0.0)  # distance to the block's last valid key
        key_weight = tl.where(valid, tl.exp2(neg_rate * key_pos), 0.0)  # [BLOCK_T]
        v_weighted = (v * key_weight[:, None]).to(k.dtype)
        state = state * tl.exp2(neg_rate * m) + tl.dot(tl.trans(k), v_weighted, input_precision=DOT_PRECISION)

    tl.store(state_out_ptr + pid_bh * DK * DV + offs_k[:, None] * DV + offs_v[None, :], state)


@dataclass(frozen=True)
class PrefillConfig:
    """Launch parameters of the prefill kernel (a tuning choice; every choice gives the same result)."""

    block_t: int = 64
    block_v: int = 64
    num_warps: int = 4
    num_stages: int = 3


def default_prefill_config(
    batch: int, heads: int, dk: int, dv: int, dtype: torch.dtype, device: torch.device
) -> PrefillConfig:
    """Launch parameters for a shape (small blocks under the CPU interpreter)."""
    if device.type != "cuda":
        return PrefillConfig(block_t=16, block_v=min(dv, 16), num_warps=1, num_stages=1)
    block_t, block_v = 64, min(dv, 64)
    # each pipeline stage holds one block of q, k (block_t x dk) and v (block_t x block_v) in shared memory:
    # 40 KB for bf16 at dk=128, 80 KB for fp32; keep the stages within ~180 KB of the H100's 227 KB
    stage_bytes = block_t * (2 * dk + block_v) * dtype.itemsize
    # H100, B=1, H=64, D=128, bf16 sweep (benchmarks/results/lightning_2026-11-26_sweep.json): 64-token blocks,
    # 64 value columns (2 programs per head), 4 warps, 3 pipeline stages reached 78 % (16K) / 86 % (64K) of copy
    # bandwidth; 2 stages 51-57 %, 8 warps or 128 value columns 38-64 %.
    return PrefillConfig(block_t, block_v, num_warps=4, num_stages=max(1, min(3, (180 << 10) // stage_bytes)))


def _is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def supports_head_dims(dk: int, dv: int) -> bool:
    """Whether the Triton kernels take these head dims (powers of two in [16, 256]: tl.dot needs >= 16)."""
    return all(_is_pow2(d) and 16 <= d <= 256 for d in (dk, dv))


def lightning_prefill_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    s: Tensor,
    initial_state: Tensor | None = None,
    config: PrefillConfig | None = None,
    out: Tensor | None = None,
    final_state_out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Causal lightning attention over a chunk of tokens.

    q, k [B, T, H, Dk]; v [B, T, H, Dv] (bf16, fp16 or fp32, any strides; the last dim is made contiguous if it is
    not); s [H] fp32 decay rates; initial_state [B, H, Dk, Dv] fp32 or None (zeros).
    Returns ``(o [B, T, H, Dv] in q.dtype, contiguous; final_state [B, H, Dk, Dv] fp32, contiguous)``, new tensors
    unless preallocated contiguous ``out`` / ``final_state_out`` are given (``final_state_out`` may be
    ``initial_state`` itself: each program reads its state slice before the loop and writes it after).
    """
    B, T, H, DK = q.shape
    DV = v.shape[-1]
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"lightning prefill: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit")
    if not supports_head_dims(DK, DV):
        raise ValueError(f"lightning prefill (triton): head dims must be powers of two in [16, 256]; got {DK}, {DV}")
    if T == 0:
        raise ValueError("lightning prefill: the sequence is empty (T = 0)")
    if s.shape != (H,):
        raise ValueError(f"lightning prefill: s must be [H={H}]; got {tuple(s.shape)}")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    k, v = k.to(q.dtype), v.to(q.dtype)
    s = s.float().contiguous()
    if initial_state is not None:
        if initial_state.shape != (B, H, DK, DV):
            raise ValueError(f"lightning prefill: initial_state {tuple(initial_state.shape)} != {(B, H, DK, DV)}")
        initial_state = initial_state.float()
        if initial_state.stride(-1) != 1:
            initial_state = initial_state.contiguous()
    cfg = config or default_prefill_config(B, H, DK, DV, q.dtype, q.device)
    block_v = min(cfg.block_v, DV)

    if out is None:
        out = torch.empty(B, T, H, DV, dtype=q.dtype, device=q.device)  # [B, T, H, Dv]
    elif out.shape != (B, T, H, DV) or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError(f"lightning prefill: out must be contiguous {q.dtype} {(B, T, H, DV)}")
    if final_state_out is None:
        final_state_out = torch.empty(B, H, DK, DV, dtype=torch.float32, device=q.device)  # [B, H, Dk, Dv]
    elif (
        final_state_out.shape != (B, H, DK, DV)
        or final_state_out.dtype != torch.float32
        or not final_state_out.is_contiguous()
    ):
        raise ValueError(f"lightning prefill: final_state_out must be contiguous fp32 {(B, H, DK, DV)}")
    o, final_state = out, final_state_out
    state_in = initial_state if initial_state is not None else final_state  # dummy pointer when absent
    precision = "tf32x3" if (q.dtype == torch.float32 and q.device.type == "cuda") else "tf32"
    grid = (DV // block_v, B * H)
    _lightning_prefill_kernel[grid](
        q,
        k,
        v,
        s,
        state_in,
        o,
        final_state,
        T,
        H,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        o.stride(0),
        o.stride(1),
        o.stride(2),
        state_in.stride(0),
        state_in.stride(1),
        state_in.stride(2),
        DK=DK,
        DV=DV,
        BLOCK_T=cfg.block_t,
        BLOCK_V=block_v,
        HAS_INITIAL_STATE=initial_state is not None,
        DOT_PRECISION=precision,
        NUM_STAGES=cfg.num_stages,
        num_warps=cfg.num_warps,
    )
    return o, final_state
