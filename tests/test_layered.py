"""Per-kind layer programs (issue 12, ``build.py --layer-programs``): one AOTInductor program per layer kind and step
with the layers' weights as inputs, composed by the runtime (``runtime/layered.py``); CPU, built once per module."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import build
from export.engine_folder import EngineFolderError, read_manifest

FLAGS = ["--device", "cpu", "--dtype", "fp32", "--max-batch", "2", "--max-input-len", "8", "--max-seq-len", "32",
         "--page-size", "8"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random official-layout checkpoint (4 heads, 2 KV heads, 5 experts; 3 lightning + 1 softmax layers)."""
    from tests.conftest import make_hf_model

    path = tmp_path_factory.mktemp("layered_ckpt")
    make_hf_model(seed=3).save_pretrained(path, max_shard_size="100KB")
    return path


@pytest.fixture(scope="module")
def layered(checkpoint, tmp_path_factory) -> Path:
    """``build.py --checkpoint ... --layer-programs``: programs exported from a skeleton, the checkpoint streamed."""
    out = tmp_path_factory.mktemp("layered") / "engine"
    assert build.main(["--checkpoint", str(checkpoint), "--out", str(out), "--layer-programs", *FLAGS]) == 0
    return out


def test_folder_holds_one_program_per_kind_and_step(layered):
    manifest = read_manifest(layered)
    plan = manifest["layer_plan"]
    kinds = plan["layer_types"]
    assert set(kinds) == {"lightning", "softmax"} and len(kinds) == manifest["model_config"]["num_hidden_layers"]
    parts = sorted(p.name for p in layered.glob("*.pt2"))
    assert parts == ["decode.lightning.pt2", "decode.softmax.pt2", "prefill.lightning.pt2", "prefill.softmax.pt2"]
    for name in ("prefill", "decode"):
        entry = manifest["programs"][name]
        assert entry["layer_programs"] == {k: f"{name}.{k}.pt2" for k in ("lightning", "softmax")}
        assert [i["name"] for i in entry["inputs"][:3]] == ["input_ids", "positions", "block_table"]  # the contract
    # the weights a layer program takes: its own tensors, the lightning decay rates among them
    assert "self_attn.decay_rate" in plan["weights"]["lightning"]
    assert "self_attn.k_proj.weight" in plan["weights"]["softmax"]
    for part in parts:  # no constants in the packages: every tensor is an input
        pkg = torch._inductor.aoti_load_package(str(layered / part))
        assert pkg.get_constant_fqns() == [], part


@torch.no_grad()
def test_layered_engine_equals_eager_over_prefill_and_decode(layered, checkpoint):
    """The runtime's composed prefill / decode == the eager model on the same checkpoint over a ragged prefill and
    four decode steps (logits), and greedy generation token for token."""
    from model import MiniMaxForCausalLM
    from runtime import Engine
    from tests.utils import logit_report

    model = MiniMaxForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    engine = Engine.load(layered)
    prefill, decode = engine.programs["prefill"], engine.programs["decode"]
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(5))
    positions = torch.tensor([0, -2])  # row 1: two left pads
    ours, ref = model.new_state(2, 32, page_size=8), model.new_state(2, 32, page_size=8)
    got, _ = prefill(ids, positions, ours.block_table, ours.flatten())
    want, ref = model.prefill(ids, ref, positions, last_logits_only=True)
    steps = [(got, want)]
    tok = want.argmax(-1)
    for i in range(4):
        pos = positions + 7 + i
        got, _ = decode(tok, pos, ours.block_table, ours.flatten())
        want, ref = model.decode(tok, pos, ref)
        steps.append((got, want))
        tok = want.argmax(-1)
    report = logit_report(torch.cat([g for g, _ in steps], 1), torch.cat([w for _, w in steps], 1))
    assert report["max_abs"] < 2e-5 and report["top1"] == 1.0, report
    for a, b in zip(ours.flatten(), ref.flatten()):  # the state written in place, as the eager model's
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    eager = Engine.from_model(model, max_batch=2, max_input_len=8, max_seq_len=32, page_size=8)
    prompt = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]  # longer than the chunk: two prefill calls
    assert list(engine.generate([prompt], max_new_tokens=6)[0]) == list(eager.generate([prompt], max_new_tokens=6)[0])


@pytest.mark.parametrize("flags,message", [
    (["--backend", "onnx"], "--layer-programs: AOTInductor text engines on one rank only (got --backend onnx)"),
    (["--tensor-parallel", "2"], "--layer-programs: AOTInductor text engines on one rank only (got --tensor-parallel)"),
])
def test_layer_programs_refused_where_they_do_not_apply(flags, message, tmp_path, caplog):
    assert build.main(["--preset", "tiny", "--out", str(tmp_path / "e"), "--layer-programs", *flags, *FLAGS]) == 2
    assert message in caplog.text
    assert not (tmp_path / "e").exists()


def test_damaged_layer_plan_is_refused(layered, tmp_path):
    from export.engine_folder import write_manifest

    bad = tmp_path / "bad"
    shutil.copytree(layered, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["layer_plan"]["layer_types"] = manifest["layer_plan"]["layer_types"][::-1]
    manifest.pop("files")
    write_manifest(bad, manifest)  # a consistent folder (contract and hashes) whose plan is wrong
    with pytest.raises(EngineFolderError, match="layer_plan.layer_types does not follow model_config"):
        read_manifest(bad)
    del manifest["programs"]["decode"]["layer_programs"]["softmax"]
    manifest["layer_plan"]["layer_types"] = manifest["layer_plan"]["layer_types"][::-1]
    manifest.pop("files", None)
    write_manifest(bad, manifest)
    with pytest.raises(EngineFolderError, match="programs.decode.layer_programs has no 'softmax' part"):
        read_manifest(bad)
