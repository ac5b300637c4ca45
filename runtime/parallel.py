"""Running a tensor-parallel engine folder (``build.py --tensor-parallel N``, ``export.parallel``): one process per
rank, started by ``torchrun --nproc-per-node N -m runtime ENGINE_DIR ...`` (or any launcher that sets ``RANK`` /
``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``).

Each process joins the world (gloo for CPU engines, NCCL for CUDA ones, ``cuda:LOCAL_RANK``), loads its rank's
engine folder and runs the same steps: the rank programs' collectives (all-reduces of partial sums, the all-gather
of the vocabulary-split logits) make every rank hold the same full logits after each step. Rank 0 owns the
request: it reads the prompt (tokenizer, images) and the sampling parameters, picks the seed when none is given,
and broadcasts them; the other ranks follow with the same request, so each samples the same token from the same
logits and seed. At the end the ranks' tokens are compared (a rank that diverged is an error, not a silent
mismatch).

A rank that dies or hangs does not hang the others: the process group is created with a timeout
(``MINIMAX_PG_TIMEOUT_S``, default 300 s), and a failed collective (peer gone, timeout) is raised as
``RankLostError`` naming this rank and the world.
"""

from __future__ import annotations

import datetime
import logging
import os
from pathlib import Path
from typing import Any

import torch

from export.engine_folder import EngineFolderError

logger = logging.getLogger(__name__)

__all__ = ["RankLostError", "join_world", "load_rank_engine", "share_request", "check_agreement", "gather_status",
           "control_group", "leave_world"]

DEFAULT_TIMEOUT_S = 300.0


class RankLostError(RuntimeError):
    """A collective failed: another rank died, or did not reach the collective within the process group's timeout."""


def join_world(engine_dir: str | Path, timeout_s: float | None = None) -> tuple[int, int, dict[str, Any]]:
    """Join the process group the launcher describes (environment), after checking that its size is the engine's.
    Returns ``(rank, world_size, parallel manifest)``. ``EngineFolderError`` names the mismatch."""
    import torch.distributed as dist

    from export.parallel import read_parallel_manifest

    manifest, _ = read_parallel_manifest(engine_dir, verify_files=True)
    n = manifest["parallel"]["world_size"]
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if env["WORLD_SIZE"] is None or env["RANK"] is None:
        raise EngineFolderError(f"{engine_dir}: a tensor-parallel engine of {n} ranks: start it with `torchrun "
                                f"--nproc-per-node {n} -m runtime {engine_dir} ...` (RANK / WORLD_SIZE are not set)")
    try:
        world, rank = int(env["WORLD_SIZE"]), int(env["RANK"])
    except ValueError:
        raise EngineFolderError(f"RANK {env['RANK']!r} / WORLD_SIZE {env['WORLD_SIZE']!r}: not integers") from None
    if world != n:
        raise EngineFolderError(f"{engine_dir}: the engine was built for {n} ranks (--tensor-parallel {n}); this "
                                f"world has {world} (torchrun --nproc-per-node {n})")
    if not 0 <= rank < n:
        raise EngineFolderError(f"RANK {rank} is outside the world of {n}")
    if timeout_s is None:
        timeout_s = float(os.environ.get("MINIMAX_PG_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    device = manifest["device"]
    if device == "cuda":
        local = int(env["LOCAL_RANK"] or rank)
        if not torch.cuda.is_available() or local >= torch.cuda.device_count():
            raise EngineFolderError(f"{engine_dir}: rank {rank} needs cuda:{local}, and this machine has "
                                    f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} GPUs")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    if dist.get_world_size() != n or dist.get_rank() != rank:
        raise EngineFolderError(f"the process group is rank {dist.get_rank()} of {dist.get_world_size()}; the "
                                f"environment says rank {rank} of {world}")
    name = manifest["parallel"]["group_name"]
    if dist.group.WORLD.group_name != name:
        raise EngineFolderError(f"{engine_dir}: the rank programs were compiled against process group {name!r}; "
                                f"this process's world group is {dist.group.WORLD.group_name!r}")
    global _CONTROL
    # Python-level exchanges (the request, load status, agreement) on a group of their own: a gloo work holding
    # Python-owned tensors is destroyed on gloo's worker thread, which then waits for the GIL; on the world group
    # that thread would stall the rank programs' collectives while an AOTInductor call holds the GIL (a deadlock)
    _CONTROL = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    logger.info("rank %d of %d joined (%s, timeout %.0f s)", rank, n, dist.get_backend(), timeout_s)
    return rank, n, manifest


_CONTROL = None  # the gloo group of the Python-level exchanges (join_world)


def control_group():
    """The process group for Python objects between the ranks (``join_world`` creates it)."""
    if _CONTROL is None:
        raise RuntimeError("runtime.parallel: join_world first")
    return _CONTROL


def load_rank_engine(engine_dir: str | Path, rank: int, device: str | torch.device | None = None):
    """This rank's ``runtime.Engine`` of a parallel folder (its programs, weights and state slice), reporting the
    full model's vocabulary and config (the programs return the full logits)."""
    from export.parallel import read_parallel_manifest
    from model.config import MiniMaxConfig

    from .engine import Engine

    manifest, _ = read_parallel_manifest(engine_dir, rank=rank)
    folder = Path(engine_dir) / manifest["parallel"]["ranks"][rank]
    if device is None and manifest["device"] == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    engine = Engine.load(folder, device=device)
    engine.config = MiniMaxConfig.from_dict(manifest["model_config"])
    engine.vocab_size = engine.config.vocab_size
    engine.rank, engine.world_size = rank, manifest["parallel"]["world_size"]
    return engine


def _collective(what: str, fn, *args):
    import torch.distributed as dist

    try:
        return fn(*args)
    except (RuntimeError, dist.DistError) as e:  # gloo / NCCL: peer closed, timeout, aborted
        raise RankLostError(f"rank {dist.get_rank()} of {dist.get_world_size()}: {what} failed (another rank died or "
                            f"did not arrive within the process group's timeout): {str(e).splitlines()[0][:300]}"
                            ) from e


def share_request(request: dict[str, Any] | None, rank: int) -> dict[str, Any]:
    """Rank 0's request (prompt ids, sampling parameters, seed) on every rank: ``request`` on rank 0, None elsewhere.
    Rank 0 fixes the seed when the request has none, so that sampling agrees across ranks."""
    import torch.distributed as dist

    box = [request]
    if rank == 0 and request is not None and request.get("seed") is None and request.get("temperature", 0) > 0:
        box[0] = {**request, "seed": int(torch.randint(0, 2**62, ()).item())}
    _collective("sharing the request", dist.broadcast_object_list, box, 0, control_group())
    if box[0] is None:
        raise RankLostError("rank 0 sent no request")
    return box[0]


def check_agreement(tokens: list[int], rank: int) -> None:
    """Every rank generated ``tokens``; ``RankLostError`` (naming the first rank that differs) otherwise."""
    import torch.distributed as dist

    everyone: list[Any] = [None] * dist.get_world_size()
    _collective("comparing the generated tokens", dist.all_gather_object, everyone, tokens, control_group())
    for r, got in enumerate(everyone):
        if got != everyone[0]:
            raise RankLostError(f"rank {r} generated {got[:8]}... where rank 0 generated {everyone[0][:8]}...: the "
                                "ranks diverged")


def gather_status(status: str) -> list[str]:
    """Every rank's ``status`` ("ok" or an error message), in rank order."""
    import torch.distributed as dist

    everyone: list[Any] = [None] * dist.get_world_size()
    _collective("sharing the ranks' status", dist.all_gather_object, everyone, status, control_group())
    return everyone


def leave_world() -> None:
    global _CONTROL
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    _CONTROL = None
