"""The MiniMax-01 text model configuration: one frozen, typed config with an explicit per-layer plan.

``MiniMaxConfig.from_pretrained(dir)`` reads a checkpoint's ``config.json`` in either of the two published schemas:

* the official MiniMax schema (``MiniMaxText01ForCausalLM`` remote code, also MiniMax-M1): ``attn_type_list``
  (0 = lightning, 1 = softmax), ``layernorm_{full_attention,linear_attention,mlp}_{alpha,beta}``, ``rotary_dim``,
  ``rope_theta``, ``postnorm``, ``shared_intermediate_size``;
* the transformers ``minimax`` schema: ``layer_types`` ("linear_attention" / "full_attention"),
  ``{full_attn,linear_attn,mlp}_{alpha,beta}_factor``, ``block_size``, ``rope_parameters`` (or a top-level
  ``rope_theta``) with an optional ``partial_rotary_factor``.

Anything this implementation does not compute (pre-norm residuals, a shared expert, sliding windows, RoPE scaling,
tied embeddings, another activation) is refused with a ``ConfigError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LIGHTNING = "linear_attention"
SOFTMAX = "full_attention"
_LAYER_TYPES = (LIGHTNING, SOFTMAX)


class ConfigError(ValueError):
    """A config.json (or a preset override) that this implementation cannot run."""



def pages_per_seq(max_seq_len: int, page_size: int) -> int:
    """Block-table width: pages one row needs to hold ``max_seq_len`` tokens."""
    return -(-max_seq_len // page_size)

@dataclass(frozen=True)
class MiniMaxConfig:
    """Architecture of MiniMax-Text-01 (and M1, which is the same network). All sizes are explicit.

    ``layer_types[i]`` is ``"linear_attention"`` (a lightning layer) or ``"full_attention"`` (softmax, GQA,
    partial RoPE). Every layer has a MoE block. Residuals are DeepNorm post-norm:
    ``y = alpha * norm(x) + beta * sublayer(norm(x))`` with the per-sublayer alpha/beta below.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # per-expert FFN width
    num_hidden_layers: int
    num_attention_heads: int  # heads of both lightning and softmax layers
    num_key_value_heads: int  # softmax layers only (GQA)
    head_dim: int
    layer_types: tuple[str, ...]
    num_local_experts: int
    num_experts_per_tok: int
    rotary_dim: int  # RoPE covers the first rotary_dim dims of each softmax head (rotate-half pairing)
    rope_theta: float
    full_attn_alpha: float = 1.0
    full_attn_beta: float = 1.0
    linear_attn_alpha: float = 1.0
    linear_attn_beta: float = 1.0
    mlp_alpha: float = 1.0
    mlp_beta: float = 1.0
    rms_norm_eps: float = 1e-5  # input/post-attention/final norms
    lightning_norm_eps: float = 1e-6  # the 8192-wide norm inside lightning layers (class default in the remote code)
    block_size: int = 256  # lightning prefill block; a kernel tuning choice, not a semantic one
    max_position_embeddings: int = 10_240_000
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        def require(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        require(isinstance(self.layer_types, (list, tuple)),
                f"layer_types must be a list of layer kinds, got {_short(self.layer_types)}")
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok", "block_size",
                     "max_position_embeddings", "rotary_dim"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and 1 <= value < 2**31,
                    f"{name} must be a positive integer below 2**31, got {_short(value)}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "float":
                require(isinstance(value, (int, float)) and not isinstance(value, bool)
                        and (math.isfinite(value) if isinstance(value, float) else abs(value) <= 1e300),
                        f"{f.name} must be a finite number, got {_short(value)}")
        require(self.rms_norm_eps > 0 and self.lightning_norm_eps > 0, "rms_norm_eps and lightning_norm_eps must be > 0")
        require(self.eos_token_id is None or (isinstance(self.eos_token_id, int) and not isinstance(self.eos_token_id, bool)
                                              and 0 <= self.eos_token_id < self.vocab_size),
                f"eos_token_id must be a token id in [0, vocab_size={self.vocab_size}) or null, "
                f"got {_short(self.eos_token_id)}")
        require(len(self.layer_types) == self.num_hidden_layers,
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}")
        for i, kind in enumerate(self.layer_types):
            require(isinstance(kind, str) and kind in _LAYER_TYPES,
                    f"layer_types[{i}] = {_short(kind)}; supported: {', '.join(_LAYER_TYPES)}")
        require(self.num_attention_heads % self.num_key_value_heads == 0,
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads})")
        require(self.num_experts_per_tok <= self.num_local_experts,
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_local_experts "
                f"({self.num_local_experts})")
        require(0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0,
                f"rotary_dim must be even and in (0, head_dim={self.head_dim}], got {self.rotary_dim}")
        require(self.rope_theta > 0, f"rope_theta must be positive, got {self.rope_theta}")

    # ----------------------------------------------------------------------------------------------- layer plan
    @property
    def lightning_layers(self) -> tuple[int, ...]:
        """Absolute indices of the lightning layers."""
        return tuple(i for i, t in enumerate(self.layer_types) if t == LIGHTNING)

    @property
    def softmax_layers(self) -> tuple[int, ...]:
        """Absolute indices of the softmax-attention layers."""
        return tuple(i for i, t in enumerate(self.layer_types) if t == SOFTMAX)

    def lightning_decay_rates(self, layer_idx: int) -> list[float]:
        """Decay rate ``s`` per head of lightning layer ``layer_idx`` (per-step decay ``exp(-s)``).

        ``s_h = slope_h * (1 - l / (L - 1) + 1e-5)`` with the ALiBi slopes of the MiniMax remote code
        (``_build_slope_tensor``): for H a power of two ``slope_h = 2^(-(h+1) * 8 / H)``; otherwise the slopes of
        the nearest lower power of two followed by every other slope of twice that many heads.
        """
        if self.num_hidden_layers == 1:
            factor = 1.0 + 1e-5  # (L - 1) = 0: the remote code would divide by zero; one layer is the first layer
        else:
            factor = 1.0 - layer_idx / (self.num_hidden_layers - 1) + 1e-5
        return [slope * factor for slope in alibi_slopes(self.num_attention_heads)]

    # -------------------------------------------------------------------------------------------------- state
    def state_layout(
        self, batch_size: int, max_seq_len: int, dtype: str = "bfloat16", page_size: int = 256,
        num_pages: int | None = None,
    ) -> list[dict[str, Any]]:
        """Names, shapes and dtypes of the decoding state, in the order of ``MiniMaxState.flatten``.

        Lightning layers keep an fp32 ``[B, H, D, D]`` state; softmax layers a key and a value page pool
        ``[num_pages, KVH, page_size, D]`` in the model dtype (``kernels/attention/naive.py``), which rows reach
        through the block table (``block_table_layout``). ``num_pages`` defaults to every row at full capacity
        (``batch_size * pages_per_seq(max_seq_len, page_size)``). Every entry is updated in place by the programs.
        """
        H, D, KVH = self.num_attention_heads, self.head_dim, self.num_key_value_heads
        if num_pages is None:
            num_pages = batch_size * pages_per_seq(max_seq_len, page_size)
        layout = [
            {"name": f"lightning_state.{i}", "layer": i, "shape": [batch_size, H, D, D], "dtype": "float32"}
            for i in self.lightning_layers
        ]
        for kind in ("key_cache", "value_cache"):
            layout += [
                {"name": f"{kind}.{i}", "layer": i, "shape": [num_pages, KVH, page_size, D], "dtype": dtype}
                for i in self.softmax_layers
            ]
        return layout

    # ---------------------------------------------------------------------------------------------- counting
    def num_parameters(self, active: bool = False) -> int:
        """Parameter count from the config (``active=True``: per token, without embedding and LM head)."""
        hidden, H, D, KVH = self.hidden_size, self.num_attention_heads, self.head_dim, self.num_key_value_heads
        inner = H * D
        lightning = hidden * 3 * inner + hidden * inner + inner * hidden + inner  # qkv, gate, out, norm
        softmax = hidden * inner + 2 * hidden * KVH * D + inner * hidden  # q, k, v, o
        experts = self.num_experts_per_tok if active else self.num_local_experts
        moe = hidden * self.num_local_experts + experts * 3 * hidden * self.intermediate_size
        norms = 2 * hidden
        total = sum(norms + moe + (lightning if t == LIGHTNING else softmax) for t in self.layer_types)
        if not active:
            total += 2 * self.vocab_size * hidden + hidden  # embedding, LM head, final norm
        return total

    # ------------------------------------------------------------------------------------------- conversion
    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (the engine manifest stores this); ``from_dict`` reads it back."""
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MiniMaxConfig":
        """Read a config dict: this class's own ``to_dict`` form, the official schema, or the transformers one.

        Anything malformed (wrong types, missing fields, values out of range) raises ``ConfigError`` naming it."""
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(d).__name__}")
        try:
            if "attn_type_list" in d:
                return cls._from_official(d)
            if d.get("model_type") == "minimax" or "full_attn_alpha_factor" in d or "rope_parameters" in d:
                return cls._from_transformers(d)
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(d) - known, key=str)
            if unknown:
                raise ConfigError(f"unrecognised config: fields {unknown} belong to no supported schema "
                                  "(official MiniMax, transformers 'minimax', or MiniMaxConfig.to_dict)")
            missing = [f.name for f in dataclasses.fields(cls)
                       if f.name not in d and f.default is dataclasses.MISSING]
            if missing:
                raise ConfigError(f"missing fields {missing}")
            return cls(**d)
        except ConfigError:
            raise
        except (TypeError, ValueError, ArithmeticError, KeyError, AttributeError, IndexError, RecursionError) as e:
            # a value of the wrong type deep in a schema reader (e.g. int() of a list)
            raise ConfigError(f"malformed config ({type(e).__name__}: {str(e)[:200]})") from None

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> "MiniMaxConfig":
        """Read ``<path>/config.json`` (or ``path`` itself if it is a file); ``overrides`` replace fields after."""
        file, raw = read_config_json(path)
        try:
            config = cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{file}: {e}") from e
        if not overrides:
            return config
        try:
            return dataclasses.replace(config, **overrides)
        except TypeError as e:
            raise ConfigError(f"{file}: bad override ({e})") from e

    @classmethod
    def preset(cls, name: str) -> "MiniMaxConfig":
        """A named preset: ``minimax-text-01`` (the published sizes) or ``tiny`` (for tests and demos)."""
        try:
            return PRESETS[name]
        except KeyError:
            raise ConfigError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}") from None

    # ---------------------------------------------------------------------------------- schema readers
    @classmethod
    def _common(cls, d: dict[str, Any]) -> dict[str, Any]:
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {d['hidden_act']!r} is not supported (MiniMax-01 uses 'silu')")
        if d.get("tie_word_embeddings", False):
            raise ConfigError("tie_word_embeddings = true is not supported: MiniMax-01 has an untied LM head")
        if d.get("sliding_window") is not None:
            raise ConfigError(f"sliding_window = {d['sliding_window']} is not supported (MiniMax-01 has none)")
        shared = d.get("shared_intermediate_size", 0)
        if isinstance(shared, list) and len(shared) == 1:  # the released VL-01 text_config writes [0]
            shared = shared[0]
        if shared:
            raise ConfigError(f"shared_intermediate_size = {d['shared_intermediate_size']}: a shared expert is not "
                              "supported (MiniMax-Text-01 has none)")
        if d.get("rope_scaling"):
            raise ConfigError(f"rope_scaling = {d['rope_scaling']} is not supported")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "num_local_experts", "num_experts_per_tok") if k not in d]
        if missing:
            raise ConfigError(f"missing fields {missing}")
        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        eos = d.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        return dict(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            num_local_experts=d["num_local_experts"],
            num_experts_per_tok=d["num_experts_per_tok"],
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=d.get("max_position_embeddings", 10_240_000),
            eos_token_id=eos,
        )

    @classmethod
    def _from_official(cls, d: dict[str, Any]) -> "MiniMaxConfig":
        if d.get("postnorm", True) is not True:
            raise ConfigError("postnorm = false (pre-norm residuals) is not supported: MiniMax-01 is post-norm")
        kinds = {0: LIGHTNING, 1: SOFTMAX}
        try:
            layer_types = tuple(kinds[int(t)] for t in d["attn_type_list"])
        except KeyError as e:
            raise ConfigError(f"attn_type_list holds {e.args[0]!r}; supported: 0 (lightning), 1 (softmax)") from None
        common = cls._common(d)
        return cls(
            **common,
            layer_types=layer_types,
            rotary_dim=int(d.get("rotary_dim", common["head_dim"])),
            rope_theta=float(d.get("rope_theta", 10_000_000)),
            full_attn_alpha=float(d.get("layernorm_full_attention_alpha", 1.0)),
            full_attn_beta=float(d.get("layernorm_full_attention_beta", 1.0)),
            linear_attn_alpha=float(d.get("layernorm_linear_attention_alpha", 1.0)),
            linear_attn_beta=float(d.get("layernorm_linear_attention_beta", 1.0)),
            mlp_alpha=float(d.get("layernorm_mlp_alpha", 1.0)),
            mlp_beta=float(d.get("layernorm_mlp_beta", 1.0)),
            block_size=int(d.get("block", d.get("block_size", 256))),
        )

    @classmethod
    def _from_transformers(cls, d: dict[str, Any]) -> "MiniMaxConfig":
        if d.get("postnorm", True) is not True:
            raise ConfigError("postnorm = false (pre-norm residuals) is not supported: MiniMax-01 is post-norm")
        common = cls._common(d)
        layer_types = d.get("layer_types")
        if layer_types is None:
            raise ConfigError("missing field 'layer_types'")
        rope = d.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"rope_parameters must be an object (rope_type, rope_theta, ...), got {_short(rope)}")
        rope = dict(rope)
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(f"rope_parameters.rope_type = {rope['rope_type']!r} is not supported (only 'default')")
        theta = rope.get("rope_theta", d.get("rope_theta"))
        if theta is None:
            raise ConfigError("missing rope_theta (in rope_parameters or at top level)")
        if "rotary_dim" in d:
            rotary_dim = int(d["rotary_dim"])
        else:
            factor = float(rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)))
            rotary_dim = int(round(common["head_dim"] * factor))
        return cls(
            **common,
            layer_types=tuple(layer_types),
            rotary_dim=rotary_dim,
            rope_theta=float(theta),
            full_attn_alpha=float(d.get("full_attn_alpha_factor", 1.0)),
            full_attn_beta=float(d.get("full_attn_beta_factor", 1.0)),
            linear_attn_alpha=float(d.get("linear_attn_alpha_factor", 1.0)),
            linear_attn_beta=float(d.get("linear_attn_beta_factor", 1.0)),
            mlp_alpha=float(d.get("mlp_alpha_factor", 1.0)),
            mlp_beta=float(d.get("mlp_beta_factor", 1.0)),
            block_size=int(d.get("block_size", 256)),
        )


def read_config_json(path: str | Path) -> tuple[Path, Any]:
    """``(file, parsed JSON)`` of ``<path>/config.json`` (or ``path`` itself if it is a file); ``ConfigError`` naming
    the file when it is missing, unreadable, not UTF-8 or not JSON."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"{file}: no config.json found")
    try:
        return file, json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{file}: not UTF-8 text ({e})") from e
    except OSError as e:
        raise ConfigError(f"{file}: cannot read ({e.strerror or e})") from e
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"{file}: not valid JSON ({str(e)[:200]})") from e


def _short(value: Any, limit: int = 80) -> str:
    """``repr`` of a value for a message, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def alibi_slopes(n: int) -> list[float]:
    """ALiBi slopes for ``n`` heads, as the MiniMax remote code's ``_build_slope_tensor`` builds them."""

    def power_of_2(m: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(m) - 3)))
        return [start * start**i for i in range(m)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + alibi_slopes(2 * closest)[0::2][: n - closest]


def _deepnorm_alpha(num_layers: int) -> float:
    return (2 * num_layers) ** 0.25


_TEXT01_ALPHA = _deepnorm_alpha(80)  # 3.5565588200778455, as in the released config.json

PRESETS: dict[str, MiniMaxConfig] = {
    "minimax-text-01": MiniMaxConfig(
        vocab_size=200064,
        hidden_size=6144,
        intermediate_size=9216,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=128,
        layer_types=tuple(([LIGHTNING] * 7 + [SOFTMAX]) * 10),
        num_local_experts=32,
        num_experts_per_tok=2,
        rotary_dim=64,
        rope_theta=10_000_000.0,
        full_attn_alpha=_TEXT01_ALPHA,
        linear_attn_alpha=_TEXT01_ALPHA,
        mlp_alpha=_TEXT01_ALPHA,
        max_position_embeddings=10_240_000,
        eos_token_id=200020,
    ),
    # Small enough for CPU tests: two periods of 3 lightning layers + 1 softmax layer, 6 heads (not a power of
    # two, so the general slope rule is exercised), GQA 3:1, partial RoPE on half of each head.
    "tiny": MiniMaxConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=48,
        num_hidden_layers=8,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=16,
        layer_types=tuple(([LIGHTNING] * 3 + [SOFTMAX]) * 2),
        num_local_experts=4,
        num_experts_per_tok=2,
        rotary_dim=8,
        rope_theta=10_000.0,
        full_attn_alpha=_deepnorm_alpha(8),
        linear_attn_alpha=_deepnorm_alpha(8),
        mlp_alpha=_deepnorm_alpha(8),
        block_size=16,
        max_position_embeddings=4096,
        eos_token_id=1,
    ),
}
