"""The expert-parallel MoE on Triton (``minimax::moe_ep`` / ``moe_quantized_ep`` on CUDA): one rank's share of the
block, routed over every expert, run over the rank's experts only (``traced.moe_forward_traceable`` with
``expert_start``), against ``naive.moe_forward_ep``, and the ranks' shares summed against the unsplit block.

Without CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set before the kernels are imported);
every buffer the kernels write is poisoned first (NaN, 2^30), so a slot of another rank's expert that leaked into a
sum, or a row no kernel wrote, shows. Tests marked ``gpu``: MiniMax sizes (hidden 6144, 32 experts, top-2, bf16; I
reduced to 1024) at the per-rank shapes of EP 8 (4 experts per rank) through the registered ops.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from kernels.moe import naive, stages  # noqa: E402
from tests.utils import rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL = 1e-5 if DEVICE == "cpu" else 1e-4


def _case(T, E, hidden, inter, seed, mode=None, dominant=None, dtype=torch.float32):
    """x, router and the experts (w1, w3, w2; quantized in ``mode`` as (q, scale) pairs)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, hidden, generator=g)
    router = torch.randn(E, hidden, generator=g)
    if dominant is not None:  # every token's first choice is expert ``dominant``
        x, router = x + 2.0, 0.1 * router
        router[dominant] = 16.0 / hidden
    ws = [torch.randn(E, inter, hidden, generator=g) / hidden**0.5,
          torch.randn(E, inter, hidden, generator=g) / hidden**0.5,
          torch.randn(E, hidden, inter, generator=g) / inter**0.5]
    if mode is None:
        ws = [(w.to(DEVICE, dtype), None) for w in ws]
    else:
        ws = [tuple(t.to(DEVICE) for t in naive.quantize_weight(w, mode)) for w in ws]
    return x.to(DEVICE, dtype), router.to(DEVICE), ws


def _share(x, router, ws, top_k, start, n, path, mode, **kw):
    from kernels.moe.traced import moe_forward_traceable, static_config

    local = [(w[start:start + n], None if s is None else s[start:start + n]) for w, s in ws]
    (w1, s1), (w3, s3), (w2, s2) = local
    decode = path == "decode"
    cfg = static_config(x.shape[0], top_k, router.shape[0], x.device, decode_kernels=decode,
                        mode=None if mode is None else mode)
    scales = None if mode is None else (s1, s3, s2)
    got = moe_forward_traceable(x, router, w1, w3, w2, top_k, config=cfg, decode_kernels=decode, scales=scales,
                                mode=mode or "experts-int8", expert_start=start, poison=True, **kw)
    want = naive.moe_forward_ep(x, router, w1, w3, w2, top_k, start, scales, mode or "none")
    return got, want


def _whole(x, router, ws, top_k, mode):
    (w1, s1), (w3, s3), (w2, s2) = ws
    if mode is None:
        return naive.moe_forward(x, router, w1, w3, w2, top_k)
    return naive.moe_forward_quantized(x, router, w1, s1, w3, s3, w2, s2, top_k, mode)


@pytest.mark.parametrize("mode", [None, *naive.QUANT_MODES])
@pytest.mark.parametrize("path,T", [("decode", 1), ("decode", 7), ("grouped", 5), ("grouped", 33)])
@pytest.mark.parametrize("world", [2, 4])
def test_shares_match_reference_and_sum_to_the_block(world, path, T, mode):
    """8 experts over 2 or 4 ranks; hidden 40 and I 24 are not multiples of the CPU tiles (masked K, partial N)."""
    E, top_k = 8, 2
    x, router, ws = _case(T, E, 40, 24, seed=T + 10 * world, mode=mode)
    n = E // world
    total = torch.zeros_like(x, dtype=torch.float32)
    for r in range(world):
        got, want = _share(x, router, ws, top_k, r * n, n, path, mode)
        assert got.shape == x.shape and got.dtype == x.dtype and got.is_contiguous()
        assert not bool(got.isnan().any())
        assert rel_err(got, want) < FP32_TOL
        total += got.float()
    assert rel_err(total, _whole(x, router, ws, top_k, mode)) < FP32_TOL


@pytest.mark.parametrize("path,T", [("decode", 9), ("grouped", 21)])
def test_rank_without_chosen_experts_returns_zeros(path, T):
    """top-1 routing and every token on expert 5: the ranks holding 0..3 and 6..7 get no slot at all (the align
    kernel places nothing, every ``inv_perm`` stays -1); their share is exactly zero, expert 5's rank has it all."""
    E, top_k = 8, 1
    x, router, ws = _case(T, E, 32, 48, seed=3, dominant=5)
    assert (naive.moe_route(x, router, top_k)[1][:, 0] == 5).all()
    for start, n in [(0, 4), (6, 2)]:
        got, _ = _share(x, router, ws, top_k, start, n, path, None)
        assert torch.equal(got, torch.zeros_like(got))
    got, want = _share(x, router, ws, top_k, 4, 2, path, None)
    assert rel_err(got, want) < FP32_TOL
    assert rel_err(got, _whole(x, router, ws, top_k, None)) < FP32_TOL


def test_uneven_shares():
    """Ranks with 3 and 5 of the 8 experts (any contiguous range is a valid share)."""
    x, router, ws = _case(13, 8, 32, 48, seed=4)
    a, wa = _share(x, router, ws, 2, 0, 3, "grouped", None)
    b, wb = _share(x, router, ws, 2, 3, 5, "grouped", None)
    assert rel_err(a, wa) < FP32_TOL and rel_err(b, wb) < FP32_TOL
    assert rel_err(a.float() + b.float(), _whole(x, router, ws, 2, None)) < FP32_TOL


def test_refusals():
    from kernels.moe.traced import moe_forward_traceable

    x, router, ws = _case(3, 8, 32, 48, seed=1)
    w1, w3, w2 = (w[:4] for w, _ in ws)
    with pytest.raises(ValueError, match="outside the router's 8"):
        moe_forward_traceable(x, router, w1, w3, w2, 2, expert_start=5)
    with pytest.raises(ValueError, match="pass expert_start"):
        moe_forward_traceable(x, router, w1, w3, w2, 2)


def test_combine_skips_negative_rows():
    """The combine kernel and its stage reference: a slot whose ``inv_perm`` is -1 adds nothing (the rows it
    would have pointed to are NaN here), every other slot adds its row."""
    from kernels.moe import grouped

    T, top_k, hidden, rows = 6, 2, 40, 16
    g = torch.Generator().manual_seed(0)
    y_perm = torch.randn(rows, hidden, generator=g).to(DEVICE)
    inv_perm = torch.randperm(rows, generator=g)[: T * top_k].to(torch.int32)
    dropped = torch.tensor([1, 4, 5, 10])
    y_perm[inv_perm[dropped].long()] = float("nan")
    inv_perm[dropped] = -1
    inv_perm = inv_perm.to(DEVICE)
    want = torch.zeros(T, hidden)
    for s, row in enumerate(inv_perm.tolist()):
        if row >= 0:
            want[s // top_k] += y_perm[row].cpu()
    out = torch.full((T, hidden), float("nan"), device=DEVICE)
    got = grouped.combine(y_perm, inv_perm, T, top_k, out_dtype=torch.float32, out=out)
    assert torch.allclose(got.cpu(), want, rtol=1e-6, atol=1e-6)
    assert torch.allclose(stages.moe_combine(y_perm, inv_perm, top_k).cpu(), want, rtol=1e-6, atol=1e-6)


def test_op_off_cuda_is_the_reference():
    import kernels  # noqa: F401  (registers the ops)

    x, router, ws = _case(5, 8, 16, 24, seed=2)
    x, router = x.cpu(), router.cpu()
    w1, w3, w2 = (w[2:6].cpu() for w, _ in ws)
    got = torch.ops.minimax.moe_ep(x, router, w1, w3, w2, 2, 2)
    assert torch.equal(got, naive.moe_forward_ep(x, router, w1, w3, w2, 2, 2))


# ------------------------------------------------------------------------------------------------ GPU, MiniMax sizes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", [None, "experts-int8", "experts-fp8"])
@pytest.mark.parametrize("T", [1, 16, 333, 4096])
def test_gpu_ep8_shares_at_minimax_sizes(T, mode):
    """EP 8 of 32 experts (4 per rank), hidden 6144, I 1024, top-2, bf16: each rank's share through the registered
    op against the fp32 reference, and the shares summed against the unsplit block's op."""
    import kernels  # noqa: F401

    E, top_k, world = 32, 2, 8
    x, router, ws = _case(T, E, 6144, 1024, seed=T, mode=mode, dtype=torch.bfloat16 if mode is None else torch.float32)
    x = x.bfloat16()
    n = E // world
    total = torch.zeros(x.shape, dtype=torch.float32, device="cuda")
    for r in range(world):
        (w1, s1), (w3, s3), (w2, s2) = [(w[r * n:(r + 1) * n], None if s is None else s[r * n:(r + 1) * n])
                                        for w, s in ws]
        if mode is None:
            w1, w3, w2 = w1.bfloat16(), w3.bfloat16(), w2.bfloat16()
            got = torch.ops.minimax.moe_ep(x, router, w1, w3, w2, top_k, r * n)
            want = naive.moe_forward_ep(x.float(), router, w1.float(), w3.float(), w2.float(), top_k, r * n)
        else:
            got = torch.ops.minimax.moe_quantized_ep(x, router, w1, s1, w3, s3, w2, s2, top_k, mode, r * n)
            want = naive.moe_forward_ep(x, router, w1, w3, w2, top_k, r * n, (s1, s3, s2), mode)
        assert rel_err(got, want) < 1e-2
        total += got.float()
    (w1, s1), (w3, s3), (w2, s2) = ws
    if mode is None:
        whole = torch.ops.minimax.moe(x, router, w1.bfloat16(), w3.bfloat16(), w2.bfloat16(), top_k)
    else:
        whole = torch.ops.minimax.moe_quantized(x, router, w1, s1, w3, s3, w2, s2, top_k, mode)
    assert rel_err(total, whole.float()) < 1e-2
