"""Triton MoE (``routing.py``, ``grouped.py``, ``dispatch.py``) against the fp32 reference ``naive.py``.

Without CUDA the kernels run in Triton's interpreter: ``TRITON_INTERPRET=1`` is set here, before anything imports
the kernel modules (``@triton.jit`` reads it when a kernel is defined; ``kernels.moe`` imports them on first use).
CPU shapes are tiny (the interpreter is numpy). Tests marked ``gpu`` use MiniMax sizes (hidden 6144, 32 experts,
top-2, bf16; I reduced to 1024 to save time).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from dataclasses import replace  # noqa: E402

import pytest  # noqa: E402

from kernels.moe import moe_forward, naive  # noqa: E402
from kernels.moe import grouped, routing  # noqa: E402
from kernels.moe.dispatch import default_config, moe_forward_triton  # noqa: E402
from tests.utils import rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL = 1e-5 if DEVICE == "cpu" else 1e-4  # GPU fp32 products use tf32x3
HIDDEN, INTER = 32, 48  # CPU sizes


def _inputs(T, E, hidden=HIDDEN, inter=INTER, seed=0, dtype=torch.float32, device=DEVICE, dominant=None):
    """Random MoE inputs. ``dominant=e``: x has a positive mean and router row e points along it, so every token
    picks expert e first (logit about 32 against about +-2 for the others: no probability underflows to a tie)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, hidden, generator=g)
    router = torch.randn(E, hidden, generator=g)
    if dominant is not None:
        x = x + 2.0
        router = 0.1 * router
        router[dominant] = 16.0 / hidden
    w1 = torch.randn(E, inter, hidden, generator=g) / hidden**0.5
    w3 = torch.randn(E, inter, hidden, generator=g) / hidden**0.5
    w2 = torch.randn(E, hidden, inter, generator=g) / inter**0.5
    return x.to(device, dtype), router.to(device), *(w.to(device, dtype) for w in (w1, w3, w2))


TMA_PATHS = {  # grouped path through the descriptor (TMA) kernels: config overrides
    "grouped_tma": dict(swiglu_tma=True, down_tma=True),
    "grouped_tma_permute_persistent": dict(swiglu_tma=True, down_tma=True, swiglu_permute=True,
                                           swiglu_persistent=True, down_persistent=True),
}


def _config(T, top_k, E, path):
    cfg = default_config(T, top_k, E, torch.device(DEVICE))
    cfg = replace(cfg, decode_max_tokens=1 << 30 if path == "decode" else 0)  # "grouped*": the grouped path
    if path in TMA_PATHS:
        cfg = replace(cfg, **TMA_PATHS[path])
    elif path.startswith("grouped"):
        cfg = replace(cfg, swiglu_tma=False, down_tma=False)
    return cfg


def _nan(shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def _garbage(shape):
    return torch.full(shape, 1 << 30, dtype=torch.int32, device=DEVICE)


# ------------------------------------------------------------------------------------------------ stage 1: router


@pytest.mark.parametrize("T", [1, 7, 33])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("E", [5, 8])
@pytest.mark.parametrize("use_dot", [True, False])
def test_route_matches_reference(T, top_k, E, use_dot):
    x, router, *_ = _inputs(T, E, hidden=40, seed=T + 10 * top_k + E)  # hidden not a multiple of the K tile
    w, ids = routing.moe_route_triton(
        x, router, top_k, block_t=16 if use_dot else (1 if T == 1 else 2), block_k=16, use_dot=use_dot,
        out_weights=_nan((T, top_k)), out_ids=_garbage((T, top_k)),
    )
    ref_w, ref_ids = naive.moe_route(x, router, top_k)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids.long(), ref_ids)
    assert rel_err(w, ref_w) < 1e-6
    assert torch.allclose(w.sum(-1), torch.ones(T, device=DEVICE))


def test_route_dominant_expert():
    x, router, *_ = _inputs(9, 6, seed=3, dominant=4)
    w, ids = routing.moe_route_triton(x, router, 2, block_t=16, block_k=16)
    assert (ids[:, 0] == 4).all() and (ids[:, 1] != 4).all()
    ref_w, ref_ids = naive.moe_route(x, router, 2)
    assert torch.equal(ids.long(), ref_ids) and rel_err(w, ref_w) < 1e-6


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy warns about the NaN arithmetic
def test_route_non_finite_input_gives_distinct_valid_ids():
    """A NaN token must not produce out-of-range or repeated expert ids (later stages index with them)."""
    x, router, *_ = _inputs(5, 6, seed=4)
    x[2, 3] = float("nan")
    x[4, 0] = float("inf")
    w, ids = routing.moe_route_triton(x, router, 3, block_t=16, block_k=16)
    assert ((ids >= 0) & (ids < 6)).all()
    assert all(len(set(row)) == 3 for row in ids.tolist())
    assert torch.isnan(w[2]).all() and torch.isfinite(w[[0, 1, 3]]).all()


# ------------------------------------------------------------------------------------------------ stage 2: align


def _check_alignment(ids: torch.Tensor, E: int, block_m: int, a: routing.AlignResult) -> None:
    ids = ids.reshape(-1).long().cpu()
    S = ids.numel()
    sorted_slots, inv_perm = a.sorted_slots.long().cpu(), a.inv_perm.long().cpu()
    block_expert, counts, offsets = a.block_expert.long().cpu(), a.expert_counts.long().cpu(), a.expert_offsets.long().cpu()
    max_rows = routing.align_max_rows(S, E, block_m)
    assert sorted_slots.shape == (max_rows,) and block_expert.shape == (routing.align_max_blocks(S, E, block_m),)
    # counts and padded offsets
    assert torch.equal(counts, torch.bincount(ids, minlength=E))
    padded = (counts + block_m - 1) // block_m * block_m
    assert torch.equal(offsets, torch.cat([torch.zeros(1, dtype=torch.long), padded.cumsum(0)]))
    total = int(offsets[-1])
    assert total <= max_rows
    # every slot appears exactly once, in its expert's range, and the inverse permutation inverts
    real = sorted_slots[:total] < S
    assert torch.equal(torch.sort(sorted_slots[:total][real]).values, torch.arange(S))
    assert (sorted_slots[:total][~real] == S).all() and (sorted_slots[total:] == S).all()
    assert torch.equal(sorted_slots[inv_perm], torch.arange(S))
    for e in range(E):
        rows = sorted_slots[offsets[e] : offsets[e] + counts[e]]
        assert (ids[rows] == e).all()
        assert torch.equal(rows, torch.sort(rows).values)  # slot order within an expert: deterministic
        assert (sorted_slots[offsets[e] + counts[e] : offsets[e + 1]] == S).all()
    # expert of each block; -1 past the rows in use
    n_used = total // block_m
    expect = torch.full_like(block_expert, -1)
    for e in range(E):
        expect[offsets[e] // block_m : offsets[e + 1] // block_m] = e
    assert torch.equal(block_expert, expect) and (block_expert[n_used:] == -1).all()


def _align_poisoned(ids, E, block_m, chunk=16):
    S = ids.numel()
    max_rows, max_blocks = routing.align_max_rows(S, E, block_m), routing.align_max_blocks(S, E, block_m)
    out = routing.AlignResult(
        _garbage((max_rows,)), _garbage((S,)), _garbage((max_blocks,)), _garbage((E,)), _garbage((E + 1,))
    )
    return routing.moe_align_triton(ids, E, block_m, chunk=chunk, out=out)


@pytest.mark.parametrize("T", [1, 7, 33])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("E,block_m", [(5, 16), (8, 16), (3, 32)])
def test_align_random(T, top_k, E, block_m):
    g = torch.Generator().manual_seed(T * 7 + top_k + E)
    ids = torch.stack([torch.randperm(E, generator=g)[:top_k] for _ in range(T)]).to(DEVICE, torch.int32)
    _check_alignment(ids, E, block_m, _align_poisoned(ids, E, block_m))


def test_align_chunk_boundaries_and_skew():
    """More slots than one chunk (several passes), one expert taking most slots, others empty."""
    g = torch.Generator().manual_seed(1)
    T, E = 40, 7  # top-2
    first = torch.where(torch.rand(T, generator=g) < 0.8, 2, 5)
    ids = torch.stack([first, torch.where(first == 2, 6, 2)], 1).to(DEVICE, torch.int32)  # experts 0, 1, 3, 4 empty
    a = _align_poisoned(ids, E, 16, chunk=16)
    _check_alignment(ids, E, 16, a)
    assert (a.expert_counts.cpu()[[0, 1, 3, 4]] == 0).all()


def test_align_all_one_expert():
    E, T = 6, 33
    ids = torch.full((T, 1), 5, dtype=torch.int32, device=DEVICE)
    a = _align_poisoned(ids, E, 16)
    _check_alignment(ids, E, 16, a)
    assert a.expert_counts.cpu().tolist() == [0, 0, 0, 0, 0, 33]


# ------------------------------------------------------------------------------------------------ stages 3-5 alone


def _expert_ref(x, w1, w3, w2, e):
    xf = x.float()
    h = torch.nn.functional.silu(xf @ w1[e].float().t()) * (xf @ w3[e].float().t())
    return h, h @ w2[e].float().t()


@pytest.mark.parametrize("T,top_k,E,interleave", [(7, 2, 5, True), (33, 2, 8, True), (33, 1, 3, False)])
def test_grouped_stages(T, top_k, E, interleave):
    x, router, w1, w3, w2 = _inputs(T, E, seed=T + E)
    weights, ids = naive.moe_route(x, router, top_k)
    ids32 = ids.to(torch.int32)
    bm = 16
    a = routing.moe_align_triton(ids32, E, bm, chunk=16)
    max_rows = a.sorted_slots.numel()
    h = grouped.swiglu_grouped(
        x, w1, w3, a.sorted_slots, a.block_expert, top_k, block_m=bm, block_n=32, block_k=16, interleave=interleave,
        out=_nan((max_rows, INTER)),
    )
    y_perm = grouped.down_grouped(
        h, w2, a.sorted_slots, a.block_expert, weights, block_m=bm, block_n=16, block_k=32, out=_nan((max_rows, HIDDEN))
    )
    inv = a.inv_perm.long()
    for s in range(T * top_k):
        t, e = s // top_k, int(ids.reshape(-1)[s])
        h_ref, y_ref = _expert_ref(x[t : t + 1], w1, w3, w2, e)
        assert rel_err(h[inv[s]], h_ref[0]) < FP32_TOL
        assert rel_err(y_perm[inv[s]], weights.reshape(-1)[s] * y_ref[0]) < FP32_TOL
    total = int(a.expert_offsets[-1])
    pad = a.sorted_slots[:total] >= T * top_k
    assert (h[:total][pad] == 0).all() and (y_perm[:total][pad] == 0).all()  # padding rows are written as zeros
    y = grouped.combine(y_perm, a.inv_perm, T, top_k, out_dtype=x.dtype, block_h=16, out=_nan((T, HIDDEN)))
    assert rel_err(y, naive.moe_experts(x, weights, ids, w1, w3, w2)) < FP32_TOL


@pytest.mark.parametrize("T,top_k,E", [(1, 2, 5), (17, 2, 8), (33, 1, 3)])
@pytest.mark.parametrize("permute", [False, True])
@pytest.mark.parametrize("persistent", [False, True])
def test_grouped_tma_stages(T, top_k, E, permute, persistent):
    """Descriptor kernels against per-slot references. hidden 40 and I 24 are not multiples of the tiles: K tails
    come from TMA's zero fill, and N tiles that run past an expert's I rows read the next expert's (masked)."""
    hidden, inter = 40, 24
    x, router, w1, w3, w2 = _inputs(T, E, hidden=hidden, inter=inter, seed=3 * T + E)
    weights, ids = naive.moe_route(x, router, top_k)
    bm = 16
    a = routing.moe_align_triton(ids.to(torch.int32), E, bm, chunk=16)
    max_rows = a.sorted_slots.numel()
    assert grouped.tma_supported(x, w1, w3, w2)
    x_perm = None
    total = int(a.expert_offsets[-1])
    if permute:
        x_perm = grouped.permute_rows(x, a.sorted_slots, a.expert_offsets, top_k, block_h=16,
                                      out=_nan((max_rows, hidden)))
        valid = a.sorted_slots[:total] < T * top_k
        tok = (a.sorted_slots[:total] // top_k).long()
        assert torch.equal(x_perm[:total][valid], x[tok[valid]]) and (x_perm[:total][~valid] == 0).all()
    h = grouped.swiglu_grouped_tma(
        x, w1, w3, a.sorted_slots, a.block_expert, a.expert_offsets, top_k, block_m=bm, block_n=16, block_k=16,
        x_perm=x_perm, persistent=persistent, out=_nan((max_rows, inter)),
    )
    y_perm = grouped.down_grouped_tma(
        h, w2, a.sorted_slots, a.block_expert, a.expert_offsets, weights, block_m=bm, block_n=16, block_k=16,
        persistent=persistent, out=_nan((max_rows, hidden)),
    )
    inv = a.inv_perm.long()
    for s in range(T * top_k):
        t, e = s // top_k, int(ids.reshape(-1)[s])
        h_ref, y_ref = _expert_ref(x[t : t + 1], w1, w3, w2, e)
        assert rel_err(h[inv[s]], h_ref[0]) < FP32_TOL
        assert rel_err(y_perm[inv[s]], weights.reshape(-1)[s] * y_ref[0]) < FP32_TOL
    pad = a.sorted_slots[:total] >= T * top_k
    assert (h[:total][pad] == 0).all() and (y_perm[:total][pad] == 0).all()
    y = grouped.combine(y_perm, a.inv_perm, T, top_k, out_dtype=x.dtype, block_h=16, out=_nan((T, hidden)))
    assert rel_err(y, naive.moe_experts(x, weights, ids, w1, w3, w2)) < FP32_TOL


@pytest.mark.parametrize("path", ["grouped", *TMA_PATHS])
def test_forward_many_tokens_skewed(path):
    """T = 1000 with skewed routing (a few experts take most slots, some none): many blocks per expert, empty
    experts, partial last blocks; every buffer poisoned."""
    T, E, top_k = 1000, 8, 2
    x, router, w1, w3, w2 = _inputs(T, E, seed=9)
    x += 1.0  # a common direction: router rows along it win (0-2) or lose (5-7) for every token
    router *= 0.2
    router[:3] += 3.0 / HIDDEN
    router[5:] -= 8.0 / HIDDEN
    ids = naive.moe_route(x, router, top_k)[1]
    counts = torch.bincount(ids.reshape(-1), minlength=E)
    assert counts[:3].sum() > T * top_k * 3 // 4 and (counts[5:] == 0).all() and (counts[3:5] > 0).all(), counts
    y = moe_forward_triton(x, router, w1, w3, w2, top_k, config=_config(T, top_k, E, path), poison=True)
    assert rel_err(y, naive.moe_forward(x, router, w1, w3, w2, top_k)) < FP32_TOL


@pytest.mark.parametrize("split", [1, 2, 3])
@pytest.mark.parametrize("T,top_k,E", [(1, 2, 5), (7, 2, 8), (5, 1, 3)])
def test_decode_stages(T, top_k, E, split):
    """split > 1: split-K (hidden 32 and I 48 in 16-wide K tiles: 2 and 3 tiles, so split 3 leaves one chunk of the
    SwiGLU stage empty and split 2 gives the down stage chunks of 2 and 1 tiles)."""
    x, router, w1, w3, w2 = _inputs(T, E, seed=2 * T + E)
    weights, ids = naive.moe_route(x, router, top_k)
    ids32 = ids.to(torch.int32)
    h = grouped.swiglu_decode(x, w1, w3, ids32, block_n=16, block_k=16, out=_nan((T * top_k, INTER)), split=split)
    for s in range(T * top_k):
        t, e = s // top_k, int(ids.reshape(-1)[s])
        assert rel_err(h[s], _expert_ref(x[t : t + 1], w1, w3, w2, e)[0][0]) < FP32_TOL
    y = grouped.down_combine_decode(h, w2, weights, ids32, out_dtype=x.dtype, block_n=16, block_k=16,
                                    out=_nan((T, HIDDEN)), split=split)
    assert rel_err(y, naive.moe_experts(x, weights, ids, w1, w3, w2)) < FP32_TOL


@pytest.mark.parametrize("traced", [False, True])
@pytest.mark.parametrize("T", [1, 6])
def test_forward_split_decode(T, traced):
    """The whole block with split-K decode kernels (SwiGLU split 3, down split 2), through the eager launcher and the
    traced launch sequence alike, every buffer poisoned."""
    from kernels.moe.traced import moe_forward_traceable

    E, top_k = 6, 2
    x, router, w1, w3, w2 = _inputs(T, E, hidden=40, inter=56, seed=T)
    cfg = replace(_config(T, top_k, E, "decode"), decode_max_tokens=16, decode_block_k=16, decode_down_block_k=16,
                  decode_split=3, decode_down_split=2)
    if traced:
        y = moe_forward_traceable(x, router, w1, w3, w2, top_k, config=cfg, poison=True)
    else:
        y = moe_forward_triton(x, router, w1, w3, w2, top_k, config=cfg, poison=True)
    assert not bool(y.isnan().any())
    assert rel_err(y, naive.moe_forward(x, router, w1, w3, w2, top_k)) < FP32_TOL


# ------------------------------------------------------------------------------------------------ whole block


@pytest.mark.parametrize("T", [1, 7, 33])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("E", [5, 8])
@pytest.mark.parametrize("path", ["decode", "grouped", "grouped_two_products", *TMA_PATHS])
def test_forward_matches_reference(T, top_k, E, path):
    x, router, w1, w3, w2 = _inputs(T, E, seed=T + 10 * top_k + E)
    cfg = _config(T, top_k, E, path)
    if path == "grouped_two_products":
        cfg = replace(cfg, swiglu_interleave=False)
    y = moe_forward_triton(x, router, w1, w3, w2, top_k, config=cfg, poison=True)
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    assert rel_err(y, naive.moe_forward(x, router, w1, w3, w2, top_k)) < FP32_TOL


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("path", ["decode", "grouped", *TMA_PATHS])
def test_forward_all_tokens_one_expert(top_k, path):
    """Every token's first choice is expert 3: one expert gets T rows (several blocks), most others none."""
    T, E = 33, 6
    x, router, w1, w3, w2 = _inputs(T, E, seed=5, dominant=3)
    assert (naive.moe_route(x, router, top_k)[1][:, 0] == 3).all()
    y = moe_forward_triton(x, router, w1, w3, w2, top_k, config=_config(T, top_k, E, path), poison=True)
    assert rel_err(y, naive.moe_forward(x, router, w1, w3, w2, top_k)) < FP32_TOL


def test_forward_uneven_dims_and_default_config():
    """hidden and I that are not multiples of the tiles (masked K and N); the default CPU config picks the path."""
    for T in (3, 21):
        x, router, w1, w3, w2 = _inputs(T, 7, hidden=40, inter=24, seed=T)
        y = moe_forward_triton(x, router, w1, w3, w2, 2, poison=True)
        assert rel_err(y, naive.moe_forward(x, router, w1, w3, w2, 2)) < FP32_TOL


def test_backend_triton_and_empty_input():
    x, router, w1, w3, w2 = _inputs(7, 5, seed=11)
    y = moe_forward(x, router, w1, w3, w2, 2, backend="triton")
    assert rel_err(y, moe_forward(x, router, w1, w3, w2, 2, backend="naive")) < FP32_TOL
    empty = moe_forward_triton(x[:0], router, w1, w3, w2, 2)
    assert empty.shape == (0, HIDDEN)


def test_cuda_kernel_registered():
    import kernels.moe.op  # noqa: F401

    assert torch._C._dispatch_has_kernel_for_dispatch_key("minimax::moe", "CUDA")


# ------------------------------------------------------------------------------------------------ GPU, MiniMax sizes

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
MINIMAX = dict(hidden=6144, inter=1024, E=32, top_k=2)  # I reduced from 9216 to save time


@pytest.fixture(scope="module")
def minimax_weights():
    E, hidden, inter = MINIMAX["E"], MINIMAX["hidden"], MINIMAX["inter"]
    g = torch.Generator("cuda").manual_seed(0)
    router = torch.randn(E, hidden, device="cuda", generator=g) / hidden**0.5  # fp32, logits of order 1
    w1, w3 = (torch.randn(E, inter, hidden, device="cuda", generator=g).bfloat16() / hidden**0.5 for _ in "13")
    w2 = torch.randn(E, hidden, inter, device="cuda", generator=g).bfloat16() / inter**0.5
    return router, w1, w3, w2


def _naive_fp32(x, router, w1, w3, w2, top_k):
    return naive.moe_forward(x.float(), router, w1.float(), w3.float(), w2.float(), top_k)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("T", [1, 5, 16, 17, 333, 1024, 4096, 16384])
def test_gpu_minimax_bf16(T, minimax_weights):
    router, w1, w3, w2 = minimax_weights
    x = torch.randn(T, MINIMAX["hidden"], device="cuda", generator=torch.Generator("cuda").manual_seed(T)).bfloat16()
    y = moe_forward_triton(x, router, w1, w3, w2, MINIMAX["top_k"], poison=True)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    assert rel_err(y, _naive_fp32(x, router, w1, w3, w2, MINIMAX["top_k"])) < 1e-2
    y2 = torch.ops.minimax.moe(x, router, w1, w3, w2, MINIMAX["top_k"])  # the op dispatches to the same kernels
    assert torch.equal(y, y2)  # no atomics: bitwise reproducible


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("T", [17, 1000, 1024, 4096])
@pytest.mark.parametrize("path", ["grouped", *TMA_PATHS])
def test_gpu_minimax_bf16_grouped_kernels(T, path, minimax_weights):
    """Each grouped-path kernel family (pointer / descriptor, gathered / permuted A, persistent) at MiniMax sizes."""
    router, w1, w3, w2 = minimax_weights
    x = torch.randn(T, MINIMAX["hidden"], device="cuda", generator=torch.Generator("cuda").manual_seed(T)).bfloat16()
    cfg = _config(T, MINIMAX["top_k"], MINIMAX["E"], path)
    y = moe_forward_triton(x, router, w1, w3, w2, MINIMAX["top_k"], config=cfg, poison=True)
    assert rel_err(y, _naive_fp32(x, router, w1, w3, w2, MINIMAX["top_k"])) < 1e-2
    y2 = moe_forward_triton(x, router, w1, w3, w2, MINIMAX["top_k"], config=cfg)
    assert torch.equal(y, y2)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("path", ["decode", "grouped", "grouped_tma"])
def test_gpu_fp32_tiny(path):
    T, E = 33, 5
    x, router, w1, w3, w2 = _inputs(T, E, hidden=64, inter=96, seed=1, device="cuda")
    y = moe_forward_triton(x, router, w1, w3, w2, 2, config=_config(T, 2, E, path), poison=True)
    assert rel_err(y, naive.moe_forward(x, router, w1, w3, w2, 2)) < FP32_TOL


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("T,path", [(4, None), (300, None), (300, "grouped_tma_permute_persistent")])
def test_gpu_cuda_graph_capture(T, path, minimax_weights):
    """No host synchronisation: the whole block captures into a CUDA graph and replays on new inputs."""
    router, w1, w3, w2 = minimax_weights
    x = torch.randn(T, MINIMAX["hidden"], device="cuda").bfloat16()
    cfg = None if path is None else _config(T, 2, MINIMAX["E"], path)
    moe_forward_triton(x, router, w1, w3, w2, 2, config=cfg)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = moe_forward_triton(x, router, w1, w3, w2, 2, config=cfg)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(y, _naive_fp32(x, router, w1, w3, w2, 2)) < 1e-2


@pytest.mark.gpu
@gpu
def test_gpu_opcheck():
    x, router, w1, w3, w2 = _inputs(20, 6, hidden=64, inter=32, seed=2, dtype=torch.bfloat16, device="cuda")
    torch.library.opcheck(torch.ops.minimax.moe.default, (x, router, w1, w3, w2, 2))
