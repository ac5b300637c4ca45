"""Explicit decoding state of the MiniMax model: what ``prefill`` and ``decode`` take in and give back."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import MiniMaxConfig

__all__ = ["MiniMaxState"]


@dataclass
class MiniMaxState:
    """Per-sequence state, one entry per layer that needs it (layer order, as ``config.state_layout`` lists it).

    lightning    one fp32 ``[B, H, D, D]`` tensor per lightning layer (the running ``sum exp(-s(t-u)) k_u^T v_u``)
    key_cache    one ``[B, KVH, S, D]`` tensor per softmax layer, RoPE already applied, model dtype
    value_cache  one ``[B, KVH, S, D]`` tensor per softmax layer, model dtype

    ``S`` is the longest context the state can hold. Registered as a pytree node, so ``torch.export`` takes and
    returns it as a flat list of tensors in the order of ``flatten``.
    """

    lightning: list[Tensor]
    key_cache: list[Tensor]
    value_cache: list[Tensor]

    @classmethod
    def allocate(
        cls,
        config: MiniMaxConfig,
        batch_size: int,
        max_seq_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> "MiniMaxState":
        """A zero state for ``batch_size`` sequences of at most ``max_seq_len`` tokens (``dtype``: the KV cache's)."""
        H, D, KVH = config.num_attention_heads, config.head_dim, config.num_key_value_heads
        lightning = [
            torch.zeros(batch_size, H, D, D, dtype=torch.float32, device=device) for _ in config.lightning_layers
        ]
        key_cache = [
            torch.zeros(batch_size, KVH, max_seq_len, D, dtype=dtype, device=device) for _ in config.softmax_layers
        ]
        value_cache = [torch.zeros_like(k) for k in key_cache]
        return cls(lightning, key_cache, value_cache)

    def flatten(self) -> list[Tensor]:
        """The tensors in ``config.state_layout`` order: lightning states, key caches, value caches."""
        return [*self.lightning, *self.key_cache, *self.value_cache]

    @classmethod
    def unflatten(cls, config: MiniMaxConfig, tensors: list[Tensor]) -> "MiniMaxState":
        n_lin, n_soft = len(config.lightning_layers), len(config.softmax_layers)
        if len(tensors) != n_lin + 2 * n_soft:
            raise ValueError(f"state: expected {n_lin + 2 * n_soft} tensors for this config, got {len(tensors)}")
        tensors = list(tensors)
        return cls(tensors[:n_lin], tensors[n_lin : n_lin + n_soft], tensors[n_lin + n_soft :])

    @property
    def max_seq_len(self) -> int | None:
        """Context capacity of the KV caches (``None`` for a model without softmax layers)."""
        return self.key_cache[0].shape[2] if self.key_cache else None


torch.export.register_dataclass(MiniMaxState, serialized_type_name="minimax.MiniMaxState")
