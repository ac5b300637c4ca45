"""Sampling functions on fixed logits against their definitions (runtime/sampling.py)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from runtime.sampling import (
    SamplingParams,
    apply_temperature,
    greedy,
    probabilities,
    sample,
    top_k_filter,
    top_p_filter,
)

# Two rows over a vocabulary of 7 with distinct probabilities, and a row with ties.
LOGITS = torch.tensor([
    [0.3, 2.0, -1.0, 1.5, 0.0, 2.5, -3.0],
    [1.0, -0.5, 0.2, 3.0, 0.1, -2.0, 0.9],
])
TIED = torch.tensor([[1.0, 2.0, 2.0, 0.5, 2.0, -1.0, 0.0]])


def kept(filtered: torch.Tensor) -> list[set[int]]:
    return [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in filtered]


def nucleus_by_definition(logits_row: torch.Tensor, p: float) -> set[int]:
    """Smallest set (by size) with probability >= p, the most probable among equals: brute force over subsets."""
    probs = torch.softmax(logits_row.double(), -1).tolist()
    V = len(probs)
    for size in range(1, V + 1):
        best = max(itertools.combinations(range(V), size), key=lambda s: sum(probs[i] for i in s))
        if sum(probs[i] for i in best) >= p:
            return set(best)
    return set(range(V))


def test_greedy_is_argmax_lowest_id_on_ties():
    assert greedy(LOGITS).tolist() == [5, 3]
    assert greedy(TIED).tolist() == [1]


@pytest.mark.parametrize("k", [1, 2, 3, 6, 7, 50])
def test_top_k_keeps_the_k_largest(k):
    out = top_k_filter(LOGITS, k)
    for row, logits_row in zip(kept(out), LOGITS):
        expected = set(torch.argsort(logits_row, descending=True)[: min(k, 7)].tolist())
        assert row == expected
    finite = torch.isfinite(out)
    assert torch.equal(out[finite], LOGITS[finite])  # kept logits are unchanged
    assert (out[~finite] == float("-inf")).all()


def test_top_k_ties_keep_exactly_k_lowest_ids():
    assert kept(top_k_filter(TIED, 2)) == [{1, 2}]
    assert kept(top_k_filter(TIED, 3)) == [{1, 2, 4}]


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.62, 0.8, 0.9, 0.99, 0.999999])
def test_top_p_is_the_smallest_set_reaching_p(p):
    for row_logits, row_kept in zip(LOGITS, kept(top_p_filter(LOGITS, p))):
        assert row_kept == nucleus_by_definition(row_logits, p), p
        probs = torch.softmax(row_logits.double(), -1)
        assert probs[list(row_kept)].sum() >= p


def test_top_p_boundary_and_at_least_one_token():
    # probabilities exactly 0.5, 0.25, 0.125, 0.125: p = 0.75 is reached by the first two tokens
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
    assert kept(top_p_filter(logits, 0.75)) == [{0, 1}]
    assert kept(top_p_filter(logits, 0.7500001)) == [{0, 1, 2}]
    assert kept(top_p_filter(logits, 1e-9)) == [{0}]
    assert kept(top_p_filter(logits, 1.0)) == [{0, 1, 2, 3}]
    peaked = torch.tensor([[50.0, 0.0, 0.0]])
    assert kept(top_p_filter(peaked, 0.5)) == [{0}]


def test_probabilities_compose_temperature_top_k_top_p():
    t, k, p = 0.7, 4, 0.8
    probs = probabilities(LOGITS, temperature=t, top_k=k, top_p=p)
    for b in range(2):
        scaled = LOGITS[b].double() / t
        top = torch.argsort(scaled, descending=True)[:k].tolist()
        within_k = torch.full_like(scaled, float("-inf"))
        within_k[top] = scaled[top]
        nucleus = nucleus_by_definition(within_k, p)
        expected = torch.zeros(7, dtype=torch.float64)
        idx = sorted(nucleus)
        expected[idx] = torch.softmax(scaled[idx], -1)
        torch.testing.assert_close(probs[b].double(), expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(probabilities(LOGITS, temperature=0.0), torch.nn.functional.one_hot(greedy(LOGITS), 7).float())


def test_temperature_scales_logits():
    torch.testing.assert_close(apply_temperature(LOGITS, 0.5), LOGITS * 2)
    with pytest.raises(ValueError, match="temperature > 0"):
        apply_temperature(LOGITS, 0.0)


def test_seeded_sampling_is_reproducible_and_varies_with_the_seed():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.stack([sample(logits, 1.0, None, 0.95, g) for _ in range(20)])

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


def test_samples_stay_in_the_filtered_set_and_follow_its_distribution():
    g = torch.Generator().manual_seed(0)
    n = 20000
    logits = LOGITS[:1].expand(n, 7)
    draws = sample(logits, temperature=1.3, top_k=5, top_p=0.9, generator=g)
    probs = probabilities(LOGITS[:1], 1.3, 5, 0.9)[0].double()
    counts = torch.bincount(draws, minlength=7).double()
    assert counts[probs == 0].sum() == 0  # never outside the nucleus
    freq = counts / n
    # 5 standard deviations of a binomial frequency
    bound = 5 * torch.sqrt(probs * (1 - probs) / n) + 1e-12
    assert ((freq - probs).abs() <= bound).all(), (freq, probs)


def test_greedy_sample_ignores_generator_and_filters():
    assert torch.equal(sample(LOGITS, 0.0, 2, 0.5), greedy(LOGITS))


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(temperature=math.nan), "temperature must be >= 0"),
    (dict(top_k=0), "top_k must be an integer >= 1"),
    (dict(top_k=2.5), "top_k must be an integer >= 1"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
])
def test_bad_sampling_parameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{"temperature": 1.0, **kwargs})


def test_logits_must_be_two_dimensional():
    with pytest.raises(ValueError, match=r"logits must be \[B, V\]"):
        top_k_filter(torch.zeros(2, 3, 4), 1)
