"""MiniMax-Text-01 in PyTorch, written for ``torch.export``.

Module and parameter names follow the published checkpoint keys (``model.layers.{i}.self_attn.qkv_proj.weight``,
``model.layers.{i}.block_sparse_moe.gate.weight``, ...), except that the experts of a layer are stacked:
``block_sparse_moe.experts.w1`` is ``[E, I, hidden]`` and holds ``experts.{e}.w1.weight`` at index ``e``.

Numerics (see ``docs/`` and README): lightning state and accumulation in fp32; router logits and softmax in fp32
from an fp32 gate; LM head in fp32 (fp32 logits), as MiniMax recommends for this model; RMSNorm in fp32.

Entry points:
    forward(input_ids)                                -> logits [B, T, V]       (whole sequences)
    prefill(input_ids, state, positions=None)         -> (logits, state)        (a chunk of T tokens)
    decode(input_ids, positions, state)               -> (logits, state)        (one token per sequence)
``prefill`` and ``decode`` update ``state`` in place (lightning states, KV page pools) and return it: the
exported programs then mutate their state inputs and copy no cache (``export/exporting.py``). No ``.item()``, no
data-dependent Python branches.

Ragged batches (left padding with a negative start position): a batch of prompts of lengths ``L_b`` padded on the
left to ``L`` is passed with ``positions[b] = -(L - L_b)``, so token ``j`` of row ``b`` sits at absolute position
``positions[b] + j`` and the pad tokens are exactly those at a negative position. Positions >= 0 behave as before.
    * RoPE uses ``clamp(position, min=0)``.
    * Lightning layers (prefill): k and v are zeroed at pads (``torch.where``, NaN-safe) before the op, so a zero
      initial state stays exactly zero through the pads (pads only come before a row's first real token).
    * Softmax layers (``kernels/attention``): ``paged_kv_write`` skips tokens at negative positions, and
      ``paged_attention_*`` give a pad query zeros; a real query at ``p`` attends to its row's positions ``0..p``
      through the block table. Pad outputs are not used.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kernels  # noqa: F401  (registers torch.ops.minimax.*)

if not hasattr(kernels, "lightning_attention"):  # another distribution's top-level `kernels` came first on sys.path
    raise ImportError(
        f"`import kernels` loaded {getattr(kernels, '__file__', kernels)!r}, not this project's kernels/ package: "
        "Hugging Face's `kernels` distribution (a dependency of transformers>=5.25) uses the same name; install "
        "transformers<5.25 (pyproject pins it) and `pip uninstall kernels`, or run from the repository root")

from .config import LIGHTNING, MiniMaxConfig
from .state import MiniMaxState

logger = logging.getLogger(__name__)

__all__ = ["MiniMaxForCausalLM", "MiniMaxModel", "RMSNorm", "apply_partial_rope", "QuantizedExperts",
           "QUANTIZATIONS"]

# expert-weight quantization (``build.py --quantize``): the stored dtype of each mode (the math: kernels/moe/naive.py)
QUANTIZATIONS = {"none": None, "experts-int8": torch.int8, "experts-fp8": torch.float8_e4m3fn}


def kernel_choice(config: MiniMaxConfig, device: str) -> dict[str, str]:
    """Which implementation ``torch.ops.minimax.*`` dispatch to for this config on ``device`` (a pure function).

    The ops dispatch by device: the fp32 reference of ``kernels/*/naive.py`` on the CPU, the Triton kernels on
    CUDA (lightning attention only for head dims the kernels take; otherwise the reference, said here).
    """
    if device != "cuda":
        return {"lightning attention": "reference (naive.py)", "moe": "reference (naive.py)"}
    from kernels.lightning_attention.chunk import supports_head_dims

    lightning = ("triton (chunk.py prefill, recurrent.py decode)" if supports_head_dims(config.head_dim, config.head_dim)
                 else f"reference (naive.py): head_dim {config.head_dim} is not a power of two in [16, 256]")
    return {"lightning attention": lightning, "moe": "triton (routing.py, grouped.py via dispatch.py)"}


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, weight applied in the input dtype (as the reference implementations do)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.tp = None  # tensor parallel (model/parallel.py): the channels are split, the mean is all-reduced

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        if self.tp is None:
            mean_square = xf.pow(2).mean(-1, keepdim=True)
        else:
            mean_square = self.tp.all_reduce(xf.pow(2).sum(-1, keepdim=True)) / (xf.shape[-1] * self.tp.world_size)
        xf = xf * torch.rsqrt(mean_square + self.eps)
        return self.weight * xf.to(x.dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_partial_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of each head, rotate-half (NeoX) pairing; the rest pass through.

    x [B, T, heads, D]; cos, sin [B, T, rotary_dim] fp32. Computed in fp32, returned in x.dtype.
    """
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r].float(), x[..., r:]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # [B, T, 1, r]
    rotated = (x_rot * cos + _rotate_half(x_rot) * sin).to(x.dtype)
    return torch.cat((rotated, x_pass), dim=-1)


@dataclass
class _StepContext:
    """What every layer of one forward step shares."""

    decode: bool  # one token per sequence: lightning layers take the recurrent step
    positions: Tensor  # [B] int64: position of each row's first token
    token_positions: Tensor  # [B, T] int64: absolute position of each input token (negative: a left pad)
    block_table: Tensor  # [B, M] int32: the rows' pages in every softmax layer's pools
    cos: Tensor  # [B, T, rotary_dim] fp32
    sin: Tensor  # [B, T, rotary_dim] fp32


# A mixed step (``MiniMaxForCausalLM.mixed_step``) runs parts of different shapes through one forward: the decode
# rows ``[R, 1]`` and a prefill chunk ``[Bp, Tp]``. Everything token-wise (norms, projections, the MoE, the LM head)
# runs once over the parts' tokens joined (``[R + Bp * Tp, hidden]``: every weight read once per step); only the
# attention cores run per part, each with its own context and state rows. One part is the plain ``[B, T, hidden]``
# tensor itself (joining and splitting are then the identity: the prefill / decode graphs are what they were).
def _join(parts: list[Tensor]) -> Tensor:
    """``[B_i, T_i, C]`` parts -> ``[sum B_i T_i, C]`` (one part: itself)."""
    return parts[0] if len(parts) == 1 else torch.cat([p.reshape(-1, p.shape[-1]) for p in parts])


def _split(x: Tensor, ctxs: tuple[_StepContext, ...]) -> list[Tensor]:
    """The inverse of ``_join`` for the parts of ``ctxs``: ``[B_i, T_i, C]`` views (one part: ``x`` itself)."""
    if len(ctxs) == 1:
        return [x]
    out, start = [], 0
    for ctx in ctxs:
        B, T = ctx.token_positions.shape
        out.append(x[start:start + B * T].view(B, T, x.shape[-1]))
        start = start + B * T
    return out


class LightningAttention(nn.Module):
    """Lightning (linear) attention layer: SiLU q/k/v, decayed causal linear attention, RMSNorm, sigmoid gate."""

    def __init__(self, config: MiniMaxConfig, layer_idx: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        inner = self.num_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * inner, bias=False, dtype=dtype)  # per-head [q|k|v]
        self.output_gate = nn.Linear(config.hidden_size, inner, bias=False, dtype=dtype)
        self.out_proj = nn.Linear(inner, config.hidden_size, bias=False, dtype=dtype)
        self.norm = RMSNorm(inner, eps=config.lightning_norm_eps, dtype=dtype)  # over all heads jointly
        self.decay_values = config.lightning_decay_rates(layer_idx)
        self.register_buffer("decay_rate", torch.empty(self.num_heads, dtype=torch.float32), persistent=False)

    def reset_buffers(self) -> None:
        self.decay_rate = torch.tensor(self.decay_values, dtype=torch.float32, device=self.qkv_proj.weight.device)

    def forward(self, x: Tensor, ctx: _StepContext, state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        y, (state,) = self.forward_parts(x, (ctx,), (state,))
        return y, state

    def forward_parts(self, x: Tensor, ctxs: tuple[_StepContext, ...],
                      states: tuple[tuple[Tensor, ...], ...]) -> tuple[Tensor, tuple[tuple[Tensor, ...], ...]]:
        """``x``: the parts' tokens joined (``_join``); each part's core on its own state rows."""
        H, D = self.num_heads, self.head_dim
        outs = []
        for qkv, ctx, (lightning_state,) in zip(_split(F.silu(self.qkv_proj(x)), ctxs), ctxs, states):
            B, T, _ = qkv.shape
            q, k, v = qkv.view(B, T, H, 3 * D).split(D, dim=-1)  # [B, T, H, D] each (per-head [q|k|v])
            # lightning_state: [B, H, D, D] fp32
            if ctx.decode:  # in place: the kernel stores the new state over the old one (no copy, no new state)
                o = torch.ops.minimax.lightning_decode_(q, k, v, self.decay_rate, lightning_state)
            else:
                # Left pads (negative positions) contribute nothing: the zero state stays zero through them.
                real = (ctx.token_positions >= 0)[:, :, None, None]  # [B, T, 1, 1]
                k = torch.where(real, k, torch.zeros((), dtype=k.dtype, device=k.device))
                v = torch.where(real, v, torch.zeros((), dtype=v.dtype, device=v.device))
                o, new_state = torch.ops.minimax.lightning_prefill(q, k, v, self.decay_rate, lightning_state)
                # In place: exported, the state is a mutated input (prefill: one [B, H, D, D] copy per layer and
                # chunk, small next to the chunk's compute; the KV pools are written in place by their kernel).
                lightning_state.copy_(new_state)
            outs.append(o.reshape(B, T, H * D))
        o = self.norm(_join(outs))  # [B, T, H*D] (joined: [N, H*D])
        o = torch.sigmoid(self.output_gate(x)) * o
        return self.out_proj(o), states


class SoftmaxAttention(nn.Module):
    """Softmax attention layer: GQA, partial RoPE, scale 1/sqrt(D), attends over a fixed-size KV cache."""

    def __init__(self, config: MiniMaxConfig, dtype: torch.dtype | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden, D = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(hidden, self.num_heads * D, bias=False, dtype=dtype)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * D, bias=False, dtype=dtype)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * D, bias=False, dtype=dtype)
        self.o_proj = nn.Linear(self.num_heads * D, hidden, bias=False, dtype=dtype)

    def forward(self, x: Tensor, ctx: _StepContext, state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        y, (state,) = self.forward_parts(x, (ctx,), (state,))
        return y, state

    def forward_parts(self, x: Tensor, ctxs: tuple[_StepContext, ...],
                      states: tuple[tuple[Tensor, ...], ...]) -> tuple[Tensor, tuple[tuple[Tensor, ...], ...]]:
        """``x``: the parts' tokens joined (``_join``); each part attends over its own rows' pages."""
        H, KVH, D = self.num_heads, self.num_kv_heads, self.head_dim
        outs = []
        parts = zip(_split(self.q_proj(x), ctxs), _split(self.k_proj(x), ctxs), _split(self.v_proj(x), ctxs))
        for (q, k, v), ctx, (key_cache, value_cache) in zip(parts, ctxs, states):
            B, T, _ = q.shape
            # key_cache, value_cache: page pools [P, KVH, page_size, D], updated in place
            q = apply_partial_rope(q.view(B, T, H, D), ctx.cos, ctx.sin)  # [B, T, H, D]
            k = apply_partial_rope(k.view(B, T, KVH, D), ctx.cos, ctx.sin)  # [B, T, KVH, D]
            v = v.view(B, T, KVH, D)
            # Write the chunk's keys/values into the pages of their positions (left pads skipped), then attend over
            # each row's positions 0..p through the block table: GQA by indexing, nothing repeated or masked densely.
            torch.ops.minimax.paged_kv_write(key_cache, value_cache, k.to(key_cache.dtype), v.to(value_cache.dtype),
                                             ctx.block_table, ctx.positions)
            attend = (torch.ops.minimax.paged_attention_decode if ctx.decode
                      else torch.ops.minimax.paged_attention_prefill)
            o = attend(q.to(key_cache.dtype), key_cache, value_cache, ctx.block_table, ctx.positions,
                       1.0 / math.sqrt(D)).to(x.dtype)  # [B, T, H, D]
            outs.append(o.reshape(B, T, H * D))
        return self.o_proj(_join(outs)), states


class Experts(nn.Module):
    """The SwiGLU experts of one layer, stacked: w1, w3 [E, I, hidden]; w2 [E, hidden, I]."""

    def __init__(self, config: MiniMaxConfig, dtype: torch.dtype | None = None):
        super().__init__()
        E, I, hidden = config.num_local_experts, config.intermediate_size, config.hidden_size
        self.w1 = nn.Parameter(torch.empty(E, I, hidden, dtype=dtype))
        self.w3 = nn.Parameter(torch.empty(E, I, hidden, dtype=dtype))
        self.w2 = nn.Parameter(torch.empty(E, hidden, I, dtype=dtype))


class QuantizedExperts(nn.Module):
    """The experts of one layer quantized per output channel (``kernels/moe/naive.py``, "Quantized experts"):
    w1, w3 [E, I, hidden] and w2 [E, hidden, I] int8 (experts-int8) or float8_e4m3fn (experts-fp8), with fp32 scales
    w1_scale, w3_scale [E, I] and w2_scale [E, hidden]. Parameters without gradients (so that they are named and
    loaded like the weights they replace)."""

    def __init__(self, config: MiniMaxConfig, mode: str):
        super().__init__()
        if QUANTIZATIONS.get(mode) is None:
            raise ValueError(f"expert quantization {mode!r}: expected one of "
                             f"{', '.join(m for m in QUANTIZATIONS if m != 'none')}")
        self.mode = mode
        E, I, hidden = config.num_local_experts, config.intermediate_size, config.hidden_size
        q = QUANTIZATIONS[mode]

        def frozen(*shape: int, dtype: torch.dtype) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)

        self.w1, self.w3 = frozen(E, I, hidden, dtype=q), frozen(E, I, hidden, dtype=q)
        self.w2 = frozen(E, hidden, I, dtype=q)
        self.w1_scale, self.w3_scale = frozen(E, I, dtype=torch.float32), frozen(E, I, dtype=torch.float32)
        self.w2_scale = frozen(E, hidden, dtype=torch.float32)

    @classmethod
    @torch.no_grad()
    def from_experts(cls, experts: Experts, config: MiniMaxConfig, mode: str) -> "QuantizedExperts":
        """Quantize ``experts`` (on their device; a meta module gives a meta one, nothing computed)."""
        from kernels.moe.naive import quantize_weight

        device = experts.w1.device
        with torch.device("meta"):
            out = cls(config, mode)
        for name in ("w1", "w3", "w2"):
            qw, scale = quantize_weight(getattr(experts, name), mode)
            setattr(out, name, nn.Parameter(qw.to(device), requires_grad=False))
            setattr(out, f"{name}_scale", nn.Parameter(scale.to(device), requires_grad=False))
        return out


class SparseMoE(nn.Module):
    """Router (fp32 gate, softmax, top-k, renormalised) + SwiGLU experts, as one ``minimax::moe`` call."""

    def __init__(self, config: MiniMaxConfig, dtype: torch.dtype | None = None):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False, dtype=torch.float32)
        self.experts = Experts(config, dtype=dtype)
        # expert parallelism (model/parallel.py): the index of this rank's first expert among the router's; None:
        # every expert is here
        self.expert_start: int | None = None

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, T, hidden]`` (or a mixed step's joined ``[N, hidden]``) -> the same shape."""
        hidden = x.shape[-1]
        n = x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]
        e = self.experts
        if self.expert_start is not None:  # this rank's experts only; the ranks' outputs sum to the block's
            flat = x.reshape(n, hidden)
            if isinstance(e, QuantizedExperts):
                y = torch.ops.minimax.moe_quantized_ep(flat, self.gate.weight, e.w1, e.w1_scale, e.w3, e.w3_scale,
                                                       e.w2, e.w2_scale, self.top_k, e.mode, self.expert_start)
            else:
                y = torch.ops.minimax.moe_ep(flat, self.gate.weight, e.w1, e.w3, e.w2, self.top_k,
                                             self.expert_start)
        elif isinstance(e, QuantizedExperts):
            y = torch.ops.minimax.moe_quantized(x.reshape(n, hidden), self.gate.weight, e.w1, e.w1_scale, e.w3,
                                                e.w3_scale, e.w2, e.w2_scale, self.top_k, e.mode)
        else:
            y = torch.ops.minimax.moe(x.reshape(n, hidden), self.gate.weight, e.w1, e.w3, e.w2, self.top_k)
        return y.view(x.shape)


class DecoderLayer(nn.Module):
    """One block: a mixer chosen by the layer plan, then the MoE, each with a DeepNorm post-norm residual."""

    def __init__(self, config: MiniMaxConfig, layer_idx: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.is_lightning = config.layer_types[layer_idx] == LIGHTNING
        if self.is_lightning:
            self.self_attn: nn.Module = LightningAttention(config, layer_idx, dtype=dtype)
            self.attn_alpha, self.attn_beta = config.linear_attn_alpha, config.linear_attn_beta
        else:
            self.self_attn = SoftmaxAttention(config, dtype=dtype)
            self.attn_alpha, self.attn_beta = config.full_attn_alpha, config.full_attn_beta
        self.mlp_alpha, self.mlp_beta = config.mlp_alpha, config.mlp_beta
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.block_sparse_moe = SparseMoE(config, dtype=dtype)
        self.tp = None  # tensor parallel (model/parallel.py): the attention and MoE outputs are partial sums

    def forward(self, x: Tensor, ctx: _StepContext, state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        y, (state,) = self.forward_parts(x, (ctx,), (state,))
        return y, state

    def forward_parts(self, x: Tensor, ctxs: tuple[_StepContext, ...],
                      states: tuple[tuple[Tensor, ...], ...]) -> tuple[Tensor, tuple[tuple[Tensor, ...], ...]]:
        """``x``: one part ``[B, T, hidden]``, or the joined tokens of a mixed step's parts (``_join``)."""
        # Post-norm: the residual branch carries the *normed* input, scaled by alpha (DeepNorm).
        h = self.input_layernorm(x)
        attn, states = self.self_attn.forward_parts(h, ctxs, states)
        if self.tp is not None:
            attn = self.tp.all_reduce(attn)
        y = self.attn_alpha * h + self.attn_beta * attn
        h = self.post_attention_layernorm(y)
        moe = self.block_sparse_moe(h)
        if self.tp is not None:
            moe = self.tp.all_reduce(moe)
        return self.mlp_alpha * h + self.mlp_beta * moe, states


class MiniMaxModel(nn.Module):
    """Embedding, decoder layers and final norm (the ``model.`` prefix of the checkpoint)."""

    def __init__(self, config: MiniMaxConfig, dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(config, i, dtype=dtype) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.register_buffer("inv_freq", torch.empty(config.rotary_dim // 2, dtype=torch.float32), persistent=False)
        self.tp = None  # tensor parallel (model/parallel.py): the embedding rows are split over the vocabulary

    def embed(self, input_ids: Tensor) -> Tensor:
        """The ids' embeddings; split over the vocabulary, each rank looks up its rows and the sum is all-reduced."""
        if self.tp is None:
            return self.embed_tokens(input_ids)
        rows = self.embed_tokens.weight.shape[0]
        local = input_ids - self.tp.vocab_start
        mine = (local >= 0) & (local < rows)
        h = self.embed_tokens(local.clamp(0, rows - 1)) * mine[..., None].to(self.embed_tokens.weight.dtype)
        return self.tp.all_reduce(h)

    def reset_buffers(self) -> None:
        """(Re)compute the derived buffers (RoPE frequencies, decay rates) on the weights' device."""
        r = self.config.rotary_dim
        device = self.embed_tokens.weight.device
        exponent = torch.arange(0, r, 2, dtype=torch.float32, device=device) / r
        self.inv_freq = 1.0 / (self.config.rope_theta**exponent)
        for layer in self.layers:
            if layer.is_lightning:
                layer.self_attn.reset_buffers()

    def forward(
        self, input_ids: Tensor, state: MiniMaxState, positions: Tensor, decode: bool
    ) -> tuple[Tensor, MiniMaxState]:
        return self.forward_embeddings(self.embed(input_ids), state, positions, decode)

    def forward_embeddings(
        self, h: Tensor, state: MiniMaxState, positions: Tensor, decode: bool
    ) -> tuple[Tensor, MiniMaxState]:
        """``forward`` from input embeddings ``h [B, T, hidden]`` (the ids' embeddings, or VL-01's with image
        features written in): the decoder layers and the final norm."""
        (h,) = self.forward_parts([h], [state], [positions], [decode])
        return h, state  # every state tensor was updated in place

    def _context(self, T: int, positions: Tensor, block_table: Tensor, decode: bool) -> _StepContext:
        token_positions = positions[:, None] + torch.arange(T, device=positions.device)[None, :]  # [B, T]
        # Negative positions are left pads (see the module docstring); RoPE sees them at position 0.
        freqs = token_positions.clamp(min=0)[..., None].float() * self.inv_freq  # [B, T, r/2] fp32
        emb = torch.cat((freqs, freqs), dim=-1)
        return _StepContext(decode=decode, positions=positions, token_positions=token_positions,
                            block_table=block_table, cos=emb.cos(), sin=emb.sin())

    def forward_parts(self, h_parts: list[Tensor], states: list[MiniMaxState], positions: list[Tensor],
                      decode: list[bool]) -> list[Tensor]:
        """The decoder layers and the final norm over several parts at once (``MiniMaxForCausalLM.mixed_step``):
        part i is ``h_parts[i] [B_i, T_i, hidden]`` at ``positions[i] [B_i]`` on ``states[i]`` (its rows' lightning
        states and block table; the parts' rows are distinct, their KV pools the same tensors), a decode part when
        ``decode[i]``. The token-wise work runs once over the parts' tokens joined; returns each part's normed
        hidden states. States are updated in place."""
        ctxs = tuple(self._context(h.shape[1], p, st.block_table, d)
                     for h, p, st, d in zip(h_parts, positions, states, decode))
        h = _join(list(h_parts))
        i_lin = i_soft = 0
        for layer in self.layers:
            if layer.is_lightning:
                h, _ = layer.forward_parts(h, ctxs, tuple((st.lightning[i_lin],) for st in states))
                i_lin += 1
            else:
                h, _ = layer.forward_parts(h, ctxs, tuple((st.key_cache[i_soft], st.value_cache[i_soft])
                                                          for st in states))
                i_soft += 1
        return _split(self.norm(h), ctxs)


class MiniMaxForCausalLM(nn.Module):
    """MiniMax-Text-01 causal LM. ``dtype`` is the weights' dtype; the router gate and LM head stay fp32."""

    def __init__(self, config: MiniMaxConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.model = MiniMaxModel(config, dtype=dtype)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=torch.float32)
        self.tp = None  # tensor parallel (model/parallel.py, ``tensor_parallel_model``)
        if self.lm_head.weight.device.type != "meta":
            self.model.reset_buffers()
            self.log_kernel_choice()

    def log_kernel_choice(self) -> dict[str, str]:
        """Log (and return) which implementation each custom op runs for this model on its current device."""
        device = self.lm_head.weight.device.type
        choice = kernel_choice(self.config, device)
        logger.info(
            "MiniMax model: %d layers (%d lightning, %d softmax), %s weights on %s; kernels: %s",
            self.config.num_hidden_layers, len(self.config.lightning_layers), len(self.config.softmax_layers),
            self.dtype, device, "; ".join(f"{op}: {impl}" for op, impl in choice.items()),
        )
        return choice

    @classmethod
    def from_pretrained(
        cls, path: str, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu", **config_overrides
    ) -> "MiniMaxForCausalLM":
        """Load an official sharded safetensors checkpoint (see ``model.loading.load_checkpoint``)."""
        from .loading import load_checkpoint

        return load_checkpoint(cls, path, dtype=dtype, device=device, **config_overrides)

    @property
    def quantization(self) -> str:
        """The experts' quantization: "none", "experts-int8" or "experts-fp8" (``quantize_experts_``)."""
        experts = self.model.layers[0].block_sparse_moe.experts if len(self.model.layers) else None
        return experts.mode if isinstance(experts, QuantizedExperts) else "none"

    def quantize_experts_(self, mode: str) -> "MiniMaxForCausalLM":
        """Quantize every layer's expert weights in place, one layer at a time (the bf16 experts of a layer are
        freed before the next is quantized); "none" leaves the model as it is. The router, attention and LM head
        are unchanged. A meta model stays on the meta device (for weightless builds)."""
        if mode not in QUANTIZATIONS:
            raise ValueError(f"expert quantization {mode!r}: expected one of {', '.join(QUANTIZATIONS)}")
        if mode == "none":
            return self
        if self.quantization != "none":
            raise ValueError(f"the experts are already quantized ({self.quantization})")
        for layer in self.model.layers:
            moe = layer.block_sparse_moe
            moe.experts = QuantizedExperts.from_experts(moe.experts, self.config, mode)
        return self

    @torch.no_grad()
    def init_random_weights(self, seed: int = 0, std: float = 0.02) -> "MiniMaxForCausalLM":
        """Fill every weight with N(0, std) (norm weights with 1): a random model for demos and tests (before
        ``quantize_experts_``)."""
        if self.quantization != "none":
            raise ValueError("init_random_weights: initialise before quantize_experts_")
        generator = torch.Generator(device="cpu").manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                # drawn on the CPU (one stream whatever the device, also inside `with torch.device("cuda")`)
                p.copy_(torch.randn(p.shape, generator=generator, device="cpu") * std)
        return self

    def _logits(self, h: Tensor) -> Tensor:
        logits = F.linear(h.float(), self.lm_head.weight)  # fp32 LM head -> fp32 logits [B, T, V]
        if self.tp is not None:  # split over the vocabulary: the ranks' [B, T, V / N] side by side
            logits = self.tp.all_gather(logits, -1)
        return logits

    def new_state(
        self, batch_size: int, max_seq_len: int, device: torch.device | str | None = None, page_size: int = 256
    ) -> MiniMaxState:
        """A zero decoding state sized for this model: KV pools in the weights' dtype, an identity block table."""
        device = self.lm_head.weight.device if device is None else device
        page_size = min(page_size, max(1, max_seq_len))
        return MiniMaxState.allocate(self.config, batch_size, max_seq_len, dtype=self.dtype, device=device,
                                     page_size=page_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        """Whole sequences from an empty state: ``input_ids [B, T] -> logits [B, T, vocab]`` (fp32)."""
        state = self.new_state(input_ids.shape[0], input_ids.shape[1], device=input_ids.device)
        logits, _ = self.prefill(input_ids, state)
        return logits

    def prefill(
        self, input_ids: Tensor, state: MiniMaxState, positions: Tensor | None = None, last_logits_only: bool = False
    ) -> tuple[Tensor, MiniMaxState]:
        """Process a chunk ``input_ids [B, T]`` starting at ``positions [B]`` (default 0) on top of ``state``.

        Returns ``(logits [B, T, V] fp32 (or [B, 1, V] with last_logits_only), state)``; ``state`` is updated in
        place and returned. Calling prefill on consecutive chunks equals one call on the whole. Rows must not run
        past the block table (``runtime.Engine`` checks; the CPU reference ops refuse, the traced kernels cannot).
        A negative ``positions[b]`` marks the first ``-positions[b]`` tokens of row b as left pads (module docstring).
        """
        if positions is None:
            positions = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        h, state = self.model(input_ids, state, positions, decode=False)
        if last_logits_only:
            h = h[:, -1:]
        return self._logits(h), state

    def decode(self, input_ids: Tensor, positions: Tensor, state: MiniMaxState) -> tuple[Tensor, MiniMaxState]:
        """One token per sequence: ``input_ids [B, 1]`` at ``positions [B]`` -> ``(logits [B, 1, V] fp32, state)``."""
        if input_ids.shape[1] != 1:
            raise ValueError(f"decode takes one token per sequence: input_ids [B, 1], got {tuple(input_ids.shape)}")
        h, state = self.model(input_ids, state, positions, decode=True)
        return self._logits(h), state

    def mixed_step(self, decode_ids: Tensor, decode_positions: Tensor, decode_state: MiniMaxState,
                   prefill_ids: Tensor, prefill_positions: Tensor, prefill_state: MiniMaxState) -> Tensor:
        """One decode step of some rows and one prefill chunk of others in a single forward (every weight read
        once): ``decode_ids [R, 1]`` at ``decode_positions [R]`` on ``decode_state``, ``prefill_ids [Bp, Tp]`` at
        ``prefill_positions [Bp]`` on ``prefill_state`` (other rows; the same KV pools). Returns the decode rows'
        logits then the prefill rows' last-token logits, ``[R + Bp, 1, V]`` fp32: what ``decode`` and ``prefill``
        (``last_logits_only``) return for them, called one after the other. Both states are updated in place."""
        if decode_ids.shape[1] != 1:
            raise ValueError(f"mixed_step: decode_ids must be [R, 1], got {tuple(decode_ids.shape)}")
        if decode_state.key_cache and any(a is not b for a, b in zip(decode_state.key_cache, prefill_state.key_cache)):
            raise ValueError("mixed_step: the decode and prefill rows must share one set of KV pools")
        dec, pre = self.model.forward_parts(
            [self.model.embed(decode_ids), self.model.embed(prefill_ids)], [decode_state, prefill_state],
            [decode_positions, prefill_positions], [True, False])
        return self._logits(torch.cat([dec, pre[:, -1:]]))
