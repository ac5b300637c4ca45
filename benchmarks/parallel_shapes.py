"""One rank's kernels at tensor-parallel shapes, on one GPU (issue 16): what a rank of a TP-N Text-01 computes,
without the collectives, against the single-GPU shapes, so that the multi-GPU run (issue 17) can be planned.

    LD_PRELOAD=/lib/x86_64-linux-gnu/libstdc++.so.6 PYTHONPATH=. python -m benchmarks.parallel_shapes --out r.json
    PYTHONPATH=. python -m benchmarks.parallel_shapes --smoke --out r.json     # CPU: tiny, eager, TP 2

minimax-text-01 cut to ``--layers`` real-width layers (default 2: one lightning, one softmax layer), random bf16
weights, and the same slice at one rank's shapes under TP ``--tp`` (default 8: 8 lightning heads, 8 query / 1 KV
heads, each expert's I / 8, the vocabulary / 8; ``model.parallel.local_config``), each compiled with AOTInductor
(``benchmarks.decode.build_aoti_engine``) and timed in the same process:

* decode at B = 1 and B = 16 with ``--held`` positions held (ms/step, CUDA events) against the bytes floor of the
  slice (``benchmarks.decode.weight_bytes_per_token`` over the copy bandwidth measured in the run);
* one prefill chunk of ``--chunk`` tokens at position 0 (ms and matmul TFLOP/s).

The ratio rank / single says how well the rank's smaller GEMMs and attention keep the GPU busy (ideal: 1 / N of
the bytes and FLOPs); the collectives of a step (``docs/parallel.md``) come on top.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.common import environment, write_json  # noqa: E402


@torch.no_grad()
def _expert_parallel_rank(model, plan, rank: int = 0):
    """``model`` (built from ``local_config(plan)``: heads split, every expert whole) made rank ``rank``'s model
    under expert parallelism: each layer keeps only the rank's experts (random weights) and runs
    ``minimax::moe_ep`` from their first index. No collectives (one GPU)."""
    import dataclasses

    from model.modeling import Experts

    experts = plan.experts(rank)
    held = dataclasses.replace(model.config, num_local_experts=len(experts))
    dev = model.lm_head.weight.device
    g = torch.Generator(device=dev).manual_seed(1)
    for layer in model.model.layers:
        moe = layer.block_sparse_moe
        with torch.device("meta"):
            e = Experts(held, dtype=model.dtype)
        e = e.to_empty(device=dev)
        for p in e.parameters():
            p.normal_(0.0, 0.02, generator=g)
        moe.experts, moe.expert_start = e, experts.start
    return model


def measure(config, label: str, device: str, held: int, chunk: int, batches: list[int], copy_tbps: float | None,
            steps: int, ep_plan=None) -> dict[str, Any]:
    from benchmarks.decode import build_aoti_engine, random_model, weight_bytes_per_token

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cuda":
        model = random_model(config, dtype, device)
    else:
        from model import MiniMaxForCausalLM

        model = MiniMaxForCausalLM(config, dtype=dtype).init_random_weights(seed=0).eval()
    if ep_plan is not None:
        model = _expert_parallel_rank(model, ep_plan)
    B_max = max(batches)
    out: dict[str, Any] = {"label": label, "heads": config.num_attention_heads,
                           "kv_heads": config.num_key_value_heads, "intermediate_size": config.intermediate_size,
                           "vocab_size": config.vocab_size}
    with tempfile.TemporaryDirectory() as tmp:
        if device == "cuda":
            engine, timings = build_aoti_engine(model, B_max, chunk, held + steps + 8 + chunk, Path(tmp), page_size=64)
            out["build_s"] = timings
        else:
            from runtime import Engine

            engine = Engine.from_model(model, B_max, chunk, held + steps + 8 + chunk, page_size=8)
        g = torch.Generator().manual_seed(0)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        # prefill: one chunk at position 0, B = 1
        ids = torch.randint(0, config.vocab_size, (1, chunk), generator=g).to(device)
        times = []
        for _ in range(3):
            engine.reset(1)
            sync()
            t0 = time.perf_counter()
            engine.prefill(ids, torch.zeros(1, dtype=torch.long, device=device))
            sync()
            times.append(time.perf_counter() - t0)
        out["prefill_ms"] = 1e3 * min(times[1:] if len(times) > 1 else times)
        flops = 2 * chunk * sum(p.numel() for n, p in model.named_parameters() if "experts" not in n
                                and "embed" not in n)
        local_share = 1.0 if ep_plan is None else len(ep_plan.experts(0)) / config.num_local_experts
        flops += 2 * chunk * config.num_experts_per_tok * 3 * config.hidden_size * config.intermediate_size \
            * config.num_hidden_layers * local_share  # EP: the expected share of a token's experts held here
        out["prefill_matmul_tflops"] = flops / (out["prefill_ms"] * 1e-3) / 1e12
        parts = weight_bytes_per_token(config, dtype)
        if ep_plan is not None:  # a token's top-k experts are on this rank with probability E_local / E each
            parts["total"] -= parts["experts_top_k"] * (1 - local_share)
            out["experts"] = f"{len(ep_plan.experts(0))} of {config.num_local_experts} (floor: expected bytes)"
        floor = parts["total"]
        for B in batches:
            engine.reset(B)
            # fill `held` positions cheaply: chunks of the built length
            pos = 0
            while pos < held:
                n = min(chunk, held - pos)
                engine.prefill(torch.randint(0, config.vocab_size, (B, n), generator=g).to(device),
                               torch.full((B,), pos, dtype=torch.long, device=device))
                pos += n
            tok = torch.randint(0, config.vocab_size, (B, 1), generator=g).to(device)
            positions = torch.full((B,), held, dtype=torch.long, device=device)
            for _ in range(2):  # warm-up steps
                engine.decode(tok, positions)
                positions += 1
            sync()
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                engine.decode(tok, positions)
                sync()
                times.append(time.perf_counter() - t0)
                positions += 1
            ms = 1e3 * sorted(times)[len(times) // 2]
            row = {"decode_ms": ms}
            if copy_tbps:
                row["floor_ms"] = floor / (copy_tbps * 1e12) * 1e3
                row["ratio_to_floor"] = ms / row["floor_ms"]
            out[f"B{B}"] = row
        out["weight_bytes_per_token"] = floor
        print(f"  {label}: prefill {out['prefill_ms']:.2f} ms ({out['prefill_matmul_tflops']:.1f} TFLOP/s); "
              + "; ".join(f"B={B} decode {out[f'B{B}']['decode_ms']:.3f} ms" for B in batches), flush=True)
        del engine
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.parallel_shapes", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny preset, TP 2, eager")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tp", type=int, default=8)
    p.add_argument("--held", type=int, default=4096)
    p.add_argument("--chunk", type=int, default=8192)
    p.add_argument("--expert-parallel", action="store_true",
                   help="also measure rank 0 under expert parallelism (heads split, E / N whole experts)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    from benchmarks.decode import reduced_config
    from model import MiniMaxConfig
    from model.parallel import ParallelPlan, local_config

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("benchmarks.parallel_shapes: needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    if cuda:
        from benchmarks.common import measure_ceilings

        config, tp, held, chunk, batches, steps = reduced_config("minimax-text-01", args.layers), args.tp, \
            args.held, args.chunk, [1, 16], 32
        ceilings = measure_ceilings()
    else:
        config, tp, held, chunk, batches, steps = MiniMaxConfig.preset("tiny"), 2, 12, 8, [1, 2], 3
        ceilings = {}
    local = local_config(ParallelPlan(config, tp))
    payload: dict[str, Any] = {"environment": environment(), "ceilings": ceilings, "tp": tp, "held": held,
                               "chunk": chunk, "command": "python -m benchmarks.parallel_shapes "
                               + " ".join(argv if argv is not None else sys.argv[1:])}
    copy = ceilings.get("copy_tbps")
    device = "cuda" if cuda else "cpu"
    payload["single"] = measure(config, "single GPU shapes", device, held, chunk, batches, copy, steps)
    payload["rank"] = measure(local, f"one rank of TP {tp}", device, held, chunk, batches, copy, steps)
    if args.expert_parallel:
        ep = ParallelPlan(config, tp, expert_parallel=True)
        payload["rank_ep"] = measure(local_config(ep), f"rank 0 of TP {tp} with expert parallelism", device, held,
                                     chunk, batches, copy, steps, ep_plan=ep)
    for key in ("rank", "rank_ep")[: 2 if args.expert_parallel else 1]:
        payload[f"{key}_over_single"] = {
            "prefill": payload[key]["prefill_ms"] / payload["single"]["prefill_ms"],
            **{f"decode_B{B}": payload[key][f"B{B}"]["decode_ms"] / payload["single"][f"B{B}"]["decode_ms"]
               for B in batches},
            "ideal": 1 / tp,
        }
        print(f"{key} / single: {payload[f'{key}_over_single']}", flush=True)
    write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
