"""Library dispatch for long prefill chunks: cuDNN's fused attention (through ``torch``) over gathered pages.

On the H200 (README, "Measured") torch's cuDNN SDPA reaches 560-600 TFLOP/s on MiniMax's softmax-attention shapes,
our Triton kernel 410-430. cuDNN does not read a paged cache, but for a long chunk the pages are cheap to gather:
a chunk of T queries over ``L`` held keys costs ``4 H D T L`` FLOPs and the gather moves ``4 KVH D L`` bytes, a
``T * H / KVH / (FLOP/byte ratio)`` fraction of the attention's time (0.5 % at T = 8K). So a row of a long chunk
is computed as:

1. ``gather_pages``: the row's pages ``0 .. ceil((p + T) / page_size)`` of both pools into contiguous
   ``[1, KVH, S, D]`` tensors (one Triton copy kernel, in page order);
2. cuDNN attention of the chunk over its history ``0 .. p-1`` (no mask) and over itself (causal, square), both with
   their log-sum-exp, GQA native (``enable_gqa`` layout: KV heads not repeated);
3. the two normalised partial results merged by their log-sum-exp in fp32 (``o = o1 w1 + o2 w2``,
   ``w_i = exp(lse_i - logaddexp(lse1, lse2))``), rounded once more to the output dtype (so the result differs
   from the Triton kernel's by bf16 rounding: ~3e-3 relative on the 8K-over-1M case).

**When** (``use_library``, decided per call from the shapes and the row positions, the rule logged once per
process): CUDA device of compute capability >= 9.0 with cuDNN, bf16 / fp16, head dim 64 or 128, a chunk of at
least ``MIN_QUERIES`` tokens, no left pads in the chunk (every position >= 0), at least ``MIN_KEYS`` keys held by
the end of the chunk, and fewer than 2^31 elements per gathered pool (cuDNN's 32-bit indexing). Everything else,
and every call with ``MINIMAX_PREFILL_LIBRARY=0`` in the environment, runs the Triton kernel (``prefill.py``).
The traced programs reach this through the opaque op ``minimax::paged_attention_prefill_dispatch`` (``op.py``)
when their chunk length can reach ``MIN_QUERIES``; ONNX / TensorRT always use the Triton kernel (the plugin).
"""

from __future__ import annotations

import logging
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ["MIN_QUERIES", "MIN_KEYS", "library_enabled", "chunk_qualifies", "use_library", "gather_pages",
           "paged_attention_prefill_library"]

MIN_QUERIES = 2048  # chunk tokens from which the library path is taken
MIN_KEYS = 8192  # keys held by the end of the chunk, likewise
_ENV = "MINIMAX_PREFILL_LIBRARY"
_logged: set[str] = set()


def _log_once(key: str, msg: str, *args) -> None:
    if key not in _logged:
        _logged.add(key)
        logger.info(msg, *args)


def library_enabled(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """The static half of the rule: device, dtype, head dim, cuDNN present, not switched off."""
    if os.environ.get(_ENV, "1") == "0":
        _log_once("off", "paged attention prefill: %s=0, every chunk runs the Triton kernel", _ENV)
        return False
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16) or head_dim not in (64, 128):
        return False
    if not torch.backends.cudnn.is_available() or torch.cuda.get_device_capability(device) < (9, 0):
        return False
    return True


def chunk_qualifies(T: int, positions_cpu: list[int], page_size: int, kv_heads: int, head_dim: int) -> bool:
    """The shape half of the rule: a long chunk, no left pads, enough keys held, a gathered pool cuDNN can index."""
    if T < MIN_QUERIES or not positions_cpu or min(positions_cpu) < 0 or min(positions_cpu) + T < MIN_KEYS:
        return False
    longest = -(-(max(positions_cpu) + T) // page_size) * page_size
    return longest * kv_heads * head_dim < 2**31


def use_library(q: Tensor, k_cache: Tensor, positions_cpu: list[int]) -> bool:
    """Whether this chunk goes to cuDNN (module docstring); the rule is logged the first time it is applied."""
    B, T, H, D = q.shape
    if not chunk_qualifies(T, positions_cpu, k_cache.shape[2], k_cache.shape[1], D):
        return False
    if not library_enabled(q.device, q.dtype, D):
        return False
    _log_once("rule", "paged attention prefill: chunks of >= %d tokens holding >= %d keys (no left pads, "
              "< 2^31 elements gathered) run on cuDNN attention over gathered pages; others on the Triton kernel",
              MIN_QUERIES, MIN_KEYS)
    return True


@triton.jit
def _gather_pages_kernel(cache_ptr, table_ptr, out_ptr, stride_cp, stride_ch, stride_cs, stride_oh, KVH,
                         PAGE: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr):
    j = tl.program_id(0).to(tl.int64)  # page of the row
    h = tl.program_id(1).to(tl.int64)
    page = tl.load(table_ptr + j).to(tl.int64)
    offs_d = tl.arange(0, D)
    for s0 in range(0, PAGE, BLOCK_S):
        slots = s0 + tl.arange(0, BLOCK_S)
        ok = slots < PAGE
        src = cache_ptr + page * stride_cp + h * stride_ch + slots[:, None] * stride_cs + offs_d[None, :]
        x = tl.load(src, mask=ok[:, None])
        dst = out_ptr + h * stride_oh + (j * PAGE + slots)[:, None] * D + offs_d[None, :]
        tl.store(dst, x, mask=ok[:, None])


def gather_pages(cache: Tensor, table_row: Tensor, n_pages: int, out: Tensor | None = None) -> Tensor:
    """Pages ``table_row[:n_pages]`` of ``cache [P, KVH, page_size, D]`` as one contiguous ``[1, KVH, n * ps, D]``
    (``out``: a contiguous tensor of that shape to fill)."""
    _, KVH, page_size, D = cache.shape
    shape = (1, KVH, n_pages * page_size, D)
    if out is None:
        out = torch.empty(shape, dtype=cache.dtype, device=cache.device)
    elif out.shape != shape or out.dtype != cache.dtype or not out.is_contiguous():
        raise ValueError(f"gather_pages: out must be contiguous {cache.dtype} {shape}")
    if n_pages == 0:
        return out
    if cache.stride(-1) != 1:
        raise ValueError("gather_pages: the cache needs a contiguous last dim")
    table = table_row[:n_pages].contiguous()
    block_s = min(triton.next_power_of_2(page_size), max(1, 8192 // D))
    _gather_pages_kernel[(n_pages, KVH)](
        cache, table, out, cache.stride(0), cache.stride(1), cache.stride(2), out.stride(1), KVH,
        PAGE=page_size, D=D, BLOCK_S=block_s, num_warps=4 if cache.device.type == "cuda" else 1,
    )  # fmt: skip
    return out


def _cudnn(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """(o [1, H, T, D], lse [1, H, T] fp32, natural log) of cuDNN's fused attention; KV heads not repeated."""
    o, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False,
                                                                 scale=scale)[:2]
    return o, lse.reshape(q.shape[0], q.shape[1], q.shape[2])


def paged_attention_prefill_library(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                                    positions_cpu: list[int], scale: float, out: Tensor | None = None) -> Tensor:
    """The library path of ``paged_attention_prefill`` (module docstring): rows one by one, each over its gathered
    pages. Rows must hold no left pads (``use_library``)."""
    B, T, H, D = q.shape
    page_size = k_cache.shape[2]
    if out is None:
        out = torch.empty(B, T, H, D, dtype=q.dtype, device=q.device)
    for b, p in enumerate(positions_cpu):
        if p < 0:
            raise ValueError(f"paged attention prefill (library): row {b} starts at {p}; left pads take the Triton path")
        n_pages = -(-(p + T) // page_size)
        keys = gather_pages(k_cache, block_table[b], n_pages)
        values = gather_pages(v_cache, block_table[b], n_pages)
        qb = q[b : b + 1].transpose(1, 2)  # [1, H, T, D] view
        o_self, lse_self = _cudnn(qb, keys[:, :, p : p + T], values[:, :, p : p + T], True, scale)
        if p == 0:
            out[b] = o_self[0].transpose(0, 1)
            continue
        o_hist, lse_hist = _cudnn(qb, keys[:, :, :p], values[:, :, :p], False, scale)
        del keys, values
        lse = torch.logaddexp(lse_hist, lse_self)
        merged = (o_hist.float() * torch.exp(lse_hist - lse).unsqueeze(-1)
                  + o_self.float() * torch.exp(lse_self - lse).unsqueeze(-1))
        out[b] = merged[0].transpose(0, 1).to(q.dtype)
    return out
