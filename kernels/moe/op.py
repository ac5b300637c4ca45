"""``torch.library`` registration of the MiniMax MoE block: ``minimax::moe``.

One op covers routing and experts so that ``torch.export`` keeps each MoE call as a single node. It is
functional and returns a new contiguous ``[T, hidden]`` tensor in the dtype of ``x``; the fake kernel returns the
same. The default implementation (every device, CPU included) is the fp32 reference of ``naive.py``; on CUDA the
Triton kernels of ``dispatch.py`` are registered instead (imported, with triton, on the first CUDA call only).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import naive


@torch.library.custom_op("minimax::moe", mutates_args=())
def moe(x: Tensor, router_weight: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, top_k: int) -> Tensor:
    """x [T, hidden]; router_weight [E, hidden]; w1, w3 [E, I, hidden]; w2 [E, hidden, I] -> [T, hidden]."""
    return naive.moe_forward(x, router_weight, w1, w3, w2, top_k)


@moe.register_kernel("cuda")
def _moe_cuda(x: Tensor, router_weight: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, top_k: int) -> Tensor:
    from .dispatch import moe_forward_triton

    return moe_forward_triton(x, router_weight, w1, w3, w2, top_k)  # new contiguous [T, hidden] in x.dtype


@moe.register_fake
def _moe_fake(x: Tensor, router_weight: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, top_k: int) -> Tensor:
    return x.new_empty(x.shape)
