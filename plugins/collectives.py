"""TensorRT plugins for the collectives of tensor-parallel rank programs (issue 16): ``minimax::all_reduce`` and
``minimax::all_gather``, around the NCCL communicator of ``torch.distributed``'s process group.

A rank's exported programs hold ``torch.ops._c10d_functional.all_reduce`` / ``all_gather_into_tensor`` (+
``wait_tensor``) nodes naming their process group ("0", the default world group; ``export/parallel.py``). The
ONNX lowering turns each into a node of domain ``minimax`` with the attributes ``world_size`` (int) and
``group_name`` (string) and ``aot = 0`` (``export/onnx_lowering.COLLECTIVE_OPS``); TensorRT's ONNX parser maps the
node to the plugin of that name registered here.

Why a plugin around ``torch.distributed`` and not TensorRT's own collective layer: ``IDistCollectiveLayer``
(``INetworkDefinition.add_dist_collective``, NCCL inside the engine) is documented from TensorRT 11.0, not in the
10.x API this backend is written against (10.15, ``docs/tensorrt.md``); TensorRT-LLM's NCCL plugins are C++ and
come with its own runtime. These are JIT plugins (``@trtp.impl``: Python, called by the engine at enqueue time on
the engine's stream), which our runtime can host because it is Python and has already joined the world
(``runtime.parallel.join_world``: ``torchrun``, NCCL on GPUs) before it deserializes a rank's engines; the
process group is looked up by name at every call, so an engine built in the build's fake world runs in the real
one. The engine is not self-contained (it needs this process's process group), which is the price of staying on
the documented 10.x API. The bodies, ``all_reduce_into`` and ``all_gather_into``, are plain torch functions: the
ONNX reference evaluator (``export/onnx_reference.py``) calls the same ones, so the CPU tests (gloo) run the code
the plugin runs, minus the pointer wrapping.

Semantics: ``all_reduce``: y = the sum over the ranks of x (same shape and dtype); ``all_gather``: y = the ranks'
x concatenated along dim 0 (y.shape[0] = world_size * x.shape[0]), as ``all_gather_into_tensor``.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

__all__ = ["COLLECTIVES", "CollectiveError", "process_group", "all_reduce_into", "all_gather_into", "register"]

log = logging.getLogger(__name__)

COLLECTIVES = ("all_reduce", "all_gather")


class CollectiveError(RuntimeError):
    """A collective node that cannot run in this process: no world, another group, another world size."""


def process_group(group_name: str, world_size: int | None, what: str):
    """The process group the program was compiled against, by name, checked against the node's world size (None:
    not checked)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise CollectiveError(f"{what}: needs the process group {group_name!r}, but "
                              "torch.distributed is not initialized in this process (run the rank under torchrun: "
                              "python -m torch.distributed.run --nproc-per-node N -m runtime ENGINE_DIR)")
    world = dist.group.WORLD
    if world is not None and world.group_name == group_name:
        group = world
    else:
        try:
            from torch.distributed.distributed_c10d import _resolve_process_group

            group = _resolve_process_group(group_name)
        except Exception as e:  # noqa: BLE001 (torch raises ValueError / RuntimeError by version)
            raise CollectiveError(f"{what}: no process group named {group_name!r} in this process ({e})") from None
    size = dist.get_world_size(group)
    if world_size is not None and size != world_size:
        raise CollectiveError(f"{what}: compiled for a {world_size}-rank group {group_name!r}, which has {size} ranks "
                              "here")
    return group


def all_reduce_into(x: Tensor, out: Tensor, group_name: str, world_size: int, what: str = "minimax::all_reduce"):
    """``out`` = the sum of every rank's ``x`` (``out`` may be ``x``). On CUDA tensors the collective is ordered
    on the current stream (ProcessGroupNCCL waits for it and makes it wait for the result)."""
    import torch.distributed as dist

    group = process_group(group_name, world_size, what)
    if out.shape != x.shape or out.dtype != x.dtype:
        raise CollectiveError(f"{what}: output {out.dtype} {list(out.shape)} for input {x.dtype} {list(x.shape)}")
    if out.data_ptr() != x.data_ptr():
        out.copy_(x)
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def all_gather_into(x: Tensor, out: Tensor, group_name: str, world_size: int, what: str = "minimax::all_gather"):
    """``out`` = every rank's ``x`` concatenated along dim 0, in rank order."""
    import torch.distributed as dist

    group = process_group(group_name, world_size, what)
    want = (world_size * x.shape[0], *x.shape[1:])
    if tuple(out.shape) != want or out.dtype != x.dtype:
        raise CollectiveError(f"{what}: output {out.dtype} {list(out.shape)}, expected {x.dtype} {list(want)}")
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


# --------------------------------------------------------------------------------------------- TensorRT (JIT)

_TYPESTR = {torch.float32: "<f4", torch.float16: "<f2", torch.bfloat16: "<i2"}  # bf16: viewed as int16, then back


def _cuda_view(t, dtype: torch.dtype) -> Tensor:
    """A torch view of a ``trtp.Tensor``'s device memory (CUDA array interface v3; numpy has no bfloat16, so bf16
    memory is described as int16 and reinterpreted)."""

    class _Array:
        __cuda_array_interface__ = {"shape": tuple(int(d) for d in t.shape), "typestr": _TYPESTR[dtype],
                                    "data": (int(t.data_ptr), False), "version": 3, "strides": None}

    view = torch.as_tensor(_Array(), device="cuda")
    return view.view(dtype) if view.dtype != dtype else view


def register() -> None:
    """Register both plugins with ``tensorrt.plugin`` (register + JIT impl). Needs TensorRT >= 10.9."""
    from typing import Tuple

    import tensorrt as trt
    import tensorrt.plugin as trtp

    to_torch = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16}

    def dtype_of(name: str, t) -> torch.dtype:
        if t.dtype not in to_torch:
            raise CollectiveError(f"minimax::{name}: TensorRT dtype {t.dtype}; supported: fp32, fp16, bf16")
        return to_torch[t.dtype]

    @trtp.register("minimax::all_reduce")
    def _all_reduce_desc(x: trtp.TensorDesc, world_size: int, group_name: str) -> trtp.TensorDesc:
        return x.like()

    @trtp.impl("minimax::all_reduce")
    def _all_reduce_impl(x: trtp.Tensor, world_size: int, group_name: str, outputs: Tuple[trtp.Tensor],
                         stream: int) -> None:
        dtype = dtype_of("all_reduce", x)
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            all_reduce_into(_cuda_view(x, dtype), _cuda_view(outputs[0], dtype), group_name, world_size)

    @trtp.register("minimax::all_gather")
    def _all_gather_desc(x: trtp.TensorDesc, world_size: int, group_name: str) -> trtp.TensorDesc:
        shape = list(x.shape_expr)
        shape[0] = shape[0] * world_size
        return trtp.from_shape_expr(tuple(shape), dtype=x.dtype)  # as _trt.output_descs builds its shapes

    @trtp.impl("minimax::all_gather")
    def _all_gather_impl(x: trtp.Tensor, world_size: int, group_name: str, outputs: Tuple[trtp.Tensor],
                         stream: int) -> None:
        dtype = dtype_of("all_gather", x)
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            all_gather_into(_cuda_view(x, dtype), _cuda_view(outputs[0], dtype), group_name, world_size)

    log.info("registered TensorRT JIT plugins minimax::all_reduce, minimax::all_gather (torch.distributed)")
