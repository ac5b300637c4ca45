"""An OpenAI-compatible HTTP server over the in-flight batching scheduler (issue 13, first part).

    python -m runtime serve ENGINE_DIR --tokenizer DIR --port 8000

Endpoints (FastAPI + uvicorn): ``POST /v1/completions``, ``POST /v1/chat/completions`` (the tokenizer's chat
template), both with server-sent-event streaming (``"stream": true``); ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus text: running / waiting sequences, KV pages in use, tokens generated, requests by
outcome). A MiniMax-VL-01 engine takes images in chat messages, in the OpenAI format (content parts ``{"type":
"image_url", "image_url": {"url": "data:image/png;base64,..."}}`` beside ``{"type": "text", ...}``; data URLs only:
the server fetches nothing): each image's placeholder tokens take its place in the chat template's text
(``multimodal_prompt``) and the scheduler encodes it when the request is admitted. Requests are validated by their pydantic models (unknown fields refused) and by the scheduler (prompt
too long for the engine, ids outside the vocabulary, bad sampling values): every refusal is a 400 with an
OpenAI-style ``{"error": {"message", "type", "param"}}`` body. A client that disconnects cancels its sequence.

``AsyncEngine`` runs a ``runtime.scheduler.Scheduler`` in one background thread (the only thread that touches the
engine and the scheduler's state) and hands each request's tokens to its asyncio consumer as they are produced.
The event loop never waits for that thread: requests are validated in the caller and handed over, with
cancellations, through a queue that the thread drains before each step, and the metrics are a snapshot the thread
publishes after each step. (A lock around each step starved the event loop: Python's locks are not fair, the
stepping thread took it back at once, and on the H200 a 200-request load ran at 0.24x static batching.)
"""

import asyncio  # no ``from __future__ import annotations``: FastAPI reads the endpoints' annotations at runtime
import itertools
import json
import logging
import queue as queue_module
import threading
import time
from typing import Annotated, Any, AsyncIterator, Literal

from .engine import Engine, RequestError
from .scheduler import Scheduler

logger = logging.getLogger(__name__)

__all__ = ["AsyncEngine", "create_app", "serve"]


class AsyncEngine:
    """The scheduler in a background thread; ``generate`` is an async iterator of ``(token, finish_reason)``."""

    def __init__(self, engine: Engine, token_budget: int | None = None, prefix_cache_bytes: int = 0,
                 mixed_step: bool | None = None):
        """``mixed_step``: the scheduler's mixed steps (``runtime.scheduler.Scheduler``); None: when the engine has
        the ``mixed`` program."""
        self._threads_before: int | None = None
        if engine.device.type == "cpu":
            # The scheduler thread shares the cores with the HTTP event loop: torch's OpenMP workers spinning on
            # every core starved it (a 120-stream CPU load ran at 71 instead of 270 tokens/s). Leave it one core.
            import os

            import torch

            threads = max(1, (os.cpu_count() or 2) - 1)
            if torch.get_num_threads() > threads:
                logger.info("CPU engine: torch threads %d -> %d (one core for the server)", torch.get_num_threads(),
                            threads)
                self._threads_before = torch.get_num_threads()
                torch.set_num_threads(threads)
        self.scheduler = Scheduler(engine, token_budget, prefix_cache_bytes, mixed_step=mixed_step)
        self._inbox: queue_module.SimpleQueue = queue_module.SimpleQueue()  # ("submit", seq) / ("cancel", rid)
        self._work = threading.Event()
        self._stop = False
        self._listeners: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue, list[int]]] = {}
        self.tokens_generated = 0
        self.finished: dict[str, int] = {}
        self._metrics = self._measure()
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        """Hand the requests and cancellations that arrived to the scheduler (this thread only)."""
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue_module.Empty:
                return
            if kind == "submit":
                self.scheduler.enqueue(item)
            else:
                self.scheduler.cancel(item)

    def _loop(self) -> None:
        while not self._stop:
            self._work.wait(0.1)
            self._work.clear()  # set again by any submit / cancel that arrives from here on
            self._drain()
            if self.scheduler.idle:
                continue
            try:
                self.scheduler.step()
            except Exception:  # noqa: BLE001 - a failed step ends its requests, never the server
                logger.exception("scheduler step failed; ending the running requests")
                for seq in [*self.scheduler.rows, *self.scheduler.waiting]:
                    seq.cancelled = True
                    seq.result.finish_reason = "error"
                self.scheduler.step()
            self._publish()
            self._metrics = self._measure()
            if not self.scheduler.idle:
                self._work.set()  # more to do: step again without waiting

    def _publish(self) -> None:
        for rid, (loop, queue, sent) in list(self._listeners.items()):
            result = self.scheduler.results.get(rid)
            if result is None:
                continue  # submitted, still in the inbox
            new = result.tokens[sent[0]:]
            sent[0] += len(new)
            self.tokens_generated += len(new)
            for token in new:
                loop.call_soon_threadsafe(queue.put_nowait, (token, None))
            if result.finish_reason is not None:
                loop.call_soon_threadsafe(queue.put_nowait, (None, result.finish_reason))
                self.finished[result.finish_reason] = self.finished.get(result.finish_reason, 0) + 1
                del self._listeners[rid]
                del self.scheduler.results[rid]

    def submit(self, prompt: list[int], **params) -> tuple[int, asyncio.Queue]:
        """Queue a request (``RequestError`` if it can never be served); returns its id and token queue."""
        queue: asyncio.Queue = asyncio.Queue()
        seq = self.scheduler.prepare(prompt, **params)  # validation only: safe beside a step
        rid = seq.result.request_id
        self._listeners[rid] = (asyncio.get_running_loop(), queue, [0])  # before the thread can publish to it
        self._inbox.put(("submit", seq))
        self._work.set()
        return rid, queue

    def cancel(self, rid: int) -> None:
        self._inbox.put(("cancel", rid))
        self._work.set()

    @property
    def vision(self):
        """The engine's VL config (``MiniMaxVLConfig``), or None for a text engine (never changes)."""
        v = self.scheduler.engine.vision
        return v["config"] if v is not None else None

    async def generate(self, prompt: list[int], **params) -> AsyncIterator[tuple[int | None, str | None]]:
        """Yield ``(token, None)`` per new token, then ``(None, finish_reason)``; closing the iterator early (a
        disconnected client) cancels the request."""
        rid, queue = self.submit(prompt, **params)
        done = False
        try:
            while True:
                token, reason = await queue.get()
                if reason is not None:
                    done = True
                    yield None, reason
                    return
                yield token, None
        finally:
            if not done:
                self.cancel(rid)

    def metrics(self) -> dict[str, float]:
        """The scheduler's figures after its last step (a snapshot: never waits for the scheduler thread)."""
        return dict(self._metrics)

    def _measure(self) -> dict[str, float]:
        s, pages = self.scheduler, self.scheduler.engine.pages
        c = s.cache
        return {"running": s.running, "prefilling": len(s.rows) - s.running,
                "waiting": len(s.waiting) + self._inbox.qsize(),
                "pages_in_use": pages.row_pages, "pages_total": pages.num_pages,
                "pages_cached": c.cached_pages if c else 0, "prefix_hits": c.hits if c else 0,
                "prefix_tokens_reused": c.tokens_reused if c else 0,
                "prefix_snapshot_bytes": c.snapshot_bytes if c else 0, "preemptions": s.preemptions,
                "steps": s.steps, "mixed_steps": s.mixed_calls}

    def close(self) -> None:
        self._stop = True
        self._work.set()
        self._thread.join(timeout=5)
        if self._threads_before is not None:  # the process's torch threads as they were
            import torch

            torch.set_num_threads(self._threads_before)


# ------------------------------------------------------------------------------------------------ HTTP
class _Detokenizer:
    """The text deltas of a growing list of token ids: ``tokenizers``' ``DecodeStream`` on the tokenizer's Rust
    backend (each step decodes a few tokens and holds back a character split over ids); a tokenizer without one
    decodes the whole list at every token."""

    def __init__(self, tokenizer):
        from tokenizers.decoders import DecodeStream

        self.tokenizer, self.count = tokenizer, 0
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._stream = DecodeStream(skip_special_tokens=True)
        self._tokens: list[int] = []  # only without a backend
        self._text = ""

    def add(self, token: int) -> str:
        self.count += 1
        if self._backend is not None:
            return self._stream.step(self._backend, token) or ""
        self._tokens.append(token)
        full = self.tokenizer.decode(self._tokens, skip_special_tokens=True)
        delta, self._text = full[len(self._text):], full
        return delta


def _models():
    from pydantic import BaseModel, ConfigDict, Field

    class _Base(BaseModel):
        model_config = ConfigDict(extra="forbid")
        model: str
        max_tokens: int = Field(16, ge=1)
        temperature: float = Field(1.0, ge=0.0)
        top_p: float | None = Field(None, gt=0.0, le=1.0)
        top_k: int | None = Field(None, ge=1)  # not in OpenAI's schema; vLLM and SGLang take it as an extra
        seed: int | None = Field(None, ge=0, le=2**63 - 1)
        stop: str | list[str] | None = None
        stream: bool = False
        n: int = Field(1, ge=1, le=1)
        user: str | None = None

    class CompletionRequest(_Base):
        prompt: str | list[int]

    class TextPart(BaseModel):
        model_config = ConfigDict(extra="forbid")
        type: Literal["text"]
        text: str

    class ImageURL(BaseModel):
        model_config = ConfigDict(extra="forbid")
        url: str
        detail: Literal["auto", "low", "high"] | None = None  # accepted; MiniMax-VL-01 tiles every image alike

    class ImagePart(BaseModel):
        model_config = ConfigDict(extra="forbid")
        type: Literal["image_url"]
        image_url: ImageURL

    class Message(BaseModel):
        model_config = ConfigDict(extra="forbid")
        role: Literal["system", "user", "assistant"]
        content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]]

    class ChatRequest(_Base):
        messages: list[Message] = Field(min_length=1)

    return CompletionRequest, ChatRequest


def create_app(engine: AsyncEngine, tokenizer: Any, model_name: str):
    """The FastAPI application (module docstring). ``tokenizer``: a Hugging Face tokenizer."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    CompletionRequest, ChatRequest = _models()
    app = FastAPI(title="minimax-compiler", version="0.1")
    ids = itertools.count()
    eos = tokenizer.eos_token_id

    def error(status: int, message: str, param: str | None = None) -> JSONResponse:
        return JSONResponse(status_code=status, content={"error": {"message": message, "type": "invalid_request_error",
                                                                   "param": param, "code": None}})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return error(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", where)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "minimax-compiler"}]}

    @app.get("/metrics")
    async def metrics():
        m = engine.metrics()
        lines = [f"minimax_sequences{{state=\"{k}\"}} {m[k]}" for k in ("running", "prefilling", "waiting")]
        lines += [f"minimax_kv_pages_in_use {m['pages_in_use']}", f"minimax_kv_pages_total {m['pages_total']}",
                  f"minimax_kv_pages_cached {m['pages_cached']}",
                  f"minimax_prefix_cache_hits_total {m['prefix_hits']}",
                  f"minimax_prefix_cache_tokens_reused_total {m['prefix_tokens_reused']}",
                  f"minimax_prefix_cache_snapshot_bytes {m['prefix_snapshot_bytes']}",
                  f"minimax_preemptions_total {m['preemptions']}",
                  f"minimax_scheduler_steps_total {m['steps']}",
                  f"minimax_mixed_steps_total {m['mixed_steps']}",
                  f"minimax_generated_tokens_total {engine.tokens_generated}"]
        lines += [f"minimax_requests_total{{finish_reason=\"{k}\"}} {v}" for k, v in sorted(engine.finished.items())]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    def sampling(req) -> dict[str, Any]:
        return {"max_new_tokens": req.max_tokens, "temperature": req.temperature, "top_k": req.top_k,
                "top_p": req.top_p, "seed": req.seed, "stop_ids": [eos] if eos is not None else []}

    async def run(request: Request, req, prompt_ids: list[int], kind: str, images: list | None = None):
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{next(ids)}"
        created = int(time.time())
        start = time.perf_counter()
        try:
            stream = engine.generate(prompt_ids, **sampling(req), **({"images": images} if images else {}))
            first = await stream.__anext__()  # the request is validated when submitted
        except RequestError as e:
            return error(400, str(e), "prompt")

        async def pieces():
            """(text delta, finish_reason) as tokens arrive; stop strings cut the text and end the request."""
            detok, text, item = _Detokenizer(tokenizer), "", first
            while True:
                token, reason = item
                if token is not None and token != eos:
                    full = text + detok.add(token)
                    # a stop string wholly in ``text`` would have ended the request: search where one can end now
                    cuts = [i for s in stops if s and (i := full.find(s, max(0, len(text) - len(s) + 1))) >= 0]
                    if cuts:
                        cut = min(cuts)
                        delta, text = full[len(text):cut], full[:cut]
                        await stream.aclose()  # cancels the sequence
                        yield delta, "stop", detok.count
                        return
                    delta, text = full[len(text):], full
                    if delta:
                        yield delta, None, detok.count
                if reason is not None:
                    yield "", "stop" if reason == "stop" else ("length" if reason == "length" else reason), detok.count
                    return
                item = await stream.__anext__()

        def usage(n: int) -> dict[str, int]:
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": n, "total_tokens": len(prompt_ids) + n}

        def chunk(delta: str, reason: str | None) -> dict[str, Any]:
            if kind == "chat":
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                        "choices": [{"index": 0, "delta": {"role": "assistant", "content": delta} if delta else {},
                                     "finish_reason": reason}]}
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "text": delta, "logprobs": None, "finish_reason": reason}]}

        if req.stream:
            async def events():
                n = 0
                async for delta, reason, n in pieces():
                    if await request.is_disconnected():
                        break  # leaving the generator cancels the sequence
                    yield f"data: {json.dumps(chunk(delta, reason))}\n\n"
                yield "data: [DONE]\n\n"
                logger.info("%s: %d prompt + %d tokens in %.3fs (stream)", rid, len(prompt_ids), n,
                            time.perf_counter() - start)

            return StreamingResponse(events(), media_type="text/event-stream")
        text, reason, n = "", None, 0
        async for delta, reason, n in pieces():
            text += delta
        logger.info("%s: %d prompt + %d tokens in %.3fs", rid, len(prompt_ids), n, time.perf_counter() - start)
        body = chunk(text, reason)
        if kind == "chat":
            body.update(object="chat.completion")
            body["choices"] = [{"index": 0, "message": {"role": "assistant", "content": text},
                                "finish_reason": reason}]
        body["usage"] = usage(n)
        return body

    @app.post("/v1/completions")
    async def completions(request: Request, req: CompletionRequest):
        if req.model != model_name:
            return error(404, f"model {req.model!r} does not exist; this server serves {model_name!r}", "model")
        prompt = req.prompt if isinstance(req.prompt, list) else tokenizer.encode(req.prompt)
        return await run(request, req, list(prompt), "completion")

    @app.post("/v1/chat/completions")
    async def chat(request: Request, req: ChatRequest):
        if req.model != model_name:
            return error(404, f"model {req.model!r} does not exist; this server serves {model_name!r}", "model")
        if all(isinstance(m.content, str) for m in req.messages):
            prompt = tokenizer.apply_chat_template([m.model_dump() for m in req.messages], add_generation_prompt=True,
                                                   tokenize=True)
            if isinstance(prompt, dict) or hasattr(prompt, "input_ids"):  # BatchEncoding in some versions
                prompt = prompt["input_ids"]
            return await run(request, req, list(prompt), "chat")
        try:  # decoding and tiling images is CPU work: off the event loop
            prompt, images = await asyncio.to_thread(multimodal_prompt, req.messages, tokenizer, engine.vision)
        except ValueError as e:
            return error(400, str(e), "messages")
        return await run(request, req, prompt, "chat", images)

    return app


IMAGE_MARK = "\ue000image\ue000"  # stands for one image in the chat template's text (a private-use character)


def decode_image_url(url: str, where: str):
    """An OpenAI ``image_url`` -> an RGB PIL image. ``data:image/...;base64,...`` URLs only: this server fetches
    nothing. ``ValueError`` naming ``where`` and the problem."""
    import base64
    import binascii
    import io

    from PIL import Image, UnidentifiedImageError

    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0] if ":" in url else url[:20]
        raise ValueError(f"{where}: image URLs must be data: URLs (data:image/png;base64,...); this server fetches "
                         f"nothing ({scheme!r} given)")
    header, _, data = url[5:].partition(",")
    if not header.endswith(";base64") or not header.startswith("image/"):
        raise ValueError(f"{where}: a data URL of an image in base64 (data:image/<type>;base64,...), got "
                         f"data:{header[:40]}")
    try:
        raw = base64.b64decode(data, validate=True)
        with Image.open(io.BytesIO(raw)) as im:
            return im.convert("RGB")
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"{where}: the base64 data does not decode ({e})") from None
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"{where}: not an image PIL can read ({e})") from None


def multimodal_prompt(messages, tokenizer, vision) -> tuple[list[int], list]:
    """Chat messages whose contents are parts (text, image_url) -> (prompt ids, images in order): the chat template
    applied with a mark for each image, each mark replaced by the image's ``num_tokens`` placeholders
    (``image_token_index``; ``vision`` is the engine's ``MiniMaxVLConfig``). The images come processed, as
    ``(pixel_values, (height, width))`` pairs (``MiniMaxVLImageProcessor.for_config``), so that the caller can do
    all the CPU work in a worker thread. ``ValueError`` naming the part."""
    images, flat = [], []
    for i, m in enumerate(messages):
        if isinstance(m.content, str):
            flat.append({"role": m.role, "content": m.content})
            continue
        text = []
        for j, part in enumerate(m.content):
            if part.type == "text":
                if IMAGE_MARK in part.text:
                    raise ValueError(f"messages[{i}].content[{j}]: text holds the reserved character U+E000")
                text.append(part.text)
            else:
                if vision is None:
                    raise ValueError(f"messages[{i}].content[{j}]: this model is a text model: it takes no images")
                images.append(decode_image_url(part.image_url.url, f"messages[{i}].content[{j}].image_url"))
                text.append(IMAGE_MARK)
        flat.append({"role": m.role, "content": "".join(text)})
    rendered = tokenizer.apply_chat_template(flat, add_generation_prompt=True, tokenize=False)
    pieces = rendered.split(IMAGE_MARK)
    if len(pieces) != len(images) + 1:
        raise ValueError(f"the chat template kept {len(pieces) - 1} of the {len(images)} images' places")
    prompt: list[int] = []
    processed = []
    if images:
        from model import MiniMaxVLImageProcessor

        processor = MiniMaxVLImageProcessor.for_config(vision)
        for k, image in enumerate(images):
            try:
                out = processor([image])
            except ValueError as e:
                raise ValueError(f"image {k} of the messages: {e}") from None
            processed.append((out.pixel_values[0], tuple(out.image_sizes[0].tolist())))
    for k, piece in enumerate(pieces):
        if piece:
            prompt += tokenizer.encode(piece, add_special_tokens=False)
        if k < len(images):
            prompt += [vision.image_token_index] * vision.image_layout(images[k].height, images[k].width).num_tokens
    return prompt, processed


def serve(engine_dir: str, tokenizer_dir: str, host: str = "127.0.0.1", port: int = 8000,
          token_budget: int | None = None, model_name: str | None = None, prefix_cache_mb: int = 0) -> None:
    """Load the engine and the tokenizer, and serve until interrupted."""
    from pathlib import Path

    import uvicorn
    from transformers import AutoTokenizer

    engine = AsyncEngine(Engine.load(engine_dir), token_budget, prefix_cache_mb << 20)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    app = create_app(engine, tokenizer, model_name or Path(engine_dir).name)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        engine.close()
