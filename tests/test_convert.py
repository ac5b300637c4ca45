"""Real-scale engine folders (issue 12): a checkpoint converted shard by shard into the folder's weights (never
the whole model in memory), programs built from an uninitialised skeleton, and the engine equal to the eager model
loaded from the same checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

import build
from export import read_manifest
from export.engine_folder import EngineFolderError
from export.weights import ShardWriter, load_weights
from model import MiniMaxForCausalLM
from model.loading import CheckpointError, convert_checkpoint
from runtime import Engine


@pytest.fixture(scope="module")
def converted_engine(hf_checkpoint, tmp_path_factory):
    _, ckpt = hf_checkpoint
    out = tmp_path_factory.mktemp("converted") / "engine"
    assert build.main(["--checkpoint", str(ckpt), "--out", str(out), "--device", "cpu", "--dtype", "fp32",
                       "--max-batch", "2", "--max-input-len", "8", "--max-seq-len", "32", "--page-size", "8",
                       "--shard-mb", "1"]) == 0
    return out


def test_converter_streams_experts_as_parts_and_stacks_them_on_load(hf_checkpoint, tmp_path):
    """Every weight of the converted folder equals the model ``load_checkpoint`` builds (stacked experts, fp32
    gates / LM head, derived buffers), and the writer closed several shards on the way."""
    _, ckpt = hf_checkpoint
    writer = ShardWriter(tmp_path, shard_bytes=200_000)
    config = convert_checkpoint(ckpt, writer, torch.float32)
    entry = writer.close()
    assert len(entry["shards"]) > 3
    assert set(entry["stacked"]) == {f"model.layers.{i}.block_sparse_moe.experts.{w}"
                                     for i in range(config.num_hidden_layers) for w in ("w1", "w2", "w3")}
    weights = load_weights(tmp_path, entry, torch.device("cpu"))
    model = MiniMaxForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    expected = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert set(weights) == set(expected)
    for name, t in expected.items():
        assert weights[name].dtype == t.dtype and torch.equal(weights[name], t.detach()), name


def test_engine_built_from_a_checkpoint_equals_the_eager_model(converted_engine, hf_checkpoint):
    manifest = read_manifest(converted_engine)
    assert len(manifest["weights"]["shards"]) > 1 and "stacked" in manifest["weights"]
    engine = Engine.load(converted_engine)
    model = MiniMaxForCausalLM.from_pretrained(hf_checkpoint[1], dtype=torch.float32)
    eager = Engine.from_model(model, 2, 8, 32, page_size=8)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [3, 4]]
    ours = engine.generate(prompts, max_new_tokens=12)
    assert torch.equal(ours, eager.generate(prompts, max_new_tokens=12))
    ids = torch.tensor([prompts[0]])
    engine.reset(1)
    logits = engine.prefill(ids[:, :8], torch.zeros(1, dtype=torch.long), [0])
    eager.reset(1)
    ref = eager.prefill(ids[:, :8], torch.zeros(1, dtype=torch.long), [0])
    assert (logits - ref).abs().max() < 1e-4


def test_a_broken_checkpoint_is_refused_before_the_build(hf_checkpoint, tmp_path, caplog):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(hf_checkpoint[1], ckpt)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (ckpt / shard).unlink()
    assert build.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "e"), "--device", "cpu"]) == 2
    assert f"missing shard file(s): {shard}" in caplog.text and not (tmp_path / "e").exists()
    with pytest.raises(CheckpointError, match="missing shard"):
        convert_checkpoint(ckpt, ShardWriter(tmp_path / "w"), torch.float32)


def test_staged_loader_reads_each_shard_once_in_chunks_and_checks_its_hash(hf_checkpoint, tmp_path):
    """The loader's chunked streams (chunks far smaller than a tensor, and chunks holding many small tensors;
    several shards at once) give exactly the tensors of a one-chunk load; a flipped byte inside a tensor is refused
    by the shard's hash (and only by it: without digests the damaged value loads)."""
    from export.engine_folder import sha256_file

    _, ckpt = hf_checkpoint
    writer = ShardWriter(tmp_path, shard_bytes=300_000)
    convert_checkpoint(ckpt, writer, torch.float32)
    entry = writer.close()
    digests = {s: sha256_file(tmp_path / s) for s in entry["shards"]}
    whole = load_weights(tmp_path, entry, torch.device("cpu"), workers=1, chunk_bytes=1 << 30)
    for workers, chunk in ((3, 997), (2, 64 << 10)):
        staged = load_weights(tmp_path, entry, torch.device("cpu"), digests=digests, workers=workers, chunk_bytes=chunk)
        assert set(staged) == set(whole)
        for name, t in whole.items():
            assert torch.equal(staged[name], t), (workers, chunk, name)

    shard = entry["shards"][1]
    name = next(n for n, t in entry["tensors"].items() if t["shard"] == shard and t["dtype"] == "float32"
                and len(t["shape"]) == 2)
    from export.weights import _read_header

    data_start, header = _read_header(tmp_path / shard)
    offset = data_start + header[name]["data_offsets"][0] + 4 * 7  # element 7 of the tensor (or of its part)
    with open(tmp_path / shard, "r+b") as f:
        f.seek(offset)
        f.write(torch.tensor([123.0]).numpy().tobytes())
    with pytest.raises(EngineFolderError, match=rf"{shard}: weight shard does not match its hash"):
        load_weights(tmp_path, entry, torch.device("cpu"), digests=digests, workers=2, chunk_bytes=4096)
    unchecked = load_weights(tmp_path, entry, torch.device("cpu"), workers=2, chunk_bytes=4096)
    flat = [t for n, t in unchecked.items() if n == name or name.startswith(n + ".")]
    assert flat and any((t.reshape(-1) == 123.0).any() for t in flat)


def test_onnx_folder_built_from_a_checkpoint_without_the_model(hf_checkpoint, tmp_path):
    """``build.py --checkpoint --backend onnx``: graphs lowered from a meta skeleton, the checkpoint converted
    straight into their one shared external data file; evaluated with ``onnx.reference``, the graphs equal the
    eager model loaded from the same checkpoint over prefill + decode."""
    import onnx

    from export.onnx_lowering import WEIGHTS_DATA
    from export.onnx_reference import OnnxReferenceProgram
    from runtime.backends import InPlaceProgram
    from export.exporting import DecodeProgram, PrefillProgram
    from tests.test_onnx import SETTINGS as ONNX_SETTINGS, _run_steps
    from tests.utils import logit_report

    _, ckpt = hf_checkpoint
    out = tmp_path / "onnx"
    s = ONNX_SETTINGS
    assert build.main(["--checkpoint", str(ckpt), "--out", str(out), "--backend", "onnx", "--device", "cpu",
                       "--dtype", "fp32", "--max-batch", str(s.max_batch), "--max-input-len", str(s.max_input_len),
                       "--max-seq-len", str(s.max_seq_len), "--page-size", str(s.page_size)]) == 0
    manifest = read_manifest(out)
    assert {p["external_data"] for p in manifest["programs"].values()} == {WEIGHTS_DATA}
    assert sorted(p.name for p in out.glob("*.data")) == [WEIGHTS_DATA]  # one shared file, not one per graph
    for name in ("prefill", "decode"):
        proto = onnx.load(str(out / f"{name}.onnx"), load_external_data=False)
        locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {WEIGHTS_DATA} and len(proto.graph.initializer) > 50
    model = MiniMaxForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    prefill, decode = OnnxReferenceProgram(out / "prefill.onnx"), OnnxReferenceProgram(out / "decode.onnx")
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    ours = _run_steps(prefill, decode, ids, 6, model.config)
    ref = _run_steps(InPlaceProgram(PrefillProgram(model)), InPlaceProgram(DecodeProgram(model)), ids, 6,
                     model.config)
    report = logit_report(ours[0], ref[0])
    assert report["max_abs"] < 2e-5 and report["top1"] == 1.0, report


def test_external_data_writer_refuses_wrong_tensors_and_missing_ones(tmp_path):
    from export.onnx_lowering import ExternalDataWriter

    layout = {"a": {"offset": 0, "nbytes": 24, "shape": [2, 3], "dtype": "float32"},
              "e": {"offset": 64, "nbytes": 32, "shape": [2, 2, 2], "dtype": "float32"}}
    w = ExternalDataWriter(tmp_path / "w.data", layout)
    with pytest.raises(EngineFolderError, match=r"weight 'a' is torch.float32 \[3, 2\], the graphs hold float32"):
        w.add("a", torch.zeros(3, 2))
    with pytest.raises(EngineFolderError, match="'b' is not an initializer"):
        w.add("b", torch.zeros(1))
    w.add("a", torch.arange(6.0).view(2, 3))
    w.add_part("e", 1, 2, torch.full((2, 2), 7.0))
    with pytest.raises(EngineFolderError, match=r"weights not written: \['e'\]"):
        w.close()
    data = (tmp_path / "w.data").read_bytes()
    assert len(data) == 96 and torch.equal(torch.frombuffer(bytearray(data[:24]), dtype=torch.float32),
                                            torch.arange(6.0))
    assert torch.equal(torch.frombuffer(bytearray(data[80:96]), dtype=torch.float32), torch.full((4,), 7.0))
