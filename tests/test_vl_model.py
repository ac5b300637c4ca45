"""MiniMax-VL-01 (``model/vl.py``): config, image layout, vision tower, whole-model parity, checkpoint loading.

References we did not write: transformers 5.24's ``CLIPVisionModel`` (the vision tower alone) and
``LlavaNextForConditionalGeneration`` built from ``LlavaNextConfig(vision_config=CLIPVisionConfig(tiny),
text_config=<transformers MiniMaxConfig tiny>, ...)`` with random weights. The LLaVA-NeXT model is saved with
``save_pretrained`` and rewritten into the released MiniMax-VL-01 layout (``vision_tower.vision_model.*``, no final
vision LayerNorm, no derived lightning buffers; official ``config.json`` schema), which our loader reads.

Where the two definitions agree (CLIP tower, projector, anyres packing, newline placement, scatter into the
prompt, the text decoder with RoPE over the whole head), logits are compared. Where MiniMax differs, the difference
is tested on its own:
* unpadding: MiniMax floors the exact rational ``H * gw / W``; the original LLaVA-NeXT truncates the float
  ``H * (gw / W)``, one feature row short when the product falls just below an integer (110 x 176 -> 16 rows vs 14).
  transformers 5.24 rounds to 7 decimals before truncating, which equals the exact floor except at sizes of
  ~2e7 pixels (tested both ways).
* the feature layer: the remote code's and LLaVA-NeXT's class default is -2, the release uses -1; it is read from
  the config (required) and the choice changes the logits.
* RoPE: transformers' MiniMax rotates the whole head, the published model half of it (as ``test_hf_parity.py``):
  parity runs with ``rotary_dim = head_dim``; the published half-head setting gives other logits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import CheckpointError, ConfigError, MiniMaxConfig
from model.vl import (MINIMAX_VL_01_PINPOINTS, CLIPVisionTransformer, MiniMaxVLConfig,
                      MiniMaxVLForConditionalGeneration, VisionConfig, select_pinpoint, unpad_crop,
                      vl_checkpoint_key_plan)
from tests.conftest import hf_tiny_config, to_official_config
from tests.utils import assert_fp32_parity, logit_report, rel_err


VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=16,
              patch_size=4)  # 4 x 4 patches per tile: 16 tokens
IMAGE_TOKEN = 130  # the last id of hf_tiny_config's 131-token vocabulary
PINPOINTS = [list(p) for p in MiniMaxVLConfig.preset("tiny").image_grid_pinpoints]  # released pattern, 16-px tiles
# (height, width): rows cropped (20 x 45 -> 2x3 tiles, 6 of 8 feature rows kept); a size where float truncation
# would lose two feature columns (44 x 55 -> 3x4 tiles, 12 x 16 kept, truncation 12 x 14); columns cropped
# (50 x 18 -> 4x2 tiles, 6 of 8 columns kept).
IMAGES = [(20, 45), (44, 55), (50, 18)]
DERIVED = re.compile(r"\.self_attn\.(slope_rate|query_decay|key_decay|diagonal_decay)$")


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny shapes: one thread is faster and immune to a busy machine (whole file 4.8 s; 23-62 s with two threads
    while another test process held the second core). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that every layer matters (as ``conftest.make_hf_model``); norms near (1, 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
            elif "norm" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=generator))


def make_llava(seed: int = 0, feature_layer: int = -1):
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**VISION, hidden_act="gelu"), text_config=hf_tiny_config(),
        image_grid_pinpoints=PINPOINTS, image_token_index=IMAGE_TOKEN, vision_feature_layer=feature_layer,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", multimodal_projector_bias=True,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).float().eval()
    _randomize(model, seed)
    return model


def official_config(llava_config, feature_layer: int | None = None) -> dict:
    """A MiniMax-VL-01 ``config.json`` (remote-code schema) for a LLaVA-NeXT config."""
    hf_text = llava_config.text_config.to_dict()
    text = to_official_config(hf_text)
    text["shared_intermediate_size"] = [0]  # the released VL text_config writes it as a one-element list
    text.update(block_size=hf_text["block_size"], eos_token_id=hf_text["eos_token_id"])  # dropped by the helper
    vc = llava_config.vision_config
    vision = {"model_type": "clip_vision_model", "projection_dim": 6144,
              **{k: getattr(vc, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                             "num_attention_heads", "num_channels", "image_size", "patch_size",
                                             "hidden_act", "layer_norm_eps")}}
    return {
        "architectures": ["MiniMaxVL01ForConditionalGeneration"], "model_type": "minimax_vl_01",
        "text_config": text, "vision_config": vision, "image_token_index": llava_config.image_token_index,
        "vision_feature_layer": llava_config.vision_feature_layer if feature_layer is None else feature_layer,
        "vision_feature_select_strategy": "default", "image_grid_pinpoints": llava_config.image_grid_pinpoints,
        "projector_hidden_act": "gelu", "ignore_index": -100, "image_seq_length": 576, "tie_word_embeddings": False,
    }


def write_official(llava, path: Path, hf_dir: Path, num_shards: int = 3) -> None:
    """``save_pretrained`` the LLaVA-NeXT model to ``hf_dir``, then write it to ``path`` in the released layout."""
    llava.save_pretrained(hf_dir)
    official = {}
    for key, tensor in load_file(hf_dir / "model.safetensors").items():
        if key.startswith("vision_tower.post_layernorm.") or DERIVED.search(key):
            continue  # not in the released checkpoint
        if key.startswith("vision_tower."):
            key = "vision_tower.vision_model." + key[len("vision_tower."):]
        official[key] = tensor
    path.mkdir(parents=True, exist_ok=True)
    keys = sorted(official)
    weight_map = {}
    for s in range(num_shards):
        name = f"model-{s:05d}-of-{num_shards:05d}.safetensors"
        part = keys[s::num_shards]
        save_file({k: official[k].contiguous() for k in part}, path / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(official_config(llava.config), indent=1))


@pytest.fixture(scope="module")
def vl_checkpoint(tmp_path_factory):
    """(LLaVA-NeXT reference, official-layout checkpoint dir, LLaVA-NeXT save_pretrained dir)."""
    llava = make_llava(seed=0)
    root = tmp_path_factory.mktemp("vl")
    write_official(llava, root / "official", root / "hf")
    return llava, root / "official", root / "hf"


@pytest.fixture
def ckpt(vl_checkpoint, tmp_path) -> Path:
    """A private copy of the official-layout checkpoint, free to break."""
    dst = tmp_path / "ckpt"
    shutil.copytree(vl_checkpoint[1], dst)
    return dst


def _inputs(config: MiniMaxVLConfig, seed: int = 0):
    """Two rows of equal length: text, image 0, text, image 1, text | text, image 2, text. Random pixels."""
    layouts = [config.image_layout(h, w) for h, w in IMAGES]
    generator = torch.Generator().manual_seed(seed)

    def text(n):
        return torch.randint(0, IMAGE_TOKEN, (n,), generator=generator)

    def image(i):
        return torch.full((layouts[i].num_tokens,), IMAGE_TOKEN)

    row0 = torch.cat([text(5), image(0), text(4), image(1), text(3)])
    row1 = torch.cat([text(7), image(2)])
    row1 = torch.cat([row1, text(row0.numel() - row1.numel())])
    pixel_values = torch.randn(sum(lay.num_tiles for lay in layouts), 3, 16, 16, generator=generator)
    return torch.stack([row0, row1]), pixel_values, torch.tensor(IMAGES)


def _index(path: Path) -> dict:
    return json.loads((path / "model.safetensors.index.json").read_text())


def _edit_shard(path: Path, key: str, fn) -> Path:
    shard = path / _index(path)["weight_map"][key]
    tensors = load_file(shard)
    fn(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    return shard


def _add_tensor(path: Path, key: str, tensor: torch.Tensor) -> None:
    index = _index(path)
    shard = next(iter(index["weight_map"].values()))
    tensors = load_file(path / shard)
    tensors[key] = tensor
    save_file(tensors, path / shard, metadata={"format": "pt"})
    index["weight_map"][key] = shard
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def _rewrite_config(path: Path, fn) -> None:
    (path / "config.json").write_text(json.dumps(fn(json.loads((path / "config.json").read_text()))))


# ------------------------------------------------------------------------------------------ config, layout
def test_preset_is_the_released_model():
    """§7 sizes; the meta-built model's checkpoint keys are exactly the released MiniMax-VL-01 index (8,637 keys,
    the SHA-256 of the sorted key list that transformers' ``test_conversion_minimax_vl_01.py`` pins); the vision
    tower has the card's 303 M parameters."""
    c = MiniMaxVLConfig.preset("minimax-vl-01")
    v = c.vision
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (1024, 24, 16, 4096)
    assert (v.patch_size, v.image_size, v.hidden_act, v.layer_norm_eps, v.tokens_per_tile) == (14, 336, "gelu", 1e-5,
                                                                                                 576)
    assert (c.image_token_index, c.vision_feature_layer, c.vision_layers_used) == (200025, -1, 24)
    assert len(c.image_grid_pinpoints) == 28 and max(h * w for h, w in c.image_grid_pinpoints) // 336**2 == 18
    assert c.text == MiniMaxConfig.preset("minimax-text-01")
    with torch.device("meta"):
        model = MiniMaxVLForConditionalGeneration(c, dtype=torch.bfloat16)
    keys = sorted(vl_checkpoint_key_plan(model))
    assert len(keys) == 8637
    assert hashlib.sha256("\n".join(keys).encode()).hexdigest() == \
        "d0caf1b714cdfc4caa65b56cbec591668d77b0e2a5d6cf3b5af169531311c886"
    assert sum(p.numel() for p in model.vision_tower.parameters()) == 303_505_408
    projector = sum(p.numel() for p in model.multi_modal_projector.parameters())
    assert projector == 1024 * 6144 + 6144 + 6144 * 6144 + 6144


def test_image_layout_hand_computed():
    """§7's two examples, and 110 x 176 where exact flooring and float truncation part ways."""
    c = MiniMaxVLConfig.preset("minimax-vl-01")
    square = c.image_layout(336, 336)  # pinpoint 336x336 -> 1x1 tiles -> 24 x 24 features, nothing cut
    assert (square.pinpoint, square.num_tiles, square.feature_height, square.feature_width) == ((336, 336), 2, 24, 24)
    assert square.num_tokens == 576 + 24 * 25 == 1176
    tall = c.image_layout(2016, 1008)  # 6x3 tiles -> 144 x 72 features
    assert (tall.pinpoint, tall.rows, tall.cols, tall.num_tiles) == ((2016, 1008), 6, 3, 19)
    assert tall.num_tokens == 576 + 144 * 73 == 11088
    # 110 x 176 -> pinpoint 336x336 (1x1 tiles), wider than the grid: n = floor(110 * 24 / 176) = 15 exactly, so
    # (24 - 15) // 2 = 4 rows are cut at each end -> 16 rows. The float 110 * (24 / 176) = 14.999999999999998
    # truncates to 14 -> 5 rows cut at each end -> 14 rows (50 tokens fewer).
    wide = c.image_layout(110, 176)
    assert (wide.pinpoint, wide.top, wide.left, wide.feature_height, wide.feature_width) == ((336, 336), 4, 0, 16, 24)
    assert wide.num_tokens == 576 + 16 * 25 == 976
    assert int(110 * (24 / 176)) == 14


def test_pinpoint_selection_matches_transformers():
    from transformers.image_processing_utils import select_best_resolution

    rng = random.Random(0)
    pinpoints = [list(p) for p in MINIMAX_VL_01_PINPOINTS]
    sizes = [(rng.randint(1, 4000), rng.randint(1, 4000)) for _ in range(2000)] + [(336, 336), (2016, 1008), (1, 1)]
    chosen = set()
    for h, w in sizes:
        ours = select_pinpoint(h, w, MINIMAX_VL_01_PINPOINTS)
        assert ours == tuple(select_best_resolution((h, w), pinpoints)), (h, w)
        chosen.add(ours)
    assert len(chosen) >= 20  # the sweep reaches most of the grid


def test_unpad_floor_vs_llava_next_rounding():
    """Our crop against transformers 5.24's ``unpad_image`` (round to 7 decimals, then truncate) on a sweep: equal;
    against the original LLaVA-NeXT float truncation: different on real sizes; 5.24 differs only at ~2e7 px."""
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    def truncating(H, W, gh, gw):  # LLaVA-NeXT's original rule
        if W / H > gw / gh:
            pad = (gh - int(H * (gw / W))) // 2
            return pad, 0, gh - 2 * pad, gw
        pad = (gw - int(W * (gh / H))) // 2
        return 0, pad, gh, gw - 2 * pad

    c = MiniMaxVLConfig.preset("minimax-vl-01")
    rng = random.Random(1)
    # Sizes (found by a scan over H < 2100) where the float truncation keeps two feature rows/columns fewer.
    truncation_differs = [(110, 176), (176, 1408), (183, 1464), (205, 1968), (328, 1681), (656, 1681), (742, 848),
                          (861, 1968)]
    sizes = [(rng.randint(1, 3000), rng.randint(1, 3000)) for _ in range(1500)] + truncation_differs
    for H, W in sizes:
        lay = c.image_layout(H, W)
        gh, gw = lay.rows * 24, lay.cols * 24
        ours = unpad_crop(H, W, gh, gw)
        assert ours[2:] == tuple(unpad_image(torch.zeros(1, gh, gw), (H, W)).shape[1:]), (H, W)
        if (H, W) in truncation_differs:
            kept = truncating(H, W, gh, gw)[2:]
            assert kept != ours[2:] and sum(ours[2:]) - sum(kept) == 2, (H, W, ours, kept)
    assert truncating(110, 176, 24, 24)[2] == 14 and unpad_crop(110, 176, 24, 24)[2] == 16
    # H * 12 / W = 5 - 1/W with W = 20,000,009: the exact floor is 4 (2 rows cut each end -> 4 of 8 rows); rounding
    # to 7 decimals first gives 5 (1 row cut each end -> 6 rows).
    H, W = 8_333_337, 20_000_009
    assert 5 * W - 12 * H == 1
    assert unpad_crop(H, W, 8, 12) == (2, 0, 4, 12)
    assert tuple(unpad_image(torch.zeros(1, 8, 12), (H, W)).shape[1:]) == (6, 12)


def _official_text(c: MiniMaxConfig) -> dict:
    """A MiniMax-Text-01 ``text_config`` in the official schema, as the released VL config.json has it."""
    return {
        "model_type": "minimax_text_01", "architectures": ["MiniMaxText01ForCausalLM"],
        "attn_type_list": [int(t == "full_attention") for t in c.layer_types], "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
        "num_local_experts": c.num_local_experts, "num_experts_per_tok": c.num_experts_per_tok,
        "rotary_dim": c.rotary_dim, "rope_theta": c.rope_theta, "postnorm": True, "rms_norm_eps": c.rms_norm_eps,
        "layernorm_full_attention_alpha": c.full_attn_alpha, "layernorm_full_attention_beta": c.full_attn_beta,
        "layernorm_linear_attention_alpha": c.linear_attn_alpha, "layernorm_linear_attention_beta": c.linear_attn_beta,
        "layernorm_mlp_alpha": c.mlp_alpha, "layernorm_mlp_beta": c.mlp_beta,
        "max_position_embeddings": c.max_position_embeddings, "eos_token_id": c.eos_token_id,
        "shared_intermediate_size": [0], "shared_moe_mode": "sigmoid", "hidden_act": "silu",
    }


def _released_config_dict() -> dict:
    preset = MiniMaxVLConfig.preset("minimax-vl-01")
    return {
        "architectures": ["MiniMaxVL01ForConditionalGeneration"], "model_type": "minimax_vl_01",
        "auto_map": {"AutoConfig": "configuration_minimax_vl_01.MiniMaxVL01Config"},
        "text_config": _official_text(preset.text),
        "vision_config": {"model_type": "clip_vision_model", "hidden_act": "gelu", "hidden_size": 1024,
                          "image_size": 336, "intermediate_size": 4096, "layer_norm_eps": 1e-5,
                          "num_attention_heads": 16, "num_channels": 3, "num_hidden_layers": 24, "patch_size": 14,
                          "projection_dim": 6144, "attention_dropout": 0.0},
        "image_token_index": 200025, "vision_feature_layer": -1, "vision_feature_select_strategy": "default",
        "image_grid_pinpoints": [list(p) for p in MINIMAX_VL_01_PINPOINTS], "projector_hidden_act": "gelu",
        "ignore_index": -100, "image_seq_length": 576, "tie_word_embeddings": False,
    }


def test_official_config_reads_as_the_preset_and_round_trips(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_released_config_dict()))
    config = MiniMaxVLConfig.from_pretrained(tmp_path)
    assert config == MiniMaxVLConfig.preset("minimax-vl-01")
    assert MiniMaxVLConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    tiny = MiniMaxVLConfig.preset("tiny")
    assert MiniMaxVLConfig.from_dict(tiny.to_dict()) == tiny


def test_vision_config_defaults_are_clip_s():
    """A ``vision_config`` field left out takes ``CLIPVisionConfig``'s default, as the remote code builds it:
    notably ``quick_gelu``, not MiniMax-VL-01's ``gelu``."""
    from transformers import CLIPVisionConfig

    d = _released_config_dict()
    del d["vision_config"]["hidden_act"], d["vision_config"]["layer_norm_eps"]
    v = MiniMaxVLConfig.from_dict(d).vision
    ref = CLIPVisionConfig(**d["vision_config"])
    assert (v.hidden_act, v.layer_norm_eps) == (ref.hidden_act, ref.layer_norm_eps) == ("quick_gelu", 1e-5)


def _broken(path: tuple, value) -> dict:
    d = _released_config_dict()
    target = d
    for k in path[:-1]:
        target = target[k]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return d


@pytest.mark.parametrize("path, value, message", [
    (("vision_feature_layer",), KeyError, r"missing fields \['vision_feature_layer'\]"),
    (("image_token_index",), KeyError, r"missing fields \['image_token_index'\]"),
    (("text_config",), "x", "text_config must be an object"),
    (("vision_config",), [1], "vision_config must be an object"),
    (("vision_config", "model_type"), "siglip_vision_model", "only 'clip_vision_model'"),
    (("vision_config", "hidden_act"), "relu", r"vision_config.hidden_act = 'relu'"),
    (("vision_config", "patch_size"), 15, r"image_size \(336\) must be a multiple of patch_size \(15\)"),
    (("vision_config", "hidden_size"), "1024", "vision_config.hidden_size must be a positive integer"),
    (("image_token_index",), 200064, r"image_token_index must be a token id in \[0, text vocab_size=200064\)"),
    (("vision_feature_layer",), [-2, -1], "features concatenated from several layers are not supported"),
    (("vision_feature_layer",), -26, r"vision_feature_layer must be an integer in \[-25, 24\]"),
    (("vision_feature_layer",), True, "vision_feature_layer must be an integer"),
    (("vision_feature_select_strategy",), "full", "only 'default'"),
    (("projector_hidden_act",), "relu", "projector_hidden_act = 'relu'"),
    (("multimodal_projector_bias",), False, "multimodal_projector_bias = false is not supported"),
    (("image_grid_pinpoints",), [[336, 500]], r"image_grid_pinpoints\[0\] = \[336, 500\] is not a whole number"),
    (("image_grid_pinpoints",), [[336]], r"image_grid_pinpoints\[0\] must be \[height, width\]"),
    (("image_grid_pinpoints",), [], "image_grid_pinpoints must be a non-empty list"),
    (("text_config", "shared_intermediate_size"), [8], "text_config: shared_intermediate_size = \\[8\\]"),
    (("text_config", "attn_type_list"), [0, 2], "text_config: attn_type_list holds 2"),
])
def test_malformed_config_is_refused_by_name(path, value, message):
    with pytest.raises(ConfigError, match=message):
        MiniMaxVLConfig.from_dict(_broken(path, value))


def test_llava_next_config_json_reads_the_same(vl_checkpoint):
    """The transformers-schema config LLaVA-NeXT saves (text in the transformers MiniMax schema) reads as the
    official one we wrote from it."""
    _, official, hf_dir = vl_checkpoint
    assert MiniMaxVLConfig.from_pretrained(hf_dir) == MiniMaxVLConfig.from_pretrained(official)


# ------------------------------------------------------------------------------------------------ vision tower
@pytest.mark.parametrize("hidden_act, feature_layer", [("gelu", -1), ("quick_gelu", -2), ("gelu", 0)])
@torch.no_grad()
def test_vision_tower_matches_clip_vision_model(hidden_act, feature_layer):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    clip = CLIPVisionModel(CLIPVisionConfig(**VISION, hidden_act=hidden_act)).float().eval()
    _randomize(clip, seed=5)
    vision = VisionConfig(**VISION, hidden_act=hidden_act)
    used = feature_layer if feature_layer >= 0 else vision.num_hidden_layers + 1 + feature_layer
    ours = CLIPVisionTransformer(vision, used)
    unused = re.compile(r"^post_layernorm\.|^encoder\.layers\.(\d+)\.")  # no final norm; layers past the feature
    state = {k: v for k, v in clip.state_dict().items()
             if not (m := unused.match(k)) or (m.group(1) is not None and int(m.group(1)) < used)}
    ours.load_state_dict(state, strict=True)
    pixels = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    ref = clip(pixels, output_hidden_states=True).hidden_states[feature_layer]
    out = ours(pixels)
    assert ref.abs().max() > 0.5
    err = rel_err(out, ref)
    print(f"vision tower ({hidden_act}, layer {feature_layer}) rel err {err:.3g}")
    assert err < 1e-6, err


# ----------------------------------------------------------------------------------------- whole model parity
@torch.no_grad()
def test_logits_match_llava_next(vl_checkpoint):
    """Three images of three sizes in a batch of two rows, logits and image features against LLaVA-NeXT."""
    llava, path, _ = vl_checkpoint
    ours = MiniMaxVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    assert ours.config.text.rotary_dim == ours.config.text.head_dim  # transformers' MiniMax rotates the whole head
    ids, pixels, sizes = _inputs(ours.config)
    assert [lay.num_tokens for lay in ours.image_layouts(sizes)] == [94, 220, 128]
    ref = llava(input_ids=ids, pixel_values=pixels, image_sizes=sizes)
    for i, (f, r) in enumerate(zip(ours.image_features(pixels, sizes), ref.image_outputs.pooler_output)):
        assert f.shape == r.shape, (i, f.shape, r.shape)
        assert rel_err(f, r) < 1e-6, (i, rel_err(f, r))
    assert ref.logits.abs().max() > 1.0
    assert_fp32_parity(logit_report(ours(ids, pixels, sizes), ref.logits), "VL logits vs LLaVA-NeXT (3 images, B=2)")


@torch.no_grad()
def test_feature_layer_is_read_from_the_config(vl_checkpoint, ckpt, caplog):
    """-2 (LLaVA-NeXT's and the remote code's class default) instead of the released -1: the tower is built with 2
    of the 3 layers, the third layer's tensors are left unread, the logits match LLaVA-NeXT at -2 and differ from
    those at -1."""
    llava, path, _ = vl_checkpoint
    _rewrite_config(ckpt, lambda d: {**d, "vision_feature_layer": -2})
    with caplog.at_level(logging.INFO, logger="model.vl"):
        ours = MiniMaxVLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)
    assert len(ours.vision_tower.vision_model.encoder.layers) == 2
    assert "tensors not loaded" in caplog.text
    ids, pixels, sizes = _inputs(ours.config, seed=1)
    logits = ours(ids, pixels, sizes)
    ref = llava(input_ids=ids, pixel_values=pixels, image_sizes=sizes, vision_feature_layer=-2).logits
    assert_fp32_parity(logit_report(logits, ref), "feature layer -2 vs LLaVA-NeXT at -2")
    last = MiniMaxVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    assert logit_report(last(ids, pixels, sizes), logits)["max_abs"] > 1e-2


@torch.no_grad()
def test_published_half_head_rope_differs_from_transformers(vl_checkpoint, ckpt):
    """The published model rotates ``rotary_dim`` = head_dim / 2; transformers' MiniMax (and so this parity setup)
    the whole head. The same weights with the published setting give other logits."""
    llava, _, _ = vl_checkpoint

    def half(d):
        d["text_config"]["rotary_dim"] = d["text_config"]["head_dim"] // 2
        return d

    _rewrite_config(ckpt, half)
    ours = MiniMaxVLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)
    ids, pixels, sizes = _inputs(ours.config)
    ref = llava(input_ids=ids, pixel_values=pixels, image_sizes=sizes).logits
    assert logit_report(ours(ids, pixels, sizes), ref)["max_abs"] > 1e-2


@torch.no_grad()
def test_text_only_prompt_is_the_text_model():
    """No images: the VL model (its decoder run on input embeddings) equals the text model bit for bit."""
    model = MiniMaxVLForConditionalGeneration(MiniMaxVLConfig.preset("tiny")).init_random_weights(seed=3, std=0.1)
    ids = torch.randint(0, 500, (2, 21), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(ids), model.language_model(ids))


@torch.no_grad()
def test_prefill_with_images_then_decode_matches_forward():
    config = MiniMaxVLConfig.preset("tiny")
    model = MiniMaxVLForConditionalGeneration(config).init_random_weights(seed=4, std=0.1)
    lay = config.image_layout(30, 50)
    generator = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.randint(0, 500, (1, 3), generator=generator),
                     torch.full((1, lay.num_tokens), config.image_token_index),
                     torch.randint(0, 500, (1, 9), generator=generator)], dim=1)
    pixels = torch.randn(1, lay.num_tiles + 2, 3, 16, 16, generator=generator)  # 5-D, padded with two extra tiles
    full = model(ids, pixels, [(30, 50)])
    prompt = ids.shape[1] - 5
    state = model.new_state(1, ids.shape[1])
    logits, state = model.prefill(ids[:, :prompt], state, pixels, [(30, 50)])
    steps = [logits]
    for t in range(prompt, ids.shape[1]):
        logits, state = model.decode(ids[:, t : t + 1], torch.tensor([t]), state)
        steps.append(logits)
    assert rel_err(torch.cat(steps, 1), full) < 1e-5
    assert full[0, -1].std() > 1e-2


def test_placeholder_and_tile_mismatches_are_named():
    config = MiniMaxVLConfig.preset("tiny")
    model = MiniMaxVLForConditionalGeneration(config).init_random_weights(seed=0)
    a, b = config.image_layout(20, 45), config.image_layout(44, 55)
    tok = config.image_token_index

    def prompt(*counts):
        parts = []
        for n in counts:
            parts += [torch.tensor([7, 8]), torch.full((n,), tok)]
        return torch.cat(parts)[None]

    pixels = torch.randn(a.num_tiles + b.num_tiles, 3, 16, 16)
    sizes = [(20, 45), (44, 55)]
    with pytest.raises(ValueError, match=r"image 1 \(44x55 pixels, 3x4 tiles\): expected 220 image tokens "
                                         r"\(16 \+ 12x\(16\+1\)\), found 219 at row 0"):
        model(prompt(a.num_tokens, b.num_tokens - 1), pixels, sizes)
    with pytest.raises(ValueError, match=r"image 1 \(44x55 pixels, 3x4 tiles\): expected 220 image tokens, "
                                         r"found 223"):
        model(prompt(a.num_tokens, b.num_tokens + 3), pixels, sizes)
    with pytest.raises(ValueError, match=r"image 1 .*: expected 220 image tokens .*found none"):
        model(prompt(a.num_tokens), pixels, sizes)
    with pytest.raises(ValueError, match=r"5 image tokens beyond the 2 images' 314"):
        model(prompt(a.num_tokens, b.num_tokens, 5), pixels, sizes)
    with pytest.raises(ValueError, match=r"input_ids hold 94 image tokens \(id 500\) but no images were given"):
        model(prompt(a.num_tokens))
    with pytest.raises(ValueError, match=r"pixel_values holds 19 tiles; the 2 images need 20 \(7 \+ 13"):
        model(prompt(a.num_tokens, b.num_tokens), pixels[:-1], sizes)
    with pytest.raises(ValueError, match=r"image 1 \(44x55 pixels, 3x4 tiles\) needs 13 tiles"):
        model(prompt(a.num_tokens, b.num_tokens), torch.zeros(2, 7, 3, 16, 16), sizes)
    # adjacent images share one run of placeholders: accepted
    assert model(prompt(a.num_tokens + b.num_tokens), pixels, sizes).shape[1] == 2 + a.num_tokens + b.num_tokens


# ----------------------------------------------------------------------------------------------------- loading
def test_loads_bf16_with_fp32_gate_and_head(vl_checkpoint, caplog):
    _, path, _ = vl_checkpoint
    with caplog.at_level(logging.INFO, logger="model.loading"):
        model = MiniMaxVLForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16)
    vm = model.vision_tower.vision_model
    for p in (vm.embeddings.patch_embedding.weight, vm.encoder.layers[2].mlp.fc1.weight, vm.pre_layrnorm.weight,
              model.multi_modal_projector.linear_2.bias, model.image_newline,
              model.language_model.model.layers[1].self_attn.qkv_proj.weight):
        assert p.dtype == torch.bfloat16
    assert model.language_model.model.layers[1].block_sparse_moe.gate.weight.dtype == torch.float32
    assert model.language_model.lm_head.weight.dtype == torch.float32
    assert "shard 3/3" in caplog.text
    # bf16 against fp32: the image features are close (0.9 % measured); the logits carry the text decoder's own
    # bf16 error (5.8 % with images, 6.3 % on a text prompt of the same length, both top-1 95 %).
    ids, pixels, sizes = _inputs(model.config)
    fp32 = MiniMaxVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        features = torch.cat(model.image_features(pixels, sizes))
        assert features.dtype == torch.bfloat16
        assert rel_err(features, torch.cat(fp32.image_features(pixels, sizes))) < 2e-2
        logits = model(ids, pixels, sizes)
        assert logits.dtype == torch.float32
        text_ids = torch.randint(0, IMAGE_TOKEN, ids.shape, generator=torch.Generator().manual_seed(9))
        text_gap = rel_err(model(text_ids), fp32(text_ids))
        assert rel_err(logits, fp32(ids, pixels, sizes)) < 1.5 * text_gap
        assert logit_report(logits, fp32(ids, pixels, sizes))["top1"] > 0.9


def test_fp32_weights_are_memory_mapped(vl_checkpoint):
    _, path, _ = vl_checkpoint
    model = MiniMaxVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    maps = [line.split() for line in Path("/proc/self/maps").read_text().splitlines()]
    for key, param in [("vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight",
                        model.vision_tower.vision_model.encoder.layers[1].mlp.fc1.weight),
                       ("multi_modal_projector.linear_1.weight", model.multi_modal_projector.linear_1.weight),
                       ("language_model.model.layers.1.self_attn.qkv_proj.weight",
                        model.language_model.model.layers[1].self_attn.qkv_proj.weight)]:
        shard = (path / _index(path)["weight_map"][key]).resolve()
        ranges = [tuple(int(x, 16) for x in m[0].split("-")) for m in maps if len(m) >= 6 and m[5] == str(shard)]
        assert any(lo <= param.data_ptr() < hi for lo, hi in ranges), key


@pytest.mark.parametrize("key", ["vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight",
                                 "vision_tower.vision_model.embeddings.class_embedding",
                                 "multi_modal_projector.linear_2.bias", "image_newline",
                                 "language_model.model.layers.3.self_attn.q_proj.weight",
                                 "language_model.model.layers.2.block_sparse_moe.experts.4.w2.weight"])
def test_missing_tensor_is_named(ckpt, key):
    _edit_shard(ckpt, key, lambda t: t.pop(key))
    index = _index(ckpt)
    del index["weight_map"][key]
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"missing tensors \(1\): {re.escape(key)}$"):
        MiniMaxVLForConditionalGeneration.from_pretrained(ckpt)


@pytest.mark.parametrize("key, expected", [("multi_modal_projector.linear_1.weight", [48, 32]),
                                           ("vision_tower.vision_model.embeddings.position_embedding.weight", [17, 32]),
                                           ("language_model.model.layers.0.self_attn.qkv_proj.weight", [192, 48])])
def test_wrong_shape_is_named(ckpt, key, expected):
    shard = _edit_shard(ckpt, key, lambda t: t.update({key: t[key][:-1].contiguous()}))
    got = [expected[0] - 1, *expected[1:]]
    message = f"{shard.name}: tensor {key} has shape {got}, expected {expected}"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        MiniMaxVLForConditionalGeneration.from_pretrained(ckpt)


@pytest.mark.parametrize("key", ["vision_tower.vision_model.encoder.layers.3.mlp.fc1.weight",  # beyond 3 layers
                                 "vision_tower.encoder.layers.0.mlp.fc1.weight",  # LLaVA-NeXT's layout
                                 "multi_modal_projector.linear_3.weight"])
def test_unexpected_tensor_is_named(ckpt, key):
    _add_tensor(ckpt, key, torch.zeros(4, 4))
    with pytest.raises(CheckpointError, match=rf"unexpected tensors \(1\): {re.escape(key)}$"):
        MiniMaxVLForConditionalGeneration.from_pretrained(ckpt)


@torch.no_grad()
def test_unused_tensors_are_ignored(vl_checkpoint, ckpt):
    """A final vision LayerNorm (LLaVA-style checkpoints have one, MiniMax-VL-01 does not), a saved position_ids
    buffer and the lightning decay tables transformers saves: loaded past, the logits unchanged."""
    _, path, _ = vl_checkpoint
    _add_tensor(ckpt, "vision_tower.vision_model.post_layernorm.weight", torch.full((32,), 7.0))
    _add_tensor(ckpt, "vision_tower.vision_model.post_layernorm.bias", torch.full((32,), 3.0))
    _add_tensor(ckpt, "vision_tower.vision_model.embeddings.position_ids", torch.arange(17)[None])
    _add_tensor(ckpt, "language_model.model.layers.0.self_attn.slope_rate", torch.ones(4, 1, 1))
    ids, pixels, sizes = _inputs(MiniMaxVLConfig.from_pretrained(ckpt))
    loaded = MiniMaxVLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)(ids, pixels, sizes)
    reference = MiniMaxVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)(ids, pixels, sizes)
    assert torch.equal(loaded, reference)


def test_bad_config_is_refused_before_loading(ckpt):
    _rewrite_config(ckpt, lambda d: {**d, "vision_feature_select_strategy": "full"})
    with pytest.raises(ConfigError, match=r"config.json: vision_feature_select_strategy = 'full'"):
        MiniMaxVLForConditionalGeneration.from_pretrained(ckpt)
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        MiniMaxVLForConditionalGeneration.from_pretrained(ckpt / "nowhere")
