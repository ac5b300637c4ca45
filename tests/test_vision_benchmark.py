"""``benchmarks/vision.py`` on the CPU (tiny config): its FLOP count is torch's, and its transformers peer runs on the
same weights as our compiled vision program (the GPU figures are only comparable if both hold)."""

from __future__ import annotations

import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.vision import VisionOnly, main, randomize, vision_flops
from model.vl import MiniMaxVLConfig


def test_vision_flops_is_what_torch_counts():
    for name in ("tiny", "minimax-vl-01"):
        config = MiniMaxVLConfig.preset(name)
        with torch.device("meta"):
            model = VisionOnly(config, torch.float32)
            pixels = torch.empty(3, 3, config.vision.image_size, config.vision.image_size)
            index = torch.arange(3 * config.vision.grid ** 2)
            with FlopCounterMode(display=False) as counter:
                model.encode_tiles(pixels, index)
        assert counter.get_total_flops() == vision_flops(config, 3), name


def test_cpu_run_compares_against_transformers_on_the_same_weights(tmp_path):
    out = tmp_path / "v.json"
    assert main(["--tiny", "--tiles", "1,5", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["tiles"]
    assert [r["tiles"] for r in rows] == [1, 5]
    for r in rows:
        assert r["rel_err_vs_transformers"] < 1e-5, r  # a different weight or feature layer gives ~1
        assert r["ours_ms"] > 0 and r["transformers_ms"] > 0


def test_peer_differs_when_weights_differ():
    """The agreement above is not vacuous: the peer built before a weight changes no longer agrees."""
    from benchmarks.vision import hf_peer

    config = MiniMaxVLConfig.preset("tiny")
    model = randomize(VisionOnly(config, torch.float32)).eval()
    peer = hf_peer(model)
    pixels = torch.randn(2, 3, 16, 16)
    index = torch.arange(2 * 16)
    with torch.no_grad():
        same = model.encode_tiles(pixels, index)
        assert torch.allclose(peer(pixels).flatten(0, 1), same, rtol=1e-4, atol=1e-6)
        model.vision_tower.vision_model.pre_layrnorm.weight.mul_(2.0)  # the tower only (the peer copied it)
        changed = model.encode_tiles(pixels, index)
        err = ((peer(pixels).flatten(0, 1) - changed).norm() / changed.norm()).item()
        assert err > 1e-2, err
