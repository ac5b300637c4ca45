"""``torch.library`` registration of lightning attention: ``minimax::lightning_prefill``, ``minimax::lightning_decode``
and its in-place form ``minimax::lightning_decode_`` (the state overwritten; what the model's decode step calls).

``lightning_prefill`` and ``lightning_decode`` are functional (no input is mutated) and return new contiguous
tensors. They are
``torch.library.triton_op``s: the body holds only PyTorch ops and ``wrap_triton`` launches, so when Inductor lowers
them (AOTInductor, ``torch.compile``) the Triton kernels of ``chunk.py`` (prefill) and ``recurrent.py`` (decode) are
compiled into the output (a CUDA AOTInductor package holds them as ``.cubin`` files and needs neither Python nor this
module to run); ``torch.export`` keeps each call as one node. The body branches on static facts only (device, head
dims):

* CUDA, head dims the kernels take (powers of two in [16, 256]): ``traced.py``, the kernels launched through
  ``wrap_triton`` (choices made without guards on B or T, see that module);
* anything else (other devices, other head dims): ``minimax::lightning_prefill_reference`` /
  ``minimax::lightning_decode_reference``, opaque ``custom_op``s holding the fp32 reference of ``naive.py`` (Inductor
  keeps each as one extern call instead of tracing the reference's Python loops).

Eager calls on CUDA tensors do not run the body: CUDA kernels are registered (``register_kernel("cuda")``) that call
the launchers ``chunk.lightning_prefill_triton`` / ``recurrent.lightning_decode_triton`` (other head dims: the
reference). Tracing (fake tensors, ``FunctionalTensorMode``) is dispatched before any backend kernel, so it always
sees the body.

The body is also the fake kernel (``triton_op`` registers it): outputs have the shapes, dtypes and (contiguous)
strides of the real kernels. Triton is imported on the first CUDA call only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import naive

# Block length of the reference prefill. A tuning choice only: every block size gives the same result.
REFERENCE_BLOCK_SIZE = 256


@torch.library.custom_op("minimax::lightning_prefill_reference", mutates_args=())
def lightning_prefill_reference(
    q: Tensor, k: Tensor, v: Tensor, s: Tensor, initial_state: Tensor
) -> tuple[Tensor, Tensor]:
    """The fp32 reference (``naive.lightning_attention_blockwise``) as an opaque op."""
    return naive.lightning_attention_blockwise(q, k, v, s, initial_state, block_size=REFERENCE_BLOCK_SIZE)


@lightning_prefill_reference.register_fake
def _lightning_prefill_reference_fake(
    q: Tensor, k: Tensor, v: Tensor, s: Tensor, initial_state: Tensor
) -> tuple[Tensor, Tensor]:
    B, T, H, _ = q.shape
    return q.new_empty((B, T, H, v.shape[-1])), initial_state.new_empty(initial_state.shape, dtype=torch.float32)


@torch.library.custom_op("minimax::lightning_decode_reference", mutates_args=())
def lightning_decode_reference(q: Tensor, k: Tensor, v: Tensor, s: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """The fp32 reference (``naive.lightning_attention_decode_step``) as an opaque op."""
    return naive.lightning_attention_decode_step(q, k, v, s, state)


@lightning_decode_reference.register_fake
def _lightning_decode_reference_fake(q: Tensor, k: Tensor, v: Tensor, s: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    B, T, H, _ = q.shape
    return q.new_empty((B, T, H, v.shape[-1])), state.new_empty(state.shape, dtype=torch.float32)


def _use_triton(q: Tensor, v: Tensor) -> bool:
    if q.device.type != "cuda":
        return False
    from .chunk import supports_head_dims

    return supports_head_dims(q.shape[-1], v.shape[-1])


@torch.library.triton_op("minimax::lightning_prefill", mutates_args=())
def lightning_prefill(q: Tensor, k: Tensor, v: Tensor, s: Tensor, initial_state: Tensor) -> tuple[Tensor, Tensor]:
    """q, k [B, T, H, Dk]; v [B, T, H, Dv]; s [H] fp32; initial_state [B, H, Dk, Dv] fp32.

    Returns ``(o [B, T, H, Dv] in q.dtype, final_state [B, H, Dk, Dv] fp32)`` (semantics in ``naive.py``).
    This body runs when the op is traced (and is the fake kernel); eager CUDA calls take ``_lightning_prefill_cuda``.
    """
    if not _use_triton(q, v):
        return torch.ops.minimax.lightning_prefill_reference(q, k, v, s, initial_state)
    from .traced import lightning_prefill_traceable

    return lightning_prefill_traceable(q, k, v, s, initial_state)  # new contiguous o [B, T, H, Dv], state


@lightning_prefill.register_kernel("cuda")
def _lightning_prefill_cuda(q: Tensor, k: Tensor, v: Tensor, s: Tensor, initial_state: Tensor) -> tuple[Tensor, Tensor]:
    if not _use_triton(q, v):
        return naive.lightning_attention_blockwise(q, k, v, s, initial_state, block_size=REFERENCE_BLOCK_SIZE)
    from .chunk import lightning_prefill_triton

    return lightning_prefill_triton(q, k, v, s, initial_state)  # new contiguous o [B, T, H, Dv], state


@torch.library.triton_op("minimax::lightning_decode", mutates_args=())
def lightning_decode(q: Tensor, k: Tensor, v: Tensor, s: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """q, k [B, 1, H, Dk]; v [B, 1, H, Dv]; s [H] fp32; state [B, H, Dk, Dv] fp32 (not modified).

    Returns ``(o [B, 1, H, Dv] in q.dtype, new_state [B, H, Dk, Dv] fp32)``.
    This body runs when the op is traced (and is the fake kernel); eager CUDA calls take ``_lightning_decode_cuda``.
    """
    if not _use_triton(q, v):
        return torch.ops.minimax.lightning_decode_reference(q, k, v, s, state)
    from .traced import lightning_decode_traceable

    return lightning_decode_traceable(q, k, v, s, state)  # new contiguous o [B, 1, H, Dv], state [B, H, Dk, Dv]


@lightning_decode.register_kernel("cuda")
def _lightning_decode_cuda(q: Tensor, k: Tensor, v: Tensor, s: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    if not _use_triton(q, v):
        return naive.lightning_attention_decode_step(q, k, v, s, state)
    from .recurrent import lightning_decode_triton

    return lightning_decode_triton(q, k, v, s, state)  # new contiguous o [B, 1, H, Dv], state [B, H, Dk, Dv]


@torch.library.triton_op("minimax::lightning_decode_", mutates_args=("state",))
def lightning_decode_(q: Tensor, k: Tensor, v: Tensor, s: Tensor, state: Tensor) -> Tensor:
    """``lightning_decode`` in place: ``state`` (fp32 [B, H, Dk, Dv], last dim contiguous) becomes the new state.

    Returns ``o [B, 1, H, Dv]`` in q.dtype. What the model's decode step calls: exported, it is one
    ``auto_functionalized`` node on the state input, which AOTInductor re-inplaces (the kernel stores the new state
    over the old one), so a decode step neither allocates nor copies a lightning state."""
    if not _use_triton(q, v):
        o, new_state = torch.ops.minimax.lightning_decode_reference(q, k, v, s, state)
        state.copy_(new_state)
        return o
    from .traced import lightning_decode_inplace_traceable

    return lightning_decode_inplace_traceable(q, k, v, s, state)


@lightning_decode_.register_kernel("cuda")
def _lightning_decode_inplace_cuda(q: Tensor, k: Tensor, v: Tensor, s: Tensor, state: Tensor) -> Tensor:
    if not _use_triton(q, v):
        o, new_state = naive.lightning_attention_decode_step(q, k, v, s, state)
        state.copy_(new_state)
        return o
    from .recurrent import lightning_decode_triton_

    return lightning_decode_triton_(q, k, v, s, state)
