"""The OpenAI-compatible server (``runtime.server``) on the tiny eager engine with a word-level tokenizer made
here: the real server on 127.0.0.1 driven by the official ``openai`` client and by raw HTTP."""

from __future__ import annotations

import concurrent.futures
import json
import time
import urllib.error
import urllib.request

import pytest
import torch

pytest.importorskip("fastapi", reason="the server needs fastapi (pip install -e .[dev])")
pytest.importorskip("uvicorn", reason="the server needs uvicorn")
openai = pytest.importorskip("openai", reason="the tests drive the server with the openai client")

from model import MiniMaxConfig, MiniMaxForCausalLM  # noqa: E402
from runtime import Engine  # noqa: E402
from runtime.server import AsyncEngine, create_app  # noqa: E402
from tests.utils import serving, word_tokenizer  # noqa: E402

V = MiniMaxConfig.preset("tiny").vocab_size
EOS = 1


@pytest.fixture(scope="module")
def model():
    return MiniMaxForCausalLM(MiniMaxConfig.preset("tiny")).init_random_weights(seed=5, std=0.1).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(V, EOS)


@pytest.fixture(scope="module")
def server(model, tokenizer):
    # prefix caching on: every test below also checks that cached prefixes change no result
    engine = AsyncEngine(Engine.from_model(model, 3, 8, 64, page_size=8), token_budget=8, prefix_cache_bytes=1 << 20)
    with serving(create_app(engine, tokenizer, "tiny")) as url:
        yield url, engine
    engine.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none")


def _alone(model, prompt, n):
    """What the static engine generates for this prompt alone, cut after the first EOS."""
    out = Engine.from_model(model, 1, 8, 64, page_size=8).generate([prompt], max_new_tokens=n)[0, len(prompt):]
    tokens = out.tolist()
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


def _text(tokenizer, tokens):
    return tokenizer.decode([t for t in tokens if t != EOS], skip_special_tokens=True)


def test_completion_equals_the_engine_alone(client, model, tokenizer):
    prompt = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    want = _alone(model, prompt, 12)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == _text(tokenizer, want)
    assert r.usage.prompt_tokens == 10 and r.usage.completion_tokens == len(want)
    assert r.choices[0].finish_reason == ("stop" if EOS in want else "length")
    text_prompt = client.completions.create(model="tiny", prompt="w5 w6 w7 w8 w9 w10 w11 w12 w13 w14", max_tokens=12,
                                            temperature=0)
    assert text_prompt.choices[0].text == r.choices[0].text


def test_streaming_and_chat(client, model, tokenizer):
    prompt = [20, 21, 22]
    want = _text(tokenizer, _alone(model, prompt, 10))
    pieces = [c.choices[0].text for c in client.completions.create(model="tiny", prompt=prompt, max_tokens=10,
                                                                    temperature=0, stream=True)]
    assert "".join(pieces) == want and len(pieces) > 2
    messages = [{"role": "user", "content": "w30 w31"}]
    chat_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    chat_ids = chat_ids["input_ids"] if hasattr(chat_ids, "keys") else chat_ids
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    assert r.choices[0].message.content == _text(tokenizer, _alone(model, list(chat_ids), 6))
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=6, temperature=0, stream=True))
    assert streamed == r.choices[0].message.content
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_concurrent_requests_each_equal_alone(client, model, tokenizer, server):
    prompts = [[2 + i, 40 + i, 80 + i] * (1 + i % 4) for i in range(8)]
    lengths = [4, 11, 7, 15, 3, 9, 12, 5]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client.completions.create, model="tiny", prompt=p, max_tokens=n, temperature=0)
                   for p, n in zip(prompts, lengths)]
        texts = [f.result().choices[0].text for f in futures]
    for p, n, text in zip(prompts, lengths, texts):
        assert text == _text(tokenizer, _alone(model, p, n))
    _, engine = server
    for _ in range(50):  # the scheduler thread publishes the last finish just after the response
        if engine.metrics()["pages_in_use"] == 0:
            break
        time.sleep(0.02)
    assert engine.metrics()["pages_in_use"] == 0


def _post(url, body: bytes):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "JSON"),
    (json.dumps({"model": "tiny", "prompt": [5], "max_tokens": 2, "frobnicate": 1}).encode(), 400, "frobnicate"),
    (json.dumps({"model": "tiny", "prompt": [5] * 70, "max_tokens": 2}).encode(), 400, "max_seq_len 64"),
    (json.dumps({"model": "tiny", "prompt": [5], "max_tokens": 2, "temperature": -1}).encode(), 400, "temperature"),
    (json.dumps({"model": "tiny", "prompt": [V + 3], "max_tokens": 2}).encode(), 400, "outside the vocabulary"),
    (json.dumps({"model": "other", "prompt": [5], "max_tokens": 2}).encode(), 404, "does not exist"),
])
def test_malformed_requests_get_clear_errors(server, body, status, message):
    url, _ = server
    code, payload = _post(url + "/v1/completions", body)
    assert code == status and message in payload["error"]["message"], payload
    with urllib.request.urlopen(url + "/health") as r:
        assert json.loads(r.read()) == {"status": "ok"}


def test_metrics_and_stop_strings(client, server, model, tokenizer):
    url, _ = server
    prompt = [50, 51, 52, 53]
    full = _text(tokenizer, _alone(model, prompt, 10)).split(" ")
    stop = full[3]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == " ".join(full[: full.index(stop)]) + " "
    with urllib.request.urlopen(url + "/metrics") as m:
        text = m.read().decode()
    assert "minimax_kv_pages_total 24" in text and 'minimax_sequences{state="running"}' in text
    assert "minimax_generated_tokens_total" in text


def _metric(url, name):
    with urllib.request.urlopen(url + "/metrics") as m:
        return int(next(line.split()[-1] for line in m.read().decode().splitlines() if line.startswith(name + " ")))


def test_shared_prefix_is_served_from_the_prefix_cache(client, server, model, tokenizer):
    url, _ = server
    base = list(range(60, 80))  # 20 tokens: two whole pages of 8 shared
    hits = _metric(url, "minimax_prefix_cache_hits_total")
    for tail in ([90, 91], [92, 93, 94]):
        prompt = base + tail
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0)
        assert r.choices[0].text == _text(tokenizer, _alone(model, prompt, 6))
    assert _metric(url, "minimax_prefix_cache_hits_total") == hits + 1
    assert _metric(url, "minimax_prefix_cache_tokens_reused_total") >= 16
    assert _metric(url, "minimax_kv_pages_cached") >= 2


def test_incremental_detokenizer_equals_the_whole_decode_on_split_characters():
    """The stream's text deltas, each decoded from a few tokens, join to the decode of the whole list, and no delta
    holds half a character: byte-level BPE splits accented letters, CJK and emoji over several ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from runtime.server import _Detokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world", "the quick brown fox"] * 20,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    text = "héllo wörld 世界 🙂🙂 naïve the quick fox"
    ids = fast.encode(text)
    assert len(ids) > len(text.encode()) // 2  # many ids are single bytes: characters are split
    detok = _Detokenizer(fast)
    deltas = [detok.add(i) for i in ids]
    assert "".join(deltas) == fast.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_a_text_model_refuses_images(server):
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "w5"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}
    req = urllib.request.Request(server[0] + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=30)
    assert info.value.code == 400
    assert "messages[0].content[1]: this model is a text model: it takes no images" in info.value.read().decode()


def test_text_parts_equal_a_string_content(client):
    """Content given as text parts is the same prompt as the string."""
    as_parts = [{"role": "user", "content": [{"type": "text", "text": "w5 "}, {"type": "text", "text": "w6 w7"}]}]
    as_text = [{"role": "user", "content": "w5 w6 w7"}]
    a = client.chat.completions.create(model="tiny", messages=as_parts, max_tokens=6, temperature=0)
    b = client.chat.completions.create(model="tiny", messages=as_text, max_tokens=6, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


def test_a_mixed_step_engine_serves_the_same_tokens(model, tokenizer):
    """An engine with the ``mixed`` program is served with mixed steps (one forward for the running decodes and a
    prefill chunk): concurrent requests with prompts longer than the chunk get each request's tokens alone, and
    ``/metrics`` counts the mixed steps."""
    engine = AsyncEngine(Engine.from_model(model, 3, 8, 64, page_size=8, mixed_step=True), token_budget=8,
                         prefix_cache_bytes=1 << 20)
    assert engine.scheduler.mixed_step
    g = torch.Generator().manual_seed(8)
    jobs = [(torch.randint(2, V, (n,), generator=g).tolist(), k) for n, k in ((5, 14), (23, 6), (17, 9), (30, 5))]
    try:
        with serving(create_app(engine, tokenizer, "tiny")) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="none")

            def one(job):
                prompt, n = job
                return client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0)

            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(one, jobs))
            for (prompt, n), r in zip(jobs, answers):
                assert r.choices[0].text == _text(tokenizer, _alone(model, prompt, n))
            assert _metric(url, "minimax_mixed_steps_total") > 0
            assert _metric(url, "minimax_scheduler_steps_total") >= _metric(url, "minimax_mixed_steps_total")
    finally:
        engine.close()
