"""Long context through ``runtime.Engine`` (issue 11): decode cost against capacity, a 1M-token prompt, prefill MFU,
and decode at 4M held tokens.

GPU (one process, the ceilings measured in the same run):

1. **Capacity sweep** (``minimax-text-01`` cut to 2 real-width layers, eager engine with the Triton kernels, bf16):
   a decode step with 512 tokens held at capacities 8K / 128K / 512K / 1M through ``runtime.Engine`` with an
   AOTInductor decode program per capacity (and as a CUDA-graph replay of that program); the step should cost
   what is held, not the capacity.
2. **The 8-layer real-width slice** (7 lightning + 1 softmax layer, ~96 GB of bf16 weights, random), AOTInductor
   programs compiled without weights and pointed at the model's (``benchmarks/decode.build_aoti_engine``), one
   engine of capacity ``--decode-held + 128`` (4M) with pages of 256 tokens, batch 1, prefill chunks of ``--chunk``:
   * prefill of 8K, 32K, 128K prompts and one ``--prompt`` (1M) prompt, chunked through the compiled prefill:
     tokens/s and model FLOP utilisation (MFU: useful FLOPs over the bf16 matmul ceiling of this run; useful
     FLOPs = 2 x active parameters per token (without embedding and LM head) + softmax attention ``4 H D`` per
     (query, key) pair of the causal triangle + lightning ``4 H D^2`` per token and layer);
   * the 1M prompt then decodes 64 tokens (greedy): ms/token at 1M held, and peak memory against weights + KV
     pools + lightning states;
   * decode at ``--decode-held`` (4M) held tokens, the cache filled directly (no 4M prefill): ms/token against
     the bytes floor (weights read per token + KV read + lightning state read and written, over the copy
     bandwidth).

CPU (``--cpu``): the reference path's decode step, tiny preset, 64 tokens held, capacities 1K and 256K.

    LD_PRELOAD=/lib/x86_64-linux-gnu/libstdc++.so.6 PYTHONPATH=. python -m benchmarks.long_context --skip-slice --out a.json
    LD_PRELOAD=/lib/x86_64-linux-gnu/libstdc++.so.6 PYTHONPATH=. python -m benchmarks.long_context --skip-sweep --out b.json
    PYTHONPATH=. python -m benchmarks.long_context --cpu --out r.json
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import environment, measure_ceilings, time_ms, write_json
from benchmarks.decode import (
    build_aoti_engine,
    graph_step_ms,
    host_ms,
    random_model,
    reduced_config,
    state_bytes_per_token,
    weight_bytes_per_token,
)

GIB = 2**30


def prefill_flops(config, start: int, tokens: int) -> float:
    """Useful FLOPs of a prefill chunk of ``tokens`` tokens at positions ``start..`` (module docstring)."""
    H, D = config.num_attention_heads, config.head_dim
    dense = 2.0 * config.num_parameters(active=True) * tokens
    pairs = tokens * start + tokens * (tokens + 1) / 2  # causal (query, key) pairs of the chunk
    softmax = len(config.softmax_layers) * 4.0 * H * D * pairs
    lightning = len(config.lightning_layers) * 4.0 * H * D * D * tokens
    return dense + softmax + lightning


def prompt_flops(config, length: int, chunk: int) -> float:
    from runtime.engine import chunk_plan

    return sum(prefill_flops(config, a, b - a) for a, b in chunk_plan(length, chunk))


def decode_steps_timer(engine, start: int, n: int):
    """A function running ``n`` decode steps of row 0 from position ``start`` on (positions advance across calls)."""
    device = engine.device
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    state = {"pos": start}

    def steps():
        for _ in range(n):
            p = state["pos"]
            engine.decode(token, torch.full((1,), p, dtype=torch.long, device=device), [p])
            state["pos"] = p + 1

    return steps


# ------------------------------------------------------------------------------------------------ capacity sweep
@torch.no_grad()
def capacity_sweep(model, capacities: list[int], held: int, steps: int, cuda: bool, page_size: int,
                   workdir: Path | None = None) -> list[dict]:
    """Decode with ``held`` tokens at each capacity. On CUDA the decode program is an AOTInductor package compiled
    for that capacity (the block-table width is static) and is also timed as a CUDA-graph replay; the prompt is
    prefilled by the eager model into the same state. On the CPU the eager reference path."""
    from export.exporting import PrefillProgram
    from runtime import Engine
    from runtime.backends import InPlaceProgram

    rows = []
    V = model.config.vocab_size
    prompt = torch.randint(0, V, (1, held), generator=torch.Generator().manual_seed(0)).to(model.lm_head.weight.device)
    for capacity in capacities:
        row: dict[str, Any] = {"capacity": capacity, "held": held}
        if cuda:
            engine, timings = build_aoti_engine(model, 1, max(2, held), capacity, workdir, page_size=page_size,
                                                programs_to_build=("decode",))
            engine.programs["prefill"] = InPlaceProgram(PrefillProgram(model), "prefill")  # eager, same state
            row["compile_decode_s"] = timings.get("compile_decode_s")
        else:
            engine = Engine.from_model(model, 1, max(2, held), capacity, page_size=page_size)
        engine.reset(1)
        engine.reserve([held + 64 * steps])
        engine.prefill(prompt, torch.zeros(1, dtype=torch.long, device=engine.device), [0])
        run = decode_steps_timer(engine, held, steps)
        ms = (time_ms(run, warmup=1, iters=5) if cuda else host_ms(run, warmup=1, iters=3)) / steps
        row["decode_ms_per_step"] = ms
        if cuda:
            program, table, state = engine.programs["decode"], engine.block_table, engine.state
            token = torch.zeros(1, 1, dtype=torch.long, device=engine.device)
            pos = torch.full((1,), engine.pages.held[0], dtype=torch.long, device=engine.device)  # the next position
            row["decode_graph_ms"] = graph_step_ms(lambda: program(token, pos, table, state))
        row["pool_gib"] = sum(t.numel() * t.element_size() for t, per_row in zip(engine._buffers, engine._per_row)
                              if not per_row) / GIB
        rows.append(row)
        print(f"  capacity {capacity:>9}: {held} held, decode {ms:.3f} ms/step"
              + (f", graph replay {row['decode_graph_ms']}" if cuda else "")
              + f" (pools {row['pool_gib']:.2f} GiB)", flush=True)
        del engine
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    for key in ("decode_ms_per_step", "decode_graph_ms"):
        values = [r[key] for r in rows if isinstance(r.get(key), float)]
        for r in rows:
            if isinstance(r.get(key), float):
                r[key.replace("_ms", "") + "_ratio_to_fastest"] = r[key] / min(values)
    return rows


@torch.no_grad()
def run_profile(args) -> dict[str, Any]:
    """Where prefill time goes: a ``--profile`` prompt through the eager slice (the same Triton kernels as the
    compiled engine, without Inductor's fusion of the small ops) under ``torch.profiler``, CUDA time by kernel."""
    from benchmarks.common import kernel_profile
    from runtime import Engine

    config = reduced_config("minimax-text-01", args.layers)
    model = random_model(config, torch.bfloat16, "cuda")
    engine = Engine.from_model(model, 1, args.chunk, args.profile + 8, page_size=256)
    prompt = torch.randint(0, config.vocab_size, (args.profile,), generator=torch.Generator().manual_seed(3)).tolist()
    engine.generate([prompt[: args.chunk]], max_new_tokens=1)  # warm
    found = kernel_profile(lambda: engine.generate([prompt], max_new_tokens=1),
                           label=f"{args.profile} tokens in chunks of {args.chunk}, eager", warm=False)
    print(f"  prefill wall {1e3 * engine.stats.prefill_s:.1f} ms", flush=True)
    return {"profile_tokens": args.profile, "chunk": args.chunk, **found,
            "prefill_wall_ms": 1e3 * engine.stats.prefill_s}


def run_cpu(args) -> dict[str, Any]:
    from model import MiniMaxConfig, MiniMaxForCausalLM

    torch.set_num_threads(max(1, torch.get_num_threads()))
    import dataclasses

    config = dataclasses.replace(MiniMaxConfig.preset("tiny"), max_position_embeddings=1 << 20)  # room for 256K
    model = MiniMaxForCausalLM(config).init_random_weights(seed=0).eval()
    print("CPU reference path, tiny preset (fp32):", flush=True)
    rows = capacity_sweep(model, [1024, 262144], held=64, steps=8, cuda=False, page_size=256)
    return {"environment": environment(), "cpu_capacity_sweep": rows,
            "command": "PYTHONPATH=. python -m benchmarks.long_context --cpu " + " ".join(sys.argv[1:])}


# ------------------------------------------------------------------------------------------------ GPU
@torch.no_grad()
def run_gpu(args) -> dict[str, Any]:
    bf16 = torch.bfloat16
    payload: dict[str, Any] = {"environment": environment(), "command": "python -m benchmarks.long_context "
                               + " ".join(sys.argv[1:])}

    def save() -> None:  # after every section: a run cut short keeps what it measured
        write_json(args.out, payload)

    print(f"device: {payload['environment']['device']}", flush=True)
    ceilings = payload["ceilings"] = measure_ceilings()

    if not args.skip_sweep:
        print("capacity sweep: 2 real-width layers (1 lightning + 1 softmax), AOTI decode per capacity, bf16", flush=True)
        small = random_model(reduced_config("minimax-text-01", 2), bf16, "cuda")
        with tempfile.TemporaryDirectory() as tmp:
            payload["capacity_sweep"] = capacity_sweep(small, args.capacities, held=512, steps=16, cuda=True,
                                                       page_size=256, workdir=Path(tmp))
        del small
        gc.collect()
        torch.cuda.empty_cache()
        save()
    if args.skip_slice:
        return payload

    config = reduced_config("minimax-text-01", args.layers)
    t0 = time.perf_counter()
    model = random_model(config, bf16, "cuda")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"{args.layers}-layer slice: {weight_bytes / GIB:.1f} GiB of weights, built in "
          f"{time.perf_counter() - t0:.1f}s", flush=True)
    capacity = args.decode_held + 128
    if args.eager:  # the eager model behind the same runtime (Triton kernels as eager calls: MoE on TMA kernels)
        from runtime import Engine

        engine, timings = Engine.from_model(model, 1, args.chunk, capacity, page_size=256), {}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            engine, timings = build_aoti_engine(model, 1, args.chunk, capacity, Path(tmp), page_size=256)
    pools = [t for t, per_row in zip(engine._buffers, engine._per_row) if not per_row]
    lightning = [t for t, per_row in zip(engine._buffers, engine._per_row) if per_row]
    pool_bytes = sum(t.numel() * t.element_size() for t in pools)
    lightning_bytes = sum(t.numel() * t.element_size() for t in lightning)
    payload["slice"] = {"engine": "eager" if args.eager else "aoti", "layers": args.layers, "weight_gib": weight_bytes / GIB, "capacity": capacity,
                        "pool_gib": pool_bytes / GIB, "lightning_state_gib": lightning_bytes / GIB,
                        "build_timings_s": timings, "chunk": args.chunk, "paged_kv": engine.paged_kv}
    print(f"  engine: capacity {capacity}, pools {pool_bytes / GIB:.2f} GiB, build {timings}", flush=True)
    save()
    V = config.vocab_size
    g = torch.Generator().manual_seed(1)
    peak_tflops = ceilings["matmul_bf16_tflops"]

    # warm-up: one chunk and a decode step, so that the first measured prompt does not pay first-call costs
    # (Triton launchers, cuBLAS heuristics, lazy CUDA module loading); on 2026-12-04 a 32K prompt measured first
    # gave 19.8 % MFU against 69.5 % after another prompt
    engine.generate([torch.randint(0, V, (args.chunk,), generator=torch.Generator().manual_seed(0)).tolist()],
                    max_new_tokens=2)
    prefill_rows = []
    for length in [*args.prefill_lengths, args.prompt]:
        prompt = torch.randint(0, V, (length,), generator=g).tolist()
        decode_new = 64 if length == args.prompt else 1
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        out = engine.generate([prompt], max_new_tokens=decode_new)
        s = engine.stats
        flops = prompt_flops(config, length, args.chunk)
        row = {"prompt_tokens": length, "prefill_s": s.prefill_s, "prefill_tokens_per_s": length / s.prefill_s,
               "chunks": s.prefill_chunks, "useful_tflop": flops / 1e12,
               "mfu": flops / s.prefill_s / (peak_tflops * 1e12),
               "peak_memory_gib": torch.cuda.max_memory_allocated() / GIB}
        if decode_new > 1:
            row["decode_steps"] = s.decode_steps
            row["decode_ms_per_token"] = s.decode_ms_per_step
            held = length + decode_new // 2
            floor_bytes = weight_bytes_per_token(config, bf16)["total"] + state_bytes_per_token(config, 1, held, bf16)
            row["decode_bytes_floor_ms"] = floor_bytes / (ceilings["copy_tbps"] * 1e12) * 1e3
            row["decode_ratio_to_floor"] = row["decode_ms_per_token"] / row["decode_bytes_floor_ms"]
            row["new_tokens"] = out[0, length:].tolist()[:8]
            row["peak_over_weights_kv_state_gib"] = row["peak_memory_gib"] - (weight_bytes + pool_bytes
                                                                               + lightning_bytes) / GIB
        prefill_rows.append(row)
        print(f"  prompt {length:>8}: prefill {s.prefill_s:.2f}s ({row['prefill_tokens_per_s']:.0f} tok/s, "
              f"MFU {100 * row['mfu']:.1f} %), peak {row['peak_memory_gib']:.1f} GiB"
              + (f", decode {row['decode_ms_per_token']:.3f} ms/token ({row['decode_ratio_to_floor']:.2f}x floor "
                 f"{row['decode_bytes_floor_ms']:.3f} ms), peak - (weights + KV + state) "
                 f"{row['peak_over_weights_kv_state_gib']:.2f} GiB" if decode_new > 1 else ""), flush=True)
        payload["prefill"] = prefill_rows
        save()

    # decode at --decode-held tokens: the pools filled directly
    held = args.decode_held
    engine.reset(1)
    engine.reserve([held + 64])
    gen = torch.Generator(device="cuda").manual_seed(2)
    for t in pools:
        for i in range(0, t.shape[0], 1024):
            t[i:i + 1024].normal_(0.0, 1.0, generator=gen)
    for t in engine.state:
        if t.dim() == 4 and t.dtype == torch.float32 and t.shape[0] == 1:
            t.normal_(0.0, 0.01, generator=gen)
    engine.pages.held[0] = held
    run = decode_steps_timer(engine, held, 4)
    ms = time_ms(run, warmup=1, iters=8) / 4
    floor_parts = {"weights": weight_bytes_per_token(config, bf16)["total"],
                   "kv_and_lightning_state": state_bytes_per_token(config, 1, held, bf16)}
    floor_ms = sum(floor_parts.values()) / (ceilings["copy_tbps"] * 1e12) * 1e3
    payload["decode_at_held"] = {"held": held, "decode_ms_per_token": ms, "bytes_floor_ms": floor_ms,
                                 "ratio_to_floor": ms / floor_ms, "floor_bytes": floor_parts}
    print(f"  decode at {held} held: {ms:.3f} ms/token, bytes floor {floor_ms:.3f} ms ({ms / floor_ms:.2f}x; "
          f"{floor_parts})", flush=True)
    return payload


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--cpu", action="store_true", help="only the CPU reference path's capacity sweep")
    p.add_argument("--layers", type=int, default=8, help="layers of the slice (default 8: 7 lightning + 1 softmax)")
    p.add_argument("--chunk", type=int, default=8192, help="prefill chunk (max_input_len, default 8192)")
    p.add_argument("--prompt", type=int, default=1 << 20, help="the long prompt (default 1,048,576 tokens)")
    p.add_argument("--prefill-lengths", type=lambda s: [int(x) for x in s.split(",")], default=[8192, 32768, 131072],
                   help="other prompt lengths for prefill throughput (default 8192,32768,131072)")
    p.add_argument("--decode-held", type=int, default=1 << 22, help="tokens held for the decode test (default 4M)")
    p.add_argument("--capacities", type=lambda s: [int(x) for x in s.split(",")],
                   default=[8192, 131072, 524288, 1 << 20], help="capacities of the sweep")
    p.add_argument("--skip-sweep", action="store_true", help="skip the capacity sweep")
    p.add_argument("--eager", action="store_true", help="run the slice through the eager engine instead of AOTI")
    p.add_argument("--profile", type=int, default=0, metavar="TOKENS",
                   help="only profile the prefill of a prompt of TOKENS tokens through the eager slice")
    p.add_argument("--skip-slice", action="store_true", help="only the capacity sweep (the sweep and the slice do "
                   "not fit one process on a 141 GB GPU: run them as two invocations)")
    args = p.parse_args(argv)
    if args.cpu:
        payload = run_cpu(args)
    elif args.profile:
        payload = {"environment": environment(), "profile": run_profile(args)}
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --cpu for the CPU part", file=sys.stderr)
            return 2
        payload = run_gpu(args)
    write_json(args.out, payload)
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
