"""benchmarks/decode.py's transformers peer: transformers' MiniMax built on our model's weights (no copy of the
experts), checked against our model in fp32 on the CPU, and the CLI dry run that measures it beside our engine.

The tiny preset is the hard case for the mapping: 6 heads (transformers builds slopes for a head count that is not
a power of two differently, so ours must be handed over), partial RoPE (rotary_dim 8 of 16: transformers rotates
the whole head, so q/k head dims are permuted and the pass-through pairs get frequency 0), and a prompt of 19
tokens with lightning block 16 (one full block and a partial one).
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import decode

B, PROMPT, STEPS = 2, 19, 3


def _model(layers: int, seed: int = 0):
    """Tiny preset cut to ``layers`` layers, fp32, weights large enough that every layer matters and norms != 1."""
    model = decode.random_model(decode.reduced_config("tiny", layers), torch.float32, "cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model


def _ids(vocab: int, seed: int = 1):
    return torch.randint(0, vocab, (B, PROMPT + STEPS), generator=torch.Generator().manual_seed(seed))


def _assert_tight(check: dict, what: str):
    print(what, check)
    # fp32: the two implementations agree to ~1e-6 on logits of magnitude ~5; a wrong mapping is off by >1e-2.
    assert check["max_abs_logit"] > 1.0, check  # the logits are not trivially small
    assert check["max_abs_dlogit"] < 1e-4, check
    assert check["rel_err"] < 1e-5, check
    assert check["top1_agreement"] == 1.0, check


@pytest.mark.parametrize("layers", [2, 4])
def test_transformers_on_our_weights_matches_our_model(layers):
    """Prefill + teacher-forced decode with transformers' own cache and explicit positions equals our model."""
    model = _model(layers)
    ids = _ids(model.config.vocab_size)
    ref = decode.our_logits(model, ids, PROMPT)
    hf, info = decode.hf_peer(model)
    out = decode.hf_logits(decode.HFRunner(hf), ids, PROMPT)
    assert out.shape == ref.shape == (B, PROMPT + STEPS, model.config.vocab_size)
    _assert_tight(decode.compare_logits(out, ref), f"{layers} layers: transformers vs ours")
    # our model still computes the same after its w1/w3 moved into transformers' fused layout
    _assert_tight(decode.compare_logits(decode.our_logits(model, ids, PROMPT), ref), "ours after fuse_gate_up_")
    assert info["gate_up_fused_into_our_storage"]


def test_transformers_shares_our_storage():
    """The experts (and everything else in fp32 but the RoPE-permuted q/k) are our tensors, not copies: a change
    to our weights in place shows up in transformers' output."""
    model = _model(2)
    hf, info = decode.hf_peer(model)
    ours = dict(model.named_parameters())
    theirs = dict(hf.named_parameters())
    E, inter, hidden = ours["model.layers.0.block_sparse_moe.experts.w1"].shape
    for i in range(2):
        gate_up = theirs[f"model.layers.{i}.mlp.experts.gate_up_proj"]
        w1 = ours[f"model.layers.{i}.block_sparse_moe.experts.w1"]
        w3 = ours[f"model.layers.{i}.block_sparse_moe.experts.w3"]
        assert gate_up.data_ptr() == w1.data_ptr()
        assert w3.data_ptr() == w1.data_ptr() + inter * hidden * w1.element_size()
        assert torch.equal(gate_up[:, :inter], w1) and torch.equal(gate_up[:, inter:], w3)
        down = theirs[f"model.layers.{i}.mlp.experts.down_proj"]
        assert down.data_ptr() == ours[f"model.layers.{i}.block_sparse_moe.experts.w2"].data_ptr()
    assert theirs["lm_head.weight"].data_ptr() == ours["lm_head.weight"].data_ptr()
    q, k = (ours[f"model.layers.1.self_attn.{n}_proj.weight"] for n in "qk")
    assert info["copied_parameter_bytes"] == q.nbytes + k.nbytes
    assert set(k for k, v in info["copies"].items() if not v.startswith("derived")) == {
        "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"}
    assert info["shared_bytes"] + info["copied_parameter_bytes"] == sum(p.nbytes for p in hf.parameters())

    ids = _ids(model.config.vocab_size, seed=3)
    runner = decode.HFRunner(hf)
    before = decode.hf_logits(runner, ids, PROMPT)
    with torch.no_grad():
        ours["model.layers.0.block_sparse_moe.experts.w3"].mul_(-1.0)  # writes into transformers' gate_up_proj
        ours["model.layers.1.block_sparse_moe.experts.w2"].mul_(1.5)  # is transformers' down_proj
    after = decode.hf_logits(runner, ids, PROMPT)
    assert decode.compare_logits(after, before)["max_abs_dlogit"] > 1e-2
    _assert_tight(decode.compare_logits(after, decode.our_logits(model, ids, PROMPT)), "after an in-place change")


def test_the_check_detects_a_wrong_mapping(monkeypatch):
    """Without the q/k head permutation transformers rotates other dims: the check must see it."""
    model = _model(2)
    ids = _ids(model.config.vocab_size)
    ref = decode.our_logits(model, ids, PROMPT)
    monkeypatch.setattr(decode, "rope_head_permutation", lambda head_dim, rotary_dim: None)
    hf, _ = decode.hf_peer(model)
    check = decode.compare_logits(decode.hf_logits(decode.HFRunner(hf), ids, PROMPT), ref)
    assert check["max_abs_dlogit"] > 1e-2, check


def test_rope_head_permutation():
    assert decode.rope_head_permutation(16, 16) is None
    perm = decode.rope_head_permutation(16, 8)
    assert sorted(perm) == list(range(16))
    # transformers' pair (j, j + 8): our rotated pairs (j, j + 4) for j < 4, then pass-through dims 8..15
    assert [(perm[j], perm[j + 8]) for j in range(8)] == [(0, 4), (1, 5), (2, 6), (3, 7),
                                                          (8, 12), (9, 13), (10, 14), (11, 15)]
    with pytest.raises(ValueError, match="odd"):
        decode.rope_head_permutation(15, 8)


@pytest.mark.parametrize("no_hf", [False, True])
def test_cli_dry_run_measures_transformers(tmp_path, no_hf):
    out = tmp_path / "decode.json"
    argv = ["--preset", "tiny", "--device", "cpu", "--no-aoti", "--batches", "1", "2", "--prompt-len", "20",
            "--decode-steps", "2", "--hf-decode-steps", "2", "--out", str(out)] + (["--no-hf"] if no_hf else [])
    assert decode.main(argv) == 0
    payload = json.loads(out.read_text())
    engines = [r["engine"] for r in payload["results"]]
    if no_hf:
        assert engines == ["eager"] and "transformers" not in payload
        return
    assert engines == ["eager", "transformers"]
    hf_row = payload["results"][1]
    assert [d["B"] for d in hf_row["decode"]] == [1, 2]
    assert all(d["decode_ms_per_step"] > 0 for d in hf_row["decode"])
    check = payload["transformers"]["check_vs_ours"]
    assert check["max_abs_dlogit"] < 1e-4 and check["top1_agreement"] == 1.0, check
    hf_ms = {d["B"]: d["decode_ms_per_step"] for d in hf_row["decode"]}
    for d in payload["results"][0]["decode"]:
        assert d["speedup_vs_transformers"] == pytest.approx(hf_ms[d["B"]] / d["decode_ms_per_step"])
