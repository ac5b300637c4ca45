"""benchmarks/memory_table.py (issue 15's memory table): the per-token and per-sequence state sizes the issue states,
and the weights of Text-01 as this project stores them in each expert quantization."""

from __future__ import annotations

from benchmarks import memory_table
from model import MiniMaxConfig


def test_state_sizes_are_the_issues():
    config = MiniMaxConfig.preset("minimax-text-01")
    assert memory_table.kv_bytes_per_token(config) == 40 * 1024  # 10 softmax layers x K, V x 8 heads x 128 x bf16
    assert memory_table.lightning_state_bytes(config) == 70 * 64 * 128 * 128 * 4


def test_weights_by_mode():
    bf16, int8, fp8 = (memory_table.weight_bytes(m) for m in ("none", "experts-int8", "experts-fp8"))
    assert bf16["other"] == int8["other"] == fp8["other"]  # attention, router, norms, embedding, LM head untouched
    experts = 80 * 32 * 3 * 6144 * 9216  # 434.9 B expert weights
    assert bf16["experts"] == 2 * experts
    scales = 80 * 32 * (2 * 9216 + 6144) * 4  # one fp32 scale per output channel
    assert int8["experts"] == fp8["experts"] == experts + scales
    rows = {(r["mode"], r["gpus"]): r for r in memory_table.table(reserve_gib=5.0)}
    assert rows[("none", 8)]["H100/H800 80 GB"] == 0  # 914.7 GB of bf16 weights: more than 8 x 80 GB
    assert rows[("experts-int8", 8)]["H100/H800 80 GB"] > 2_000_000  # the published 8 x H800 setup: 2M tokens fit


def test_parallel_plan_arithmetic():
    """benchmarks/parallel_plan.py: tensor parallel reads 1/N of both selected experts per token and rank; expert
    parallel reads whole experts on the busiest rank (one, or both with probability (E/N - 1)/(E - 1))."""
    from benchmarks import parallel_plan

    config = MiniMaxConfig.preset("minimax-text-01")
    one_expert = 3 * 6144 * 9216
    tp = parallel_plan.weight_bytes_per_token(config, 8, 1, expert_parallel=False)
    ep = parallel_plan.weight_bytes_per_token(config, 8, 1, expert_parallel=True)
    assert tp["experts"] == 80 * 2 * one_expert / 8
    assert abs(ep["experts"] - 80 * (1 + 3 / 31) * one_expert) < 1
    assert tp["lm_head"] == 200064 * 6144 * 4 / 8
