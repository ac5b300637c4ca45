"""Mixed steps against separate calls (issue 13), offline: the same requests through ``runtime.Scheduler`` on one
engine, with the decode step and a prefill chunk in one ``mixed`` call per step, and with separate calls,
alternating runs; output tokens/s, steps, mixed calls, and whether the greedy tokens agree.

    PYTHONPATH=. python -m benchmarks.mixed_steps --out r.json                       # CPU: the tiny eager engine
    LD_PRELOAD=/lib/x86_64-linux-gnu/libstdc++.so.6 PYTHONPATH=. python -m benchmarks.mixed_steps --slice 2 \\
        --max-batch 64 --requests 300 --prompt-range 128,8192 --output-range 16,512 --token-budget 2048 --out r.json

All requests are submitted at once (no arrivals: the HTTP load with arrivals is ``benchmarks.serving
--mixed-step``). ``--slice LAYERS``: MiniMax-Text-01 cut to LAYERS real-width layers on the GPU, AOTInductor
programs (``benchmarks.serving.slice_engine``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import environment, write_json


def _requests(n: int, vocab: int, prompt_range, output_range, seed: int) -> list[tuple[list[int], int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = int(torch.randint(prompt_range[0], prompt_range[1] + 1, (1,), generator=g))
        o = int(torch.randint(output_range[0], output_range[1] + 1, (1,), generator=g))
        out.append((torch.randint(2, vocab, (p,), generator=g).tolist(), o))
    return out


def run(engine, requests, mixed: bool, token_budget: int | None) -> dict[str, Any]:
    from runtime.scheduler import Scheduler

    sched = Scheduler(engine, token_budget=token_budget, mixed_step=mixed)
    ids = [sched.submit(p, n) for p, n in requests]
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    sched.run_until_idle()
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    tokens = [sched.result(r).tokens for r in ids]
    return {"mixed": mixed, "wall_s": wall, "output_tokens_per_s": sum(len(t) for t in tokens) / wall,
            "steps": sched.steps, "mixed_calls": sched.mixed_calls, "preemptions": sched.preemptions,
            "_tokens": tokens}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slice", type=int, default=0, metavar="LAYERS", help="GPU: real-width slice (default: tiny, CPU)")
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--chunk-size", type=int, default=16, help="prefill chunk (--slice default 2048)")
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--prompt-range", type=lambda s: tuple(int(x) for x in s.split(",")), default=(8, 96))
    p.add_argument("--output-range", type=lambda s: tuple(int(x) for x in s.split(",")), default=(4, 24))
    p.add_argument("--token-budget", type=int, default=None)
    p.add_argument("--repeats", type=int, default=2, help="runs of each path, alternating (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.slice:
        from benchmarks.serving import slice_engine

        chunk = args.chunk_size if args.chunk_size != 16 else 2048
        seq = args.max_seq_len if args.max_seq_len != 128 else 8192 + 512
        engine, _ = slice_engine(args.slice, args.max_batch, chunk, seq, Path(tempfile.mkdtemp(prefix="mixed_")),
                                 mixed_step=True)
    else:
        from model import MiniMaxConfig, MiniMaxForCausalLM
        from runtime import Engine

        model = MiniMaxForCausalLM(MiniMaxConfig.preset("tiny")).init_random_weights(seed=5, std=0.1).eval()
        engine = Engine.from_model(model, args.max_batch, args.chunk_size, args.max_seq_len, page_size=16,
                                   mixed_step=True)
    requests = _requests(args.requests, engine.vocab_size, args.prompt_range, args.output_range, args.seed)
    runs = []
    for i in range(2 * args.repeats):
        r = run(engine, requests, mixed=bool(i % 2), token_budget=args.token_budget)
        runs.append(r)
        print({k: v for k, v in r.items() if not k.startswith("_")}, flush=True)
    same = all(r["_tokens"] == runs[0]["_tokens"] for r in runs)
    best = {m: max(r["output_tokens_per_s"] for r in runs if r["mixed"] == m) for m in (False, True)}
    payload = {"environment": environment(), "command": "PYTHONPATH=. python -m benchmarks.mixed_steps "
               + " ".join(argv or sys.argv[1:]),
               "requests": {"n": len(requests), "prompt_tokens": sum(len(p) for p, _ in requests),
                            "output_tokens": sum(n for _, n in requests)},
               "runs": [{k: v for k, v in r.items() if not k.startswith("_")} for r in runs],
               "greedy_tokens_equal": same, "best_tokens_per_s": {"separate": best[False], "mixed": best[True]},
               "mixed_over_separate": best[True] / best[False]}
    print(f"mixed / separate: {payload['mixed_over_separate']:.2f}x (best of {args.repeats}); greedy tokens equal: "
          f"{same}", flush=True)
    write_json(args.out, payload)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
