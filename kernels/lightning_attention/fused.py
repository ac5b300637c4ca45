"""Lightning prefill with SiLU applied on load: the experiment behind the README's "Fusion" section.

``lightning_prefill_silu_triton(q, k, v, s, initial_state, token_positions)`` takes the *pre-activation* q, k, v
(views of ``qkv_proj(x)``) and computes what ``chunk.py`` computes on ``silu(q), silu(k), silu(v)``, with k and v
zeroed at left pads (``token_positions < 0``, as ``LightningAttention`` does with ``torch.where``; SiLU(0) = 0, so
zeroing before or after the activation is the same). The kernel is a copy of ``chunk.py``'s prefill with three
changes: SiLU on the q, k, v tiles right after they are loaded (fp32, rounded back to the input dtype, i.e. the
values the separate SiLU kernel would have written), k and v zeroed at pads after the load, and a
``minimax::lightning_prefill_silu`` custom op around it so that ``torch.compile`` / ``torch.export`` keep it as one
node (reference on every device, Triton on CUDA).

It removes the standalone SiLU (+ pad ``where``) pointwise kernel over ``[B, T, 3 H D]`` from the layer; whether
that pays is measured by ``benchmarks/fusion.py`` (numbers in the README). The model does not use it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from . import naive
from .chunk import default_prefill_config, PrefillConfig, supports_head_dims
from .op import REFERENCE_BLOCK_SIZE

__all__ = ["lightning_prefill_silu_reference", "lightning_prefill_silu_triton"]


@triton.jit
def _silu(x, APPLY: tl.constexpr):
    if APPLY:
        xf = x.to(tl.float32)
        return (xf * tl.sigmoid(xf)).to(x.dtype)
    return x


@triton.jit
def _lightning_prefill_silu_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    s_ptr,
    pos_ptr,
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
    stride_pb,
    stride_sb,
    stride_sh,
    stride_sk,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    HAS_INITIAL_STATE: tl.constexpr,
    HAS_POSITIONS: tl.constexpr,
    APPLY_SILU: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    pid_v = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H

    offs_t = tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, DK)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)

    neg_rate = -tl.load(s_ptr + h).to(tl.float32) * 1.4426950408889634
    diff = (offs_t[:, None] - offs_t[None, :]).to(tl.float32)
    intra_decay = tl.where(diff >= 0, tl.exp2(neg_rate * tl.maximum(diff, 0.0)), 0.0)  # [BLOCK_T, BLOCK_T]
    q_decay = tl.exp2(neg_rate * (offs_t + 1).to(tl.float32))  # [BLOCK_T]

    q_base = q_ptr + b * stride_qb + h * stride_qh
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    o_base = o_ptr + b * stride_ob + h * stride_oh

    state_offs = offs_k[:, None] * stride_sk + offs_v[None, :]
    if HAS_INITIAL_STATE:
        state = tl.load(state_in_ptr + b * stride_sb + h * stride_sh + state_offs).to(tl.float32)
    else:
        state = tl.zeros((DK, BLOCK_V), dtype=tl.float32)

    for t0 in tl.range(0, T, BLOCK_T, num_stages=NUM_STAGES):
        rows = t0 + offs_t
        valid = rows < T
        # SiLU on load; masked rows load 0 and SiLU(0) = 0, so the tail stays exactly zero. The pad mask is applied
        # after the load (not as its mask), so the k/v loads do not depend on the positions load and stay pipelined.
        q = _silu(tl.load(q_base + rows[:, None] * stride_qt + offs_k[None, :], mask=valid[:, None], other=0.0), APPLY_SILU)
        k = _silu(tl.load(k_base + rows[:, None] * stride_kt + offs_k[None, :], mask=valid[:, None], other=0.0), APPLY_SILU)
        v = _silu(tl.load(v_base + rows[:, None] * stride_vt + offs_v[None, :], mask=valid[:, None], other=0.0), APPLY_SILU)
        if HAS_POSITIONS:
            real = tl.load(pos_ptr + b * stride_pb + rows, mask=valid, other=-1) >= 0
            k = tl.where(real[:, None], k, 0.0).to(k.dtype)
            v = tl.where(real[:, None], v, 0.0).to(v.dtype)

        acc = tl.dot(q, state.to(q.dtype), input_precision=DOT_PRECISION) * q_decay[:, None]
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * intra_decay
        acc = tl.dot(scores.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        tl.store(o_base + rows[:, None] * stride_ot + offs_v[None, :], acc.to(o_ptr.dtype.element_ty), mask=valid[:, None])

        m = tl.minimum(T - t0, BLOCK_T).to(tl.float32)
        key_pos = tl.maximum(m - 1.0 - offs_t.to(tl.float32), 0.0)
        key_weight = tl.where(valid, tl.exp2(neg_rate * key_pos), 0.0)
        v_weighted = (v * key_weight[:, None]).to(k.dtype)
        state = state * tl.exp2(neg_rate * m) + tl.dot(tl.trans(k), v_weighted, input_precision=DOT_PRECISION)

    tl.store(state_out_ptr + pid_bh * DK * DV + offs_k[:, None] * DV + offs_v[None, :], state)


def _check(q: Tensor, k: Tensor, v: Tensor, s: Tensor, initial_state: Tensor | None, token_positions: Tensor | None):
    B, T, H, DK = q.shape
    DV = v.shape[-1]
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"lightning prefill (fused SiLU): q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "do not fit")
    if T == 0:
        raise ValueError("lightning prefill (fused SiLU): the sequence is empty (T = 0)")
    if s.shape != (H,):
        raise ValueError(f"lightning prefill (fused SiLU): s must be [H={H}]; got {tuple(s.shape)}")
    if initial_state is not None and initial_state.shape != (B, H, DK, DV):
        raise ValueError(f"lightning prefill (fused SiLU): initial_state {tuple(initial_state.shape)} != "
                         f"{(B, H, DK, DV)}")
    if token_positions is not None and token_positions.shape != (B, T):
        raise ValueError(f"lightning prefill (fused SiLU): token_positions {tuple(token_positions.shape)} != {(B, T)}")


def lightning_prefill_silu_reference(
    q: Tensor, k: Tensor, v: Tensor, s: Tensor, initial_state: Tensor | None = None, token_positions: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The unfused computation (what the model does): SiLU, zero k/v at pads, ``naive`` blockwise prefill."""
    _check(q, k, v, s, initial_state, token_positions)
    q, k, v = F.silu(q), F.silu(k), F.silu(v)
    if token_positions is not None:
        real = (token_positions >= 0)[:, :, None, None]
        k = torch.where(real, k, torch.zeros((), dtype=k.dtype, device=k.device))
        v = torch.where(real, v, torch.zeros((), dtype=v.dtype, device=v.device))
    if initial_state is None:
        initial_state = naive._zero_state(q, v)
    return naive.lightning_attention_blockwise(q, k, v, s, initial_state, block_size=REFERENCE_BLOCK_SIZE)


def lightning_prefill_silu_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    s: Tensor,
    initial_state: Tensor | None = None,
    token_positions: Tensor | None = None,
    config: PrefillConfig | None = None,
    out: Tensor | None = None,
    apply_silu: bool = True,
) -> tuple[Tensor, Tensor]:
    """Prefill on ``silu(q), silu(k), silu(v)`` (k, v zero where ``token_positions < 0``), SiLU done in the kernel.

    q, k [B, T, H, Dk], v [B, T, H, Dv]: pre-activation, any strides with a contiguous last dim (e.g. views of the
    interleaved ``qkv_proj`` output); s [H] fp32; initial_state [B, H, Dk, Dv] fp32 or None; token_positions [B, T]
    int or None. ``apply_silu=False`` skips the activation (benchmark diagnostics only). Returns ``(o [B, T, H, Dv] in q.dtype, final_state [B, H, Dk, Dv] fp32)``, as ``chunk.py``.
    """
    _check(q, k, v, s, initial_state, token_positions)
    B, T, H, DK = q.shape
    DV = v.shape[-1]
    if not supports_head_dims(DK, DV):
        raise ValueError(f"lightning prefill (fused SiLU): head dims must be powers of two in [16, 256]; got {DK}, {DV}")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    k, v = k.to(q.dtype), v.to(q.dtype)
    s = s.float().contiguous()
    if initial_state is not None:
        initial_state = initial_state.float()
        if initial_state.stride(-1) != 1:
            initial_state = initial_state.contiguous()
    if token_positions is not None and token_positions.stride(-1) != 1:
        token_positions = token_positions.contiguous()
    cfg = config or default_prefill_config(B, H, DK, DV, q.dtype, q.device)
    block_v = min(cfg.block_v, DV)
    if out is None:
        out = torch.empty(B, T, H, DV, dtype=q.dtype, device=q.device)  # [B, T, H, Dv]
    elif out.shape != (B, T, H, DV) or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError(f"lightning prefill (fused SiLU): out must be contiguous {q.dtype} {(B, T, H, DV)}")
    final_state = torch.empty(B, H, DK, DV, dtype=torch.float32, device=q.device)  # [B, H, Dk, Dv]
    state_in = initial_state if initial_state is not None else final_state  # dummy pointer when absent
    pos = token_positions if token_positions is not None else s  # dummy pointer when absent
    precision = "tf32x3" if (q.dtype == torch.float32 and q.device.type == "cuda") else "tf32"
    _lightning_prefill_silu_kernel[(DV // block_v, B * H)](
        q, k, v, s, pos, state_in, out, final_state,
        T, H,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        token_positions.stride(0) if token_positions is not None else 0,
        state_in.stride(0), state_in.stride(1), state_in.stride(2),
        DK=DK, DV=DV, BLOCK_T=cfg.block_t, BLOCK_V=block_v,
        HAS_INITIAL_STATE=initial_state is not None, HAS_POSITIONS=token_positions is not None,
        APPLY_SILU=apply_silu,
        DOT_PRECISION=precision, NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps,
    )
    return out, final_state


@torch.library.custom_op("minimax::lightning_prefill_silu", mutates_args=())
def lightning_prefill_silu(
    q: Tensor, k: Tensor, v: Tensor, s: Tensor, initial_state: Tensor, token_positions: Tensor
) -> tuple[Tensor, Tensor]:
    """Pre-activation q, k [B, T, H, Dk], v [B, T, H, Dv]; s [H]; initial_state [B, H, Dk, Dv] fp32; token_positions
    [B, T]. Returns ``(o [B, T, H, Dv] in q.dtype, final_state fp32)`` of the prefill on SiLU'd, pad-masked q/k/v."""
    return lightning_prefill_silu_reference(q, k, v, s, initial_state, token_positions)


@lightning_prefill_silu.register_kernel("cuda")
def _lightning_prefill_silu_cuda(
    q: Tensor, k: Tensor, v: Tensor, s: Tensor, initial_state: Tensor, token_positions: Tensor
) -> tuple[Tensor, Tensor]:
    if not supports_head_dims(q.shape[-1], v.shape[-1]):
        return lightning_prefill_silu_reference(q, k, v, s, initial_state, token_positions)
    return lightning_prefill_silu_triton(q, k, v, s, initial_state, token_positions)


@lightning_prefill_silu.register_fake
def _lightning_prefill_silu_fake(
    q: Tensor, k: Tensor, v: Tensor, s: Tensor, initial_state: Tensor, token_positions: Tensor
) -> tuple[Tensor, Tensor]:
    B, T, H, _ = q.shape
    return q.new_empty((B, T, H, v.shape[-1])), initial_state.new_empty(initial_state.shape)
