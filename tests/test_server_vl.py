"""The OpenAI chat API with images (``runtime.server``): MiniMax-VL-01's tiny eager engine behind the real server,
images sent as base64 data URLs in the OpenAI message format, driven by the official ``openai`` client; the
scheduler's image path against ``Engine.generate`` alone."""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="the server needs fastapi (pip install -e .[dev])")
pytest.importorskip("uvicorn", reason="the server needs uvicorn")
openai = pytest.importorskip("openai", reason="the tests drive the server with the openai client")

from PIL import Image  # noqa: E402

from model import MiniMaxVLConfig, MiniMaxVLForConditionalGeneration  # noqa: E402
from runtime import Engine  # noqa: E402
from runtime.scheduler import Scheduler  # noqa: E402
from runtime.server import AsyncEngine, create_app  # noqa: E402
from tests.utils import serving, word_tokenizer  # noqa: E402

CONFIG = MiniMaxVLConfig.preset("tiny")
V, EOS, IMAGE = CONFIG.text.vocab_size, 1, CONFIG.image_token_index
LIMITS = dict(max_batch=3, max_input_len=24, max_seq_len=400, page_size=16)


@pytest.fixture(scope="module")
def model():
    return MiniMaxVLForConditionalGeneration(CONFIG).init_random_weights(seed=3, std=0.1).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(V, EOS)


def _photo(height, width, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _placeholders(image) -> list[int]:
    return [IMAGE] * CONFIG.image_layout(image.height, image.width).num_tokens


def _alone(model, prompt, images, n):
    out = Engine.from_model(model, 1, **{k: v for k, v in LIMITS.items() if k != "max_batch"}).generate(
        [prompt], max_new_tokens=n, images=[images], eos_token_id=EOS)[0, len(prompt):].tolist()
    return out[: out.index(EOS) + 1] if EOS in out else out


def test_scheduler_with_images_equals_the_engine_alone(model):
    """Four requests through the scheduler (3 rows: one waits; images in three, chunks of 24 cutting them,
    budgets of 10 and 12 tokens a step so that image prompts are split across steps, one where a last lone
    placeholder would go through decode), each == Engine.generate alone."""
    photos = [_photo(20, 45, 0), _photo(50, 18, 1), _photo(16, 16, 2)]
    prompts = [[5, 6, *_placeholders(photos[0]), 7, *_placeholders(photos[1]), 8],
               [9, *_placeholders(photos[2]), 10, 11], [12, 13, 14, 15],
               [16, *_placeholders(photos[2])]]  # 37 tokens ending in an image: budget 12 would leave it 1 alone
    images = [[photos[0], photos[1]], [photos[2]], [], [photos[2]]]
    for budget in (10, 12, None):
        sched = Scheduler(Engine.from_model(model, **LIMITS), token_budget=budget)
        ids = [sched.submit(p, max_new_tokens=6, stop_ids=[EOS], images=im) for p, im in zip(prompts, images)]
        sched.run_until_idle()
        for rid, p, im in zip(ids, prompts, images):
            assert sched.result(rid).tokens == _alone(model, p, im, 6), (budget, rid)


def test_scheduler_refuses_images_that_do_not_fit_their_prompt(model):
    from runtime import RequestError

    sched = Scheduler(Engine.from_model(model, **LIMITS))
    photo = _photo(20, 45, 0)
    with pytest.raises(RequestError, match=r"prompt 0 holds \d+ image tokens \(id 500\) but no images"):
        sched.submit([5, *_placeholders(photo), 6], max_new_tokens=2)
    with pytest.raises(RequestError, match="image tokens beyond the 1 images"):
        sched.submit([5, *_placeholders(photo), 6, *_placeholders(photo)], max_new_tokens=2, images=[photo])
    with pytest.raises(ValueError, match="token_budget must be >= 3"):
        Scheduler(Engine.from_model(model, **LIMITS), token_budget=2)


@pytest.fixture(scope="module")
def server(model, tokenizer):
    engine = AsyncEngine(Engine.from_model(model, **LIMITS), token_budget=16, prefix_cache_bytes=1 << 20)
    with serving(create_app(engine, tokenizer, "tiny-vl")) as url:
        yield url
    engine.close()


def test_chat_with_images_equals_the_engine_alone(server, model, tokenizer):
    """OpenAI-format content parts (text, image_url with a base64 PNG): the server's tokens are the engine's for
    the chat template with each image's placeholders in its place; streamed and not; twice (the prefix cache,
    which image prompts bypass, changes nothing)."""
    client = openai.OpenAI(base_url=server + "/v1", api_key="none")
    a, b = _photo(20, 45, 4), _photo(44, 55, 5)
    messages = [{"role": "user", "content": [{"type": "text", "text": "w5 "}, {"type": "image_url",
                 "image_url": {"url": _data_url(a)}}, {"type": "text", "text": " w6 "},
                 {"type": "image_url", "image_url": {"url": _data_url(b), "detail": "high"}}]}]
    prompt = [3, 5, *_placeholders(a), 6, *_placeholders(b), 9]  # "w3 w5 <a> w6 <b> w9"
    expected = _alone(model, prompt, [a, b], 8)
    text = tokenizer.decode([t for t in expected if t != EOS])
    for _ in range(2):
        reply = client.chat.completions.create(model="tiny-vl", messages=messages, max_tokens=8, temperature=0)
        assert reply.choices[0].message.content == text
        assert reply.usage.prompt_tokens == len(prompt)
    chunks = client.chat.completions.create(model="tiny-vl", messages=messages, max_tokens=8, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    # another image gives another answer: the pixels reach the model
    other = json.loads(json.dumps(messages))
    other[0]["content"][1]["image_url"]["url"] = _data_url(_photo(20, 45, 40))
    assert client.chat.completions.create(model="tiny-vl", messages=other, max_tokens=8,
                                          temperature=0).choices[0].message.content != text


def _post(url, body) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("url, message", [
    ("https://example.com/cat.png", "image URLs must be data: URLs .* fetches nothing \\('https' given\\)"),
    ("data:image/png;base64,@@@", "the base64 data does not decode"),
    ("data:image/png;base64," + base64.b64encode(b"not a png").decode(), "not an image PIL can read"),
    ("data:text/plain;base64,aGk=", "a data URL of an image in base64"),
])
def test_bad_image_urls_get_clear_errors(server, url, message):
    import re

    status, body = _post(server, {"model": "tiny-vl", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "w5"}, {"type": "image_url", "image_url": {"url": url}}]}]})
    assert status == 400, body
    assert re.search("messages\\[0\\]\\.content\\[1\\]\\.image_url: " + message, body["error"]["message"]), body


def test_unknown_content_part_is_refused(server):
    status, body = _post(server, {"model": "tiny-vl", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "audio", "audio": "x"}]}]})
    assert status == 400 and "messages.0.content" in body["error"]["message"], body


def test_an_image_the_processor_refuses_gets_a_400(server):
    """A 1 x 3000 image rounds a side to 0 pixels in its grid: refused by the processor, named, 400."""
    thin = Image.new("RGB", (3000, 1))
    status, body = _post(server, {"model": "tiny-vl", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _data_url(thin)}}]}]})
    assert status == 400 and "image 0 of the messages" in body["error"]["message"], body
    assert "aspect ratio too extreme" in body["error"]["message"], body
