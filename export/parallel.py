"""Tensor-parallel engine folders (issue 16): one complete engine folder per rank under one parallel manifest.

    ENGINE_DIR/manifest.json     the folder's manifest: world size, plan, the full model config, the ranks' folders
    ENGINE_DIR/rank0/ ...        rank r's engine folder (its own manifest: the rank's slice of the config, its
                                 programs and weights; ``"parallel": {"world_size", "rank", "group_name", ...}``)

Each rank's programs are exported from ``model.parallel.rank_skeleton`` / ``tensor_parallel_model``: their
collectives are ``torch.ops._c10d_functional`` nodes naming the process group by its name, the default (world)
group's name "0". Exporting and compiling them needs a process group of that name, so the build runs each rank
inside a *fake* world of the right size and rank (``torch.testing``'s ``FakeProcessGroup``: no peers, no
communication; only shapes and the group's name are read); at run time ``runtime.parallel`` joins the real world
(gloo / NCCL under ``torchrun``) and checks that its group has the name the programs were compiled with.

Every backend builds parallel folders. AOTInductor packages run the functional collectives themselves; the ONNX
lowering turns them into the ``minimax::all_reduce`` / ``all_gather`` plugin nodes, which TensorRT rank engines
run as JIT plugins around torch.distributed (``plugins/collectives.py``; the TensorRT path has not run here).
Expert-parallel folders run ``minimax::moe_ep`` (CUDA: the Triton pointer kernels with
the other ranks' slots skipped; CPU: the reference).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .engine_folder import (FORMAT_VERSION, MANIFEST_NAME, BuildSettings, EngineFolderError, read_manifest,
                            sha256_file, staged_folder)
from .progress import progress as progress_note

logger = logging.getLogger(__name__)

__all__ = ["GROUP_NAME", "RankWriter", "FanOut", "fake_world", "build_parallel_engine", "is_parallel_folder",
           "read_parallel_manifest"]

GROUP_NAME = "0"  # the default process group's name in torch.distributed: what the rank programs are compiled with


@contextlib.contextmanager
def fake_world(rank: int, world_size: int) -> Iterator[None]:
    """A default process group of ``world_size`` with this process as ``rank``, that never communicates: the
    functional collectives of a rank's model export and compile against it (torch.export / AOTInductor resolve
    the group's name and size). Refused while a real process group exists."""
    import torch.distributed as dist

    if dist.is_initialized():
        raise EngineFolderError("a parallel build runs outside any process group (one is initialized here)")
    try:
        from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend
    except ImportError as e:  # pragma: no cover - depends on the torch build
        raise EngineFolderError(f"this torch has no fake process group (torch.testing._internal.distributed."
                                f"fake_pg: {e}); a parallel build needs it") from e
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        if dist.group.WORLD.group_name != GROUP_NAME:
            raise EngineFolderError(f"the default process group is named {dist.group.WORLD.group_name!r}, "
                                    f"expected {GROUP_NAME!r}")
        yield
    finally:
        dist.destroy_process_group()


class RankWriter:
    """A weights writer (``export.weights.ShardWriter``'s ``add`` / ``add_part`` / ``close`` / ``sha256``) that
    keeps rank ``rank``'s slice of every full tensor handed to it: the checkpoint converters stream the full
    model's tensors, and each rank's folder receives its part (``ParallelPlan.shard``)."""

    def __init__(self, inner, plan, rank: int):
        self.inner, self.plan, self.rank = inner, plan, rank

    def add(self, name: str, tensor: torch.Tensor) -> None:
        from model.parallel import rank_tensor

        self.inner.add(name, rank_tensor(self.plan, name, tensor, self.rank).contiguous())

    def add_part(self, name: str, index: int, count: int, tensor: torch.Tensor) -> None:
        """Expert ``index`` of ``count`` of the stacked tensor ``name`` ([count, ...]): its slice, as ``add``."""
        s = self.plan.shard(name, (count, *tensor.shape), self.rank)
        if s.dim == 0:  # expert parallel: whole experts, this rank's only
            if s.start <= index < s.stop:
                self.inner.add_part(name, index - s.start, s.stop - s.start, tensor)
            return
        part = tensor if s.dim is None else tensor.narrow(s.dim - 1, s.start, s.stop - s.start)
        self.inner.add_part(name, index, count, part.contiguous())

    def close(self) -> dict[str, Any]:
        return self.inner.close()

    @property
    def sha256(self) -> str:
        return self.inner.sha256


class FanOut:
    """One weights writer that hands every tensor to several (``RankWriter`` s): one pass over a checkpoint fills
    every rank's weights."""

    def __init__(self, writers: list):
        self.writers = writers

    def add(self, name: str, tensor: torch.Tensor) -> None:
        for w in self.writers:
            w.add(name, tensor)

    def add_part(self, name: str, index: int, count: int, tensor: torch.Tensor) -> None:
        for w in self.writers:
            w.add_part(name, index, count, tensor)


def build_parallel_engine(
    rank_model: Callable[[int], torch.nn.Module], plan, settings: BuildSettings, out_dir: str | Path,
    overwrite: bool = False,
    convert_weights: Callable[[list[Path]], list[tuple[dict[str, Any], str]]] | None = None,
) -> dict[str, Any]:
    """Write a parallel engine folder: for each rank, ``rank_model(rank)`` (called inside that rank's fake world:
    ``model.parallel.tensor_parallel_model`` of a full model, or ``rank_skeleton`` when the weights come apart)
    built into ``rank<r>/`` by ``exporting.build_engine``; then the folder's manifest. ``convert_weights(folders)
    -> [(weights entry, sha256)] per rank`` writes every rank's weights first, in one pass (e.g. a checkpoint
    streamed through ``FanOut`` of ``RankWriter`` s into ``folders[r]/weights``); each rank's build then takes its
    shards (moved, not copied). All in one staging folder moved into place at the end (nothing half-written on
    failure). Returns the folder's manifest."""
    import shutil

    from .exporting import build_engine
    from .weights import WEIGHTS_DIR

    if settings.backend not in ("aoti", "onnx", "tensorrt"):
        raise EngineFolderError(f"--tensor-parallel: unknown backend {settings.backend!r}")
    if convert_weights is not None and settings.backend != "aoti":
        raise EngineFolderError(f"--tensor-parallel --backend {settings.backend}: the ranks' weights are streamed "
                                "into safetensors shards, which only AOTInductor folders read; build ONNX / TensorRT "
                                "rank folders from a model that holds its weights")
    n = plan.world_size
    ranks = [f"rank{r}" for r in range(n)]
    start = time.perf_counter()
    with staged_folder(out_dir, overwrite=overwrite) as folder:
        converted = None
        if convert_weights is not None:
            pending = [folder / f".weights-{rk}" for rk in ranks]
            with progress_note(f"converting the weights of {n} ranks"):
                converted = convert_weights(pending)
            if len(converted) != n:
                raise EngineFolderError(f"convert_weights returned {len(converted)} entries for {n} ranks")

        def take_weights(rank_folder: Path, r: int) -> tuple[dict[str, Any], str]:
            shutil.move(str(folder / f".weights-{ranks[r]}" / WEIGHTS_DIR), str(rank_folder / WEIGHTS_DIR))
            (folder / f".weights-{ranks[r]}").rmdir()
            return converted[r]

        rank_manifests = []
        for r in range(n):
            logger.info("rank %d of %d: exporting and compiling its programs", r, n)
            with fake_world(r, n):
                model = rank_model(r)
                writer = None if converted is None else (lambda f, r=r: take_weights(f, r))
                rank_manifests.append(build_engine(
                    model, settings, folder / ranks[r], weights_writer=writer,
                    parallel={"world_size": n, "rank": r, "expert_parallel": plan.expert_parallel,
                              "group_name": GROUP_NAME}))
                del model
        first = rank_manifests[0]
        manifest = {
            "format_version": FORMAT_VERSION,
            "backend": settings.backend,
            "device": settings.device,
            "dtype": settings.dtype,
            "model_config": plan.config.to_dict(),
            "quantization": first.get("quantization", "none"),
            "profiles": first["profiles"],
            "parallel": {"world_size": n, "expert_parallel": plan.expert_parallel, "group_name": GROUP_NAME,
                         "ranks": ranks,
                         "rank_manifests_sha256": [sha256_file(folder / rk / MANIFEST_NAME) for rk in ranks]},
            "build_timings": {"total_s": time.perf_counter() - start},
        }
        (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    logger.info("parallel engine (%d ranks) written to %s in %.1fs", n, out_dir, time.perf_counter() - start)
    return manifest


def is_parallel_folder(path: str | Path) -> bool:
    """Whether ``path``'s manifest is a parallel engine folder's (``parallel.ranks`` present)."""
    try:
        manifest = json.loads((Path(path) / MANIFEST_NAME).read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and isinstance(manifest.get("parallel"), dict) and "ranks" in manifest["parallel"]


def read_parallel_manifest(folder: str | Path, rank: int | None = None, verify_files: bool = True
                           ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The parallel folder's manifest, checked (version, world size, the ranks' folders and the hashes of their
    manifests), and with ``rank`` that rank's engine-folder manifest (``read_manifest``), whose ``parallel`` entry
    must name that rank of the same world. ``EngineFolderError`` names the file and field."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise EngineFolderError(f"{path}: cannot read the manifest ({e.strerror or e})") from e
    except ValueError as e:
        raise EngineFolderError(f"{path}: not JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise EngineFolderError(f"{path}: engine format version {manifest.get('format_version')!r} "
                                f"(this code reads {FORMAT_VERSION}); rebuild the engine")
    par = manifest.get("parallel")
    if not isinstance(par, dict) or "ranks" not in par:
        raise EngineFolderError(f"{path}: not a parallel engine folder (no parallel.ranks)")
    n, ranks, hashes = par.get("world_size"), par.get("ranks"), par.get("rank_manifests_sha256")
    if (not isinstance(n, int) or isinstance(n, bool) or n < 1 or not isinstance(ranks, list) or len(ranks) != n
            or not isinstance(hashes, list) or len(hashes) != n):
        raise EngineFolderError(f"{path}: parallel.world_size {n!r} does not match parallel.ranks / "
                                "rank_manifests_sha256")
    for r, (name, digest) in enumerate(zip(ranks, hashes)):
        if name != f"rank{r}":
            raise EngineFolderError(f"{path}: parallel.ranks[{r}] is {name!r}, expected 'rank{r}'")
        rank_manifest = folder / name / MANIFEST_NAME
        if not rank_manifest.is_file():
            raise EngineFolderError(f"{rank_manifest}: missing (rank {r}'s engine folder)")
        if verify_files and sha256_file(rank_manifest) != digest:
            raise EngineFolderError(f"{rank_manifest}: its sha256 differs from the one in {path} (the folder was "
                                    "modified or mixed with another build)")
    if rank is None:
        return manifest, None
    if not isinstance(rank, int) or not 0 <= rank < n:
        raise EngineFolderError(f"{path}: rank {rank!r} is outside this engine's world of {n} ranks")
    sub = read_manifest(folder / ranks[rank], verify_files=verify_files, hash_weights=False)
    got = sub.get("parallel")
    if not isinstance(got, dict) or got.get("rank") != rank or got.get("world_size") != n:
        raise EngineFolderError(f"{folder / ranks[rank] / MANIFEST_NAME}: parallel entry {got!r} is not rank {rank} "
                                f"of {n}")
    return manifest, sub

