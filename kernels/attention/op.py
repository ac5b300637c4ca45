"""``torch.library`` registration of paged softmax attention: ``minimax::paged_kv_write``,
``minimax::paged_attention_prefill`` and ``minimax::paged_attention_decode`` (semantics in ``naive.py``).

``paged_kv_write`` mutates its two cache arguments (``mutates_args``): exported, it is an ``auto_functionalized``
node on the program's mutated inputs, which Inductor re-inplaces, so a compiled step writes the new tokens into the
pool and copies nothing. The attention ops are functional and return a new contiguous ``[B, T, H, D]`` tensor.
``minimax::paged_kv_update`` is the write as a function (new pools), used only by the ONNX / TensorRT lowerings,
whose graphs have no mutation.

As for the other ops (``kernels/lightning_attention/op.py``): they are ``triton_op``s whose body (also the fake
kernel) holds PyTorch ops and ``wrap_triton`` launches on CUDA (``traced.py``), and calls opaque fp32 reference ops
(``minimax::*_reference``) elsewhere; eager CUDA calls run the launchers of ``prefill.py`` / ``decode.py`` /
``write.py`` through ``register_kernel("cuda")``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import naive


# ---------------------------------------------------------------------------------------------- references (opaque)
@torch.library.custom_op("minimax::paged_kv_write_reference", mutates_args=("k_cache", "v_cache"))
def paged_kv_write_reference(
    k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, block_table: Tensor, positions: Tensor
) -> None:
    naive.paged_kv_write(k_cache, v_cache, k, v, block_table, positions)


@paged_kv_write_reference.register_fake
def _paged_kv_write_reference_fake(k_cache, v_cache, k, v, block_table, positions) -> None:
    return None


@torch.library.custom_op("minimax::paged_attention_reference", mutates_args=())
def paged_attention_reference(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, positions: Tensor, scale: float
) -> Tensor:
    return naive.paged_attention(q, k_cache, v_cache, block_table, positions, scale)


@paged_attention_reference.register_fake
def _paged_attention_reference_fake(q, k_cache, v_cache, block_table, positions, scale) -> Tensor:
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous [B, T, H, D]


def _use_triton(x: Tensor) -> bool:
    if x.device.type != "cuda":
        return False
    from .prefill import supports_head_dim

    return supports_head_dim(x.shape[-1])


# ---------------------------------------------------------------------------------------------- the ops
@torch.library.triton_op("minimax::paged_kv_write", mutates_args=("k_cache", "v_cache"))
def paged_kv_write(
    k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, block_table: Tensor, positions: Tensor
) -> None:
    """k_cache, v_cache [P, KVH, page_size, D] (written in place); k, v [B, T, KVH, D]; block_table [B, M] int32;
    positions [B] int64. Writes each token at position >= 0 into its page slot (``naive.paged_kv_write``)."""
    if not _use_triton(k):
        torch.ops.minimax.paged_kv_write_reference(k_cache, v_cache, k, v, block_table, positions)
        return
    from .traced import paged_kv_write_traceable

    paged_kv_write_traceable(k_cache, v_cache, k, v, block_table, positions)


@paged_kv_write.register_kernel("cuda")
def _paged_kv_write_cuda(k_cache, v_cache, k, v, block_table, positions) -> None:
    if not _use_triton(k):
        naive.paged_kv_write(k_cache, v_cache, k, v, block_table, positions)
        return
    from .write import paged_kv_write_triton

    paged_kv_write_triton(k_cache, v_cache, k, v, block_table, positions)


@torch.library.triton_op("minimax::paged_attention_prefill", mutates_args=())
def paged_attention_prefill(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, positions: Tensor, scale: float
) -> Tensor:
    """q [B, T, H, D]; caches [P, KVH, page_size, D]; block_table [B, M] int32; positions [B] int64.

    Returns ``o [B, T, H, D]`` (q.dtype, contiguous): each query attends to positions 0..its own of its row."""
    if not _use_triton(q):
        return torch.ops.minimax.paged_attention_reference(q, k_cache, v_cache, block_table, positions, scale)
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    from . import route

    if route.library_enabled(q.device, q.dtype, q.shape[-1]) and not statically_known_true(
        q.shape[1] < route.MIN_QUERIES
    ):  # chunks this long may go to cuDNN (route.py): decided per call, from the row positions, by the opaque op
        return torch.ops.minimax.paged_attention_prefill_dispatch(q, k_cache, v_cache, block_table, positions, scale)
    from .traced import paged_attention_prefill_traceable

    return paged_attention_prefill_traceable(q, k_cache, v_cache, block_table, positions, scale)


def _prefill_cuda(q, k_cache, v_cache, block_table, positions, scale) -> Tensor:
    """Eager CUDA prefill: the library path for long chunks (``route.use_library``), else the Triton kernel."""
    from . import route
    from .prefill import paged_attention_prefill_triton
    from .write import check_rows_fast

    if q.shape[1] >= route.MIN_QUERIES and route.library_enabled(q.device, q.dtype, q.shape[-1]):
        naive.check_paged_inputs(q, k_cache, v_cache, block_table, positions, query=True)
        positions_cpu = positions.tolist()
        if route.use_library(q, k_cache, positions_cpu):
            check_rows_fast(block_table, positions, q.shape[1], k_cache.shape[2], k_cache.shape[0])
            return route.paged_attention_prefill_library(q, k_cache, v_cache, block_table, positions_cpu, scale)
    return paged_attention_prefill_triton(q, k_cache, v_cache, block_table, positions, scale)


@paged_attention_prefill.register_kernel("cuda")
def _paged_attention_prefill_cuda(q, k_cache, v_cache, block_table, positions, scale) -> Tensor:
    if not _use_triton(q):
        return naive.paged_attention(q, k_cache, v_cache, block_table, positions, scale)
    return _prefill_cuda(q, k_cache, v_cache, block_table, positions, scale)


@torch.library.custom_op("minimax::paged_attention_prefill_dispatch", mutates_args=())
def paged_attention_prefill_dispatch(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, positions: Tensor, scale: float
) -> Tensor:
    """``paged_attention_prefill`` as an opaque op, for traced programs whose chunks may reach the library path:
    compiled programs call it through the dispatcher (AOTInductor: a fallback kernel), and it chooses per call
    (``route.use_library``) between cuDNN over gathered pages and the Triton kernel."""
    if q.device.type != "cuda" or not _use_triton(q):
        return naive.paged_attention(q, k_cache, v_cache, block_table, positions, scale)
    return _prefill_cuda(q, k_cache, v_cache, block_table, positions, scale)


@paged_attention_prefill_dispatch.register_fake
def _paged_attention_prefill_dispatch_fake(q, k_cache, v_cache, block_table, positions, scale) -> Tensor:
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


@torch.library.triton_op("minimax::paged_attention_decode", mutates_args=())
def paged_attention_decode(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, positions: Tensor, scale: float
) -> Tensor:
    """The decode case (q [B, 1, H, D], one query per row at ``positions[b]``), split along the sequence."""
    if not _use_triton(q):
        return torch.ops.minimax.paged_attention_reference(q, k_cache, v_cache, block_table, positions, scale)
    from .traced import paged_attention_decode_traceable

    return paged_attention_decode_traceable(q, k_cache, v_cache, block_table, positions, scale)


@paged_attention_decode.register_kernel("cuda")
def _paged_attention_decode_cuda(q, k_cache, v_cache, block_table, positions, scale) -> Tensor:
    if not _use_triton(q):
        return naive.paged_attention(q, k_cache, v_cache, block_table, positions, scale)
    from .decode import paged_attention_decode_triton

    return paged_attention_decode_triton(q, k_cache, v_cache, block_table, positions, scale)


# ---------------------------------------------------------------------------------------------- functional form
@torch.library.custom_op("minimax::paged_kv_update", mutates_args=())
def paged_kv_update(
    k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, block_table: Tensor, positions: Tensor
) -> tuple[Tensor, Tensor]:
    """``paged_kv_write`` as a function: returns new pools ``(k_cache', v_cache')`` with the tokens written.

    Not used by the model: the ONNX lowering (``export/onnx_lowering.py``) rewrites the in-place write of the
    exported programs into this op, because an ONNX graph has no mutation. Its TensorRT plugin (``paged_kv_write``)
    aliases each output to its input, so the engine writes in place after all.
    """
    k_new, v_new = k_cache.clone(), v_cache.clone()
    torch.ops.minimax.paged_kv_write(k_new, v_new, k, v, block_table, positions)
    return k_new, v_new


@paged_kv_update.register_fake
def _paged_kv_update_fake(k_cache, v_cache, k, v, block_table, positions) -> tuple[Tensor, Tensor]:
    return torch.empty_like(k_cache), torch.empty_like(v_cache)
