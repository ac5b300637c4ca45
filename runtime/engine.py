"""``Engine``: an engine folder (or an eager model) behind one interface, with its decoding state and generation.

    engine = Engine.load("engines/tiny")                       # manifest checked, programs loaded, state allocated
    out = engine.generate([[5, 6, 7], [8, 9]], max_new_tokens=16)            # [B, T + N]
    for tokens in engine.stream(ids, max_new_tokens=16, temperature=0.7, top_p=0.9, seed=0): ...   # [B] per step

Ragged batches use left padding with a negative start position (``model/modeling.py``): prompts of lengths
``L_b`` are padded on the left to ``L = max L_b`` and row ``b`` starts at position ``-(L - L_b)``, so every pad sits
at a negative position, where the model neither changes the lightning state nor exposes a KV-cache slot.
Prompts longer than the prefill profile (``max_input_len``) are prefilled in chunks that carry the state; the
chunks are right-aligned (the last ones full), so pads only fall in the first chunk(s). A chunk of one token goes
through ``decode`` (the prefill profile starts at T = 2); it is never a pad: a leading remainder of one token
borrows a token from the next chunk, or, when ``max_input_len == 2``, is moved to the end (the last token of every
row is real).

Requests are validated in full before the state is touched; a refused request raises ``RequestError`` and leaves
the engine usable. Each request starts from zeroed lightning states (rows ``0..B-1`` of the buffers allocated at
load) and takes the KV pages it needs from the pools (``PagePool``): row b gets ``ceil((L_b + max_new_tokens) /
page_size)`` pages, listed in its block-table row, all reserved before the first step so that a request either
fits the pool or is refused at once. Pages are not zeroed: the kernels read only the positions a row holds.

Every step is checked against the table before it runs (the compiled kernels cannot raise): a chunk that runs past
the context length, a row without pages for its positions when the pool has none left, or positions that go
backwards or skip ahead of what the row holds are refused (``RequestError`` naming the row, the length and the
limit), and nothing is written.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from export.engine_folder import DTYPES, EngineFolderError, read_manifest

from .backends import InPlaceProgram, Program, load_programs
from .sampling import SamplingParams, sample

logger = logging.getLogger(__name__)

__all__ = ["Engine", "RequestError", "GenerationStats", "PagePool", "chunk_plan"]

SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit seed; the runtime accepts the non-negative int64s


class RequestError(ValueError):
    """A generation request the engine refuses (bad ids, too long, batch too large, ...); the engine stays usable."""


@dataclass
class GenerationStats:
    """Timings of the last request (wall clock; CUDA is synchronised at the boundaries)."""

    batch: int = 0
    prompt_tokens: int = 0  # real (unpadded) prompt tokens over the batch
    padded_prompt_len: int = 0
    prefill_chunks: int = 0
    prefill_s: float = 0.0
    decode_steps: int = 0  # decode calls after the prefill
    decode_s: float = 0.0
    new_tokens: int = 0  # tokens produced per row (the same for every row)
    images: int = 0  # images of the request (VL engines)
    image_tiles: int = 0
    vision_s: float = 0.0  # encoding them (part of prefill_s)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens produced per second of decoding, over the batch."""
        return self.batch * self.decode_steps / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def decode_ms_per_step(self) -> float:
        return 1e3 * self.decode_s / self.decode_steps if self.decode_steps else float("nan")


def chunk_plan(length: int, max_chunk: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` covering ``0..length``, each chunk at most ``max_chunk`` tokens, right-aligned.

    The last chunks are full and the first takes the remainder. A chunk of one token can only be the last one
    (whose tokens are never pads): a leading remainder of 1 borrows a token from the next chunk when
    ``max_chunk >= 3``; with ``max_chunk == 2`` the odd token is processed last.
    """
    if length < 1 or max_chunk < 2:
        raise ValueError(f"chunk_plan: length {length} must be >= 1 and max_chunk {max_chunk} >= 2")
    n = -(-length // max_chunk)
    sizes = [length - (n - 1) * max_chunk] + [max_chunk] * (n - 1)
    if sizes[0] == 1 and n > 1:
        if max_chunk >= 3:
            sizes[0], sizes[1] = 2, max_chunk - 1
        else:
            sizes = sizes[1:] + [1]
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


@dataclass
class _Request:
    ids: Tensor  # [B, L] int64 on the engine's device, left padded
    lengths: Tensor  # [B] int64 (CPU), real prompt lengths
    max_new_tokens: int
    sampling: SamplingParams
    eos_token_id: int | None
    seed: int | None
    pad_token_id: int
    prompt: Tensor  # [B, L] (CPU) what generate returns in front of the new tokens
    images: "_Images | None" = None


@dataclass
class _Images:
    """A request's images, checked against its placeholders: tiles per image (in prompt order, row by row),
    their layouts, and for every column of the padded prompt the row of the request's image vectors it takes
    (``-1``: a text token)."""

    tiles: list[Tensor]  # [1 + rows*cols, C, S, S] per image (CPU)
    layouts: list[Any]  # model.vl.ImageLayout per image
    source: Tensor  # [B, L] int64 on the engine's device


class PagePool:
    """The KV pages of an engine (every softmax layer's pools share one page numbering) and which row holds which.

    ``table`` is the CPU block table ``[max_batch, M]`` int32 (unused entries 0: never read, since the kernels only
    read positions a row holds); ``held[b]`` is the number of positions row b holds (its next position).

    Pages are reference-counted: a row holds one reference to each of its pages, and a prefix cache
    (``runtime/prefix_cache.py``) one to each page it keeps; a page is free when nobody holds it. Rows that share a
    prompt prefix share its full pages (``adopt``); a shared page is never written (a row writes only positions past
    what it adopted).
    """

    def __init__(self, num_pages: int, page_size: int, max_pages_per_seq: int, max_batch: int):
        self.num_pages, self.page_size, self.max_pages_per_seq = num_pages, page_size, max_pages_per_seq
        self.table = torch.zeros(max_batch, max_pages_per_seq, dtype=torch.int32)
        self.rows: list[list[int]] = [[] for _ in range(max_batch)]
        self.held = [0] * max_batch
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out page 0 first
        self.refs = [0] * num_pages

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def row_pages(self) -> int:
        """Pages held by at least one row (the rest of the used pages are held only by a prefix cache)."""
        return len({p for row in self.rows for p in row})

    def ref(self, page: int) -> None:
        if self.refs[page] <= 0:
            raise RuntimeError(f"page {page} is free: it cannot gain a reference")
        self.refs[page] += 1

    def unref(self, page: int) -> None:
        self.refs[page] -= 1
        if self.refs[page] < 0:
            raise RuntimeError(f"page {page} released more often than held")
        if self.refs[page] == 0:
            self._free.append(page)

    def adopt(self, b: int, pages: Sequence[int]) -> None:
        """Row b (holding nothing) starts with ``pages`` (a cached prefix's pages, one more reference each)."""
        if self.rows[b]:
            raise RuntimeError(f"row {b} already holds pages")
        if len(pages) > self.max_pages_per_seq:
            raise RequestError(f"row {b}: {len(pages)} pages exceed the table's {self.max_pages_per_seq}")
        for i, page in enumerate(pages):
            self.ref(page)
            self.table[b, i] = page
            self.rows[b].append(page)

    @property
    def capacity(self) -> int:
        """Positions one row can hold (the block-table width in tokens)."""
        return self.max_pages_per_seq * self.page_size

    def pages_for(self, length: int) -> int:
        return -(-max(length, 0) // self.page_size)

    def release_all(self) -> None:
        for b in range(len(self.rows)):
            self.release(b)

    def release(self, b: int) -> None:
        """Give row b's pages back (its table row zeroed, nothing held); a page also held by a prefix cache or
        another row stays in use."""
        for page in self.rows[b]:
            self.unref(page)
        self._free.sort(reverse=True)
        self.rows[b] = []
        self.table[b].zero_()
        self.held[b] = 0

    def ensure(self, lengths: Sequence[int]) -> bool:
        """Give row b pages for positions ``0..lengths[b]-1`` (all rows or none: ``RequestError`` when the pool
        or the table is short, naming the row). Returns whether the table changed."""
        need = [max(0, self.pages_for(n) - len(self.rows[b])) for b, n in enumerate(lengths)]
        for b, n in enumerate(lengths):
            if n > self.capacity:
                raise RequestError(f"row {b}: {n} positions exceed the context length {self.capacity} "
                                   f"(max_seq_len; {self.max_pages_per_seq} pages of {self.page_size} tokens)")
        if sum(need) > len(self._free):
            short = next(b for b in range(len(need)) if sum(need[: b + 1]) > len(self._free))
            raise RequestError(
                f"KV-cache pool out of pages: row {short} needs {self.pages_for(lengths[short])} pages for "
                f"{lengths[short]} positions; {sum(need)} new pages are needed over the batch, "
                f"{len(self._free)} of the pool's {self.num_pages} are free (build with a larger --num-pages)")
        for b, n in enumerate(need):
            for _ in range(n):
                page = self._free.pop()
                self.refs[page] = 1
                self.table[b, len(self.rows[b])] = page
                self.rows[b].append(page)
        return any(need)

    def check_step(self, positions: Sequence[int], T: int) -> None:
        """Refuse a step whose rows do not continue what they hold (``RequestError``); nothing is changed."""
        for b, p0 in enumerate(positions):
            end = p0 + T
            if end > self.capacity:
                raise RequestError(f"row {b}: a chunk of {T} tokens at position {p0} reaches position {end - 1}, "
                                   f"past the context length {self.capacity} (max_seq_len)")
            if end <= 0:
                continue  # only left pads: nothing is written
            start = max(p0, 0)
            if start != self.held[b]:
                how = "go backwards" if start < self.held[b] else "skip ahead"
                raise RequestError(f"row {b}: positions {how}: the row holds {self.held[b]} positions, the chunk "
                                   f"starts at position {p0} (each step must continue at the row's next position)")

    def advance(self, positions: Sequence[int], T: int) -> None:
        for b, p0 in enumerate(positions):
            self.held[b] = max(self.held[b], p0 + T)


class Engine:
    """Prefill/decode programs, the model config, the shape limits they were built for, and the decoding state.

    Build with ``Engine.load(engine_dir)`` (an engine folder) or ``Engine.from_model(model, ...)`` (the eager model
    behind the same interface: the parity and benchmark baseline).
    """

    def __init__(
        self,
        programs: dict[str, Program],
        config: Any,
        *,
        device: torch.device | str,
        state_layout: list[dict[str, Any]],
        max_batch: int,
        max_input_len: int,
        max_seq_len: int,
        paged_kv: dict[str, int],
        backend: str,
        dtype: str,
        source: str = "",
        vision: dict[str, Any] | None = None,
    ):
        self.programs = programs
        self.config = config
        # VL engines: {"config": MiniMaxVLConfig, "max_tiles": int}; the vision program is programs["vision"]
        self.vision = vision
        self.device = torch.device(device)
        self.state_layout = state_layout
        self.max_batch, self.max_input_len, self.max_seq_len = max_batch, max_input_len, max_seq_len
        self.backend, self.dtype, self.source = backend, dtype, source
        self.vocab_size: int = config.vocab_size
        self.stats = GenerationStats()
        self.paged_kv = dict(paged_kv)
        self.pages = PagePool(paged_kv["num_pages"], paged_kv["page_size"], paged_kv["max_pages_per_seq"], max_batch)
        self._buffers = self._allocate_state(max_batch)  # kept for the engine's life; requests use rows 0..B-1
        self._per_row = ["B" in e["shape"] for e in state_layout]  # lightning states: rows; KV pools: whole
        self.state: list[Tensor] = self._rows_of(0)  # state of the current/last request
        # the block table the programs read ([max_batch, M]); a copy of the pool's CPU table even on the CPU
        self._table = self.pages.table.to(self.device, copy=True)
        self._batch = 0
        logger.info(
            "engine %s: backend %s, %s on %s, batch <= %d, prefill chunk <= %d, context <= %d, KV pages %d x %d "
            "tokens, state %.1f MiB", source or "(unnamed)", backend, dtype, self.device, max_batch, max_input_len,
            max_seq_len, paged_kv["num_pages"], paged_kv["page_size"],
            sum(t.numel() * t.element_size() for t in self._buffers) / 2**20,
        )

    # ------------------------------------------------------------------------------------------------ creation
    @classmethod
    def load(cls, engine_dir: str | Path, device: str | torch.device | None = None,
             verify_files: bool = True) -> "Engine":
        """Read and check ``engine_dir/manifest.json``, load the programs of its backend, allocate the state.

        ``device`` defaults to the device the engine was built for; another device type is refused
        (``EngineFolderError``), as is a CUDA engine where no GPU is available.
        """
        folder = Path(engine_dir)
        manifest = read_manifest(folder, verify_files=verify_files, hash_weights=False)  # weights: hashed as loaded
        if "parallel" in manifest:  # one rank of a tensor-parallel folder: its programs need the world
            import torch.distributed as dist

            par = manifest["parallel"]
            if not dist.is_initialized() or dist.get_world_size() != par["world_size"] \
                    or dist.get_rank() != par["rank"]:
                raise EngineFolderError(
                    f"{folder}: rank {par['rank']} of a {par['world_size']}-rank tensor-parallel engine; run the "
                    f"parent folder with `torchrun --nproc-per-node {par['world_size']} -m runtime {folder.parent}`")
        built_for = manifest["device"]
        if built_for == "cuda" and not torch.cuda.is_available():
            raise EngineFolderError(f"{folder}: engine was built for 'cuda' but no CUDA device is available here")
        try:
            target = torch.device(device) if device is not None else torch.device(built_for)
        except (RuntimeError, TypeError, ValueError) as e:
            raise EngineFolderError(f"device {device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from e
        if target.type not in ("cpu", "cuda"):
            raise EngineFolderError(f"{folder}: device {device!r}: engines run on 'cpu' or 'cuda' only "
                                    f"(this one was built for '{built_for}')")
        if target.type != built_for:
            raise EngineFolderError(
                f"{folder}: engine was built for '{built_for}' and cannot run on '{target}'; "
                f"rebuild it with build.py --device {target.type}"
            )
        if target.type == "cuda" and target.index is None:
            target = torch.device("cuda", torch.cuda.current_device())
        if manifest["dtype"] not in DTYPES:
            raise EngineFolderError(f"{folder}: unknown dtype {manifest['dtype']!r} in the manifest")
        from model.config import MiniMaxConfig  # the config only, not the model

        config = MiniMaxConfig.from_dict(manifest["model_config"])
        vision = None
        if "vision" in manifest:
            from model.vl import MiniMaxVLConfig

            vision = {"config": MiniMaxVLConfig.from_dict(manifest["vision"]["config"]),
                      "max_tiles": manifest["vision"]["max_tiles"]}
        programs = load_programs(folder, manifest, target)
        profiles = manifest["profiles"]
        return cls(programs, config, device=target, state_layout=manifest["state_layout"],
                   max_batch=profiles["max_batch"], max_input_len=profiles["max_input_len"],
                   max_seq_len=profiles["max_seq_len"], paged_kv=manifest["paged_kv"], backend=manifest["backend"],
                   dtype=manifest["dtype"], source=str(folder), vision=vision)

    @classmethod
    def from_model(cls, model: torch.nn.Module, max_batch: int, max_input_len: int, max_seq_len: int,
                   page_size: int = 256, num_pages: int | None = None, max_tiles: int | None = None,
                   mixed_step: bool = False) -> "Engine":
        """The eager ``MiniMaxForCausalLM`` (or ``MiniMaxVLForConditionalGeneration``) behind the engine interface
        (same limits, chunking and paged cache as a built engine; ``max_tiles``: a VL model's vision calls, default
        the largest image's tiles; ``mixed_step``: also the ``mixed`` program, as ``build.py --mixed-step``)."""
        from export.engine_folder import BuildSettings, symbolic_state_layout
        from export.exporting import (DecodeProgram, MixedProgram, PrefillProgram, VisionProgram, VLDecodeProgram,
                                      VLPrefillProgram, image_tiles_needed, is_vl, text_model)

        vl = is_vl(model)
        text = text_model(model)
        dtype = next(k for k, v in DTYPES.items() if v == model.dtype)
        device = text.lm_head.weight.device
        if vl and max_tiles is None:
            max_tiles = image_tiles_needed(model.config)
        settings = BuildSettings(device=device.type, dtype=dtype, max_batch=max_batch, max_input_len=max_input_len,
                                 max_seq_len=max_seq_len, page_size=page_size, num_pages=num_pages,
                                 max_tiles=max_tiles or 0)
        settings.validate(text.config.max_position_embeddings)
        model.eval()
        layout = symbolic_state_layout(text.config, settings)  # the layout a built engine's manifest carries
        vision = None
        if vl:
            from export.exporting import check_vl_settings

            check_vl_settings(model.config, dataclasses.replace(settings, backend="aoti"))
            programs = {"prefill": InPlaceProgram(VLPrefillProgram(model), "prefill"),
                        "decode": InPlaceProgram(VLDecodeProgram(model), "decode"), "vision": VisionProgram(model)}
            vision = {"config": model.config, "max_tiles": settings.max_tiles}
        else:
            programs = {"prefill": InPlaceProgram(PrefillProgram(model), "prefill"),
                        "decode": InPlaceProgram(DecodeProgram(model), "decode")}
            if mixed_step:
                programs["mixed"] = MixedProgram(model)
        if mixed_step and (vl or getattr(text, "tp", None) is not None):
            raise ValueError("mixed_step: text models on one rank only")
        return cls(programs, text.config, device=device, state_layout=layout, max_batch=max_batch,
                   max_input_len=max_input_len, max_seq_len=max_seq_len, paged_kv=settings.paged_layout(),
                   backend="eager", dtype=dtype, source="eager model", vision=vision)

    def _allocate_state(self, batch: int) -> list[Tensor]:
        tensors = []
        for entry in self.state_layout:
            shape = [batch if d == "B" else int(d) for d in entry["shape"]]
            tensors.append(torch.zeros(shape, dtype=DTYPES[entry["dtype"]], device=self.device))
        return tensors

    def _rows_of(self, batch: int, start: int = 0) -> list[Tensor]:
        """The state of rows ``start .. start + batch - 1`` (per-row tensors sliced, KV pools whole). A run of dim 0
        of a contiguous tensor is contiguous (the programs need contiguous inputs)."""
        return [t[start:start + batch] if per_row else t for t, per_row in zip(self._buffers, self._per_row)]

    def reset(self, batch: int) -> list[Tensor]:
        """Start a new batch of ``batch`` rows (``<= max_batch``): lightning states of rows ``0..batch-1`` zeroed,
        every KV page returned to the pool (rows get pages again with ``reserve`` or on their first step)."""
        if not 1 <= batch <= self.max_batch:
            raise RequestError(f"batch {batch} is outside [1, max_batch={self.max_batch}]")
        with torch.no_grad():
            self.state = self._rows_of(batch)
            for t, per_row in zip(self.state, self._per_row):
                if per_row:
                    t.zero_()
        self.pages.release_all()
        self._table.zero_()
        self._batch = batch
        return self.state

    def reserve(self, lengths: Sequence[int]) -> None:
        """Give row b of the current batch KV pages for ``lengths[b]`` positions (``RequestError`` if the pool or
        the context length is short; then nothing is reserved)."""
        if len(lengths) != self._batch:
            raise RequestError(f"reserve: {len(lengths)} lengths for a batch of {self._batch}")
        if self.pages.ensure(list(lengths)):
            self._table[: self._batch].copy_(self.pages.table[: self._batch])

    @property
    def block_table(self) -> Tensor:
        """The block table of the current batch, ``[B, M]`` int32 on the engine's device."""
        return self._table[: self._batch]

    # ------------------------------------------------------------------------------------------------ steps
    def _step(self, name: str, input_ids: Tensor, positions: Tensor, positions_cpu: Sequence[int] | None,
              image_embeds: Tensor | None = None) -> Tensor:
        B, T = input_ids.shape
        if B != self._batch:
            raise RequestError(f"{name}: {B} rows, the current batch has {self._batch} (call reset first)")
        if positions.shape != (B,):
            raise RequestError(f"{name}: positions must be [B={B}], got {tuple(positions.shape)}")
        if positions_cpu is None:
            positions_cpu = positions.tolist()
        self.pages.check_step(positions_cpu, T)
        self.reserve([max(self.pages.held[b], p + T) for b, p in enumerate(positions_cpu)])
        extra = ()
        if self.vision is not None and name == "prefill":  # a VL prefill takes the chunk's image vectors last
            if image_embeds is None:
                image_embeds = torch.zeros(B, T, self.config.hidden_size, dtype=DTYPES[self.dtype], device=self.device)
            elif image_embeds.shape != (B, T, self.config.hidden_size):
                raise RequestError(f"prefill: image_embeds must be [B={B}, T={T}, {self.config.hidden_size}], got "
                                   f"{tuple(image_embeds.shape)}")
            extra = (image_embeds.contiguous(),)
        elif image_embeds is not None:
            raise RequestError(f"{name}: image_embeds given, but this step takes none "
                               f"({'decode steps are text' if self.vision is not None else 'not a VL engine'})")
        logits, self.state = self.programs[name](input_ids.contiguous(), positions.contiguous(), self.block_table,
                                                 self.state, *extra)
        self.pages.advance(positions_cpu, T)
        return logits[:, -1]

    @torch.no_grad()
    def prefill(self, input_ids: Tensor, positions: Tensor, positions_cpu: Sequence[int] | None = None,
                image_embeds: Tensor | None = None) -> Tensor:
        """One prefill chunk on the current state: ``[B, T]`` ids (2 <= T <= max_input_len) -> logits ``[B, V]``.

        ``positions_cpu``: the same positions as Python ints, when the caller knows them (saves a device sync).
        ``image_embeds [B, T, hidden]`` (VL engines): the image vectors at the image-token positions (default:
        none; then the chunk must hold no image token that matters)."""
        return self._step("prefill", input_ids, positions, positions_cpu, image_embeds)

    @torch.no_grad()
    def decode(self, input_ids: Tensor, positions: Tensor, positions_cpu: Sequence[int] | None = None) -> Tensor:
        """One decode step on the current state: ``[B, 1]`` ids at ``positions [B]`` -> logits ``[B, V]``."""
        return self._step("decode", input_ids, positions, positions_cpu)

    # ------------------------------------------------------------------------------------------------ images
    @torch.no_grad()
    def encode_images(self, tiles: Sequence[Tensor], layouts: Sequence[Any]) -> Tensor:
        """Images' tiles (``[1 + rows*cols, C, S, S]`` each) -> their prompt vectors, concatenated in order
        (``[sum num_tokens, hidden]``, the engine's dtype, on its device): the vision program over groups of
        consecutive images of at most ``max_tiles`` tiles, packed by ``model.vl.packing_index``."""
        if self.vision is None:
            raise RequestError(f"engine {self.source or '(unnamed)'} is a text engine: it takes no images")
        from model.vl import packing_index

        grid, max_tiles = self.vision["config"].vision.grid, self.vision["max_tiles"]
        dtype = DTYPES[self.dtype]
        groups: list[list[int]] = []
        count = max_tiles  # tiles in the last group
        for i, t in enumerate(tiles):
            if count + t.shape[0] > max_tiles:
                groups.append([])
                count = 0
            groups[-1].append(i)
            count += t.shape[0]
        out = []
        for group in groups:
            pixels = torch.cat([tiles[i] for i in group]).to(device=self.device, dtype=dtype).contiguous()
            index = packing_index([layouts[i] for i in group], grid).to(self.device)
            out.append(self.programs["vision"](pixels, index))
        return torch.cat(out) if out else torch.zeros(0, self.config.hidden_size, dtype=dtype, device=self.device)

    def _images(self, images: Any, rows: list[list[int]], L: int, to_device: bool = True) -> _Images | None:
        """Check a request's images (``generate``'s ``images``) against its prompts: one list per prompt, each
        image a pair ``(pixel_values [1 + rows*cols, C, S, S], (height, width))`` or a PIL image / HxWx3 uint8
        array (through ``model.MiniMaxVLImageProcessor.for_config``: the engine's tiles and grids); every image's
        placeholders one run of image tokens in its prompt, in order."""
        token = self.vision["config"].image_token_index if self.vision is not None else None
        counts = [sum(t == token for t in row) for row in rows] if token is not None else [0] * len(rows)
        if images is None:
            for b, n in enumerate(counts):
                if n:
                    raise RequestError(f"prompt {b} holds {n} image tokens (id {token}) but no images were given")
            return None
        if self.vision is None:
            raise RequestError(f"engine {self.source or '(unnamed)'} is a text engine: it takes no images")
        if not isinstance(images, Sequence) or isinstance(images, (str, bytes)):
            raise RequestError(f"images must be a list with one list of images per prompt, got {type(images).__name__}")
        if len(images) == 0:
            images = [[] for _ in rows]
        if len(rows) == 1 and len(images) and not (isinstance(images[0], Sequence) and not isinstance(images[0], tuple)):
            images = [images]  # one prompt: a flat list of its images
        if len(images) != len(rows):
            raise RequestError(f"images: {len(images)} lists for {len(rows)} prompts (one list per prompt)")
        vl = self.vision["config"]
        from model.vl import _check_placeholders

        tiles, layouts = [], []
        source = torch.full((len(rows), L), -1, dtype=torch.long)
        offset = 0
        for b, (row, row_images) in enumerate(zip(rows, images)):
            if not isinstance(row_images, Sequence) or isinstance(row_images, (str, bytes)):
                raise RequestError(f"images[{b}] must be a list of images, got {type(row_images).__name__}")
            row_tiles, row_layouts = [], []
            for i, image in enumerate(row_images):
                t, lay = self._image(image, vl, f"prompt {b}, image {i}")
                row_tiles.append(t)
                row_layouts.append(lay)
            if not row_images:
                if counts[b]:
                    raise RequestError(f"prompt {b} holds {counts[b]} image tokens (id {token}) but no images")
                continue
            is_image = torch.tensor(row, dtype=torch.long)[None] == token
            try:
                _check_placeholders(is_image, row_layouts)
            except ValueError as e:
                raise RequestError(f"prompt {b}: {e}") from None
            n = int(is_image.sum())
            source[b, L - len(row):][is_image[0]] = torch.arange(offset, offset + n)
            offset += n
            tiles += row_tiles
            layouts += row_layouts
        if not tiles:
            return None
        return _Images(tiles, layouts, source.to(self.device) if to_device else source)

    def _image(self, image: Any, vl: Any, what: str) -> tuple[Tensor, Any]:
        """One image -> (tiles [n, C, S, S], layout), checked (``RequestError`` naming it)."""
        vc = vl.vision
        shape = (vc.num_channels, vc.image_size, vc.image_size)
        if isinstance(image, tuple):
            if len(image) != 2 or not isinstance(image[0], Tensor):
                raise RequestError(f"{what}: a processed image is a pair (pixel_values tensor, (height, width))")
            pixels, size = image
            try:
                lay = vl.image_layout(*(int(v) for v in size))
            except (TypeError, ValueError) as e:
                raise RequestError(f"{what}: image size {size!r}: {e}") from None
        else:
            from model.image_processing import MiniMaxVLImageProcessor

            try:
                processed = MiniMaxVLImageProcessor.for_config(vl)([image])  # the engine's tiles and grids
            except ValueError as e:
                raise RequestError(f"{what}: {e}") from None
            pixels = processed.pixel_values[0]
            lay = vl.image_layout(*(int(v) for v in processed.image_sizes[0].tolist()))
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != shape or not pixels.is_floating_point():
            raise RequestError(f"{what}: pixel_values must be a float tensor [tiles, {', '.join(map(str, shape))}], "
                               f"got {pixels.dtype} {list(pixels.shape)}")
        if pixels.shape[0] != lay.num_tiles:
            raise RequestError(f"{what}: a {lay.height}x{lay.width} image takes {lay.num_tiles} tiles (thumbnail + "
                               f"{lay.rows}x{lay.cols}), pixel_values holds {pixels.shape[0]}")
        if not bool(torch.isfinite(pixels).all()):
            raise RequestError(f"{what}: pixel_values hold NaN or infinite values")
        return pixels, lay

    # ------------------------------------------------------------------------------------------------ requests
    def _prepare(
        self, input_ids: Any, max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
        eos_token_id: int | None, seed: int | None, attention_mask: Any, pad_token_id: int | None,
        images: Any = None,
    ) -> _Request:
        """Validate a request completely (nothing touches the state here) and build the left-padded batch."""
        try:
            sampling = SamplingParams(temperature, top_k, top_p)
        except ValueError as e:
            raise RequestError(str(e)) from None
        V = self.vocab_size
        for name, value in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
            if value is not None and not (isinstance(value, int) and 0 <= value < V):
                raise RequestError(f"{name} {value!r} is outside the vocabulary [0, {V})")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX):
            raise RequestError(f"seed must be an integer in [0, 2**63 - 1], got {seed!r}")
        pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)

        rows, prompt = self._rows(input_ids, attention_mask, pad)
        B = len(rows)
        if B > self.max_batch:
            raise RequestError(f"batch of {B} prompts exceeds the engine's max_batch {self.max_batch} (the batch "
                               "size it was built for); split the request or rebuild with a larger --max-batch")
        for b, row in enumerate(rows):
            if len(row) == 0:
                raise RequestError(f"prompt {b} is empty (at least one token is needed)")
            bad = [(j, t) for j, t in enumerate(row) if not 0 <= t < V]
            if bad:
                j, t = bad[0]
                raise RequestError(f"prompt {b}: token id {t} at index {j} is outside the vocabulary [0, {V})"
                                   f" ({len(bad)} such id(s) in this prompt)")
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        L = int(lengths.max())
        if L + max_new_tokens > self.max_seq_len:
            b = int(lengths.argmax())
            raise RequestError(
                f"prompt {b} has {L} tokens; with max_new_tokens {max_new_tokens} the sequence would reach "
                f"{L + max_new_tokens} tokens, past the engine's context length max_seq_len {self.max_seq_len}"
            )
        pages = sum(self.pages.pages_for(int(n) + max_new_tokens) for n in lengths)
        if pages > self.pages.num_pages:
            raise RequestError(
                f"KV-cache pool out of pages: the batch needs {pages} pages of {self.pages.page_size} tokens for its "
                f"prompts plus max_new_tokens {max_new_tokens}, the pool has {self.pages.num_pages} "
                f"(build with a larger --num-pages, or send fewer or shorter prompts)")
        ids = torch.full((B, L), pad, dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, L - len(row):] = torch.tensor(row, dtype=torch.long)
        if prompt is None:
            prompt = ids
        request_images = self._images(images, rows, L)
        return _Request(ids.to(self.device), lengths, max_new_tokens, sampling, eos_token_id, seed, pad, prompt,
                        request_images)

    @staticmethod
    def _rows(input_ids: Any, attention_mask: Any, pad: int) -> tuple[list[list[int]], Tensor | None]:
        """Prompts as lists of ints, and the tensor to return in front of the new tokens (None: the padded ids)."""
        if isinstance(input_ids, Tensor):
            ids = input_ids.detach().cpu()
            if ids.dim() == 1:
                ids = ids[None]
            if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
                raise RequestError(f"input_ids must be an integer tensor [B, T], got {ids.dtype} {tuple(ids.shape)}")
            if attention_mask is None:
                return ids.tolist(), None
            mask = torch.as_tensor(attention_mask).detach().cpu()
            if mask.dim() == 1:
                mask = mask[None]
            if mask.shape != ids.shape:
                raise RequestError(f"attention_mask {tuple(mask.shape)} must have the shape of input_ids "
                                   f"{tuple(ids.shape)}")
            if not ((mask == 0) | (mask == 1)).all():
                raise RequestError("attention_mask must hold only 0 (pad) and 1 (token)")
            mask = mask.long()
            # left padding: once a row's mask is 1 it stays 1
            not_left = (mask.cummax(dim=1).values != mask).any(dim=1)
            if not_left.any():
                b = int(not_left.nonzero()[0])
                raise RequestError(f"attention_mask row {b} is not left padding (zeros, then ones); "
                                   "pass left-padded prompts or a list of token lists")
            rows = [row[mask_row.bool()].tolist() for row, mask_row in zip(ids, mask)]
            T = ids.shape[1]
            L = max((len(r) for r in rows), default=0)
            return rows, ids[:, T - L:].masked_fill(mask[:, T - L:] == 0, pad) if L else None
        if attention_mask is not None:
            raise RequestError("attention_mask goes with a tensor input_ids; a list of token lists needs none")
        if isinstance(input_ids, Sequence) and not isinstance(input_ids, (str, bytes)):
            if len(input_ids) == 0:
                raise RequestError("input_ids is empty: no prompt")
            if all(isinstance(t, int) and not isinstance(t, bool) for t in input_ids):
                return [list(input_ids)], None  # one prompt
            rows = []
            for b, row in enumerate(input_ids):
                if isinstance(row, Tensor):
                    row = row.tolist()
                if not isinstance(row, Sequence) or not all(isinstance(t, int) and not isinstance(t, bool) for t in row):
                    raise RequestError(f"prompt {b} is not a list of integer token ids")
                rows.append(list(row))
            return rows, None
        raise RequestError(f"input_ids must be a tensor [B, T], a list of token ids or a list of such lists; "
                           f"got {type(input_ids).__name__}")

    def stream(
        self,
        input_ids: Any,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        seed: int | None = None,
        attention_mask: Any = None,
        pad_token_id: int | None = None,
        images: Any = None,
    ) -> Iterator[Tensor]:
        """Like ``generate``, but yields the new token of every row at each step (``[B]`` int64, on the engine's
        device) as soon as it is chosen. Rows that already stopped yield ``eos_token_id``; the iterator ends after
        ``max_new_tokens`` steps or when every row has produced ``eos_token_id``. The request is validated here,
        before the first token (``RequestError``)."""
        request = self._prepare(input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, seed,
                                attention_mask, pad_token_id, images)
        return self._run(request)

    def generate(
        self,
        input_ids: Any,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        seed: int | None = None,
        attention_mask: Any = None,
        pad_token_id: int | None = None,
        images: Any = None,
    ) -> Tensor:
        """Prompt plus generated ids, ``[B, L + max_new_tokens]`` int64 on the CPU; greedy by default.

        ``input_ids``: a tensor ``[B, T]`` (with an optional left-padding ``attention_mask``, 1 = token), one list
        of ids, or a list of lists (ragged). The prompt part is left padded to the longest prompt ``L`` with
        ``pad_token_id`` (default ``eos_token_id``, else 0). A row that produced ``eos_token_id`` stops there and is
        padded after it with ``eos_token_id`` up to the full width. Sampling: ``temperature`` (0 = greedy),
        ``top_k``, ``top_p`` (see ``runtime.sampling``), ``seed`` for a reproducible draw (None: torch's global
        generator). Raises ``RequestError`` for a request it cannot serve (the engine stays usable).

        ``images`` (VL engines): one list per prompt of the images its image tokens stand for, in order (a flat
        list for a single prompt); each image's ``num_tokens`` placeholders (id ``image_token_index``) must be one
        run in its prompt. An image is an RGB PIL image / HxWx3 uint8 array (``model.MiniMaxVLImageProcessor``
        for the engine's config) or a processed pair ``(pixel_values [1 + rows*cols, C, S, S], (height, width))``.
        """
        request = self._prepare(input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, seed,
                                attention_mask, pad_token_id, images)
        steps = [t.cpu() for t in self._run(request)]
        B = request.ids.shape[0]
        fill = request.eos_token_id if request.eos_token_id is not None else request.pad_token_id
        new = torch.full((B, request.max_new_tokens), fill, dtype=torch.long)
        if steps:
            new[:, : len(steps)] = torch.stack(steps, dim=1)
        return torch.cat([request.prompt.cpu(), new], dim=1)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def _run(self, request: _Request) -> Iterator[Tensor]:
        ids, lengths = request.ids, request.lengths
        B, L = ids.shape
        stats = self.stats = GenerationStats(batch=B, prompt_tokens=int(lengths.sum()), padded_prompt_len=L)
        generator = None
        if request.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(request.seed)
        start_cpu = lengths - L  # [B] position of column 0: negative for left pads
        start = start_cpu.to(self.device)
        self.reset(B)
        self.reserve([int(n) + request.max_new_tokens for n in lengths])  # fits: checked in _prepare
        t0 = time.perf_counter()
        features = source = None
        if request.images is not None:
            features = self.encode_images(request.images.tiles, request.images.layouts)
            source = request.images.source
            self._sync()
            stats.images, stats.image_tiles = len(request.images.tiles), sum(t.shape[0] for t in request.images.tiles)
            stats.vision_s = time.perf_counter() - t0
        for c0, c1 in chunk_plan(L, self.max_input_len):
            if c1 - c0 == 1:  # (never an image token: VL engines take chunks of >= 3, see check_vl_settings)
                logits = self.decode(ids[:, c0:c1], start + c0, (start_cpu + c0).tolist())
            else:
                embeds = None
                if features is not None:
                    embeds = features.index_select(0, source[:, c0:c1].clamp(min=0).reshape(-1)).view(
                        B, c1 - c0, features.shape[-1])
                logits = self.prefill(ids[:, c0:c1], start + c0, (start_cpu + c0).tolist(), embeds)
            stats.prefill_chunks += 1
        self._sync()
        stats.prefill_s = time.perf_counter() - t0
        positions = lengths.to(self.device)  # [B] next position of each row
        positions_cpu = lengths.clone()
        finished = torch.zeros(B, dtype=torch.bool, device=self.device)
        eos = request.eos_token_id
        s = request.sampling
        t0 = time.perf_counter()
        for i in range(request.max_new_tokens):
            token = sample(logits, s.temperature, s.top_k, s.top_p, generator)  # [B]
            if eos is not None:
                token = torch.where(finished, torch.full_like(token, eos), token)
                finished |= token == eos
            stats.new_tokens = i + 1
            yield token
            if i + 1 == request.max_new_tokens or (eos is not None and bool(finished.all())):
                break
            logits = self.decode(token[:, None], positions, positions_cpu.tolist())
            positions, positions_cpu = positions + 1, positions_cpu + 1
            stats.decode_steps += 1
        self._sync()
        stats.decode_s = time.perf_counter() - t0
