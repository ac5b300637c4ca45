"""GPU timing of the paged-attention kernels against torch SDPA (cuDNN / flash backends), MiniMax sizes.

``python -m kernels.attention.tune [--out result.json] [--quick]``: H = 64, KVH = 8, D = 128, bf16.

* prefill: a chunk of 8K queries at positions 1M-8K .. 1M-1 over a 1M-position cache, and causal 128K (queries
  at 0..128K-1); ours on paged caches with an identity table (page size 256: one page per key tile, and 16: a
  table lookup per key), configurations swept; SDPA on contiguous ``[1, H, S, D]`` / ``[1, KVH, S, D]`` tensors
  with ``enable_gqa=True`` (the 8K x 1M case without a mask: the FLOPs are the same but for a 8K^2/2 triangle).
  TFLOP/s = 4 * H * D * (query, key) pairs attended / time.
* decode: B = 1 at 1M and 4M held, B = 16 at 64K, B = 64 at 16K (capacity = held); "% of copy" = K/V bytes read /
  time against the copy bandwidth (read + write) measured in the same run.

Timings are CUDA-event medians of back-to-back calls (launch costs included; the eager range checks are off).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

H, KVH, D = 64, 8, 128
DT = torch.bfloat16


def _time(fn, reps=3, warmup=1):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    return times[len(times) // 2]


def _time_many(fn, n=20):
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / 1e3 / n


def ceilings():
    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = _time_many(lambda: y.copy_(x), 10)
    copy = 2 * x.numel() / t
    del x, y
    a = torch.randn(8192, 8192, device="cuda", dtype=DT)
    t = _time_many(lambda: a @ a, 10)
    return copy, 2 * 8192**3 / t


def identity_pool(S, page_size, B=1):
    """Random K/V for B rows of S positions as a paged pool with an identity table, plus the contiguous view."""
    M = S // page_size
    kc = torch.randn(B * M, KVH, page_size, D, device="cuda", dtype=DT)
    vc = torch.randn(B * M, KVH, page_size, D, device="cuda", dtype=DT)
    table = torch.arange(B * M, dtype=torch.int32, device="cuda").view(B, M)
    return kc, vc, table


def to_contiguous(cache, B=1):
    """[B*M, KVH, ps, D] identity pool -> [B, KVH, S, D]."""
    P, _, ps, _ = cache.shape
    M = P // B
    return cache.view(B, M, KVH, ps, D).permute(0, 2, 1, 3, 4).reshape(B, KVH, M * ps, D)


def sdpa(q, k, v, backend, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]
    with sdpa_kernel([be]):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


def bench_prefill(res, quick):
    from kernels.attention.prefill import PrefillConfig, paged_attention_prefill_triton

    configs = [PrefillConfig(128, 128, 8, 3), PrefillConfig(128, 128, 8, 3, fold_scale=False),
               PrefillConfig(128, 64, 8, 4), PrefillConfig(64, 128, 4, 3), PrefillConfig(128, 128, 8, 2)]  # fmt: skip
    if quick:
        configs = configs[:2]
    scale = D**-0.5
    for name, S, T in (("8K over 1M", 1 << 20, 8192), ("causal 128K", 1 << 17, 1 << 17)):
        p0 = S - T
        pairs = T * p0 + T * (T + 1) // 2
        flops = 4 * H * D * pairs
        q = torch.randn(1, T, H, D, device="cuda", dtype=DT)
        pos = torch.tensor([p0], device="cuda")
        entry = {"S": S, "T": T, "pairs": pairs}
        for ps in (256, 16):
            kc, vc, table = identity_pool(S, ps)
            for cfg in configs if ps == 256 else configs[:1]:
                key = f"ours ps={ps} m{cfg.block_m} n{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}{'' if cfg.fold_scale else ' nofold'}"
                try:
                    fn = lambda: paged_attention_prefill_triton(q, kc, vc, table, pos, scale, config=cfg, check=False)  # noqa: E731
                    t = _time(fn, reps=1)
                    entry[key] = {"ms": t * 1e3, "tflops": flops / t / 1e12}
                except Exception as e:  # noqa: BLE001
                    entry[key] = {"error": repr(e)[:300]}
                print(name, key, entry[key], flush=True)
            if ps == 256:
                o = paged_attention_prefill_triton(q, kc, vc, table, pos, scale, check=False)
                qt = q.transpose(1, 2)
                kt, vt = to_contiguous(kc), to_contiguous(vc)
                del kc, vc
                # SDPA peer: causal for 128K; the 8K x 1M case without a mask (all keys)
                causal = T == S
                sflops = 4 * H * D * (T * (T + 1) // 2 if causal else T * S)
                for be in ("cudnn", "flash"):
                    try:
                        t = _time(lambda: sdpa(qt, kt, vt, be, causal), reps=1)
                        entry[f"sdpa {be}"] = {"ms": t * 1e3, "tflops": sflops / t / 1e12}
                        if causal:
                            ref = sdpa(qt, kt, vt, be, causal).transpose(1, 2)
                            entry[f"rel vs sdpa {be}"] = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
                    except Exception as e:  # noqa: BLE001
                        entry[f"sdpa {be}"] = {"error": repr(e)[:300]}
                    print(name, be, entry[f"sdpa {be}"], flush=True)
                del kt, vt, o
            else:
                del kc, vc
            torch.cuda.empty_cache()
        res["prefill"][name] = entry
        del q
        torch.cuda.empty_cache()


def bench_decode(res, copy_bw, quick):
    from kernels.attention.decode import decode_split, paged_attention_decode_triton

    scale = D**-0.5
    variants = [dict(), dict(num_stages=4), dict(block_n=64, num_warps=4)]
    if quick:
        variants = variants[:1]
    for B, S in ((1, 1 << 20), (1, 1 << 22), (16, 1 << 16), (64, 1 << 14)):
        name = f"B={B} held={S}"
        kv_bytes = 2 * B * S * KVH * D * 2
        entry = {"kv_bytes": kv_bytes}
        q = torch.randn(B, 1, H, D, device="cuda", dtype=DT)
        pos = torch.full((B,), S - 1, device="cuda")
        for ps in (256, 16):
            kc, vc, table = identity_pool(S, ps, B)
            base = decode_split(S, D, q.device)
            for var in variants if ps == 256 else (variants[0], variants[-1]):
                for split in (base, 2 * base) if ps == 256 and not var else (base,):
                    key = f"ours ps={ps} split={split} {var}"
                    try:
                        fn = lambda: paged_attention_decode_triton(q, kc, vc, table, pos, scale, split=split, check=False, **var)  # noqa: E731
                        t = _time_many(fn, 10)
                        entry[key] = {"ms": t * 1e3, "pct_copy": 100 * kv_bytes / t / copy_bw}
                    except Exception as e:  # noqa: BLE001
                        entry[key] = {"error": repr(e)[:300]}
                    print(name, key, entry[key], flush=True)
            if ps == 256:
                o = paged_attention_decode_triton(q, kc, vc, table, pos, scale, check=False)
                qt = q.transpose(1, 2)
                kt, vt = to_contiguous(kc, B), to_contiguous(vc, B)
                del kc, vc
                for be in ("cudnn", "flash"):
                    try:
                        t = _time_many(lambda: sdpa(qt, kt, vt, be, False), 10)
                        ref = sdpa(qt, kt, vt, be, False).transpose(1, 2)
                        entry[f"sdpa {be}"] = {"ms": t * 1e3, "pct_copy": 100 * kv_bytes / t / copy_bw,
                                               "rel": ((o.float() - ref.float()).norm() / ref.float().norm()).item()}  # fmt: skip
                    except Exception as e:  # noqa: BLE001
                        entry[f"sdpa {be}"] = {"error": repr(e)[:300]}
                    print(name, be, entry[f"sdpa {be}"], flush=True)
                del kt, vt
            else:
                del kc, vc
            torch.cuda.empty_cache()
        res["decode"][name] = entry


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["prefill", "decode"], default=None)
    args = ap.parse_args()
    import triton

    t0 = time.time()
    copy_bw, mm = ceilings()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d"), "copy_TBps": copy_bw / 1e12, "bf16_matmul_TFLOPs": mm / 1e12,
           "prefill": {}, "decode": {}}  # fmt: skip
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)}), flush=True)

    def dump():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)

    if args.only != "prefill":
        bench_decode(res, copy_bw, args.quick)
        dump()
    if args.only != "decode":
        bench_prefill(res, args.quick)
        dump()
    res["seconds"] = time.time() - t0
    dump()
    print("done in", math.ceil(time.time() - t0), "s", flush=True)


if __name__ == "__main__":
    main()
