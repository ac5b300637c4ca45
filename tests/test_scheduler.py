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


def _engine(model, max_batch=3, num_pages=None, max_seq_len=64):
    return Engine.from_model(model, max_batch, 8, max_seq_len, page_size=8, num_pages=num_pages)


def _prompts(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, V, (n,), generator=g).tolist() for n in lengths]


def _alone(model, prompt, n):
    engine = _engine(model, max_batch=1)
    return engine.generate([prompt], max_new_tokens=n)[0, len(prompt):].tolist()


def test_greedy_requests_joining_and_leaving_equal_each_alone(model):
    """More requests than rows, prompts longer than a chunk and than the per-step budget, different lengths: the
    rows are reused as requests finish; every greedy result equals the request run alone."""
    lengths, new = [13, 3, 21, 1, 9, 30], [5, 11, 3, 7, 9, 4]
    prompts = _prompts(lengths, seed=1)
    engine = _engine(model)
    sched = Scheduler(engine, token_budget=10)
    ids = [sched.submit(p, n) for p, n in zip(prompts, new)]
    sched.run_until_idle()
    for rid, p, n in zip(ids, prompts, new):
        r = sched.result(rid)
        assert r.finish_reason == "length" and r.tokens == _alone(model, p, n), rid
    assert engine.pages.free_pages == engine.pages.num_pages and not any(engine.pages.rows)


def test_stop_ids_cancellation_and_sampling_per_request(model):
    prompts = _prompts([6, 10, 4], seed=2)
    alone = _alone(model, prompts[0], 12)
    stop = alone[4]
    engine = _engine(model)
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
    again = Scheduler(_engine(model))
    rid = again.submit(prompts[1], 40, temperature=0.9, top_k=20, seed=3)
    again.run_until_idle()
    assert again.result(rid).tokens == rb.tokens
    assert engine.pages.free_pages == engine.pages.num_pages


def test_requests_wait_for_pages_and_impossible_ones_are_refused(model):
    """A pool of 6 pages (one full row of 48 positions): requests queue until pages free, in order; one past the
    context is refused at submit; the pool ends whole."""
    engine = _engine(model, num_pages=6, max_seq_len=48)
    sched = Scheduler(engine)
    prompts = _prompts([20, 20, 5], seed=4)
    ids = [sched.submit(p, 12) for p in prompts]  # 4 pages each: only one fits at a time
    sched.step()
    assert len(sched.rows) == 1 and len(sched.waiting) == 2
    sched.run_until_idle()
    for rid, p in zip(ids, prompts):
        assert sched.result(rid).tokens == _alone(model, p, 12)
    with pytest.raises(RequestError, match="reaches 50 tokens, past the engine's max_seq_len 48"):
        sched.submit([3] * 40, 10)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        sched.submit([V], 1)
    assert engine.pages.free_pages == 6
