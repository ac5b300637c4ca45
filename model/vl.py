"""MiniMax-VL-01: a CLIP ViT-L/14-336 vision tower, a two-layer MLP projector and the MiniMax-Text-01 decoder.

The network (MiniMax's remote code ``MiniMaxVL01ForConditionalGeneration``, as vLLM's ``minimax_vl_01.py`` and
transformers' ``minimax_vl_01`` reimplement it; the architecture reference, section 7):

* **Tiles.** An image of ``H x W`` pixels is resized into the pinpoint resolution that keeps the most of it
  (``select_pinpoint``, LLaVA-NeXT's rule), cut into ``rows x cols`` tiles of ``S x S`` (S = 336) and preceded by
  an ``S x S`` thumbnail: ``1 + rows * cols`` tiles of pixels (``pixel_values``), made by the image processor.
* **Vision tower** (CLIP vision transformer, no bias in the patch conv, no final LayerNorm): per tile,
  ``h_0 = pre_layrnorm([cls; conv(pixels)] + pos)``, ``h_l = h_{l-1} + attn(ln1(h_{l-1}))`` then
  ``+ mlp(ln2(.))``; the features are ``h_j`` of ``vision_feature_layer`` j (-1: the last layer) without the CLS
  row: ``g * g`` vectors per tile, ``g = S / patch`` (24 -> 576).
* **Projector**: ``linear_2(gelu(linear_1(f)))``, 1024 -> 6144 -> 6144, with biases.
* **Packing** ("anyres", ``pack_image_features``): the tile features form a ``(rows g) x (cols g)`` grid, row-major
  over tiles; the rows or columns the letterbox added are cut (``unpad_crop``, MiniMax's floor rounding), the
  learned ``image_newline`` is appended after every grid row, the grid is flattened row-major and the ``g * g``
  thumbnail features go first: ``g^2 + h (w + 1)`` vectors (``ImageLayout.num_tokens``).
* **Decoder**: the text embeddings of ``input_ids`` with the packed features written, in order, at the positions
  holding ``image_token_index``; then the MiniMax-Text-01 decoder and its fp32 LM head, unchanged
  (``model.modeling``).

Image features are computed eagerly (their shapes follow the image sizes, known on the host); the decoder is the
text model's, state and all. The checkpoint keys are the released ones: ``vision_tower.vision_model.*``,
``multi_modal_projector.linear_{1,2}.*``, ``image_newline``, ``language_model.model.*``,
``language_model.lm_head.weight`` (``load_vl_checkpoint``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import PRESETS as TEXT_PRESETS
from .image_processing import IMAGE_GRID_PINPOINTS, select_best_resolution
from .config import ConfigError, MiniMaxConfig, _short, read_config_json
from .loading import (IGNORED_KEY_PATTERN, CheckpointError, _check_shapes, _read_index, _stream, _Target,
                      _validate, checkpoint_key_plan)
from .modeling import MiniMaxForCausalLM, MiniMaxModel
from .state import MiniMaxState

logger = logging.getLogger(__name__)

__all__ = ["VisionConfig", "MiniMaxVLConfig", "ImageLayout", "MiniMaxVLForConditionalGeneration", "VL_PRESETS",
           "MINIMAX_VL_01_PINPOINTS", "select_pinpoint", "unpad_crop", "pack_image_features", "packing_index",
           "load_vl_checkpoint", "vl_checkpoint_key_plan", "convert_vl_checkpoint", "validate_vl_checkpoint"]

# The 28 (height, width) resolutions released with MiniMax-VL-01 (minimax_arch.md §7): at most 18 tiles (6 x 3).
MINIMAX_VL_01_PINPOINTS: tuple[tuple[int, int], ...] = IMAGE_GRID_PINPOINTS


def quick_gelu(x: Tensor) -> Tensor:
    """CLIP's original activation, ``x * sigmoid(1.702 x)`` (transformers' ``quick_gelu``)."""
    return x * torch.sigmoid(1.702 * x)


# "gelu" is the exact (erf) GELU, as transformers' ACT2FN["gelu"] and vLLM's get_act_fn("gelu").
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"gelu": F.gelu, "quick_gelu": quick_gelu}

# transformers' CLIPVisionConfig defaults: what MiniMax's remote code (CONFIG_MAPPING["clip_vision_model"](**d))
# and transformers build for a field that a ``vision_config`` dict leaves out. Note the activation: CLIP's default
# is "quick_gelu"; MiniMax-VL-01 sets "gelu".
_CLIP_VISION_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, num_channels=3,
    image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class VisionConfig:
    """The CLIP vision transformer (field names as transformers' ``CLIPVisionConfig``)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int  # tile side S in pixels
    patch_size: int
    hidden_act: str  # "gelu" (MiniMax-VL-01) or "quick_gelu" (CLIP's default)
    layer_norm_eps: float = 1e-5
    num_channels: int = 3

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                     "patch_size", "num_channels"):
            value = getattr(self, name)
            _require(_is_int(value) and 1 <= value < 2**31,
                     f"vision_config.{name} must be a positive integer, got {_short(value)}")
        _require(self.hidden_size % self.num_attention_heads == 0,
                 f"vision_config.hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                 f"({self.num_attention_heads})")
        _require(self.image_size % self.patch_size == 0,
                 f"vision_config.image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        _require(isinstance(self.hidden_act, str) and self.hidden_act in ACTIVATIONS,
                 f"vision_config.hidden_act = {_short(self.hidden_act)}; supported: {', '.join(ACTIVATIONS)}")
        eps = self.layer_norm_eps
        _require(isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps) and eps > 0,
                 f"vision_config.layer_norm_eps must be a positive number, got {_short(eps)}")

    @property
    def grid(self) -> int:
        """Patches per tile side, ``g = image_size / patch_size`` (24 for 336 / 14)."""
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        """Feature vectors per tile once the CLS row is dropped, ``g^2`` (576)."""
        return self.grid**2

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "clip_vision_model", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: Any) -> "VisionConfig":
        """A ``vision_config`` dict (CLIP schema); absent fields take ``CLIPVisionConfig``'s defaults."""
        _require(isinstance(d, dict), f"vision_config must be an object, got {_short(d)}")
        model_type = d.get("model_type", "clip_vision_model")
        _require(model_type == "clip_vision_model",
                 f"vision_config.model_type = {_short(model_type)}; only 'clip_vision_model' is supported")
        return cls(**{name: d.get(name, default) for name, default in _CLIP_VISION_DEFAULTS.items()})


@dataclass(frozen=True)
class ImageLayout:
    """Where one image's features go: its tiles and the crop of its feature grid (``MiniMaxVLConfig.image_layout``).

    The tile features form a ``(rows g) x (cols g)`` grid; rows ``top .. top + feature_height`` and columns
    ``left .. left + feature_width`` of it are kept, each kept row followed by one newline vector.
    """

    height: int  # original image size in pixels
    width: int
    pinpoint: tuple[int, int]  # (height, width) the image is resized into before tiling
    rows: int  # tiles down
    cols: int  # tiles across
    top: int
    left: int
    feature_height: int
    feature_width: int
    tokens_per_tile: int  # g^2, the thumbnail's share

    @property
    def num_tiles(self) -> int:
        """Tiles of pixels the image contributes: the thumbnail, then ``rows x cols`` row-major."""
        return 1 + self.rows * self.cols

    @property
    def num_tokens(self) -> int:
        """Placeholder tokens the image takes in ``input_ids``: ``g^2 + feature_height * (feature_width + 1)``."""
        return self.tokens_per_tile + self.feature_height * (self.feature_width + 1)


def select_pinpoint(height: int, width: int, pinpoints: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The pinpoint ``(h, w)`` an ``height x width`` image is resized into: LLaVA-NeXT's ``select_best_resolution``
    (``image_processing.select_best_resolution``, the processor's own choice, so the two never disagree)."""
    return select_best_resolution(height, width, pinpoints)


def unpad_crop(height: int, width: int, grid_height: int, grid_width: int) -> tuple[int, int, int, int]:
    """``(top, left, h, w)``: the part of a ``grid_height x grid_width`` feature grid that shows the image.

    The image was scaled to fit its pinpoint and centred, so the letterbox lies along one axis. If the image is
    wider than the grid (``W / H > gw / gh``) it fills the width and its height in features is
    ``n = floor(H gw / W)`` (exact integer floor, as MiniMax's ``unpad_image``; LLaVA-NeXT rounds instead);
    ``p = (gh - n) // 2`` rows are cut at *each* end, leaving ``gh - 2p`` (which is ``n`` or ``n + 1``). Otherwise
    the same along the width with ``n = floor(W gh / H)``.
    """
    if width * grid_height > grid_width * height:  # W / H > gw / gh, exactly
        pad = (grid_height - (height * grid_width) // width) // 2
        return pad, 0, grid_height - 2 * pad, grid_width
    pad = (grid_width - (width * grid_height) // height) // 2
    return 0, pad, grid_height, grid_width - 2 * pad


@dataclass(frozen=True)
class MiniMaxVLConfig:
    """MiniMax-VL-01: the text model's config, the vision tower's, and how image features enter the prompt."""

    text: MiniMaxConfig
    vision: VisionConfig
    image_token_index: int  # the placeholder id in input_ids (200025)
    vision_feature_layer: int  # index into (h_0 = embeddings, h_1, ..., h_L); -1 = the last layer's output
    image_grid_pinpoints: tuple[tuple[int, int], ...]  # (height, width), multiples of vision.image_size
    projector_hidden_act: str = "gelu"
    vision_feature_select_strategy: str = "default"  # drop the CLS row (the only strategy MiniMax-VL-01 has)

    def __post_init__(self) -> None:
        _require(isinstance(self.text, MiniMaxConfig), f"text must be a MiniMaxConfig, got {type(self.text).__name__}")
        _require(isinstance(self.vision, VisionConfig),
                 f"vision must be a VisionConfig, got {type(self.vision).__name__}")
        _require(_is_int(self.image_token_index) and 0 <= self.image_token_index < self.text.vocab_size,
                 f"image_token_index must be a token id in [0, text vocab_size={self.text.vocab_size}), "
                 f"got {_short(self.image_token_index)}")
        L = self.vision.num_hidden_layers
        _require(not isinstance(self.vision_feature_layer, (list, tuple)),
                 f"vision_feature_layer = {_short(self.vision_feature_layer)}: features concatenated from several "
                 "layers are not supported (MiniMax-VL-01 uses one layer)")
        _require(_is_int(self.vision_feature_layer) and -(L + 1) <= self.vision_feature_layer <= L,
                 f"vision_feature_layer must be an integer in [-{L + 1}, {L}] (hidden states h_0..h_{L}), "
                 f"got {_short(self.vision_feature_layer)}")
        _require(self.vision_feature_select_strategy == "default",
                 f"vision_feature_select_strategy = {_short(self.vision_feature_select_strategy)}; only 'default' "
                 "(CLS dropped) is supported, as in MiniMax-VL-01")
        _require(isinstance(self.projector_hidden_act, str) and self.projector_hidden_act in ACTIVATIONS,
                 f"projector_hidden_act = {_short(self.projector_hidden_act)}; supported: {', '.join(ACTIVATIONS)}")
        pinpoints = self.image_grid_pinpoints
        _require(isinstance(pinpoints, (list, tuple)) and len(pinpoints) > 0,
                 f"image_grid_pinpoints must be a non-empty list of [height, width], got {_short(pinpoints)}")
        S = self.vision.image_size
        for i, p in enumerate(pinpoints):
            _require(isinstance(p, (list, tuple)) and len(p) == 2 and all(_is_int(v) and v > 0 for v in p),
                     f"image_grid_pinpoints[{i}] must be [height, width] in pixels, got {_short(p)}")
            _require(p[0] % S == 0 and p[1] % S == 0,
                     f"image_grid_pinpoints[{i}] = {list(p)} is not a whole number of {S}-pixel tiles")
        object.__setattr__(self, "image_grid_pinpoints", tuple((int(h), int(w)) for h, w in pinpoints))

    @property
    def vision_layers_used(self) -> int:
        """Encoder layers the features need: j for ``vision_feature_layer`` = j >= 0, ``L + 1 + j`` for j < 0."""
        j = self.vision_feature_layer
        return j if j >= 0 else self.vision.num_hidden_layers + 1 + j

    def image_layout(self, height: int, width: int) -> ImageLayout:
        """Tiles, feature crop and token count of an ``height x width`` image (original size, pixels)."""
        if not (_is_int(height) and _is_int(width) and height > 0 and width > 0):
            raise ValueError(f"image size must be two positive integers (height, width), got {(height, width)}")
        ph, pw = select_pinpoint(height, width, self.image_grid_pinpoints)
        S, g = self.vision.image_size, self.vision.grid
        rows, cols = ph // S, pw // S
        top, left, fh, fw = unpad_crop(height, width, rows * g, cols * g)
        return ImageLayout(height, width, (ph, pw), rows, cols, top, left, fh, fw, self.vision.tokens_per_tile)

    # ------------------------------------------------------------------------------------------- conversion
    def to_dict(self) -> dict[str, Any]:
        """The official top-level schema with this project's text config form; ``from_dict`` reads it back."""
        return {
            "model_type": "minimax_vl_01",
            "text_config": self.text.to_dict(),
            "vision_config": self.vision.to_dict(),
            "image_token_index": self.image_token_index,
            "vision_feature_layer": self.vision_feature_layer,
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
            "image_grid_pinpoints": [list(p) for p in self.image_grid_pinpoints],
            "projector_hidden_act": self.projector_hidden_act,
        }

    @classmethod
    def from_dict(cls, d: Any) -> "MiniMaxVLConfig":
        """Read the remote code's ``MiniMaxVL01Config`` schema (also transformers' LlavaNext / MiniMaxVL01 one).

        ``text_config`` is read by ``MiniMaxConfig.from_dict`` (official or transformers schema), ``vision_config``
        as a CLIP vision config. ``image_token_index``, ``vision_feature_layer`` and ``image_grid_pinpoints`` are
        required: the remote code's class defaults (32000, -2, LLaVA's five pinpoints) and transformers' MiniMaxVL01
        defaults (200025, -1, the 28 released ones) disagree, so a config without them is ambiguous.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(d).__name__}")
        try:
            missing = [k for k in ("text_config", "vision_config", "image_token_index", "vision_feature_layer",
                                   "image_grid_pinpoints") if k not in d]
            _require(not missing, f"missing fields {missing} (a MiniMax-VL-01 config.json names them all)")
            _require(d.get("multimodal_projector_bias", True) is True,
                     "multimodal_projector_bias = false is not supported: the MiniMax-VL-01 projector has biases")
            _require(not d.get("tie_word_embeddings", False),
                     "tie_word_embeddings = true is not supported: MiniMax-01 has an untied LM head")
            text_dict = d["text_config"]
            _require(isinstance(text_dict, dict), f"text_config must be an object, got {_short(text_dict)}")
            try:
                text = MiniMaxConfig.from_dict(text_dict)  # (reads the released [0] shared_intermediate_size)
            except ConfigError as e:
                raise ConfigError(f"text_config: {e}") from None
            return cls(
                text=text,
                vision=VisionConfig.from_dict(d["vision_config"]),
                image_token_index=d["image_token_index"],
                vision_feature_layer=d["vision_feature_layer"],
                image_grid_pinpoints=d["image_grid_pinpoints"],
                projector_hidden_act=d.get("projector_hidden_act", "gelu"),
                vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
            )
        except ConfigError:
            raise
        except (TypeError, ValueError, ArithmeticError, KeyError, AttributeError, IndexError, RecursionError) as e:
            raise ConfigError(f"malformed config ({type(e).__name__}: {str(e)[:200]})") from None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "MiniMaxVLConfig":
        """Read ``<path>/config.json`` (or ``path`` itself if it is a file)."""
        file, raw = read_config_json(path)
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{file}: {e}") from e

    @classmethod
    def preset(cls, name: str) -> "MiniMaxVLConfig":
        """``minimax-vl-01`` (the released sizes) or ``tiny`` (tests)."""
        try:
            return VL_PRESETS[name]
        except KeyError:
            raise ConfigError(f"unknown preset {name!r}; available: {', '.join(VL_PRESETS)}") from None


VL_PRESETS: dict[str, MiniMaxVLConfig] = {
    "minimax-vl-01": MiniMaxVLConfig(
        text=TEXT_PRESETS["minimax-text-01"],
        vision=VisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=336, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5),
        image_token_index=200025,
        vision_feature_layer=-1,
        image_grid_pinpoints=MINIMAX_VL_01_PINPOINTS,
    ),
    # The text model's tiny preset; 16-pixel tiles of 4 x 4 patches (16 tokens) and the released pinpoint pattern
    # scaled from 336 to 16 pixels per tile.
    "tiny": MiniMaxVLConfig(
        text=TEXT_PRESETS["tiny"],
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=16, patch_size=4, hidden_act="gelu"),
        image_token_index=500,
        vision_feature_layer=-1,
        image_grid_pinpoints=tuple((h // 336 * 16, w // 336 * 16) for h, w in MINIMAX_VL_01_PINPOINTS),
    ),
}


# ---------------------------------------------------------------------------------------------- vision tower
class CLIPVisionEmbeddings(nn.Module):
    """``[cls; conv(pixels)] + pos``: one vector per 14 x 14 patch (row-major) after a learned class vector."""

    def __init__(self, config: VisionConfig, dtype: torch.dtype | None = None):
        super().__init__()
        D, p = config.hidden_size, config.patch_size
        self.patch_embedding = nn.Conv2d(config.num_channels, D, kernel_size=p, stride=p, bias=False, dtype=dtype)
        self.class_embedding = nn.Parameter(torch.empty(D, dtype=dtype))
        self.position_embedding = nn.Embedding(config.tokens_per_tile + 1, D, dtype=dtype)

    def forward(self, pixel_values: Tensor) -> Tensor:
        N = pixel_values.shape[0]
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # [N, g*g, D]
        cls = self.class_embedding.expand(N, 1, -1)  # [N, 1, D]
        return torch.cat((cls, patches), dim=1) + self.position_embedding.weight  # [N, 1 + g*g, D]


class CLIPAttention(nn.Module):
    """Bidirectional multi-head attention over a tile's tokens, scale ``1/sqrt(head_dim)``, biased projections."""

    def __init__(self, config: VisionConfig, dtype: torch.dtype | None = None):
        super().__init__()
        D = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, D // config.num_attention_heads
        self.q_proj = nn.Linear(D, D, dtype=dtype)
        self.k_proj = nn.Linear(D, D, dtype=dtype)
        self.v_proj = nn.Linear(D, D, dtype=dtype)
        self.out_proj = nn.Linear(D, D, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        N, T, D = x.shape
        H, Dh = self.num_heads, self.head_dim
        q = self.q_proj(x).view(N, T, H, Dh).transpose(1, 2)  # [N, H, T, Dh]
        k = self.k_proj(x).view(N, T, H, Dh).transpose(1, 2)
        v = self.v_proj(x).view(N, T, H, Dh).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v)  # [N, H, T, Dh]
        return self.out_proj(o.transpose(1, 2).reshape(N, T, D))


class CLIPMLP(nn.Module):
    """``fc2(act(fc1(x)))``, hidden -> intermediate -> hidden, biased."""

    def __init__(self, config: VisionConfig, dtype: torch.dtype | None = None):
        super().__init__()
        self.act = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, dtype=dtype)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: ``x + attn(ln1(x))``, then ``+ mlp(ln2(.))``."""

    def __init__(self, config: VisionConfig, dtype: torch.dtype | None = None):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)
        self.self_attn = CLIPAttention(config, dtype=dtype)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)
        self.mlp = CLIPMLP(config, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """The encoder layers the features need (the checkpoint's ``encoder.layers.{i}``)."""

    def __init__(self, config: VisionConfig, num_layers: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config, dtype=dtype) for _ in range(num_layers))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPVisionTransformer(nn.Module):
    """Embeddings, ``pre_layrnorm`` (CLIP's spelling of the key), the first ``num_layers`` encoder layers.

    Returns ``h_j`` with ``j = num_layers``: the hidden state ``vision_feature_layer`` names. No final LayerNorm:
    MiniMax's tower has none (it only ever normed CLIP's pooled CLS output, which is not used).
    """

    def __init__(self, config: VisionConfig, num_layers: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config, dtype=dtype)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)
        self.encoder = CLIPEncoder(config, num_layers, dtype=dtype)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """``pixel_values [N, C, S, S]`` (model dtype) -> ``h_j [N, 1 + g*g, hidden]``, CLS first."""
        return self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)))


class CLIPVisionTower(nn.Module):
    """The checkpoint's ``vision_tower.vision_model.`` prefix."""

    def __init__(self, config: VisionConfig, num_layers: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.vision_model = CLIPVisionTransformer(config, num_layers, dtype=dtype)

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.vision_model(pixel_values)


class MultiModalProjector(nn.Module):
    """``linear_2(act(linear_1(f)))``: vision hidden -> text hidden -> text hidden, biased."""

    def __init__(self, vision_hidden: int, text_hidden: int, act: str, dtype: torch.dtype | None = None):
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.linear_1 = nn.Linear(vision_hidden, text_hidden, dtype=dtype)
        self.linear_2 = nn.Linear(text_hidden, text_hidden, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def pack_image_features(tile_features: Tensor, layout: ImageLayout, image_newline: Tensor) -> Tensor:
    """One image's projected tile features ``[1 + rows*cols, g*g, D]`` -> its prompt vectors ``[num_tokens, D]``.

    Tile ``(r, c)`` (row-major after the thumbnail) holds patch ``(i, j)`` at row ``r g + i``, column ``c g + j``
    of the ``(rows g) x (cols g)`` grid; the grid is cropped to the layout's box, a newline vector is appended to
    every row, and the result is flattened row-major after the thumbnail's ``g*g`` vectors.
    """
    D = tile_features.shape[-1]
    g = math.isqrt(tile_features.shape[1])
    R, C = layout.rows, layout.cols
    grid = tile_features[1:].view(R, C, g, g, D).permute(0, 2, 1, 3, 4).reshape(R * g, C * g, D)  # [Rg, Cg, D]
    h, w = layout.feature_height, layout.feature_width
    grid = grid[layout.top : layout.top + h, layout.left : layout.left + w]  # [h, w, D]
    newline = image_newline.to(grid.dtype).expand(h, 1, D)
    rows = torch.cat((grid, newline), dim=1)  # [h, w + 1, D]
    return torch.cat((tile_features[0], rows.reshape(h * (w + 1), D)), dim=0)  # [g*g + h*(w+1), D]


def packing_index(layouts: Sequence[ImageLayout], grid: int) -> Tensor:
    """``pack_image_features`` of consecutive images as one gather: for each prompt vector of the images (in order),
    its row in ``cat(tile_features.flatten(0, 1), image_newline[None])``, where ``tile_features [sum n_i, g*g, D]``
    holds every image's tiles back to back; the newline is the last row. ``[sum num_tokens_i]`` int64 (CPU).

    What the compiled vision program takes (``encode_tiles``): the packing is then a single index_select whose
    index the host computes from the image sizes (the shapes follow the images; the program's do not)."""
    g2 = grid * grid
    newline = sum(lay.num_tiles for lay in layouts) * g2
    parts, base = [], 0
    for lay in layouts:
        if lay.tokens_per_tile != g2:
            raise ValueError(f"layout of {lay.height}x{lay.width} has {lay.tokens_per_tile} tokens per tile, the "
                             f"grid {grid} gives {g2}")
        y = torch.arange(lay.top, lay.top + lay.feature_height)[:, None]  # rows of the (rows g) x (cols g) grid
        x = torch.arange(lay.left, lay.left + lay.feature_width)[None, :]
        tile = 1 + (y // grid) * lay.cols + x // grid  # tile 0 is the thumbnail
        rows = base + tile * g2 + (y % grid) * grid + x % grid  # [h, w]
        rows = torch.cat((rows, torch.full((lay.feature_height, 1), newline)), dim=1)  # newline ends every row
        parts += [torch.arange(base, base + g2), rows.reshape(-1)]
        base += lay.num_tiles * g2
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def _run_decoder(text: MiniMaxModel, h: Tensor, state: MiniMaxState, positions: Tensor, decode: bool) -> Tensor:
    """The text decoder from input embeddings ``h [B, T, hidden]`` (``MiniMaxModel.forward_embeddings``;
    ``tests/test_vl_model.py`` checks that a text-only prompt gives the text model's logits exactly)."""
    return text.forward_embeddings(h, state, positions, decode)[0]


# ---------------------------------------------------------------------------------------------------- model
class MiniMaxVLForConditionalGeneration(nn.Module):
    """MiniMax-VL-01. ``dtype`` is the weights' dtype (vision tower, projector and newline included); the text
    model keeps its fp32 router gates and LM head, so logits are fp32."""

    def __init__(self, config: MiniMaxVLConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.vision_tower = CLIPVisionTower(config.vision, config.vision_layers_used, dtype=dtype)
        self.multi_modal_projector = MultiModalProjector(config.vision.hidden_size, config.text.hidden_size,
                                                         config.projector_hidden_act, dtype=dtype)
        self.image_newline = nn.Parameter(torch.empty(config.text.hidden_size, dtype=dtype))
        self.language_model = MiniMaxForCausalLM(config.text, dtype=dtype)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.bfloat16,
                        device: str | torch.device = "cpu") -> "MiniMaxVLForConditionalGeneration":
        """Load a MiniMax-VL-01 checkpoint in the released layout (``load_vl_checkpoint``)."""
        return load_vl_checkpoint(cls, path, dtype=dtype, device=device)

    @torch.no_grad()
    def init_random_weights(self, seed: int = 0, std: float = 0.02) -> "MiniMaxVLForConditionalGeneration":
        """Random weights: the text model's ``init_random_weights``; N(0, std) elsewhere, LayerNorms (1, 0)."""
        self.language_model.init_random_weights(seed=seed, std=std)
        generator = torch.Generator(device="cpu").manual_seed(seed + 1)
        for module in (self.vision_tower, self.multi_modal_projector):
            for m in module.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.fill_(1.0)
                    m.bias.zero_()
                else:
                    for p in m.parameters(recurse=False):
                        p.copy_(torch.randn(p.shape, generator=generator, device="cpu") * std)
        self.image_newline.copy_(torch.randn(self.image_newline.shape, generator=generator, device="cpu") * std)
        return self

    # ------------------------------------------------------------------------------------------------ images
    def image_layouts(self, image_sizes: Tensor | Sequence[Sequence[int]]) -> list[ImageLayout]:
        """One ``ImageLayout`` per original image size ``(height, width)`` (a ``[N, 2]`` tensor or pairs)."""
        sizes = image_sizes.tolist() if isinstance(image_sizes, Tensor) else list(image_sizes)
        layouts = []
        for i, size in enumerate(sizes):
            if not (isinstance(size, (list, tuple)) and len(size) == 2):
                raise ValueError(f"image_sizes[{i}] must be (height, width), got {size!r}")
            layouts.append(self.config.image_layout(int(size[0]), int(size[1])))
        return layouts

    def _tiles(self, pixel_values: Tensor, layouts: list[ImageLayout]) -> Tensor:
        """All images' tiles ``[sum n_i, C, S, S]`` from ``pixel_values`` given concatenated (4-D, thumbnail first
        per image) or padded per image (5-D ``[N, max n_i, C, S, S]``, as LLaVA-NeXT processors return)."""
        vc = self.config.vision
        tile_shape = (vc.num_channels, vc.image_size, vc.image_size)
        if pixel_values.dim() not in (4, 5) or tuple(pixel_values.shape[-3:]) != tile_shape:
            raise ValueError(f"pixel_values must be [tiles, {', '.join(map(str, tile_shape))}] or "
                             f"[images, tiles, {', '.join(map(str, tile_shape))}], got {list(pixel_values.shape)}")
        if pixel_values.dim() == 5:
            if pixel_values.shape[0] != len(layouts):
                raise ValueError(f"pixel_values holds {pixel_values.shape[0]} images, image_sizes {len(layouts)}")
            for i, (tiles, lay) in enumerate(zip(pixel_values, layouts)):
                if tiles.shape[0] < lay.num_tiles:
                    raise ValueError(f"{_describe(i, lay)} needs {lay.num_tiles} tiles (thumbnail + {lay.rows}x"
                                     f"{lay.cols}), pixel_values[{i}] holds {tiles.shape[0]}")
            return torch.cat([tiles[: lay.num_tiles] for tiles, lay in zip(pixel_values, layouts)])
        needed = [lay.num_tiles for lay in layouts]
        if pixel_values.shape[0] != sum(needed):
            raise ValueError(f"pixel_values holds {pixel_values.shape[0]} tiles; the {len(layouts)} images need "
                             f"{sum(needed)} ({' + '.join(map(str, needed))}: thumbnail + grid each)")
        return pixel_values

    def image_features(self, pixel_values: Tensor, image_sizes: Tensor | Sequence[Sequence[int]]) -> list[Tensor]:
        """Packed prompt vectors per image, ``[num_tokens_i, hidden]`` in the model dtype (module docstring)."""
        return self._image_features(pixel_values, self.image_layouts(image_sizes))

    def _image_features(self, pixel_values: Tensor, layouts: list[ImageLayout]) -> list[Tensor]:
        tiles = self._tiles(pixel_values, layouts).to(self.dtype)  # [sum n_i, C, S, S]
        hidden = self.vision_tower(tiles)  # [sum n_i, 1 + g*g, Dv]
        projected = self.multi_modal_projector(hidden[:, 1:])  # CLS dropped -> [sum n_i, g*g, D]
        per_image = projected.split([lay.num_tiles for lay in layouts])
        return [pack_image_features(f, lay, self.image_newline) for f, lay in zip(per_image, layouts)]

    def encode_tiles(self, pixel_values: Tensor, feature_index: Tensor) -> Tensor:
        """The compiled vision program's computation: tiles ``[N, C, S, S]`` of consecutive images -> their packed
        prompt vectors ``[L, hidden]`` in the model dtype, ``feature_index [L]`` being ``packing_index`` of their
        layouts (equal to ``torch.cat(image_features(...))``; tests/test_vl_engine.py checks it)."""
        hidden = self.vision_tower(pixel_values.to(self.dtype))  # [N, 1 + g*g, Dv]
        projected = self.multi_modal_projector(hidden[:, 1:])  # [N, g*g, D]
        flat = torch.cat((projected.flatten(0, 1), self.image_newline.to(projected.dtype)[None]))
        return flat.index_select(0, feature_index)

    def prefill_features(self, input_ids: Tensor, image_embeds: Tensor, state: MiniMaxState, positions: Tensor,
                         last_logits_only: bool = False) -> tuple[Tensor, MiniMaxState]:
        """``prefill`` with the images already encoded: ``image_embeds [B, T, hidden]`` holds, at every position
        whose id is ``image_token_index``, that placeholder's image vector (anything elsewhere: it is not read).
        The compiled VL prefill program's computation; a chunk may cut an image anywhere."""
        h = self.language_model.model.embed_tokens(input_ids)
        is_image = (input_ids == self.config.image_token_index)[..., None]
        h = torch.where(is_image, image_embeds.to(h.dtype), h)
        h = _run_decoder(self.language_model.model, h, state, positions, decode=False)
        if last_logits_only:
            h = h[:, -1:]
        return self.language_model._logits(h), state

    def embed(self, input_ids: Tensor, pixel_values: Tensor | None = None,
              image_sizes: Tensor | Sequence[Sequence[int]] | None = None) -> Tensor:
        """``input_ids [B, T]`` -> ``[B, T, hidden]``: token embeddings, with image ``i``'s vectors written over the
        ``i``-th run of its ``num_tokens`` placeholders (row-major over the batch, images in order)."""
        h = self.language_model.model.embed_tokens(input_ids)  # [B, T, hidden]
        is_image = input_ids == self.config.image_token_index  # [B, T]
        if pixel_values is None:
            if image_sizes is not None:
                raise ValueError("image_sizes given without pixel_values")
            if bool(is_image.any()):
                raise ValueError(f"input_ids hold {int(is_image.sum())} image tokens (id "
                                 f"{self.config.image_token_index}) but no images were given")
            return h
        if image_sizes is None:
            raise ValueError("pixel_values given without image_sizes (each image's original (height, width))")
        layouts = self.image_layouts(image_sizes)
        if not layouts:
            raise ValueError("image_sizes is empty: pass pixel_values=None for a prompt without images")
        _check_placeholders(is_image, layouts)
        features = torch.cat(self._image_features(pixel_values, layouts)).to(h.dtype)  # [sum tokens, hidden]
        return h.masked_scatter(is_image[..., None], features)

    # ------------------------------------------------------------------------------------------------ decoding
    def new_state(self, batch_size: int, max_seq_len: int, device: torch.device | str | None = None,
                  page_size: int = 256) -> MiniMaxState:
        """The text model's decoding state (``MiniMaxForCausalLM.new_state``)."""
        return self.language_model.new_state(batch_size, max_seq_len, device=device, page_size=page_size)

    def prefill(self, input_ids: Tensor, state: MiniMaxState, pixel_values: Tensor | None = None,
                image_sizes: Tensor | Sequence[Sequence[int]] | None = None, positions: Tensor | None = None,
                last_logits_only: bool = False) -> tuple[Tensor, MiniMaxState]:
        """``MiniMaxForCausalLM.prefill`` on ``embed(input_ids, pixel_values, image_sizes)``: a chunk's images and
        their placeholders come in the same call. Returns ``(logits [B, T, V] fp32, state)``, state updated in
        place."""
        if positions is None:
            positions = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        h = self.embed(input_ids, pixel_values, image_sizes)
        h = _run_decoder(self.language_model.model, h, state, positions, decode=False)
        if last_logits_only:
            h = h[:, -1:]
        return self.language_model._logits(h), state

    def decode(self, input_ids: Tensor, positions: Tensor, state: MiniMaxState) -> tuple[Tensor, MiniMaxState]:
        """One text token per sequence (``MiniMaxForCausalLM.decode``)."""
        return self.language_model.decode(input_ids, positions, state)

    def forward(self, input_ids: Tensor, pixel_values: Tensor | None = None,
                image_sizes: Tensor | Sequence[Sequence[int]] | None = None) -> Tensor:
        """Whole sequences from an empty state: ``input_ids [B, T]`` (+ images) -> ``logits [B, T, vocab]`` fp32."""
        state = self.new_state(input_ids.shape[0], input_ids.shape[1], device=input_ids.device)
        logits, _ = self.prefill(input_ids, state, pixel_values, image_sizes)
        return logits


def _describe(i: int, lay: ImageLayout) -> str:
    return f"image {i} ({lay.height}x{lay.width} pixels, {lay.rows}x{lay.cols} tiles)"


def _check_placeholders(is_image: Tensor, layouts: list[ImageLayout]) -> None:
    """Each image's ``num_tokens`` placeholders must lie in one run of consecutive image tokens of one row (runs
    may hold several images back to back); raise ``ValueError`` naming the image, the expected and found counts."""
    runs: list[list[int]] = []  # [row, first position, length]
    for b, t in is_image.nonzero().tolist():
        if runs and runs[-1][0] == b and runs[-1][1] + runs[-1][2] == t:
            runs[-1][2] += 1
        else:
            runs.append([b, t, 1])
    run, used = 0, 0  # current run, tokens of it already taken by earlier images
    for i, lay in enumerate(layouts):
        n = lay.num_tokens
        formula = f"{lay.tokens_per_tile} + {lay.feature_height}x({lay.feature_width}+1)"
        if run == len(runs):
            raise ValueError(f"{_describe(i, lay)}: expected {n} image tokens ({formula}), found none: input_ids "
                             f"hold {int(is_image.sum())} image tokens, the {len(layouts)} images need "
                             f"{sum(x.num_tokens for x in layouts)}")
        b, t0, length = runs[run]
        found = length - used
        if found < n:
            raise ValueError(f"{_describe(i, lay)}: expected {n} image tokens ({formula}), found {found} at row "
                             f"{b}, positions {t0 + used}..{t0 + length - 1}")
        used += n
        if used == length:
            run, used = run + 1, 0
    if run < len(runs):
        b, t0, length = runs[run]
        if used:  # the last image's run goes on
            lay = layouts[-1]
            raise ValueError(f"{_describe(len(layouts) - 1, lay)}: expected {lay.num_tokens} image tokens, found "
                             f"{lay.num_tokens + length - used} at row {b}, positions {t0 + used - lay.num_tokens}.."
                             f"{t0 + length - 1}")
        extra = sum(r[2] for r in runs[run:])
        raise ValueError(f"{extra} image tokens beyond the {len(layouts)} images' {sum(x.num_tokens for x in layouts)} "
                         f"(first at row {b}, position {t0}): one more image than given?")


# ------------------------------------------------------------------------------------------------- loading
# Released-checkpoint tensors that are never read: CLIP's final LayerNorm (absent from MiniMax-VL-01, present in
# LLaVA-style checkpoints; it only norms the unused pooled output) and a saved position_ids buffer.
_IGNORED_VISION_KEY = re.compile(
    r"^vision_tower\.vision_model\.(post_layernorm\.(weight|bias)|embeddings\.position_ids)$")
_VISION_LAYER_KEY = re.compile(r"^vision_tower\.vision_model\.encoder\.layers\.(\d+)\.")


def vl_checkpoint_key_plan(model: MiniMaxVLForConditionalGeneration) -> dict[str, _Target]:
    """Every checkpoint key the model needs -> the parameter (and expert slot) it fills: the text model's plan
    (``model.loading.checkpoint_key_plan``) under ``language_model.``, every other parameter by its own name."""
    plan = {f"language_model.{key}": _Target(f"language_model.{t.param}", t.index, t.shape)
            for key, t in checkpoint_key_plan(model.language_model).items()}
    for name, p in model.named_parameters():
        if not name.startswith("language_model."):
            plan[name] = _Target(name, None, tuple(p.shape))
    return plan


def _ignored_key(key: str, config: MiniMaxVLConfig) -> bool:
    """Known tensors that are not loaded: the text model's derived buffers, the ignored vision tensors above, and
    encoder layers past ``vision_feature_layer`` (they cannot change the features)."""
    if key.startswith("language_model.") and IGNORED_KEY_PATTERN.search(key[len("language_model."):]):
        return True
    if _IGNORED_VISION_KEY.match(key):
        return True
    m = _VISION_LAYER_KEY.match(key)
    return bool(m) and config.vision_layers_used <= int(m.group(1)) < config.vision.num_hidden_layers


def _prepare_vl(cls: type[MiniMaxVLForConditionalGeneration], path: str | Path, dtype: torch.dtype):
    """Config, meta-device model, key plan and shard -> keys, validated without reading tensor data."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: checkpoint directory not found")
    config = MiniMaxVLConfig.from_pretrained(root)
    with torch.device("meta"):
        model = cls(config, dtype=dtype)
    plan = vl_checkpoint_key_plan(model)
    weight_map = _read_index(root)
    ignored = {k for k in weight_map if k not in plan and _ignored_key(k, config)}
    by_shard = _validate(plan, {k: v for k, v in weight_map.items() if k not in ignored}, root)
    _check_shapes(root, by_shard, plan)
    if ignored:
        logger.info("%s: %d tensors not loaded (derived buffers, unused vision layers / final norm)", root,
                    len(ignored))
    return root, config, model, plan, by_shard


def validate_vl_checkpoint(path: str | Path, dtype: torch.dtype = torch.bfloat16) -> MiniMaxVLConfig:
    """``load_vl_checkpoint``'s checks without reading tensor data; returns the config."""
    return _prepare_vl(MiniMaxVLForConditionalGeneration, path, dtype)[1]


def convert_vl_checkpoint(path: str | Path, writer, dtype: torch.dtype = torch.bfloat16, quantize: str = "none"
                          ) -> MiniMaxVLConfig:
    """``model.loading.convert_checkpoint`` for MiniMax-VL-01: the checkpoint streamed one tensor at a time into
    an engine folder's weights (``writer``: ``export.weights.ShardWriter``) under the VL model's names, experts
    as parts, the text model's derived buffers added; the model is never built. ``quantize``: the language
    model's experts quantized while streaming (the vision tower and projector unchanged). Returns the config."""
    from .loading import derived_buffers, stream_converted

    root, config, skeleton, plan, by_shard = _prepare_vl(MiniMaxVLForConditionalGeneration, path, dtype)
    skeleton.language_model.quantize_experts_(quantize)
    plan = vl_checkpoint_key_plan(skeleton)
    buffers = {f"language_model.{k}": v for k, v in derived_buffers(config.text).items()}
    stream_converted(writer, skeleton, root, by_shard, plan, buffers)
    return config


def load_vl_checkpoint(cls: type[MiniMaxVLForConditionalGeneration], path: str | Path,
                       dtype: torch.dtype = torch.bfloat16,
                       device: str | torch.device = "cpu") -> MiniMaxVLForConditionalGeneration:
    """Build ``cls`` from ``path/config.json`` on the meta device and fill it from the safetensors shards.

    As ``model.loading.load_checkpoint`` for Text-01 (its index reading, validation and shard stream): names,
    coverage, shard files and shapes are checked before any tensor data is read (``CheckpointError`` naming the
    tensor and file), then tensors are memory-mapped and assigned one at a time, experts stacked on load.
    """
    device = torch.device(device)
    start = time.perf_counter()
    root, config, model, plan, by_shard = _prepare_vl(cls, path, dtype)
    params = dict(model.named_parameters())
    loaded: dict[str, Tensor] = {
        name: torch.empty(p.shape, dtype=p.dtype, device=device)  # stacked experts, filled expert by expert
        for name, p in params.items() if ".block_sparse_moe.experts." in name
    }
    for target, tensor in _stream(root, by_shard, plan, "loading"):
        if target.index is None:
            loaded[target.param] = tensor.to(device=device, dtype=params[target.param].dtype)
        else:
            loaded[target.param][target.index].copy_(tensor)
    model.load_state_dict(loaded, strict=True, assign=True)
    model.language_model.model.reset_buffers()
    model.eval()
    model.language_model.log_kernel_choice()
    logger.info("loaded %s: %d tensors from %d shard(s) in %.1fs (%s on %s; vision tower %d/%d layers)", root,
                len(plan), len(by_shard), time.perf_counter() - start, dtype, device, config.vision_layers_used,
                config.vision.num_hidden_layers)
    return model
