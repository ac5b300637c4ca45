"""MiniMax MoE on the GPU: our Triton kernels against the device ceilings and PyTorch peers, in one process.

    python -m benchmarks.moe --out benchmarks/results/moe.json [--quick] [--sweep | --sweep-grouped] [--tokens T ...]

Problem: hidden 6144, 32 experts of I = 9216, top-2, bf16 (router fp32); T tokens in {1, 2, 4, 8, 16, 1024, 4096,
16384}.
Measures:
  * ceilings: device-to-device copy bandwidth (read + write) and a bf16 8192^3 matmul (benchmarks/common.py);
  * ours: ``moe_forward_triton`` eagerly, and for T <= 16 also replayed from a CUDA graph (no launch gaps);
  * loop: a per-expert PyTorch loop in bf16 (the structure of naive.py: nonzero, gather, 3 matmuls, index_add);
  * grouped_mm: the same block through ``torch._grouped_mm`` (argsort, gather, 3 grouped GEMMs, scatter), if present;
  * dense: cuBLAS GEMMs of the same useful FLOPs: T*top_k rows through [hidden -> 2I] and [I -> hidden];
  * T <= 16: the bytes of the experts actually selected (distinct experts x 3 x I x hidden x 2 B) over the measured
    copy bandwidth, the floor of a kernel that reads each selected weight once;
  * per-stage times of our launches (each timed alone with its inputs precomputed);
  * with ``--sweep``: tile configurations of the router (T = 1 + 16, 4096, 16384), the grouped GEMMs (T = 4096,
    16384: the pointer kernels' reference tiles and the TMA kernels' candidates, each stage alone) and the decode
    kernels (T = 1, 4, 16; swiglu and down chosen separately); the fastest are used for the rows of the main table
    in their size class and recorded in the JSON (``sweep.overrides``). ``--sweep-grouped``: the grouped GEMMs
    only (``--sweep-tokens`` picks their T); ``--tokens``: the T of the main table.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F

from benchmarks.common import environment, measure_ceilings, time_ms, write_json

HIDDEN, INTER, E, TOP_K = 6144, 9216, 32, 2
TOKENS = (1, 2, 4, 8, 16, 1024, 4096, 16384)
QUICK_TOKENS = (1, 16, 4096)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _route_torch(x: torch.Tensor, router: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(x.float() @ router.t(), dim=-1)
    w, ids = torch.topk(probs, top_k, dim=-1)
    return w / w.sum(-1, keepdim=True), ids


def moe_loop(x, router, w1, w3, w2, top_k):
    """Per-expert PyTorch loop in the input dtype (naive.py's structure; nonzero synchronises with the host)."""
    w, ids = _route_torch(x, router, top_k)
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        token, slot = torch.nonzero(ids == e, as_tuple=True)
        if token.numel() == 0:
            continue
        xe = x[token]
        h = F.silu(xe @ w1[e].t()) * (xe @ w3[e].t())
        out.index_add_(0, token, (h @ w2[e].t()) * w[token, slot, None].to(x.dtype))
    return out


def moe_grouped_mm(x, router, w1, w3, w2, top_k):
    """The block through torch._grouped_mm (CUTLASS grouped GEMM); routing and permutation in PyTorch, no sync."""
    T = x.shape[0]
    w, ids = _route_torch(x, router, top_k)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # slots grouped by expert
    offs = torch.bincount(flat, minlength=w1.shape[0]).cumsum(0).to(torch.int32)
    xs = x[order // top_k]  # [T * top_k, hidden]
    h = F.silu(torch._grouped_mm(xs, w1.transpose(1, 2), offs=offs)) * torch._grouped_mm(xs, w3.transpose(1, 2), offs=offs)
    ys = torch._grouped_mm(h, w2.transpose(1, 2), offs=offs) * w.reshape(-1)[order, None].to(x.dtype)
    out = torch.empty_like(ys)
    out[order] = ys
    return out.view(T, top_k, -1).sum(1)


def _timed(fn: Callable[[], Any], quick: bool) -> float:
    return time_ms(fn, warmup=3 if quick else 5, iters=10 if quick else 20)


def _graph_ms(fn: Callable[[], Any], quick: bool = False, reps: int = 10) -> float:
    """Device time of ``fn`` without launch gaps: ``reps`` calls captured in one CUDA graph, replayed, divided."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    ms = time_ms(graph.replay, warmup=2, iters=5 if quick else 10) / reps
    del graph
    return ms


def _try(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a peer that fails is a result, not a crash
        return f"error: {type(exc).__name__}: {str(exc)[:300]}"


def stage_times(x, router, w1, w3, w2, top_k, cfg, quick) -> dict[str, float]:
    """Each launch of ``moe_forward_triton`` timed alone (CUDA-graph replays, no launch gaps), inputs precomputed."""
    from kernels.moe import grouped, routing

    T = x.shape[0]
    reps = 10 if T <= 16 else 2

    def _timed(fn: Callable[[], Any], quick: bool) -> float:  # noqa: F811 - graph replays, not the eager timer
        return _graph_ms(fn, quick, reps=reps)

    t = {}
    rk = dict(block_t=cfg.route_block_t, block_k=cfg.route_block_k, num_warps=cfg.route_warps, use_dot=cfg.route_dot)
    t["route"] = _timed(lambda: routing.moe_route_triton(x, router, top_k, **rk), quick)
    w, ids = routing.moe_route_triton(x, router, top_k, **rk)
    if T <= cfg.decode_max_tokens:
        kw = dict(block_n=cfg.decode_block_n, block_k=cfg.decode_block_k, num_warps=cfg.decode_warps, num_stages=cfg.decode_stages)
        kd = dict(block_n=cfg.decode_down_block_n, block_k=cfg.decode_down_block_k, num_warps=cfg.decode_down_warps,
                  num_stages=cfg.decode_down_stages)
        t["swiglu_decode"] = _timed(lambda: grouped.swiglu_decode(x, w1, w3, ids, **kw), quick)
        h = grouped.swiglu_decode(x, w1, w3, ids, **kw)
        t["down_combine_decode"] = _timed(lambda: grouped.down_combine_decode(h, w2, w, ids, out_dtype=x.dtype, **kd), quick)
        return t
    bm = cfg.block_m
    t["align"] = _timed(lambda: routing.moe_align_triton(ids, E, bm, chunk=cfg.align_chunk), quick)
    a = routing.moe_align_triton(ids, E, bm, chunk=cfg.align_chunk)
    sw = dict(block_m=bm, block_n=cfg.swiglu_block_n, block_k=cfg.swiglu_block_k, group_m=cfg.group_m,
              num_warps=cfg.swiglu_warps, num_stages=cfg.swiglu_stages, interleave=cfg.swiglu_interleave)
    dn = dict(block_m=bm, block_n=cfg.down_block_n, block_k=cfg.down_block_k, group_m=cfg.group_m,
              num_warps=cfg.down_warps, num_stages=cfg.down_stages)
    tma = grouped.tma_supported(x, w1, w3, w2)
    if tma and cfg.swiglu_tma:
        del sw["interleave"]
        if cfg.swiglu_permute:
            t["permute_rows"] = _timed(lambda: grouped.permute_rows(x, a.sorted_slots, a.expert_offsets, top_k), quick)
            sw["x_perm"] = grouped.permute_rows(x, a.sorted_slots, a.expert_offsets, top_k)
        sw["persistent"] = cfg.swiglu_persistent
        t["swiglu_grouped_tma"] = _timed(
            lambda: grouped.swiglu_grouped_tma(x, w1, w3, a.sorted_slots, a.block_expert, a.expert_offsets, top_k, **sw),
            quick)
        h = grouped.swiglu_grouped_tma(x, w1, w3, a.sorted_slots, a.block_expert, a.expert_offsets, top_k, **sw)
    else:
        t["swiglu_grouped"] = _timed(
            lambda: grouped.swiglu_grouped(x, w1, w3, a.sorted_slots, a.block_expert, top_k, **sw), quick)
        h = grouped.swiglu_grouped(x, w1, w3, a.sorted_slots, a.block_expert, top_k, **sw)
    if tma and cfg.down_tma:
        dn["persistent"] = cfg.down_persistent
        t["down_grouped_tma"] = _timed(
            lambda: grouped.down_grouped_tma(h, w2, a.sorted_slots, a.block_expert, a.expert_offsets, w, **dn), quick)
        yp = grouped.down_grouped_tma(h, w2, a.sorted_slots, a.block_expert, a.expert_offsets, w, **dn)
    else:
        t["down_grouped"] = _timed(lambda: grouped.down_grouped(h, w2, a.sorted_slots, a.block_expert, w, **dn), quick)
        yp = grouped.down_grouped(h, w2, a.sorted_slots, a.block_expert, w, **dn)
    t["combine"] = _timed(lambda: grouped.combine(yp, a.inv_perm, T, top_k, out_dtype=x.dtype), quick)
    return t


# ------------------------------------------------------------------------------------------------ sweeps

TMA_CANDIDATES = {
    # swiglu: (block_m, block_n, block_k, num_warps, num_stages, permute, persistent, group_m, flatten)
    "swiglu": [
        (128, 128, 64, 8, 4, False, False, 8, False), (128, 128, 64, 8, 4, True, False, 8, False),
        (128, 128, 64, 8, 4, True, True, 8, False), (128, 128, 64, 8, 4, False, True, 8, False),
        (128, 128, 64, 8, 4, True, True, 8, True), (128, 128, 64, 8, 3, True, False, 8, False),
        (128, 64, 64, 4, 4, True, False, 8, False), (128, 128, 128, 8, 2, True, False, 8, False),
        (128, 128, 64, 8, 4, True, False, 16, False), (64, 128, 64, 4, 4, True, False, 8, False),
        (64, 128, 64, 4, 4, False, False, 8, False),
    ],
    # down: (block_m, block_n, block_k, num_warps, num_stages, persistent, group_m, flatten)
    "down": [
        (128, 256, 64, 8, 4, False, 8, False), (128, 256, 64, 8, 4, True, 8, False),
        (128, 256, 64, 8, 4, True, 8, True), (128, 256, 64, 8, 3, False, 8, False),
        (128, 128, 64, 8, 4, False, 8, False), (128, 128, 64, 4, 4, False, 8, False),
        (128, 256, 64, 8, 4, False, 16, False), (128, 128, 128, 8, 3, False, 8, False),
        (64, 256, 64, 4, 4, False, 8, False),
    ],
}
POINTER_REFERENCE = {  # the pointer kernels' sweep winners of 2026-11-26, timed again beside the TMA candidates
    "swiglu": [(128, 128, 64, 8, 4, True, 16), (64, 128, 64, 8, 4, True, 8)],
    "down": [(128, 256, 64, 8, 4, False, 16), (64, 256, 64, 8, 4, False, 8)],
}
DECODE_CANDIDATES = [  # (block_n, block_k, num_warps, num_stages)
    (16, 256, 4, 4), (16, 128, 2, 4), (32, 128, 4, 3), (32, 128, 2, 4), (16, 128, 2, 6), (32, 64, 2, 6),
    (64, 128, 4, 3),
]
DECODE_SWEEP_T = {1: (1, 2), 4: (3, 4, 5, 6, 7, 8), 16: tuple(range(9, 17))}  # swept T -> the T that use its best
ROUTE_CANDIDATES = {  # (block_t, block_k, num_warps, use_dot)
    "decode": [(1, 256, 8, False), (2, 256, 8, False), (2, 128, 4, False), (4, 128, 8, False), (1, 512, 8, False)],
    "prefill": [(16, 128, 4, True), (32, 128, 4, True), (64, 128, 4, True), (32, 64, 4, True), (64, 64, 8, True),
                (16, 256, 8, True)],
}


def sweep_route(T, router, candidates) -> list[dict[str, Any]]:
    from kernels.moe import routing

    x = torch.randn(T, HIDDEN, device="cuda").bfloat16()
    ref_w, ref_ids = _route_torch(x, router, TOP_K)
    rows = []
    for bt, bk, warps, dot in candidates:
        kw = dict(block_t=bt, block_k=bk, num_warps=warps, use_dot=dot)
        row = {"T": T, **kw}
        try:
            row["ms"] = _graph_ms(lambda: routing.moe_route_triton(x, router, TOP_K, **kw))
            w, ids = routing.moe_route_triton(x, router, TOP_K, **kw)
            row["ids_equal_torch"] = bool(torch.equal(ids.long(), ref_ids))
            row["max_weight_diff"] = (w - ref_w).abs().max().item()
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        rows.append(row)
        print("  sweep route", row, flush=True)
    return rows


def sweep_grouped_tma(T, router, w1, w3, w2, flops) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Descriptor (TMA) kernels and the pointer kernels' reference tiles, each stage timed alone (CUDA-graph
    replays); per block_m the fastest swiglu (+ permute_rows when it uses it) and down; returns rows and the best
    block_m's choice (by the sum align + permute + swiglu + down)."""
    from kernels.moe import grouped, routing

    dev = router.device  # "cuda" (a CPU smoke test of this logic runs it under TRITON_INTERPRET=1)
    x = torch.randn(T, HIDDEN, device=dev, generator=torch.Generator(device=dev).manual_seed(T)).to(w1.dtype)
    w, ids = routing.moe_route_triton(x, router, TOP_K)
    rows, best_by_bm = [], {}
    sw_flops, dn_flops = flops * 2 / 3, flops / 3

    def record(row, fn, stage_flops):
        try:
            ms = _graph_ms(fn, reps=3)
            row.update(ms=ms, tflops=stage_flops / (ms * 1e-3) / 1e12)
        except Exception as exc:  # noqa: BLE001 - a config that does not compile is a sweep result
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        rows.append(row)
        print("  sweep", row, flush=True)
        return row

    for bm in (128, 64):
        a = routing.moe_align_triton(ids, E, bm)
        args = (a.sorted_slots, a.block_expert, a.expert_offsets)
        best: dict[str, Any] = {"align_ms": _graph_ms(lambda: routing.moe_align_triton(ids, E, bm), reps=5)}
        best["permute_ms"] = _graph_ms(lambda: grouped.permute_rows(x, a.sorted_slots, a.expert_offsets, TOP_K), reps=5)
        x_perm = grouped.permute_rows(x, a.sorted_slots, a.expert_offsets, TOP_K)
        h_ref = grouped.swiglu_grouped(x, w1, w3, a.sorted_slots, a.block_expert, TOP_K, block_m=bm, block_n=128,
                                       block_k=64, num_warps=8 if bm == 128 else 4, num_stages=4)
        y_ref = grouped.down_grouped(h_ref, w2, a.sorted_slots, a.block_expert, w, block_m=bm, block_n=256, block_k=64,
                                     num_warps=8 if bm == 128 else 4, num_stages=4)
        used = int(a.expert_offsets[-1])
        cands = []  # (stage, kernel, kwargs, total extra ms)
        for cbm, bn, bk, warps, stages, interleave, gm in POINTER_REFERENCE["swiglu"]:
            if cbm == bm:
                cands.append(("swiglu", "pointer", dict(block_n=bn, block_k=bk, num_warps=warps, num_stages=stages,
                                                        interleave=interleave, group_m=gm)))
        for cbm, bn, bk, warps, stages, permute, persistent, gm, flat in TMA_CANDIDATES["swiglu"]:
            if cbm == bm:
                cands.append(("swiglu", "tma", dict(block_n=bn, block_k=bk, num_warps=warps, num_stages=stages,
                                                    permute=permute, persistent=persistent, group_m=gm, flatten=flat)))
        for cbm, bn, bk, warps, stages, _, gm in POINTER_REFERENCE["down"]:
            if cbm == bm:
                cands.append(("down", "pointer", dict(block_n=bn, block_k=bk, num_warps=warps, num_stages=stages,
                                                      group_m=gm)))
        for cbm, bn, bk, warps, stages, persistent, gm, flat in TMA_CANDIDATES["down"]:
            if cbm == bm:
                cands.append(("down", "tma", dict(block_n=bn, block_k=bk, num_warps=warps, num_stages=stages,
                                                  persistent=persistent, group_m=gm, flatten=flat)))
        for stage, kernel, kw in cands:
            row = {"T": T, "stage": stage, "kernel": kernel, "block_m": bm, **kw}
            if stage == "swiglu":
                if kernel == "pointer":
                    fn = lambda: grouped.swiglu_grouped(x, w1, w3, a.sorted_slots, a.block_expert, TOP_K, block_m=bm, **kw)  # noqa: E731,B023
                else:
                    kk = {k: v for k, v in kw.items() if k != "permute"}
                    xp = x_perm if kw["permute"] else None
                    fn = lambda: grouped.swiglu_grouped_tma(x, w1, w3, *args, TOP_K, block_m=bm, x_perm=xp, **kk)  # noqa: E731,B023
                record(row, fn, sw_flops)
                extra = best["permute_ms"] if kw.get("permute") else 0.0
                ref = h_ref
            else:
                if kernel == "pointer":
                    fn = lambda: grouped.down_grouped(h_ref, w2, a.sorted_slots, a.block_expert, w, block_m=bm, **kw)  # noqa: E731,B023
                else:
                    fn = lambda: grouped.down_grouped_tma(h_ref, w2, *args, w, block_m=bm, **kw)  # noqa: E731,B023
                record(row, fn, dn_flops)
                extra = 0.0
                ref = y_ref
            if "ms" in row:
                try:  # the rows in use must match the pointer kernels' reference to bf16 rounding
                    row["rel_vs_pointer"] = _rel(fn()[:used], ref[:used])
                except Exception as exc:  # noqa: BLE001
                    row["rel_vs_pointer"] = f"error: {exc}"[:200]
                ok = isinstance(row["rel_vs_pointer"], float) and row["rel_vs_pointer"] < 2e-2
                if ok and (stage not in best or row["ms"] + extra < best[stage]["ms"] + best[stage + "_extra_ms"]):
                    best[stage], best[stage + "_extra_ms"] = row, extra
        if "swiglu" in best and "down" in best:
            best["total_ms"] = best["align_ms"] + best["swiglu"]["ms"] + best["swiglu_extra_ms"] + best["down"]["ms"]
            best_by_bm[bm] = best
        x_perm = h_ref = y_ref = None  # free before the next block height
        torch.cuda.empty_cache()
    if not best_by_bm:
        return rows, None
    return rows, min(best_by_bm.values(), key=lambda b: b["total_ms"])


def grouped_overrides(best: dict[str, Any]) -> dict[str, Any]:
    """MoeTritonConfig fields from a ``sweep_grouped_tma`` choice (group_m: the swiglu stage's, the larger one)."""
    sw, dn = best["swiglu"], best["down"]
    out = dict(block_m=sw["block_m"], swiglu_block_n=sw["block_n"], swiglu_block_k=sw["block_k"],
               swiglu_warps=sw["num_warps"], swiglu_stages=sw["num_stages"], group_m=sw["group_m"],
               down_block_n=dn["block_n"], down_block_k=dn["block_k"], down_warps=dn["num_warps"],
               down_stages=dn["num_stages"])
    out.update(swiglu_tma=sw["kernel"] == "tma", down_tma=dn["kernel"] == "tma")
    if sw["kernel"] == "tma":
        out.update(swiglu_permute=sw["permute"], swiglu_persistent=sw["persistent"])
    else:
        out.update(swiglu_interleave=sw["interleave"])
    if dn["kernel"] == "tma":
        out.update(down_persistent=dn["persistent"])
    return out


def sweep_decode(T, router, w1, w3, w2) -> list[dict[str, Any]]:
    from kernels.moe import grouped, routing

    x = torch.randn(T, HIDDEN, device="cuda", generator=torch.Generator(device="cuda").manual_seed(T)).bfloat16()
    w, ids = routing.moe_route_triton(x, router, TOP_K)
    rows = []
    for bn, bk, warps, stages in DECODE_CANDIDATES:
        kw = dict(block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)
        row = {"T": T, **kw}
        try:
            row["swiglu_ms"] = _graph_ms(lambda: grouped.swiglu_decode(x, w1, w3, ids, **kw))
            h = grouped.swiglu_decode(x, w1, w3, ids, **kw)
            row["down_ms"] = _graph_ms(lambda: grouped.down_combine_decode(h, w2, w, ids, out_dtype=x.dtype, **kw))
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        rows.append(row)
        print("  sweep decode", row, flush=True)
    return rows


SWEEP_GROUPED_T = (16384, 4096)


def _sweep_grouped_into(out, overrides, router, w1, w3, w2) -> None:
    """Grouped GEMMs per T (pointer reference tiles and TMA candidates): rows into ``out``, the best into
    ``overrides``."""
    for T in SWEEP_GROUPED_T:
        rows, best = sweep_grouped_tma(T, router, w1, w3, w2, 6 * T * TOP_K * HIDDEN * INTER)
        out[f"grouped_T{T}"] = {"rows": rows, "best": best}
        if best is not None:
            overrides.setdefault(T, {}).update(grouped_overrides(best))


def run_sweeps(router, w1, w3, w2, only_grouped: bool = False) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """All sweeps (``only_grouped``: the grouped GEMMs only); returns (their rows, per-T config overrides built from
    the fastest candidates)."""
    out: dict[str, Any] = {}
    overrides: dict[int, dict[str, Any]] = {T: {} for T in TOKENS}
    if only_grouped:
        _sweep_grouped_into(out, overrides, router, w1, w3, w2)
        out["overrides"] = {str(T): o for T, o in overrides.items()}
        return out, overrides
    # router: decode class by the sum over T = 1 and 16; prefill per T
    rows = sweep_route(1, router, ROUTE_CANDIDATES["decode"]) + sweep_route(16, router, ROUTE_CANDIDATES["decode"])
    out["route_decode"] = rows
    ok = [r for r in rows if "ms" in r and r["ids_equal_torch"]]
    totals: dict[tuple, float] = {}
    for r in ok:
        key = (r["block_t"], r["block_k"], r["num_warps"], r["use_dot"])
        totals[key] = totals.get(key, 0.0) + r["ms"]
    if totals:
        bt, bk, warps, dot = min(totals, key=totals.get)
        for T in TOKENS:
            if T <= 16:
                overrides[T].update(route_block_t=bt, route_block_k=bk, route_warps=warps, route_dot=dot)
    for T in (4096, 16384):
        rows = sweep_route(T, router, ROUTE_CANDIDATES["prefill"])
        out[f"route_T{T}"] = rows
        ok = [r for r in rows if "ms" in r]
        if ok:
            b = min(ok, key=lambda r: r["ms"])
            overrides.setdefault(T, {}).update(route_block_t=b["block_t"], route_block_k=b["block_k"], route_warps=b["num_warps"],
                                route_dot=b["use_dot"])
    _sweep_grouped_into(out, overrides, router, w1, w3, w2)
    # decode kernels: swiglu and down chosen separately per class of T
    out["decode"] = []
    for T_swept, users in DECODE_SWEEP_T.items():
        rows = sweep_decode(T_swept, router, w1, w3, w2)
        out["decode"] += rows
        ok = [r for r in rows if "down_ms" in r]
        if ok:
            sw = min(ok, key=lambda r: r["swiglu_ms"])
            dn = min(ok, key=lambda r: r["down_ms"])
            for T in users:
                if T in overrides:
                    overrides[T].update(
                        decode_block_n=sw["block_n"], decode_block_k=sw["block_k"], decode_warps=sw["num_warps"],
                        decode_stages=sw["num_stages"], decode_down_block_n=dn["block_n"],
                        decode_down_block_k=dn["block_k"], decode_down_warps=dn["num_warps"],
                        decode_down_stages=dn["num_stages"],
                    )
    out["overrides"] = {str(T): o for T, o in overrides.items()}
    return out, overrides


# ------------------------------------------------------------------------------------------------ main table


def bench_tokens(T, router, w1, w3, w2, cfg, copy_tbps, quick, has_grouped_mm) -> dict[str, Any]:
    from kernels.moe.dispatch import moe_forward_triton

    g = torch.Generator(device="cuda").manual_seed(T)
    x = torch.randn(T, HIDDEN, device="cuda", generator=g).bfloat16()
    M = T * TOP_K
    flops = 6 * M * HIDDEN * INTER  # gate + up + down, useful rows only
    row: dict[str, Any] = {"T": T, "flops": flops, "config": asdict(cfg)}
    ours = lambda: moe_forward_triton(x, router, w1, w3, w2, TOP_K, config=cfg)  # noqa: E731
    row["ours_ms"] = _try(lambda: _timed(ours, quick))
    if isinstance(row["ours_ms"], float):
        row["ours_tflops"] = flops / (row["ours_ms"] * 1e-3) / 1e12
        row["stages_ms"] = _try(lambda: stage_times(x, router, w1, w3, w2, TOP_K, cfg, quick))
    row["ours_graph_ms"] = _try(lambda: _graph_ms(ours, quick, reps=10 if T <= 16 else 2))
    if T <= 16:
        n_sel = int(torch.unique(_route_torch(x, router, TOP_K)[1]).numel())
        sel_bytes = n_sel * 3 * INTER * HIDDEN * w1.element_size()
        row.update(distinct_experts=n_sel, selected_weight_bytes=sel_bytes,
                   read_selected_ms=sel_bytes / (copy_tbps * 1e12) * 1e3)
        for key in ("ours_ms", "ours_graph_ms"):
            if isinstance(row.get(key), float):
                row[key.replace("_ms", "_over_read")] = row[key] / row["read_selected_ms"]
    row["loop_ms"] = _try(lambda: _timed(lambda: moe_loop(x, router, w1, w3, w2, TOP_K), quick))
    if has_grouped_mm:
        row["grouped_mm_ms"] = _try(lambda: _timed(lambda: moe_grouped_mm(x, router, w1, w3, w2, TOP_K), quick))
    else:
        row["grouped_mm_ms"] = "torch._grouped_mm not available"

    def dense():
        a = torch.randn(M, HIDDEN, device="cuda").bfloat16()
        w13 = torch.randn(2 * INTER, HIDDEN, device="cuda").bfloat16()
        wd = torch.randn(HIDDEN, INTER, device="cuda").bfloat16()
        hd = torch.randn(M, INTER, device="cuda").bfloat16()
        return _timed(lambda: (a @ w13.t(), hd @ wd.t()), quick)

    row["dense_ms"] = _try(dense)
    if isinstance(row["dense_ms"], float):
        row["dense_tflops"] = flops / (row["dense_ms"] * 1e-3) / 1e12
    for peer in ("loop_ms", "grouped_mm_ms", "dense_ms"):
        if isinstance(row.get(peer), float) and isinstance(row["ours_ms"], float):
            row["speedup_vs_" + peer[:-3]] = row[peer] / row["ours_ms"]
    # agreement with the bf16 loop (both round h to bf16; routing is fp32 in both)
    row["rel_diff_vs_loop"] = _try(lambda: _rel(ours(), moe_loop(x, router, w1, w3, w2, TOP_K)))
    torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    global SWEEP_GROUPED_T
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/moe.json", help="JSON output path")
    parser.add_argument("--quick", action="store_true", help=f"T in {QUICK_TOKENS} only, fewer iterations")
    parser.add_argument("--sweep", action="store_true", help="sweep tile configs first; use the fastest per size class")
    parser.add_argument("--sweep-grouped", action="store_true",
                        help="sweep the grouped GEMMs only (pointer and TMA kernels, T = 4096 and 16384)")
    parser.add_argument("--tokens", type=int, nargs="+", help="token counts of the main table (default: all)")
    parser.add_argument("--sweep-tokens", type=int, nargs="+", help=f"T of the grouped sweep (default {SWEEP_GROUPED_T})")
    args = parser.parse_args(argv)
    if args.sweep_tokens:
        SWEEP_GROUPED_T = tuple(args.sweep_tokens)
    if not torch.cuda.is_available():
        print("benchmarks.moe needs a CUDA GPU", file=sys.stderr)
        return 2
    from kernels.moe.dispatch import default_config

    env = environment()
    has_grouped_mm = hasattr(torch, "_grouped_mm")
    print(f"device {env['device']}  torch {env['torch']}  triton {env['triton']}  grouped_mm {has_grouped_mm}", flush=True)
    ceilings = measure_ceilings()
    copy_tbps = ceilings["copy_tbps"]
    payload: dict[str, Any] = {
        "environment": env,
        "command": " ".join(["python -m benchmarks.moe", *(argv if argv is not None else sys.argv[1:])]),
        "problem": {"hidden": HIDDEN, "intermediate": INTER, "experts": E, "top_k": TOP_K, "dtype": "bfloat16"},
        "ceilings": ceilings,
    }

    torch.manual_seed(0)
    router = torch.randn(E, HIDDEN, device="cuda") / HIDDEN**0.5  # fp32, logits of order 1: balanced-ish routing
    w1 = torch.randn(E, INTER, HIDDEN, device="cuda", dtype=torch.bfloat16).mul_(HIDDEN**-0.5)
    w3 = torch.randn(E, INTER, HIDDEN, device="cuda", dtype=torch.bfloat16).mul_(HIDDEN**-0.5)
    w2 = torch.randn(E, HIDDEN, INTER, device="cuda", dtype=torch.bfloat16).mul_(INTER**-0.5)

    overrides: dict[int, dict[str, Any]] = {}
    if args.sweep or args.sweep_grouped:
        payload["sweep"], overrides = run_sweeps(router, w1, w3, w2, only_grouped=not args.sweep)

    payload["results"] = []
    for T in args.tokens or (QUICK_TOKENS if args.quick else TOKENS):
        cfg = replace(default_config(T, TOP_K, E, torch.device("cuda")), **overrides.get(T, {}))
        row = bench_tokens(T, router, w1, w3, w2, cfg, copy_tbps, args.quick, has_grouped_mm)
        payload["results"].append(row)
        print("  ", {k: v for k, v in row.items() if k != "config"}, flush=True)

    def f(v: Any, spec: str) -> str:
        return format(v, spec) if isinstance(v, float) else "-"

    print(f"\nMoE hidden {HIDDEN}, {E} experts x I {INTER}, top-{TOP_K}, bf16 on {env['device']}")
    print(f"ceilings: copy {copy_tbps:.3f} TB/s, bf16 matmul {ceilings['matmul_bf16_tflops']:.1f} TFLOP/s")
    print(f"{'T':>6} {'ours ms':>9} {'graph ms':>9} {'TFLOP/s':>8} {'loop ms':>9} {'x loop':>7} {'gmm ms':>9} "
          f"{'dense ms':>9} {'dense TF':>9} {'%dense':>7} {'read ms':>8} {'/read':>6} {'rel':>8}")
    for r in payload["results"]:
        pct = r["ours_tflops"] / r["dense_tflops"] * 100 if "ours_tflops" in r and "dense_tflops" in r else None
        over = r.get("ours_graph_over_read", r.get("ours_over_read"))
        print(f"{r['T']:>6} {f(r['ours_ms'], '9.3f')} {f(r.get('ours_graph_ms'), '9.3f')} {f(r.get('ours_tflops'), '8.1f')} "
              f"{f(r['loop_ms'], '9.3f')} {f(r.get('speedup_vs_loop'), '6.2f')}x {f(r['grouped_mm_ms'], '9.3f')} "
              f"{f(r['dense_ms'], '9.3f')} {f(r.get('dense_tflops'), '9.1f')} {f(pct, '6.1f')}% "
              f"{f(r.get('read_selected_ms'), '8.3f')} {f(over, '6.2f')} {f(r['rel_diff_vs_loop'], '8.1e')}")
    print("\nstages (ms):")
    for r in payload["results"]:
        if isinstance(r.get("stages_ms"), dict):
            print(f"{r['T']:>6} " + "  ".join(f"{k} {v:.4f}" for k, v in r["stages_ms"].items()))
    write_json(args.out, payload)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
