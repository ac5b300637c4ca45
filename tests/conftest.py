"""Shared fixtures: random transformers MiniMax checkpoints written in the official key format."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))


def hf_tiny_config(**overrides):
    """A tiny transformers MiniMaxConfig: 4 heads (power of two), 2 periods of 3 lightning + 1 softmax layer."""
    from transformers import MiniMaxConfig as HFConfig

    kwargs = dict(
        vocab_size=131,
        hidden_size=48,
        intermediate_size=40,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=5,
        num_experts_per_tok=2,
        block_size=8,
        layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 2,
        full_attn_alpha_factor=(2 * 8) ** 0.25,
        linear_attn_alpha_factor=(2 * 8) ** 0.25,
        mlp_alpha_factor=(2 * 8) ** 0.25,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        max_position_embeddings=4096,
    )
    kwargs.update(overrides)
    return HFConfig(**kwargs)


def make_hf_model(seed: int = 0, **overrides):
    """A random transformers MiniMaxForCausalLM in fp32, weights scaled so every layer matters."""
    from transformers import MiniMaxForCausalLM as HFModel

    torch.manual_seed(seed)
    model = HFModel(hf_tiny_config(**overrides)).float().eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=generator))
    return model


def to_official_config(hf_config_dict: dict) -> dict:
    """Rewrite a transformers-schema config.json into the official MiniMax schema (as the hub's remote code has it)."""
    d = dict(hf_config_dict)
    kinds = {"linear_attention": 0, "full_attention": 1}
    official = {
        "architectures": ["MiniMaxText01ForCausalLM"],
        "model_type": "minimax_text_01",
        "attn_type_list": [kinds[t] for t in d["layer_types"]],
        "vocab_size": d["vocab_size"],
        "hidden_size": d["hidden_size"],
        "intermediate_size": d["intermediate_size"],
        "num_hidden_layers": d["num_hidden_layers"],
        "num_attention_heads": d["num_attention_heads"],
        "num_key_value_heads": d["num_key_value_heads"],
        "head_dim": d["head_dim"],
        "num_local_experts": d["num_local_experts"],
        "num_experts_per_tok": d["num_experts_per_tok"],
        "hidden_act": "silu",
        "rms_norm_eps": d["rms_norm_eps"],
        "rope_theta": d["rope_parameters"]["rope_theta"],
        "rotary_dim": d["head_dim"],
        "postnorm": True,
        "shared_intermediate_size": 0,
        "shared_moe_mode": "sigmoid",
        "layernorm_full_attention_alpha": d["full_attn_alpha_factor"],
        "layernorm_full_attention_beta": d["full_attn_beta_factor"],
        "layernorm_linear_attention_alpha": d["linear_attn_alpha_factor"],
        "layernorm_linear_attention_beta": d["linear_attn_beta_factor"],
        "layernorm_mlp_alpha": d["mlp_alpha_factor"],
        "layernorm_mlp_beta": d["mlp_beta_factor"],
        "max_position_embeddings": d["max_position_embeddings"],
        "tie_word_embeddings": False,
        "sliding_window": None,
    }
    return official


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """(transformers model, checkpoint dir) — saved sharded, official key names, transformers config schema."""
    model = make_hf_model(seed=0)
    path = tmp_path_factory.mktemp("hf_tiny")
    model.save_pretrained(path, max_shard_size="100KB")
    return model, path


def rewrite_config(path: Path, fn) -> None:
    cfg_path = path / "config.json"
    cfg_path.write_text(json.dumps(fn(json.loads(cfg_path.read_text())), indent=2))
