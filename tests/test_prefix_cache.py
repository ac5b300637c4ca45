"""Prefix caching for the hybrid model (``runtime/prefix_cache.py`` through ``runtime.scheduler``), on the tiny
model: requests sharing a prompt prefix share its KV pages and resume from a lightning snapshot, with the same
greedy tokens as without the cache; snapshots are evicted under their memory budget, cached pages when the pool
needs them; the pool is whole once the cache is cleared."""

from __future__ import annotations

import pytest
import torch

from model import MiniMaxConfig, MiniMaxForCausalLM
from runtime import Engine
from runtime.scheduler import Scheduler

V = MiniMaxConfig.preset("tiny").vocab_size
PS = 8  # page size of these engines


@pytest.fixture(scope="module")
def model():
    return MiniMaxForCausalLM(MiniMaxConfig.preset("tiny")).init_random_weights(seed=11, std=0.1).eval()


def _engine(model, max_batch=3, num_pages=None, max_seq_len=96):
    return Engine.from_model(model, max_batch, 8, max_seq_len, page_size=PS, num_pages=num_pages)


def _tokens(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, V, (n,), generator=g).tolist()


def _alone(model, prompt, n):
    return _engine(model, max_batch=1).generate([prompt], max_new_tokens=n)[0, len(prompt):].tolist()


def _snapshot_bytes(model):
    c = model.config
    return len(c.lightning_layers) * c.num_attention_heads * c.head_dim * c.head_dim * 4


def test_shared_prefix_resumes_from_the_cache_with_the_same_tokens(model):
    shared = _tokens(3 * PS + 5, seed=1)  # 29 tokens: 3 whole pages + 5
    a, b = shared + _tokens(6, seed=2), shared + _tokens(9, seed=3)
    engine = _engine(model)
    sched = Scheduler(engine, token_budget=16, prefix_cache_bytes=10 * _snapshot_bytes(model))
    ra = sched.submit(a, 7)
    sched.run_until_idle()
    assert sched.cache.hits == 0 and sched.cache.cached_pages >= 3
    pages_a = list(sched.cache.lookup(b).pages)
    rb = sched.submit(b, 7)
    sched.step()  # admitted: resumed after the 3 shared pages, which it reads from the cache
    row = next(i for i, s in enumerate(sched.rows) if s.result.request_id == rb)
    assert engine.pages.rows[row][:3] == pages_a and sched.rows[row].prefilled >= 3 * PS
    sched.run_until_idle()
    assert sched.cache.hits == 1 and sched.cache.tokens_reused == 3 * PS
    assert sched.result(ra).tokens == _alone(model, a, 7)
    assert sched.result(rb).tokens == _alone(model, b, 7)
    # the same prompt again: the longest cached prefix shorter than the prompt (its own pages, up to 32 tokens)
    rc = sched.submit(b, 5)
    sched.run_until_idle()
    assert sched.cache.hits == 2 and sched.result(rc).tokens == _alone(model, b, 5)
    assert engine.pages.row_pages == 0
    sched.cache.clear()
    assert engine.pages.free_pages == engine.pages.num_pages and sched.cache.snapshot_bytes == 0


def test_concurrent_requests_with_shared_prefixes_equal_each_alone(model):
    """Requests arriving together and later, sharing prefixes of different lengths (some shorter than a page,
    some identical), more requests than rows: every greedy result equals the request alone."""
    base = _tokens(5 * PS, seed=4)
    prompts = [base[:2 * PS + 3] + _tokens(4, seed=5), base + _tokens(3, seed=6), base[:PS - 2] + _tokens(11, 7),
               base + _tokens(3, seed=6), base[:4 * PS] + _tokens(2, seed=8), _tokens(19, seed=9)]
    new = [5, 4, 6, 4, 7, 3]
    engine = _engine(model)
    sched = Scheduler(engine, token_budget=12, prefix_cache_bytes=6 * _snapshot_bytes(model))
    ids = [sched.submit(p, n) for p, n in zip(prompts[:3], new[:3])]
    for _ in range(4):
        sched.step()
    ids += [sched.submit(p, n) for p, n in zip(prompts[3:], new[3:])]
    sched.run_until_idle()
    assert sched.cache.hits >= 2
    for rid, p, n in zip(ids, prompts, new):
        assert sched.result(rid).tokens == _alone(model, p, n), rid
    sched.cache.clear()
    assert engine.pages.free_pages == engine.pages.num_pages


def test_snapshot_budget_and_page_pressure_evict_least_recently_used(model):
    """A budget of one snapshot keeps only the latest prefix's; a pool too small for the next request takes the
    cache's unused pages back; results stay exact throughout."""
    engine = _engine(model, max_batch=2, num_pages=9, max_seq_len=64)
    one = _snapshot_bytes(model)
    sched = Scheduler(engine, token_budget=16, prefix_cache_bytes=one)
    p1, p2 = _tokens(2 * PS + 3, seed=10), _tokens(2 * PS + 3, seed=11)
    for p in (p1, p2):
        sched.submit(p, 4)
        sched.run_until_idle()
    assert sched.cache.snapshot_bytes <= one
    assert sched.cache.lookup(p1 + [5]) is None and sched.cache.lookup(p2 + [5]) is not None
    cached = sched.cache.cached_pages
    assert cached > 0 and engine.pages.free_pages == engine.pages.num_pages - cached
    big = _tokens(6 * PS + 1, seed=12)  # 49 prompt tokens + 7 fed back: 56 positions, 7 pages > the free pages
    need, free = engine.pages.pages_for(len(big) + 8 - 1), engine.pages.free_pages
    assert need > free
    rid = sched.submit(big, 8)
    sched.run_until_idle()
    assert sched.result(rid).tokens == _alone(model, big, 8) and sched.result(rid).preemptions == 0
    # the cache gave the difference back as the pages were taken (least recently used first: p1's)
    assert sched.cache.evicted_pages >= need - free
    assert sched.cache.lookup(p1 + [5]) is None
    rid = sched.submit(p2 + [7, 8, 9], 4)
    sched.run_until_idle()
    assert sched.result(rid).tokens == _alone(model, p2 + [7, 8, 9], 4)
    sched.cache.clear()
    assert engine.pages.free_pages == engine.pages.num_pages
    assert all(r == 0 for r in engine.pages.refs)


def test_cache_off_keeps_chunks_and_pool_as_before(model):
    engine = _engine(model)
    sched = Scheduler(engine, token_budget=16)
    p = _tokens(3 * PS + 5, seed=13)
    sched.submit(p, 3)
    sched.run_until_idle()
    assert sched.cache is None and engine.pages.free_pages == engine.pages.num_pages


def test_every_prompt_leaves_a_snapshot_at_its_last_page_boundary(model):
    """Chunks of 32 tokens over pages of 8: a 48-token prompt is prefilled as 32 + 8 + 8 (not 32 + 16), so a prompt
    that changes only its last 3 tokens resumes at 40, not at the chunk boundary 32; a 20-token prompt admitted
    with another (the batched first chunks) leaves one at 16. Greedy results are those of the request alone."""
    engine = Engine.from_model(model, 2, 32, 96, page_size=PS)
    sched = Scheduler(engine, prefix_cache_bytes=20 * _snapshot_bytes(model))
    a = _tokens(6 * PS, seed=30)
    b = a[:-3] + _tokens(3, seed=31)
    ra = sched.submit(a, 4)
    sched.run_until_idle()
    assert sched.cache.lookup(b).length == 5 * PS
    rb = sched.submit(b, 4)
    sched.run_until_idle()
    assert sched.cache.tokens_reused == 5 * PS
    c, d = _tokens(20, seed=32), _tokens(11, seed=33)
    rc, rd = sched.submit(c, 4), sched.submit(d, 4)
    sched.run_until_idle()
    assert sched.cache.lookup(c[:17] + [5]).length == 2 * PS
    for rid, p in ((ra, a), (rb, b), (rc, c), (rd, d)):
        assert sched.result(rid).tokens == _alone(model, p, 4), rid
