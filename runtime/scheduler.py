"""In-flight batching over an engine's paged cache: requests join and leave at every step (issue 13, first part).

    sched = Scheduler(engine, token_budget=512)
    a = sched.submit([5, 6, 7], max_new_tokens=16)                 # -> request id; validated here (RequestError)
    b = sched.submit(prompt_b, max_new_tokens=8, temperature=0.7, seed=1)
    while sched.step(): ...                                        # or sched.run_until_idle()
    sched.result(a).tokens, sched.result(b).finish_reason          # "length" | "stop" | "cancelled"

Slots are the rows of the engine's state buffers (``max_batch`` of them). The rows are kept compact: running
sequences (prompt done, decoding) are rows ``0..R-1`` and sequences still prefilling follow them, so one decode
step runs the decode program on rows ``0..R-1`` exactly (a lightning state is updated for every row a decode step
covers, so a prefilling row must never be among them). A finished or cancelled sequence gives its row and pages back
at once; the last row of its group moves into the hole (one row of lightning state copied, block-table rows and
page lists swapped: no KV is moved). A prefilling sequence that finishes its prompt is swapped to row ``R``.

Pages are taken as they are needed: a sequence is admitted when a row is free and the pool has the pages of its
prompt (and of its first new token), and a running sequence takes one more page when its next token crosses into
it. When the pool runs out (after the prefix cache has given back what it can), the newest sequence is preempted:
its pages and row go back at once, it returns to the front of the queue with its prompt and the tokens it has
generated, and when it is admitted again they are prefilled (from the longest cached prefix, with prefix caching)
and it goes on where it stopped; its generator keeps its state, so a sampled sequence does not restart its draws.
The oldest sequence always progresses, so the loop ends; a request larger than the whole pool (its prompt plus
``max_new_tokens``) is refused at ``submit``. (2) prefill prompt chunks of the prefilling
sequences up to ``token_budget`` tokens per step (pads included), so a long prompt never stalls the decodes for
more than one budget: the first chunks of the newly admitted rows together in one left-padded call, then each
unfinished prompt through the prefill program on its own row (batch 1, views of the state); (3) one decode step of every
running sequence, with each request's own sampling (temperature, top-k, top-p, seed, stop ids, max tokens).

Mixed steps (``mixed_step``, on when the engine has a ``mixed`` program: ``build.py --mixed-step``): the running
sequences are sampled first (their logits are the previous step's), and their decode step rides with the step's
first prefill chunk of two or more tokens in one call of the ``mixed`` program, a single forward over both (every
weight read once per step instead of once per call); the step's other chunks follow alone, and a step with no such
chunk runs the decode program alone. A prompt finished in one step has its first token sampled in the next.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from .engine import SEED_MAX, Engine, RequestError
from .prefix_cache import PrefixCache
from .sampling import SamplingParams, greedy, sample

logger = logging.getLogger(__name__)

__all__ = ["Scheduler", "Result"]


@dataclass
class Result:
    """A request's outcome so far: generated ids, and why it finished (None while it runs)."""

    request_id: int
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "length", "stop", "cancelled"
    preemptions: int = 0  # times its pages were taken back and its tokens re-prefilled


@dataclass
class _Sequence:
    result: Result
    max_new_tokens: int
    sampling: SamplingParams
    stop_ids: frozenset[int]
    generator: torch.Generator | None
    prefilled: int = 0  # prompt tokens already in the cache
    logits: Tensor | None = None  # [V] after the prompt's last chunk, or the last decode step
    cancelled: bool = False
    cache_block: object = None  # the prefix cache's last block of this prompt so far (spares re-walking its chain)
    context: list[int] = field(default_factory=list)  # what is prefilled: the prompt, plus after a preemption the
    replay: int = 0  # ... first ``replay`` generated tokens
    images: object = None  # VL: the request's images (``runtime.engine._Images``, source on the CPU)
    features: Tensor | None = None  # their prompt vectors, encoded at the first admission

    def is_image(self, position: int) -> bool:
        """Whether context position ``position`` is an image placeholder (its vector comes from ``features``)."""
        source = self.images.source[0] if self.images is not None else None
        return source is not None and position < source.shape[0] and bool(source[position] >= 0)

    @property
    def prompt(self) -> list[int]:
        return self.result.prompt

    @property
    def position(self) -> int:
        """Next position to write: context tokens prefilled, plus tokens fed back by decode steps."""
        return self.prefilled + max(0, len(self.result.tokens) - self.replay - 1)


class Scheduler:
    """Continuous batching on one ``Engine`` (module docstring). Single-threaded: ``submit`` / ``cancel`` /
    ``step`` are called from one thread."""

    def __init__(self, engine: Engine, token_budget: int | None = None, prefix_cache_bytes: int = 0,
                 mixed_step: bool | None = None):
        """``prefix_cache_bytes`` > 0 turns prefix caching on (``runtime/prefix_cache.py``) with that budget for
        the lightning snapshots (the shared KV pages come out of the engine's pool, evicted when it runs short).
        ``mixed_step``: run the decode step and the first prefill chunk of a step as one call of the engine's
        ``mixed`` program (one forward, every weight read once; module docstring); None: when the engine has one."""
        self.engine = engine
        if mixed_step is None:
            mixed_step = "mixed" in engine.programs
        elif mixed_step and "mixed" not in engine.programs:
            raise ValueError(f"mixed_step: engine {engine.source or '(unnamed)'} has no 'mixed' program (build it "
                             "with build.py --mixed-step, or Engine.from_model(..., mixed_step=True))")
        self.mixed_step = mixed_step
        self.mixed_calls = 0  # steps whose decode rode with a prefill chunk
        self._pending: tuple[Tensor, Tensor, list[int]] | None = None  # a mixed step's decode, not run yet
        # default: one full chunk per row per step (a prefilling row is never starved by the others)
        self.token_budget = token_budget or engine.max_batch * engine.max_input_len
        if self.token_budget < (3 if engine.vision is not None else 2):
            raise ValueError(f"token_budget must be >= {3 if engine.vision is not None else 2}"
                             f"{' (a VL engine: image chunks of >= 2 tokens)' if engine.vision is not None else ''}, "
                             f"got {self.token_budget}")
        self.waiting: deque[_Sequence] = deque()
        self.rows: list[_Sequence] = []  # running (prompt done) first, then prefilling
        self.results: dict[int, Result] = {}
        self._ids = itertools.count()
        if engine.backend not in ("aoti", "eager"):
            raise NotImplementedError(f"the scheduler drives programs that update their state in place (aoti, "
                                      f"eager); this engine is {engine.backend!r}")
        engine.reset(engine.max_batch)  # every row zero, every page free; the scheduler owns the engine now
        self._per_row = [t for t, per_row in zip(engine._buffers, engine._per_row) if per_row]
        self.steps = 0
        self.cache: PrefixCache | None = PrefixCache(engine.pages, prefix_cache_bytes) if prefix_cache_bytes else None
        self.preemptions = 0
        # pages kept free at admission for the running sequences' next pages (1 % of the pool, as vLLM's watermark)
        self._watermark = engine.pages.num_pages // 100

    # ------------------------------------------------------------------------------------------------ requests
    def submit(self, prompt: Sequence[int], max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, stop_ids: Sequence[int] = (),
               images: Sequence | None = None) -> int:
        """Queue a request; returns its id. ``RequestError`` for a request the engine can never serve."""
        seq = self.prepare(prompt, max_new_tokens, temperature, top_k, top_p, seed, stop_ids, images)
        self.enqueue(seq)
        return seq.result.request_id

    def prepare(self, prompt: Sequence[int], max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, seed: int | None = None, stop_ids: Sequence[int] = (),
                images: Sequence | None = None) -> _Sequence:
        """A validated request with its id, not queued yet (``enqueue``). Reads only what never changes (the
        engine's limits), so another thread may call it while this one steps. ``images`` (VL engines): the
        prompt's images in order, as ``Engine.generate`` takes one prompt's (encoded when first admitted; such a
        request neither reads nor fills the prefix cache, whose keys are token ids: an image's placeholders are
        the same ids whatever the image)."""
        e = self.engine
        prompt = list(prompt)
        if not prompt:
            raise RequestError("prompt is empty (at least one token is needed)")
        bad = [t for t in prompt if not (isinstance(t, int) and 0 <= t < e.vocab_size)]
        if bad:
            raise RequestError(f"token id {bad[0]!r} is outside the vocabulary [0, {e.vocab_size})")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if len(prompt) + max_new_tokens > e.max_seq_len:
            raise RequestError(f"prompt of {len(prompt)} tokens with max_new_tokens {max_new_tokens} reaches "
                               f"{len(prompt) + max_new_tokens} tokens, past the engine's max_seq_len {e.max_seq_len}")
        need = e.pages.pages_for(len(prompt) + max_new_tokens)
        if need > e.pages.num_pages:
            raise RequestError(f"the request needs {need} KV pages, the pool has {e.pages.num_pages}")
        try:
            sampling = SamplingParams(temperature, top_k, top_p)
        except ValueError as err:
            raise RequestError(str(err)) from None
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX):
            raise RequestError(f"seed must be an integer in [0, 2**63 - 1], got {seed!r}")
        request_images = e._images(None if images is None else [list(images)], [prompt], len(prompt),
                                   to_device=False)
        generator = torch.Generator(device=e.device).manual_seed(seed) if seed is not None else None
        rid = next(self._ids)
        return _Sequence(Result(rid, prompt), max_new_tokens, sampling, frozenset(stop_ids), generator, context=prompt,
                         images=request_images)

    def enqueue(self, seq: _Sequence) -> None:
        self.results[seq.result.request_id] = seq.result
        self.waiting.append(seq)

    def cancel(self, request_id: int) -> None:
        """Stop a request at the next step (its row and pages are given back then); unknown ids are ignored."""
        for seq in (*self.waiting, *self.rows):
            if seq.result.request_id == request_id:
                seq.cancelled = True

    def result(self, request_id: int) -> Result:
        return self.results[request_id]

    @property
    def running(self) -> int:
        return sum(1 for s in self.rows if s.prefilled == len(s.context))

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.rows

    def run_until_idle(self, max_steps: int = 1_000_000) -> None:
        for _ in range(max_steps):
            if not self.step():
                return
        raise RuntimeError(f"scheduler still busy after {max_steps} steps")

    # ------------------------------------------------------------------------------------------------ rows
    def _swap(self, a: int, b: int) -> None:
        """Exchange rows a and b: lightning states (copied), pages, block-table rows, held lengths."""
        if a == b:
            return
        e = self.engine
        with torch.no_grad():
            for t in self._per_row:
                tmp = t[a].clone()
                t[a].copy_(t[b])
                t[b].copy_(tmp)
            e._table[[a, b]] = e._table[[b, a]]
        p = e.pages
        p.table[[a, b]] = p.table[[b, a]]
        p.rows[a], p.rows[b] = p.rows[b], p.rows[a]
        p.held[a], p.held[b] = p.held[b], p.held[a]
        self.rows[a], self.rows[b] = self.rows[b], self.rows[a]

    def _remove(self, row: int, reason: str) -> None:
        """Finish the sequence in ``row``: pages back to the pool, the row closed up (running rows stay first)."""
        seq = self.rows[row]
        seq.result.finish_reason = reason
        self._vacate(row)
        logger.debug("request %d finished (%s): %d tokens", seq.result.request_id, reason, len(seq.result.tokens))

    def _preempt(self, row: int) -> None:
        """Take the sequence in ``row`` out: pages and row back now, to the front of the queue with its prompt and
        generated tokens as the context to prefill when it is admitted again."""
        seq = self.rows[row]
        self._vacate(row)
        seq.context = seq.prompt + seq.result.tokens
        seq.replay = len(seq.result.tokens)
        seq.prefilled, seq.logits, seq.cache_block = 0, None, None
        seq.result.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)
        logger.info("request %d preempted (KV pool out of pages) after %d tokens; %d tokens to prefill again",
                    seq.result.request_id, len(seq.result.tokens), len(seq.context))

    def _vacate(self, row: int) -> None:
        """Row ``row``'s pages back to the pool, the row closed up (running rows stay first)."""
        running = self.running
        if row < running:  # keep running rows compact: the last running row takes its place ...
            self._swap(row, running - 1)
            row = running - 1
        last = len(self.rows) - 1
        self._swap(row, last)  # ... and the last row (a prefilling one, or itself) takes the running hole's place
        e = self.engine
        e.pages.release(last)
        e._table[last].zero_()
        self.rows.pop()

    def _admit(self) -> None:
        e = self.engine
        while self.waiting and len(self.rows) < e.max_batch:
            seq = self.waiting[0]
            if seq.cancelled:
                self.waiting.popleft()
                seq.result.finish_reason = "cancelled"
                continue
            row = len(self.rows)
            need = len(seq.context) + 1  # the context and the first new token; decode steps take the rest
            hit = self.cache.lookup(seq.context) if self.cache is not None and seq.images is None else None
            if hit is not None:
                e.pages.adopt(row, hit.pages)  # held now, so that the eviction below cannot take them
            keep = self._watermark if self.rows else 0
            short = e.pages.pages_for(need) - len(e.pages.rows[row]) - e.pages.free_pages + keep
            if short > 0 and self.cache is not None:
                self.cache.evict_pages(short)
            if e.pages.pages_for(need) - len(e.pages.rows[row]) > e.pages.free_pages - keep:
                e.pages.release(row)
                return  # wait for pages (first come, first served)
            self.waiting.popleft()
            lengths = [0] * e.max_batch
            lengths[row] = need
            e.pages.ensure(lengths)  # only this row changes
            e._table[row].copy_(e.pages.table[row])
            with torch.no_grad():
                for t in self._per_row:
                    t[row].zero_()
                if hit is not None:  # resume after the cached prefix: its lightning states, its pages
                    for t, snap in zip(self._per_row, hit.snapshot):
                        t[row].copy_(snap)
            if hit is not None:
                seq.prefilled = hit.length
                e.pages.held[row] = hit.length
                self.cache.record_hit(hit)
                logger.debug("request %d resumes from a cached prefix of %d tokens", seq.result.request_id,
                             hit.length)
            if seq.images is not None and seq.features is None:  # kept across a preemption
                seq.features = e.encode_images(seq.images.tiles, seq.images.layouts)
            self.rows.append(seq)

    # ------------------------------------------------------------------------------------------------ steps
    def _prefill_new_rows(self, budget: int) -> int:
        """The first chunk of the newly admitted rows (a contiguous run at the end, nothing prefilled yet) in one
        call: left-padded to the longest chunk, the pads at negative positions (no KV written, the zero lightning
        state unchanged), as ``Engine.generate`` batches ragged prompts. Returns the tokens it used."""
        e = self.engine
        first = len(self.rows)
        while first > self.running and self.rows[first - 1].prefilled == 0:
            first -= 1
        rows = list(range(first, len(self.rows)))
        if len(rows) < 2:
            return 0  # one new row: the per-row path is as good
        T = min(e.max_input_len, max(len(self.rows[r].context) for r in rows))
        while rows and len(rows) * T > budget:
            rows.pop()  # the budget counts padded tokens
        if len(rows) < 2:
            return 0
        takes = [self._image_take(self.rows[r], 0, self._cut(self.rows[r], 0, min(len(self.rows[r].context), T)), T)
                 for r in rows]
        if min(takes) == 0:
            return 0  # (never: a first chunk of >= 3 tokens always fits) the per-row path then
        T = max(takes)
        pad = self.engine.vocab_size - 1  # any id: a pad's embedding meets nothing
        ids = torch.tensor([[pad] * (T - k) + self.rows[r].context[:k] for r, k in zip(rows, takes)], dtype=torch.long,
                           device=e.device)
        pos = torch.tensor([k - T for k in takes], dtype=torch.long, device=e.device)
        a, b = rows[0], rows[-1] + 1
        extra = self._embeds([(self.rows[r], 0, k) for r, k in zip(rows, takes)], T) if T > 1 else ()
        logits = self._call("decode" if T == 1 else "prefill", ids, pos, a, b, extra)
        for i, (r, k) in enumerate(zip(rows, takes)):
            seq = self.rows[r]
            seq.prefilled = k
            e.pages.held[r] = k
            if k == len(seq.context):
                seq.logits = logits[i, -1]
            self._snapshot(r)
        return len(rows) * T

    def _cut(self, seq: _Sequence, start: int, take: int) -> int:
        """With prefix caching, where a chunk of ``take`` tokens from ``start`` ends: on a page boundary (a snapshot
        point) unless it ends the context, and at the context's last page boundary if it crosses it, so that every
        prompt leaves a snapshot at its longest page-aligned prefix: a follow-up that extends the prompt, or one
        that changes only its last tokens, resumes within one page of where it departs."""
        if self.cache is None or seq.images is not None:
            return take
        ps, end = self.engine.pages.page_size, len(seq.context)
        tail = (end - 1) // ps * ps
        if start < tail < start + take:
            return tail - start
        if start + take < end:
            aligned = (start + take) // ps * ps
            if aligned > start:
                return aligned - start
        return take

    def _snapshot(self, row: int) -> None:
        """After a prefill chunk: a row whose prompt prefix now ends on a page boundary is recorded in the prefix
        cache (its full pages and a copy of its lightning states), unless that prefix has a snapshot already."""
        seq = self.rows[row]
        n = seq.prefilled
        if self.cache is None or seq.images is not None or n == 0 or n % self.engine.pages.page_size or not self.cache.needs_snapshot(
                seq.context, n, seq.cache_block):
            return
        with torch.no_grad():
            snapshot = [t[row].clone() for t in self._per_row]
        seq.cache_block = self.cache.insert(seq.context, self.engine.pages.rows[row], n, snapshot, seq.cache_block)

    def _image_take(self, seq: _Sequence, start: int, take: int, limit: int) -> int:
        """A chunk length for a sequence with images such that no image placeholder goes through decode alone (a
        1-token chunk runs the decode program, which takes no image vectors): neither this chunk nor a last
        1-token rest of the context may be one placeholder. ``take`` as asked if it is safe, else the nearest safe
        length in [2, limit]; 0: none this step (the budget is too short), try the next."""
        if seq.images is None:
            return take
        remaining = len(seq.context) - start

        def safe(t: int) -> bool:
            return not ((t == 1 and seq.is_image(start)) or (remaining - t == 1 and seq.is_image(start + t)))

        if safe(take):
            return take
        for t in [*range(take - 1, 1, -1), *range(take + 1, min(limit, remaining) + 1)]:
            if safe(t):
                return t
        if remaining == 1:  # cannot happen: every earlier chunk left more than one placeholder
            raise RuntimeError(f"request {seq.result.request_id}: one image placeholder left to prefill alone")
        return 0

    def _embeds(self, items: list[tuple[_Sequence, int, int]], T: int) -> tuple[Tensor, ...]:
        """The VL prefill program's last input for rows ``items`` = ``(sequence, start, tokens)`` left-padded to
        ``T``: each image placeholder's vector, zeros elsewhere; ``()`` for a text engine."""
        e = self.engine
        if e.vision is None:
            return ()
        from export.engine_folder import DTYPES

        out = torch.zeros(len(items), T, e.config.hidden_size, dtype=DTYPES[e.dtype], device=e.device)
        for i, (seq, start, k) in enumerate(items):
            if seq.features is None:
                continue
            source = seq.images.source[0, start:start + k]  # (shorter past the prompt: replayed tokens are text)
            cols = (source >= 0).nonzero().squeeze(1)
            if cols.numel():
                out[i, (cols + T - k).to(e.device)] = seq.features[source[cols].to(e.device)]
        return (out,)

    def _compact(self) -> None:
        """Rows whose prompt is done move in front of the ones still prefilling (running rows stay a prefix)."""
        done = [r for r, seq in enumerate(self.rows) if seq.prefilled == len(seq.context)]
        for target, r in enumerate(done):
            self._swap(target, r)

    def _prefill(self) -> None:
        e = self.engine
        budget = self.token_budget - self._prefill_new_rows(self.token_budget)
        for row in range(self.running, len(self.rows)):
            seq = self.rows[row]
            while budget > 0 and seq.prefilled < len(seq.context):
                remaining = len(seq.context) - seq.prefilled
                start = seq.prefilled
                limit = min(remaining, e.max_input_len, budget)
                take = self._image_take(seq, start, self._cut(seq, start, limit), limit)  # 1 token: through decode
                if take == 0:
                    break
                ids = torch.tensor([seq.context[start:start + take]], dtype=torch.long, device=e.device)
                pos = torch.tensor([start], dtype=torch.long, device=e.device)
                name = "decode" if take == 1 else "prefill"
                extra = self._embeds([(seq, start, take)], take) if take > 1 else ()
                logits = self._call(name, ids, pos, row, row + 1, extra)
                e.pages.held[row] = start + take
                seq.prefilled += take
                budget -= take
                if seq.prefilled == len(seq.context):
                    seq.logits = logits[0, -1]
                self._snapshot(row)
            if budget <= 0:
                break
        self._compact()

    def _call(self, name: str, ids: Tensor, pos: Tensor, a: int, b: int, extra: tuple) -> Tensor:
        """Program ``name`` on rows ``a..b-1`` -> their logits. A step's pending decode (a mixed step) rides with
        the first prefill chunk: one call of the ``mixed`` program for both."""
        e = self.engine
        with torch.no_grad():
            if self._pending is not None and name == "prefill" and not extra:
                dec_ids, dec_pos, positions_cpu = self._pending
                self._pending = None
                R = dec_ids.shape[0]
                dec, pre = e._rows_of(R), e._rows_of(b - a, a)
                per_row = e._per_row
                logits = e.programs["mixed"](
                    dec_ids, dec_pos, e._table[:R], ids, pos, e._table[a:b],
                    [t for t, r in zip(dec, per_row) if r], [t for t, r in zip(pre, per_row) if r],
                    [t for t, r in zip(dec, per_row) if not r])
                self.mixed_calls += 1
                self._decoded(logits[:R], positions_cpu)
                return logits[R:]
            logits, _ = e.programs[name](ids, pos, e._table[a:b], e._rows_of(b - a, a), *extra)
        return logits

    def _decode(self, ids: Tensor, pos: Tensor, positions_cpu: list[int]) -> None:
        """The decode program on running rows ``0..R-1`` (``_decode_inputs``)."""
        e, R = self.engine, len(positions_cpu)
        with torch.no_grad():
            logits, _ = e.programs["decode"](ids, pos, e._table[:R], e._rows_of(R))
        self._decoded(logits, positions_cpu)

    def _decoded(self, logits: Tensor, positions_cpu: list[int]) -> None:
        """A decode step of running rows ``0..R-1`` ran: their logits, their held lengths."""
        for r, p in enumerate(positions_cpu):
            self.rows[r].logits = logits[r, -1]
            self.engine.pages.held[r] = p + 1

    def _sample(self) -> int:
        """Every running sequence has logits for its next token: sample it, retire the finished ones, give the
        rest the pages of their next position (``_grow``). Returns the number of running rows left."""
        R = self.running
        if not R:
            return 0
        for row, token in enumerate(self._next_tokens(R)):
            self.rows[row].result.tokens.append(token)
        for row in reversed(range(R)):
            seq = self.rows[row]
            if seq.result.tokens[-1] in seq.stop_ids:
                self._remove(row, "stop")
            elif len(seq.result.tokens) >= seq.max_new_tokens:
                self._remove(row, "length")
        return self._grow()

    def _decode_inputs(self, R: int) -> tuple[Tensor, Tensor, list[int]]:
        """Running rows ``0..R-1``' decode step: ids ``[R, 1]``, positions ``[R]`` (and as ints), checked."""
        e = self.engine
        ids = torch.tensor([[self.rows[r].result.tokens[-1]] for r in range(R)], dtype=torch.long, device=e.device)
        positions_cpu = [self.rows[r].position for r in range(R)]
        e.pages.check_step(positions_cpu, 1)  # the invariant that no row skips or rewinds, checked
        return ids, torch.tensor(positions_cpu, dtype=torch.long, device=e.device), positions_cpu

    def _grow(self) -> int:
        """Before a decode step: a page for each running row whose next token starts one. Where the pool is short
        (after the prefix cache gave back what it could), the newest sequence is preempted, until the rest fit.
        Returns the number of running rows."""
        e, p = self.engine, self.engine.pages
        while True:
            R = self.running
            lengths = [self.rows[r].position + 1 for r in range(R)]
            need = sum(max(0, p.pages_for(n) - len(p.rows[r])) for r, n in enumerate(lengths))
            if need > p.free_pages and self.cache is not None:
                self.cache.evict_pages(need - p.free_pages)
            if need <= p.free_pages:
                break
            self._preempt(max(range(len(self.rows)), key=lambda r: self.rows[r].result.request_id))
        if R and p.ensure(lengths + [0] * (e.max_batch - R)):
            e._table[:R].copy_(p.table[:R])
        return R

    def _next_tokens(self, R: int) -> list[int]:
        """The next token of running rows ``0..R-1``: the greedy rows in one ``argmax`` over their stacked logits
        and one device-to-host copy (a sync per row cost ~2 ms a step at 64 rows on the GPU), each sampled row with
        its own settings and generator."""
        tokens: list[int] = [0] * R
        greedy_rows = [r for r in range(R) if self.rows[r].sampling.temperature == 0.0]
        if greedy_rows:
            picks = greedy(torch.stack([self.rows[r].logits for r in greedy_rows])).tolist()
            for r, t in zip(greedy_rows, picks):
                tokens[r] = t
        for r in range(R):
            seq = self.rows[r]
            s = seq.sampling
            if s.temperature != 0.0:
                tokens[r] = int(sample(seq.logits[None], s.temperature, s.top_k, s.top_p, seq.generator)[0])
        return tokens

    def step(self) -> bool:
        """Admit, prefill within the budget, then one decode step of the running sequences (a mixed step: sample
        the running sequences first, then their decode step and the first prefill chunk in one call, the other
        chunks after it). Returns whether any work remains."""
        for row in reversed(range(len(self.rows))):
            if self.rows[row].cancelled:
                self._remove(row, "cancelled")
        self._admit()
        if self.mixed_step:
            R = self._sample()
            self._pending = self._decode_inputs(R) if R else None
            self._prefill()  # its first chunk of >= 2 tokens takes the pending decode along
            if self._pending is not None:  # no such chunk this step: the decode alone
                self._decode(*self._pending)
                self._pending = None
        else:
            self._prefill()
            R = self._sample()
            if R:
                self._decode(*self._decode_inputs(R))
        self.steps += 1
        return not self.idle
