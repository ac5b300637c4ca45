"""In-flight batching (``runtime.scheduler``) on the tiny engine: sequences join and leave at every step and each
greedy request gets exactly the tokens it gets alone; cancelled and finished requests give the pool back."""

from __future__ import annotations

import pytest
import torch

from model import MiniMaxConfig, MiniMaxForCausalLM
from runtime import Engine, RequestError
from runtime.scheduler import Scheduler

V = MiniMaxConfig.preset("tiny").vocab_size


@pytest.fixture(scope="module")
def model():
    return MiniMaxForCausalLM(MiniMaxConfig.preset("tiny")).init_random_weights(seed=5, std=0.1).eval()


@pytest.fixture(params=[False, True], ids=["separate", "mixed"])
def mixed(request):
    """Every scheduler test twice: decode and prefill as separate calls, and as mixed steps (one forward)."""
    return request.param


def _engine(model, max_batch=3, num_pages=None, max_seq_len=64, mixed=False):
    return Engine.from_model(model, max_batch, 8, max_seq_len, page_size=8, num_pages=num_pages, mixed_step=mixed)


def _prompts(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, V, (n,), generator=g).tolist() for n in lengths]


def _alone(model, prompt, n):
    engine = _engine(model, max_batch=1)
    return engine.generate([prompt], max_new_tokens=n)[0, len(prompt):].tolist()


def test_greedy_requests_joining_and_leaving_equal_each_alone(model, mixed):
    """More requests than rows, prompts longer than a chunk and than the per-step budget, different lengths: the
    rows are reused as requests finish; every greedy result equals the request run alone."""
    lengths, new = [13, 3, 21, 1, 9, 30], [5, 11, 3, 7, 9, 4]
    prompts = _prompts(lengths, seed=1)
    engine = _engine(model, mixed=mixed)
    sched = Scheduler(engine, token_budget=10)
    ids = [sched.submit(p, n) for p, n in zip(prompts, new)]
    sched.run_until_idle()
    for rid, p, n in zip(ids, prompts, new):
        r = sched.result(rid)
        assert r.finish_reason == "length" and r.tokens == _alone(model, p, n), rid
    assert engine.pages.free_pages == engine.pages.num_pages and not any(engine.pages.rows)


def test_stop_ids_cancellation_and_sampling_per_request(model, mixed):
    prompts = _prompts([6, 10, 4], seed=2)
    alone = _alone(model, prompts[0], 12)
    stop = alone[4]
    engine = _engine(model, mixed=mixed)
    sched = Scheduler(engine)
    a = sched.submit(prompts[0], 12, stop_ids=[stop])
    b = sched.submit(prompts[1], 40, temperature=0.9, top_k=20, seed=3)
    c = sched.submit(prompts[2], 40)
    for _ in range(6):
        sched.step()
    sched.cancel(c)
    sched.run_until_idle()
    ra, rb, rc = sched.result(a), sched.result(b), sched.result(c)
    assert ra.finish_reason == "stop" and ra.tokens == alone[: alone.index(stop) + 1]
    assert rc.finish_reason == "cancelled" and 0 < len(rc.tokens) < 40
    assert rb.finish_reason == "length" and len(rb.tokens) == 40
    # the sampled request is reproducible by its seed, whatever ran beside it
    again = Scheduler(_engine(model, mixed=mixed))
    rid = again.submit(prompts[1], 40, temperature=0.9, top_k=20, seed=3)
    again.run_until_idle()
    assert again.result(rid).tokens == rb.tokens
    assert engine.pages.free_pages == engine.pages.num_pages


def test_pool_short_preempts_the_newest_and_it_resumes_exactly(model, mixed):
    """A pool of 6 pages of 8 tokens (one full row of 48 positions). Two 20-token prompts are admitted with 3 pages
    each (pages are taken as needed), the third waits; at position 24 both need a 4th page and the newest is
    preempted, re-prefilled later with its generated tokens: every greedy result equals the request run alone, the
    preemption is counted, and the pool ends whole."""
    engine = _engine(model, num_pages=6, max_seq_len=48, mixed=mixed)
    sched = Scheduler(engine)
    prompts = _prompts([20, 20, 5], seed=4)
    ids = [sched.submit(p, 12) for p in prompts]  # 32 positions, 4 pages each
    sched.step()
    assert len(sched.rows) == 2 and len(sched.waiting) == 1 and engine.pages.free_pages == 0
    sched.run_until_idle()
    for rid, p in zip(ids, prompts):
        assert sched.result(rid).tokens == _alone(model, p, 12), rid
    assert sched.result(ids[0]).preemptions == 0 and sched.result(ids[1]).preemptions >= 1
    assert sched.preemptions == sum(sched.result(r).preemptions for r in ids)
    assert engine.pages.free_pages == 6 and not any(engine.pages.rows)


def test_preempted_sampled_request_keeps_its_draws_and_the_prefix_cache_spares_its_prompt(model, mixed):
    """A sampled request preempted mid-way gives the tokens it gives unpreempted (its generator is kept; the
    re-prefilled context gives the same logits), and with prefix caching it resumes from its cached prompt pages."""
    prompts = _prompts([20, 17], seed=6)
    free = Scheduler(_engine(model, num_pages=12, max_seq_len=48, mixed=mixed))
    want = free.submit(prompts[1], 14, temperature=0.9, top_k=20, seed=11)
    free.run_until_idle()
    engine = _engine(model, num_pages=6, max_seq_len=48, mixed=mixed)
    sched = Scheduler(engine, prefix_cache_bytes=1 << 20)
    a = sched.submit(prompts[0], 12)
    b = sched.submit(prompts[1], 14, temperature=0.9, top_k=20, seed=11)
    sched.run_until_idle()
    assert sched.result(b).preemptions >= 1
    assert sched.result(b).tokens == free.result(want).tokens
    assert sched.result(a).tokens == _alone(model, prompts[0], 12)
    assert sched.cache.hits >= 1  # the preempted request found its own prompt's pages
    assert engine.pages.row_pages == 0


def test_impossible_requests_are_refused(model):
    engine = _engine(model, num_pages=6, max_seq_len=48)
    sched = Scheduler(engine)
    with pytest.raises(RequestError, match="reaches 50 tokens, past the engine's max_seq_len 48"):
        sched.submit([3] * 40, 10)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        sched.submit([V], 1)
    assert engine.pages.free_pages == 6
