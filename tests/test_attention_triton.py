"""Triton paged attention (``kernels/attention/{write,prefill,decode,traced}.py``) against the fp32 spec ``naive.py``.

Without CUDA the kernels run in Triton's interpreter: ``TRITON_INTERPRET=1`` is set here, before anything imports
the kernel modules (``@triton.jit`` reads it when a kernel is defined). CPU shapes are tiny (the interpreter is
numpy): D = 16 / 32, a handful of heads, pages of 4 or 8 positions against key tiles of 16 (tiles cross pages) and
pages of 16 (one page per tile). Outputs are NaN-poisoned, so an element a kernel does not write fails. Tests marked
``gpu`` use MiniMax sizes (H = 64, KVH = 8, D = 128, bf16, thousands of tokens).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import kernels  # noqa: E402,F401  (registers torch.ops.minimax.*)
from kernels.attention import naive, traced  # noqa: E402
from kernels.attention.decode import paged_attention_decode_triton  # noqa: E402
from kernels.attention.prefill import (  # noqa: E402
    PrefillConfig,
    paged_attention_prefill_triton,
    supports_head_dim,
)
from kernels.attention.write import paged_kv_write_triton  # noqa: E402
from tests.utils import rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL = 1e-5 if DEVICE == "cpu" else 1e-4  # GPU fp32 products use tf32x3


def _pool(B, KVH, S, D, page_size, seed, dtype=torch.float32, device=DEVICE, spare=3):
    """A shuffled page pool holding random K/V for positions 0..S-1 of B rows (plus spare pages)."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, KVH, S, D, generator=g)
    values = torch.randn(B, KVH, S, D, generator=g)
    M = -(-S // page_size)
    k_cache, v_cache, table = naive.contiguous_to_paged(keys, values, page_size, num_pages=B * M + spare, generator=g)
    return k_cache.to(device, dtype), v_cache.to(device, dtype), table.to(device), g


def _nan(shape, dtype, device=DEVICE):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _positions(starts, device=DEVICE):
    return torch.tensor(starts, dtype=torch.int64, device=device)


# ------------------------------------------------------------------------------------------------ write


@pytest.mark.parametrize("T", [1, 5, 37])
@pytest.mark.parametrize("page_size", [4, 16])
def test_write_matches_reference(T, page_size):
    B, KVH, D = 3, 2, 16
    S = 64
    k_cache, v_cache, table, g = _pool(B, KVH, S, D, page_size, seed=T + page_size)
    starts = [-3, 0, S - T]  # a row with left pads, a fresh row, a row ending at the capacity
    pos = _positions(starts)
    k = torch.randn(B, T, KVH, D, generator=g).to(DEVICE)
    v = torch.randn(B, T, KVH, D, generator=g).to(DEVICE)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    naive.paged_kv_write(ref_k, ref_v, k, v, table, pos)
    paged_kv_write_triton(k_cache, v_cache, k, v, table, pos)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)  # the whole pool: nothing else touched


def test_write_strided_inputs_and_dtype_cast():
    """k, v as views of a fused [B, T, KVH, 2D] tensor, fp32 inputs into an fp16 cache (cast on store)."""
    B, T, KVH, D, ps = 2, 6, 3, 16, 8
    k_cache, v_cache, table, g = _pool(B, KVH, 32, D, ps, seed=3, dtype=torch.float16)
    kv = torch.randn(B, T, KVH, 2 * D, generator=g).to(DEVICE)
    k, v = kv[..., :D], kv[..., D:]
    pos = _positions([4, -2])
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    naive.paged_kv_write(ref_k, ref_v, k, v, table, pos)
    paged_kv_write_triton(k_cache, v_cache, k, v, table, pos)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


# ------------------------------------------------------------------------------------------------ prefill


def _prefill_case(B, T, KVH, G, D, page_size, starts, seed, config=None, dtype=torch.float32):
    S = max(s for s in starts) + T
    S = -(-S // page_size) * page_size + page_size  # one page of slack in the table
    k_cache, v_cache, table, g = _pool(B, KVH, S, D, page_size, seed=seed, dtype=dtype)
    q = torch.randn(B, T, KVH * G, D, generator=g).to(DEVICE, dtype)
    pos = _positions(starts)
    scale = D**-0.5
    out = _nan((B, T, KVH * G, D), dtype)
    o = paged_attention_prefill_triton(q, k_cache, v_cache, table, pos, scale, out=out, config=config)
    assert o.data_ptr() == out.data_ptr()
    ref = naive.paged_attention(q.float(), k_cache.float(), v_cache.float(), table, pos, scale)
    return o, ref, pos


@pytest.mark.parametrize(
    "B, T, G, page_size, starts",
    [
        (1, 1, 1, 4, [0]),  # one token, nothing before it
        (1, 5, 4, 4, [9]),  # history, a chunk crossing a page
        (1, 37, 8, 8, [0]),  # causal from 0, T not a multiple of any tile
        (3, 37, 4, 4, [-7, 0, 21]),  # left pads, fresh row, history; pages crossed mid-chunk
        (2, 5, 8, 16, [-2, 40]),  # one page per key tile (the aligned path)
        (2, 37, 1, 16, [3, -40]),  # MHA (G = 1); a row made of left pads only
    ],
    ids=["T1", "T5-G4-hist", "T37-G8", "B3-ragged", "aligned-pages", "G1-allpad"],
)
def test_prefill_matches_reference(B, T, G, page_size, starts):
    o, ref, pos = _prefill_case(B, T, 2, G, 16, page_size, starts, seed=T + 7 * G + B)
    assert o.shape == ref.shape and o.dtype == ref.dtype and o.is_contiguous()
    assert rel_err(o, ref) < FP32_TOL
    for b, s in enumerate(starts):  # left pads give exact zeros
        pads = max(0, min(T, -s))
        assert torch.equal(o[b, :pads], torch.zeros_like(o[b, :pads]))


@pytest.mark.parametrize("D", [16, 32])
@pytest.mark.parametrize(
    "config", [PrefillConfig(16, 16, 1, 1), PrefillConfig(32, 16, 2, 1), PrefillConfig(16, 32, 1, 2)],
    ids=["m16n16", "m32n16", "m16n32"],
)
def test_prefill_tile_configs_and_head_dims(D, config):
    o, ref, _ = _prefill_case(2, 13, 2, 4, D, 8, [-3, 18], seed=D, config=config)
    assert rel_err(o, ref) < FP32_TOL


def test_prefill_odd_group_and_contiguous_table():
    """G = 3 (padded to 4 rows per token) over an identity table (the contiguous cache)."""
    B, T, KVH, G, D, ps = 2, 9, 2, 3, 16, 8
    g = torch.Generator().manual_seed(11)
    M = 4
    k_cache = torch.randn(B * M, KVH, ps, D, generator=g).to(DEVICE)
    v_cache = torch.randn(B * M, KVH, ps, D, generator=g).to(DEVICE)
    table = torch.arange(B * M, dtype=torch.int32, device=DEVICE).view(B, M)
    q = torch.randn(B, T, KVH * G, D, generator=g).to(DEVICE)
    pos = _positions([5, 20])
    out = _nan(q.shape, q.dtype)
    paged_attention_prefill_triton(q, k_cache, v_cache, table, pos, 0.3, out=out)
    assert rel_err(out, naive.paged_attention(q, k_cache, v_cache, table, pos, 0.3)) < FP32_TOL


# ------------------------------------------------------------------------------------------------ decode


@pytest.mark.parametrize(
    "B, G, page_size, starts",
    [
        (1, 1, 4, [0]),  # one key
        (1, 8, 4, [70]),  # several splits (32 positions each on the CPU), pages crossed
        (4, 4, 8, [-1, 5, 31, 94]),  # a pad row, within one split, a split's last slot, the capacity's end
        (3, 8, 16, [40, 0, 63]),  # aligned pages
    ],
    ids=["one-key", "B1-splits", "B4-ragged", "aligned"],
)
def test_decode_matches_reference(B, G, page_size, starts):
    KVH, D = 2, 16
    S = -(-(max(starts) + 1) // page_size) * page_size
    k_cache, v_cache, table, g = _pool(B, KVH, S, D, page_size, seed=B + G)
    q = torch.randn(B, 1, KVH * G, D, generator=g).to(DEVICE)
    pos = _positions(starts)
    out = _nan(q.shape, q.dtype)
    o = paged_attention_decode_triton(q, k_cache, v_cache, table, pos, D**-0.5, out=out)
    assert o.data_ptr() == out.data_ptr()
    ref = naive.paged_attention(q, k_cache, v_cache, table, pos, D**-0.5)
    assert rel_err(o, ref) < FP32_TOL
    for b, s in enumerate(starts):
        if s < 0:
            assert torch.equal(o[b], torch.zeros_like(o[b]))


def test_decode_split_override_and_d32():
    B, KVH, G, D, ps = 2, 1, 4, 32, 8
    k_cache, v_cache, table, g = _pool(B, KVH, 80, D, ps, seed=5)
    q = torch.randn(B, 1, KVH * G, D, generator=g).to(DEVICE)
    pos = _positions([79, 17])
    ref = naive.paged_attention(q, k_cache, v_cache, table, pos, 0.2)
    for split in (16, 48, 128):
        o = paged_attention_decode_triton(q, k_cache, v_cache, table, pos, 0.2, out=_nan(q.shape, q.dtype), split=split)
        assert rel_err(o, ref) < FP32_TOL


def test_chunked_prefill_then_decode_equals_one_pass():
    """Write + prefill a prompt in two chunks, then write + decode 3 tokens == the spec over the whole sequence."""
    B, KVH, G, D, ps, M = 2, 2, 4, 16, 4, 8
    H = KVH * G
    g = torch.Generator().manual_seed(21)
    P = B * M + 2
    k_cache = torch.zeros(P, KVH, ps, D, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    table = torch.randperm(P, generator=g)[: B * M].view(B, M).to(torch.int32).to(DEVICE)
    L = 15  # 12 prompt tokens (row 1 left-padded by 4) + 3 decode steps
    q = torch.randn(B, L, H, D, generator=g).to(DEVICE)
    k = torch.randn(B, L, KVH, D, generator=g).to(DEVICE)
    v = torch.randn(B, L, KVH, D, generator=g).to(DEVICE)
    pad = torch.tensor([0, 4], device=DEVICE)
    outs = []
    for c0, c1 in ((0, 7), (7, 12)):
        pos = c0 - pad
        paged_kv_write_triton(k_cache, v_cache, k[:, c0:c1], v[:, c0:c1], table, pos)
        outs.append(paged_attention_prefill_triton(q[:, c0:c1], k_cache, v_cache, table, pos, 0.25))
    for t in range(12, L):
        pos = t - pad
        paged_kv_write_triton(k_cache, v_cache, k[:, t : t + 1], v[:, t : t + 1], table, pos)
        outs.append(paged_attention_decode_triton(q[:, t : t + 1], k_cache, v_cache, table, pos, 0.25))
    o = torch.cat(outs, 1)
    # spec: one write and one attention over the whole sequence into a fresh pool
    k2, v2 = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    naive.paged_kv_write(k2, v2, k, v, table, -pad)
    ref = naive.paged_attention(q, k2, v2, table, -pad, 0.25)
    assert rel_err(o, ref) < FP32_TOL


# ------------------------------------------------------------------------------------------------ traced bodies


def test_traced_launchers_match_eager():
    """The wrap_triton bodies (run eagerly here) give the launchers' results."""
    B, T, KVH, G, D, ps = 2, 6, 2, 4, 16, 4
    k_cache, v_cache, table, g = _pool(B, KVH, 40, D, ps, seed=31)
    q = torch.randn(B, T, KVH * G, D, generator=g).to(DEVICE)
    k = torch.randn(B, T, KVH, D, generator=g).to(DEVICE)
    v = torch.randn(B, T, KVH, D, generator=g).to(DEVICE)
    pos = _positions([-2, 30])
    kc, vc = k_cache.clone(), v_cache.clone()
    traced.paged_kv_write_traceable(kc, vc, k, v, table, pos)
    naive.paged_kv_write(k_cache, v_cache, k, v, table, pos)
    assert torch.equal(kc, k_cache) and torch.equal(vc, v_cache)
    o = traced.paged_attention_prefill_traceable(q, kc, vc, table, pos, 0.25)
    assert rel_err(o, naive.paged_attention(q, kc, vc, table, pos, 0.25)) < FP32_TOL
    o = traced.paged_attention_decode_traceable(q[:, :1], kc, vc, table, pos + 5, 0.25)
    assert rel_err(o, naive.paged_attention(q[:, :1], kc, vc, table, pos + 5, 0.25)) < FP32_TOL


# ------------------------------------------------------------------------------------------------ errors


def test_rejects_bad_inputs():
    B, KVH, G, D, ps = 2, 2, 2, 16, 4
    k_cache, v_cache, table, g = _pool(B, KVH, 16, D, ps, seed=41)
    q = torch.randn(B, 3, KVH * G, D, generator=g).to(DEVICE)
    k = torch.randn(B, 3, KVH, D, generator=g).to(DEVICE)
    assert supports_head_dim(64) and supports_head_dim(128) and not supports_head_dim(96)
    with pytest.raises(ValueError, match="past the block table"):
        paged_attention_prefill_triton(q, k_cache, v_cache, table, _positions([0, 14]), 0.25)
    with pytest.raises(ValueError, match="past the block table"):
        paged_kv_write_triton(k_cache, v_cache, k, k, table, _positions([14, 0]))
    bad_table = table.clone()
    bad_table[1, 0] = k_cache.shape[0]
    with pytest.raises(ValueError, match="outside the pool"):
        paged_attention_decode_triton(q[:, :1], k_cache, v_cache, bad_table, _positions([0, 0]), 0.25)
    with pytest.raises(ValueError, match="T = 1"):
        paged_attention_decode_triton(q, k_cache, v_cache, table, _positions([0, 0]), 0.25)
    with pytest.raises(ValueError, match="head dim"):
        kc, vc = k_cache[..., :12], v_cache[..., :12]
        paged_attention_prefill_triton(q[..., :12], kc, vc, table, _positions([0, 0]), 1.0)


# ------------------------------------------------------------------------------------------------ the ops (CPU: reference)


def _op_inputs(device, dtype=torch.float32, B=2, T=3, KVH=2, G=4, D=16, ps=4, S=24, seed=51):
    k_cache, v_cache, table, g = _pool(B, KVH, S, D, ps, seed=seed, dtype=dtype, device=device)
    q = torch.randn(B, T, KVH * G, D, generator=g).to(device, dtype)
    k = torch.randn(B, T, KVH, D, generator=g).to(device, dtype)
    v = torch.randn(B, T, KVH, D, generator=g).to(device, dtype)
    pos = torch.tensor([-1, 9][:B], dtype=torch.int64, device=device)
    return q, k, v, k_cache, v_cache, table, pos


def test_ops_reference_path_and_opcheck():
    q, k, v, k_cache, v_cache, table, pos = _op_inputs("cpu")
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    naive.paged_kv_write(ref_k, ref_v, k, v, table, pos)
    torch.ops.minimax.paged_kv_write(k_cache, v_cache, k, v, table, pos)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    o = torch.ops.minimax.paged_attention_prefill(q, k_cache, v_cache, table, pos, 0.25)
    assert torch.equal(o, naive.paged_attention(q, k_cache, v_cache, table, pos, 0.25))
    od = torch.ops.minimax.paged_attention_decode(q[:, :1], k_cache, v_cache, table, pos + 3, 0.25)
    assert torch.equal(od, naive.paged_attention(q[:, :1], k_cache, v_cache, table, pos + 3, 0.25))
    torch.library.opcheck(torch.ops.minimax.paged_kv_write.default, (k_cache, v_cache, k, v, table, pos))
    torch.library.opcheck(torch.ops.minimax.paged_attention_prefill.default, (q, k_cache, v_cache, table, pos, 0.25))
    torch.library.opcheck(
        torch.ops.minimax.paged_attention_decode.default,
        (q[:, :1].contiguous(), k_cache, v_cache, table, pos + 3, 0.25),
    )


# ------------------------------------------------------------------------------------------------ GPU, MiniMax sizes

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
KVH_MM, G_MM, D_MM = 8, 8, 128  # MiniMax-01 softmax layers: 64 query heads, 8 kv heads, head dim 128


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("page_size", [16, 256])
@pytest.mark.parametrize("T, starts", [(1000, [3000, -200]), (4099, [0]), (63, [8190, 17])])
def test_gpu_write_prefill_bf16_minimax_sizes(page_size, T, starts):
    B = len(starts)
    S = max(starts) + T
    k_cache, v_cache, table, g = _pool(B, KVH_MM, S, D_MM, page_size, seed=T, dtype=torch.bfloat16)
    pos = _positions(starts)
    q = torch.randn(B, T, KVH_MM * G_MM, D_MM, generator=g).to(DEVICE, torch.bfloat16)
    k = torch.randn(B, T, KVH_MM, D_MM, generator=g).to(DEVICE, torch.bfloat16)
    v = torch.randn(B, T, KVH_MM, D_MM, generator=g).to(DEVICE, torch.bfloat16)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    naive.paged_kv_write(ref_k, ref_v, k, v, table, pos)
    paged_kv_write_triton(k_cache, v_cache, k, v, table, pos)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    out = _nan(q.shape, q.dtype)
    paged_attention_prefill_triton(q, k_cache, v_cache, table, pos, D_MM**-0.5, out=out)
    ref = naive.paged_attention(q.float(), k_cache.float(), v_cache.float(), table, pos, D_MM**-0.5)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("page_size", [16, 64])
@pytest.mark.parametrize("starts", [[20000], [5, 9000, -1, 40000]])
def test_gpu_decode_bf16_minimax_sizes(page_size, starts):
    B = len(starts)
    S = max(starts) + 1 + 3 * page_size
    k_cache, v_cache, table, g = _pool(B, KVH_MM, S, D_MM, page_size, seed=B, dtype=torch.bfloat16)
    pos = _positions(starts)
    q = torch.randn(B, 1, KVH_MM * G_MM, D_MM, generator=g).to(DEVICE, torch.bfloat16)
    out = _nan(q.shape, q.dtype)
    paged_attention_decode_triton(q, k_cache, v_cache, table, pos, D_MM**-0.5, out=out)
    ref = naive.paged_attention(q.float(), k_cache.float(), v_cache.float(), table, pos, D_MM**-0.5)
    assert rel_err(out, ref) < 1e-2
    o = traced.paged_attention_decode_traceable(q, k_cache, v_cache, table, pos, D_MM**-0.5)
    assert rel_err(o, ref) < 1e-2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_fp32_and_head_dims(D):
    o, ref, _ = _prefill_case(2, 300, 4, 4, D, 16, [-20, 500], seed=D)
    assert rel_err(o, ref) < FP32_TOL
    B, KVH, G = 2, 4, 4
    k_cache, v_cache, table, g = _pool(B, KVH, 3000, D, 16, seed=D)
    q = torch.randn(B, 1, KVH * G, D, generator=g).to(DEVICE)
    pos = _positions([2999, 1234])
    o = paged_attention_decode_triton(q, k_cache, v_cache, table, pos, 0.1, out=_nan(q.shape, q.dtype))
    assert rel_err(o, naive.paged_attention(q, k_cache, v_cache, table, pos, 0.1)) < FP32_TOL


@pytest.mark.gpu
@gpu
def test_gpu_ops_cuda_fake_strides_and_opcheck():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v, k_cache, v_cache, table, pos = _op_inputs("cuda", torch.bfloat16, G=8, D=128, S=96, ps=16)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    naive.paged_kv_write(ref_k, ref_v, k, v, table, pos)
    torch.ops.minimax.paged_kv_write(k_cache, v_cache, k, v, table, pos)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    args = (q, k_cache, v_cache, table, pos, 0.125)
    for op, a in ((torch.ops.minimax.paged_attention_prefill, args),
                  (torch.ops.minimax.paged_attention_decode, (q[:, :1].contiguous(),) + args[1:])):  # fmt: skip
        o = op(*a)
        ref = naive.paged_attention(*(x.float() if x.is_floating_point() else x for x in a[:3]), *a[3:])
        assert rel_err(o, ref) < 1e-2
        with FakeTensorMode() as mode:
            fake = op(*(mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in a))
        assert (o.shape, o.dtype, o.stride()) == (fake.shape, fake.dtype, fake.stride())
        torch.library.opcheck(op.default, a)
    torch.library.opcheck(torch.ops.minimax.paged_kv_write.default, (k_cache, v_cache, k, v, table, pos))


@pytest.mark.gpu
@gpu
def test_gpu_export_dynamic_and_mutation_analysis():
    """Export the traced bodies with dynamic B and T: the write mutates exactly the two caches (no clones of the
    pool), the attention kernels only their own outputs, and the exported program runs correctly."""
    from torch.export import Dim

    class Step(torch.nn.Module):
        def forward(self, q, k, v, k_cache, v_cache, table, pos):
            traced.paged_kv_write_traceable(k_cache, v_cache, k, v, table, pos)
            o = traced.paged_attention_prefill_traceable(q, k_cache, v_cache, table, pos, 0.125)
            last = pos + q.shape[1] - 1
            od = traced.paged_attention_decode_traceable(q[:, -1:], k_cache, v_cache, table, last, 0.125)
            return o, od

    q, k, v, k_cache, v_cache, table, pos = _op_inputs("cuda", torch.bfloat16, B=2, T=5, G=8, D=128, S=96, ps=16)
    b, t = Dim("b", min=1, max=8), Dim("t", min=1, max=64)
    shapes = ({0: b, 1: t}, {0: b, 1: t}, {0: b, 1: t}, None, None, {0: b}, {0: b})
    ep = torch.export.export(Step(), (q, k, v, k_cache, v_cache, table, pos), dynamic_shapes=shapes)
    ep = ep.run_decompositions({})  # functionalised: user-kernel mutations become mutated inputs
    mutated = set(ep.graph_signature.user_inputs_to_mutate.values())
    assert mutated == {"k_cache", "v_cache"}, ep.graph_signature
    assert len(ep.range_constraints) >= 2  # B and T stay symbolic (no specialisation)
    for node in ep.graph.nodes:  # functional wrappers clone only what the kernels store into
        if "triton_kernel_wrapper_functional" in str(node.target):
            clones = set(node.kwargs["tensors_to_clone"])
            assert clones <= {"k_cache_ptr", "v_cache_ptr", "o_ptr", "m_ptr", "l_ptr", "acc_ptr"}, clones
    kc, vc = k_cache.clone(), v_cache.clone()
    o, od = ep.module()(q, k, v, kc, vc, table, pos)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    naive.paged_kv_write(ref_k, ref_v, k, v, table, pos)
    assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)
    ref = naive.paged_attention(q.float(), ref_k.float(), ref_v.float(), table, pos, 0.125)
    assert rel_err(o, ref) < 1e-2


@pytest.mark.gpu
@gpu
def test_gpu_torch_compile_ops():
    """The ops under torch.compile (Inductor decomposes the triton_op bodies: wrap_triton launches compiled into the
    output), dynamic shapes: the write lands in the caches, the attention matches the spec."""

    def step(q, k, v, k_cache, v_cache, table, pos):
        torch.ops.minimax.paged_kv_write(k_cache, v_cache, k, v, table, pos)
        o = torch.ops.minimax.paged_attention_prefill(q, k_cache, v_cache, table, pos, 0.125)
        od = torch.ops.minimax.paged_attention_decode(q[:, -1:], k_cache, v_cache, table, pos + q.shape[1] - 1, 0.125)
        return o, od

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for B, T in ((2, 5), (3, 17)):
        q, k, v, k_cache, v_cache, table, pos = _op_inputs("cuda", torch.bfloat16, B=B, T=T, G=8, D=128, S=96, ps=16)
        pos = torch.tensor([-1, 9, 30][:B], dtype=torch.int64, device="cuda")
        ref_k, ref_v = k_cache.clone(), v_cache.clone()
        naive.paged_kv_write(ref_k, ref_v, k, v, table, pos)
        o, od = compiled(q, k, v, k_cache, v_cache, table, pos)
        assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
        ref = naive.paged_attention(q.float(), ref_k.float(), ref_v.float(), table, pos, 0.125)
        assert rel_err(o, ref) < 1e-2
        ref_d = naive.paged_attention(q[:, -1:].float(), ref_k.float(), ref_v.float(), table, pos + T - 1, 0.125)
        assert rel_err(od, ref_d) < 1e-2


# ------------------------------------------------------------------------------------------------ library route
@pytest.mark.parametrize("page_size, n_pages", [(4, 7), (16, 3), (16, 1)])
def test_gather_pages_matches_indexing(page_size, n_pages):
    from kernels.attention.route import gather_pages

    k_cache, _, table, _ = _pool(2, 3, page_size * 9, 16, page_size, seed=page_size + n_pages)
    for b in range(2):
        out = _nan((1, 3, n_pages * page_size, 16), k_cache.dtype)
        gather_pages(k_cache, table[b], n_pages, out=out)
        ref = k_cache[table[b, :n_pages].long()].permute(1, 0, 2, 3).reshape(1, 3, n_pages * page_size, 16)
        assert torch.equal(out, ref)


def test_library_rule_on_shapes():
    from kernels.attention.route import MIN_KEYS, MIN_QUERIES, chunk_qualifies

    T = MIN_QUERIES
    assert chunk_qualifies(T, [MIN_KEYS - T, 50_000], 256, 8, 128)
    assert not chunk_qualifies(T - 1, [MIN_KEYS, 50_000], 256, 8, 128)  # short chunk
    assert not chunk_qualifies(T, [MIN_KEYS - T - 1, 50_000], 256, 8, 128)  # a row with too few keys
    assert not chunk_qualifies(T, [-3, 50_000], 256, 8, 128)  # left pads
    assert not chunk_qualifies(T, [2**21 - T, 20_000], 256, 8, 128)  # 2^31 elements gathered
    assert chunk_qualifies(T, [2**21 - T - 256, 20_000], 256, 8, 128)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("page_size", [16, 256])
def test_gpu_prefill_library_path(page_size, monkeypatch):
    """Long chunks through cuDNN over gathered pages (rows with different histories, shuffled pages) against the
    fp32 spec, the op choosing that path (and the Triton kernel when switched off), both within bf16 rounding."""
    from kernels.attention import route

    starts, T = [9000, 6200], route.MIN_QUERIES + 53
    B = len(starts)
    k_cache, v_cache, table, g = _pool(B, KVH_MM, max(starts) + T, D_MM, page_size, seed=page_size, dtype=torch.bfloat16)
    pos = _positions(starts)
    q = torch.randn(B, T, KVH_MM * G_MM, D_MM, generator=g).to(DEVICE, torch.bfloat16)
    assert route.use_library(q, k_cache, starts)
    out = _nan(q.shape, q.dtype)
    route.paged_attention_prefill_library(q, k_cache, v_cache, table, starts, D_MM**-0.5, out=out)
    ref = naive.paged_attention(q.float(), k_cache.float(), v_cache.float(), table, pos, D_MM**-0.5)
    assert rel_err(out, ref) < 1e-2
    assert torch.equal(torch.ops.minimax.paged_attention_prefill(q, k_cache, v_cache, table, pos, D_MM**-0.5), out)
    monkeypatch.setenv("MINIMAX_PREFILL_LIBRARY", "0")
    assert not route.use_library(q, k_cache, starts)
    tri = torch.ops.minimax.paged_attention_prefill(q, k_cache, v_cache, table, pos, D_MM**-0.5)
    assert rel_err(tri, ref) < 1e-2 and not torch.equal(tri, out)


@pytest.mark.gpu
@gpu
def test_gpu_prefill_dispatch_op_in_aoti_package(tmp_path):
    """A program whose chunks may be long calls the opaque dispatch op; compiled by AOTInductor it takes the library
    path on a long chunk and the Triton kernel on a short one, both equal to the spec."""
    from torch.export import Dim

    from kernels.attention import route

    class Attend(torch.nn.Module):
        def forward(self, q, k_cache, v_cache, table, pos):
            return torch.ops.minimax.paged_attention_prefill(q, k_cache, v_cache, table, pos, D_MM**-0.5)

    starts, T = [9000], route.MIN_QUERIES + 7
    k_cache, v_cache, table, g = _pool(1, KVH_MM, starts[0] + T, D_MM, 256, seed=5, dtype=torch.bfloat16)
    q = torch.randn(1, T, KVH_MM * G_MM, D_MM, generator=g).to(DEVICE, torch.bfloat16)
    pos = _positions(starts)
    t = Dim("t", min=2, max=4096)
    ep = torch.export.export(Attend(), (q, k_cache, v_cache, table, pos), dynamic_shapes=({1: t}, None, None, None, None))
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "attend.pt2"))
    compiled = torch._inductor.aoti_load_package(path)
    for q_run, p_run in ((q, starts), (q[:, :64].contiguous(), [123])):
        positions = _positions(p_run)
        o = compiled(q_run, k_cache, v_cache, table, positions)
        ref = naive.paged_attention(q_run.float(), k_cache.float(), v_cache.float(), table, positions, D_MM**-0.5)
        assert rel_err(o, ref) < 1e-2
    long_out = compiled(q, k_cache, v_cache, table, pos)
    assert torch.equal(long_out, route.paged_attention_prefill_library(q, k_cache, v_cache, table, starts, D_MM**-0.5))
