"""MoE stage references (``kernels/moe/stages.py``, the TensorRT plugin contract): the chain equals
``naive.moe_forward``, each stage keeps its invariants, and each stage equals its Triton kernel (interpreted on
the CPU with tiny shapes) wherever the kernel's output is defined.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports the Triton kernel modules

import pytest  # noqa: E402

from kernels.moe import naive, stages  # noqa: E402
from tests.utils import rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HIDDEN, INTER = 40, 24  # hidden not a multiple of the CPU K tile (32)


def _inputs(T, E, seed=0, dtype=torch.float32, hidden=HIDDEN, inter=INTER):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, hidden, generator=g)
    router = torch.randn(E, hidden, generator=g)
    w1 = torch.randn(E, inter, hidden, generator=g) / hidden**0.5
    w3 = torch.randn(E, inter, hidden, generator=g) / hidden**0.5
    w2 = torch.randn(E, hidden, inter, generator=g) / inter**0.5
    return x.to(DEVICE, dtype), router.to(DEVICE), *(w.to(DEVICE, dtype) for w in (w1, w3, w2))


def _skewed_ids(T, top_k, E, seed):
    """Distinct experts per token, most tokens on expert 0, at least one expert unused (E >= 3)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(T):
        first = 0 if torch.rand((), generator=g) < 0.7 else int(torch.randint(1, E - 1, (), generator=g))
        rest = [e for e in torch.randperm(E - 1, generator=g).tolist() if e != first][: top_k - 1]
        rows.append([first, *rest])
    return torch.tensor(rows, dtype=torch.int32, device=DEVICE)  # expert E-1 is never chosen


# ---------------------------------------------------------------------------------------- chain == naive


@pytest.mark.parametrize("path", ["grouped", "decode"])
@pytest.mark.parametrize("T, top_k, E, block_m", [(1, 1, 3, 4), (7, 2, 5, 4), (33, 2, 4, 16), (20, 3, 6, 1)])
def test_chain_equals_naive(path, T, top_k, E, block_m):
    x, router, w1, w3, w2 = _inputs(T, E, seed=T * 7 + E)
    ours = stages.moe_forward_stages(x, router, w1, w3, w2, top_k, path=path, block_m=block_m)
    ref = naive.moe_forward(x, router, w1, w3, w2, top_k)
    assert ours.dtype == x.dtype and ours.shape == (T, HIDDEN)
    assert rel_err(ours, ref) < 1e-6


@pytest.mark.parametrize("path", ["grouped", "decode"])
def test_chain_in_bf16_stays_close_to_naive(path):
    # h and y_perm are stored in bf16 between the stages (as the kernels do); the reference keeps fp32 throughout
    x, router, w1, w3, w2 = _inputs(19, 5, seed=3, dtype=torch.bfloat16)
    ours = stages.moe_forward_stages(x, router, w1, w3, w2, 2, path=path, block_m=8)
    ref = naive.moe_forward(x.float(), router, w1.float(), w3.float(), w2.float(), 2)
    assert ours.dtype == torch.bfloat16
    assert rel_err(ours, ref) < 1e-2


# ---------------------------------------------------------------------------------------- stage invariants


def test_route_returns_int32_ids_and_normalised_weights():
    x, router, *_ = _inputs(9, 6, seed=1)
    w, ids = stages.moe_route(x, router, 3)
    ref_w, ref_ids = naive.moe_route(x, router, 3)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32 and ids.shape == (9, 3)
    assert torch.equal(ids.long(), ref_ids) and torch.equal(w, ref_w)
    torch.testing.assert_close(w.sum(-1), torch.ones(9, device=DEVICE), rtol=0, atol=1e-6)
    assert all(len(set(row)) == 3 for row in ids.tolist())


@pytest.mark.parametrize("T, top_k, E, block_m", [(1, 1, 3, 4), (13, 2, 5, 4), (40, 2, 4, 16), (11, 3, 7, 3)])
def test_align_invariants(T, top_k, E, block_m):
    ids = _skewed_ids(T, top_k, E, seed=T + E)
    sorted_slots, inv_perm, block_expert, counts, offsets = stages.moe_align(ids, E, block_m)
    S = T * top_k
    R, NB = stages.align_sizes(S, E, block_m)
    assert [t.shape[0] for t in (sorted_slots, inv_perm, block_expert, counts, offsets)] == [R, S, NB, E, E + 1]
    assert all(t.dtype == torch.int32 for t in (sorted_slots, inv_perm, block_expert, counts, offsets))
    flat = ids.reshape(-1).long()
    assert torch.equal(counts.long(), torch.bincount(flat, minlength=E))
    assert int(counts[E - 1]) == 0  # an unused expert
    # inv_perm and sorted_slots are inverse on the slots; every other row is padding (sentinel S)
    assert torch.equal(sorted_slots.long()[inv_perm.long()], torch.arange(S, device=DEVICE))
    assert int((sorted_slots < S).sum()) == S and bool(((sorted_slots == S) | (sorted_slots < S)).all())
    # expert ranges: consecutive, each padded to block_m, starting at expert_offsets, slots in slot order
    padded = (counts.long() + block_m - 1) // block_m * block_m
    assert int(offsets[0]) == 0 and torch.equal(offsets.long().diff(), padded)
    for e in range(E):
        lo, n = int(offsets[e]), int(counts[e])
        mine = sorted_slots[lo : lo + n].long()
        assert torch.equal(mine, torch.nonzero(flat == e).flatten())
        assert bool((sorted_slots[lo + n : int(offsets[e + 1])] == S).all())
        assert bool((block_expert[lo // block_m : int(offsets[e + 1]) // block_m] == e).all())
    used = int(offsets[E]) // block_m
    assert bool((block_expert[used:] == -1).all()) and bool((sorted_slots[int(offsets[E]):] == S).all())


def test_grouped_rows_hold_their_slot_and_padding_is_zero():
    T, top_k, E, bm = 10, 2, 4, 4
    x, router, w1, w3, w2 = _inputs(T, E, seed=5)
    w, ids = stages.moe_route(x, router, top_k)
    sorted_slots, inv_perm, block_expert, _, _ = stages.moe_align(ids, E, bm)
    h = stages.moe_swiglu_grouped(x, w1, w3, sorted_slots, block_expert, top_k, bm)
    y_perm = stages.moe_down_grouped(h, w2, sorted_slots, block_expert, w, bm)
    for s in range(T * top_k):
        t, e, r = s // top_k, int(ids.view(-1)[s]), int(inv_perm[s])
        hs = torch.nn.functional.silu(x[t] @ w1[e].t()) * (x[t] @ w3[e].t())
        torch.testing.assert_close(h[r], hs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(y_perm[r], w.view(-1)[s] * (hs @ w2[e].t()), rtol=1e-5, atol=1e-6)
    pad = sorted_slots == T * top_k
    assert bool(pad.any()) and bool((h[pad] == 0).all()) and bool((y_perm[pad] == 0).all())


def test_stages_refuse_bad_inputs():
    with pytest.raises(ValueError, match=r"moe_align: topk_ids must lie in \[0, E=4\); got values in \[0, 4\]"):
        stages.moe_align(torch.tensor([[0, 4]], dtype=torch.int32), 4, 8)
    with pytest.raises(ValueError, match="moe_align: block_m must be >= 1"):
        stages.moe_align(torch.tensor([[0, 1]], dtype=torch.int32), 4, 0)
    with pytest.raises(ValueError, match="moe_route: top_k must be in"):
        stages.moe_route(torch.zeros(2, 8), torch.zeros(3, 8), 4)
    with pytest.raises(ValueError, match=r"moe_combine: inv_perm must be \[T \* top_k=2\]"):
        stages.moe_combine(torch.zeros(8, 4), torch.zeros(3, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="path must be 'grouped' or 'decode'"):
        stages.moe_forward_stages(*_inputs(2, 3), 1, path="dense")


# ---------------------------------------------------------------------------------------- stages == Triton


def _nan(shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def _garbage(n):
    return torch.full((n,), 1 << 30, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("T, top_k, E, block_m", [(1, 1, 3, 4), (13, 2, 5, 4), (37, 2, 4, 16)])
def test_align_equals_triton(T, top_k, E, block_m):
    from kernels.moe import routing

    ids = _skewed_ids(T, top_k, E, seed=T)
    R, NB = stages.align_sizes(T * top_k, E, block_m)
    out = routing.AlignResult(_garbage(R), _garbage(T * top_k), _garbage(NB), _garbage(E), _garbage(E + 1))
    triton_out = routing.moe_align_triton(ids, E, block_m, chunk=16, out=out)
    for name, ours, theirs in zip(routing.AlignResult._fields, stages.moe_align(ids, E, block_m), triton_out):
        assert torch.equal(ours, theirs), name


def test_route_equals_triton():
    from kernels.moe import routing

    x, router, *_ = _inputs(21, 6, seed=4)
    w, ids = routing.moe_route_triton(x, router, 2, block_t=16, block_k=16, use_dot=True,
                                      out_weights=_nan((21, 2)), out_ids=_garbage(42).view(21, 2))
    ours_w, ours_ids = stages.moe_route(x, router, 2)
    assert torch.equal(ours_ids, ids)
    assert rel_err(w, ours_w) < 1e-6


def test_grouped_stages_equal_triton():
    from kernels.moe import grouped

    T, top_k, E, bm = 23, 2, 5, 16
    x, router, w1, w3, w2 = _inputs(T, E, seed=6)
    w, ids = stages.moe_route(x, router, top_k)
    sorted_slots, inv_perm, block_expert, _, _ = stages.moe_align(ids, E, bm)
    R = sorted_slots.shape[0]
    real = sorted_slots < T * top_k  # rows the kernels define
    h_ref = stages.moe_swiglu_grouped(x, w1, w3, sorted_slots, block_expert, top_k, bm)
    h = grouped.swiglu_grouped(x, w1, w3, sorted_slots, block_expert, top_k, block_m=bm, block_n=16, block_k=32,
                               out=_nan((R, INTER)))
    assert rel_err(h[real], h_ref[real]) < 1e-6
    y_ref = stages.moe_down_grouped(h_ref, w2, sorted_slots, block_expert, w, bm)
    y_perm = grouped.down_grouped(h_ref, w2, sorted_slots, block_expert, w, block_m=bm, block_n=16, block_k=16,
                                  out=_nan((R, HIDDEN)))
    assert rel_err(y_perm[real], y_ref[real]) < 1e-6
    y_ref_perm = torch.where(real[:, None], y_ref, float("nan"))  # padding rows must not be read
    y = grouped.combine(y_ref_perm, inv_perm, T, top_k, out_dtype=x.dtype, out=_nan((T, HIDDEN)))
    assert rel_err(y, stages.moe_combine(y_ref_perm, inv_perm, top_k)) < 1e-6


def test_decode_stages_equal_triton():
    from kernels.moe import grouped

    T, top_k, E = 5, 2, 6
    x, router, w1, w3, w2 = _inputs(T, E, seed=7)
    w, ids = stages.moe_route(x, router, top_k)
    h_ref = stages.moe_swiglu_decode(x, w1, w3, ids)
    h = grouped.swiglu_decode(x, w1, w3, ids, block_n=16, block_k=32, out=_nan((T * top_k, INTER)))
    assert rel_err(h, h_ref) < 1e-6
    y = grouped.down_combine_decode(h_ref, w2, w, ids, out_dtype=x.dtype, block_n=16, block_k=16,
                                    out=_nan((T, HIDDEN)))
    assert rel_err(y, stages.moe_down_combine_decode(h_ref, w2, w, ids)) < 1e-6
