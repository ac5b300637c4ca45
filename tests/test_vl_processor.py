"""MiniMax-VL-01 image processor (`model/image_processing.py`) against minimax_arch.md §7 and LLaVA-NeXT.

The reference is transformers' LLaVA-NeXT image processor configured as MiniMax's (the 28 grids of §7, 336x336,
no centre crop, CLIP mean/std, BICUBIC, no batch padding). Without torchvision, transformers 5.x resolves
`LlavaNextImageProcessor` to `LlavaNextImageProcessorPil`, its PIL backend, which resizes with PIL exactly as we
do; that class is named here so that the comparison does not change backend when torchvision is installed.

MiniMax differs from LLaVA-NeXT in two roundings (§7), each tested against hand-computed cases:
- resize target: MiniMax floors the scaled side, LLaVA-NeXT takes `ceil` (plus float error). Where the two sizes
  agree the pixel values must equal LLaVA-NeXT's; where they differ (the exact set is asserted) the tiles must
  differ from LLaVA-NeXT's and equal LLaVA-NeXT's run on the image already resized to MiniMax's size (which
  fits its grid, so LLaVA-NeXT then only pads and splits it), and the thumbnails must still agree;
- feature unpadding (token counts): MiniMax `int(h * c) // w`, LLaVA-NeXT `int(round(h * (c / w), 7))`. They agree
  on a sweep of sizes up to 2300 and differ on two contrived sizes above 10^7 pixels, computed by hand below.
Images that the floor rounding would resize to a 0-pixel side (one side more than about 2016 times the other) are
refused with a ValueError where LLaVA-NeXT's ceil keeps 1 pixel; the refused set is checked against the rule in
exact integers (`_refused`).
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch

Image = pytest.importorskip("PIL.Image", reason="the image processor needs Pillow (pip install -e .[dev])")
pytest.importorskip("skimage", reason="the processor tests use scikit-image's photographs (pip install -e .[dev])")

import model  # noqa: E402
from model.image_processing import (  # noqa: E402
    BASE_IMAGE_TOKENS,
    IMAGE_GRID_PINPOINTS,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    MiniMaxVLImageProcessor,
    num_image_tokens,
    resized_size,
    select_best_resolution,
    select_grid,
    tile_grid,
    unpadded_grid,
)

skimage_data = pytest.importorskip("skimage.data")
skimage_transform = pytest.importorskip("skimage.transform")

# The grid list as written in minimax_arch.md §7, parsed here so that a transcription error in the module shows.
SECTION_7_PINPOINTS = (
    "[336,336] [336,672] [336,1008] [336,1344] [336,1680] [336,2016] [672,336] [672,672] [672,1008] [672,1344] "
    "[672,1680] [672,2016] [1008,336] [1008,672] [1008,1008] [1008,1344] [1008,1680] [1008,2016] [1344,336] "
    "[1344,672] [1344,1008] [1344,1344] [1680,336] [1680,672] [1680,1008] [2016,336] [2016,672] [2016,1008]"
)
GRIDS = [[int(h), int(w)] for h, w in re.findall(r"\[(\d+),(\d+)\]", SECTION_7_PINPOINTS)]

# One uint8 level after normalisation is 1 / 255 / std >= 0.0142: 1e-6 cannot hide a pixel difference.
ATOL = 1e-6


@pytest.fixture(scope="module")
def llava():
    from transformers import LlavaNextImageProcessorPil
    from transformers.image_utils import OPENAI_CLIP_MEAN as TF_MEAN
    from transformers.image_utils import OPENAI_CLIP_STD as TF_STD
    from transformers.image_utils import PILImageResampling

    return LlavaNextImageProcessorPil(
        size={"height": 336, "width": 336},
        crop_size={"height": 336, "width": 336},  # sets the tile size; the crop itself is off
        do_center_crop=False,
        image_grid_pinpoints=GRIDS,
        resample=PILImageResampling.BICUBIC,
        image_mean=TF_MEAN,
        image_std=TF_STD,
        do_pad=False,
    )


@pytest.fixture(scope="module")
def llava_processor(llava):
    """transformers' LlavaNextProcessor as MiniMax configures it (patch 14, CLS dropped), for its token counts."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import LlavaNextProcessor, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"<unk>": 0, "<image>": 1}, unk_token="<unk>")), unk_token="<unk>"
    )
    return LlavaNextProcessor(
        image_processor=llava,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def llava_pixels(llava, image: np.ndarray) -> np.ndarray:
    """LLaVA-NeXT's [1 + n, 3, 336, 336] for one image, given as PIL (a 1x1x3 array would be read channel-first)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(llava([Image.fromarray(image)])["pixel_values"][0])


def llava_resize_target(height: int, width: int) -> tuple[int, int]:
    """LLaVA-NeXT's resize target (transformers' get_patch_output_size, ceil) inside the grid it selects."""
    from transformers.image_processing_utils import get_patch_output_size
    from transformers.image_processing_utils import select_best_resolution as tf_select
    from transformers.image_utils import ChannelDimension

    grid = tf_select((height, width), GRIDS)
    image = np.broadcast_to(np.zeros((), np.uint8), (3, height, width))  # only its shape is read
    return get_patch_output_size(image, grid, ChannelDimension.FIRST)


def _pil_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))


def _noise(height: int, width: int) -> np.ndarray:
    return np.random.default_rng(height * 10007 + width).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _images() -> dict[str, np.ndarray]:
    d = skimage_data
    coffee_tall = skimage_transform.resize(d.coffee(), (1500, 300), preserve_range=True, anti_aliasing=True)
    images = {
        "astronaut": d.astronaut(),  # 512x512
        "coffee": d.coffee(),  # 400x600
        "chelsea": d.chelsea(),  # 300x451
        "rocket": d.rocket(),  # 427x640
        "camera_rgb": np.repeat(d.camera()[..., None], 3, axis=2),  # 512x512 greyscale as RGB
        "hubble": d.hubble_deep_field(),  # 872x1000
        "retina": d.retina(),  # 1411x1411 (scaled down into its grid)
        "colorwheel": d.colorwheel(),  # 370x371
        "astronaut_2000x1000": _pil_resize(d.astronaut(), 2000, 1000),  # the 18-tile worst case
        "rocket_200x1500": _pil_resize(d.rocket(), 200, 1500),
        "coffee_1500x300": np.round(coffee_tall).astype(np.uint8),
        "chelsea_19x38": _pil_resize(d.chelsea(), 19, 38),
    }
    for height, width in [(40, 2000), (2000, 40), (1, 1), (7, 13), (336, 336), (337, 335), (1008, 672),
                          (1, 2000), (2000, 1), (100, 250)]:  # fmt: skip
        images[f"noise_{height}x{width}"] = _noise(height, width)
    return images


IMAGES = _images()

# Hand-computed (§7): size -> (grid, MiniMax resize target (floor), LLaVA-NeXT's (ceil)).
# Limiting side: the one whose grid/original ratio is smaller; the other is int(grid_side * other / limiting).
RESIZE_CASES = {
    "astronaut": ((672, 672), (672, 672), (672, 672)),  # square, exact
    "coffee": ((672, 672), (448, 672), (449, 672)),  # 672 * 400 / 600 = 448 exactly; ceil(400 * 1.12) = 449 (float)
    "chelsea": ((336, 672), (336, 505), (336, 506)),  # 336 * 451 / 300 = 505.12
    "rocket": ((672, 672), (448, 672), (449, 672)),  # 672 * 427 / 640 = 448.35
    "camera_rgb": ((672, 672), (672, 672), (672, 672)),
    "hubble": ((1008, 1008), (878, 1008), (879, 1008)),  # 1008 * 872 / 1000 = 878.98
    "retina": ((1344, 1344), (1344, 1344), (1344, 1344)),  # square, exact
    "colorwheel": ((672, 672), (670, 672), (671, 672)),  # 672 * 370 / 371 = 670.19
    "astronaut_2000x1000": ((2016, 1008), (2016, 1008), (2016, 1008)),  # same aspect as the grid
    "rocket_200x1500": ((336, 1680), (224, 1680), (225, 1680)),  # 1680 * 200 / 1500 = 224 exactly; ceil gives 225
    "coffee_1500x300": ((1680, 336), (1680, 336), (1680, 336)),  # same aspect (ceil capped at 336)
    "chelsea_19x38": ((336, 336), (168, 336), (169, 336)),  # 336 * 19 / 38 = 168 exactly; ceil gives 169
    "noise_40x2000": ((336, 2016), (40, 2016), (41, 2016)),  # 2016 * 40 / 2000 = 40.32
    "noise_2000x40": ((2016, 336), (2016, 40), (2016, 41)),
    "noise_1x1": ((336, 336), (336, 336), (336, 336)),
    "noise_7x13": ((336, 336), (180, 336), (181, 336)),  # 336 * 7 / 13 = 180.92
    "noise_336x336": ((336, 336), (336, 336), (336, 336)),
    "noise_337x335": ((672, 336), (338, 336), (339, 336)),  # 337 > 336 rows: grid 672x336; 336 * 337 / 335 = 338.01
    "noise_1008x672": ((1008, 672), (1008, 672), (1008, 672)),  # a grid itself
    "noise_1x2000": ((336, 2016), (1, 2016), (2, 2016)),  # 2016 / 2000 = 1.008
    "noise_2000x1": ((2016, 336), (2016, 1), (2016, 2)),
    "noise_100x250": ((336, 336), (134, 336), (135, 336)),  # 336 * 100 / 250 = 134.4
}
RESIZE_DIFFERS = {name for name, (_, ours, theirs) in RESIZE_CASES.items() if ours != theirs}


def _black() -> torch.Tensor:
    """A black (0 in uint8) pixel after rescale + CLIP normalisation, float32: [3, 1, 1]."""
    mean = torch.tensor(OPENAI_CLIP_MEAN, dtype=torch.float32)
    std = torch.tensor(OPENAI_CLIP_STD, dtype=torch.float32)
    return ((torch.zeros(3) - mean) / std).view(3, 1, 1)


# --------------------------------------------------------------------------------------------------------------
# Constants and grid choice


def test_grid_list_and_constants_are_section_7():
    assert len(GRIDS) == 28
    assert [list(g) for g in IMAGE_GRID_PINPOINTS] == GRIDS
    assert all(h % 336 == 0 and w % 336 == 0 for h, w in IMAGE_GRID_PINPOINTS)
    assert max(h * w // 336**2 for h, w in IMAGE_GRID_PINPOINTS) == 18  # at most 18 tiles (6x3)
    assert (2016, 2016) not in IMAGE_GRID_PINPOINTS  # the paper's "up to 2016x2016" is not in the released list
    from transformers.image_utils import OPENAI_CLIP_MEAN as TF_MEAN
    from transformers.image_utils import OPENAI_CLIP_STD as TF_STD

    assert OPENAI_CLIP_MEAN == tuple(TF_MEAN) and OPENAI_CLIP_STD == tuple(TF_STD)
    assert BASE_IMAGE_TOKENS == 576
    assert model.MiniMaxVLImageProcessor is MiniMaxVLImageProcessor


def _refused(height: int, width: int, grid: tuple[int, int] | None = None) -> bool:
    """Whether MiniMax's floor resize (exact integers here) into LLaVA-NeXT's chosen grid leaves a side of 0 pixels."""
    from transformers.image_processing_utils import select_best_resolution as tf_select

    grid_height, grid_width = grid or tf_select((height, width), GRIDS)
    if width * grid_height > grid_width * height:  # width limits the scale
        return grid_width * height < width
    return grid_height * width < height


def test_select_grid_matches_llava_next():
    from transformers.image_processing_utils import select_best_resolution as tf_select

    # A sweep, plus the edges of "one side at most 2016 times the other": at w = 2016 h the float scale of the
    # selection makes the 336x2016 grid look empty for h = 49 (49 * (2016 / 98784) < 1), so it falls back to 336x336.
    edges = [(1, 2016), (1, 2017), (2, 4032), (2, 4033), (49, 98784), (2016, 1), (2017, 1), (98784, 49)]
    sizes = [(h, w) for h in range(1, 2600, 13) for w in range(1, 2600, 17)] + edges
    refused = set()
    for height, width in sizes:
        theirs = tuple(tf_select((height, width), GRIDS))
        assert select_best_resolution(height, width) == theirs
        if _refused(height, width, theirs):
            with pytest.raises(ValueError, match="aspect ratio too extreme"):
                select_grid(height, width)
            refused.add((height, width))
        else:
            assert select_grid(height, width) == theirs
    assert {size for size in edges if size in refused} == {(1, 2017), (2, 4033), (49, 98784), (2017, 1), (98784, 49)}
    assert all(w > 2016 * h or h > 2016 * w for h, w in refused - {(49, 98784), (98784, 49)})
    assert len(sizes) - len(refused) > 25_000


# --------------------------------------------------------------------------------------------------------------
# Resize target: floor (MiniMax) vs ceil (LLaVA-NeXT)


@pytest.mark.parametrize("name", sorted(RESIZE_CASES))
def test_resize_target_hand_cases(name):
    grid, ours, theirs = RESIZE_CASES[name]
    height, width = IMAGES[name].shape[:2]
    assert select_grid(height, width) == grid
    assert resized_size(height, width) == ours
    assert tuple(llava_resize_target(height, width)) == theirs


def test_exactly_these_cases_differ_in_resize_target():
    assert RESIZE_DIFFERS == {
        "coffee", "chelsea", "rocket", "hubble", "colorwheel", "rocket_200x1500", "chelsea_19x38", "noise_40x2000",
        "noise_2000x40", "noise_7x13", "noise_337x335", "noise_1x2000", "noise_2000x1", "noise_100x250",
    }  # fmt: skip
    # Floor and ceil differ by exactly one pixel on the non-limiting side, never more.
    for name in RESIZE_DIFFERS:
        _, ours, theirs = RESIZE_CASES[name]
        assert sorted(t - o for o, t in zip(ours, theirs)) == [0, 1], name


def test_resize_target_is_the_exact_floor():
    """On a sweep, MiniMax's target is the exact rational floor (no float error), LLaVA-NeXT's never smaller."""
    for height in range(1, 1400, 9):
        for width in range(1, 1400, 7):
            grid_height, grid_width = select_grid(height, width)
            new_height, new_width = resized_size(height, width)
            if width * grid_height > grid_width * height:  # width limits the scale
                assert (new_height, new_width) == (grid_width * height // width, grid_width)
            else:
                assert (new_height, new_width) == (grid_height, grid_height * width // height)
            their_height, their_width = llava_resize_target(height, width)
            assert 0 <= their_height - new_height <= 1 and 0 <= their_width - new_width <= 1


# --------------------------------------------------------------------------------------------------------------
# Pixel values against LLaVA-NeXT


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_pixels_match_llava_next(llava, name):
    image = IMAGES[name]
    height, width = image.shape[:2]
    out = MiniMaxVLImageProcessor()([image])
    ours = out.pixel_values[0]
    tile_rows, tile_cols = tile_grid(height, width)
    assert ours.dtype == torch.float32 and ours.shape == (1 + tile_rows * tile_cols, 3, 336, 336)
    assert out.image_sizes.tolist() == [[height, width]]
    theirs = torch.from_numpy(llava_pixels(llava, image))
    assert theirs.shape == ours.shape
    # The thumbnail (the whole image squashed to 336x336) is the same definition in both.
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=ATOL)
    if name not in RESIZE_DIFFERS:
        torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)
        return
    # The resize targets differ by one pixel: the tiles must differ from LLaVA-NeXT's ...
    assert (ours[1:] - theirs[1:]).abs().max() > 0.01
    # ... and equal LLaVA-NeXT on the image resized to MiniMax's floor size (it fits the same grid, so LLaVA-NeXT
    # only pads it, centred, and splits it).
    new_height, new_width = RESIZE_CASES[name][1]
    pre_resized = _pil_resize(image, new_height, new_width)
    assert select_grid(new_height, new_width) == select_grid(height, width)
    assert tuple(llava_resize_target(new_height, new_width)) == (new_height, new_width)
    reference = torch.from_numpy(llava_pixels(llava, pre_resized))
    torch.testing.assert_close(ours[1:], reference[1:], rtol=0, atol=ATOL)


def test_padding_is_centred_black():
    black = _black()
    processor = MiniMaxVLImageProcessor()
    # chelsea 300x451 -> 336x505 in a 336x672 grid: 672 - 505 = 167 columns = 83 left + 84 right.
    left_tile, right_tile = processor([IMAGES["chelsea"]]).pixel_values[0][1:]
    assert torch.equal(left_tile[:, :, :83], black.expand(3, 336, 83))
    assert not torch.equal(left_tile[:, :, 83], black[:, :, 0].expand(3, 336))
    assert torch.equal(right_tile[:, :, 252:], black.expand(3, 336, 84))  # columns 588..671 of the grid
    assert not torch.equal(right_tile[:, :, 251], black[:, :, 0].expand(3, 336))
    # noise 40x2000 -> 40x2016 in 336x2016: 296 rows = 148 above + 148 below, in each of the 6 tiles.
    tiles = processor([IMAGES["noise_40x2000"]]).pixel_values[0][1:]
    assert tiles.shape[0] == 6
    assert torch.equal(tiles[:, :, :148], black.expand(6, 3, 148, 336))
    assert torch.equal(tiles[:, :, 188:], black.expand(6, 3, 148, 336))
    assert not any(torch.equal(tiles[t, :, r], black[:, :, 0].expand(3, 336)) for t in range(6) for r in (148, 187))
    # colorwheel 370x371 -> 670x672 in 672x672: 2 rows = 1 above + 1 below.
    tiles = processor([IMAGES["colorwheel"]]).pixel_values[0][1:]  # 2x2 tiles
    assert torch.equal(tiles[0, :, 0], black[:, :, 0].expand(3, 336))
    assert torch.equal(tiles[2, :, 335], black[:, :, 0].expand(3, 336))


def test_tiles_are_row_major():
    # A 1008x672 image (a grid itself: no resize, no padding) of tile indices: tile t is uniformly value 10 * t.
    image = np.zeros((1008, 672, 3), np.uint8)
    for t in range(6):
        row, col = divmod(t, 2)
        image[row * 336 : (row + 1) * 336, col * 336 : (col + 1) * 336] = 10 * t
    tiles = MiniMaxVLImageProcessor()([image]).pixel_values[0][1:]
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    for t in range(6):
        torch.testing.assert_close(tiles[t], ((10 * t / 255 - mean) / std).expand(3, 336, 336), rtol=0, atol=1e-6)


def test_several_images_and_inputs():
    processor = MiniMaxVLImageProcessor()
    names = ["chelsea", "noise_7x13", "astronaut"]
    out = processor([Image.fromarray(IMAGES[n]) for n in names])  # PIL input, numpy elsewhere
    assert out.image_sizes.dtype == torch.int64 and out.image_sizes.tolist() == [[300, 451], [7, 13], [512, 512]]
    assert out.num_image_tokens == [1464, 876, 2928]  # hand-computed in TOKEN_CASES
    for name, pixels in zip(names, out.pixel_values):
        assert torch.equal(pixels, processor([IMAGES[name]]).pixel_values[0])
    # A non-contiguous array (a flipped view) is the same image as its copy.
    flipped = IMAGES["chelsea"][:, ::-1]
    assert torch.equal(processor([flipped]).pixel_values[0], processor([flipped.copy()]).pixel_values[0])
    empty = processor([])
    assert empty.pixel_values == [] and empty.num_image_tokens == [] and empty.image_sizes.shape == (0, 2)


# --------------------------------------------------------------------------------------------------------------
# Token counts

# Hand-computed (§7): tokens = 576 + rows * (cols + 1). The tiles' feature map is (grid_h / 14) x (grid_w / 14);
# if the image is wider than the map (w / h > map_w / map_h) rows were padded: kept = h * map_w // w,
# rows = map_h - 2 * ((map_h - kept) // 2); otherwise cols likewise with kept = w * map_h // h.
# size: (grid, (rows, cols), tokens)
TOKEN_CASES = {
    (336, 336): ((336, 336), (24, 24), 1176),  # §7: 576 + 24 * 25
    (2016, 1008): ((2016, 1008), (144, 72), 11088),  # §7 worst case: 576 + 144 * 73
    (2000, 1000): ((2016, 1008), (144, 72), 11088),  # same aspect as 144x72: kept = 1000 * 144 // 2000 = 72
    (1, 1): ((336, 336), (24, 24), 1176),  # kept = 1 * 24 // 1 = 24
    (400, 600): ((672, 672), (32, 48), 2144),  # 48x48 map; kept = 400 * 48 // 600 = 32, pad 8: 576 + 32 * 49
    (300, 451): ((336, 672), (24, 36), 1464),  # 24x48; 451/300 < 2: kept = 451 * 24 // 300 = 36: 576 + 24 * 37
    (40, 2000): ((336, 2016), (2, 144), 866),  # 24x144; kept = 40 * 144 // 2000 = 2, pad 11: 576 + 2 * 145
    (2000, 40): ((2016, 336), (144, 2), 1008),  # 144x24; kept = 2, pad 11: 576 + 144 * 3
    (7, 13): ((336, 336), (12, 24), 876),  # kept = 7 * 24 // 13 = 12, pad 6: 576 + 12 * 25
    (337, 335): ((672, 336), (24, 24), 1176),  # 48x24; kept = 337 * 24 // 335 = 24, pad 12: 576 + 24 * 25
    (1008, 672): ((1008, 672), (72, 48), 4104),  # a grid: 576 + 72 * 49
    (512, 512): ((672, 672), (48, 48), 2928),  # 576 + 48 * 49
    (100, 250): ((336, 336), (10, 24), 826),  # kept = 2400 // 250 = 9, pad (24 - 9) // 2 = 7: rows 10
    (250, 100): ((336, 336), (24, 10), 840),  # columns likewise: 576 + 24 * 11
    (200, 1500): ((336, 1680), (16, 120), 2512),  # 24x120; kept = 200 * 120 // 1500 = 16: 576 + 16 * 121
    (872, 1000): ((1008, 1008), (62, 72), 5102),  # 72x72; kept = 872 * 72 // 1000 = 62, pad 5: 576 + 62 * 73
    (1, 2000): ((336, 2016), (0, 144), 576),  # kept = 144 // 2000 = 0, pad 12: no rows, no newlines
    (2000, 1): ((2016, 336), (144, 0), 720),  # kept = 0, pad 12: no columns, but 144 rows of one newline each
}


@pytest.mark.parametrize("size", sorted(TOKEN_CASES))
def test_token_count_hand_cases(llava_processor, size):
    grid, rows_cols, tokens = TOKEN_CASES[size]
    assert select_grid(*size) == grid
    assert tile_grid(*size) == (grid[0] // 336, grid[1] // 336)
    assert unpadded_grid(*size) == rows_cols
    assert num_image_tokens(*size) == tokens
    assert llava_processor._get_num_multimodal_tokens(image_sizes=[size]).num_image_tokens == [tokens]


# Where the unpad roundings differ, by hand. 138889 x 20000017 (w = 144 h + 1) takes grid 336x2016 (scale
# 2016 / w; 13 x 2016 pixels, the most of any grid), a 24x144 feature map; w / h > 6, so rows were padded:
# MiniMax kept = 138889 * 144 // 20000017 = 20000016 // 20000017 = 0, pad 12, rows 0 -> 576 tokens.
# LLaVA-NeXT int(round(138889 * (144 / 20000017), 7)) = int(round(0.99999995, 7)) = 1, pad (24 - 1) // 2 = 11,
# rows 2 -> 576 + 2 * 145 = 866. Transposed (grid 2016x336, 144x24 map, columns padded): MiniMax 0 columns, but
# each of the 144 rows keeps its newline -> 576 + 144 * 1 = 720; LLaVA-NeXT 2 columns -> 576 + 144 * 3 = 1008.
UNPAD_DIFFERS = {
    (138889, 20000017): ((0, 144), 576, (2, 144), 866),
    (20000017, 138889): ((144, 0), 720, (144, 2), 1008),
}


def test_token_counts_match_llava_next_except_where_unpad_rounding_differs(llava_processor):
    sizes = [(h, w) for h in range(1, 2300, 13) for w in range(1, 2300, 17) if not _refused(h, w)]
    sizes += list(TOKEN_CASES) + list(UNPAD_DIFFERS)
    theirs = llava_processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
    ours = [num_image_tokens(h, w) for h, w in sizes]
    differing = {size: (o, t) for size, o, t in zip(sizes, ours, theirs) if o != t}
    assert differing == {size: (case[1], case[3]) for size, case in UNPAD_DIFFERS.items()}
    assert len(sizes) > 20_000


def test_unpadded_grid_matches_llava_next_unpad_image():
    """Rows and columns against transformers' LLaVA-NeXT modeling `unpad_image` on a (meta) feature map."""
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        unpad_image,
    )

    def theirs(height, width):
        tile_rows, tile_cols = get_anyres_image_grid_shape((height, width), GRIDS, 336)
        features = torch.empty(1, tile_rows * 24, tile_cols * 24, device="meta")
        return (tile_rows, tile_cols), tuple(unpad_image(features, (height, width)).shape[1:])

    sizes = [(h, w) for h in range(1, 2100, 41) for w in range(1, 2100, 37) if not _refused(h, w)]
    for height, width in sizes + list(TOKEN_CASES):
        assert (tile_grid(height, width), unpadded_grid(height, width)) == theirs(height, width)
    for size, (ours_rows_cols, ours_tokens, their_rows_cols, _) in UNPAD_DIFFERS.items():
        assert unpadded_grid(*size) == ours_rows_cols and num_image_tokens(*size) == ours_tokens
        assert theirs(*size)[1] == their_rows_cols


def test_most_tokens_is_the_worst_case_grid():
    # Every grid at its own size keeps all its features: the 18-tile grids give the most, 576 + 144 * 73 = 11088.
    counts = {grid: num_image_tokens(*grid) for grid in IMAGE_GRID_PINPOINTS}
    assert max(counts.values()) == 11088 == counts[(2016, 1008)]
    assert counts[(1008, 2016)] == 576 + 72 * 145 == 11016  # the transposed grid has 72 rows of 144 + 1
    for (h, w), count in counts.items():
        assert count == 576 + (h // 14) * (w // 14 + 1)


# --------------------------------------------------------------------------------------------------------------
# Bad input

GOOD = IMAGES["noise_7x13"]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (Image.fromarray(GOOD).convert("L"), r"image 1: PIL image of mode 'L', expected 'RGB'"),
        (Image.fromarray(GOOD).convert("RGBA"), r"image 1: PIL image of mode 'RGBA', expected 'RGB'"),
        (GOOD[..., 0], r"image 1: array of shape \(7, 13\), expected an HxWx3 RGB array"),
        (np.zeros((7, 13, 4), np.uint8), r"image 1: array of shape \(7, 13, 4\), expected an HxWx3 RGB array"),
        (np.zeros((3, 7, 13), np.uint8), r"image 1: array of shape \(3, 7, 13\), expected an HxWx3 RGB array"),
        (GOOD.astype(np.float32) / 255, r"image 1: array of dtype float32, expected uint8"),
        (np.zeros((0, 13, 3), np.uint8), r"image 1: zero-size image: 0x13"),
        (np.zeros((7, 0, 3), np.uint8), r"image 1: zero-size image: 7x0"),
        (Image.new("RGB", (0, 5)), r"image 1: zero-size image: 5x0"),
        (torch.zeros(7, 13, 3, dtype=torch.uint8), r"image 1: got torch.Tensor, expected a PIL image or an HxWx3"),
        ("cat.png", r"image 1: got builtins.str, expected a PIL image"),
        (
            np.zeros((1, 2017, 3), np.uint8),
            (
                r"image 1: aspect ratio too extreme: a 1x2017 \(height x width\) image "
                r"rounds down to 0x336 pixels in its 336x336 grid; one side must be at most 2016 times the other"
            ),
        ),
        (np.zeros((3000, 1, 3), np.uint8), r"image 1: aspect ratio too extreme: a 3000x1 .* to 336x0 pixels in its"),
    ],
)
def test_bad_input_names_the_image(bad, message):
    with pytest.raises(ValueError, match=message):
        MiniMaxVLImageProcessor()([GOOD, bad, GOOD])


def test_bad_arguments():
    processor = MiniMaxVLImageProcessor()
    with pytest.raises(ValueError, match="images must be a list .* got ndarray .*wrap a single image in a list"):
        processor(GOOD)
    with pytest.raises(ValueError, match="zero-size image: 0x5"):
        num_image_tokens(0, 5)
    with pytest.raises(ValueError, match="height must be an int, got float"):
        num_image_tokens(7.0, 13)
    with pytest.raises(ValueError, match="aspect ratio too extreme"):
        unpadded_grid(1, 2017)  # 2016 / 2017 of a pixel row in every grid
    with pytest.raises(ValueError, match="rounds down to 0x336 pixels in its 336x336 grid"):
        num_image_tokens(49, 98784)  # the float-scale edge (test_select_grid_matches_llava_next)
    assert num_image_tokens(1, 2016) == 576  # 1 pixel row in the grid, 0 feature rows after unpadding


def test_processor_and_model_agree_on_every_layout():
    """The processor (pixels, token counts) and the model (``MiniMaxVLConfig.image_layout``: tiles, feature crop)
    are written separately; they must agree on the grids, the tile counts and the token counts of every size."""
    from model.image_processing import IMAGE_GRID_PINPOINTS, num_image_tokens, tile_grid
    from model.vl import MiniMaxVLConfig

    config = MiniMaxVLConfig.preset("minimax-vl-01")
    assert tuple(map(tuple, config.image_grid_pinpoints)) == IMAGE_GRID_PINPOINTS
    rng = np.random.default_rng(3)
    sizes = [(336, 336), (2000, 1000), (110, 176), (1, 2000), (2000, 1), (7, 13)] + [
        (int(h), int(w)) for h, w in rng.integers(1, 2200, size=(400, 2))]
    checked = 0
    for h, w in sizes:
        try:
            rows, cols = tile_grid(h, w)
        except ValueError:
            continue  # refused by the processor (a side resized to 0 pixels)
        layout = config.image_layout(h, w)
        assert (layout.rows, layout.cols) == (rows, cols), (h, w)
        assert layout.num_tokens == num_image_tokens(h, w), (h, w)
        checked += 1
    assert checked > 350
