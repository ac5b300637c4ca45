"""``torch.library`` registration of the MiniMax MoE block: ``minimax::moe``.

One op covers routing and experts so that ``torch.export`` keeps each MoE call as a single node. It is functional
and returns a new contiguous ``[T, hidden]`` tensor in the dtype of ``x``.

``minimax::moe`` is a ``torch.library.triton_op``: its body holds only PyTorch ops and ``wrap_triton`` launches, so
when Inductor lowers it (AOTInductor, ``torch.compile``) the Triton kernels are compiled into the output (a CUDA
AOTInductor package holds them as ``.cubin`` files and needs neither Python nor this module to run). The body
branches on the device, which is static:

* CUDA, eager (real tensors): ``dispatch.moe_forward_triton``, the tuned launcher (TMA kernels where supported);
* CUDA, traced (fake / functional tensors, symbolic T): ``traced.moe_forward_traceable``, the same kernels launched
  through ``wrap_triton`` with choices made from what is statically known about T (see that module);
* other devices: ``minimax::moe_reference``, an opaque ``custom_op`` holding the fp32 reference of ``naive.py``
  (Inductor keeps it as one extern call instead of tracing the reference's per-expert Python loop).

The body is also the fake kernel (``triton_op`` registers it): its outputs have the shapes, dtypes and (contiguous)
strides of the real kernels. Triton is imported on the first CUDA call only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import naive


@torch.library.custom_op("minimax::moe_reference", mutates_args=())
def moe_reference(x: Tensor, router_weight: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, top_k: int) -> Tensor:
    """The fp32 reference (``naive.moe_forward``) as an opaque op: the non-CUDA branch of ``minimax::moe``."""
    return naive.moe_forward(x, router_weight, w1, w3, w2, top_k)


@moe_reference.register_fake
def _moe_reference_fake(x: Tensor, router_weight: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, top_k: int) -> Tensor:
    return x.new_empty(x.shape)


def _eager() -> bool:
    """Whether the body runs on real tensors: ``triton_op`` turns ``wrap_triton`` off exactly for that call."""
    from torch._library.triton import is_wrap_triton_enabled

    return not is_wrap_triton_enabled()


@torch.library.triton_op("minimax::moe", mutates_args=())
def moe(x: Tensor, router_weight: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, top_k: int) -> Tensor:
    """x [T, hidden]; router_weight [E, hidden]; w1, w3 [E, I, hidden]; w2 [E, hidden, I] -> [T, hidden]."""
    if x.device.type != "cuda":
        return torch.ops.minimax.moe_reference(x, router_weight, w1, w3, w2, top_k)
    if _eager():
        from .dispatch import moe_forward_triton

        return moe_forward_triton(x, router_weight, w1, w3, w2, top_k)  # new contiguous [T, hidden] in x.dtype
    from .traced import moe_forward_traceable

    return moe_forward_traceable(x, router_weight, w1, w3, w2, top_k)  # new contiguous [T, hidden] in x.dtype
