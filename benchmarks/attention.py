"""Paged softmax attention (``kernels/attention``) against torch's own attention, same shapes, same run.

    python -m benchmarks.attention --out benchmarks/results/attention.json          # H200: ~3 min
    python -m benchmarks.attention --quick --out /tmp/attention.json                # smaller cases

Shapes are MiniMax-Text-01's softmax layers: 64 query heads, 8 kv heads, D = 128, bf16. Ours reads a paged cache
(``--page-size``, pages of the pool in a shuffled order, so that no case benefits from adjacency) through the
block table; the peers read the same keys and values as contiguous ``[B, KVH, L, D]`` tensors:

* SDPA with the cuDNN, flash and efficient backends (``torch.nn.attention.sdpa_kernel``), ``enable_gqa=True``;
* FlexAttention compiled (``torch.compile(flex_attention)``) with a causal block mask where the case is causal
  (``--no-flex`` skips it: its compile takes tens of seconds per shape).

Ours is timed twice for prefill: the op as an eager call runs it (``torch.ops.minimax.paged_attention_prefill``:
cuDNN over gathered pages for long chunks, ``kernels/attention/route.py``, else the Triton kernel; the path taken
is recorded) and the Triton kernel alone; for decode, the kernels as a compiled program runs them (no eager range
check) and the eager op with its range check (one device sync).

Cases (the issue's, plus two smaller prefill shapes near the library threshold): prefill "8K queries over 1M keys" (ours: the chunk at positions 1M-8K .. 1M-1, causal inside
the chunk; the peers: the same queries over all 1M keys, no mask; FLOPs counted as each computes them, 4*H*D per
visible query-key pair), causal 128K (T = L = 128K, positions 0..), and decode at B = 1 with 1M and 4M held tokens,
B = 16 at 64K and B = 64 at 16K (one query per row over its held tokens). Decode figures: the K/V bytes read over
the time, as a fraction of the copy bandwidth measured in the same run (``benchmarks/common.py``, read + write).
Before timing, each of our outputs is compared with SDPA's (max relative difference, recorded). Decode times are
per call of 10 back-to-back calls (as a CUDA-graph replay issues steps), ours and every peer timed in the same 5
interleaved rounds (``common.time_ms_interleaved``, the median kept), and also per call timed alone
(``*_one_call_ms``, launches included); the 2026-12-02 run 3 timed each side in its own rounds. FlexAttention
runs on the decode cases too (its decoding path: one query per row). Decode cases run first.
Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any, Callable

import torch

from benchmarks.common import environment, measure_ceilings, time_ms, time_ms_interleaved, write_json

H, KVH, D = 64, 8, 128


def _paged(keys: torch.Tensor, values: torch.Tensor, page_size: int, seed: int = 0):
    """Contiguous [B, KVH, L, D] -> shuffled page pool + block table (ours), freeing nothing of the input."""
    from kernels.attention.naive import contiguous_to_paged

    g = torch.Generator().manual_seed(seed)
    return contiguous_to_paged(keys, values, page_size, generator=g)


def _sdpa(backend_name: str) -> Callable:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend_name]

    def run(q, k, v, causal):  # q [B, H, T, D], k/v [B, KVH, L, D]
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    return run


def _flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v, causal):
        mask = None
        if causal:
            T, L = q.shape[2], k.shape[2]
            offset = L - T
            mask = create_block_mask(lambda b, h, qi, ki: ki <= qi + offset, None, None, T, L, device="cuda")
        return compiled(q, k, v, block_mask=mask, enable_gqa=True)

    return run


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def prefill_case(name: str, T: int, L: int, page_size: int, flex: bool, peers_causal: bool) -> dict[str, Any]:
    """Queries at positions L-T .. L-1 over a row holding L tokens (B = 1)."""
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    keys = torch.randn(1, KVH, L, D, device=dev, dtype=dt)
    values = torch.randn(1, KVH, L, D, device=dev, dtype=dt)
    q = torch.randn(1, T, H, D, device=dev, dtype=dt)  # ours: [B, T, H, D]
    k_cache, v_cache, table = _paged(keys, values, page_size)
    positions = torch.tensor([L - T], device=dev, dtype=torch.long)
    scale = 1.0 / math.sqrt(D)
    from kernels.attention import route
    from kernels.attention.prefill import paged_attention_prefill_triton

    ours = lambda: torch.ops.minimax.paged_attention_prefill(q, k_cache, v_cache, table, positions, scale)  # noqa: E731
    triton_only = lambda: paged_attention_prefill_triton(q, k_cache, v_cache, table, positions, scale,  # noqa: E731
                                                         check=False)
    # useful FLOPs: query i (position L-T+i) sees L-T+i+1 keys; 2 matmuls of 2*D flops per pair per head
    pairs_ours = T * (L - T) + T * (T + 1) // 2
    flops_ours = 4 * H * D * pairs_ours
    qt = q.transpose(1, 2).contiguous()  # [B, H, T, D] for the peers
    pairs_peer = pairs_ours if peers_causal else T * L
    row: dict[str, Any] = {"case": name, "T": T, "L": L, "page_size": page_size}
    out = ours()
    ref = _sdpa("cudnn")(qt, keys, values, peers_causal).transpose(1, 2) if peers_causal else None
    if ref is not None:
        row["rel_vs_cudnn"] = _rel(out, ref)
    row["ours_path"] = "library (cuDNN over gathered pages)" if route.use_library(q, k_cache, [L - T]) else "triton"
    ms = time_ms(ours, warmup=2, iters=5)
    row["ours_ms"], row["ours_tflops"] = ms, flops_ours / (ms * 1e-3) / 1e12
    tri_out = triton_only()
    row["ours_rel_vs_triton"] = _rel(out, tri_out)
    if ref is not None:
        row["triton_rel_vs_cudnn"] = _rel(tri_out, ref)
    del tri_out
    ms = time_ms(triton_only, warmup=2, iters=5)
    row["triton_ms"], row["triton_tflops"] = ms, flops_ours / (ms * 1e-3) / 1e12
    peers = {b: _sdpa(b) for b in ("cudnn", "flash", "efficient")}
    if flex:
        peers["flex"] = _flex()
    for pname, fn in peers.items():
        try:
            pm = time_ms(lambda: fn(qt, keys, values, peers_causal), warmup=2, iters=5)
            row[f"{pname}_ms"], row[f"{pname}_tflops"] = pm, 4 * H * D * pairs_peer / (pm * 1e-3) / 1e12
        except Exception as e:  # a peer that cannot run this shape (OOM, unsupported): recorded, not fatal
            row[f"{pname}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            torch.cuda.empty_cache()
    best = max((row[f"{p}_tflops"] for p in peers if f"{p}_tflops" in row), default=float("nan"))
    row["ours_vs_best_peer"] = row["ours_tflops"] / best
    del keys, values, k_cache, v_cache
    torch.cuda.empty_cache()
    return row


def decode_case(name: str, B: int, L: int, page_size: int, copy_tbps: float, flex: bool) -> dict[str, Any]:
    """One query per row at position L-1 over L held tokens per row."""
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    keys = torch.randn(B, KVH, L, D, device=dev, dtype=dt)
    values = torch.randn(B, KVH, L, D, device=dev, dtype=dt)
    q = torch.randn(B, 1, H, D, device=dev, dtype=dt)
    k_cache, v_cache, table = _paged(keys, values, page_size)
    positions = torch.full((B,), L - 1, device=dev, dtype=torch.long)
    scale = 1.0 / math.sqrt(D)
    from kernels.attention.decode import paged_attention_decode_triton

    # what a compiled program runs: the kernels without the eager range check (the runtime checks rows on the host)
    ours = lambda: paged_attention_decode_triton(q, k_cache, v_cache, table, positions, scale, check=False)  # noqa: E731
    checked = lambda: torch.ops.minimax.paged_attention_decode(q, k_cache, v_cache, table, positions, scale)  # noqa: E731
    kv_bytes = 2 * B * KVH * L * D * keys.element_size()
    qt = q.transpose(1, 2).contiguous()
    row: dict[str, Any] = {"case": name, "B": B, "L": L, "page_size": page_size, "kv_bytes": kv_bytes}
    row["rel_vs_cudnn"] = _rel(ours(), _sdpa("cudnn")(qt, keys, values, False).transpose(1, 2))
    row["ours_one_call_ms"] = time_ms(ours, warmup=3, iters=10)  # timed alone: its launches included
    row["ours_eager_op_checked_ms"] = time_ms(checked, warmup=3, iters=10)
    peers = {b: _sdpa(b) for b in ("cudnn", "flash", "efficient")}
    if flex:
        peers["flex"] = _flex()
    runnable = {"ours": ours}
    for pname, fn in peers.items():
        try:
            row[f"{pname}_one_call_ms"] = time_ms(lambda: fn(qt, keys, values, False), warmup=3, iters=10)
            runnable[pname] = lambda fn=fn: fn(qt, keys, values, False)
        except Exception as e:
            row[f"{pname}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            torch.cuda.empty_cache()
    # back-to-back calls, ours and every peer in the same interleaved rounds (the ratio's two sides together)
    for pname, pm in time_ms_interleaved(runnable).items():
        row[f"{pname}_ms"], row[f"{pname}_copy_frac"] = pm, kv_bytes / (pm * 1e-3) / 1e12 / copy_tbps
    ms = row["ours_ms"]
    best = min((row[f"{p}_ms"] for p in peers if f"{p}_ms" in row), default=float("nan"))
    row["ours_vs_best_peer"] = best / ms  # > 1: we are faster
    del keys, values, k_cache, v_cache
    torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--page-size", type=int, default=64, help="tokens per KV page (default 64)")
    parser.add_argument("--quick", action="store_true", help="smaller cases (64K instead of 1M/4M)")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    parser.add_argument("--no-4m", action="store_true", help="skip the 4M-token decode case (16 GB of K/V + copy)")
    parser.add_argument("--decode-only", action="store_true", help="only the decode cases (no prefill)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.attention: needs a CUDA GPU", file=sys.stderr)
        return 2
    import kernels  # noqa: F401  (registers the ops)

    ceilings = measure_ceilings()
    K = 1024
    if args.quick:
        prefill = [("8K over 64K", 8 * K, 64 * K, False), ("causal 16K", 16 * K, 16 * K, True)]
        decode = [("B=1, 64K", 1, 64 * K), ("B=16, 8K", 16, 8 * K)]
    else:
        prefill = [("8K over 1M", 8 * K, K * K, False), ("causal 128K", 128 * K, 128 * K, True),
                   ("2K over 32K", 2 * K, 32 * K, False), ("causal 8K", 8 * K, 8 * K, True)]
        decode = [("B=1, 1M", 1, K * K), ("B=1, 4M", 1, 4 * K * K), ("B=16, 64K", 16, 64 * K),
                  ("B=64, 16K", 64, 16 * K)]
        if args.no_4m:
            decode = [d for d in decode if d[2] != 4 * K * K]
    if args.decode_only:
        prefill = []
    rows = []
    for name, B, L in decode:
        row = decode_case(name, B, L, args.page_size, ceilings["copy_tbps"], flex=not args.no_flex)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        rows.append(row)
    for name, T, L, causal in prefill:
        row = prefill_case(name, T, L, args.page_size, flex=not args.no_flex, peers_causal=causal)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        rows.append(row)
    write_json(args.out, {"environment": environment(), "ceilings": ceilings, "heads": [H, KVH, D],
                          "dtype": "bfloat16", "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
