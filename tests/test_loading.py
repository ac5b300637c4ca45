"""Checkpoint loading: broken checkpoints fail with errors that name the tensor or file; good ones load mmapped."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import CheckpointError, ConfigError, MiniMaxForCausalLM
from tests.conftest import rewrite_config

KEY = "model.layers.1.self_attn.qkv_proj.weight"


@pytest.fixture
def ckpt(hf_checkpoint, tmp_path) -> Path:
    """A private copy of the sharded transformers checkpoint, free to break."""
    _, path = hf_checkpoint
    dst = tmp_path / "ckpt"
    shutil.copytree(path, dst)
    return dst


def _index(path: Path) -> dict:
    return json.loads((path / "model.safetensors.index.json").read_text())


def _shard_of(path: Path, key: str) -> Path:
    return path / _index(path)["weight_map"][key]


def _edit_shard(path: Path, key: str, fn) -> None:
    shard = _shard_of(path, key)
    tensors = load_file(shard)
    fn(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


def test_loads_bf16_with_fp32_gate_and_head_and_logs_progress(ckpt, caplog):
    with caplog.at_level(logging.INFO, logger="model.loading"):
        model = MiniMaxForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    assert model.model.layers[1].self_attn.qkv_proj.weight.dtype == torch.bfloat16
    assert model.model.layers[1].block_sparse_moe.experts.w1.dtype == torch.bfloat16
    assert model.model.layers[1].block_sparse_moe.gate.weight.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.float32
    n_shards = len(set(_index(ckpt)["weight_map"].values()))
    assert f"shard {n_shards}/{n_shards}" in caplog.text


def test_expert_tensors_land_in_their_stacked_slot(ckpt):
    model = MiniMaxForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    for e in (0, 3):
        for w in ("w1", "w2", "w3"):
            key = f"model.layers.2.block_sparse_moe.experts.{e}.{w}.weight"
            expected = load_file(_shard_of(ckpt, key))[key]
            assert torch.equal(getattr(model.model.layers[2].block_sparse_moe.experts, w)[e], expected)


def test_fp32_weights_are_memory_mapped_not_copied(ckpt):
    """Same dtype on the CPU: parameters point into the shard files' mappings (nothing is held twice)."""
    model = MiniMaxForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    shard = _shard_of(ckpt, KEY).resolve()
    maps = [line.split() for line in Path("/proc/self/maps").read_text().splitlines()]
    ranges = [tuple(int(x, 16) for x in m[0].split("-")) for m in maps if len(m) >= 6 and m[5] == str(shard)]
    assert ranges, f"{shard} is not mapped"
    ptr = model.model.layers[1].self_attn.qkv_proj.weight.data_ptr()
    assert any(lo <= ptr < hi for lo, hi in ranges)


def test_single_file_checkpoint(hf_checkpoint, tmp_path):
    hf, _ = hf_checkpoint
    hf.save_pretrained(tmp_path)  # one model.safetensors, no index
    assert not (tmp_path / "model.safetensors.index.json").exists()
    model = MiniMaxForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, hf.config.vocab_size, (1, 5))
    torch.testing.assert_close(model(ids), hf(input_ids=ids).logits, rtol=1e-5, atol=3e-5)


def test_missing_tensor_is_named(ckpt):
    _edit_shard(ckpt, KEY, lambda t: t.pop(KEY))
    index = _index(ckpt)
    del index["weight_map"][KEY]
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"missing tensors \(1\): {KEY}"):
        MiniMaxForCausalLM.from_pretrained(ckpt)


def test_index_entry_absent_from_its_shard_is_named(ckpt):
    shard = _shard_of(ckpt, KEY)
    _edit_shard(ckpt, KEY, lambda t: t.pop(KEY))
    with pytest.raises(CheckpointError, match=rf"{shard.name}: tensor {KEY} listed in the index is not in this file"):
        MiniMaxForCausalLM.from_pretrained(ckpt)


def test_unexpected_tensor_is_named(ckpt):
    extra = "model.layers.0.self_attn.q_norm.weight"
    _edit_shard(ckpt, KEY, lambda t: t.__setitem__(extra, torch.ones(4)))
    index = _index(ckpt)
    index["weight_map"][extra] = index["weight_map"][KEY]
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"unexpected tensors \(1\): {extra}"):
        MiniMaxForCausalLM.from_pretrained(ckpt)


def test_misshaped_tensor_is_named_with_both_shapes(ckpt):
    _edit_shard(ckpt, KEY, lambda t: t.__setitem__(KEY, t[KEY][:-3].clone()))
    with pytest.raises(CheckpointError, match=rf"tensor {KEY} has shape \[189, 48\], expected \[192, 48\]"):
        MiniMaxForCausalLM.from_pretrained(ckpt)


def test_config_that_does_not_match_the_weights_fails_before_loading(ckpt):
    rewrite_config(ckpt, lambda d: {**d, "intermediate_size": 64})
    with pytest.raises(CheckpointError, match=r"experts\.0\.w[123]\.weight has shape \[\d+, \d+\], expected"):
        MiniMaxForCausalLM.from_pretrained(ckpt)


def test_missing_shard_is_named(ckpt):
    shard = _shard_of(ckpt, KEY)
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"missing shard file\(s\): {shard.name}"):
        MiniMaxForCausalLM.from_pretrained(ckpt)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_shard_is_named(ckpt, damage):
    shard = _shard_of(ckpt, KEY)
    data = shard.read_bytes()
    shard.write_bytes(b"\x07" * 64 if damage == "garbage" else data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: cannot open as safetensors"):
        MiniMaxForCausalLM.from_pretrained(ckpt)


def test_missing_directory_config_fields_and_weights(hf_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        MiniMaxForCausalLM.from_pretrained(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "minimax", "hidden_size": 8}))
    with pytest.raises(ConfigError, match=r"config.json: missing fields \['vocab_size'"):
        MiniMaxForCausalLM.from_pretrained(tmp_path)
    shutil.copy(hf_checkpoint[1] / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="neither model.safetensors.index.json nor model.safetensors found"):
        MiniMaxForCausalLM.from_pretrained(tmp_path)
