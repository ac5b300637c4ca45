"""Softmax attention over a paged KV cache: reference (``naive``), Triton kernels (``write``: KV write, ``prefill``,
``decode``: flash-decoding with a merge pass; imported on first use) and the ``minimax::paged_*`` ops (``op``)."""

from __future__ import annotations

from . import naive, op  # noqa: F401  (registers the ops)
