"""Weights of MiniMax-Text-01 per GPU in each expert quantization, and the longest context each setup leaves room
for (issue 15's memory table). Arithmetic only (CPU, no weights): the tensors of the model as this project stores
them (``MiniMaxForCausalLM`` on the meta device, ``quantize_experts_``): attention, norms and embedding in bf16,
router gates and LM head in fp32, experts in bf16 or 1 byte per weight plus one fp32 scale per output channel.

Context: what is left of ``GPUs x memory`` after the weights, a reserve per GPU for activations and workspace
(``--reserve-gib``, default 5 GiB: the 8-layer slice's prefill chunk of 8192 tokens took 2.6-4.8 GiB over weights
and cache on the H200) and one sequence's lightning states (70 layers x 64 heads x 128 x 128 fp32 = 294 MB), over
the KV cache per token (10 softmax layers x K and V x 8 heads x 128 x 2 bytes = 40 KiB), with the weights and the
cache spread evenly over the GPUs (tensor / expert parallel).

    PYTHONPATH=. python -m benchmarks.memory_table [--reserve-gib 5]
"""

from __future__ import annotations

import argparse
import sys

import torch

GIB = 1 << 30
GPUS = {"H100/H800 80 GB": 80e9, "H200 141 GB": 141e9}  # capacity in bytes as sold (80 GB, 141 GB)


def weight_bytes(mode: str) -> dict[str, int]:
    """Bytes of Text-01's stored tensors by group for an expert quantization mode."""
    from model import MiniMaxConfig, MiniMaxForCausalLM

    config = MiniMaxConfig.preset("minimax-text-01")
    with torch.device("meta"):
        model = MiniMaxForCausalLM(config, dtype=torch.bfloat16)
        model.quantize_experts_(mode)
    groups: dict[str, int] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        group = "experts" if ".experts." in name else "other"
        groups[group] = groups.get(group, 0) + t.numel() * t.element_size()
    return groups


def kv_bytes_per_token(config) -> int:
    softmax = sum(1 for t in config.layer_types if t != "linear_attention")
    return softmax * 2 * config.num_key_value_heads * config.head_dim * 2  # bf16 K and V


def lightning_state_bytes(config) -> int:
    lightning = sum(1 for t in config.layer_types if t == "linear_attention")
    return lightning * config.num_attention_heads * config.head_dim * config.head_dim * 4


def table(reserve_gib: float) -> list[dict]:
    from model import MiniMaxConfig

    config = MiniMaxConfig.preset("minimax-text-01")
    kv, state = kv_bytes_per_token(config), lightning_state_bytes(config)
    rows = []
    for mode in ("none", "experts-int8", "experts-fp8"):
        groups = weight_bytes(mode)
        total = sum(groups.values())
        for n in (4, 8):
            row = {"mode": mode, "gpus": n, "weights_gb": total / 1e9, "per_gpu_gb": total / n / 1e9,
                   "experts_gb": groups["experts"] / 1e9}
            for gpu, cap in GPUS.items():
                free = n * (cap - reserve_gib * GIB) - total - state
                row[gpu] = int(free // kv) if free > 0 else 0
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory_table", description=__doc__.split("\n\n")[0])
    p.add_argument("--reserve-gib", type=float, default=5.0, help="per-GPU reserve for activations (default 5)")
    args = p.parse_args(argv)
    rows = table(args.reserve_gib)
    print("| experts | GPUs | weights in all | per GPU | longest context, " + " | longest context, ".join(GPUS) + " |")
    print("| --- | --- | --- | --- | " + " | ".join("---" for _ in GPUS) + " |")
    for r in rows:
        ctx = [f"{r[g] / 1e6:.2f} M tokens" if r[g] else "does not fit" for g in GPUS]
        print(f"| {r['mode']} | {r['gpus']} | {r['weights_gb']:.1f} GB | {r['per_gpu_gb']:.1f} GB | " + " | ".join(ctx)
              + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
