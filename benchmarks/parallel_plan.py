"""Expected decode time per token of MiniMax-Text-01 over N GPUs under ``model.parallel.ParallelPlan`` (issue 16):
the weights each rank reads per token at B = 1 over the HBM rate, plus the step's collectives at an assumed
per-call latency and NVLink bandwidth. Arithmetic only (no GPU); the multi-GPU run (issue 17) checks it.

    PYTHONPATH=. python -m benchmarks.parallel_plan [--gpus 8] [--hbm-tbps 4.2] [--allreduce-us 10] [--nvlink-gbps 450]

Weights read per token and rank: the rank's slice of every attention projection (heads split), of the two
selected experts (tensor parallel: I / N of each; expert parallel: whole experts on the ranks that hold them, the
busiest rank reading one, or both when they share its rank: on average 1 + (E/N - 1)/(E - 1) experts per layer),
the replicated routers and norms, and the rank's 1/N of the fp32
LM head. The HBM rate default is the copy bandwidth measured on the H200 (``benchmarks/common.py``, 4.2 TB/s);
the all-reduce latency default (10 us per call for the 12 KB messages of B = 1) is an assumption about NCCL on
one NVLink node, not a measurement here.
"""

from __future__ import annotations

import argparse
import sys

from model import MiniMaxConfig
from model.config import LIGHTNING
from model.parallel import ParallelPlan


def weight_bytes_per_token(config, n: int, expert_bytes: float, expert_parallel: bool) -> dict[str, float]:
    """Bytes the busiest rank reads per decoded token (B = 1)."""
    h, inner = config.hidden_size, config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    parts = {"attention": 0.0, "experts": 0.0, "router_and_norms": 0.0, "lm_head": 0.0}
    for kind in config.layer_types:
        if kind == LIGHTNING:
            parts["attention"] += 5 * inner * h * 2 / n  # qkv (3), output gate, out_proj: bf16
        else:
            parts["attention"] += (2 * inner + 2 * kv) * h * 2 / n  # q, o, k, v
        one_expert = 3 * h * config.intermediate_size * expert_bytes
        k = config.num_experts_per_tok
        if expert_parallel:  # top-2: the busiest rank reads 1 expert, or both when they share a rank
            per_rank = config.num_local_experts // n
            both_on_one = (per_rank - 1) / (config.num_local_experts - 1) if k == 2 else 1.0
            parts["experts"] += (1 + both_on_one) * one_expert if k == 2 else k * one_expert
        else:
            parts["experts"] += k * one_expert / n
        parts["router_and_norms"] += config.num_local_experts * h * 4 + 2 * h * 2
    parts["lm_head"] = config.vocab_size * h * 4 / n
    parts["total"] = sum(parts.values())
    return parts


def collective_ms(plan: ParallelPlan, latency_us: float, nvlink_gbps: float) -> float:
    n = plan.world_size
    total = 0.0
    for c in plan.collectives():
        payload = c.elements_per_token * c.dtype_bytes
        moved = payload * 2 * (n - 1) / n if c.op == "all_reduce" else payload * (n - 1)  # ring traffic per rank
        total += c.count * (latency_us * 1e-3 + moved / (nvlink_gbps * 1e9) * 1e3)
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.parallel_plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--hbm-tbps", type=float, default=4.2)
    p.add_argument("--allreduce-us", type=float, default=10.0)
    p.add_argument("--nvlink-gbps", type=float, default=450.0, help="per-direction NVLink bandwidth per GPU")
    args = p.parse_args(argv)
    config = MiniMaxConfig.preset("minimax-text-01")
    print(f"| plan, {args.gpus} GPUs | experts | weights read per token (busiest rank) | HBM time | collectives "
          f"({args.allreduce_us:g} us each) | expected decode, B = 1 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for ep in (False, True):
        plan = ParallelPlan(config, args.gpus, expert_parallel=ep)
        comm = collective_ms(plan, args.allreduce_us, args.nvlink_gbps)
        calls = sum(c.count for c in plan.collectives())
        for label, nbytes in (("bf16", 2), ("int8 / fp8", 1)):
            w = weight_bytes_per_token(config, args.gpus, nbytes, ep)
            hbm = w["total"] / (args.hbm_tbps * 1e12) * 1e3
            print(f"| {'expert' if ep else 'tensor'} parallel | {label} | {w['total'] / 1e9:.2f} GB (experts "
                  f"{w['experts'] / 1e9:.2f}, attention {w['attention'] / 1e9:.2f}, LM head {w['lm_head'] / 1e9:.2f}) "
                  f"| {hbm:.2f} ms | {calls} calls, {comm:.2f} ms | {hbm + comm:.2f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
