"""Serving under load (issue 13): the real server (``runtime.server``) on 127.0.0.1, driven over HTTP.

``--reliability N``: N requests from concurrent clients, a mix of well-formed completions (streamed and not, greedy
and sampled, different prompt and output lengths), streams the client drops after a few tokens (cancellation),
and malformed payloads (bad JSON, unknown fields, prompts past the context, bad sampling values). It passes when
the server is up at the end, every well-formed request got a complete answer, every malformed one a 4xx with an
error message, and the KV page pool is whole again (``/metrics``). Reports the counts and the wall time.

``--load N --rate R``: N streamed requests with Poisson arrivals (R per second), prompt lengths uniform in
``--prompt-range``, output lengths uniform in ``--output-range``, greedy; reports output tokens/s, time to first
token and inter-token latency (p50 / p99) and peak pages in use. The peer in the same run is static batching over
the same requests with the same engine kind: ``Engine.stream`` on batches of up to ``max_batch`` requests that have
arrived when the previous batch ends (each batch waits for its longest request).

``--concurrency N``: N streamed greedy requests sent at once; output tokens/s while all N decode together, against
the engine's own N-row decode step timed directly (``decode_ceiling``, at the same held length): the scheduler's and
the HTTP layer's overhead.

Engine: an engine folder (``--engine DIR``, with ``--tokenizer DIR``); on the GPU ``--slice LAYERS``, MiniMax-Text-01
cut to LAYERS real-width layers with random bf16 weights and AOTInductor programs compiled here (the static peer
runs a second engine on the same programs and weights); or by default the tiny preset's eager engine with a
word-level tokenizer made here (runs on the CPU).

    # GPU, the issue's run (2 real-width layers, 64 rows):
    PYTHONPATH=. python -m benchmarks.serving --slice 2 --max-batch 64 --reliability 1000 --concurrency 64 \
        --load 200 --rate 6 --prompt-range 128,8192 --output-range 16,512 --prefix-ttft 8192 --out r.json

    PYTHONPATH=. python -m benchmarks.serving --reliability 1000 --out r.json
    PYTHONPATH=. python -m benchmarks.serving --reliability 0 --load 200 --rate 20 --out r.json
    PYTHONPATH=. python -m benchmarks.serving --reliability 0 --prefix-ttft 8192 --out r.json

``--prefix-ttft L``: time to first token of an L-token prompt that shares all but its last 64 tokens with a prompt
served just before (prefix cache on, ``--prefix-cache-mb``), against an L-token prompt that shares nothing; medians
of 3 pairs. The tiny engine is then built with chunks of 256 and a context of L + 64.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import random
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from benchmarks.common import environment, write_json


def _tiny(max_batch: int, max_input_len: int = 16, max_seq_len: int = 128, mixed_step: bool = False):
    import torch  # noqa: F401

    from model import MiniMaxConfig, MiniMaxForCausalLM
    from runtime import Engine

    config = MiniMaxConfig.preset("tiny")
    if max_seq_len > config.max_position_embeddings:
        import dataclasses

        config = dataclasses.replace(config, max_position_embeddings=max_seq_len)
    model = MiniMaxForCausalLM(config).init_random_weights(seed=5, std=0.1).eval()
    return Engine.from_model(model, max_batch, max_input_len, max_seq_len, page_size=16, mixed_step=mixed_step), \
        word_tokenizer(config.vocab_size), "tiny"


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer over ``vocab_size`` ids ("<unk>" 0, "<eos>" 1, then "w2", "w3", ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def slice_engine(layers: int, max_batch: int, max_input_len: int, max_seq_len: int, workdir, mixed_step: bool = False):
    """``minimax-text-01`` cut to ``layers`` real-width layers (lightning layers, then one softmax layer), random
    bf16 weights on the GPU, AOTInductor prefill/decode compiled without weights and pointed at them
    (``benchmarks.decode.build_aoti_engine``), pages of 256 tokens, every row at full context."""
    import torch

    from benchmarks.decode import build_aoti_engine, random_model, reduced_config

    t0 = time.perf_counter()
    model = random_model(reduced_config("minimax-text-01", layers), torch.bfloat16, "cuda")
    print(f"{layers}-layer real-width model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters "
          f"in {time.perf_counter() - t0:.1f}s", flush=True)
    engine, timings = build_aoti_engine(model, max_batch, max_input_len, max_seq_len, workdir, page_size=256,
                                        mixed_step=mixed_step)
    print(f"engine built: {timings}", flush=True)
    return engine, timings


def twin(engine):
    """A second engine on the same programs (and so the same weights) with state of its own: the static peer's."""
    from runtime import Engine

    return Engine(engine.programs, engine.config, device=engine.device, state_layout=engine.state_layout,
                  max_batch=engine.max_batch, max_input_len=engine.max_input_len, max_seq_len=engine.max_seq_len,
                  paged_kv=engine.paged_kv, backend=engine.backend, dtype=engine.dtype, source=engine.source)


def decode_ceiling(engine, batch: int, held: int, steps: int = 20) -> dict[str, Any]:
    """The engine's own decode step at ``batch`` rows with ``held`` tokens each (prefilled through the engine),
    timed with CUDA events around ``steps`` back-to-back steps: the ceiling that in-flight batching at ``batch``
    concurrent sequences is held to."""
    import torch

    g = torch.Generator().manual_seed(3)
    V, dev = engine.vocab_size, engine.device
    engine.reset(batch)
    pos = 0
    while pos < held:
        take = min(engine.max_input_len, held - pos)
        if take < 2:
            break
        ids = torch.randint(2, V, (batch, take), generator=g).to(dev)
        engine.prefill(ids, torch.full((batch,), pos, dtype=torch.long, device=dev), [pos] * batch)
        pos += take
    tok = torch.randint(2, V, (batch, 1), generator=g).to(dev)

    def run(n, start):
        for i in range(n):
            p = start + i
            engine.decode(tok, torch.full((batch,), p, dtype=torch.long, device=dev), [p] * batch)

    run(3, pos)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run(steps, pos + 3)
        b.record()
        b.synchronize()
        ms = a.elapsed_time(b) / steps
    else:
        t0 = time.perf_counter()
        run(steps, pos + 3)
        ms = (time.perf_counter() - t0) * 1e3 / steps
    engine.reset(1)
    return {"batch": batch, "held": pos, "step_ms": ms, "tokens_per_s": batch / (ms * 1e-3)}


def concurrency(url: str, name: str, vocab: int, n: int, prompt_len: int, max_tokens: int, seed: int) -> dict:
    """``n`` streamed greedy requests sent at once (``prompt_len`` tokens, ``max_tokens`` each): output tokens/s
    in the window where all ``n`` decode together (after the last first token, before the first last token)."""
    import multiprocessing

    rng = random.Random(seed)
    jobs = [{"arrival": 0.0, "prompt": [rng.randrange(2, vocab) for _ in range(prompt_len)], "max_tokens": max_tokens}
            for _ in range(n)]
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        results = pool.apply(_client_load, (url, name, jobs))
    tokens = [t[:-1] for _, t in results]  # the last event of each stream is its finish chunk, no token
    start = max(t[0] for t in tokens)
    end = min(t[-1] for t in tokens)
    inside = sum(1 for t in tokens for x in t if start <= x <= end)
    return {"requests": n, "prompt_tokens": prompt_len, "max_tokens": max_tokens, "window_s": end - start,
            "tokens_in_window": inside, "tokens_per_s": inside / (end - start) if end > start else float("nan"),
            "complete": all(len(t) == max_tokens for t in tokens)}


def start_server(engine, tokenizer, name: str, token_budget: int | None, prefix_cache_mb: int = 1024,
                 mixed_step: bool | None = None):
    import uvicorn

    from runtime.server import AsyncEngine, create_app

    async_engine = AsyncEngine(engine, token_budget, prefix_cache_mb << 20, mixed_step=mixed_step)
    app = create_app(async_engine, tokenizer, name)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(400):
        if server.started:
            break
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, thread, async_engine


def _post(url: str, body: bytes, timeout: float = 120.0) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _stream_and_drop(url: str, body: dict, keep: int) -> int:
    """Read ``keep`` SSE events of a streamed completion, then close the connection (a client that goes away)."""
    req = urllib.request.Request(url, data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    seen = 0
    with urllib.request.urlopen(req, timeout=120) as r:
        for line in r:
            if line.startswith(b"data: "):
                seen += 1
                if seen >= keep:
                    break
    return seen


def reliability(url: str, name: str, vocab: int, n: int, seed: int, workers: int, max_seq_len: int) -> dict[str, Any]:
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        kind = rng.choices(["ok", "ok_stream", "drop", "malformed"], weights=[5, 2, 2, 1])[0]
        prompt = [rng.randrange(2, vocab) for _ in range(rng.randint(1, 60))]
        body = {"model": name, "prompt": prompt, "max_tokens": rng.randint(1, 40),
                "temperature": rng.choice([0.0, 0.0, 0.8]), "seed": rng.randrange(1 << 30)}
        if kind == "malformed":
            bad = rng.choice([b"{not json", json.dumps({**body, "frobnicate": 1}).encode(),
                              json.dumps({**body, "prompt": [5] * (max_seq_len + 1)}).encode(),
                              json.dumps({**body, "temperature": -1}).encode(),
                              json.dumps({**body, "prompt": [vocab + 7]}).encode()])
            jobs.append((kind, bad))
        else:
            jobs.append((kind, body))

    def run(job):
        kind, body = job
        if kind == "malformed":
            code, payload = _post(url + "/v1/completions", body)
            return kind, 400 <= code < 500 and bool(payload.get("error", {}).get("message"))
        if kind == "drop":
            return kind, _stream_and_drop(url + "/v1/completions", body, keep=2) >= 1
        if kind == "ok_stream":
            req = urllib.request.Request(url + "/v1/completions", data=json.dumps({**body, "stream": True}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
            with urllib.request.urlopen(req, timeout=300) as r:
                events = [line for line in r if line.startswith(b"data: ")]
            finished = [json.loads(e[6:])["choices"][0]["finish_reason"] for e in events[:-1]]
            return kind, events[-1].strip() == b"data: [DONE]" and finished[-1] in ("stop", "length")
        code, payload = _post(url + "/v1/completions", json.dumps(body).encode())
        ok = code == 200 and payload["choices"][0]["finish_reason"] in ("stop", "length") and \
            payload["usage"]["completion_tokens"] <= body["max_tokens"]
        return kind, ok

    start = time.perf_counter()
    counts: dict[str, list[int]] = {}
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for kind, ok in pool.map(run, jobs):
            counts.setdefault(kind, [0, 0])[0 if ok else 1] += 1
    wall = time.perf_counter() - start
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        health = json.loads(r.read())
    pages = None
    for _ in range(100):  # dropped streams are cancelled at the scheduler's next step
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            metrics = r.read().decode()
        pages = int(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("minimax_kv_pages_in_use")))
        if pages == 0:
            break
        time.sleep(0.1)
    passed = health == {"status": "ok"} and pages == 0 and all(bad == 0 for _, bad in counts.values())
    return {"requests": n, "wall_s": wall, "by_kind": {k: {"ok": v[0], "failed": v[1]} for k, v in counts.items()},
            "health": health, "pages_in_use_after": pages, "passed": passed, "metrics_after": metrics}


def _first_token_s(url: str, name: str, prompt: list[int]) -> float:
    """Seconds from sending a streamed one-token completion to its first event."""
    body = {"model": name, "prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": True}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if line.startswith(b"data: {"):
                first = time.perf_counter() - t0
                break
        for _ in r:  # read to the end of the stream
            pass
    return first


def _metric(url: str, name: str) -> int:
    with urllib.request.urlopen(url + "/metrics") as m:
        return int(next(line.split()[-1] for line in m.read().decode().splitlines() if line.startswith(name + " ")))


def prefix_ttft(url: str, name: str, vocab: int, length: int, seed: int, repeats: int = 3) -> dict[str, Any]:
    """Time to first token of a ``length``-token prompt sharing all but its last 64 tokens with a cached one,
    against a prompt of the same length that shares nothing (medians of ``repeats`` fresh pairs)."""
    rng = random.Random(seed)
    rand = lambda n: [rng.randrange(2, vocab) for _ in range(n)]  # noqa: E731
    cached, uncached, reused = [], [], []
    for _ in range(repeats):
        base = rand(length)
        _first_token_s(url, name, base)  # puts the prefix into the cache
        uncached.append(_first_token_s(url, name, rand(length)))
        before = _metric(url, "minimax_prefix_cache_tokens_reused_total")
        cached.append(_first_token_s(url, name, base[:-64] + rand(64)))
        reused.append(_metric(url, "minimax_prefix_cache_tokens_reused_total") - before)
    c, u = sorted(cached)[len(cached) // 2], sorted(uncached)[len(uncached) // 2]
    return {"prompt_tokens": length, "shared_tokens": length - 64, "ttft_uncached_s": u, "ttft_cached_s": c,
            "ratio": c / u, "tokens_reused": reused, "all_cached_s": cached, "all_uncached_s": uncached}


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p99": float("nan")}
    v = sorted(values)
    return {"p50": v[len(v) // 2], "p99": v[min(len(v) - 1, int(0.99 * len(v)))]}


def make_load(n: int, rate: float, vocab: int, prompt_range, output_range, seed: int) -> list[dict]:
    rng = random.Random(seed)
    t, jobs = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        jobs.append({"arrival": t, "prompt": [rng.randrange(2, vocab) for _ in range(rng.randint(*prompt_range))],
                     "max_tokens": rng.randint(*output_range)})
    return jobs


def _client_load(url: str, name: str, jobs: list[dict]) -> list[tuple[float, list[float]]]:
    """In a process of its own (so that 100+ client threads do not share the server's interpreter lock): send
    ``jobs`` at their arrival times as streamed requests; per request its send time and event times (relative)."""
    t0 = time.perf_counter()

    def one(job):
        delay = job["arrival"] - (time.perf_counter() - t0)
        if delay > 0:
            time.sleep(delay)
        sent = time.perf_counter() - t0
        body = {"model": name, "prompt": job["prompt"], "max_tokens": job["max_tokens"], "temperature": 0,
                "stream": True}
        req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        times = []
        with urllib.request.urlopen(req, timeout=600) as r:
            for line in r:
                if line.startswith(b"data: {"):
                    times.append(time.perf_counter() - t0)
        return sent, times

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(one, jobs))


def load_server(url: str, name: str, jobs: list[dict], async_engine) -> dict[str, Any]:
    """The load against the server, clients in a child process; TTFT, ITL, tokens/s, peak pages in use."""
    import multiprocessing

    peak = [0]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], async_engine.metrics()["pages_in_use"])
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        results = pool.apply(_client_load, (url, name, jobs))
    stop.set()
    end = max(t[-1] for _, t in results if t)
    tokens = sum(len(t) for _, t in results)  # one event per token with text (the last may carry only a reason)
    return {"output_tokens_per_s": tokens / end, "ttft_s": _percentiles([t[0] - s for s, t in results if t]),
            "itl_s": _percentiles([b - a for _, t in results for a, b in zip(t, t[1:])]), "wall_s": end,
            "peak_pages_in_use": peak[0]}


def load_static(engine, jobs: list[dict]) -> dict[str, Any]:
    """The same arrivals served by static batches of ``engine.max_batch`` (``Engine.stream``), timed for real."""
    t0 = time.perf_counter()
    pending, ttft, itl, tokens = list(jobs), [], [], 0
    while pending:
        now = time.perf_counter() - t0
        if pending[0]["arrival"] > now:
            time.sleep(pending[0]["arrival"] - now)
            now = time.perf_counter() - t0
        batch = [j for j in pending if j["arrival"] <= now][: engine.max_batch]
        pending = pending[len(batch):]
        last = None
        for step in engine.stream([j["prompt"] for j in batch], max_new_tokens=max(j["max_tokens"] for j in batch)):
            t = time.perf_counter() - t0
            if last is None:
                ttft += [t - j["arrival"] for j in batch]
            else:
                itl += [t - last] * len(batch)
            last = t
        tokens += sum(j["max_tokens"] for j in batch)  # what the requests asked for (the rest is wasted work)
    wall = time.perf_counter() - t0
    return {"output_tokens_per_s": tokens / wall, "ttft_s": _percentiles(ttft), "itl_s": _percentiles(itl),
            "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reliability", type=int, default=1000, metavar="N", help="requests of the reliability run")
    p.add_argument("--engine", default=None, help="engine folder (default: the tiny eager engine)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (with --engine)")
    p.add_argument("--max-batch", type=int, default=4, help="rows of the tiny engine (default 4)")
    p.add_argument("--workers", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--load", type=int, default=0, metavar="N", help="requests of the load run (0: none)")
    p.add_argument("--rate", type=float, default=20.0, help="arrivals per second of the load run")
    p.add_argument("--prompt-range", type=lambda s: tuple(int(x) for x in s.split(",")), default=(8, 96))
    p.add_argument("--output-range", type=lambda s: tuple(int(x) for x in s.split(",")), default=(4, 24))
    p.add_argument("--prefix-ttft", type=int, default=0, metavar="TOKENS",
                   help="time to first token of a TOKENS-long prompt sharing all but 64 tokens with a cached one, "
                        "against an uncached one (0: not run)")
    p.add_argument("--prefix-cache-mb", type=int, default=1024, help="the server's prefix-cache budget (0: off)")
    p.add_argument("--token-budget", type=int, default=None,
                   help="the server scheduler's tokens per step (default: max_batch x the prefill chunk)")
    p.add_argument("--slice", type=int, default=0, metavar="LAYERS",
                   help="GPU: serve minimax-text-01 cut to LAYERS real-width layers (random bf16 weights, AOTInductor "
                        "programs), --max-batch rows, --chunk-size prefill chunks, --max-seq-len context")
    p.add_argument("--chunk-size", type=int, default=2048, help="prefill chunk of the --slice engine (default 2048)")
    p.add_argument("--max-seq-len", type=int, default=8192 + 512, help="context of the --slice engine (default 8704)")
    p.add_argument("--concurrency", type=int, default=0, metavar="N",
                   help="N streamed requests at once: decode tokens/s with N sequences running, against the engine's "
                        "own N-row decode step (0: not run)")
    p.add_argument("--concurrency-prompt", type=int, default=1024, help="prompt tokens of the --concurrency requests")
    p.add_argument("--concurrency-tokens", type=int, default=256, help="output tokens of the --concurrency requests")
    p.add_argument("--mixed-step", action="store_true",
                   help="build the engine's 'mixed' program (--slice, tiny): the server's steps run a decode step and "
                        "a prefill chunk in one forward; the load then runs twice, separate calls first (same run)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.mixed_step and args.engine:
        p.error("--mixed-step builds the engine's mixed program: with --slice or the tiny engine, not --engine "
                "(an engine folder built with build.py --mixed-step uses it by itself)")
    static_engine = None
    if args.slice:
        import tempfile
        from pathlib import Path

        workdir = tempfile.mkdtemp(prefix="serving_slice_")
        engine, timings = slice_engine(args.slice, args.max_batch, args.chunk_size, args.max_seq_len, Path(workdir),
                                       mixed_step=args.mixed_step)
        static_engine = twin(engine)
        tokenizer, name = word_tokenizer(engine.vocab_size), f"minimax-text-01-{args.slice}-layers"
    elif args.engine:
        from pathlib import Path

        from transformers import AutoTokenizer

        from runtime import Engine

        engine, tokenizer, name = Engine.load(args.engine), AutoTokenizer.from_pretrained(args.tokenizer), \
            Path(args.engine).name
    elif args.prefix_ttft:
        engine, tokenizer, name = _tiny(args.max_batch, 256, args.prefix_ttft + 64, mixed_step=args.mixed_step)
    else:
        engine, tokenizer, name = _tiny(args.max_batch, mixed_step=args.mixed_step)
    vocab = engine.vocab_size
    payload: dict[str, Any] = {"environment": environment(),
                               "command": "PYTHONPATH=. python -m benchmarks.serving " + " ".join(argv or sys.argv[1:])}
    if args.slice:
        payload["slice"] = {"layers": args.slice, "max_batch": engine.max_batch, "chunk": engine.max_input_len,
                            "max_seq_len": engine.max_seq_len, "paged_kv": engine.paged_kv, "build_s": timings}
    if args.concurrency:  # the ceiling first, on the peer's engine (the server's scheduler owns the other)
        static_engine = static_engine or Engine_like(engine, args)
        held = args.concurrency_prompt + args.concurrency_tokens // 2
        payload["decode_ceiling"] = decode_ceiling(static_engine, args.concurrency, held)
        print("decode step ceiling:", json.dumps(payload["decode_ceiling"]), flush=True)
    jobs = make_load(args.load, args.rate, vocab, args.prompt_range, args.output_range, args.seed) if args.load else []
    if jobs:  # the static peer first, on its own engine of the same kind (the server's scheduler owns the other)
        static_engine = static_engine or Engine_like(engine, args)
        payload["static"] = load_static(static_engine, jobs)
        print("static batching:", json.dumps(payload["static"]), flush=True)
    if jobs and args.mixed_step:  # the same load with separate prefill / decode calls, on the same engine
        url, server, thread, async_engine = start_server(engine, tokenizer, name, args.token_budget,
                                                         args.prefix_cache_mb, mixed_step=False)
        try:
            payload["in_flight_separate"] = load_server(url, name, jobs, async_engine)
        finally:
            server.should_exit = True
            thread.join(timeout=10)
            async_engine.close()
        print("in-flight batching, separate calls (server):", json.dumps(payload["in_flight_separate"]), flush=True)
        payload["throughput_ratio_separate"] = (payload["in_flight_separate"]["output_tokens_per_s"]
                                                / payload["static"]["output_tokens_per_s"])
    url, server, thread, async_engine = start_server(engine, tokenizer, name, args.token_budget,
                                                     args.prefix_cache_mb)
    try:
        if args.reliability:
            payload["reliability"] = reliability(url, name, vocab, args.reliability, args.seed, args.workers,
                                                 engine.max_seq_len)
            print(json.dumps({k: v for k, v in payload["reliability"].items() if k != "metrics_after"}, indent=1),
                  flush=True)
        if args.prefix_ttft:
            payload["prefix_ttft"] = prefix_ttft(url, name, vocab, args.prefix_ttft, args.seed)
            print("prefix cache, time to first token:", json.dumps(payload["prefix_ttft"]), flush=True)
        if args.concurrency:
            c = payload["concurrency"] = concurrency(url, name, vocab, args.concurrency, args.concurrency_prompt,
                                                     args.concurrency_tokens, args.seed)
            c["ratio_to_ceiling"] = c["tokens_per_s"] / payload["decode_ceiling"]["tokens_per_s"]
            print(f"{args.concurrency} concurrent sequences:", json.dumps(c), flush=True)
        if jobs:
            before = async_engine.scheduler.mixed_calls
            payload["in_flight"] = load_server(url, name, jobs, async_engine)
            payload["in_flight"]["mixed_steps"] = async_engine.scheduler.mixed_step
            payload["in_flight"]["mixed_calls"] = async_engine.scheduler.mixed_calls - before
            print("in-flight batching (server):", json.dumps(payload["in_flight"]), flush=True)
            payload["throughput_ratio"] = (payload["in_flight"]["output_tokens_per_s"]
                                           / payload["static"]["output_tokens_per_s"])
            print(f"throughput in-flight / static: {payload['throughput_ratio']:.2f}x", flush=True)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        async_engine.close()
    write_json(args.out, payload)
    return 0 if payload.get("reliability", {"passed": True})["passed"] else 1


def Engine_like(engine, args):
    """A second engine of the same kind for the static peer."""
    from runtime import Engine

    if args.engine:
        return Engine.load(args.engine)
    return _tiny(args.max_batch, mixed_step=args.mixed_step)[0]


if __name__ == "__main__":
    sys.exit(main())
