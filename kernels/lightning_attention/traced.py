"""Traceable launches of the lightning-attention Triton kernels: the bodies that ``minimax::lightning_prefill`` and
``minimax::lightning_decode`` (``torch.library.triton_op``s) run when they are traced (``torch.export`` fake
propagation, AOTInductor / ``torch.compile`` lowering), so that Inductor compiles the kernels into its output (for
AOTInductor: ``.cubin`` files inside the ``.pt2`` package).

They launch the kernels of ``chunk.py`` and ``recurrent.py`` (parameter lists unchanged: the TensorRT plugins call
them too) through ``torch.library.wrap_triton`` and use only PyTorch ops besides. B and T may be symbolic; no choice
depends on them except through ``statically_known_true`` (never a guard):

* prefill: the tile configuration (``chunk.default_prefill_config``) depends on head dims, dtype and device only;
  T is a runtime scalar of the kernel and B a grid dimension, so one compiled kernel serves every (B, T).
* decode: ``recurrent._decode_block_v`` picks 64-column value slices (4 warps) when B * H >= 1024 and 16-column
  slices (2 warps) below. Traced, the wide slices are taken only when B * H >= 1024 holds for every B of the range,
  else the narrow ones (correct at any batch; at most a few percent slower at B * H >= 1024, per the H100 sweep).
* a q / k / v / state whose last dim is not statically known to be contiguous is copied (``.contiguous()``).

Every choice gives the same result (the slices of the value columns are independent).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import chunk, recurrent

__all__ = ["lightning_prefill_traceable", "lightning_decode_traceable"]


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if statically_known_true(x.stride(-1) == 1) else x.contiguous()


def lightning_prefill_traceable(
    q: Tensor, k: Tensor, v: Tensor, s: Tensor, initial_state: Tensor
) -> tuple[Tensor, Tensor]:
    """Same contract as ``chunk.lightning_prefill_triton`` with an initial state; B and T may be symbolic."""
    from torch.library import wrap_triton

    B, T, H, DK = q.shape
    DV = v.shape[-1]
    if not chunk.supports_head_dims(DK, DV):
        raise ValueError(f"lightning prefill (triton): head dims must be powers of two in [16, 256]; got {DK}, {DV}")
    q = _last_dim_contiguous(q)
    k = _last_dim_contiguous(k.to(q.dtype))
    v = _last_dim_contiguous(v.to(q.dtype))
    s = s.float().contiguous()
    state_in = _last_dim_contiguous(initial_state.float())
    cfg = chunk.default_prefill_config(1, H, DK, DV, q.dtype, q.device)  # independent of the batch
    block_v = min(cfg.block_v, DV)
    o = torch.empty((B, T, H, DV), dtype=q.dtype, device=q.device)  # [B, T, H, Dv]
    final_state = torch.empty((B, H, DK, DV), dtype=torch.float32, device=q.device)  # [B, H, Dk, Dv]
    precision = "tf32x3" if (q.dtype == torch.float32 and q.device.type == "cuda") else "tf32"
    wrap_triton(chunk._lightning_prefill_kernel)[(DV // block_v, B * H)](
        q, k, v, s, state_in, o, final_state, T, H,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        state_in.stride(0), state_in.stride(1), state_in.stride(2),
        DK=DK, DV=DV, BLOCK_T=cfg.block_t, BLOCK_V=block_v, HAS_INITIAL_STATE=True, DOT_PRECISION=precision,
        NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps,
    )  # fmt: skip
    return o, final_state


def _decode_block_v(batch, heads: int, dv: int, device: torch.device) -> tuple[int, int]:
    """``recurrent._decode_block_v`` for a batch that may be symbolic: wide slices only when surely B*H >= 1024."""
    if device.type == "cuda" and statically_known_true(batch * heads >= 1024):
        return recurrent._decode_block_v(1024, 1, dv, device)
    return recurrent._decode_block_v(1, 1, dv, device)


def lightning_decode_traceable(q: Tensor, k: Tensor, v: Tensor, s: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """Same contract as ``recurrent.lightning_decode_triton``; B may be symbolic."""
    from torch.library import wrap_triton

    B, T, H, DK = q.shape
    DV = v.shape[-1]
    if not chunk.supports_head_dims(DK, DV):
        raise ValueError(f"lightning decode (triton): head dims must be powers of two in [16, 256]; got {DK}, {DV}")
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    s = s.float().contiguous()
    state = _last_dim_contiguous(state.float())
    o = torch.empty((B, 1, H, DV), dtype=q.dtype, device=q.device)  # [B, 1, H, Dv]
    new_state = torch.empty((B, H, DK, DV), dtype=torch.float32, device=q.device)  # [B, H, Dk, Dv]
    block_v, num_warps = _decode_block_v(B, H, DV, q.device)
    block_v = min(block_v, DV)
    wrap_triton(recurrent._lightning_decode_kernel)[(DV // block_v, B * H)](
        q, k, v, s, state, o, new_state, H,
        q.stride(0), q.stride(2), k.stride(0), k.stride(2), v.stride(0), v.stride(2),
        state.stride(0), state.stride(1), state.stride(2),
        new_state.stride(0), new_state.stride(1), new_state.stride(2),
        DK=DK, DV=DV, BLOCK_V=block_v, num_warps=num_warps,
    )  # fmt: skip
    return o, new_state


def lightning_decode_inplace_traceable(q: Tensor, k: Tensor, v: Tensor, s: Tensor, state: Tensor) -> Tensor:
    """Same contract as ``recurrent.lightning_decode_triton_`` (``state`` overwritten with the new state; it must be
    fp32 with a statically contiguous last dim, since a copy would not be the caller's tensor); B may be symbolic."""
    from torch.library import wrap_triton

    B, T, H, DK = q.shape
    DV = v.shape[-1]
    if not chunk.supports_head_dims(DK, DV):
        raise ValueError(f"lightning decode (triton): head dims must be powers of two in [16, 256]; got {DK}, {DV}")
    if state.dtype != torch.float32 or not statically_known_true(state.stride(-1) == 1):
        raise ValueError("lightning decode (in place): the state must be fp32 with a contiguous last dim")
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    s = s.float().contiguous()
    o = torch.empty((B, 1, H, DV), dtype=q.dtype, device=q.device)
    block_v, num_warps = _decode_block_v(B, H, DV, q.device)
    block_v = min(block_v, DV)
    wrap_triton(recurrent._lightning_decode_inplace_kernel)[(DV // block_v, B * H)](
        q, k, v, s, state, o, H, q.stride(0), q.stride(2), k.stride(0), k.stride(2), v.stride(0), v.stride(2),
        state.stride(0), state.stride(1), state.stride(2), DK=DK, DV=DV, BLOCK_V=block_v, num_warps=num_warps,
    )  # fmt: skip
    return o
