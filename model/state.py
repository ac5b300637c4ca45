"""Explicit decoding state of the MiniMax model: what ``prefill`` and ``decode`` take and update in place.

The softmax layers' KV cache is paged (``kernels/attention/naive.py``): one pool of fixed-size pages per layer, and a
block table per sequence that lists the pages holding its positions ``0, page_size, 2 * page_size, ...``. A step
writes its tokens into the pages of their positions and reads only the positions a row holds, so its cost follows
the tokens held, not the capacity. The lightning states are per sequence, ``[B, H, D, D]`` fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import MiniMaxConfig, pages_per_seq

__all__ = ["MiniMaxState", "identity_block_table"]


def identity_block_table(batch_size: int, pages_per_row: int, device: torch.device | str = "cpu") -> Tensor:
    """The block table of a contiguous cache: row ``b`` owns pages ``b * M .. b * M + M - 1`` (int32 ``[B, M]``)."""
    return torch.arange(batch_size * pages_per_row, dtype=torch.int32, device=device).view(batch_size, pages_per_row)


@dataclass
class MiniMaxState:
    """Decoding state, one entry per layer that needs it (layer order, as ``config.state_layout`` lists it).

    lightning    one fp32 ``[B, H, D, D]`` tensor per lightning layer (the running ``sum exp(-s(t-u)) k_u^T v_u``)
    key_cache    one ``[P, KVH, page_size, D]`` page pool per softmax layer, RoPE already applied, model dtype
    value_cache  one ``[P, KVH, page_size, D]`` page pool per softmax layer, model dtype
    block_table  int32 ``[B, M]``: row b's positions ``j * page_size ..`` live in page ``block_table[b, j]`` of
                 every pool (the same table for all softmax layers); capacity of a row ``M * page_size``

    ``prefill`` and ``decode`` update the lightning states and the pools **in place** (the block table is only read).
    Registered as a pytree node; ``flatten`` gives the tensors that are updated (the programs' state inputs), the
    block table is a program input of its own.
    """

    lightning: list[Tensor]
    key_cache: list[Tensor]
    value_cache: list[Tensor]
    block_table: Tensor

    @classmethod
    def allocate(
        cls,
        config: MiniMaxConfig,
        batch_size: int,
        max_seq_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        page_size: int = 256,
        num_pages: int | None = None,
    ) -> "MiniMaxState":
        """A zero state for ``batch_size`` sequences of at most ``max_seq_len`` tokens (``dtype``: the KV cache's).

        The pools hold ``num_pages`` pages (default: every row at full capacity) and the block table is the
        identity (row b owns pages ``b * M ..``), the contiguous-cache special case; ``runtime.Engine`` allocates
        pages on demand instead.
        """
        H, D, KVH = config.num_attention_heads, config.head_dim, config.num_key_value_heads
        M = pages_per_seq(max_seq_len, page_size)
        if num_pages is None:
            num_pages = batch_size * M
        lightning = [
            torch.zeros(batch_size, H, D, D, dtype=torch.float32, device=device) for _ in config.lightning_layers
        ]
        key_cache = [
            torch.zeros(num_pages, KVH, page_size, D, dtype=dtype, device=device) for _ in config.softmax_layers
        ]
        value_cache = [torch.zeros_like(k) for k in key_cache]
        if num_pages < batch_size * M:
            raise ValueError(f"state: {num_pages} pages cannot give {batch_size} rows the {M} pages of an identity "
                             f"block table ({max_seq_len} tokens in pages of {page_size})")
        return cls(lightning, key_cache, value_cache, identity_block_table(batch_size, M, device))

    def flatten(self) -> list[Tensor]:
        """The updated tensors in ``config.state_layout`` order: lightning states, key pools, value pools."""
        return [*self.lightning, *self.key_cache, *self.value_cache]

    @classmethod
    def unflatten(cls, config: MiniMaxConfig, tensors: list[Tensor], block_table: Tensor) -> "MiniMaxState":
        n_lin, n_soft = len(config.lightning_layers), len(config.softmax_layers)
        if len(tensors) != n_lin + 2 * n_soft:
            raise ValueError(f"state: expected {n_lin + 2 * n_soft} tensors for this config, got {len(tensors)}")
        tensors = list(tensors)
        return cls(tensors[:n_lin], tensors[n_lin : n_lin + n_soft], tensors[n_lin + n_soft :], block_table)

    @property
    def page_size(self) -> int | None:
        return self.key_cache[0].shape[2] if self.key_cache else None

    @property
    def max_seq_len(self) -> int:
        """Context capacity of a row: block-table width times page size."""
        return self.block_table.shape[1] * (self.page_size or 0)

    def clone(self) -> "MiniMaxState":
        return MiniMaxState([t.clone() for t in self.lightning], [t.clone() for t in self.key_cache],
                            [t.clone() for t in self.value_cache], self.block_table.clone())


torch.export.register_dataclass(MiniMaxState, serialized_type_name="minimax.MiniMaxState")
