"""Elapsed-time lines while a long step runs (lowering takes minutes and prints nothing of its own)."""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager
from typing import Iterator

logger = logging.getLogger("export.progress")

INTERVAL_S = float(os.environ.get("MINIMAX_PROGRESS_INTERVAL_S", "15"))  # seconds between lines


@contextmanager
def progress(what: str, interval_s: float | None = None, log: logging.Logger = logger) -> Iterator[None]:
    """Log ``"<what>: still running, N s"`` every ``interval_s`` seconds (default ``INTERVAL_S``) until the block
    ends; a daemon thread, stopped when the block ends (also on an exception)."""
    interval = INTERVAL_S if interval_s is None else interval_s
    done = threading.Event()
    start = time.perf_counter()

    def tick() -> None:
        while not done.wait(interval):
            log.info("%s: still running, %.0f s", what, time.perf_counter() - start)

    thread = threading.Thread(target=tick, name=f"progress: {what}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
