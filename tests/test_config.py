"""MiniMaxConfig: both published schemas, refusals with named fields, presets and derived quantities."""

from __future__ import annotations

import json
import math

import pytest

from model import ConfigError, MiniMaxConfig

# The released MiniMax-Text-01 / M1 config.json (official schema), as listed in minimax_arch.md §1.
OFFICIAL_TEXT01 = {
    "architectures": ["MiniMaxText01ForCausalLM"],
    "model_type": "minimax_text_01",
    "attn_type_list": [0, 0, 0, 0, 0, 0, 0, 1] * 10,
    "hidden_size": 6144,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 9216,
    "num_local_experts": 32,
    "num_experts_per_tok": 2,
    "shared_intermediate_size": 0,
    "shared_moe_mode": "sigmoid",
    "vocab_size": 200064,
    "rope_theta": 10000000,
    "rotary_dim": 64,
    "max_position_embeddings": 10240000,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-05,
    "postnorm": True,
    "layernorm_full_attention_alpha": 3.5565588200778455,
    "layernorm_full_attention_beta": 1.0,
    "layernorm_linear_attention_alpha": 3.5565588200778455,
    "layernorm_linear_attention_beta": 1.0,
    "layernorm_mlp_alpha": 3.5565588200778455,
    "layernorm_mlp_beta": 1.0,
    "tie_word_embeddings": False,
    "sliding_window": None,
    "router_aux_loss_coef": 0.001,
    "router_jitter_noise": 0.0,
    "attention_dropout": 0.0,
    "bos_token_id": None,
    "eos_token_id": None,
}

TRANSFORMERS_TEXT01 = {
    "architectures": ["MiniMaxForCausalLM"],
    "model_type": "minimax",
    "layer_types": (["linear_attention"] * 7 + ["full_attention"]) * 10,
    "hidden_size": 6144,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 9216,
    "num_local_experts": 32,
    "num_experts_per_tok": 2,
    "vocab_size": 200064,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.5},
    "max_position_embeddings": 10240000,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-05,
    "block_size": 256,
    "full_attn_alpha_factor": 3.5565588200778455,
    "full_attn_beta_factor": 1.0,
    "linear_attn_alpha_factor": 3.5565588200778455,
    "linear_attn_beta_factor": 1.0,
    "mlp_alpha_factor": 3.5565588200778455,
    "mlp_beta_factor": 1.0,
    "tie_word_embeddings": False,
    "sliding_window": None,
}


def _without_eos(c: MiniMaxConfig) -> MiniMaxConfig:
    import dataclasses

    return dataclasses.replace(c, eos_token_id=None)


def test_official_and_transformers_schemas_give_the_published_model():
    official = MiniMaxConfig.from_dict(OFFICIAL_TEXT01)
    hf = MiniMaxConfig.from_dict(TRANSFORMERS_TEXT01)
    preset = _without_eos(MiniMaxConfig.preset("minimax-text-01"))
    assert official == preset
    assert hf == preset
    assert official.softmax_layers == tuple(range(7, 80, 8))
    assert len(official.lightning_layers) == 70


def test_from_pretrained_reads_a_file_and_applies_overrides(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(OFFICIAL_TEXT01))
    c = MiniMaxConfig.from_pretrained(tmp_path, eos_token_id=200020)
    assert c == MiniMaxConfig.preset("minimax-text-01")


def test_parameter_counts_match_the_published_figures():
    c = MiniMaxConfig.preset("minimax-text-01")
    assert c.num_parameters() == 456_089_655_296  # minimax_arch.md §1 (456 B total)
    assert round(c.num_parameters(active=True) / 1e9, 2) == 45.94  # 45.9 B active, no embedding / LM head


def test_state_layout_of_text01():
    c = MiniMaxConfig.preset("minimax-text-01")
    layout = c.state_layout(batch_size=1, max_seq_len=1024)
    lightning = [e for e in layout if e["name"].startswith("lightning_state")]
    assert len(lightning) == 70 and all(e["shape"] == [1, 64, 128, 128] and e["dtype"] == "float32" for e in lightning)
    assert sum(math.prod(e["shape"]) * 4 for e in lightning) == 280 * 2**20  # 280 MiB fp32 per sequence
    kv = [e for e in layout if e["name"].startswith(("key_cache", "value_cache"))]
    assert len(kv) == 20 and all(e["shape"] == [4, 8, 256, 128] for e in kv)  # 1024 tokens: 4 pages of 256
    pool = c.state_layout(batch_size=3, max_seq_len=1000, page_size=64, num_pages=40)[-1]
    assert pool["shape"] == [40, 8, 64, 128] and pool["dtype"] == "bfloat16"
    assert c.state_layout(batch_size=3, max_seq_len=1000, page_size=64)[-1]["shape"][0] == 3 * 16  # ceil(1000/64)
    assert [e["layer"] for e in kv[:10]] == list(range(7, 80, 8))


def test_decay_rates_follow_the_published_formula():
    c = MiniMaxConfig.preset("minimax-text-01")
    H, L = 64, 80
    for layer in (0, 1, 40, 78):
        expected = [2 ** (-(h + 1) * 8 / H) * (1 - layer / (L - 1) + 1e-5) for h in range(H)]
        assert c.lightning_decay_rates(layer) == pytest.approx(expected, rel=1e-12)
    assert c.lightning_decay_rates(0)[0] == pytest.approx(0.917004 * 1.00001, rel=1e-6)  # minimax_arch.md §2.3


def test_decay_rates_for_a_head_count_that_is_not_a_power_of_two():
    # ALiBi rule of the remote code: slopes of 4 heads, then every other slope of 8 heads.
    c = MiniMaxConfig.preset("tiny")  # 6 heads, 8 layers
    base = [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]
    assert c.lightning_decay_rates(0) == pytest.approx([b * (1 + 1e-5) for b in base], rel=1e-12)
    assert c.lightning_decay_rates(7) == pytest.approx([b * 1e-5 for b in base], rel=1e-9)


def test_roundtrip_through_dict():
    for name in ("tiny", "minimax-text-01"):
        c = MiniMaxConfig.preset(name)
        assert MiniMaxConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_transformers_schema_without_partial_factor_rotates_the_whole_head():
    d = dict(TRANSFORMERS_TEXT01, rope_parameters={"rope_type": "default", "rope_theta": 1e7})
    assert MiniMaxConfig.from_dict(d).rotary_dim == 128


@pytest.mark.parametrize(
    "change, message",
    [
        ({"postnorm": False}, "postnorm"),
        ({"shared_intermediate_size": 1024}, "shared expert"),
        ({"sliding_window": 4096}, "sliding_window"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
        ({"attn_type_list": [0, 2] * 40}, "attn_type_list holds 2"),
        ({"attn_type_list": [0] * 79}, "num_hidden_layers is 80"),
        ({"num_key_value_heads": 7}, "multiple of num_key_value_heads"),
        ({"rotary_dim": 129}, "rotary_dim"),
        ({"num_experts_per_tok": 33}, "num_experts_per_tok"),
    ],
)
def test_unsupported_official_configs_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        MiniMaxConfig.from_dict({**OFFICIAL_TEXT01, **change})


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e7}}, "rope_type"),
        ({"layer_types": ["linear_attention", "sliding_attention"] * 40}, "sliding_attention"),
        ({"layer_types": None}, "layer_types"),
    ],
)
def test_unsupported_transformers_configs_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        MiniMaxConfig.from_dict({**TRANSFORMERS_TEXT01, **change})


def test_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        MiniMaxConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        MiniMaxConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**OFFICIAL_TEXT01, "postnorm": False}))
    with pytest.raises(ConfigError, match=r"config.json: postnorm"):
        MiniMaxConfig.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        MiniMaxConfig.preset("huge")



def test_shared_intermediate_size_as_a_one_element_list():
    """The released VL-01 text_config writes ``shared_intermediate_size: [0]`` (no shared expert); ``[9216]`` is a
    shared expert and still refused."""
    assert MiniMaxConfig.from_dict({**OFFICIAL_TEXT01, "shared_intermediate_size": [0]}) == MiniMaxConfig.from_dict(
        OFFICIAL_TEXT01)
    with pytest.raises(ConfigError, match=r"shared_intermediate_size = \[9216\]: a shared expert"):
        MiniMaxConfig.from_dict({**OFFICIAL_TEXT01, "shared_intermediate_size": [9216]})
