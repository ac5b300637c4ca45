"""MiniMax-VL-01 image processing: "anyres" tiling into 336x336 CLIP inputs, and the image-token count.

The definition is `shared/reference/minimax_arch.md` §7 (MiniMax-VL-01): transformers' `MiniMaxVL01ImageProcessor`
(TF-VL), LLaVA-NeXT "anyres" with MiniMax's floor rounding, and its `pack_image_features` / `unpad_image` (identical
in vLLM's `minimax_vl_01.py`, vLLM-VL). Per image:

1. choose a grid resolution from the 28 `IMAGE_GRID_PINPOINTS` with LLaVA-NeXT's `select_best_resolution`
   (maximise the effective resolution, then minimise the wasted area);
2. resize the image, keeping its aspect ratio, to fit that grid, the scaled side rounded DOWN (`int(...)`), BICUBIC;
3. pad it to the grid, centred (the odd pixel at the bottom / right), with black (0 in uint8, before normalising);
4. split the grid into 336x336 tiles, row-major;
5. put first the thumbnail: the whole image resized to 336x336 (aspect ratio not kept), BICUBIC;
6. rescale by 1/255 and normalise with the CLIP mean/std (OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).

The language model sees `576 + R * (C + 1)` image tokens: the 24x24 thumbnail features, then the tiles' features
laid out as one `(tile_rows * 24) x (tile_cols * 24)` map, unpadded with MiniMax's floor-rounding `unpad_image`
to `R x C`, one `image_newline` after each of the R rows (`unpadded_grid`, `num_image_tokens`).

Where MiniMax differs from LLaVA-NeXT (transformers' `LlavaNextImageProcessor`, 5.x), both on purpose:
- resize target: MiniMax floors the scaled side (`int(target_width * height / width)`); LLaVA-NeXT's
  `get_patch_output_size` takes `min(ceil(height * (target_width / width)), target_height)`, which is one pixel
  larger whenever the exact value is not an integer, and sometimes even when it is (float error: a 19x38 image
  scaled into 336x336 is exactly 168 rows; `ceil(19 * (336 / 38))` is 169);
- unpadding of the feature map: MiniMax computes the kept size as `int(height * current_width) // width`
  (exact integer floor); LLaVA-NeXT as `int(round(height * (current_width / width), 7))`, which rounds up a value
  within 5e-8 below an integer. The exact value's fraction is a multiple of 1 / (image side), so the two agree
  whenever both image sides are below 10^7 pixels; they first differ for sides of about 2 * 10^7.
Everything else (the grid choice, centred black padding, row-major tiles, the thumbnail first, BICUBIC, CLIP
normalisation, 576 + unpadded + newline tokens) is LLaVA-NeXT's. Two choices of ours, both ValueErrors: images
that are not RGB are refused rather than converted (transformers converts greyscale and RGBA), and so are images
so thin that the floor rounding resizes a side to 0 pixels (one side more than about 2016 times the other), where
the published processor fails (its PIL backend refuses a 0-pixel resize) and LLaVA-NeXT's ceil keeps 1 pixel
(see `select_grid`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # Pillow is imported on first use: ``import model`` must not need it (the GPU machine's image)
    from PIL import Image


def _pil():
    from PIL import Image

    return Image

IMAGE_SIZE = 336  # side of a tile and of the thumbnail (CLIP ViT-L/14 at 336)
PATCH_SIZE = 14  # CLIP patch side
FEATURES_PER_SIDE = IMAGE_SIZE // PATCH_SIZE  # 24 features per tile side
BASE_IMAGE_TOKENS = FEATURES_PER_SIDE * FEATURES_PER_SIDE  # 576 thumbnail tokens (CLS dropped)

# The 28 grid resolutions released with MiniMax-VL-01, (height, width) (§7; TF-VL MINIMAX_VL_01_IMAGE_GRID_PINPOINTS).
# Order matters: ties in select_best_resolution go to the first listed.
IMAGE_GRID_PINPOINTS: tuple[tuple[int, int], ...] = (
    (336, 336), (336, 672), (336, 1008), (336, 1344), (336, 1680), (336, 2016),
    (672, 336), (672, 672), (672, 1008), (672, 1344), (672, 1680), (672, 2016),
    (1008, 336), (1008, 672), (1008, 1008), (1008, 1344), (1008, 1680), (1008, 2016),
    (1344, 336), (1344, 672), (1344, 1008), (1344, 1344),
    (1680, 336), (1680, 672), (1680, 1008),
    (2016, 336), (2016, 672), (2016, 1008),
)  # fmt: skip

# CLIP normalisation (OpenAI CLIP's published per-channel mean and std, RGB; transformers' OPENAI_CLIP_MEAN/STD).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESCALE_FACTOR = 1 / 255


def _check_size(height: int, width: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an int, got {type(value).__name__}")  # noqa: TRY004 (ValueError)
        if value < 1:
            raise ValueError(f"zero-size image: {height}x{width} (height x width)")


def select_best_resolution(
    height: int, width: int, resolutions: Sequence[tuple[int, int]] = IMAGE_GRID_PINPOINTS
) -> tuple[int, int]:
    """LLaVA-NeXT's grid choice (§7: `select_best_resolution` over the pinpoints), (height, width) -> (height, width).

    For each candidate the image is scaled by `min(W / width, H / height)` and truncated to whole pixels; the
    effective resolution is that pixel count, capped at the original's. The candidate with the largest effective
    resolution wins, ties going to the smallest area (wasted = `H * W - effective`), then to the first listed.
    No validation (see `select_grid`); with every effective resolution 0 it returns the smallest grid.
    """
    best = tuple(resolutions[0])
    best_effective = 0
    best_wasted = float("inf")
    for grid_height, grid_width in resolutions:
        # Same float expression as the published function, so that borderline images choose the same grid.
        scale = min(grid_width / width, grid_height / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = grid_height * grid_width - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (grid_height, grid_width), effective, wasted
    return best


def _fit(height: int, width: int, pinpoints: Sequence[tuple[int, int]] = IMAGE_GRID_PINPOINTS
         ) -> tuple[tuple[int, int], tuple[int, int]]:
    """(grid, resized size) of a `height x width` image, both (height, width); ValueError when there is none."""
    _check_size(height, width)
    grid_height, grid_width = select_best_resolution(height, width, pinpoints)
    # MiniMax's `_resize_for_patching` (§7): the side that limits the scale becomes the grid's, the other is
    # scaled and rounded DOWN with int() (LLaVA-NeXT's get_patch_output_size rounds up).
    if width / height > grid_width / grid_height:
        new_height, new_width = int(grid_width * height / width), grid_width
    else:
        new_height, new_width = grid_height, int(grid_height * width / height)
    if new_height < 1 or new_width < 1:
        raise ValueError(
            f"aspect ratio too extreme: a {height}x{width} (height x width) image rounds down to "
            f"{new_height}x{new_width} pixels in its {grid_height}x{grid_width} grid; one side must be at most "
            f"{max(max(p) for p in pinpoints)} times the other"
        )
    return (grid_height, grid_width), (new_height, new_width)


def select_grid(height: int, width: int) -> tuple[int, int]:
    """The grid resolution (height, width) in pixels of MiniMax-VL-01 for a `height x width` image (§7).

    Raises ValueError for a zero size, and for an image so thin that resizing it into its grid with MiniMax's
    floor rounding leaves a side of 0 pixels (one side more than 2016 times the other, and a few images at exactly
    2016 times where the float scale of `select_best_resolution` falls to a smaller grid). The published processor
    fails there (its PIL backend refuses a 0-pixel resize); LLaVA-NeXT's ceil rounding would keep 1 pixel.
    """
    return _fit(height, width)[0]


def tile_grid(height: int, width: int) -> tuple[int, int]:
    """(tile_rows, tile_cols) of 336x336 tiles for a `height x width` image; `pixel_values` holds `1 + rows * cols`."""
    grid_height, grid_width = select_grid(height, width)
    return grid_height // IMAGE_SIZE, grid_width // IMAGE_SIZE


def resized_size(height: int, width: int) -> tuple[int, int]:
    """(height, width) of the image after the aspect-preserving resize into its grid, before padding (§7).

    MiniMax's `_resize_for_patching`: the side that limits the scale becomes the grid's, the other is
    `int(grid_side * other / limiting)`, rounded DOWN (LLaVA-NeXT rounds up). ValueError as `select_grid`.
    """
    return _fit(height, width)[1]


def unpadded_grid(height: int, width: int, image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE,
                  pinpoints: Sequence[tuple[int, int]] = IMAGE_GRID_PINPOINTS) -> tuple[int, int]:
    """(rows, cols) of the feature map after MiniMax's `unpad_image` (§7; TF-VL / vLLM-VL `unpad_image`).

    The tiles' features form a `(tile_rows * 24) x (tile_cols * 24)` map. If the image is wider than the map, its
    rows were padded: `kept = int(height * map_cols) // width` (integer floor) and `(map_rows - kept) // 2` rows go
    at each end; otherwise columns, likewise with `kept = int(width * map_rows) // height`. `rows` is the number
    of feature rows (each followed by one newline token), `cols` the features per row before its newline. For very
    thin images `rows` or `cols` can be 0 (the whole map is letterbox); with
    `cols == 0` each of the `rows` rows still gets its newline, as in the published `pack_image_features`.
    """
    grid_height, grid_width = _fit(height, width, pinpoints)[0]
    g = image_size // patch_size
    rows, cols = grid_height // image_size * g, grid_width // image_size * g
    if width / height > cols / rows:  # wider than the map: rows were padded
        kept = int(height * cols) // width
        rows -= 2 * ((rows - kept) // 2)
    else:  # taller (or the same aspect): columns were padded
        kept = int(width * rows) // height
        cols -= 2 * ((cols - kept) // 2)
    return rows, cols


def num_image_tokens(height: int, width: int, image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE,
                     pinpoints: Sequence[tuple[int, int]] = IMAGE_GRID_PINPOINTS) -> int:
    """Number of `<image>` tokens for a `height x width` image: `576 + rows * cols + rows` (§7).

    576 thumbnail features, then the unpadded tile features with one `image_newline` after each row
    (`unpadded_grid`). 336x336 -> 1176; a 2016x1008 image (grid [2016, 1008]) -> 576 + 144 * 73 = 11088, the most.
    """
    rows, cols = unpadded_grid(height, width, image_size, patch_size, pinpoints)
    return (image_size // patch_size) ** 2 + rows * (cols + 1)


@dataclass(frozen=True)
class MiniMaxVLImageInputs:
    """What `MiniMaxVLImageProcessor` returns for N images.

    pixel_values: N float32 tensors, image i `[1 + n_tiles_i, 3, 336, 336]`: the thumbnail, then the tiles row-major.
    image_sizes: `[N, 2]` int64, (height, width) of each original image.
    num_image_tokens: N ints, the `<image>` tokens of each image in the prompt (`num_image_tokens`).
    """

    pixel_values: list[torch.Tensor]
    image_sizes: torch.Tensor
    num_image_tokens: list[int]


def _as_rgb_pil(image: object, index: int) -> Image.Image:
    """The image as an RGB PIL image; ValueError naming the image index and the problem otherwise."""
    Image = _pil()
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise ValueError(
                f"image {index}: PIL image of mode {image.mode!r}, expected 'RGB' (convert it with .convert('RGB'))"
            )
        width, height = image.size
        if height < 1 or width < 1:
            raise ValueError(f"image {index}: zero-size image: {height}x{width} (height x width)")
        return image
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image {index}: array of shape {tuple(image.shape)}, expected an HxWx3 RGB array")
        if image.dtype != np.uint8:
            raise ValueError(f"image {index}: array of dtype {image.dtype}, expected uint8")
        if image.shape[0] < 1 or image.shape[1] < 1:
            raise ValueError(f"image {index}: zero-size image: {image.shape[0]}x{image.shape[1]} (height x width)")
        return Image.fromarray(np.ascontiguousarray(image))  # HxWx3 uint8 -> mode "RGB"
    raise ValueError(
        f"image {index}: got {type(image).__module__}.{type(image).__qualname__}, "
        f"expected a PIL image or an HxWx3 uint8 numpy array"
    )


def _normalise(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32: `x / 255` (in float64, then float32), then `(x - mean) / std` in float32."""
    x = torch.from_numpy(pixels).to(torch.float64).mul_(RESCALE_FACTOR).to(torch.float32)
    mean = torch.tensor(OPENAI_CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return x.sub_(mean).div_(std)


class MiniMaxVLImageProcessor:
    """MiniMax-VL-01's image processor (§7): images -> thumbnail + 336x336 tiles, CLIP-normalised; token counts.

    `processor(images)` takes a list of RGB PIL images or HxWx3 uint8 numpy arrays and returns a
    `MiniMaxVLImageInputs`. Images are not batched together (each keeps its own tile count); bad input raises
    ValueError naming the image index and the problem. The steps are in this module's docstring.
    """

    def __init__(self, image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE,
                 grid_pinpoints: Sequence[tuple[int, int]] = IMAGE_GRID_PINPOINTS):
        """The released sizes by default; other tile sizes and grids for other configs (``for_config``)."""
        self.image_size, self.patch_size = image_size, patch_size
        self.grid_pinpoints = tuple(tuple(p) for p in grid_pinpoints)

    @classmethod
    def for_config(cls, config) -> "MiniMaxVLImageProcessor":
        """The processor of a ``model.vl.MiniMaxVLConfig``: its tile size, patch size and pinpoint grids."""
        return cls(config.vision.image_size, config.vision.patch_size, config.image_grid_pinpoints)

    def __call__(self, images: Sequence[Image.Image | np.ndarray]) -> MiniMaxVLImageInputs:
        if not isinstance(images, (list, tuple)):
            raise ValueError(  # noqa: TRY004 (every bad input is a ValueError naming the problem)
                f"images must be a list of PIL images or HxWx3 uint8 numpy arrays, got {type(images).__name__} "
                f"(wrap a single image in a list)"
            )
        pil_images = [_as_rgb_pil(image, index) for index, image in enumerate(images)]  # validate all first
        pixel_values, sizes, tokens = [], [], []
        for index, image in enumerate(pil_images):
            width, height = image.size
            try:
                tokens.append(num_image_tokens(height, width, self.image_size, self.patch_size, self.grid_pinpoints))
                pixel_values.append(self._tiles(image))
            except ValueError as error:
                raise ValueError(f"image {index}: {error}") from None
            sizes.append((height, width))
        image_sizes = torch.tensor(sizes, dtype=torch.int64).reshape(len(sizes), 2)  # [N, 2]
        return MiniMaxVLImageInputs(pixel_values=pixel_values, image_sizes=image_sizes, num_image_tokens=tokens)

    def _tiles(self, image: Image.Image) -> torch.Tensor:
        """One RGB image -> [1 + n_tiles, 3, S, S] float32 (S = 336 for the released model)."""
        IMAGE_SIZE = self.image_size  # noqa: N806 (the module constant's name, this processor's value)
        width, height = image.size
        (grid_height, grid_width), (new_height, new_width) = _fit(height, width, self.grid_pinpoints)
        Image = _pil()
        resized = np.asarray(image.resize((new_width, new_height), Image.Resampling.BICUBIC))  # [h, w, 3] uint8
        # Centred letterbox in black; the odd pixel goes to the bottom / right (LLaVA-NeXT's divmod split).
        canvas = np.zeros((grid_height, grid_width, 3), dtype=np.uint8)  # [H, W, 3]
        top, left = (grid_height - new_height) // 2, (grid_width - new_width) // 2
        canvas[top : top + new_height, left : left + new_width] = resized
        tile_rows, tile_cols = grid_height // IMAGE_SIZE, grid_width // IMAGE_SIZE
        tiles = canvas.reshape(tile_rows, IMAGE_SIZE, tile_cols, IMAGE_SIZE, 3)  # [tr, 336, tc, 336, 3]
        tiles = tiles.transpose(0, 2, 4, 1, 3).reshape(tile_rows * tile_cols, 3, IMAGE_SIZE, IMAGE_SIZE)  # row-major
        thumbnail = np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC))  # [336, 336, 3]
        pixels = np.concatenate([thumbnail.transpose(2, 0, 1)[None], tiles], axis=0)  # [1 + n, 3, 336, 336] uint8
        return _normalise(pixels)
