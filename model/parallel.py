"""The parallel plan of MiniMax-01 over N ranks (issue 16): which slice of every tensor each rank holds, and the
collectives the forward needs. A pure function of the config and the world size: no process group, no weights.

Tensor parallel (Megatron layout; activations [T, hidden] replicated on every rank):

* lightning layers: the 64 heads split (rank r holds heads r*H/N .. (r+1)*H/N - 1): ``qkv_proj`` rows of its heads
  (the layout is per head [q|k|v]), ``output_gate`` rows and ``norm`` weights of its heads' channels,
  ``out_proj`` columns, its ``decay_rate`` entries; the lightning state [B, H/N, D, D] stays on the rank. The
  RMSNorm runs over all heads jointly, so its mean square is one all-reduce of a [T] fp32 sum; ``out_proj`` gives
  a partial sum: one all-reduce of [T, hidden].
* softmax layers: query heads and KV heads split alike (64 / 8 -> 8 and 1 per rank at N = 8; GQA groups stay
  whole), ``q_proj`` / ``k_proj`` / ``v_proj`` rows, ``o_proj`` columns; the KV pages of the rank's KV heads stay
  on the rank; one all-reduce of ``o_proj``'s partial sum.
* MoE: the router is replicated and routes once on every rank (same input, same weights: same choice); either
  each expert's intermediate dimension is split (tensor parallel: ``w1`` / ``w3`` rows and ``w2`` columns of I,
  per-output-channel scales of w1 / w3 split with their rows, w2's kept whole) or the experts are split
  (``expert_parallel``: whole experts, rank r holds E/N of them and computes their contributions only); one
  all-reduce of [T, hidden] either way.
* embedding and LM head: split over the vocabulary. The embedding looks up the rank's rows (others give zero) and
  all-reduces [T, hidden]; the LM head gives the rank's [T, V/N] fp32 logits, all-gathered into [T, V].
* norms (``input_layernorm``, ``post_attention_layernorm``, the final norm) and RoPE buffers: replicated.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

from .config import LIGHTNING, MiniMaxConfig

__all__ = ["ParallelPlan", "Shard", "Collective", "ParallelPlanError", "TensorParallel", "tensor_parallel_model",
           "local_config", "rank_skeleton", "rank_tensor"]


class ParallelPlanError(ValueError):
    """A world size the config cannot be split over; the message names the dimension."""


@dataclass(frozen=True)
class Shard:
    """The slice ``[start, stop)`` of dimension ``dim`` of a full tensor that a rank holds (``dim`` None: whole)."""

    dim: int | None
    start: int = 0
    stop: int = 0


@dataclass(frozen=True)
class Collective:
    """One collective of a forward step: where, which op, the per-rank payload elements per token and dtype."""

    where: str
    op: str  # "all_reduce" | "all_gather"
    elements_per_token: int
    dtype_bytes: int
    count: int  # how many times per forward (e.g. per layer x layers)


@dataclass(frozen=True)
class ParallelPlan:
    config: MiniMaxConfig
    world_size: int
    expert_parallel: bool = False

    def __post_init__(self) -> None:
        c, n = self.config, self.world_size
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ParallelPlanError(f"world size must be a positive integer, got {n!r}")
        checks = [("num_attention_heads", c.num_attention_heads), ("num_key_value_heads", c.num_key_value_heads),
                  ("vocab_size", c.vocab_size)]
        checks.append(("num_local_experts", c.num_local_experts) if self.expert_parallel
                      else ("intermediate_size", c.intermediate_size))
        for name, value in checks:
            if value % n:
                raise ParallelPlanError(f"{name} = {value} does not split over {n} ranks "
                                        f"({'expert' if self.expert_parallel else 'tensor'} parallel)")

    # ------------------------------------------------------------------------------------------------ ranges
    def _part(self, size: int, rank: int) -> tuple[int, int]:
        if not 0 <= rank < self.world_size:
            raise ParallelPlanError(f"rank {rank} is outside the world of {self.world_size}")
        step = size // self.world_size
        return rank * step, (rank + 1) * step

    def heads(self, rank: int) -> range:
        return range(*self._part(self.config.num_attention_heads, rank))

    def kv_heads(self, rank: int) -> range:
        return range(*self._part(self.config.num_key_value_heads, rank))

    def experts(self, rank: int) -> range:
        """The experts whose weights the rank holds (all of them under tensor parallelism)."""
        E = self.config.num_local_experts
        return range(*self._part(E, rank)) if self.expert_parallel else range(E)

    def vocab(self, rank: int) -> range:
        return range(*self._part(self.config.vocab_size, rank))

    # ------------------------------------------------------------------------------------------------ shards
    def shard(self, name: str, shape: tuple[int, ...], rank: int) -> Shard:
        """The slice of tensor ``name`` (the model's parameter / buffer names, full ``shape``) rank ``rank`` holds;
        ``ParallelPlanError`` for a name the plan does not know."""
        c = self.config
        D = c.head_dim
        h0, h1 = self._part(c.num_attention_heads, rank)
        k0, k1 = self._part(c.num_key_value_heads, rank)
        v0, v1 = self._part(c.vocab_size, rank)
        rules: list[tuple[str, Shard]] = [
            (r"model\.embed_tokens\.weight|lm_head\.weight", Shard(0, v0, v1)),
            (r"model\.layers\.\d+\.self_attn\.qkv_proj\.weight", Shard(0, 3 * D * h0, 3 * D * h1)),
            (r"model\.layers\.\d+\.self_attn\.(output_gate\.weight|norm\.weight|q_proj\.weight)",
             Shard(0, D * h0, D * h1)),
            (r"model\.layers\.\d+\.self_attn\.(out_proj|o_proj)\.weight", Shard(1, D * h0, D * h1)),
            (r"model\.layers\.\d+\.self_attn\.decay_rate", Shard(0, h0, h1)),
            (r"model\.layers\.\d+\.self_attn\.(k_proj|v_proj)\.weight", Shard(0, D * k0, D * k1)),
            (r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight|model\.norm\.weight"
             r"|model\.inv_freq|model\.layers\.\d+\.block_sparse_moe\.gate\.weight", Shard(None)),
        ]
        if self.expert_parallel:
            e0, e1 = self._part(c.num_local_experts, rank)
            rules.append((r"model\.layers\.\d+\.block_sparse_moe\.experts\.w[123](_scale)?", Shard(0, e0, e1)))
        else:
            i0, i1 = self._part(c.intermediate_size, rank)
            rules += [
                (r"model\.layers\.\d+\.block_sparse_moe\.experts\.w[13](_scale)?", Shard(1, i0, i1)),
                (r"model\.layers\.\d+\.block_sparse_moe\.experts\.w2", Shard(2, i0, i1)),
                (r"model\.layers\.\d+\.block_sparse_moe\.experts\.w2_scale", Shard(None)),  # per output (hidden)
            ]
        for pattern, shard in rules:
            if re.fullmatch(pattern, name):
                if shard.dim is not None and shape[shard.dim] != (shard.stop - shard.start) * self.world_size:
                    raise ParallelPlanError(f"{name}: dim {shard.dim} is {shape[shard.dim]}, the plan splits "
                                            f"{(shard.stop - shard.start) * self.world_size}")
                return shard
        raise ParallelPlanError(f"{name}: no rule of the parallel plan places this tensor")

    # ------------------------------------------------------------------------------------------------ traffic
    def collectives(self) -> list[Collective]:
        """Every collective of one forward, per token (decode: T = 1 per row). Elements are per rank's payload."""
        c = self.config
        n_lightning = sum(1 for t in c.layer_types if t == LIGHTNING)
        layers = c.num_hidden_layers
        out = [
            Collective("embedding lookup (vocab-split rows)", "all_reduce", c.hidden_size, 2, 1),
            Collective("lightning RMSNorm mean square (heads split)", "all_reduce", 1, 4, n_lightning),
            Collective("attention output projection (partial sums)", "all_reduce", c.hidden_size, 2, layers),
            Collective("MoE output (partial sums)", "all_reduce", c.hidden_size, 2, layers),
            Collective("LM head (vocab-split logits, fp32)", "all_gather", c.vocab_size // self.world_size, 4, 1),
        ]
        return out if self.world_size > 1 else []


# ------------------------------------------------------------------------------------------------ the rank's model


class TensorParallel:
    """One rank's collectives, as functional collectives (``torch.distributed._functional_collectives``: eager
    calls and ``torch.export`` graphs alike; an AOTInductor package runs them, tests/test_parallel_plan.py)."""

    def __init__(self, plan: ParallelPlan, rank: int, group=None):
        import torch.distributed as dist

        self.plan, self.rank = plan, rank
        self.world_size = plan.world_size
        self.group = group if group is not None else dist.group.WORLD
        self.vocab_start = plan.vocab(rank).start

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed._functional_collectives as funcol

        return funcol.all_reduce(t, "sum", self.group)

    def all_gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """The ranks' equal slices of ``dim`` side by side. On CPU tensors (gloo) as an all-reduce of the slice
        written into zeros: in an AOTInductor CPU program, gloo's all-gather work is destroyed on gloo's worker
        thread holding Python-owned tensors, which needs the GIL that the caller holds for the whole program call
        (a deadlock within a few steps, docs/parallel.md); all-reduce works do not. CUDA tensors take the
        all-gather (NCCL)."""
        import torch.distributed._functional_collectives as funcol

        dim = dim % t.dim()
        if t.device.type == "cpu":
            n, size = self.world_size, t.shape[dim]
            full = t.new_zeros((*t.shape[:dim], n * size, *t.shape[dim + 1:]))
            full = full.slice_scatter(t, dim, self.rank * size, (self.rank + 1) * size)
            # A new buffer, not the all-reduce's: the logits leave the program, and a collective's buffer that
            # reaches Python deadlocks gloo's worker thread the same way (-(-x): a copy Inductor does not remove,
            # unlike x + 0 or a clone)
            return -(-funcol.all_reduce(full, "sum", self.group))
        return funcol.all_gather_tensor(t.contiguous(), dim, self.group)


def local_config(plan: ParallelPlan) -> MiniMaxConfig:
    """The config of one rank's slice: heads, KV heads and the vocabulary divided, and I divided under tensor
    parallelism of the experts. Under expert parallelism I and the number of experts stay whole here (the router
    routes over all of them); the rank's experts module holds E / N of them (``rank_skeleton``)."""
    c, n = plan.config, plan.world_size
    # eos_token_id: the full model's (Text-01's 200020 is outside rank 0's slice of 25008); the runtime stops rows
    # on the full config's, which the parallel manifest holds (runtime.parallel.load_rank_engine)
    return dataclasses.replace(c, num_attention_heads=c.num_attention_heads // n,
                               num_key_value_heads=c.num_key_value_heads // n,
                               intermediate_size=c.intermediate_size if plan.expert_parallel
                               else c.intermediate_size // n, vocab_size=c.vocab_size // n, eos_token_id=None)


def rank_skeleton(config: MiniMaxConfig, plan: ParallelPlan, rank: int, dtype: torch.dtype | None = None,
                  quantization: str = "none", device: torch.device | str = "meta", group=None):
    """Rank ``rank``'s ``MiniMaxForCausalLM`` under ``plan`` with its collectives set and its tensors allocated on
    ``device`` but not filled (the meta device: none allocated): what a per-rank program is exported from when its
    weights are written apart (``build.py --tensor-parallel`` from a checkpoint). ``group``: the process group
    (default: the world; a fake one at build time, see ``export.parallel``)."""
    from .modeling import Experts, MiniMaxForCausalLM, QuantizedExperts

    if plan.config != config:
        raise ParallelPlanError("rank_skeleton: the plan was made for another config")
    with torch.device("meta"):
        local = MiniMaxForCausalLM(local_config(plan), dtype=dtype)
        local.quantize_experts_(quantization)
        if plan.expert_parallel:  # the rank's whole experts, E / N of them, after the router's first e0
            experts = plan.experts(rank)
            held = dataclasses.replace(local.config, num_local_experts=len(experts))
            for layer in local.model.layers:
                moe = layer.block_sparse_moe
                moe.experts = (Experts(held, dtype=dtype) if quantization == "none"
                               else QuantizedExperts(held, quantization))
                moe.expert_start = experts.start
    if torch.device(device).type != "meta":
        local = local.to_empty(device=device)
        # the derived buffers (decay rates, RoPE frequencies) are the full model's, cut to the rank (a decay rate
        # depends on the head's index among all heads): exported programs may take them as constants
        from .loading import derived_buffers

        buffers = dict(local.named_buffers())
        with torch.no_grad():
            for name, t in derived_buffers(config).items():
                buffers[name].copy_(rank_tensor(plan, name, t, rank))
    tp = TensorParallel(plan, rank, group)
    local.tp = local.model.tp = tp
    for layer in local.model.layers:
        layer.tp = tp
        if layer.is_lightning:
            layer.self_attn.norm.tp = tp
    return local.eval()


def rank_tensor(plan: ParallelPlan, name: str, tensor: torch.Tensor, rank: int) -> torch.Tensor:
    """The slice of the full ``tensor`` named ``name`` that ``rank`` holds (a view; ``plan.shard``)."""
    s = plan.shard(name, tuple(tensor.shape), rank)
    return tensor if s.dim is None else tensor.narrow(s.dim, s.start, s.stop - s.start)


@torch.no_grad()
def tensor_parallel_model(model, plan: ParallelPlan, rank: int, group=None):
    """Rank ``rank``'s ``MiniMaxForCausalLM`` under tensor parallelism (``plan``), from the whole ``model``: every
    tensor narrowed as ``plan.shard`` says (quantized experts and their scales too), the collectives set where the
    math needs them (embedding, attention and MoE outputs, the lightning RMSNorm, the LM head). Called on every
    rank of ``group`` (default: the world) with the same model; its forward returns the full logits on each rank.
    Under expert parallelism the rank holds whole experts (``plan.experts(rank)``) and runs ``minimax::moe_ep``
    (Triton kernels on CUDA, the reference elsewhere)."""
    local = rank_skeleton(model.config, plan, rank, model.dtype, model.quantization,
                          model.lm_head.weight.device, group)
    full = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, t in [*local.named_parameters(), *local.named_buffers()]:
        t.copy_(rank_tensor(plan, name, full[name], rank))
    return local
