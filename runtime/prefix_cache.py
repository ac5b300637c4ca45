"""Prefix caching for a hybrid model: shared KV pages plus lightning-state snapshots at page boundaries.

A softmax layer's cache of a prefix is its KV pages, which any request with that prefix can read; a lightning
layer's is one ``[H, D, D]`` state that sums the whole prefix, which cannot be cut at an arbitrary position after
the fact. So the cache keeps, for a prompt prefix that ends on a page boundary ``r = n * page_size``:

* the ``n`` full KV pages of the prefix (one reference each in the engine's ``PagePool``: a page stays valid while
  the cache holds it, whoever wrote it), as a chain of blocks keyed by ``(parent block, the page's tokens)`` (exact
  token comparison: no hash collisions);
* a snapshot of every lightning layer's state of the row at position ``r`` (fp32 ``[H, D, D]`` per lightning
  layer, on the engine's device), taken right after a prefill chunk that ended at ``r``. The scheduler ends its
  chunks on page boundaries when the cache is on, so that there are such moments.

A new request looks up the longest chain of cached blocks that its prompt starts with and whose last block has a
snapshot, at most ``len(prompt) - 1`` tokens long (a prefill step must remain, to produce the first token's
logits); it adopts those pages, restores the snapshot into its row, and prefills only the rest. The results are the
same tokens as without the cache up to the floating-point effects of other chunk boundaries (tested: greedy tokens
equal).

Memory: snapshots are evicted least recently used first when their total bytes exceed ``max_bytes``; blocks (and
their pages) are evicted least recently used first when the pool needs pages for an admission (``evict_pages``),
with every block below them (unreachable without their parent). A lookup touches a chain from its last block to the
first, so a parent is never older than its children.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

from torch import Tensor

from .engine import PagePool

logger = logging.getLogger(__name__)

__all__ = ["PrefixCache", "PrefixHit"]


@dataclass(eq=False)
class _Block:
    key: tuple
    parent: "_Block | None"
    page: int
    depth: int  # 1-based: the block covers positions (depth - 1) * page_size .. depth * page_size - 1
    snapshot: list[Tensor] | None = None
    children: set = field(default_factory=set)
    uid: int = 0


@dataclass
class PrefixHit:
    """A cached prefix a request can resume from: ``length`` positions, their pages, the lightning snapshot."""

    length: int
    pages: list[int]
    snapshot: list[Tensor]


class PrefixCache:
    def __init__(self, pages: PagePool, max_bytes: int):
        self.pages = pages
        self.page_size = pages.page_size
        self.max_bytes = int(max_bytes)
        self.blocks: OrderedDict[tuple, _Block] = OrderedDict()  # LRU order: oldest first
        self.snapshot_bytes = 0
        self._uids = itertools.count(1)
        self.hits = 0  # admissions that resumed from a cached prefix
        self.tokens_reused = 0  # prompt tokens not prefilled thanks to the cache
        self.evicted_pages = 0  # pages given back to the pool for admissions

    # ------------------------------------------------------------------------------------------------ queries
    @property
    def cached_pages(self) -> int:
        return len(self.blocks)

    def _key(self, parent: _Block | None, tokens: Sequence[int]) -> tuple:
        return (parent.uid if parent is not None else 0, tuple(tokens))

    def _chain(self, prompt: Sequence[int], limit: int) -> list[_Block]:
        chain: list[_Block] = []
        ps = self.page_size
        parent = None
        for i in range(limit // ps):
            block = self.blocks.get(self._key(parent, prompt[i * ps:(i + 1) * ps]))
            if block is None:
                break
            chain.append(block)
            parent = block
        return chain

    def lookup(self, prompt: Sequence[int]) -> PrefixHit | None:
        """The longest cached prefix of ``prompt`` with a snapshot, shorter than the prompt (None if there is none);
        the chain is marked recently used."""
        chain = self._chain(prompt, len(prompt) - 1)
        for block in reversed(chain):  # children first, so that parents end up more recent
            self.blocks.move_to_end(block.key)
        while chain and chain[-1].snapshot is None:
            chain.pop()
        if not chain:
            return None
        return PrefixHit(chain[-1].depth * self.page_size, [b.page for b in chain], chain[-1].snapshot)

    def record_hit(self, hit: PrefixHit) -> None:
        """Count a lookup result that a request resumed from."""
        self.hits += 1
        self.tokens_reused += hit.length

    def needs_snapshot(self, prompt: Sequence[int], length: int, last: "_Block | None" = None) -> bool:
        """Whether ``prompt[:length]`` (whole pages) lacks a cached snapshot. ``last``: the block ``insert``
        returned for this prompt before (spares walking the chain again while it is still cached)."""
        if last is not None and self.blocks.get(last.key) is last and last.depth == length // self.page_size:
            return last.snapshot is None
        chain = self._chain(prompt, length)
        return len(chain) < length // self.page_size or chain[-1].snapshot is None

    # ------------------------------------------------------------------------------------------------ updates
    def insert(self, prompt: Sequence[int], row_pages: Sequence[int], length: int, snapshot: list[Tensor],
               last: "_Block | None" = None) -> _Block:
        """Record that a row holding ``prompt[:length]`` (``length`` a multiple of the page size) in ``row_pages``
        has the lightning ``snapshot`` (cloned by the caller) at ``length``; returns the prefix's last block.
        ``last``: the block a previous ``insert`` of this prompt returned; the chain continues from it while it is
        cached (its ancestors are then cached too: a block is only dropped with everything below it), so a long
        prompt's chunks do not walk its whole chain each time."""
        ps = self.page_size
        if length % ps or length <= 0 or length > len(prompt):
            raise ValueError(f"prefix cache: length {length} is not a whole number of pages of the prompt")
        parent, first = None, 0
        if last is not None and self.blocks.get(last.key) is last and last.depth <= length // ps:
            parent, first = last, last.depth
        for i in range(first, length // ps):
            key = self._key(parent, prompt[i * ps:(i + 1) * ps])
            block = self.blocks.get(key)
            if block is None:
                block = _Block(key, parent, row_pages[i], i + 1, uid=next(self._uids))
                self.pages.ref(block.page)
                self.blocks[key] = block
                if parent is not None:
                    parent.children.add(block)
            parent = block
        for b in self._ancestry(parent):
            self.blocks.move_to_end(b.key)
        if parent.snapshot is None:
            parent.snapshot = snapshot
            self.snapshot_bytes += sum(t.numel() * t.element_size() for t in snapshot)
        self._trim_snapshots()
        return parent

    @staticmethod
    def _ancestry(block: _Block) -> list[_Block]:
        out = []
        while block is not None:
            out.append(block)
            block = block.parent
        return out  # the block first, the root last (touched in that order: parents most recent)

    def _drop_snapshot(self, block: _Block) -> None:
        if block.snapshot is not None:
            self.snapshot_bytes -= sum(t.numel() * t.element_size() for t in block.snapshot)
            block.snapshot = None

    def _trim_snapshots(self) -> None:
        for block in list(self.blocks.values()):
            if self.snapshot_bytes <= self.max_bytes:
                break
            self._drop_snapshot(block)

    def _remove(self, block: _Block) -> int:
        """Drop a block and every block below it; returns the pages that became free."""
        freed = 0
        stack = [block]
        while stack:
            b = stack.pop()
            stack.extend(b.children)
            self._drop_snapshot(b)
            del self.blocks[b.key]
            if self.pages.refs[b.page] == 1:
                freed += 1
            self.pages.unref(b.page)
        if block.parent is not None:
            block.parent.children.discard(block)
        return freed

    def evict_pages(self, need: int) -> int:
        """Free up to ``need`` pages by dropping least recently used blocks that no row holds. Returns the pages
        freed."""
        freed = 0
        for block in list(self.blocks.values()):
            if freed >= need:
                break
            if block.key not in self.blocks or self.pages.refs[block.page] != 1:
                continue  # already dropped with its parent, or a row reads it
            freed += self._remove(block)
        self.pages._free.sort(reverse=True)
        self.evicted_pages += freed
        return freed

    def evictable_pages(self) -> int:
        return sum(1 for b in self.blocks.values() if self.pages.refs[b.page] == 1)

    def clear(self) -> None:
        """Drop everything (pages back to the pool unless a row still reads them)."""
        for block in list(self.blocks.values()):
            if block.key in self.blocks and block.parent is None:
                self._remove(block)
        for block in list(self.blocks.values()):  # orphans (cannot happen, kept for safety)
            if block.key in self.blocks:
                self._remove(block)
        self.pages._free.sort(reverse=True)
