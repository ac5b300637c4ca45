"""Next-token choice from logits: pure functions of ``logits [B, V]`` (and a ``torch.Generator`` for sampling).

    greedy(logits)                                      -> ids [B]       argmax (lowest id among ties)
    apply_temperature(logits, t)                        -> logits / t    (t > 0)
    top_k_filter(logits, k)                             -> logits, -inf outside the k largest
    top_p_filter(logits, p)                             -> logits, -inf outside the nucleus
    probabilities(logits, temperature, top_k, top_p)    -> probs [B, V] fp32 (the distribution ``sample`` draws from)
    sample(logits, temperature, top_k, top_p, generator)-> ids [B]       greedy when temperature == 0

Definitions:
    * top-k keeps the ``k`` tokens of largest logit; among tokens tied with the k-th, the lowest ids are kept
      (exactly ``k`` tokens survive; ``k >= V`` keeps all).
    * top-p (nucleus) keeps the smallest set of most probable tokens whose total probability is >= ``p``
      (probabilities after temperature and top-k), always at least one token; ties in probability are ordered by
      id. ``p >= 1`` keeps all.
    * temperature divides the logits; filters are applied after it, in the order top-k then top-p.
Everything is computed in fp32; nothing is modified in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "SamplingParams",
    "greedy",
    "apply_temperature",
    "top_k_filter",
    "top_p_filter",
    "probabilities",
    "sample",
    "validate_sampling",
]


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. ``temperature == 0`` is greedy (top_k / top_p are then ignored)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        validate_sampling(self.temperature, self.top_k, self.top_p)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def validate_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """``ValueError`` naming the parameter when a sampling setting is out of range."""
    if not temperature >= 0.0:  # also refuses NaN
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 (or None), got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (or None), got {top_p!r}")


def _check_logits(logits: Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")


def greedy(logits: Tensor) -> Tensor:
    """``argmax`` over the vocabulary: ``[B, V] -> [B]`` int64 (the lowest id among equal maxima)."""
    _check_logits(logits)
    return logits.argmax(dim=-1)


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """``logits / temperature`` in fp32 (``temperature > 0``)."""
    if not temperature > 0.0:
        raise ValueError(f"apply_temperature needs temperature > 0, got {temperature}")
    return logits.float() / temperature


def _sorted_desc(logits: Tensor) -> tuple[Tensor, Tensor]:
    # Stable sort of the negated logits: descending by value, ties by ascending id (the documented tie rule).
    neg_sorted, order = torch.sort(-logits, dim=-1, stable=True)
    return -neg_sorted, order


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest logits of each row (ties: lowest ids), set the others to ``-inf``. ``[B, V]`` fp32."""
    _check_logits(logits)
    validate_sampling(1.0, k, None)
    logits = logits.float()
    if k >= logits.shape[-1]:
        return logits.clone()
    _, order = _sorted_desc(logits)
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order[:, :k], True)
    return logits.masked_fill(~keep, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest most-probable set with total probability >= ``p`` (at least one token); others ``-inf``."""
    _check_logits(logits)
    validate_sampling(1.0, None, p)
    logits = logits.float()
    if p >= 1.0:
        return logits.clone()
    sorted_logits, order = _sorted_desc(logits)
    probs = torch.softmax(sorted_logits, dim=-1)  # [B, V], descending
    before = torch.cumsum(probs, dim=-1) - probs  # probability mass strictly before each token
    # A token is needed while the mass before it is still < p; the first token always is (mass before it is 0).
    keep_sorted = before < p
    keep_sorted[:, 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


def probabilities(
    logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> Tensor:
    """The distribution ``sample`` draws from: ``softmax(top_p(top_k(logits / temperature)))``, ``[B, V]`` fp32.

    ``temperature == 0`` gives the one-hot distribution of ``greedy``.
    """
    _check_logits(logits)
    validate_sampling(temperature, top_k, top_p)
    if temperature == 0.0:
        return torch.nn.functional.one_hot(greedy(logits), logits.shape[-1]).float()
    scaled = apply_temperature(logits, temperature)
    if top_k is not None:
        scaled = top_k_filter(scaled, top_k)
    if top_p is not None:
        scaled = top_p_filter(scaled, top_p)
    return torch.softmax(scaled, dim=-1)


def sample(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token of each row, ``[B, V] -> [B]`` int64: greedy when ``temperature == 0``, else a draw from
    ``probabilities(...)`` with ``generator`` (same generator state and logits: same tokens)."""
    if temperature == 0.0:
        validate_sampling(temperature, top_k, top_p)
        return greedy(logits)
    probs = probabilities(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]
