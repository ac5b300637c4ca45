"""Triton decode step for lightning attention: S' = exp(-s) S + k^T v, o = q S' (semantics in ``naive.py``).

A decode step is bound by the fp32 state: [Dk, Dv] read and written per (sequence, head), against 3 vectors of
q, k, v. One program handles one (batch, head, slice of BLOCK_V value columns): it reads its [Dk, BLOCK_V] state
tile once, writes the updated tile once and reduces q S' over Dk inside the program (Dk is not split, so no atomics
and no second pass). At batch 1 the value slices give H * Dv / BLOCK_V programs (512 for H=64, Dv=128,
BLOCK_V=16), enough to spread the 8 MiB of state traffic over every SM.

``lightning_decode_triton`` is functional (returns a new state); ``lightning_decode_triton_`` updates the state in
place (each program reads its tile before writing the same tile, so no program sees another's writes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["lightning_decode_triton", "lightning_decode_triton_"]


@triton.jit
def _lightning_decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    s_ptr,
    state_ptr,
    o_ptr,
    new_state_ptr,
    H,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_vb,
    stride_vh,
    stride_sb,
    stride_sh,
    stride_sk,
    stride_nb,
    stride_nh,
    stride_nk,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid_v = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_k = tl.arange(0, DK)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    state_ptrs = state_ptr + b * stride_sb + h * stride_sh + offs_k[:, None] * stride_sk + offs_v[None, :]
    state, o = _decode_tile(q_ptr, k_ptr, v_ptr, s_ptr, state_ptrs, b, h, stride_qb, stride_qh, stride_kb, stride_kh,
                            stride_vb, stride_vh, offs_k, offs_v)
    tl.store(new_state_ptr + b * stride_nb + h * stride_nh + offs_k[:, None] * stride_nk + offs_v[None, :], state)
    tl.store(o_ptr + pid_bh * DV + offs_v, o.to(o_ptr.dtype.element_ty))


@triton.jit
def _decode_tile(q_ptr, k_ptr, v_ptr, s_ptr, state_ptrs, b, h, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb,
                 stride_vh, offs_k, offs_v):
    """One program's step: ``S' = exp(-s) S + k^T v`` on its ``[DK, BLOCK_V]`` tile of the state (read through
    ``state_ptrs``), and ``o = q S'`` on its value slice. Returns ``(S' tile, o slice)``, both fp32."""
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_k).to(tl.float32)  # [DK]
    k = tl.load(k_ptr + b * stride_kb + h * stride_kh + offs_k).to(tl.float32)  # [DK]
    v = tl.load(v_ptr + b * stride_vb + h * stride_vh + offs_v).to(tl.float32)  # [BLOCK_V]
    decay = tl.exp(-tl.load(s_ptr + h).to(tl.float32))
    state = tl.load(state_ptrs) * decay + k[:, None] * v[None, :]  # [DK, BLOCK_V] fp32
    return state, tl.sum(q[:, None] * state, axis=0)


@triton.jit
def _lightning_decode_inplace_kernel(
    q_ptr, k_ptr, v_ptr, s_ptr, state_ptr, o_ptr, H,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_sb, stride_sh, stride_sk,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """``_lightning_decode_kernel`` writing the new state over the old one: each program reads its
    ``[DK, BLOCK_V]`` tile of the state and stores the same tile (no program reads another's), so in place is exact.
    One state pointer, so that the kernel analysis of ``wrap_triton`` sees the state as the one mutated input."""
    pid_v = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_k = tl.arange(0, DK)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    state_ptrs = state_ptr + b * stride_sb + h * stride_sh + offs_k[:, None] * stride_sk + offs_v[None, :]
    state, o = _decode_tile(q_ptr, k_ptr, v_ptr, s_ptr, state_ptrs, b, h, stride_qb, stride_qh, stride_kb, stride_kh,
                            stride_vb, stride_vh, offs_k, offs_v)
    tl.store(state_ptrs, state)
    tl.store(o_ptr + pid_bh * DV + offs_v, o.to(o_ptr.dtype.element_ty))


def _is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def _decode_block_v(batch: int, heads: int, dv: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_V, num_warps): narrow slices when B*H alone cannot fill the GPU."""
    # H100 sweep (benchmarks/results/lightning_2026-11-26_sweep.json, H=64, D=128): at B=1, 16 columns and 2 warps
    # (512 programs); at B=64/128 every width from 32 to 128 with 4 warps is within 2 % (80 % / 88 % of copy).
    if device.type != "cuda":
        return min(dv, 16), 1
    if batch * heads < 1024:
        return min(dv, 16), 2
    return min(dv, 64), 4


def _launch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    s: Tensor,
    state: Tensor,
    new_state: Tensor,
    out: Tensor | None = None,
    block_v: int | None = None,
    num_warps: int | None = None,
) -> Tensor:
    B, T, H, DK = q.shape
    DV = v.shape[-1]
    if T != 1 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"lightning decode: expected q, k, v [B, 1, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (_is_pow2(DK) and _is_pow2(DV) and DK <= 256 and DV <= 256):
        raise ValueError(f"lightning decode (triton): head dims must be powers of two <= 256; got {DK}, {DV}")
    if s.shape != (H,):
        raise ValueError(f"lightning decode: s must be [H={H}]; got {tuple(s.shape)}")
    if state.shape != (B, H, DK, DV) or state.dtype != torch.float32 or state.stride(-1) != 1:
        raise ValueError(f"lightning decode: state must be fp32 [{B}, {H}, {DK}, {DV}] with a contiguous last dim; "
                         f"got {state.dtype} {tuple(state.shape)} strides {state.stride()}")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    s = s.float().contiguous()
    if out is None:
        out = torch.empty(B, 1, H, DV, dtype=q.dtype, device=q.device)  # [B, 1, H, Dv]
    elif out.shape != (B, 1, H, DV) or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError(f"lightning decode: out must be contiguous {q.dtype} {(B, 1, H, DV)}")
    if new_state.shape != state.shape or new_state.dtype != torch.float32 or new_state.stride(-1) != 1:
        raise ValueError("lightning decode: the new state must be fp32 with the state's shape, last dim contiguous")
    o = out
    default_block_v, default_warps = _decode_block_v(B, H, DV, q.device)
    block_v = min(block_v or default_block_v, DV)
    num_warps = num_warps or default_warps
    grid = (DV // block_v, B * H)
    if new_state is state:  # in place: the one-pointer kernel (each program rewrites the tile it read)
        _lightning_decode_inplace_kernel[grid](
            q, k, v, s, state, o, H, q.stride(0), q.stride(2), k.stride(0), k.stride(2), v.stride(0), v.stride(2),
            state.stride(0), state.stride(1), state.stride(2), DK=DK, DV=DV, BLOCK_V=block_v, num_warps=num_warps,
        )  # fmt: skip
        return o
    _lightning_decode_kernel[grid](
        q,
        k,
        v,
        s,
        state,
        o,
        new_state,
        H,
        q.stride(0),
        q.stride(2),
        k.stride(0),
        k.stride(2),
        v.stride(0),
        v.stride(2),
        state.stride(0),
        state.stride(1),
        state.stride(2),
        new_state.stride(0),
        new_state.stride(1),
        new_state.stride(2),
        DK=DK,
        DV=DV,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return o


def lightning_decode_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    s: Tensor,
    state: Tensor,
    out: Tensor | None = None,
    new_state_out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One decode step. q, k [B, 1, H, Dk]; v [B, 1, H, Dv]; s [H] fp32; state [B, H, Dk, Dv] fp32 (not modified).

    Returns ``(o [B, 1, H, Dv] in q.dtype, new_state [B, H, Dk, Dv] fp32)``, new contiguous tensors unless
    preallocated ``out`` / ``new_state_out`` are given.
    """
    state = state.float() if state.stride(-1) == 1 else state.float().contiguous()
    if new_state_out is None:
        new_state_out = torch.empty(state.shape, dtype=torch.float32, device=state.device)  # [B, H, Dk, Dv]
    o = _launch(q, k, v, s, state, new_state_out, out)
    return o, new_state_out


def lightning_decode_triton_(
    q: Tensor, k: Tensor, v: Tensor, s: Tensor, state: Tensor, out: Tensor | None = None
) -> Tensor:
    """In-place decode step: ``state`` (fp32 [B, H, Dk, Dv], last dim contiguous) becomes the new state
    (``_lightning_decode_inplace_kernel``). Returns ``o [B, 1, H, Dv]`` in q.dtype."""
    return _launch(q, k, v, s, state, state, out)
