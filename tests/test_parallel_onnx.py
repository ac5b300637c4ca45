"""Tensor-parallel ONNX rank folders (issue 16, the TensorRT path's input), on the CPU with gloo: ``build.py --backend
onnx --tensor-parallel 2`` writes each rank's graphs with its collectives as ``minimax::all_reduce`` plugin nodes
(``plugins/collectives.py``, the JIT plugins a TensorRT rank engine runs); evaluated with ``onnx.reference`` in a
2-process gloo world, whose collective nodes run those plugins' bodies, every rank's logits equal the single-process
model's over a prefill and decode steps. TensorRT itself is not installed here: no engine is built or run."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

import build  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUILD_FLAGS = ["--device", "cpu", "--dtype", "fp32", "--max-batch", "2", "--max-input-len", "8", "--max-seq-len",
               "32", "--page-size", "8"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(script: str, tmp_path: Path, *args: str, timeout: int = 400) -> None:
    path = tmp_path / "script.py"
    path.write_text(script)
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    import os

    env = {**os.environ, **env}
    done = subprocess.run([sys.executable, str(path), str(_port()), str(tmp_path), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.fixture(scope="module")
def onnx_tp2(tmp_path_factory) -> Path:
    """``build.py --preset tiny --backend onnx --tensor-parallel 2`` (random weights, seed 0)."""
    out = tmp_path_factory.mktemp("onnx_tp") / "tp2"
    assert build.main(["--preset", "tiny", "--backend", "onnx", "--tensor-parallel", "2", "--out", str(out),
                       *BUILD_FLAGS]) == 0
    return out


def test_rank_graphs_hold_collective_plugin_nodes(onnx_tp2):
    """Each rank's graphs: the collectives as ``minimax::all_reduce`` nodes (JIT plugin attributes, the world's size
    and the group's name), none of torch's c10d ops left, the rank's own weights (half the heads), onnx.checker
    clean."""
    import onnx

    from export.parallel import read_parallel_manifest
    from model import MiniMaxConfig

    manifest, rank1 = read_parallel_manifest(onnx_tp2, rank=1)
    assert manifest["parallel"]["world_size"] == 2 and rank1["backend"] == "onnx"
    assert rank1["parallel"]["rank"] == 1 and rank1["parallel"]["group_name"] == "0"
    config = MiniMaxConfig.preset("tiny")
    collectives_per_program = {}
    for rank in (0, 1):
        for name in ("prefill", "decode"):
            proto = onnx.load(str(onnx_tp2 / f"rank{rank}" / f"{name}.onnx"))
            onnx.checker.check_model(proto)
            nodes = [n for n in proto.graph.node if n.domain == "minimax" and n.op_type in ("all_reduce", "all_gather")]
            assert not [n for n in proto.graph.node if "c10d" in n.op_type or "wait" in n.op_type]
            for n in nodes:
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
                assert attrs == {"plugin_namespace": b"minimax", "plugin_version": b"1", "aot": 0, "world_size": 2,
                                 "group_name": b"0"}, attrs
            collectives_per_program[(rank, name)] = len(nodes)
            dims = {i.name.split("model.layers.", 1)[-1]: list(i.dims) for i in proto.graph.initializer}
            # the lightning layer's output norm spans its rank's heads; each expert's I is split
            assert dims["0.self_attn.norm.weight"] == [config.num_attention_heads // 2 * config.head_dim]
            assert dims["0.block_sparse_moe.experts.w1"] == [config.num_local_experts, config.intermediate_size // 2,
                                                             config.hidden_size]
    # embedding + per layer (attention output, MoE output) + one per lightning layer's norm + the logits gather
    # (an all-reduce on CPU programs: export/parallel.TensorParallel.all_gather)
    layers = config.num_hidden_layers
    n_lightning = sum(1 for t in config.layer_types if t == "linear_attention")
    want = 1 + 2 * layers + n_lightning + 1
    assert set(collectives_per_program.values()) == {want}, (collectives_per_program, want)


_ONNX_TP_SCRIPT = r"""
import os, sys, torch, torch.distributed as dist
from export.onnx_reference import OnnxReferenceProgram
from model import MiniMaxConfig, MiniMaxForCausalLM
from model.parallel import ParallelPlan, tensor_parallel_model


def main(rank, world, port, out, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    config = MiniMaxConfig.preset("tiny")
    full = MiniMaxForCausalLM(config, dtype=torch.float32).init_random_weights(seed=0).eval()  # build.py's model
    local = tensor_parallel_model(full, ParallelPlan(config, world), rank)
    prefill = OnnxReferenceProgram(f"{folder}/rank{rank}/prefill.onnx")
    decode = OnnxReferenceProgram(f"{folder}/rank{rank}/decode.onnx")
    ids = torch.randint(0, config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(2))
    ours, ref = local.new_state(2, 32, page_size=8), full.new_state(2, 32, page_size=8)
    table, state = ours.block_table, ours.flatten()
    errs = []
    with torch.no_grad():
        got, state = prefill(ids, torch.zeros(2, dtype=torch.long), table, state)  # the last position's logits
        want, ref = full.prefill(ids, ref)
        errs.append(float((got[:, -1] - want[:, -1]).abs().max()))
        tok = want[:, -1:].argmax(-1)
        for i in range(3):
            pos = torch.full((2,), 7 + i)
            got, state = decode(tok, pos, table, state)
            want, ref = full.decode(tok, pos, ref)
            errs.append(float((got[:, -1] - want[:, -1]).abs().max()))
            same = bool((got[:, -1].argmax(-1) == want[:, -1].argmax(-1)).all())
            tok = want[:, -1:].argmax(-1)
    with open(f"{out}/rank{rank}.txt", "w") as f:
        f.write(f"{max(errs)} {same} {float(want.abs().max())}")
    dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp
    mp.spawn(main, args=(2, int(sys.argv[1]), sys.argv[2], sys.argv[3]), nprocs=2)
"""


def test_rank_graphs_over_gloo_equal_the_single_process_model(onnx_tp2, tmp_path):
    """Both ranks' graphs evaluated together (``onnx.reference``, one process per rank, the collective nodes through
    ``plugins.collectives`` over gloo) over a 7-token prefill and three decode steps give the single-process model's
    logits on every rank (fp32)."""
    _spawn(_ONNX_TP_SCRIPT, tmp_path, str(onnx_tp2))
    for rank in (0, 1):
        err, same, scale = (tmp_path / f"rank{rank}.txt").read_text().split()
        assert float(err) < 2e-6 and same == "True", (rank, err, scale)  # measured 1.5e-7 (fp32 summation order)


_COLLECTIVE_SCRIPT = r"""
import os, sys, torch, torch.distributed as dist
from plugins.collectives import CollectiveError, all_gather_into, all_reduce_into


def main(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x = torch.arange(6.0).view(2, 3) * (rank + 1)
    y = torch.full_like(x, float("nan"))
    all_reduce_into(x, y, "0", world)
    g = torch.full((2 * world, 3), float("nan"))
    all_gather_into(x, g, "0", world)
    errors = []
    for call in (lambda: all_reduce_into(x, y, "0", world + 1), lambda: all_reduce_into(x, y, "no-such-group", world),
                 lambda: all_gather_into(x, torch.empty(2, 3), "0", world)):
        try:
            call()
            errors.append("none")
        except CollectiveError as e:
            errors.append(str(e).replace(" ", "_"))
    torch.save({"y": y, "g": g, "errors": errors}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp
    mp.spawn(main, args=(3, int(sys.argv[1]), sys.argv[2]), nprocs=3)
"""


def test_collective_plugin_bodies_over_gloo(tmp_path):
    """The plugins' bodies in a 3-rank gloo world: all_reduce sums every rank's tensor into the (NaN-poisoned)
    output, all_gather stacks them in rank order along dim 0; a wrong world size, an unknown group and a wrong
    output shape are refused by name."""
    _spawn(_COLLECTIVE_SCRIPT, tmp_path)
    x = torch.arange(6.0).view(2, 3)
    for rank in range(3):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["y"], x * 6, rtol=0, atol=0)
        torch.testing.assert_close(got["g"], torch.cat([x, 2 * x, 3 * x]), rtol=0, atol=0)
        wrong_size, wrong_group, wrong_shape = got["errors"]
        assert "compiled_for_a_4-rank_group_'0',_which_has_3_ranks" in wrong_size, wrong_size
        assert "no_process_group_named_'no-such-group'" in wrong_group, wrong_group
        assert "output_torch.float32_[2,_3],_expected_torch.float32_[6,_3]" in wrong_shape, wrong_shape


_GATHER_SCRIPT = r"""
import os, sys, torch, torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import onnx
from export.onnx_lowering import _translation_table
from export.onnx_reference import reference_evaluator


class Gather(torch.nn.Module):  # the CUDA programs' logits gather: all_gather_into_tensor, then chunks along dim 1
    def forward(self, x):
        return funcol.all_gather_tensor(x * 2, 1, dist.group.WORLD) + 1


def main(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(rank))
    ep = torch.export.export(Gather(), (x,))
    onnx_program = torch.onnx.export(ep, dynamo=True, custom_translation_table=_translation_table({}), verbose=False)
    onnx.save(onnx_program.model_proto, f"{out}/g{rank}.onnx")
    types = [f"{n.domain}::{n.op_type}" for n in onnx_program.model_proto.graph.node]
    got = reference_evaluator(f"{out}/g{rank}.onnx").run(None, {onnx_program.model_proto.graph.input[0].name: x.numpy()})[0]
    torch.save({"got": torch.from_numpy(got), "types": types}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp
    mp.spawn(main, args=(2, int(sys.argv[1]), sys.argv[2]), nprocs=2)
"""


def test_all_gather_lowers_to_its_plugin_node_and_runs_over_gloo(tmp_path):
    """A program gathering along dim 1 as the CUDA programs gather the logits (``all_gather_into_tensor`` along dim
    0, then chunks): lowered with our translation table it holds one ``minimax::all_gather`` node and, evaluated on
    both ranks of a gloo world, returns both ranks' (2x + 1) side by side."""
    _spawn(_GATHER_SCRIPT, tmp_path)
    xs = [torch.randn(3, 4, generator=torch.Generator().manual_seed(r)) for r in (0, 1)]
    want = torch.cat(xs, 1) * 2 + 1
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["types"].count("minimax::all_gather") == 1 and not [t for t in got["types"] if "c10d" in t]
        torch.testing.assert_close(got["got"], want, rtol=1e-6, atol=1e-6)


def test_collective_nodes_outside_a_world_are_refused_by_name():
    from plugins.collectives import CollectiveError, all_reduce_into

    with pytest.raises(CollectiveError, match="torch.distributed is not initialized.*torchrun"):
        all_reduce_into(torch.zeros(2), torch.zeros(2), "0", 2)
