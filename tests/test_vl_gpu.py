"""GPU suite for MiniMax-VL-01 engines: a CUDA AOTInductor VL engine (fp32, Triton kernels; head_dim 64) generates
exactly what the eager VL model on the GPU generates with images; the vision program at the released sizes in
bf16 is close to the fp32 eager tower + projector.

Run on a CUDA machine: ``LD_PRELOAD=/lib/x86_64-linux-gnu/libstdc++.so.6 python -m pytest -m gpu
tests/test_vl_gpu.py``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from export import BuildSettings, build_engine
from model.vl import MiniMaxVLConfig, MiniMaxVLForConditionalGeneration, packing_index
from runtime import Engine
from tests.utils import rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TINY = MiniMaxVLConfig.preset("tiny")
CONFIG = dataclasses.replace(TINY, text=dataclasses.replace(TINY.text, head_dim=64, rotary_dim=32))
SETTINGS = BuildSettings(backend="aoti", device="cuda", dtype="float32", max_batch=2, max_input_len=48,
                         max_seq_len=512, page_size=16, max_tiles=19)
SIZES = [(20, 45), (50, 18), (16, 16)]


@pytest.fixture(scope="module")
def vl_gpu(tmp_path_factory):
    cpu = MiniMaxVLForConditionalGeneration(CONFIG).init_random_weights(seed=6, std=0.05).eval()
    gpu = MiniMaxVLForConditionalGeneration(CONFIG).to("cuda").eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu.language_model.model.reset_buffers()
    out = tmp_path_factory.mktemp("vl_gpu") / "engine"
    build_engine(gpu, SETTINGS, out)
    return gpu, Engine.load(out)


def _greedy(model, row, tiles, sizes, n):
    state = model.new_state(1, SETTINGS.max_seq_len, page_size=16)
    with torch.no_grad():
        logits, state = model.prefill(torch.tensor([row], device="cuda"), state, torch.cat(tiles).cuda(), sizes)
        out = [int(logits[0, -1].argmax())]
        for i in range(n - 1):
            logits, state = model.decode(torch.tensor([[out[-1]]], device="cuda"),
                                         torch.tensor([len(row) + i], device="cuda"), state)
            out.append(int(logits[0, -1].argmax()))
    return out


def test_cuda_vl_engine_generates_what_the_eager_model_does(vl_gpu):
    model, engine = vl_gpu
    g = torch.Generator().manual_seed(0)
    layouts = [CONFIG.image_layout(h, w) for h, w in SIZES]
    tiles = [torch.randn(lay.num_tiles, 3, 16, 16, generator=g) for lay in layouts]
    T = CONFIG.image_token_index
    rows = [[5, 6, *[T] * layouts[0].num_tokens, 7, *[T] * layouts[1].num_tokens, 8],
            [9, *[T] * layouts[2].num_tokens, 10, 11]]
    images = [[(tiles[0], SIZES[0]), (tiles[1], SIZES[1])], [(tiles[2], SIZES[2])]]
    out = engine.generate(rows, max_new_tokens=8, images=images)
    assert out[0, -8:].tolist() == _greedy(model, rows[0], tiles[:2], SIZES[:2], 8)
    assert out[1, -8:].tolist() == _greedy(model, rows[1], tiles[2:], SIZES[2:], 8)


@torch.no_grad()
def test_released_size_vision_program_in_bf16(tmp_path):
    """The vision program at ViT-L/14-336 + the 1024 -> 6144 -> 6144 projector, bf16 AOTInductor CUDA, 19 tiles,
    against the fp32 eager computation on the same weights."""
    from benchmarks.vision import VisionOnly, compile_vision, randomize

    config = MiniMaxVLConfig.preset("minimax-vl-01")
    with torch.device("meta"):
        ref = VisionOnly(config, torch.float32)
    ref = randomize(ref.to_empty(device="cuda")).eval()
    model = VisionOnly(config, torch.bfloat16).to("cuda").eval()
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()})
    program, _ = compile_vision(model, 19, tmp_path)
    pixels = torch.randn(19, 3, 336, 336, device="cuda")
    layout = config.image_layout(2016, 1008)  # the 6 x 3 grid: 19 tiles
    index = packing_index([layout], config.vision.grid).cuda()
    got = program(pixels.to(torch.bfloat16), index)
    expected = ref.encode_tiles(pixels, index)
    assert got.shape == (layout.num_tokens, 6144)
    assert rel_err(got.float(), expected) < 2e-2, rel_err(got.float(), expected)
