"""Quantized experts through the model, the build and the engine (issue 15): ``quantize_experts_``, the accuracy of
a quantized tiny model against its full-precision self, ``build.py --quantize`` (random preset and a checkpoint
converted with its experts quantized while streaming), and the engine equal to the eager quantized model."""

from __future__ import annotations

import copy

import pytest
import torch

import build
from export import read_manifest
from export.weights import ShardWriter, load_weights
from kernels.moe import naive
from model import MiniMaxConfig, MiniMaxForCausalLM
from model.loading import convert_checkpoint
from model.modeling import QuantizedExperts
from runtime import Engine
from tests.utils import logit_report

MODES = ("experts-int8", "experts-fp8")


def _tiny(seed=1):
    return MiniMaxForCausalLM(MiniMaxConfig.preset("tiny")).init_random_weights(seed=seed, std=0.1).eval()


def _prefill_decode_logits(model, ids, steps=8):
    """Logits of a prefill of ``ids`` then ``steps`` greedy decode steps: [B, T + steps, V]."""
    B, T = ids.shape
    state = model.new_state(B, T + steps + 1, page_size=16)
    with torch.no_grad():
        logits, state = model.prefill(ids, state)
        out = [logits]
        tok = logits[:, -1:].argmax(-1)
        for i in range(steps):
            logits, state = model.decode(tok, torch.full((B,), T + i), state)
            out.append(logits)
            tok = logits[:, -1:].argmax(-1)
    return torch.cat(out, 1)


@pytest.mark.parametrize("mode,kl_bounds,top1_min", [
    # measured on this model (tiny preset, 8 layers, weights N(0, 0.1)): int8 KL 3.5e-6 mean, fp8 2.8e-4; the
    # bounds hold an order of magnitude around them, so that a quantization that did nothing fails as well
    ("experts-int8", (1e-7, 1e-4), 0.9),
    ("experts-fp8", (1e-5, 3e-3), 0.9),
])
def test_quantized_tiny_model_against_full_precision(mode, kl_bounds, top1_min):
    model = _tiny()
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    ref = _prefill_decode_logits(model, ids)
    quantized = copy.deepcopy(model).quantize_experts_(mode)
    assert quantized.quantization == mode and model.quantization == "none"
    report = logit_report(_prefill_decode_logits(quantized, ids), ref)
    print(mode, report)
    assert kl_bounds[0] < report["kl_mean"] < kl_bounds[1], report
    assert report["top1"] >= top1_min, report


def test_quantize_experts_holds_the_quantized_weights_and_refuses_misuse():
    model = _tiny()
    w1 = model.model.layers[3].block_sparse_moe.experts.w1.detach().clone()
    model.quantize_experts_("experts-int8")
    experts = model.model.layers[3].block_sparse_moe.experts
    assert isinstance(experts, QuantizedExperts) and experts.w1.dtype == torch.int8
    q, s = naive.quantize_weight(w1, "experts-int8")
    assert torch.equal(experts.w1, q) and torch.equal(experts.w1_scale, s)
    assert not any(p.requires_grad for p in experts.parameters())
    assert model.model.layers[3].block_sparse_moe.gate.weight.dtype == torch.float32  # the router is untouched
    with pytest.raises(ValueError, match="already quantized"):
        model.quantize_experts_("experts-fp8")
    with pytest.raises(ValueError, match="initialise before quantize_experts_"):
        model.init_random_weights()
    with pytest.raises(ValueError, match="expected one of none, experts-int8, experts-fp8"):
        _tiny().quantize_experts_("int4")
    with torch.device("meta"):
        meta = MiniMaxForCausalLM(MiniMaxConfig.preset("tiny"))
    meta.quantize_experts_("experts-fp8")  # a weightless skeleton stays weightless
    e = meta.model.layers[0].block_sparse_moe.experts
    assert e.w2.is_meta and e.w2.dtype == torch.float8_e4m3fn and tuple(e.w2_scale.shape) == (4, 64)


def test_converter_quantizes_each_expert_while_streaming(hf_checkpoint, tmp_path):
    """The converted folder holds the int8 experts and scales that quantizing the loaded model gives, stored as
    parts per expert (never a layer's stack at once)."""
    _, ckpt = hf_checkpoint
    writer = ShardWriter(tmp_path, shard_bytes=200_000)
    config = convert_checkpoint(ckpt, writer, torch.float32, quantize="experts-int8")
    entry = writer.close()
    names = {f"model.layers.{i}.block_sparse_moe.experts.{w}{suffix}" for i in range(config.num_hidden_layers)
             for w in ("w1", "w2", "w3") for suffix in ("", "_scale")}
    assert set(entry["stacked"]) == names
    assert entry["stacked"]["model.layers.0.block_sparse_moe.experts.w1"]["dtype"] == "int8"
    weights = load_weights(tmp_path, entry, torch.device("cpu"))
    model = MiniMaxForCausalLM.from_pretrained(ckpt, dtype=torch.float32).quantize_experts_("experts-int8")
    expected = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert set(weights) == set(expected)
    for name, t in expected.items():
        assert weights[name].dtype == t.dtype and torch.equal(weights[name], t.detach()), name


@pytest.fixture(scope="module")
def quantized_engine(hf_checkpoint, tmp_path_factory):
    _, ckpt = hf_checkpoint
    out = tmp_path_factory.mktemp("quantized") / "engine"
    assert build.main(["--checkpoint", str(ckpt), "--out", str(out), "--device", "cpu", "--dtype", "fp32",
                       "--max-batch", "2", "--max-input-len", "8", "--max-seq-len", "32", "--page-size", "8",
                       "--quantize", "experts-int8", "--shard-mb", "1"]) == 0
    return out


def test_quantized_engine_from_a_checkpoint_equals_the_eager_quantized_model(quantized_engine, hf_checkpoint):
    manifest = read_manifest(quantized_engine)
    assert manifest["quantization"] == "experts-int8"
    tensors = manifest["weights"]["tensors"]
    assert tensors["model.layers.1.block_sparse_moe.experts.w2.3"]["dtype"] == "int8"
    assert tensors["model.layers.1.block_sparse_moe.experts.w2_scale.3"]["dtype"] == "float32"
    engine = Engine.load(quantized_engine)
    model = MiniMaxForCausalLM.from_pretrained(hf_checkpoint[1], dtype=torch.float32).quantize_experts_("experts-int8")
    eager = Engine.from_model(model, 2, 8, 32, page_size=8)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [3, 4]]
    assert torch.equal(engine.generate(prompts, max_new_tokens=10), eager.generate(prompts, max_new_tokens=10))
    for e in (engine, eager):
        e.reset(1)
    ids = torch.tensor([prompts[0][:8]])
    got = engine.prefill(ids, torch.zeros(1, dtype=torch.long), [0])
    want = eager.prefill(ids, torch.zeros(1, dtype=torch.long), [0])
    report = logit_report(got, want)
    assert report["max_abs"] < 1e-4 and report["top1"] == 1.0, report


def test_quantize_refused_where_not_built(tmp_path):
    """experts-fp8 has no ONNX node or TensorRT plugin yet: refused before any work, naming what is missing;
    experts-int8 is accepted by every backend, experts-fp8 by AOTInductor on either device."""
    from export import BuildSettings
    from export.engine_folder import EngineFolderError
    from export.exporting import check_quantization

    for backend in ("onnx", "tensorrt"):
        with pytest.raises(EngineFolderError, match="experts-fp8: only the aoti backend lowers it"):
            check_quantization("experts-fp8", BuildSettings(backend=backend))
        check_quantization("experts-int8", BuildSettings(backend=backend))
    check_quantization("experts-fp8", BuildSettings(device="cuda"))
    check_quantization("experts-fp8", BuildSettings(device="cpu"))
    assert build.main(["--preset", "tiny", "--out", str(tmp_path / "e"), "--backend", "onnx", "--device", "cpu",
                       "--quantize", "experts-fp8"]) == 2
    assert not (tmp_path / "e").exists()


def test_onnx_folder_with_int8_experts_equals_the_eager_quantized_model(hf_checkpoint, tmp_path):
    """The checkpoint converted into an ONNX folder with int8 experts (the meta-skeleton path: graphs with the
    ``_int8`` plugin nodes, the converter quantizing into the external data), evaluated by ``onnx.reference`` with
    the stages' references, equals the eager quantized model over a prefill chunk and decode steps."""
    import onnx

    from export.exporting import DecodeProgram, PrefillProgram
    from export.onnx_reference import OnnxReferenceProgram
    from runtime.backends import InPlaceProgram
    from tests.test_onnx import SETTINGS as S
    from tests.test_onnx import _run_steps

    _, ckpt = hf_checkpoint
    out = tmp_path / "onnx"
    assert build.main(["--checkpoint", str(ckpt), "--out", str(out), "--backend", "onnx", "--device", "cpu",
                       "--dtype", "fp32", "--max-batch", str(S.max_batch), "--max-input-len", str(S.max_input_len),
                       "--max-seq-len", str(S.max_seq_len), "--page-size", str(S.page_size),
                       "--quantize", "experts-int8"]) == 0
    assert read_manifest(out)["quantization"] == "experts-int8"
    for name, stages in (("prefill", {"moe_swiglu_grouped_int8", "moe_down_grouped_int8"}),
                         ("decode", {"moe_swiglu_decode_int8", "moe_down_combine_decode_int8"})):
        graph = onnx.load(str(out / f"{name}.onnx"), load_external_data=False).graph
        ops = {n.op_type for n in graph.node if n.domain == "minimax"}
        assert stages <= ops and not any(o.startswith("moe_") and o.endswith(("grouped", "decode")) for o in ops), ops
        assert {t.data_type for t in graph.initializer if t.name.endswith("experts.w1")} == {onnx.TensorProto.INT8}
    model = MiniMaxForCausalLM.from_pretrained(ckpt, dtype=torch.float32).quantize_experts_("experts-int8")
    prefill, decode = OnnxReferenceProgram(out / "prefill.onnx"), OnnxReferenceProgram(out / "decode.onnx")
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    ours = _run_steps(prefill, decode, ids, 6, model.config)
    ref = _run_steps(InPlaceProgram(PrefillProgram(model)), InPlaceProgram(DecodeProgram(model)), ids, 6, model.config)
    report = logit_report(ours[0], ref[0])
    assert report["max_abs"] < 2e-5 and report["top1"] == 1.0, report


def test_fp8_engine_from_the_random_preset_equals_the_eager_fp8_model(tmp_path):
    """``build.py --preset tiny --quantize experts-fp8`` (AOTInductor, CPU): e4m3 weights in the safetensors shards
    and the manifest, loaded back, generating what the eager model quantized the same way generates."""
    out = tmp_path / "fp8"
    assert build.main(["--preset", "tiny", "--out", str(out), "--device", "cpu", "--max-batch", "2",
                       "--max-input-len", "8", "--max-seq-len", "32", "--page-size", "8",
                       "--quantize", "experts-fp8"]) == 0
    manifest = read_manifest(out)
    assert manifest["quantization"] == "experts-fp8"
    assert manifest["weights"]["tensors"]["model.layers.0.block_sparse_moe.experts.w3"]["dtype"] == "float8_e4m3fn"
    engine = Engine.load(out)
    model = MiniMaxForCausalLM(MiniMaxConfig.preset("tiny")).init_random_weights(seed=0).eval()
    eager = Engine.from_model(model.quantize_experts_("experts-fp8"), 2, 8, 32, page_size=8)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [3, 4]]
    assert torch.equal(engine.generate(prompts, max_new_tokens=10), eager.generate(prompts, max_new_tokens=10))
