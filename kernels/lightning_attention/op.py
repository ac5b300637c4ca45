"""``torch.library`` registration of lightning attention: ``minimax::lightning_prefill`` and ``minimax::lightning_decode``.

Both ops are functional (no input is mutated) and return new contiguous tensors; the fake kernels return exactly
those shapes, dtypes and strides so that ``torch.export`` keeps each call as one node and AOTInductor plans the
right buffers. The default implementation (every device, CPU included) is the fp32 reference of ``naive.py``; on
CUDA the Triton kernels of ``chunk.py`` (prefill) and ``recurrent.py`` (decode) are registered instead (head dims
that the kernels do not take, i.e. not a power of two in [16, 256], run the reference there too). Their modules (and
triton) are imported on the first CUDA call only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import naive

# Block length of the reference prefill. A tuning choice only: every block size gives the same result.
REFERENCE_BLOCK_SIZE = 256


@torch.library.custom_op("minimax::lightning_prefill", mutates_args=())
def lightning_prefill(q: Tensor, k: Tensor, v: Tensor, s: Tensor, initial_state: Tensor) -> tuple[Tensor, Tensor]:
    """q, k [B, T, H, Dk]; v [B, T, H, Dv]; s [H] fp32; initial_state [B, H, Dk, Dv] fp32.

    Returns ``(o [B, T, H, Dv] in q.dtype, final_state [B, H, Dk, Dv] fp32)`` (semantics in ``naive.py``).
    """
    return naive.lightning_attention_blockwise(q, k, v, s, initial_state, block_size=REFERENCE_BLOCK_SIZE)


@lightning_prefill.register_kernel("cuda")
def _lightning_prefill_cuda(q: Tensor, k: Tensor, v: Tensor, s: Tensor, initial_state: Tensor) -> tuple[Tensor, Tensor]:
    from .chunk import lightning_prefill_triton, supports_head_dims

    if not supports_head_dims(q.shape[-1], v.shape[-1]):
        return naive.lightning_attention_blockwise(q, k, v, s, initial_state, block_size=REFERENCE_BLOCK_SIZE)
    return lightning_prefill_triton(q, k, v, s, initial_state)  # new contiguous o [B, T, H, Dv], state [B, H, Dk, Dv]


@lightning_prefill.register_fake
def _lightning_prefill_fake(q: Tensor, k: Tensor, v: Tensor, s: Tensor, initial_state: Tensor) -> tuple[Tensor, Tensor]:
    B, T, H, _ = q.shape
    return q.new_empty((B, T, H, v.shape[-1])), initial_state.new_empty(initial_state.shape)


@torch.library.custom_op("minimax::lightning_decode", mutates_args=())
def lightning_decode(q: Tensor, k: Tensor, v: Tensor, s: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """q, k [B, 1, H, Dk]; v [B, 1, H, Dv]; s [H] fp32; state [B, H, Dk, Dv] fp32 (not modified).

    Returns ``(o [B, 1, H, Dv] in q.dtype, new_state [B, H, Dk, Dv] fp32)``.
    """
    return naive.lightning_attention_decode_step(q, k, v, s, state)


@lightning_decode.register_kernel("cuda")
def _lightning_decode_cuda(q: Tensor, k: Tensor, v: Tensor, s: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    from .chunk import supports_head_dims
    from .recurrent import lightning_decode_triton

    if not supports_head_dims(q.shape[-1], v.shape[-1]):
        return naive.lightning_attention_decode_step(q, k, v, s, state)
    return lightning_decode_triton(q, k, v, s, state)  # new contiguous o [B, 1, H, Dv], state [B, H, Dk, Dv]


@lightning_decode.register_fake
def _lightning_decode_fake(q: Tensor, k: Tensor, v: Tensor, s: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    B, T, H, _ = q.shape
    return q.new_empty((B, T, H, v.shape[-1])), state.new_empty(state.shape)
