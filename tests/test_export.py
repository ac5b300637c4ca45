"""Export and build: exported programs == eager; the AOTInductor engine == eager over prefill + decode steps;
the engine folder is complete or absent; bad requests fail before any long work."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import build
from export import BuildSettings, EngineFolderError, build_engine, export_programs, read_manifest
from export import aoti_lowering
from export.exporting import DecodeProgram, PrefillProgram
from model import MiniMaxConfig, MiniMaxForCausalLM
from tests.utils import logit_report

SETTINGS = BuildSettings(backend="aoti", device="cpu", dtype="float32", max_batch=4, max_input_len=24, max_seq_len=40,
                         page_size=8)  # 5 pages per row: prompts and decode steps cross pages


@pytest.fixture(scope="module")
def tiny():
    return MiniMaxForCausalLM(MiniMaxConfig.preset("tiny")).init_random_weights(seed=2, std=0.1).eval()


@pytest.fixture(scope="module")
def engine(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "tiny"
    manifest = build_engine(tiny, SETTINGS, out)
    return out, manifest


def paged_state(config, batch: int, settings: BuildSettings, device="cpu", seed: int = 0):
    """A zero state of the build's pools (``settings.num_pages`` pages) and a block table whose rows own
    scattered pages (a random permutation), the way the runtime's allocator hands them out."""
    paged = settings.paged_layout()
    H, D, KVH = config.num_attention_heads, config.head_dim, config.num_key_value_heads
    lightning = [torch.zeros(batch, H, D, D, device=device) for _ in config.lightning_layers]
    pools = [torch.zeros(paged["num_pages"], KVH, paged["page_size"], D, dtype=settings.torch_dtype, device=device)
             for _ in range(2 * len(config.softmax_layers))]
    M = paged["max_pages_per_seq"]
    order = torch.randperm(paged["num_pages"], generator=torch.Generator().manual_seed(seed))[: batch * M]
    return order.view(batch, M).to(torch.int32).to(device), [*lightning, *pools]


def _run_steps(prefill, decode, ids, n_prompt, settings, config):
    """Prefill ids[:, :n_prompt], then decode the remaining ids one by one, on a paged state the programs update in
    place; returns the logits of every step and the final state."""
    B, device = ids.shape[0], ids.device
    table, state = paged_state(config, B, settings, device)
    # Engines take contiguous inputs only (AOTInductor compiles for the example inputs' strides and does not check).
    logits = prefill(ids[:, :n_prompt].contiguous(), torch.zeros(B, dtype=torch.long, device=device), table, state)
    steps = [logits]
    for t in range(n_prompt, ids.shape[1]):
        logits = decode(ids[:, t : t + 1].contiguous(), torch.full((B,), t, dtype=torch.long, device=device), table,
                        state)
        steps.append(logits)
    return torch.cat(steps, 1), state


@torch.no_grad()
def test_exported_programs_equal_eager(tiny):
    programs = export_programs(tiny, SETTINGS)
    ids = torch.randint(0, tiny.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(0))
    eager = _run_steps(PrefillProgram(tiny), DecodeProgram(tiny), ids, 13, SETTINGS, tiny.config)
    exported = _run_steps(programs["prefill"].module(), programs["decode"].module(), ids, 13, SETTINGS, tiny.config)
    report = logit_report(exported[0], eager[0])
    assert report["max_abs"] < 1e-5 and report["top1"] == 1.0, report
    for a, b in zip(exported[1], eager[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("batch, prompt", [(1, 2), (3, 19)])
def test_aoti_engine_equals_eager_over_prefill_and_decode(tiny, engine, batch, prompt):
    folder, manifest = engine
    from runtime.backends import load_aoti_programs

    programs = load_aoti_programs(folder, manifest, torch.device("cpu"))  # packages + the folder's weights
    prefill, decode = programs["prefill"].fn, programs["decode"].fn
    ids = torch.randint(0, tiny.config.vocab_size, (batch, prompt + 6), generator=torch.Generator().manual_seed(prompt))
    ours = _run_steps(prefill, decode, ids, prompt, SETTINGS, tiny.config)
    ref = _run_steps(PrefillProgram(tiny), DecodeProgram(tiny), ids, prompt, SETTINGS, tiny.config)
    report = logit_report(ours[0], ref[0])
    print(f"AOTI CPU vs eager, batch {batch}, prompt {prompt} + 6 decode steps: {report}")
    assert report["max_abs"] < 1e-4 and report["kl_max"] < 1e-9 and report["top1"] == 1.0, report
    for a, b in zip(ours[1], ref[1]):  # the package updated its state inputs in place, as eager did
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_programs_update_state_in_place_and_copy_no_pool(tiny):
    """The exported programs mutate exactly the state inputs and return only the logits; the pools are written
    by ``paged_kv_write`` alone (no copy of a pool); the lightning states by one copy each in prefill, and by the
    in-place decode op in decode (no copy at all)."""
    from torch.export.graph_signature import OutputKind

    programs = export_programs(tiny, SETTINGS)
    n_lin, n_soft = len(tiny.config.lightning_layers), len(tiny.config.softmax_layers)
    for name, ep in programs.items():
        ep = ep.run_decompositions({})  # the functional form that AOTInductor lowers (and re-inplaces)
        sig = ep.graph_signature
        user = [s.arg.name for s in sig.input_specs if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
        mutated = [s.target for s in sig.output_specs if s.kind == OutputKind.USER_INPUT_MUTATION]
        assert mutated == user[3:] and len(mutated) == n_lin + 2 * n_soft, (name, mutated, user)
        assert [s.kind for s in sig.output_specs].count(OutputKind.USER_OUTPUT) == 1
        in_place = [n.args[0] for n in ep.graph.nodes if n.op == "call_function"
                    and "auto_functionalized" in str(n.target)]
        lightning_in_place = n_lin if name == "decode" else 0
        assert in_place.count(torch.ops.minimax.paged_kv_write.default) == n_soft
        assert in_place.count(torch.ops.minimax.lightning_decode_.default) == lightning_in_place
        assert len(in_place) == n_soft + lightning_in_place
        pool_names = set(user[3 + n_lin:])
        copies = [n for n in ep.graph.nodes if n.op == "call_function" and n.target in (
            torch.ops.aten.copy.default, torch.ops.aten.clone.default, torch.ops.aten.copy_.default)]
        assert len(copies) == n_lin - lightning_in_place, (name, [n.args for n in copies])
        assert not any(a.name in pool_names for n in copies for a in n.args if isinstance(a, torch.fx.Node))


def test_manifest_describes_the_engine(tiny, engine):
    folder, manifest = engine
    assert read_manifest(folder) == json.loads((folder / "manifest.json").read_text())
    assert manifest["backend"] == "aoti" and manifest["device"] == "cpu" and manifest["dtype"] == "float32"
    assert MiniMaxConfig.from_dict(manifest["model_config"]) == tiny.config
    assert manifest["profiles"] == {"max_batch": 4, "max_input_len": 24, "max_seq_len": 40}
    assert manifest["paged_kv"] == {"page_size": 8, "num_pages": 20, "max_pages_per_seq": 5}
    names = [e["name"] for e in manifest["state_layout"]]
    assert names == [e["name"] for e in tiny.config.state_layout(1, 40)]
    pools = [e["shape"] for e in manifest["state_layout"] if "cache" in e["name"]]
    assert pools == [[20, tiny.config.num_key_value_heads, 8, tiny.config.head_dim]] * len(pools) and pools
    prefill = manifest["programs"]["prefill"]
    assert [i["name"] for i in prefill["inputs"]] == ["input_ids", "positions", "block_table", *names]
    assert prefill["inputs"][2]["shape"] == ["B", 5] and prefill["inputs"][2]["dtype"] == "int32"
    assert [o["name"] for o in prefill["outputs"]] == ["logits"] and prefill["state_update"] == "in_place"
    assert manifest["versions"]["torch"] == torch.__version__
    assert set(manifest["files"]) == {"prefill.pt2", "decode.pt2", "exported/prefill.pt2", "exported/decode.pt2",
                                      "contract.json", "weights/weights-00001.safetensors"}
    weights = manifest["weights"]
    assert weights["shards"] == ["weights/weights-00001.safetensors"]
    assert set(weights["tensors"]) == {n for n, _ in tiny.named_parameters()} | {n for n, _ in tiny.named_buffers()}
    assert weights["tensors"]["lm_head.weight"]["dtype"] == "float32"
    assert weights["tensors"]["model.layers.0.block_sparse_moe.experts.w1"]["shape"] == list(
        tiny.model.layers[0].block_sparse_moe.experts.w1.shape)
    assert len(manifest["weights_sha256"]) == 64


def test_exported_programs_are_saved_and_reload(tiny, engine):
    folder, _ = engine
    ep = torch.export.load(folder / "exported" / "decode.pt2")
    ops = [n.args[0] if "auto_functionalized" in str(n.target) else n.target for n in ep.graph.nodes
           if n.op == "call_function"]  # an in-place op is a node of its own, or functionalised
    in_place = [op for op in ops if op in (torch.ops.minimax.lightning_decode_.default,
                                           torch.ops.minimax.paged_kv_write.default)]
    assert in_place.count(torch.ops.minimax.lightning_decode_.default) == len(tiny.config.lightning_layers)
    assert in_place.count(torch.ops.minimax.paged_kv_write.default) == len(tiny.config.softmax_layers)
    # weights apart: the saved program names every weight with its shape and dtype, and holds none of the values
    expected = {**dict(tiny.named_parameters()), **dict(tiny.named_buffers())}
    saved = {**ep.state_dict, **{k: v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)}}
    assert saved and all(v.device.type == "meta" for v in saved.values())
    for name, t in ep.state_dict.items():
        ref = expected[name.removeprefix("model.")]
        assert (t.shape, t.dtype) == (ref.shape, ref.dtype), name
    import zipfile

    entries = zipfile.ZipFile(folder / "exported" / "decode.pt2").infolist()
    data = [(i.filename, i.file_size) for i in entries if "/data/" in i.filename and not i.filename.endswith(".json")]
    assert data and all(size < 16384 for _, size in data), data  # no weight bytes, no example-input pools


def test_damaged_engine_folders_are_refused(engine, tmp_path):
    folder, _ = engine
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / "decode.pt2").write_bytes(b"tampered")
    with pytest.raises(EngineFolderError, match="decode.pt2 does not match its hash"):
        read_manifest(copy)
    (copy / "decode.pt2").unlink()
    with pytest.raises(EngineFolderError, match="file decode.pt2 listed in the manifest is missing"):
        read_manifest(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(EngineFolderError, match="engine format version 99"):
        read_manifest(copy)
    with pytest.raises(EngineFolderError, match="not an engine folder"):
        read_manifest(tmp_path)


def test_failed_build_leaves_nothing(tiny, tmp_path, monkeypatch):
    def broken_lowering(program, folder, name, settings):
        (folder / f"{name}.pt2").write_bytes(b"half written")
        raise RuntimeError("compiler crashed")

    monkeypatch.setattr(aoti_lowering, "lower", broken_lowering)
    with pytest.raises(RuntimeError, match="compiler crashed"):
        build_engine(tiny, SETTINGS, tmp_path / "engine")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-input-len", "1"], "max_input_len must be >= 2"),
        (["--max-input-len", "64", "--max-seq-len", "32"], "max_seq_len (32) must be >= max_input_len (64)"),
        (["--max-batch", "0"], "max_batch must be >= 1"),
        (["--max-seq-len", "5000"], "exceeds the model's max_position_embeddings (4096)"),
        (["--backend", "onnx", "--max-seq-len", "5000"], "exceeds the model's max_position_embeddings (4096)"),
    ],
)
def test_build_cli_refuses_bad_settings_before_work(tmp_path, caplog, argv, message):
    assert build.main(["--preset", "tiny", "--out", str(tmp_path / "e"), *argv]) == 2
    assert message in caplog.text
    assert not (tmp_path / "e").exists()


def test_build_cli_refuses_mismatched_checkpoint(hf_checkpoint, tmp_path, caplog):
    from tests.conftest import rewrite_config

    ckpt = tmp_path / "ckpt"
    shutil.copytree(hf_checkpoint[1], ckpt)
    rewrite_config(ckpt, lambda d: {**d, "hidden_size": 64})
    assert build.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "e")]) == 2
    assert "expected" in caplog.text and "has shape" in caplog.text
    assert not (tmp_path / "e").exists()
