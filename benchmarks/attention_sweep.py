"""Decode-kernel launch sweep (``kernels/attention/decode.py``): split length x key tile x warps x stages against
cuDNN SDPA on the issue's four decode cases, timed in interleaved rounds (the source of ``decode_split`` /
``decode_tiles`` and of the sweep table in ``kernels/attention/README.md``).

    LD_PRELOAD=/lib/x86_64-linux-gnu/libstdc++.so.6 PYTHONPATH=. python -m benchmarks.attention_sweep --out r.json

H = 64, KVH = 8, D = 128, bf16, pages of 256 in a shuffled pool (``naive.contiguous_to_paged``); cuDNN on the same
K/V as contiguous tensors. Every variant (and cuDNN) is timed in 5 rounds, each round running every variant for 2
warm-up calls then 10 back-to-back calls between two CUDA events; the median per call is kept. Our kernels run
without the eager range check (as compiled programs run them); ``op_checked`` is the eager op with it.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from benchmarks.common import environment, measure_ceilings, time_ms_interleaved, write_json

H, KVH, D = 64, 8, 128


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def sweep_case(name: str, B: int, L: int, splits, tiles, page_size: int = 256) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels.attention import decode
    from kernels.attention.naive import contiguous_to_paged

    torch.manual_seed(0)
    keys = torch.randn(B, KVH, L, D, device="cuda", dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    q = torch.randn(B, 1, H, D, device="cuda", dtype=torch.bfloat16)
    k_cache, v_cache, table = contiguous_to_paged(keys, values, page_size, generator=torch.Generator().manual_seed(0))
    pos = torch.full((B,), L - 1, device="cuda")
    scale = 1 / math.sqrt(D)
    qt = q.transpose(1, 2).contiguous()

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(qt, keys, values, enable_gqa=True)

    fns = {"cudnn": cudnn, "default": lambda: decode.paged_attention_decode_triton(q, k_cache, v_cache, table, pos,
                                                                                   scale, check=False)}
    for sp in splits:
        for bn, w, st in tiles:
            fns[f"s{sp}_n{bn}_w{w}_st{st}"] = (
                lambda sp=sp, bn=bn, w=w, st=st: decode.paged_attention_decode_triton(
                    q, k_cache, v_cache, table, pos, scale, check=False, split=sp, block_n=bn, num_warps=w,
                    num_stages=st))
    fns["op_checked"] = lambda: torch.ops.minimax.paged_attention_decode(q, k_cache, v_cache, table, pos, scale)
    row = {"case": name, "B": B, "L": L, "kv_bytes": 2 * B * KVH * L * D * 2,
           "default_split": decode.decode_split(table.shape[1] * page_size, D, q.device)}
    ref = cudnn().transpose(1, 2)
    for key, fn in fns.items():
        if key != "cudnn":
            row[key + "_rel"] = _rel(fn(), ref)
    for key, ms in time_ms_interleaved(fns, calls=10, rounds=5, warmup=2).items():
        row[key + "_ms"] = ms
    print(name, {k: round(row[k + "_ms"], 4) for k in ("cudnn", "default", "op_checked")}, flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.attention_sweep: needs a CUDA GPU", file=sys.stderr)
        return 2
    import kernels  # noqa: F401

    K = 1024
    splits = (2048, 4096, 8192, 16384)
    tiles = [(bn, w, st) for bn, w in ((128, 8), (64, 4), (128, 4)) for st in (2, 3, 4)]
    rows = [sweep_case(n, B, L, splits, tiles) for n, B, L in
            (("B=1 1M", 1, K * K), ("B=1 4M", 1, 4 * K * K), ("B=16 64K", 16, 64 * K), ("B=64 16K", 64, 16 * K))]
    write_json(args.out, {"environment": environment(), "ceilings": measure_ceilings(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
