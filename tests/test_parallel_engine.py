"""Tensor-parallel engine folders and their torchrun runtime (issue 16), on the CPU with gloo: ``build.py
--tensor-parallel 2`` writes one AOTInductor engine folder per rank; ``torchrun --nproc-per-node 2 -m runtime``
generates what the single-process model generates; bad worlds and damaged folders are refused by name; a rank that
dies mid-generation ends the other with an error, not a hang. One folder is built per session (~60 s)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import build
from export.engine_folder import EngineFolderError

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [5, 6, 7, 8, 9]
BUILD_FLAGS = ["--device", "cpu", "--dtype", "fp32", "--max-batch", "2", "--max-input-len", "8", "--max-seq-len",
               "32", "--page-size", "8"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MINIMAX_PG_TIMEOUT_S": "60", **extra}


def _torchrun(folder: Path, nproc: int, *flags: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(_port()), "-m", "runtime", str(folder), *flags]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=_env())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random checkpoint in the official layout (4 heads, 2 KV heads, 5 experts of I = 40) whose vocabulary
    (132) splits over 2 ranks."""
    from tests.conftest import make_hf_model

    path = tmp_path_factory.mktemp("tp_ckpt")
    make_hf_model(seed=1, vocab_size=132).save_pretrained(path, max_shard_size="100KB")
    return path


def _single_process_greedy(checkpoint: Path, max_new_tokens: int) -> list[int]:
    """The checkpoint's model in one process, through the eager engine."""
    from model import MiniMaxForCausalLM
    from runtime import Engine

    model = MiniMaxForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    engine = Engine.from_model(model, max_batch=2, max_input_len=8, max_seq_len=32, page_size=8)
    return [int(t[0]) for t in engine.stream([PROMPT], max_new_tokens=max_new_tokens)]


@pytest.fixture(scope="module")
def tp2(checkpoint, tmp_path_factory) -> Path:
    """``build.py --checkpoint ... --tensor-parallel 2``: per-rank skeletons, the checkpoint streamed once into both
    ranks' weights."""
    out = tmp_path_factory.mktemp("tp") / "tp2"
    assert build.main(["--checkpoint", str(checkpoint), "--out", str(out), "--tensor-parallel", "2",
                       "--shard-mb", "1", *BUILD_FLAGS]) == 0
    return out


def _rank_model(full, rank: int, expert_parallel: bool = False):
    from export.parallel import fake_world
    from model.parallel import ParallelPlan, tensor_parallel_model

    with fake_world(rank, 2):
        return tensor_parallel_model(full, ParallelPlan(full.config, 2, expert_parallel=expert_parallel), rank)


def test_folder_layout_manifests_and_weights(tp2, checkpoint):
    """One manifest for the folder (world, ranks, the full config) and an engine folder per rank holding its
    slice: its config, and weights equal to ``tensor_parallel_model`` of the loaded model tensor for tensor."""
    from export.parallel import read_parallel_manifest
    from export.weights import load_weights
    from model import MiniMaxForCausalLM
    from runtime import Engine

    top, _ = read_parallel_manifest(tp2)
    assert top["parallel"]["world_size"] == 2 and top["parallel"]["ranks"] == ["rank0", "rank1"]
    assert top["model_config"]["num_attention_heads"] == 4 and top["model_config"]["vocab_size"] == 132
    full = MiniMaxForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    for rank in range(2):
        _, sub = read_parallel_manifest(tp2, rank=rank)
        assert sub["parallel"] == {"world_size": 2, "rank": rank, "expert_parallel": False, "group_name": "0"}
        c = sub["model_config"]  # the rank's slice: 2 of 4 heads, 1 of 2 KV heads, half of I and of the vocabulary
        assert (c["num_attention_heads"], c["num_key_value_heads"], c["intermediate_size"], c["vocab_size"]) == \
            (2, 1, 20, 66)
        got = load_weights(tp2 / f"rank{rank}", sub["weights"], torch.device("cpu"))
        local = _rank_model(full, rank)
        want = {**dict(local.named_parameters()), **dict(local.named_buffers())}
        assert set(got) == set(want)
        for name, t in want.items():
            assert torch.equal(got[name], t.detach()), (rank, name)
    assert sorted(p.name for p in tp2.iterdir()) == ["manifest.json", "rank0", "rank1"]
    with pytest.raises(EngineFolderError, match="tensor-parallel engine of 2 ranks.*torchrun --nproc-per-node 2"):
        Engine.load(tp2)
    with pytest.raises(EngineFolderError, match="rank 1 of a 2-rank tensor-parallel engine; run the parent folder"):
        Engine.load(tp2 / "rank1")  # outside a world of 2


@pytest.mark.parametrize("program", ["prefill", "decode"])
def test_program_outputs_are_not_collective_buffers(tp2, program):
    """The deadlock of docs/parallel.md: a collective's buffer that leaves an AOTInductor CPU program (gets a
    Python object) makes gloo's worker thread wait for the GIL the next program call holds. The logits must be a
    buffer of their own, which no collective of the program touches."""
    import re
    import zipfile

    with zipfile.ZipFile(tp2 / "rank0" / f"{program}.pt2") as z:
        cpp = next(z.read(n).decode() for n in z.namelist() if n.endswith("wrapper.cpp"))
    outputs = re.findall(r"output_handles\[\d+\] = (\w+)\.release\(\)", cpp)
    collectives = re.findall(
        r"c10d_functional_(?:all_reduce_|all_gather_into_tensor)\((?:[^;]*?reinterpret_tensor_wrapper\()?(\w+)", cpp)
    assert outputs and len(collectives) >= 10, (outputs, len(collectives))
    assert not set(outputs) & set(collectives), set(outputs) & set(collectives)


def test_torchrun_greedy_generation_equals_the_single_process_model(tp2, checkpoint):
    r = _torchrun(tp2, 2, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr[-3000:]
    got = [int(t) for t in r.stdout.strip().splitlines()[-1].split(",")]
    assert got == _single_process_greedy(checkpoint, 8)


def test_torchrun_sampling_without_a_seed_agrees_across_ranks(tp2):
    """Rank 0 fixes the seed and shares it: without that the ranks would sample different tokens and the final
    agreement check would fail the run."""
    r = _torchrun(tp2, 2, "--prompt-ids", "5,6,7", "--max-new-tokens", "6", "--temperature", "1.5")
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(r.stdout.strip().splitlines()[-1].split(",")) == 6


def test_wrong_world_and_plain_python_are_refused_by_name(tp2):
    r = _torchrun(tp2, 1, "--prompt-ids", "5,6,7")
    assert r.returncode != 0 and "built for 2 ranks (--tensor-parallel 2); this world has 1" in r.stderr
    r = subprocess.run([sys.executable, "-m", "runtime", str(tp2), "--prompt-ids", "5,6,7"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 2 and "torchrun --nproc-per-node 2" in r.stderr


def test_damaged_or_mixed_folders_are_refused(tp2, tmp_path):
    from export.parallel import read_parallel_manifest

    bad = tmp_path / "bad"
    shutil.copytree(tp2, bad)
    manifest = json.loads((bad / "rank1" / "manifest.json").read_text())
    manifest["parallel"]["rank"] = 0
    (bad / "rank1" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineFolderError, match=r"rank1/manifest.json: its sha256 differs"):
        read_parallel_manifest(bad)
    top = json.loads((bad / "manifest.json").read_text())
    top["parallel"]["world_size"] = 4
    (bad / "manifest.json").write_text(json.dumps(top))
    with pytest.raises(EngineFolderError, match="world_size 4 does not match"):
        read_parallel_manifest(bad)


@pytest.mark.parametrize("flags,message", [
    (["--tensor-parallel", "4"], "num_attention_heads = 6 does not split over 4 ranks"),
    (["--tensor-parallel", "2", "--backend", "tensorrt"], "backend 'tensorrt' builds GPU engines"),
    (["--tensor-parallel", "2", "--backend", "onnx", "--quantize", "experts-fp8"],
     "experts-fp8: only the aoti backend lowers it"),
])
def test_build_refuses_what_it_cannot_split(flags, message, tmp_path, caplog):
    assert build.main(["--preset", "tiny", "--out", str(tmp_path / "e"), *flags, *BUILD_FLAGS]) == 2
    assert message in caplog.text
    assert not (tmp_path / "e").exists()


def test_expert_parallel_folder_generates_what_the_single_process_model_does(tmp_path):
    """``--tensor-parallel 2 --expert-parallel`` (tiny preset: 2 of its 4 experts per rank, heads split as under
    tensor parallelism): through torchrun, greedy tokens == the single-process model's."""
    from model import MiniMaxConfig, MiniMaxForCausalLM
    from runtime import Engine

    out = tmp_path / "ep2"
    assert build.main(["--preset", "tiny", "--out", str(out), "--tensor-parallel", "2", "--expert-parallel",
                       *BUILD_FLAGS]) == 0
    from export.parallel import read_parallel_manifest

    _, sub = read_parallel_manifest(out, rank=1)
    assert sub["parallel"]["expert_parallel"] is True
    assert sub["weights"]["tensors"]["model.layers.0.block_sparse_moe.experts.w1"]["shape"][0] == 2
    r = _torchrun(out, 2, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr[-3000:]
    got = [int(t) for t in r.stdout.strip().splitlines()[-1].split(",")]
    model = MiniMaxForCausalLM(MiniMaxConfig.preset("tiny")).init_random_weights(seed=0).eval()
    engine = Engine.from_model(model, max_batch=2, max_input_len=8, max_seq_len=32, page_size=8)
    assert got == [int(t[0]) for t in engine.stream([PROMPT], max_new_tokens=8)]


def test_expert_parallel_refuses_experts_that_do_not_split(checkpoint, tmp_path, caplog):
    assert build.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "e"), "--tensor-parallel", "2",
                       "--expert-parallel", *BUILD_FLAGS]) == 2
    assert "--expert-parallel --tensor-parallel 2: num_local_experts = 5 does not split over 2 ranks" in caplog.text
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("expert_parallel", [False, True])
def test_int8_checkpoint_streamed_once_for_all_ranks_equals_the_split_model(expert_parallel, tmp_path):
    """``FanOut`` of ``RankWriter`` s: one pass of the checkpoint converter with int8 experts, each tensor cut to
    each rank's slice as it streams (experts as stacked parts with their scales: I split, or whole experts under
    expert parallelism), equals ``tensor_parallel_model`` of the loaded, quantized model, tensor for tensor."""
    from export.parallel import FanOut, RankWriter
    from export.weights import ShardWriter, load_weights
    from model import MiniMaxForCausalLM
    from model.loading import convert_checkpoint
    from model.parallel import ParallelPlan
    from tests.conftest import make_hf_model

    checkpoint = tmp_path / "ckpt"  # 4 experts, so that they split over 2 ranks too
    make_hf_model(seed=2, vocab_size=132, num_local_experts=4).save_pretrained(checkpoint, max_shard_size="100KB")
    full = MiniMaxForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).quantize_experts_("experts-int8")
    plan = ParallelPlan(full.config, 2, expert_parallel=expert_parallel)
    writers = [RankWriter(ShardWriter(tmp_path / f"r{rank}", shard_bytes=100_000), plan, rank) for rank in range(2)]
    convert_checkpoint(checkpoint, FanOut(writers), torch.float32, quantize="experts-int8")
    for rank, writer in enumerate(writers):
        got = load_weights(tmp_path / f"r{rank}", writer.close(), torch.device("cpu"))
        local = _rank_model(full, rank, expert_parallel)
        want = {**dict(local.named_parameters()), **dict(local.named_buffers())}
        assert set(got) == set(want)
        for name, t in want.items():
            assert got[name].dtype == t.dtype and torch.equal(got[name], t.detach()), (rank, name)


_DEATH_SCRIPT = r"""
import os, sys, time
import torch


def main(rank, world, port, folder, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), MINIMAX_PG_TIMEOUT_S="30")
    torch.set_num_threads(1)
    from runtime import __main__ as cli
    from runtime.engine import Engine

    if rank == 1:  # dies in its fourth step (after the prefill and two decode steps)
        step, calls = Engine._step, [0]

        def dying(self, *a, **k):
            calls[0] += 1
            if calls[0] == 4:
                os._exit(3)
            return step(self, *a, **k)

        Engine._step = dying
    start = time.time()
    rc = cli.main([folder, "--prompt-ids", "5,6,7", "--max-new-tokens", "12"])
    with open(f"{out}/rank{rank}.txt", "w") as f:
        f.write(f"{rc} {time.time() - start:.1f}")


if __name__ == "__main__":
    import torch.multiprocessing as mp
    ctx = mp.start_processes(main, args=(2, int(sys.argv[1]), sys.argv[2], sys.argv[3]), nprocs=2, join=False,
                             start_method="spawn")
    for p in ctx.processes:
        p.join(240)
"""


def test_a_rank_dying_mid_generation_ends_the_other_with_an_error(tp2, tmp_path):
    script = tmp_path / "death.py"
    script.write_text(_DEATH_SCRIPT)
    r = subprocess.run([sys.executable, str(script), str(_port()), str(tp2), str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=_env())
    assert not (tmp_path / "rank1.txt").exists()  # rank 1 died
    rc, seconds = (tmp_path / "rank0.txt").read_text().split()
    assert rc == "1", r.stderr[-3000:]
    assert float(seconds) < 60  # the peer's closed connection (or the 30 s timeout), not a hang
    assert "error: rank 0 of 2: a step failed (another rank died" in r.stderr, r.stderr[-3000:]
