"""TensorRT plugins (``plugins/``) without TensorRT: the contract, shape/dtype rules, launch plans against what the
Triton wrappers launch, the entry kernels (TensorRT argument order) against the references, and the PTX payloads.

Without CUDA the entry kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set before anything imports a
kernel). The ``check_*`` functions take a device and sizes: this file runs them on the CPU at tiny sizes,
``test_plugins_gpu.py`` runs the same checks on the GPU through the PTX + CUDA driver path at MiniMax sizes.
PTX is compiled in a subprocess without the interpreter, for sm_90 (``GPUTarget("cuda", 90, 32)``): Triton
generates PTX without a GPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import plugins  # noqa: E402
from kernels.attention import naive as attn_naive  # noqa: E402
from kernels.attention.decode import decode_split  # noqa: E402
from kernels.lightning_attention import chunk, recurrent  # noqa: E402
from kernels.lightning_attention import naive as la_naive  # noqa: E402
from kernels.moe import grouped, naive, routing  # noqa: E402
from plugins import driver, moe  # noqa: E402
from plugins.algebra import cdiv, static  # noqa: E402
from plugins.spec import NAMESPACE, PLUGINS, align_sizes  # noqa: E402
from tests.utils import rel_err  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
bf16, f16, f32, i32, i8 = torch.bfloat16, torch.float16, torch.float32, torch.int32, torch.int8

# The contract shared with the ONNX lowering (brief B / issue 6): name -> (inputs, attributes, outputs).
CONTRACT = {
    "lightning_prefill": (("q", "k", "v", "s", "initial_state"), (), ("o", "final_state")),
    "lightning_decode": (("q", "k", "v", "s", "state"), (), ("o", "new_state")),
    "moe_route": (("x", "router_weight"), ("top_k",), ("topk_weights", "topk_ids")),
    "moe_align": (
        ("topk_ids",),
        ("num_experts", "block_m"),
        ("sorted_slots", "inv_perm", "block_expert", "expert_counts", "expert_offsets"),
    ),
    "moe_swiglu_grouped": (("x", "w1", "w3", "sorted_slots", "block_expert"), ("top_k", "block_m"), ("h",)),
    "moe_down_grouped": (("h", "w2", "sorted_slots", "block_expert", "topk_weights"), ("block_m",), ("y_perm",)),
    "moe_combine": (("y_perm", "inv_perm"), ("top_k",), ("y",)),
    "moe_swiglu_decode": (("x", "w1", "w3", "topk_ids"), (), ("h",)),
    "moe_down_combine_decode": (("h", "w2", "topk_weights", "topk_ids"), (), ("y",)),
    "moe_swiglu_grouped_int8": (("x", "w1", "w3", "w1_scale", "w3_scale", "sorted_slots", "block_expert"),
                                ("top_k", "block_m"), ("h",)),
    "moe_down_grouped_int8": (("h", "w2", "w2_scale", "sorted_slots", "block_expert", "topk_weights"), ("block_m",),
                              ("y_perm",)),
    "moe_swiglu_decode_int8": (("x", "w1", "w3", "w1_scale", "w3_scale", "topk_ids"), (), ("h",)),
    "moe_down_combine_decode_int8": (("h", "w2", "w2_scale", "topk_weights", "topk_ids"), (), ("y",)),
    "paged_kv_write": (("k_cache", "v_cache", "k", "v", "block_table", "positions"), (), ("k_cache_out", "v_cache_out")),
    "paged_attention_prefill": (("q", "k_cache", "v_cache", "block_table", "positions"), (), ("o",)),
    "paged_decode_split": (("q", "k_cache", "v_cache", "block_table", "positions"), ("split",), ("m", "l", "acc")),
    "paged_decode_merge": (("q", "m", "l", "acc", "positions"), ("split",), ("o",)),
}


# ============================================================================ checks shared with test_plugins_gpu.py


def _gen(seed: int, device) -> torch.Generator:
    return torch.Generator(device).manual_seed(seed)


def lightning_inputs(B, T, H, D, dtype, device, seed=0):
    g = _gen(seed, device)
    q, k, v = (torch.randn(B, T, H, D, generator=g, device=device) for _ in "qkv")
    s = torch.rand(H, generator=g, device=device) * 0.9 + 0.01  # fast and slow heads
    state = torch.randn(B, H, D, D, generator=g, device=device)
    return q.to(dtype), k.to(dtype), v.to(dtype), s, state


def check_lightning_prefill(B, T, H, D, dtype, device, tol):
    q, k, v, s, state = lightning_inputs(B, T, H, D, dtype, device, seed=T)
    o, final = driver.run("lightning_prefill", [q, k, v, s, state])
    ref_o, ref_s = la_naive.lightning_attention_blockwise(q.float(), k.float(), v.float(), s, state)
    assert o.dtype == dtype and final.dtype == f32
    assert rel_err(o, ref_o) < tol and rel_err(final, ref_s) < tol, (rel_err(o, ref_o), rel_err(final, ref_s))
    if q.is_cuda:  # the same kernel with the same tiles as the Triton wrapper: identical results
        w_o, w_s = chunk.lightning_prefill_triton(q, k, v, s, state)
        assert rel_err(o, w_o) < 1e-6 and rel_err(final, w_s) < 1e-6, (rel_err(o, w_o), rel_err(final, w_s))


def check_lightning_decode(B, H, D, dtype, device, tactic, tol):
    q, k, v, s, state = lightning_inputs(B, 1, H, D, dtype, device, seed=B)
    o, new = driver.run("lightning_decode", [q, k, v, s, state], tactic=tactic)
    ref_o, ref_s = la_naive.lightning_attention_decode_step(q, k, v, s, state)
    assert rel_err(o, ref_o) < tol and rel_err(new, ref_s) < 1e-5, (rel_err(o, ref_o), rel_err(new, ref_s))
    if q.is_cuda:
        # the wrapper's launch with this tactic's tiles (the warp count sets the order of the Dk reduction of o)
        block_v, warps = {1: (16, 2), 2: (64, 4)}[tactic]
        w_s = torch.empty_like(state)
        w_o = recurrent._launch(q, k, v, s, state, w_s, block_v=block_v, num_warps=warps)
        assert rel_err(new, w_s) < 1e-6 and rel_err(o, w_o) < 1e-6, (rel_err(new, w_s), rel_err(o, w_o))


def moe_inputs(T, E, hidden, inter, dtype, device, seed=0):
    g = _gen(seed, device)
    x = torch.randn(T, hidden, generator=g, device=device).to(dtype)
    router = torch.randn(E, hidden, generator=g, device=device) / hidden**0.5  # fp32, logits of order 1
    w1, w3 = (torch.randn(E, inter, hidden, generator=g, device=device).to(dtype) / hidden**0.5 for _ in "13")
    w2 = torch.randn(E, hidden, inter, generator=g, device=device).to(dtype) / inter**0.5
    return x, router, w1, w3, w2


def check_route(T, E, hidden, top_k, dtype, device, tactic):
    x, router, *_ = moe_inputs(T, E, hidden, 16, dtype, device, seed=T)
    w, ids = driver.run("moe_route", [x, router], {"top_k": top_k}, tactic)
    ref_w, ref_ids = naive.moe_route(x, router, top_k)
    assert ids.dtype == i32 and torch.equal(ids.long(), ref_ids)
    assert rel_err(w, ref_w) < 1e-5


def check_align_layout(out, topk_ids, E, block_m):
    """The alignment's layout semantics (what the grouped GEMMs rely on)."""
    sorted_slots, inv_perm, block_expert, counts, offsets = (t.cpu().long() for t in out)
    ids = topk_ids.cpu().long().reshape(-1)
    S = ids.numel()
    assert torch.equal(counts, torch.bincount(ids, minlength=E))
    padded = (counts + block_m - 1) // block_m * block_m
    assert torch.equal(offsets, torch.cat([torch.zeros(1, dtype=torch.long), padded.cumsum(0)]))
    assert torch.equal(sorted_slots[inv_perm], torch.arange(S))  # every slot once, at its row
    assert (sorted_slots == S).sum() == sorted_slots.numel() - S  # every other row is padding
    used = int(offsets[-1]) // block_m
    for b in range(block_expert.numel()):
        rows = sorted_slots[b * block_m : (b + 1) * block_m]
        if b < used:
            e = int(block_expert[b])
            assert 0 <= e < E and (ids[rows[rows < S]] == e).all()
        else:
            assert block_expert[b] == -1 and (rows == S).all()


def check_align(T, top_k, E, block_m, device):
    g = _gen(T, device)
    topk_ids = torch.stack([torch.randperm(E, generator=g, device=device)[:top_k] for _ in range(T)]).to(i32)
    out = driver.run("moe_align", [topk_ids], {"num_experts": E, "block_m": block_m})
    check_align_layout(out, topk_ids, E, block_m)
    ref = routing.moe_align_triton(topk_ids, E, block_m)  # the Triton wrapper: deterministic, the same layout
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


def _expert_ref(xt, w1, w3, w2, e):
    """fp32 SwiGLU activation and expert output of rows xt for expert e."""
    xf = xt.float()
    h = torch.nn.functional.silu(xf @ w1[e].float().t()) * (xf @ w3[e].float().t())
    return h, h @ w2[e].float().t()


def check_grouped_stages(T, E, hidden, inter, top_k, block_m, dtype, device, tactic, tol):
    """route -> align (Triton wrappers) then each grouped plugin stage against fp32 references of its own inputs."""
    x, router, w1, w3, w2 = moe_inputs(T, E, hidden, inter, dtype, device, seed=T + tactic)
    weights, ids = routing.moe_route_triton(x, router, top_k, block_t=16, use_dot=True)
    align = routing.moe_align_triton(ids, E, block_m)
    (h,) = driver.run("moe_swiglu_grouped", [x, w1, w3, align.sorted_slots, align.block_expert],
                      {"top_k": top_k, "block_m": block_m}, tactic)  # fmt: skip
    (y_perm,) = driver.run("moe_down_grouped", [h, w2, align.sorted_slots, align.block_expert, weights],
                           {"block_m": block_m}, tactic)  # fmt: skip
    (y,) = driver.run("moe_combine", [y_perm, align.inv_perm], {"top_k": top_k})
    inv, slots = align.inv_perm.long(), align.sorted_slots.long()
    flat_ids, flat_w = ids.reshape(-1).long(), weights.reshape(-1)
    for e in range(E):
        s = (flat_ids == e).nonzero()[:, 0]
        if s.numel() == 0:
            continue
        h_ref, _ = _expert_ref(x[s // top_k], w1, w3, w2, e)
        assert rel_err(h[inv[s]], h_ref) < tol, (e, rel_err(h[inv[s]], h_ref))
        y_ref = (h[inv[s]].float() @ w2[e].float().t()) * flat_w[s, None]  # from the stage's own input h
        assert rel_err(y_perm[inv[s]], y_ref) < tol, (e, rel_err(y_perm[inv[s]], y_ref))
    used = int(align.expert_offsets[-1])
    pad = (slots[:used] == T * top_k).nonzero()[:, 0]
    assert (h[pad] == 0).all() and (y_perm[pad] == 0).all()  # padding rows of used blocks: written, zero
    y_ref = y_perm[inv].float().reshape(T, top_k, hidden).sum(1)
    assert rel_err(y, y_ref) < (1e-6 if dtype == f32 else 4e-3)


def quantized_experts(w1, w3, w2):
    """int8 experts (``naive.quantize_weight``): (q1, s1, q3, s3, q2, s2) and the weights they stand for (fp32)."""
    qs = [t for w in (w1, w3, w2) for t in naive.quantize_weight(w, "experts-int8")]
    return qs, [naive.dequantize_weight(qs[i], qs[i + 1]) for i in (0, 2, 4)]


def check_grouped_stages_int8(T, E, hidden, inter, top_k, block_m, dtype, device, tactic, tol):
    """The int8 grouped stages against fp32 references of their own inputs with the dequantized weights."""
    x, router, w1, w3, w2 = moe_inputs(T, E, hidden, inter, dtype, device, seed=T + tactic)
    (q1, s1, q3, s3, q2, s2), (d1, d3, d2) = quantized_experts(w1, w3, w2)
    weights, ids = routing.moe_route_triton(x, router, top_k, block_t=16, use_dot=True)
    align = routing.moe_align_triton(ids, E, block_m)
    (h,) = driver.run("moe_swiglu_grouped_int8", [x, q1, q3, s1, s3, align.sorted_slots, align.block_expert],
                      {"top_k": top_k, "block_m": block_m}, tactic)  # fmt: skip
    (y_perm,) = driver.run("moe_down_grouped_int8", [h, q2, s2, align.sorted_slots, align.block_expert, weights],
                           {"block_m": block_m}, tactic)  # fmt: skip
    inv, flat_ids, flat_w = align.inv_perm.long(), ids.reshape(-1).long(), weights.reshape(-1)
    checked = 0
    for e in range(E):
        s = (flat_ids == e).nonzero()[:, 0]
        if s.numel() == 0:
            continue
        h_ref, _ = _expert_ref(x[s // top_k], d1, d3, d2, e)
        assert rel_err(h[inv[s]], h_ref) < tol, (e, rel_err(h[inv[s]], h_ref))
        y_ref = (h[inv[s]].float() @ d2[e].t()) * flat_w[s, None]
        assert rel_err(y_perm[inv[s]], y_ref) < tol, (e, rel_err(y_perm[inv[s]], y_ref))
        checked += 1
    assert checked >= 2


def check_decode_stages_int8(T, E, hidden, inter, top_k, dtype, device, tol):
    x, router, w1, w3, w2 = moe_inputs(T, E, hidden, inter, dtype, device, seed=100 + T)
    (q1, s1, q3, s3, q2, s2), (d1, d3, d2) = quantized_experts(w1, w3, w2)
    weights, ids = naive.moe_route(x, router, top_k)
    ids = ids.to(i32)
    (h,) = driver.run("moe_swiglu_decode_int8", [x, q1, q3, s1, s3, ids])
    (y,) = driver.run("moe_down_combine_decode_int8", [h, q2, s2, weights, ids])
    y_ref = torch.zeros(T, hidden, device=device)
    for t in range(T):
        for j in range(top_k):
            e = int(ids[t, j])
            h_ref, _ = _expert_ref(x[t : t + 1], d1, d3, d2, e)
            assert rel_err(h[t * top_k + j], h_ref[0]) < tol
            y_ref[t] += weights[t, j] * (h[t * top_k + j].float() @ d2[e].t())
    assert rel_err(y, y_ref) < tol


def check_decode_stages(T, E, hidden, inter, top_k, dtype, device, tol):
    x, router, w1, w3, w2 = moe_inputs(T, E, hidden, inter, dtype, device, seed=100 + T)
    weights, ids = naive.moe_route(x, router, top_k)
    ids = ids.to(i32)
    (h,) = driver.run("moe_swiglu_decode", [x, w1, w3, ids])
    (y,) = driver.run("moe_down_combine_decode", [h, w2, weights, ids])
    for t in range(T):
        for j in range(top_k):
            h_ref, _ = _expert_ref(x[t : t + 1], w1, w3, w2, int(ids[t, j]))
            assert rel_err(h[t * top_k + j], h_ref[0]) < tol
    y_ref = torch.zeros(T, hidden, device=device)
    for t in range(T):
        for j in range(top_k):
            y_ref[t] += weights[t, j] * (h[t * top_k + j].float() @ w2[int(ids[t, j])].float().t())
    assert rel_err(y, y_ref) < tol


def moe_chain(x, router, w1, w3, w2, top_k, block_m, decode):
    """The MoE as a chain of plugin payloads (what the engine runs)."""
    E = router.shape[0]
    weights, ids = driver.run("moe_route", [x, router], {"top_k": top_k})
    if decode:
        (h,) = driver.run("moe_swiglu_decode", [x, w1, w3, ids])
        return driver.run("moe_down_combine_decode", [h, w2, weights, ids])[0]
    sorted_slots, inv_perm, block_expert, _, _ = driver.run("moe_align", [ids], {"num_experts": E, "block_m": block_m})
    (h,) = driver.run("moe_swiglu_grouped", [x, w1, w3, sorted_slots, block_expert], {"top_k": top_k, "block_m": block_m})
    (y_perm,) = driver.run("moe_down_grouped", [h, w2, sorted_slots, block_expert, weights], {"block_m": block_m})
    return driver.run("moe_combine", [y_perm, inv_perm], {"top_k": top_k})[0]


def check_chain(T, E, hidden, inter, top_k, block_m, dtype, device, decode, tol, weights=None):
    x, router, w1, w3, w2 = weights or moe_inputs(T, E, hidden, inter, dtype, device, seed=7)
    if weights is not None:
        x = torch.randn(T, hidden, generator=_gen(T, device), device=device).to(dtype)
    y = moe_chain(x, router, w1, w3, w2, top_k, block_m, decode)
    ref = naive.moe_forward(x.float(), router, w1.float(), w3.float(), w2.float(), top_k)
    assert y.dtype == dtype and rel_err(y, ref) < tol, rel_err(y, ref)


def paged_inputs(B, H, KVH, D, page_size, M, num_pages, dtype, device, seed=0):
    """A NaN-filled pool of ``num_pages`` pages and a block table giving each row a random set of M pages."""
    g = _gen(seed, device)
    k_cache = torch.full((num_pages, KVH, page_size, D), float("nan"), device=device, dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    table = torch.randperm(num_pages, generator=torch.Generator().manual_seed(seed))[: B * M].view(B, M)
    return k_cache, v_cache, table.to(torch.int32).to(device)


def _fill_history(k_cache, v_cache, table, held, seed):
    """Write random K/V at positions 0..held[b]-1 of each row (through the reference write)."""
    B, KVH, D = table.shape[0], k_cache.shape[1], k_cache.shape[3]
    L = max(max(held), 1)
    g = _gen(seed, k_cache.device)
    k = torch.randn(B, L, KVH, D, generator=g, device=k_cache.device).to(k_cache.dtype)
    v = torch.randn(B, L, KVH, D, generator=g, device=k_cache.device).to(k_cache.dtype)
    start = torch.tensor([h - L for h in held], device=k_cache.device)  # right-aligned: positions end at held - 1
    attn_naive.paged_kv_write(k_cache, v_cache, k, v, table, start)


def check_paged_kv_write(B, T, KVH, D, page_size, M, dtype, device, start):
    """The write plugin with its outputs aliased to the cache inputs (as TensorRT binds them): exactly the chunk's
    positions >= 0 change, to the values the reference writes; every other slot keeps its value (NaN)."""
    k_cache, v_cache, table = paged_inputs(B, KVH, KVH, D, page_size, M, B * M + 3, dtype, device, seed=T)
    g = _gen(T, device)
    k, v = (torch.randn(B, T, KVH, D, generator=g, device=device).to(dtype) for _ in "kv")
    positions = torch.tensor(start, device=device)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    attn_naive.paged_kv_write(ref_k, ref_v, k, v, table, positions)
    out = driver.run("paged_kv_write", [k_cache, v_cache, k, v, table, positions], outputs=[k_cache, v_cache])
    assert out[0] is k_cache and out[1] is v_cache
    for got, ref in ((k_cache, ref_k), (v_cache, ref_v)):
        assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.nan_to_num(), ref.nan_to_num())


def check_paged_prefill(B, T, H, KVH, D, page_size, M, dtype, device, start, tol):
    k_cache, v_cache, table = paged_inputs(B, H, KVH, D, page_size, M, B * M + 2, dtype, device, seed=T)
    _fill_history(k_cache, v_cache, table, [max(p, 0) + T for p in start], seed=T + 1)  # history + the chunk
    q = torch.randn(B, T, H, D, generator=_gen(T + 2, device), device=device).to(dtype)
    positions = torch.tensor(start, device=device)
    scale = D**-0.5
    (o,) = driver.run("paged_attention_prefill", [q, k_cache, v_cache, table, positions], {"scale": scale})
    ref = attn_naive.paged_attention(q.float(), k_cache.float(), v_cache.float(), table, positions, scale)
    assert o.dtype == dtype and rel_err(o, ref) < tol, rel_err(o, ref)


def check_paged_decode(B, H, KVH, D, page_size, M, dtype, device, held, tol):
    """split -> merge (the two decode plugins) against the reference attention, and the split's partials against
    ``naive.paged_decode_partials`` on the splits that hold positions."""
    k_cache, v_cache, table = paged_inputs(B, H, KVH, D, page_size, M, B * M + 1, dtype, device, seed=B)
    _fill_history(k_cache, v_cache, table, [max(h, 0) for h in held], seed=B + 1)
    q = torch.randn(B, 1, H, D, generator=_gen(B + 2, device), device=device).to(dtype)
    positions = torch.tensor([h - 1 for h in held], device=device)
    scale = D**-0.5
    split = decode_split(M * page_size, D, torch.device("cuda"))
    m, l, acc = driver.run("paged_decode_split", [q, k_cache, v_cache, table, positions], {"split": split, "scale": scale})
    (o,) = driver.run("paged_decode_merge", [q, m, l, acc, positions], {"split": split})
    ref = attn_naive.paged_attention(q.float(), k_cache.float(), v_cache.float(), table, positions, scale)
    assert o.dtype == dtype and rel_err(o, ref) < tol, rel_err(o, ref)
    rm, rl, racc = attn_naive.paged_decode_partials(q.float(), k_cache.float(), v_cache.float(), table, positions,
                                                     scale, split)
    for b, h in enumerate(held):
        used = -(-h // split) if h > 0 else 0
        rows = slice(b * H, (b + 1) * H)
        if used:
            assert rel_err(m[rows, :used], rm[rows, :used]) < tol and rel_err(acc[rows, :used], racc[rows, :used]) < tol
            assert rel_err(l[rows, :used], rl[rows, :used]) < tol
        assert m[rows, used:].isnan().all(), "splits past the held positions are not written"


# ======================================================================================================= CPU tests

CPU = "cpu"


def test_spec_matches_contract():
    assert NAMESPACE == "minimax" and set(PLUGINS) == set(CONTRACT)
    for name, (inputs, attrs, outputs) in CONTRACT.items():
        spec = PLUGINS[name]
        assert (spec.inputs, spec.attrs, spec.outputs) == (inputs, attrs, outputs), name
        assert spec.plugin_id == f"minimax::{name}" and len(spec.input_ranks) == len(inputs)
        assert set(plugins.PLANNERS) == set(PLUGINS) and plugins.TACTICS[name][0] == 1
        for combo in spec.dtype_combinations:
            assert len(combo) == len(inputs) + len(outputs)


def test_dtype_rules():
    assert PLUGINS["lightning_prefill"].output_dtypes([bf16, bf16, bf16, f32, f32]) == (bf16, f32)
    assert PLUGINS["moe_route"].output_dtypes([f16, f32]) == (f32, i32)
    assert PLUGINS["moe_align"].output_dtypes([i32]) == (i32,) * 5
    for name in ("moe_swiglu_grouped", "moe_down_grouped", "moe_combine", "moe_swiglu_decode", "moe_down_combine_decode"):
        spec = PLUGINS[name]
        assert {c[0] for c in spec.dtype_combinations} == {bf16, f16, f32}
        assert all(c[len(spec.inputs)] == c[0] for c in spec.dtype_combinations)  # output in the activation dtype
    with pytest.raises(ValueError, match="lightning_prefill.*'k'.*not supported"):
        PLUGINS["lightning_prefill"].output_dtypes([bf16, f16, bf16, f32, f32])  # mixed q/k dtypes
    with pytest.raises(ValueError, match="moe_route.*router_weight"):
        PLUGINS["moe_route"].output_dtypes([bf16, bf16])  # the router is fp32


class LeftDim:
    """A stand-in for TensorRT's ShapeExpr: + - * // with the symbolic operand on the left only, a value to check."""

    def __init__(self, value: int, symbolic: bool = True):
        self.value, self.symbolic = value, symbolic

    def _op(self, other, f):
        if isinstance(other, LeftDim):
            return LeftDim(f(self.value, other.value), self.symbolic or other.symbolic)
        if not isinstance(other, int):
            raise TypeError(f"ShapeExpr op with {type(other)}")
        return LeftDim(f(self.value, other), self.symbolic)

    def __add__(self, o):
        return self._op(o, lambda a, b: a + b)

    def __sub__(self, o):
        return self._op(o, lambda a, b: a - b)

    def __mul__(self, o):
        return self._op(o, lambda a, b: a * b)

    def __floordiv__(self, o):
        return self._op(o, lambda a, b: a // b)

    is_fake = False

    @property
    def is_constant(self):
        return not self.symbolic

    def constant_value(self):
        assert not self.symbolic
        return self.value


def _val(d):
    return d.value if isinstance(d, LeftDim) else d


# (dtypes, shapes, attrs) per plugin at tiny sizes; T = 13 tokens, top_k 2, E 4, hidden 32, I 48, block_m 16
T_, K_, E_, HID_, I_, BM_ = 13, 2, 4, 32, 48, 16
S_, R_, NB_ = align_sizes(T_, K_, E_, BM_)
CASES = {
    "lightning_prefill": ([f32, f32, f32, f32, f32], [(2, 37, 2, 16)] * 3 + [(2,), (2, 2, 16, 16)], {}),
    "lightning_decode": ([f32, f32, f32, f32, f32], [(3, 1, 2, 16)] * 3 + [(2,), (3, 2, 16, 16)], {}),
    "moe_route": ([f32, f32], [(T_, HID_), (E_, HID_)], {"top_k": K_}),
    "moe_align": ([i32], [(T_, K_)], {"num_experts": E_, "block_m": BM_}),
    "moe_swiglu_grouped": ([f32, f32, f32, i32, i32], [(T_, HID_), (E_, I_, HID_), (E_, I_, HID_), (R_,), (NB_,)],
                           {"top_k": K_, "block_m": BM_}),
    "moe_down_grouped": ([f32, f32, i32, i32, f32], [(R_, I_), (E_, HID_, I_), (R_,), (NB_,), (T_, K_)], {"block_m": BM_}),
    "moe_combine": ([f32, i32], [(R_, HID_), (S_,)], {"top_k": K_}),
    "moe_swiglu_decode": ([f32, f32, f32, i32], [(T_, HID_), (E_, I_, HID_), (E_, I_, HID_), (T_, K_)], {}),
    "moe_down_combine_decode": ([f32, f32, f32, i32], [(S_, I_), (E_, HID_, I_), (T_, K_), (T_, K_)], {}),
    "moe_swiglu_grouped_int8": ([f32, i8, i8, f32, f32, i32, i32], [(T_, HID_), (E_, I_, HID_), (E_, I_, HID_),
                                (E_, I_), (E_, I_), (R_,), (NB_,)], {"top_k": K_, "block_m": BM_}),
    "moe_down_grouped_int8": ([f32, i8, f32, i32, i32, f32], [(R_, I_), (E_, HID_, I_), (E_, HID_), (R_,), (NB_,),
                              (T_, K_)], {"block_m": BM_}),
    "moe_swiglu_decode_int8": ([f32, i8, i8, f32, f32, i32], [(T_, HID_), (E_, I_, HID_), (E_, I_, HID_), (E_, I_),
                               (E_, I_), (T_, K_)], {}),
    "moe_down_combine_decode_int8": ([f32, i8, f32, f32, i32], [(S_, I_), (E_, HID_, I_), (E_, HID_), (T_, K_),
                                     (T_, K_)], {}),
    # paged attention: B 2, T 13, H 4, KVH 2, D 16, pages of 64, M 8 per row (capacity 512), 19 pages
    "paged_kv_write": ([f32, f32, f32, f32, i32, torch.int64], [(19, 2, 64, 16)] * 2 + [(2, T_, 2, 16)] * 2
                       + [(2, 8), (2,)], {}),
    "paged_attention_prefill": ([f32, f32, f32, i32, torch.int64], [(2, T_, 4, 16)] + [(19, 2, 64, 16)] * 2
                                + [(2, 8), (2,)], {"scale": 0.25}),
    "paged_decode_split": ([f32, f32, f32, i32, torch.int64], [(2, 1, 4, 16)] + [(19, 2, 64, 16)] * 2
                           + [(2, 8), (2,)], {"split": 256, "scale": 0.25}),
    "paged_decode_merge": ([f32, f32, f32, f32, torch.int64], [(2, 1, 4, 16), (8, 2), (8, 2), (8, 2, 16), (2,)],
                           {"split": 256}),
}  # fmt: skip
DYNAMIC = {  # (input index, dim) of the token / batch dims a TensorRT profile leaves dynamic
    "lightning_prefill": [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1), (4, 0)],
    "lightning_decode": [(0, 0), (1, 0), (2, 0), (4, 0)],
    "moe_route": [(0, 0)],
    "moe_align": [(0, 0)],
    "moe_swiglu_grouped": [(0, 0), (3, 0), (4, 0)],
    "moe_down_grouped": [(0, 0), (2, 0), (3, 0), (4, 0)],
    "moe_combine": [(0, 0), (1, 0)],
    "moe_swiglu_decode": [(0, 0), (3, 0)],
    "moe_down_combine_decode": [(0, 0), (2, 0), (3, 0)],
    "moe_swiglu_grouped_int8": [(0, 0), (5, 0), (6, 0)],
    "moe_down_grouped_int8": [(0, 0), (3, 0), (4, 0), (5, 0)],
    "moe_swiglu_decode_int8": [(0, 0), (5, 0)],
    "moe_down_combine_decode_int8": [(0, 0), (3, 0), (4, 0)],
    "paged_kv_write": [(2, 0), (2, 1), (3, 0), (3, 1), (4, 0), (5, 0)],
    "paged_attention_prefill": [(0, 0), (0, 1), (3, 0), (4, 0)],
    "paged_decode_split": [(0, 0), (3, 0), (4, 0)],
    "paged_decode_merge": [(0, 0), (1, 0), (2, 0), (3, 0), (4, 0)],
}


def _symbolic(name):
    dtypes, shapes, attrs = CASES[name]
    sym = [[LeftDim(d, symbolic=(i, j) in DYNAMIC[name]) for j, d in enumerate(s)] for i, s in enumerate(shapes)]
    return dtypes, shapes, sym, attrs


@pytest.mark.parametrize("name", sorted(PLUGINS))
def test_shape_rules_and_plans_are_symbolic_safe(name):
    """The shape rule and the plan on ShapeExpr-like dims (left operand only, token dims dynamic) give the same
    values as on ints: the same code serves @trtp.register / aot_impl and the concrete launches."""
    dtypes, shapes, sym, attrs = _symbolic(name)
    spec = PLUGINS[name]
    concrete = spec.output_shapes(shapes, attrs)
    symbolic = spec.output_shapes([tuple(s) for s in sym], attrs)
    assert [tuple(map(_val, s)) for s in symbolic] == [tuple(s) for s in concrete]
    for tactic in plugins.TACTICS[name]:
        p = plugins.plan(name, dtypes, shapes, attrs, tactic)
        ps = plugins.plan(name, dtypes, [tuple(s) for s in sym], attrs, tactic)
        assert tuple(map(_val, ps.grid)) == p.concrete_grid()
        assert tuple(_val(d) for _, d in ps.extra_args) == p.concrete_extra_args()
        assert ps.constexprs == p.constexprs and ps.fn is p.fn and ps.num_warps == p.num_warps


def test_static_dims_are_required_and_checked():
    dtypes, shapes, sym, attrs = _symbolic("moe_route")
    sym[1][1] = LeftDim(HID_, symbolic=True)  # hidden dynamic: the kernel needs it at build time
    with pytest.raises(ValueError, match="moe_route: router_weight dim 1 must be a build-time constant"):
        plugins.plan("moe_route", dtypes, [tuple(s) for s in sym], attrs)
    with pytest.raises(ValueError, match=r"moe_route: hidden sizes disagree.*'x dim 1': 32.*'router_weight dim 1': 64"):
        plugins.plan("moe_route", [f32, f32], [(T_, 32), (E_, 64)], {"top_k": 2})
    with pytest.raises(ValueError, match="lightning_prefill: head dims must be powers of two.*Dv=24"):
        plugins.plan("lightning_prefill", [f32] * 5, [(1, 5, 2, 16)] * 2 + [(1, 5, 2, 24), (2,), (1, 2, 16, 24)], {})
    with pytest.raises(ValueError, match="moe_align: attribute 'block_m' must be a positive int"):
        plugins.plan("moe_align", [i32], [(T_, K_)], {"num_experts": 4, "block_m": 0})
    with pytest.raises(ValueError, match="moe_combine: input 'inv_perm' must have rank 1"):
        plugins.plan("moe_combine", [f32, i32], [(R_, HID_), (T_, K_)], {"top_k": K_})
    with pytest.raises(ValueError, match="lightning_decode: q must be \\[B, 1, H, Dk\\]"):
        plugins.plan("lightning_decode", [f32] * 5, [(1, 2, 2, 16)] * 3 + [(2,), (1, 2, 16, 16)], {})
    assert cdiv(37, 16) == 3 and static(LeftDim(5, symbolic=False), "x") == 5


def test_shape_rules_match_the_wrappers():
    q, k, v, s, state = lightning_inputs(2, 5, 2, 16, f32, CPU)
    want = [tuple(t.shape) for t in chunk.lightning_prefill_triton(q, k, v, s, state)]
    assert [tuple(d) for d in PLUGINS["lightning_prefill"].output_shapes([t.shape for t in (q, k, v, s, state)], {})] == want
    x, router, w1, w3, w2 = moe_inputs(T_, E_, HID_, I_, f32, CPU)
    w, ids = routing.moe_route_triton(x, router, K_, block_t=16)
    assert PLUGINS["moe_route"].output_shapes([x.shape, router.shape], {"top_k": K_}) == (tuple(w.shape), tuple(ids.shape))
    a = routing.moe_align_triton(ids, E_, BM_)
    got = PLUGINS["moe_align"].output_shapes([ids.shape], {"num_experts": E_, "block_m": BM_})
    assert list(got) == [tuple(t.shape) for t in a]
    h = grouped.swiglu_grouped(x, w1, w3, a.sorted_slots, a.block_expert, K_, block_m=BM_, block_n=16, block_k=16)
    assert PLUGINS["moe_swiglu_grouped"].output_shapes([x.shape, w1.shape, w3.shape, a.sorted_slots.shape,
                                                        a.block_expert.shape], {"top_k": K_, "block_m": BM_}) == (tuple(h.shape),)  # fmt: skip
    y_perm = grouped.down_grouped(h, w2, a.sorted_slots, a.block_expert, w, block_m=BM_, block_n=16, block_k=16)
    assert PLUGINS["moe_down_grouped"].output_shapes([h.shape, w2.shape, (R_,), (NB_,), w.shape], {"block_m": BM_}) == (
        tuple(y_perm.shape),
    )
    y = grouped.combine(y_perm, a.inv_perm, T_, K_, out_dtype=f32)
    assert PLUGINS["moe_combine"].output_shapes([y_perm.shape, a.inv_perm.shape], {"top_k": K_}) == (tuple(y.shape),)
    hd = grouped.swiglu_decode(x, w1, w3, ids, block_n=16, block_k=16)
    assert PLUGINS["moe_swiglu_decode"].output_shapes([x.shape, w1.shape, w3.shape, ids.shape], {}) == (tuple(hd.shape),)
    yd = grouped.down_combine_decode(hd, w2, w, ids, out_dtype=f32, block_n=16, block_k=16)
    assert PLUGINS["moe_down_combine_decode"].output_shapes([hd.shape, w2.shape, w.shape, ids.shape], {}) == (
        tuple(yd.shape),
    )


class _Recorder:
    """Stands in for a Triton kernel object: records ``kernel[grid](*args, **kwargs)`` without running it."""

    def __init__(self, kernel):
        self.arg_names = kernel.arg_names
        self.calls = []

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            bound = dict(zip(self.arg_names, args))
            bound.update(kwargs)
            self.calls.append((tuple(grid) + (1,) * (3 - len(grid)), bound))

        return call


def _recorded(monkeypatch, module, attr, fn):
    rec = _Recorder(getattr(module, attr))
    monkeypatch.setattr(module, attr, rec)
    fn()
    assert len(rec.calls) == 1
    return rec.calls[0]


def _assert_same_launch(p, grid, bound, renames=(), skip=("DOT_PRECISION",)):
    """The plan launches what the wrapper launches: grid, warps, stages, constexprs and extra-arg values."""
    assert p.concrete_grid() == grid
    assert bound["num_warps"] == p.num_warps
    if "num_stages" in bound:
        assert bound["num_stages"] == p.num_stages
    renames = dict(renames)
    for n, v in p.constexprs.items():
        if n not in skip:
            assert bound[renames.get(n, n)] == v, n
    for n, v in zip((n for n, _ in p.extra_args), p.concrete_extra_args()):
        assert bound[renames.get(n, n)] == v, n


@pytest.mark.parametrize("tactic", [1, 2, 3, 4])
def test_moe_plans_launch_what_the_wrappers_launch(monkeypatch, tactic):
    """For each tactic's tiles, the plan's grid/extra args/constexprs equal the wrapper's launch of the same kernel
    (the wrappers run with the tactic's tiles on CPU tensors; nothing is computed)."""
    x, router, w1, w3, w2 = moe_inputs(T_, E_, HID_, I_, f32, CPU)
    w = torch.zeros(T_, K_)
    cfg = moe.stage_config("moe_route", tactic, K_, E_)
    p = plugins.plan("moe_route", [f32, f32], [x.shape, router.shape], {"top_k": K_}, tactic)
    grid, bound = _recorded(monkeypatch, routing, "_route_kernel", lambda: routing.moe_route_triton(
        x, router, K_, block_t=cfg.route_block_t, block_k=cfg.route_block_k, num_warps=cfg.route_warps,
        use_dot=cfg.route_dot))  # fmt: skip
    _assert_same_launch(p, grid, bound)

    cfg = moe.stage_config("moe_swiglu_grouped", tactic, K_, E_)
    bm = cfg.block_m
    S, R, NB = align_sizes(T_, K_, E_, bm)
    slots, blocks = torch.zeros(R, dtype=i32), torch.zeros(NB, dtype=i32)
    p = plugins.plan("moe_swiglu_grouped", [f32, f32, f32, i32, i32], [x.shape, w1.shape, w3.shape, (R,), (NB,)],
                     {"top_k": K_, "block_m": bm}, tactic)  # fmt: skip
    grid, bound = _recorded(monkeypatch, grouped, "_swiglu_grouped_kernel", lambda: grouped.swiglu_grouped(
        x, w1, w3, slots, blocks, K_, block_m=bm, block_n=cfg.swiglu_block_n, block_k=cfg.swiglu_block_k,
        group_m=cfg.group_m, num_warps=cfg.swiglu_warps, num_stages=cfg.swiglu_stages, interleave=cfg.swiglu_interleave))  # fmt: skip
    _assert_same_launch(p, grid, bound)

    cfg = moe.stage_config("moe_down_grouped", tactic, K_, E_)
    h = torch.zeros(R, I_)
    p = plugins.plan("moe_down_grouped", [f32, f32, i32, i32, f32], [h.shape, w2.shape, (R,), (NB,), w.shape],
                     {"block_m": bm}, tactic)  # fmt: skip
    grid, bound = _recorded(monkeypatch, grouped, "_down_grouped_kernel", lambda: grouped.down_grouped(
        h, w2, slots, blocks, w, block_m=bm, block_n=cfg.down_block_n, block_k=cfg.down_block_k, group_m=cfg.group_m,
        num_warps=cfg.down_warps, num_stages=cfg.down_stages))  # fmt: skip
    _assert_same_launch(p, grid, bound)


def test_other_plans_launch_what_the_wrappers_launch(monkeypatch):
    x, router, w1, w3, w2 = moe_inputs(T_, E_, HID_, I_, f32, CPU)
    ids, w = torch.zeros(T_, K_, dtype=i32), torch.zeros(T_, K_)
    p = plugins.plan("moe_align", [i32], [ids.shape], {"num_experts": E_, "block_m": BM_})
    grid, bound = _recorded(monkeypatch, routing, "_align_kernel", lambda: routing.moe_align_triton(
        ids, E_, BM_, chunk=p.constexprs["CHUNK"], num_warps=p.num_warps))  # fmt: skip
    _assert_same_launch(p, grid, bound)

    y_perm, inv = torch.zeros(R_, HID_), torch.zeros(S_, dtype=i32)
    p = plugins.plan("moe_combine", [f32, i32], [y_perm.shape, inv.shape], {"top_k": K_})
    grid, bound = _recorded(monkeypatch, grouped, "_combine_kernel",
                            lambda: grouped.combine(y_perm, inv, T_, K_, out_dtype=f32))  # fmt: skip
    bound.setdefault("num_warps", 4)  # the wrapper leaves Triton's default
    _assert_same_launch(p, grid, bound)

    cfg = moe.stage_config("moe_swiglu_decode", 1, K_, E_)
    p = plugins.plan("moe_swiglu_decode", [f32, f32, f32, i32], [x.shape, w1.shape, w3.shape, ids.shape], {})
    grid, bound = _recorded(monkeypatch, grouped, "_swiglu_decode_kernel", lambda: grouped.swiglu_decode(
        x, w1, w3, ids, block_n=cfg.decode_block_n, block_k=cfg.decode_block_k, num_warps=cfg.decode_warps,
        num_stages=cfg.decode_stages))  # fmt: skip
    _assert_same_launch(p, grid, bound)

    h = torch.zeros(S_, I_)
    p = plugins.plan("moe_down_combine_decode", [f32, f32, f32, i32], [h.shape, w2.shape, w.shape, ids.shape], {})
    grid, bound = _recorded(monkeypatch, grouped, "_down_combine_decode_kernel", lambda: grouped.down_combine_decode(
        h, w2, w, ids, out_dtype=f32, block_n=cfg.decode_down_block_n, block_k=cfg.decode_down_block_k,
        num_warps=cfg.decode_down_warps, num_stages=cfg.decode_down_stages))  # fmt: skip
    _assert_same_launch(p, grid, bound)

    q, k, v, s, state = lightning_inputs(2, 37, 2, 16, f32, CPU)
    p = plugins.plan("lightning_prefill", [f32] * 5, [t.shape for t in (q, k, v, s, state)])
    c = p.constexprs
    grid, bound = _recorded(monkeypatch, chunk, "_lightning_prefill_kernel", lambda: chunk.lightning_prefill_triton(
        q, k, v, s, state, config=chunk.PrefillConfig(c["BLOCK_T"], c["BLOCK_V"], p.num_warps, c["NUM_STAGES"])))  # fmt: skip
    _assert_same_launch(p, grid, bound)
    # the strides the entry kernel derives from (T, H, D) are the wrapper's for contiguous tensors
    assert (bound["stride_qb"], bound["stride_qt"], bound["stride_qh"]) == (37 * 2 * 16, 2 * 16, 16)
    assert (bound["stride_sb"], bound["stride_sh"], bound["stride_sk"]) == (2 * 16 * 16, 16 * 16, 16)

    q1, k1, v1 = q[:, :1].contiguous(), k[:, :1].contiguous(), v[:, :1].contiguous()
    for tactic, (block_v, warps) in ((1, (16, 2)), (2, (64, 4))):
        p = plugins.plan("lightning_decode", [f32] * 5, [t.shape for t in (q1, k1, v1, s, state)], tactic=tactic)
        grid, bound = _recorded(monkeypatch, recurrent, "_lightning_decode_kernel", lambda: recurrent._launch(
            q1, k1, v1, s, state, torch.empty_like(state), block_v=block_v, num_warps=warps))  # fmt: skip
        _assert_same_launch(p, grid, bound)


# --- entry kernels (TensorRT argument order) in the interpreter, against the references ---------------------------


@pytest.mark.parametrize("B,T", [(1, 1), (2, 37), (1, 70)])
def test_entry_lightning_prefill(B, T):
    check_lightning_prefill(B, T, 2, 16, f32, CPU, tol=1e-5)


@pytest.mark.parametrize("tactic", [1, 2])
def test_entry_lightning_decode(tactic):
    check_lightning_decode(3, 2, 16, f32, CPU, tactic, tol=1e-5)


@pytest.mark.parametrize("tactic", [1, 2, 3, 4])
def test_entry_route(tactic):
    check_route(T_, E_ * 2, 64, K_, f32, CPU, tactic)


@pytest.mark.parametrize("T,top_k,E,block_m", [(1, 1, 4, 16), (13, 2, 4, 16), (37, 3, 6, 32)])
def test_entry_align(T, top_k, E, block_m):
    check_align(T, top_k, E, block_m, CPU)


@pytest.mark.parametrize("tactic", [1, 2])
def test_entry_grouped_stages(tactic):
    check_grouped_stages(T_, E_, HID_, I_, K_, 16, f32, CPU, tactic, tol=1e-5)


@pytest.mark.parametrize("T", [1, 5])
def test_entry_decode_stages(T):
    check_decode_stages(T, E_, HID_, I_, K_, f32, CPU, tol=1e-5)


@pytest.mark.parametrize("tactic", [1, 2])
def test_entry_grouped_stages_int8(tactic):
    check_grouped_stages_int8(T_, E_, HID_, I_, K_, 16, f32, CPU, tactic, tol=1e-5)


@pytest.mark.parametrize("T", [1, 5])
def test_entry_decode_stages_int8(T):
    check_decode_stages_int8(T, E_, HID_, I_, K_, f32, CPU, tol=1e-5)


def test_int8_scale_shapes_are_checked():
    dtypes, shapes, attrs = CASES["moe_swiglu_grouped_int8"]
    bad = list(shapes)
    bad[4] = (E_, I_ + 1)
    with pytest.raises(ValueError, match=rf"moe_swiglu_grouped_int8: w3_scale must be \[E={E_}, {I_}\]"):
        plugins.plan("moe_swiglu_grouped_int8", dtypes, bad, attrs)
    dtypes, shapes, attrs = CASES["moe_down_combine_decode_int8"]
    with pytest.raises(ValueError, match="not supported"):  # bf16 weights in an int8 stage
        PLUGINS["moe_down_combine_decode_int8"].output_dtypes([f32, f32, f32, f32, i32])


@pytest.mark.parametrize("decode", [False, True])
def test_entry_chain_equals_reference(decode):
    check_chain(5 if decode else 21, E_, HID_, I_, K_, 16, f32, CPU, decode, tol=1e-5)


@pytest.mark.parametrize("start", [[0, 5], [-4, 61], [-13, 3]])
def test_entry_paged_kv_write(start):
    """Pads skipped, pages crossed mid-chunk (page 64: 61..73), a row of only pads."""
    check_paged_kv_write(2, T_, 2, 16, 64, 8, f32, CPU, start)


@pytest.mark.parametrize("B,T,H,KVH,start", [(1, 13, 4, 4, [0]), (2, 13, 4, 1, [-5, 100]), (2, 7, 8, 2, [60, -7])])
def test_entry_paged_attention_prefill(B, T, H, KVH, start):
    check_paged_prefill(B, T, H, KVH, 16, 64, 8, f32, CPU, start[:B], tol=1e-5)


@pytest.mark.parametrize("held", [[1, 300], [512, 0], [257, 64]])
def test_entry_paged_decode(held):
    """Split + merge over 1 or 2 splits of 256 (capacity 512), a row that holds nothing (a pad: zeros)."""
    check_paged_decode(2, 4, 2, 16, 64, 8, f32, CPU, held, tol=1e-5)


def test_decode_split_attribute_must_be_the_kernels():
    dtypes, shapes, attrs = CASES["paged_decode_split"]
    with pytest.raises(ValueError, match="split 128 is not the decode kernel's split 256"):
        plugins.plan("paged_decode_split", dtypes, shapes, {**attrs, "split": 128})
    with pytest.raises(ValueError, match="attribute 'scale' must be a positive finite float"):
        plugins.plan("paged_decode_split", dtypes, shapes, {**attrs, "scale": float("inf")})
    with pytest.raises(ValueError, match="paged_attention_prefill: 4 heads of q are not a multiple of 3 kv heads"):
        plugins.plan("paged_attention_prefill", CASES["paged_attention_prefill"][0],
                     [(2, 5, 4, 16), (19, 3, 64, 16), (19, 3, 64, 16), (2, 8), (2,)], {"scale": 0.25})


def test_driver_rejects_wrong_buffers():
    x, router, *_ = moe_inputs(T_, E_, HID_, I_, f32, CPU)
    outs = driver.alloc_outputs("moe_route", [x, router], {"top_k": K_})
    with pytest.raises(ValueError, match="moe_route: tensor 'topk_ids' must be contiguous torch.int32"):
        driver.run("moe_route", [x, router], {"top_k": K_}, outputs=[outs[0], outs[1].float()])


# --- PTX (no interpreter: a subprocess) ----------------------------------------------------------------------------

_PTX_SCRIPT = r"""
import json, sys, torch, plugins
from triton.backends.compiler import GPUTarget
from tests.test_plugins import CASES, PTX_DTYPES
out = []
for name, (dtypes, shapes, attrs) in CASES.items():
    for dt in PTX_DTYPES[name]:
        dts = [dt if d == torch.float32 and i in FLOAT_POS[name] else d for i, d in enumerate(dtypes)]
        for tactic in plugins.TACTICS[name]:
            p = plugins.build_payload(name, dts, shapes, attrs, tactic, target=GPUTarget("cuda", 90, 32))
            out.append(dict(name=name, dtype=str(dt), tactic=tactic, kernel=p.kernel_name, block=p.block,
                            shared=p.shared_mem, ptx=p.ptx, n_in=len(p.plan.inputs), n_extra=len(p.plan.extra_args),
                            n_out=len(p.plan.outputs)))
json.dump(out, sys.stdout)
"""
PTX_DTYPES = {n: [bf16] for n in CASES}
PTX_DTYPES["lightning_prefill"] = [bf16, f16, f32]
PTX_DTYPES["moe_swiglu_grouped"] = [bf16, f32]
FLOAT_POS = {  # positions of the activation / weight tensors (the dtype that varies)
    "lightning_prefill": (0, 1, 2), "lightning_decode": (0, 1, 2), "moe_route": (0,), "moe_align": (),
    "moe_swiglu_grouped": (0, 1, 2), "moe_down_grouped": (0, 1), "moe_combine": (0,), "moe_swiglu_decode": (0, 1, 2),
    "moe_down_combine_decode": (0, 1), "paged_kv_write": (0, 1, 2, 3), "paged_attention_prefill": (0, 1, 2),
    "moe_swiglu_grouped_int8": (0,), "moe_down_grouped_int8": (0,), "moe_swiglu_decode_int8": (0,),
    "moe_down_combine_decode_int8": (0,),
    "paged_decode_split": (0, 1, 2), "paged_decode_merge": (0,),
}  # fmt: skip
H100_MAX_SHARED = 227 * 1024


@pytest.fixture(scope="module")
def ptx_payloads():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    script = _PTX_SCRIPT.replace("from tests.test_plugins import CASES, PTX_DTYPES",
                                 "from tests.test_plugins import CASES, PTX_DTYPES, FLOAT_POS")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        pytest.fail(f"PTX compilation failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout)


def _entry_params(ptx: str, kernel: str) -> list[str]:
    body = ptx[ptx.index(f".entry {kernel}(") :]
    body = body[: body.index(")")]
    return [line.strip() for line in body.splitlines() if ".param" in line]


def test_ptx_entry_abi(ptx_payloads):
    """Each payload's PTX entry: inputs (pointers), int32 extra args, outputs (pointers), then exactly 2 hidden
    pointers (Triton's scratch); 128..1024 threads; shared memory within an H100 block."""
    seen = {(p["name"], p["tactic"]) for p in ptx_payloads}
    assert seen == {(n, t) for n in PLUGINS for t in plugins.TACTICS[n]}
    for p in ptx_payloads:
        params = _entry_params(p["ptx"], p["kernel"])
        kinds = ["ptr" if ".ptr" in s else "u32" if ".u32" in s else s for s in params]
        want = ["ptr"] * p["n_in"] + ["u32"] * p["n_extra"] + ["ptr"] * (p["n_out"] + plugins.HIDDEN_PARAMS)
        assert kinds == want, (p["name"], p["tactic"], params)
        assert f".reqntid {p['block']}" in p["ptx"] or f".maxntid {p['block']}" in p["ptx"]
        assert 0 <= p["shared"] <= H100_MAX_SHARED, (p["name"], p["tactic"], p["shared"])
        assert ".target sm_90" in p["ptx"]


# --- TensorRT (skipped without it) ---------------------------------------------------------------------------------


@pytest.mark.tensorrt
def test_register_all_with_tensorrt():
    trtp = pytest.importorskip("tensorrt.plugin", reason="TensorRT (tensorrt.plugin, >= 10.9) is not installed")
    plugins.register_all()
    for name in PLUGINS:
        assert getattr(getattr(trtp.op, NAMESPACE), name) is not None


def test_import_does_not_import_tensorrt():
    code = "import sys, plugins, plugins.driver; assert 'tensorrt' not in sys.modules, 'tensorrt imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
