"""Whole-model parity with Hugging Face transformers' MiniMax (an implementation we did not write).

A random ``transformers.MiniMaxForCausalLM`` (4 heads, 2 x (3 lightning + 1 softmax) layers, lightning block 8,
8 experts... see ``conftest.hf_tiny_config``) is saved with ``save_pretrained`` in sharded safetensors with the
official key names, loaded by our loader, and compared in fp32.

How RoPE is reconciled: transformers' in-tree MiniMax rotates the whole head, the published model rotates only
``rotary_dim`` = half of it (our behaviour). The main parity tests use a config without a partial factor, which
both read as ``rotary_dim = head_dim``. ``test_partial_rotary_parity`` then checks partial rotation against
transformers' own partial-RoPE code (the MiniMax-M2 functions, which rotate ``cos.shape[-1]`` dims) patched into
its MiniMax model.

Known, accepted differences: transformers divides the layer factor of the decay by ``L - 1 + 1e-5`` where the
published code divides by ``L - 1`` (relative change < 1e-6 here), and builds slopes for a head count that is not a
power of two differently (not exercised: 4 heads).
"""

from __future__ import annotations

import pytest
import torch

from model import MiniMaxForCausalLM
from tests.conftest import make_hf_model, rewrite_config, to_official_config
from tests.utils import assert_fp32_parity, logit_report

B, T = 2, 29  # 29 tokens: 3 full lightning blocks of 8 and a partial one


def _ids(vocab, seed=0, shape=(B, T)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_whole_sequence_logits_match_transformers(hf_checkpoint):
    hf, path = hf_checkpoint
    ours = MiniMaxForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert ours.config.rotary_dim == ours.config.head_dim
    ids = _ids(hf.config.vocab_size)
    ref = hf(input_ids=ids).logits
    assert ref.abs().max() > 1.0  # the logits are not trivially small
    assert_fp32_parity(logit_report(ours(ids), ref), "whole sequence vs transformers")


@torch.no_grad()
def test_official_schema_config_loads_the_same_model(hf_checkpoint, tmp_path):
    hf, path = hf_checkpoint
    import shutil

    official = tmp_path / "official"
    shutil.copytree(path, official)
    rewrite_config(official, to_official_config)
    ours = MiniMaxForCausalLM.from_pretrained(official, dtype=torch.float32)
    ids = _ids(hf.config.vocab_size, seed=1)
    assert_fp32_parity(logit_report(ours(ids), hf(input_ids=ids).logits), "official config.json vs transformers")


@torch.no_grad()
@pytest.mark.parametrize("prompt_len", [3, 16])
def test_prefill_then_decode_matches_transformers_with_cache(hf_checkpoint, prompt_len):
    hf, path = hf_checkpoint
    ours = MiniMaxForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = _ids(hf.config.vocab_size, seed=2, shape=(B, prompt_len + 6))
    out = hf(input_ids=ids[:, :prompt_len], use_cache=True)
    ref_steps, cache = [out.logits], out.cache
    for t in range(prompt_len, ids.shape[1]):
        # position_ids must be given: transformers' MiniMaxCache.get_seq_length() reads layer 0, a lightning layer
        # with no KV entries, so without them its cached decode places every new token at position 0.
        out = hf(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True, position_ids=torch.full((B, 1), t))
        ref_steps.append(out.logits)
        cache = out.cache
    logits, state = ours.prefill(ids[:, :prompt_len], ours.new_state(B, ids.shape[1]))
    steps = [logits]
    for t in range(prompt_len, ids.shape[1]):
        logits, state = ours.decode(ids[:, t : t + 1], torch.full((B,), t), state)
        steps.append(logits)
    assert_fp32_parity(logit_report(torch.cat(steps, 1), torch.cat(ref_steps, 1)), f"prefill {prompt_len} + 6 decode steps")


@torch.no_grad()
def test_partial_rotary_parity(tmp_path, monkeypatch):
    """rotary_dim = head_dim / 2 against transformers' MiniMax with transformers' own partial-RoPE functions."""
    import transformers.models.minimax.modeling_minimax as tf_minimax
    import transformers.models.minimax_m2.modeling_minimax_m2 as tf_m2

    hf = make_hf_model(seed=3)
    head_dim = hf.config.head_dim
    rotary_dim = head_dim // 2
    theta = hf.config.rope_parameters["rope_theta"]
    partial_inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    monkeypatch.setattr(tf_minimax, "apply_rotary_pos_emb", tf_m2.apply_rotary_pos_emb)
    hf.model.rotary_emb.inv_freq = partial_inv_freq
    hf.model.rotary_emb.original_inv_freq = partial_inv_freq.clone()
    hf.save_pretrained(tmp_path, max_shard_size="100KB")

    def add_partial(d):
        d["rope_parameters"] = {**d["rope_parameters"], "partial_rotary_factor": 0.5}
        return d

    rewrite_config(tmp_path, add_partial)
    ours = MiniMaxForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert ours.config.rotary_dim == rotary_dim
    ids = _ids(hf.config.vocab_size, seed=4)
    ref = hf(input_ids=ids).logits
    assert_fp32_parity(logit_report(ours(ids), ref), "partial RoPE (rotary_dim = head_dim/2)")
    # and the difference is real: rotating the whole head instead gives other logits
    full = MiniMaxForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, rotary_dim=head_dim)
    assert logit_report(full(ids), ref)["max_abs"] > 1e-2
