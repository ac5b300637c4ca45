"""Python runtime: load an engine folder (or wrap the eager model), keep the decoding state, generate and sample.

    from runtime import Engine
    engine = Engine.load("engines/tiny")
    ids = engine.generate([[5, 6, 7], [8, 9]], max_new_tokens=16)      # greedy, ragged batch

See ``runtime/README.md`` (usage, ragged batches and chunking, errors) and ``python -m runtime --help`` (CLI).
"""

from .engine import Engine, GenerationStats, RequestError, chunk_plan
from .sampling import SamplingParams, sample

__all__ = ["Engine", "GenerationStats", "RequestError", "SamplingParams", "chunk_plan", "sample"]
