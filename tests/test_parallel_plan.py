"""The parallel plan (``model/parallel.py``, issue 16): every tensor of the model is placed, the ranks' slices
partition each split tensor exactly, and the algebra the plan relies on holds (per-head slices of the fused
projections, partial sums of the row-split projections, the MoE split by intermediate channels or by experts, the
RMSNorm over heads from per-rank sums of squares, the vocabulary split); illegal world sizes are refused by name."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from kernels.moe import naive
from model import MiniMaxConfig, MiniMaxForCausalLM
from model.parallel import ParallelPlan, ParallelPlanError

TINY = MiniMaxConfig.preset("tiny")  # 6 heads, 2 KV heads, I 48, 4 experts, vocab 512
WIDE = dataclasses.replace(TINY, num_attention_heads=8, num_key_value_heads=8, num_local_experts=8,
                           intermediate_size=32)  # every split at 2 and 4 ranks


def _model(config):
    model = MiniMaxForCausalLM(config).init_random_weights(seed=0, std=0.1)
    model.model.reset_buffers()
    return model


@pytest.mark.parametrize("config,n,ep", [(TINY, 2, False), (TINY, 2, True), (WIDE, 4, False), (WIDE, 4, True),
                                         (WIDE, 8, True)])
@pytest.mark.parametrize("quantize", ["none", "experts-int8"])
def test_ranks_partition_every_tensor(config, n, ep, quantize):
    model = _model(config).quantize_experts_(quantize)
    plan = ParallelPlan(config, n, expert_parallel=ep)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        shards = [plan.shard(name, tuple(t.shape), r) for r in range(n)]
        if shards[0].dim is None:
            assert all(s.dim is None for s in shards), name
            continue
        dim = shards[0].dim
        pieces = [t.narrow(dim, s.start, s.stop - s.start) for s in shards]
        assert torch.equal(torch.cat(pieces, dim), t), name  # in rank order, no gap, no overlap


def test_world_sizes_that_do_not_split_are_refused_by_name():
    with pytest.raises(ParallelPlanError, match=r"num_attention_heads = 6 does not split over 4 ranks"):
        ParallelPlan(TINY, 4)
    with pytest.raises(ParallelPlanError, match=r"num_local_experts = 4 does not split over 8 ranks \(expert"):
        ParallelPlan(dataclasses.replace(TINY, num_attention_heads=8, num_key_value_heads=8), 8, expert_parallel=True)
    with pytest.raises(ParallelPlanError, match="intermediate_size = 48 does not split over 32"):
        ParallelPlan(dataclasses.replace(WIDE, num_attention_heads=32, num_key_value_heads=32, intermediate_size=48,
                                         vocab_size=512), 32)
    with pytest.raises(ParallelPlanError, match="world size must be a positive integer"):
        ParallelPlan(TINY, 0)
    plan = ParallelPlan(TINY, 2)
    with pytest.raises(ParallelPlanError, match="rank 2 is outside the world of 2"):
        plan.heads(2)
    with pytest.raises(ParallelPlanError, match="model.layers.0.mystery.weight: no rule"):
        plan.shard("model.layers.0.mystery.weight", (4, 4), 0)


@torch.no_grad()
def test_lightning_algebra_heads_split():
    """Per-head slices of qkv_proj and output_gate give the rank's heads exactly; the RMSNorm over all heads from
    the ranks' sums of squares (one all-reduce) and the partial sums of out_proj (one all-reduce) give the layer."""
    n = 2
    model = _model(TINY)
    attn = model.model.layers[0].self_attn
    plan = ParallelPlan(TINY, n)
    B, T, H, D = 2, 5, TINY.num_attention_heads, TINY.head_dim
    x = torch.randn(B, T, TINY.hidden_size, generator=torch.Generator().manual_seed(1))
    full = F.silu(attn.qkv_proj(x)).view(B, T, H, 3 * D)
    o = torch.randn(B, T, H * D, generator=torch.Generator().manual_seed(2))  # stands for the attention output
    eps = attn.norm.eps
    want = attn.out_proj(torch.sigmoid(attn.output_gate(x)) * attn.norm(o))
    parts, squares = [], []
    for r in range(n):
        s = plan.shard("model.layers.0.self_attn.qkv_proj.weight", tuple(attn.qkv_proj.weight.shape), r)
        heads = plan.heads(r)
        mine = F.silu(F.linear(x, attn.qkv_proj.weight[s.start:s.stop])).view(B, T, len(heads), 3 * D)
        assert torch.equal(mine, full[:, :, heads.start:heads.stop])
        c = plan.shard("model.layers.0.self_attn.norm.weight", (H * D,), r)
        squares.append(o[..., c.start:c.stop].float().pow(2).sum(-1, keepdim=True))
    mean_square = sum(squares) / (H * D)  # the all-reduce of the per-rank sums
    for r in range(n):
        c = plan.shard("model.layers.0.self_attn.norm.weight", (H * D,), r)
        normed = o[..., c.start:c.stop] * torch.rsqrt(mean_square + eps) * attn.norm.weight[c.start:c.stop]
        gate = torch.sigmoid(F.linear(x, attn.output_gate.weight[c.start:c.stop]))
        cols = plan.shard("model.layers.0.self_attn.out_proj.weight", tuple(attn.out_proj.weight.shape), r)
        parts.append(F.linear(gate * normed, attn.out_proj.weight[:, cols.start:cols.stop]))
    assert torch.allclose(sum(parts), want, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_softmax_projections_split_with_their_kv_heads():
    n = 2
    model = _model(TINY)
    attn = model.model.layers[3].self_attn  # full attention
    plan = ParallelPlan(TINY, n)
    D, H, KVH = TINY.head_dim, TINY.num_attention_heads, TINY.num_key_value_heads
    group = H // KVH
    x = torch.randn(3, TINY.hidden_size, generator=torch.Generator().manual_seed(3))
    for r in range(n):
        heads, kv = plan.heads(r), plan.kv_heads(r)
        assert heads.start // group == kv.start and heads.stop // group == kv.stop  # GQA groups stay whole
        q = plan.shard("model.layers.3.self_attn.q_proj.weight", tuple(attn.q_proj.weight.shape), r)
        k = plan.shard("model.layers.3.self_attn.k_proj.weight", tuple(attn.k_proj.weight.shape), r)
        assert torch.equal(F.linear(x, attn.q_proj.weight[q.start:q.stop]),
                           attn.q_proj(x)[:, heads.start * D:heads.stop * D])
        assert torch.equal(F.linear(x, attn.k_proj.weight[k.start:k.stop]), attn.k_proj(x)[:, kv.start * D:kv.stop * D])
    o = torch.randn(3, H * D, generator=torch.Generator().manual_seed(4))
    parts = [F.linear(o[:, s.start:s.stop], attn.o_proj.weight[:, s.start:s.stop])
             for s in (plan.shard("model.layers.3.self_attn.o_proj.weight", tuple(attn.o_proj.weight.shape), r)
                       for r in range(n))]
    assert torch.allclose(sum(parts), attn.o_proj(o), atol=1e-5)


@pytest.mark.parametrize("ep", [False, True])
@pytest.mark.parametrize("quantize", ["none", "experts-int8"])
@torch.no_grad()
def test_moe_split_sums_to_the_block(ep, quantize):
    """Tensor parallel (each expert's I split) or expert parallel (experts split, routing done once on every rank):
    the ranks' outputs sum to the whole block (the one all-reduce), unquantized and with int8 experts."""
    n = 4
    model = _model(WIDE).quantize_experts_(quantize)
    moe = model.model.layers[0].block_sparse_moe
    plan = ParallelPlan(WIDE, n, expert_parallel=ep)
    x = torch.randn(9, WIDE.hidden_size, generator=torch.Generator().manual_seed(5))
    weights, ids = naive.moe_route(x, moe.gate.weight, WIDE.num_experts_per_tok)
    e = moe.experts
    names = ("w1", "w3", "w2")
    if quantize == "none":
        full = {k: getattr(e, k) for k in names}
    else:
        full = {k: naive.dequantize_weight(getattr(e, k), getattr(e, f"{k}_scale")) for k in names}
    want = naive.moe_experts(x, weights, ids, full["w1"], full["w3"], full["w2"])
    prefix = "model.layers.0.block_sparse_moe.experts."
    total = torch.zeros_like(want)
    for r in range(n):
        part = {}
        for k in names:
            t = getattr(e, k)
            s = plan.shard(prefix + k, tuple(t.shape), r)
            piece = t.narrow(s.dim, s.start, s.stop - s.start)
            if quantize != "none":
                sc = getattr(e, f"{k}_scale")
                ss = plan.shard(prefix + k + "_scale", tuple(sc.shape), r)
                sc = sc if ss.dim is None else sc.narrow(ss.dim, ss.start, ss.stop - ss.start)
                piece = naive.dequantize_weight(piece, sc)
            part[k] = piece
        if ep:
            mine = plan.experts(r)
            local = torch.where((ids >= mine.start) & (ids < mine.stop), ids - mine.start, -1)
            total += naive.moe_experts(x, weights, local, part["w1"], part["w3"], part["w2"])
        else:
            total += naive.moe_experts(x, weights, ids, part["w1"], part["w3"], part["w2"])
    assert torch.allclose(total, want, atol=1e-5, rtol=1e-5)


def test_vocab_split_embedding_and_lm_head():
    n = 2
    model = _model(TINY)
    plan = ParallelPlan(TINY, n)
    ids = torch.tensor([[0, 255, 256, 511, 7]])
    emb = model.model.embed_tokens.weight
    looked = torch.zeros(1, 5, TINY.hidden_size)
    logits = []
    h = torch.randn(1, 5, TINY.hidden_size, generator=torch.Generator().manual_seed(6))
    for r in range(n):
        v = plan.vocab(r)
        mine = (ids >= v.start) & (ids < v.stop)
        rows = emb[v.start:v.stop][(ids - v.start).clamp(0, len(v) - 1)]
        looked += torch.where(mine[..., None], rows, torch.zeros(()))  # the all-reduce of the lookups
        logits.append(F.linear(h, model.lm_head.weight[v.start:v.stop]))
    assert torch.equal(looked, emb[ids])
    assert torch.allclose(torch.cat(logits, -1), F.linear(h, model.lm_head.weight), atol=1e-6)  # the all-gather


def test_collectives_of_text01_at_8_ranks():
    config = MiniMaxConfig.preset("minimax-text-01")
    plan = ParallelPlan(config, 8)
    by_where = {c.where: c for c in plan.collectives()}
    assert by_where["attention output projection (partial sums)"].count == 80
    assert by_where["lightning RMSNorm mean square (heads split)"].count == 70
    assert by_where["LM head (vocab-split logits, fp32)"].elements_per_token == 200064 // 8
    assert sum(c.count for c in plan.collectives()) == 1 + 70 + 80 + 80 + 1
    assert ParallelPlan(config, 1).collectives() == []


def test_text01_rank_config_at_8_ranks():
    """A rank's config under TP 8: 8 heads, 1 KV head, I / 8, the vocabulary / 8 and no eos id (Text-01's 200020 is
    outside rank 0's 25008 ids; the runtime stops on the full config's, which the parallel manifest keeps)."""
    from model.parallel import local_config

    c = local_config(ParallelPlan(MiniMaxConfig.preset("minimax-text-01"), 8))
    assert (c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.vocab_size, c.eos_token_id) == (
        8, 1, 9216 // 8, 200064 // 8, None)
    ep = local_config(ParallelPlan(MiniMaxConfig.preset("minimax-text-01"), 8, expert_parallel=True))
    assert (ep.intermediate_size, ep.num_local_experts, ep.eos_token_id) == (9216, 32, None)


def _run_ranks(tmp_path, script: str, *args) -> None:
    """Run ``script`` (which spawns its gloo ranks) as ``script PORT OUT *args`` from the repository root, with a
    free local port and ``tmp_path`` as the ranks' output folder; fails with the script's stderr."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "ranks.py"
    path.write_text(script)
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(path), str(port), str(tmp_path), *map(str, args)], cwd=root,
                       capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(root)})
    assert r.returncode == 0, r.stderr[-3000:]


_COLLECTIVES_SCRIPT = r"""
import os, sys, torch, torch.distributed as dist
import torch.distributed._functional_collectives as funcol


class Rank(torch.nn.Module):
    # a row-split projection (all-reduce of partial sums) and a vocab-split head (all-gather of the logits)
    def __init__(self, w, head):
        super().__init__()
        self.w, self.head = torch.nn.Parameter(w), torch.nn.Parameter(head)

    def forward(self, x):
        y = funcol.all_reduce(x @ self.w, "sum", dist.group.WORLD)
        return funcol.all_gather_tensor((y @ self.head.t()).contiguous(), 1, dist.group.WORLD)


def main(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    w, head, x = torch.randn(8, 6, generator=g), torch.randn(10, 6, generator=g), torch.randn(3, 8, generator=g)
    rows, vocab = 8 // world, 10 // world
    model = Rank(w[rank * rows:(rank + 1) * rows], head[rank * vocab:(rank + 1) * vocab]).eval()
    with torch.no_grad():
        ep = torch.export.export(model, (x[:, rank * rows:(rank + 1) * rows],))
        targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
        pkg = torch._inductor.aoti_compile_and_package(ep, package_path=f"{out}/rank{rank}.pt2")
        got = torch._inductor.aoti_load_package(pkg)(x[:, rank * rows:(rank + 1) * rows])
    want = (x @ w) @ head.t()
    ok = got.shape == want.shape and torch.allclose(got, want, atol=1e-5)  # ranks' logits side by side
    with open(f"{out}/rank{rank}.txt", "w") as f:
        f.write(f"{ok} {sorted(targets)}")
    dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp
    mp.spawn(main, args=(2, int(sys.argv[1]), sys.argv[2]), nprocs=2)
"""


def test_functional_collectives_survive_export_and_aotinductor_over_gloo(tmp_path):
    """The design's premise (issue 16): per-rank programs whose collectives are ``torch.ops._c10d_functional``
    nodes that torch.export keeps and an AOTInductor CPU package runs, here over gloo with 2 processes: an
    all-reduce of a row-split projection's partial sums and an all-gather of vocab-split logits equal the unsplit
    computation on every rank."""
    _run_ranks(tmp_path, _COLLECTIVES_SCRIPT)
    for rank in range(2):
        ok, *targets = (tmp_path / f"rank{rank}.txt").read_text().split(" ", 1)
        assert ok == "True", targets
        assert "_c10d_functional.all_reduce.default" in targets[0] and "all_gather_into_tensor" in targets[0]


_TP_SCRIPT = r"""
import dataclasses, os, sys, torch, torch.distributed as dist
from model import MiniMaxConfig, MiniMaxForCausalLM
from model.parallel import ParallelPlan, tensor_parallel_model


def logits_of(model, ids, steps):
    B, T = ids.shape
    state = model.new_state(B, T + steps + 1, page_size=4)
    with torch.no_grad():
        logits, state = model.prefill(ids, state)
        out, tok = [logits], logits[:, -1:].argmax(-1)
        for i in range(steps):
            logits, state = model.decode(tok, torch.full((B,), T + i), state)
            out.append(logits)
            tok = logits[:, -1:].argmax(-1)
    return torch.cat(out, 1)


def main(rank, world, port, out, config_name, quantize, ep):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    config = MiniMaxConfig.preset("tiny")
    if config_name == "wide":
        config = dataclasses.replace(config, num_attention_heads=8, num_key_value_heads=8, num_local_experts=8,
                                     intermediate_size=32)
    full = MiniMaxForCausalLM(config).init_random_weights(seed=0, std=0.1).eval().quantize_experts_(quantize)
    ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    want = logits_of(full, ids, 4)
    local = tensor_parallel_model(full, ParallelPlan(config, world, expert_parallel=ep == "ep"), rank)
    got = logits_of(local, ids, 4)
    err = float((got - want).abs().max())
    with open(f"{out}/rank{rank}.txt", "w") as f:
        f.write(f"{err} {tuple(local.model.layers[0].self_attn.qkv_proj.weight.shape)}")
    dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp
    world = int(sys.argv[3])
    mp.spawn(main, args=(world, int(sys.argv[1]), sys.argv[2], sys.argv[4], sys.argv[5], sys.argv[6]), nprocs=world)
"""


@pytest.mark.parametrize("world,config_name,quantize,ep", [
    (2, "tiny", "none", "tp"), (4, "wide", "none", "tp"), (2, "wide", "experts-int8", "tp"),
    (2, "tiny", "none", "ep"), (4, "wide", "none", "ep"), (2, "wide", "experts-int8", "ep")])
def test_parallel_model_over_gloo_equals_the_single_process_model(world, config_name, quantize, ep, tmp_path):
    """Every rank of a gloo world runs its slice of the model (``tensor_parallel_model``; the experts' I split, or
    whole experts split with ``expert_parallel``: each rank routes over all experts and runs its own) over a prefill
    and four decode steps and gets the single-process model's logits (fp32), with 1 / world of the attention
    weights."""
    _run_ranks(tmp_path, _TP_SCRIPT, world, config_name, quantize, ep)
    heads = (6 if config_name == "tiny" else 8) // world
    for rank in range(world):
        err, shape = (tmp_path / f"rank{rank}.txt").read_text().split(" ", 1)
        assert float(err) < 2e-5, (rank, err)  # measured ~2e-6 (fp32 summation order); logits of order 3
        assert shape == str((3 * 16 * heads, 64)), shape


_TP_AOTI_SCRIPT = r"""
import os, sys, torch, torch.distributed as dist
from export import BuildSettings, export_programs
from model import MiniMaxConfig, MiniMaxForCausalLM
from model.parallel import ParallelPlan, tensor_parallel_model


def main(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    config = MiniMaxConfig.preset("tiny")
    full = MiniMaxForCausalLM(config).init_random_weights(seed=0, std=0.1).eval()
    local = tensor_parallel_model(full, ParallelPlan(config, world), rank)
    settings = BuildSettings(backend="aoti", device="cpu", dtype="float32", max_batch=2, max_input_len=8,
                             max_seq_len=32, page_size=8)
    programs, ops = {}, set()
    for name, ep in export_programs(local, settings).items():
        ops |= {str(n.target) for n in ep.graph.nodes if n.op == "call_function" and "c10d" in str(n.target)}
        pkg = torch._inductor.aoti_compile_and_package(ep, package_path=f"{out}/{name}{rank}.pt2")
        programs[name] = torch._inductor.aoti_load_package(pkg)
    ids = torch.randint(0, config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    ours, ref = local.new_state(2, 32, page_size=8), full.new_state(2, 32, page_size=8)
    errs = []
    with torch.no_grad():
        got = programs["prefill"](ids, torch.zeros(2, dtype=torch.long), ours.block_table, ours.flatten())
        want, ref = full.prefill(ids, ref)
        errs.append(float((got[:, -1] - want[:, -1]).abs().max()))
        tok = want[:, -1:].argmax(-1)
        for i in range(3):
            pos = torch.full((2,), 8 + i)
            got = programs["decode"](tok, pos, ours.block_table, ours.flatten())
            want, ref = full.decode(tok, pos, ref)
            errs.append(float((got[:, -1] - want[:, -1]).abs().max()))
            tok = want[:, -1:].argmax(-1)
    with open(f"{out}/rank{rank}.txt", "w") as f:
        f.write(f"{max(errs)} {sorted(ops)}")
    dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp
    mp.spawn(main, args=(2, int(sys.argv[1]), sys.argv[2]), nprocs=2)
"""


def test_tensor_parallel_programs_export_and_run_as_aotinductor_packages_over_gloo(tmp_path):
    """Each rank's prefill and decode programs (``export.export_programs`` of its ``tensor_parallel_model``) keep
    their collectives through torch.export, compile with AOTInductor (CPU) and, run over gloo with the rank's state
    in place, give the single-process model's logits over a prefill chunk and three decode steps."""
    _run_ranks(tmp_path, _TP_AOTI_SCRIPT)
    for rank in range(2):
        err, ops = (tmp_path / f"rank{rank}.txt").read_text().split(" ", 1)
        assert float(err) < 2e-5, (rank, err)
        # CPU programs gather the vocab-split logits with an all-reduce (TensorParallel.all_gather: gloo's
        # all-gather work deadlocks an AOTInductor CPU call on the GIL); CUDA ones with an all-gather
        assert "all_reduce" in ops and "all_gather_into_tensor" not in ops, ops


@pytest.mark.parametrize("mode", ["none", "experts-int8"])
def test_expert_parallel_op_shares_sum_to_the_unsplit_moe(mode):
    """``minimax::moe_ep`` / ``moe_quantized_ep`` (the reference): every rank routes over all 8 experts and runs its
    own 2 (4 ranks); the ranks' outputs sum to the unsplit block (fp32), and each alone is not it."""
    import kernels  # noqa: F401  (registers the ops)
    from kernels.moe import naive

    g = torch.Generator().manual_seed(5)
    x, router = torch.randn(7, 16, generator=g), torch.randn(8, 16, generator=g)
    ws = [torch.randn(8, 12, 16, generator=g) / 4, torch.randn(8, 12, 16, generator=g) / 4,
          torch.randn(8, 16, 12, generator=g) / 3.5]
    if mode == "none":
        want = naive.moe_forward(x, router, *ws, 2)
        parts = [torch.ops.minimax.moe_ep(x, router, *(w[2 * r:2 * r + 2] for w in ws), 2, 2 * r) for r in range(4)]
    else:
        (q1, s1), (q3, s3), (q2, s2) = (naive.quantize_weight(w, mode) for w in ws)
        want = naive.moe_forward_quantized(x, router, q1, s1, q3, s3, q2, s2, 2, mode)
        parts = [torch.ops.minimax.moe_quantized_ep(x, router, *(t[2 * r:2 * r + 2] for t in (q1, s1, q3, s3, q2, s2)),
                                                    2, mode, 2 * r) for r in range(4)]
    assert torch.allclose(sum(parts), want, atol=1e-5)
    assert all((p - want).abs().max() > 1e-2 for p in parts)
    with pytest.raises(ValueError, match="outside the router's 8"):
        naive.moe_forward_ep(x, router, *(w[:2] for w in ws), 2, 7)
