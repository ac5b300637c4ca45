"""``torch.library`` registration of the MiniMax MoE block: ``minimax::moe``.

One op covers routing and experts so that ``torch.export`` keeps each MoE call as a single node. It is functional
and returns a new contiguous ``[T, hidden]`` tensor in the dtype of ``x``.

``minimax::moe`` is a ``torch.library.triton_op``: its body holds only PyTorch ops and ``wrap_triton`` launches, so
when Inductor lowers it (AOTInductor, ``torch.compile``: the body is decomposed under ``FunctionalTensorMode``) the
Triton kernels are compiled into the output (a CUDA AOTInductor package holds them as ``.cubin`` files and needs
neither Python nor this module to run). The body branches on the device, which is static:

* CUDA: ``traced.moe_forward_traceable``, the kernels of ``routing.py`` / ``grouped.py`` launched through
  ``wrap_triton`` with choices made from what is statically known about T (see that module);
* other devices: ``minimax::moe_reference``, an opaque ``custom_op`` holding the fp32 reference of ``naive.py``
  (Inductor keeps it as one extern call instead of tracing the reference's per-expert Python loop).

Eager calls on CUDA tensors do not run the body: a CUDA kernel is registered (``register_kernel("cuda")``) that
calls ``dispatch.moe_forward_triton``, the tuned launcher (TMA kernels where supported). Tracing (fake tensors,
``FunctionalTensorMode``) is dispatched before any backend kernel, so it always sees the body.

The body is also the fake kernel (``triton_op`` registers it): its outputs have the shapes, dtypes and (contiguous)
strides of the real kernels. Triton is imported on the first CUDA call only.

``minimax::moe_quantized`` is the same block over quantized expert weights (``naive.py``'s "Quantized experts":
weights int8 or float8_e4m3fn, one fp32 scale per output channel, ``mode`` "experts-int8" or "experts-fp8"), with
the same three branches (``minimax::moe_quantized_reference`` off CUDA). On CUDA the pointer kernels take both
modes: int8 weights with their scale epilogue (W8A16), or fp8 weights with activations quantized per row (W8A8).
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


@torch.library.triton_op("minimax::moe", mutates_args=())
def moe(x: Tensor, router_weight: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, top_k: int) -> Tensor:
    """x [T, hidden]; router_weight [E, hidden]; w1, w3 [E, I, hidden]; w2 [E, hidden, I] -> [T, hidden].

    This body runs when the op is traced (and is the fake kernel); eager CUDA calls take ``_moe_cuda``."""
    if x.device.type != "cuda":
        return torch.ops.minimax.moe_reference(x, router_weight, w1, w3, w2, top_k)
    from .traced import moe_forward_traceable

    return moe_forward_traceable(x, router_weight, w1, w3, w2, top_k)  # new contiguous [T, hidden] in x.dtype


@moe.register_kernel("cuda")
def _moe_cuda(x: Tensor, router_weight: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, top_k: int) -> Tensor:
    """Eager CUDA: the tuned launcher (TMA kernels where supported). Tracing never reaches it (see the module doc)."""
    from .dispatch import moe_forward_triton

    return moe_forward_triton(x, router_weight, w1, w3, w2, top_k)  # new contiguous [T, hidden] in x.dtype


@torch.library.custom_op("minimax::moe_quantized_reference", mutates_args=())
def moe_quantized_reference(x: Tensor, router_weight: Tensor, w1: Tensor, s1: Tensor, w3: Tensor, s3: Tensor,
                            w2: Tensor, s2: Tensor, top_k: int, mode: str) -> Tensor:
    """The fp32 quantized reference (``naive.moe_forward_quantized``): the non-CUDA branch of ``moe_quantized``."""
    return naive.moe_forward_quantized(x, router_weight, w1, s1, w3, s3, w2, s2, top_k, mode)


@moe_quantized_reference.register_fake
def _moe_quantized_reference_fake(x: Tensor, router_weight: Tensor, w1: Tensor, s1: Tensor, w3: Tensor, s3: Tensor,
                                  w2: Tensor, s2: Tensor, top_k: int, mode: str) -> Tensor:
    return x.new_empty(x.shape)


@torch.library.triton_op("minimax::moe_quantized", mutates_args=())
def moe_quantized(x: Tensor, router_weight: Tensor, w1: Tensor, s1: Tensor, w3: Tensor, s3: Tensor, w2: Tensor,
                  s2: Tensor, top_k: int, mode: str) -> Tensor:
    """``minimax::moe`` over quantized experts: w1, w3 [E, I, hidden] and w2 [E, hidden, I] int8 / e4m3 with
    scales s1, s3 [E, I] and s2 [E, hidden] fp32 -> [T, hidden] in x.dtype."""
    if x.device.type != "cuda":
        return torch.ops.minimax.moe_quantized_reference(x, router_weight, w1, s1, w3, s3, w2, s2, top_k, mode)
    from .traced import moe_forward_traceable

    return moe_forward_traceable(x, router_weight, w1, w3, w2, top_k, scales=(s1, s3, s2), mode=mode)


@moe_quantized.register_kernel("cuda")
def _moe_quantized_cuda(x: Tensor, router_weight: Tensor, w1: Tensor, s1: Tensor, w3: Tensor, s3: Tensor, w2: Tensor,
                        s2: Tensor, top_k: int, mode: str) -> Tensor:
    from .dispatch import moe_forward_triton

    return moe_forward_triton(x, router_weight, w1, w3, w2, top_k, scales=(s1, s3, s2), mode=mode)


# ------------------------------------------------------------------------------------------------ expert parallel


@torch.library.custom_op("minimax::moe_ep_reference", mutates_args=())
def moe_ep_reference(x: Tensor, router_weight: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, top_k: int,
                     expert_start: int) -> Tensor:
    """The fp32 reference (``naive.moe_forward_ep``) as an opaque op: the non-CUDA branch of ``minimax::moe_ep``."""
    return naive.moe_forward_ep(x, router_weight, w1, w3, w2, top_k, expert_start)


@moe_ep_reference.register_fake
def _moe_ep_reference_fake(x: Tensor, router_weight: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, top_k: int,
                           expert_start: int) -> Tensor:
    return x.new_empty(x.shape)


@torch.library.triton_op("minimax::moe_ep", mutates_args=())
def moe_ep(x: Tensor, router_weight: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, top_k: int,
           expert_start: int) -> Tensor:
    """One rank's share of an expert-parallel ``minimax::moe`` (``naive.moe_forward_ep``): routed over all the
    router's experts, run over the rank's ``w1.shape[0]`` experts from ``expert_start``; the ranks' outputs sum to
    the unsplit block. CUDA (eager and traced alike): ``traced.moe_forward_traceable`` with ``expert_start`` (the
    pointer kernels; the slots of other ranks' experts are skipped, see there); other devices: the reference."""
    if x.device.type != "cuda":
        return torch.ops.minimax.moe_ep_reference(x, router_weight, w1, w3, w2, top_k, expert_start)
    from .traced import moe_forward_traceable

    return moe_forward_traceable(x, router_weight, w1, w3, w2, top_k, expert_start=expert_start)


@torch.library.custom_op("minimax::moe_quantized_ep_reference", mutates_args=())
def moe_quantized_ep_reference(x: Tensor, router_weight: Tensor, w1: Tensor, s1: Tensor, w3: Tensor, s3: Tensor,
                               w2: Tensor, s2: Tensor, top_k: int, mode: str, expert_start: int) -> Tensor:
    """The fp32 quantized reference of ``minimax::moe_quantized_ep`` (its non-CUDA branch)."""
    return naive.moe_forward_ep(x, router_weight, w1, w3, w2, top_k, expert_start, (s1, s3, s2), mode)


@moe_quantized_ep_reference.register_fake
def _moe_quantized_ep_reference_fake(x: Tensor, router_weight: Tensor, w1: Tensor, s1: Tensor, w3: Tensor,
                                     s3: Tensor, w2: Tensor, s2: Tensor, top_k: int, mode: str,
                                     expert_start: int) -> Tensor:
    return x.new_empty(x.shape)


@torch.library.triton_op("minimax::moe_quantized_ep", mutates_args=())
def moe_quantized_ep(x: Tensor, router_weight: Tensor, w1: Tensor, s1: Tensor, w3: Tensor, s3: Tensor, w2: Tensor,
                     s2: Tensor, top_k: int, mode: str, expert_start: int) -> Tensor:
    """``minimax::moe_ep`` over quantized experts (scales and ``mode`` as ``minimax::moe_quantized``)."""
    if x.device.type != "cuda":
        return torch.ops.minimax.moe_quantized_ep_reference(x, router_weight, w1, s1, w3, s3, w2, s2, top_k, mode,
                                                            expert_start)
    from .traced import moe_forward_traceable

    return moe_forward_traceable(x, router_weight, w1, w3, w2, top_k, scales=(s1, s3, s2), mode=mode,
                                 expert_start=expert_start)
