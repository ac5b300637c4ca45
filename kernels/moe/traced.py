"""Traceable launch of the Triton MoE: the body that ``minimax::moe`` (a ``torch.library.triton_op``) runs when it is
traced (``torch.export`` fake propagation, AOTInductor / ``torch.compile`` lowering), so that Inductor compiles the
kernels into its output (for AOTInductor: ``.cubin`` files inside the ``.pt2`` package).

It launches the same ``@triton.jit`` kernels as ``dispatch.moe_forward_triton`` (their parameter lists are those the
TensorRT plugins use), through ``torch.library.wrap_triton``, and only uses PyTorch ops besides. Differences from the
eager launcher, all of them about *choices*, never semantics:

* Sizes may be symbolic (dynamic T). Every choice is made from what is statically known, with
  ``statically_known_true`` (which never adds a guard; it uses the export range of T), so the compiled program is
  valid over the whole range:
    - the decode path (``swiglu_decode`` / ``down_combine_decode``, ``T_PAD = 16``) when ``T <= 16`` holds for every
      T of the range (e.g. the decode program of an engine built with ``max_batch <= 16``), else the grouped path
      (exact for every T >= 1). ``decode_kernels=False`` forces the grouped path. (The decode kernels used to call
      ``.to()`` on the runtime scalars ``hidden`` / ``inter``; torch 2.11's analysis of which tensors a user kernel
      mutates compiles the kernel with scalar arguments as Python ints (pytorch/pytorch#170049, fixed by #169782
      later), failed there, and fell back to "every input is mutated". They now widen the loop index instead (``tl.cast(e, tl.int64)``).)
    - the tile class of the grouped path (``dispatch.default_config``) by rows per expert, taking the largest class
      whose lower bound holds for every T of the range; the small-block class when nothing is known.
  With concrete sizes the choices are those of ``dispatch.default_config`` (the decode class only with
  ``decode_kernels=True``).
* Only the pointer kernels run: the TMA kernels take host-built ``TensorDescriptor`` objects, and passing those
  through ``wrap_triton`` in a ``triton_op`` body was not attempted, so the descriptor variants (``swiglu_tma`` /
  ``down_tma``) are replaced by the pointer kernels with the same tiles (for long prefills about 10-20 % slower
  GEMMs on the H100: see README "What changed").
* Buffers are not poisoned and the T = 0 early return is taken only when T = 0 is statically known.

Every choice yields the reference result up to fp32 summation order (the tests check both paths against it).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import dispatch, grouped, routing

__all__ = ["static_config", "moe_forward_traceable"]


def _cdiv(a, b: int):
    return (a + b - 1) // b  # works for ints and SymInts (triton.cdiv too, but keep it obviously symbolic-safe)


def _upper_bound(n) -> int | None:
    """The largest value a SymInt can take in its export range (no guard), or None when it has none."""
    try:
        bound = n.node.shape_env.bound_sympy(n.node.expr).upper
        return int(bound) if bound.is_finite else None
    except (AttributeError, TypeError, ValueError):
        return None


def static_config(
    n_tokens, top_k: int, num_experts: int, device: torch.device, decode_kernels: bool = True,
    mode: str | None = None,
) -> dispatch.MoeTritonConfig:
    """``dispatch.default_config`` decided from what is statically known about ``n_tokens`` (int or SymInt).

    Never adds a guard: each threshold is tested with ``statically_known_true`` or on the range's upper bound (a
    symbolic T with an upper bound above 16 gets the tiles of that bound); the TMA flags are cleared (pointer
    kernels, see the module docstring); ``mode`` as in ``dispatch.default_config``. ``decode_kernels=False``: the
    decode class is never chosen (T <= 16 gets the grouped tiles of the smallest class, and ``decode_max_tokens =
    0``)."""
    upper = _upper_bound(n_tokens)
    if isinstance(n_tokens, int):  # concrete size: the eager choice
        cfg = dispatch.default_config(n_tokens if decode_kernels else max(n_tokens, 17), top_k, num_experts, device,
                                      mode)
    elif decode_kernels and statically_known_true(n_tokens <= 16):
        cfg = dispatch.default_config(16, top_k, num_experts, device, mode)
    elif upper is not None and upper > 16:
        # The tiles of the range's largest size: a prefill program spends its time in full chunks (a long prompt is
        # all full chunks but the first), and any tiles give the same result (only the padding changes). Choosing
        # from the lower bound instead gave every 8K-token chunk the 17-token tiles (16-row blocks: the expert
        # weights read once per 16 rows), 2.5x slower than eager at 32K tokens on the H200 (docs/benchmarks.md).
        cfg = dispatch.default_config(upper, top_k, num_experts, device, mode)
    else:
        # smallest T that surely falls in each class of default_config: rows_per_expert = T * top_k / E
        cfg = dispatch.default_config(17, top_k, num_experts, device, mode)  # few rows per expert (any T > 16)
        for rows in (64, 128, 512):
            t_min = max(17, _cdiv(rows * num_experts, top_k))  # T >= t_min  =>  rows_per_expert >= rows
            if statically_known_true(n_tokens >= t_min):
                cfg = dispatch.default_config(t_min, top_k, num_experts, device, mode)
    cfg = dataclasses.replace(cfg, swiglu_tma=False, down_tma=False, swiglu_permute=False)
    return cfg if decode_kernels else dataclasses.replace(cfg, decode_max_tokens=0)


def moe_forward_traceable(
    x: Tensor,
    router_weight: Tensor,
    w1: Tensor,
    w3: Tensor,
    w2: Tensor,
    top_k: int,
    *,
    config: dispatch.MoeTritonConfig | None = None,
    decode_kernels: bool = True,
    scales: tuple[Tensor, Tensor, Tensor] | None = None,
    mode: str = "experts-int8",
    expert_start: int | None = None,
    poison: bool = False,
) -> Tensor:
    """Routed SwiGLU experts: x [T, hidden] -> y [T, hidden] (x.dtype, new contiguous tensor), T may be symbolic.

    Same contract as ``dispatch.moe_forward_triton``; kernels launched through ``wrap_triton``. ``config``
    overrides ``static_config`` (its TMA flags are ignored). ``decode_kernels``: allow the decode path (see the
    module docstring). ``scales``: ``(s1, s3, s2)`` fp32 [E, out] of quantized expert weights, ``mode``
    "experts-int8" (W8A16) or "experts-fp8" (W8A8: x and h quantized per row first, as ``dispatch`` does).

    ``expert_start``: one rank's share of an expert-parallel block (``naive.moe_forward_ep``). The router keeps all
    ``router_weight.shape[0]`` experts; the weights hold the ``w1.shape[0]`` experts from ``expert_start``. Routing
    runs over all of them, then the ids are made local and the slots of other ranks' experts get id -1: the align
    kernel places no row for them (their ``inv_perm`` stays -1, which the combine kernel skips) and the decode
    kernels, which match ids per expert, never take them. The tiles are chosen from the router's expert count (the
    rows each expert gets do not depend on where it lives).

    ``poison`` (tests): every buffer the kernels write is filled first (NaN for floats, 2^30 for ids and rows), so
    that an element no kernel writes shows in the result."""
    from torch.library import wrap_triton

    naive_shapes_ok = x.dim() == 2 and w1.dim() == 3 and w2.dim() == 3 and router_weight.dim() == 2
    if not naive_shapes_ok:
        raise ValueError(f"moe: x [T, hidden], router_weight [E, hidden], w1/w3 [E, I, hidden], w2 [E, hidden, I] "
                         f"expected; got {tuple(x.shape)}, {tuple(router_weight.shape)}, {tuple(w1.shape)}, "
                         f"{tuple(w3.shape)}, {tuple(w2.shape)}")
    T, hidden = x.shape
    E, inter = w1.shape[0], w1.shape[1]
    E_route = router_weight.shape[0]  # the experts routed over: E, or every rank's under expert parallelism
    if expert_start is None and E_route != E:
        raise ValueError(f"moe: router_weight has {E_route} experts and w1 {E}; pass expert_start for one rank's "
                         f"share of an expert-parallel block")
    if expert_start is not None and not 0 <= expert_start <= E_route - E:
        raise ValueError(f"moe (expert parallel): experts {expert_start}..{expert_start + E - 1} are outside the "
                         f"router's {E_route}")
    dev = x.device

    def empty(shape, dtype):
        if not poison:
            return torch.empty(shape, dtype=dtype, device=dev)
        return torch.full(shape, float("nan") if dtype.is_floating_point else 1 << 30, dtype=dtype, device=dev)

    cfg = static_config(T, top_k, E_route, dev, decode_kernels, None if scales is None else mode) \
        if config is None else config
    x = x.contiguous()
    router_weight = router_weight.contiguous()
    w1, w3, w2 = w1.contiguous(), w3.contiguous(), w2.contiguous()
    # int8 weights: the scale pointers of the pointer kernels (None: the kernels' unquantized specialisation)
    # Every kernel parameter is passed, None included: wrap_triton's signature analysis does not fill defaults
    q13 = {"s1_ptr": None, "s3_ptr": None} if scales is None else {
        "s1_ptr": scales[0].contiguous(), "s3_ptr": scales[1].contiguous()}
    q2 = {"s2_ptr": None if scales is None else scales[2].contiguous()}
    y = empty((T, hidden), x.dtype)  # [T, hidden]
    if statically_known_true(T == 0):
        return y
    fp8 = scales is not None and mode == "experts-fp8"

    def rows_fp8(a: Tensor) -> tuple[Tensor, Tensor]:
        """W8A8: ``a`` quantized per row (``grouped.quantize_rows_fp8``'s kernel)."""
        R, K = a.shape
        q = empty((R, K), torch.float8_e4m3fn)
        scale = empty((R,), torch.float32)
        wrap_triton(grouped._quantize_rows_fp8_kernel)[(R,)](a, q, scale, K, BLOCK=min(1024, grouped._next_pow2(K)))
        return q, scale

    a_in, a_kw = x, {"sa_ptr": None}
    if fp8:
        a_in, a_scale = rows_fp8(x)
        a_kw = {"sa_ptr": a_scale}
    precision = grouped._dot_precision(x)
    k_pad = grouped._next_pow2(max(top_k, 2))

    # stage 1: router
    weights = empty((T, top_k), torch.float32)  # [T, top_k]
    ids = empty((T, top_k), torch.int32)  # [T, top_k]
    wrap_triton(routing._route_kernel)[(_cdiv(T, cfg.route_block_t),)](
        x, router_weight, weights, ids, T, hidden,
        NUM_EXPERTS=E_route, E_PAD=max(16, grouped._next_pow2(E_route)), TOP_K=top_k, K_PAD=k_pad,
        BLOCK_T=cfg.route_block_t, BLOCK_K=cfg.route_block_k,
        DOT_PRECISION="tf32x3" if dev.type == "cuda" else "ieee", USE_DOT=cfg.route_dot,
        num_warps=cfg.route_warps,
    )  # fmt: skip
    if expert_start is not None:  # local ids; -1 for the slots of other ranks' experts
        ids = ids - expert_start
        ids = torch.where((ids >= 0) & (ids < E), ids, torch.full_like(ids, -1))

    if decode_kernels and statically_known_true(T <= cfg.decode_max_tokens):
        # decode path: T_PAD is a compile-time constant, so it comes from the static bound, not from T
        t_pad = max(16, grouped._next_pow2(cfg.decode_max_tokens))
        h = empty((T * top_k, inter), x.dtype)  # [T * top_k, I]
        stages, block_k = grouped._fit_smem(cfg.decode_stages, cfg.decode_block_k,
                                            (t_pad + 2 * cfg.decode_block_n) * x.element_size())
        split = cfg.decode_split
        target = h if split == 1 else empty((split, 2, T * top_k, inter), torch.float32)  # split-K partial sums
        wrap_triton(grouped._swiglu_decode_kernel)[(_cdiv(inter, cfg.decode_block_n), split)](
            a_in, w1, w3, target, ids, T, hidden, inter,
            NUM_EXPERTS=E, TOP_K=top_k, K_PAD=k_pad, T_PAD=t_pad, BLOCK_N=cfg.decode_block_n, BLOCK_K=block_k,
            EVEN_K=hidden % block_k == 0, DOT_PRECISION=precision, **q13, **a_kw, FP8_PRECISE=not cfg.fp8_fast_accum,
            SPLIT=split, num_warps=cfg.decode_warps, num_stages=stages,
        )  # fmt: skip
        if split > 1:
            n = T * top_k * inter
            wrap_triton(grouped._swiglu_split_finish_kernel)[(_cdiv(n, grouped.SPLIT_BLOCK),)](
                target, h, n, SPLIT=split, BLOCK=grouped.SPLIT_BLOCK)
        h_in, h_kw = h, {"sa_ptr": None}
        if fp8:
            h_in, h_scale = rows_fp8(h)
            h_kw = {"sa_ptr": h_scale}
        stages, block_k = grouped._fit_smem(cfg.decode_down_stages, cfg.decode_down_block_k,
                                            (t_pad + cfg.decode_down_block_n) * x.element_size())
        split = cfg.decode_down_split
        target = y if split == 1 else empty((split, T, hidden), torch.float32)
        wrap_triton(grouped._down_combine_decode_kernel)[(_cdiv(hidden, cfg.decode_down_block_n), split)](
            h_in, w2, weights, ids, target, T, hidden, inter,
            NUM_EXPERTS=E, TOP_K=top_k, K_PAD=k_pad, T_PAD=t_pad, BLOCK_N=cfg.decode_down_block_n, BLOCK_K=block_k,
            EVEN_K=inter % block_k == 0, DOT_PRECISION=precision, **q2, **h_kw, FP8_PRECISE=not cfg.fp8_fast_accum,
            SPLIT=split, num_warps=cfg.decode_down_warps, num_stages=stages,
        )  # fmt: skip
        if split > 1:
            n = T * hidden
            wrap_triton(grouped._split_sum_kernel)[(_cdiv(n, grouped.SPLIT_BLOCK),)](
                target, y, n, SPLIT=split, BLOCK=grouped.SPLIT_BLOCK)
        return y

    # grouped path: every buffer has a shape that is an expression in T
    bm = cfg.block_m
    n_slots = T * top_k
    max_rows = n_slots + E * (bm - 1)  # routing.align_max_rows
    max_blocks = _cdiv(max_rows, bm)  # routing.align_max_blocks
    sorted_slots = empty((max_rows,), torch.int32)
    # expert parallel: the slots placed nowhere keep -1 (the combine kernel skips them)
    inv_perm = empty((n_slots,), torch.int32) if expert_start is None \
        else torch.full((n_slots,), -1, dtype=torch.int32, device=dev)
    block_expert = empty((max_blocks,), torch.int32)
    expert_counts = empty((E,), torch.int32)
    expert_offsets = empty((E + 1,), torch.int32)
    wrap_triton(routing._align_kernel)[(E,)](
        ids, sorted_slots, inv_perm, block_expert, expert_counts, expert_offsets, n_slots, max_rows, max_blocks,
        NUM_EXPERTS=E, E_PAD=max(2, grouped._next_pow2(E)), BLOCK_M=bm, CHUNK=cfg.align_chunk, num_warps=4,
    )  # fmt: skip

    h = empty((max_rows, inter), x.dtype)  # [max_rows, I]
    stages, block_k = grouped._fit_smem(cfg.swiglu_stages, cfg.swiglu_block_k,
                                        (bm + 2 * cfg.swiglu_block_n) * x.element_size())
    wrap_triton(grouped._swiglu_grouped_kernel)[(max_blocks * _cdiv(inter, cfg.swiglu_block_n),)](
        a_in, w1, w3, h, sorted_slots, block_expert, n_slots, hidden, inter, max_blocks,
        TOP_K=top_k, BLOCK_M=bm, BLOCK_N=cfg.swiglu_block_n, BLOCK_K=block_k, GROUP_M=cfg.group_m,
        EVEN_K=hidden % block_k == 0, DOT_PRECISION=precision, INTERLEAVE=cfg.swiglu_interleave, **q13, **a_kw,
        FP8_PRECISE=not cfg.fp8_fast_accum,
        num_warps=cfg.swiglu_warps, num_stages=stages,
    )  # fmt: skip

    h_in, h_kw = h, {"sa_ptr": None}
    if fp8:
        h_in, h_scale = rows_fp8(h)
        h_kw = {"sa_ptr": h_scale}
    y_perm = empty((max_rows, hidden), x.dtype)  # [max_rows, hidden]
    stages, block_k = grouped._fit_smem(cfg.down_stages, cfg.down_block_k, (bm + cfg.down_block_n) * x.element_size())
    wrap_triton(grouped._down_grouped_kernel)[(max_blocks * _cdiv(hidden, cfg.down_block_n),)](
        h_in, w2, y_perm, sorted_slots, block_expert, weights, n_slots, hidden, inter, max_blocks,
        BLOCK_M=bm, BLOCK_N=cfg.down_block_n, BLOCK_K=block_k, GROUP_M=cfg.group_m,
        EVEN_K=inter % block_k == 0, DOT_PRECISION=precision, **q2, **h_kw, FP8_PRECISE=not cfg.fp8_fast_accum,
        num_warps=cfg.down_warps,
        num_stages=stages,
    )  # fmt: skip

    block_t, block_h = 4, min(1024, grouped._next_pow2(hidden))  # grouped.combine defaults
    wrap_triton(grouped._combine_kernel)[(_cdiv(T, block_t), _cdiv(hidden, block_h))](
        y_perm, inv_perm, y, T, hidden, TOP_K=top_k, BLOCK_T=block_t, BLOCK_H=block_h,
    )  # fmt: skip
    return y
