"""MiniMax-VL-01 vision encoding (issue 14): tiles/s of our compiled vision program against transformers' eager
CLIP vision tower + projector on the same weights, MFU on the ViT's FLOPs, and time to first token of an image +
text prompt through a 2-layer real-width VL engine.

Ours: the engine's vision program (``export.exporting.VisionProgram``: CLIP ViT-L/14-336 tower, projector, the
packing gather), AOTInductor-compiled without its weights and pointed at random bf16 weights on the GPU. The peer:
``transformers.CLIPVisionModel`` with the same weights (``hidden_states[vision_feature_layer]`` without CLS) and
the projector as ``nn.Sequential(Linear, GELU, Linear)`` sharing our projector's tensors, eager bf16. Both are
timed on the same tiles with CUDA events (median), at 1, 7 and 19 tiles per call (one tile; a 1008x672 image:
thumbnail + 2x3; the worst case: thumbnail + 6x3).

MFU: ``vision_flops`` (matmul FLOPs of the patch embedding, the 24 encoder layers with their attention scores, and
the projector) over the time, against the bf16 matmul ceiling measured in the same run (``benchmarks.common``).

``--ttft``: a 2-layer real-width MiniMax-VL-01 (``minimax-text-01`` cut to 2 layers, the released vision tower),
random bf16 weights, AOTInductor prefill / decode / vision built here (``benchmarks.decode.build_aoti_engine``);
time to first token (``Engine.generate(max_new_tokens=1)``: the image through the vision program, then the
prefill) of one 1008x672 image (4,080 image tokens) + 64 text tokens, against a text-only prompt of the same length.

    # GPU (H200), the issue's run:
    LD_PRELOAD=/lib/x86_64-linux-gnu/libstdc++.so.6 PYTHONPATH=. python -m benchmarks.vision --ttft --out v.json
    # CPU smoke run of the code paths (tiny config, fp32; figures mean nothing):
    PYTHONPATH=. python -m benchmarks.vision --tiny --tiles 1,3 --out v.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.common import environment, write_json


class VisionOnly(nn.Module):
    """The vision half of a ``MiniMaxVLForConditionalGeneration`` (tower, projector, newline) under the same
    attribute names, with its ``encode_tiles``: what the engine's vision program computes, without a text model."""

    def __init__(self, config, dtype: torch.dtype):
        super().__init__()
        from model.vl import CLIPVisionTower, MultiModalProjector

        self.config, self.dtype = config, dtype
        self.vision_tower = CLIPVisionTower(config.vision, config.vision_layers_used, dtype=dtype)
        self.multi_modal_projector = MultiModalProjector(config.vision.hidden_size, config.text.hidden_size,
                                                         config.projector_hidden_act, dtype=dtype)
        self.image_newline = nn.Parameter(torch.empty(config.text.hidden_size, dtype=dtype))

    def encode_tiles(self, pixel_values, feature_index):
        from model.vl import MiniMaxVLForConditionalGeneration

        return MiniMaxVLForConditionalGeneration.encode_tiles(self, pixel_values, feature_index)


@torch.no_grad()
def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """N(0, 0.02) weights, LayerNorms (1, 0) and the text model's RMSNorms 1, on the module's device (no CPU
    copy)."""
    from model.modeling import RMSNorm

    device = next(module.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    for m in module.modules():
        for name, p in m.named_parameters(recurse=False):
            if isinstance(m, nn.LayerNorm):
                p.fill_(1.0 if name == "weight" else 0.0)
            elif isinstance(m, RMSNorm):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=generator)
    return module


def vision_flops(config, tiles: int) -> float:
    """Matmul FLOPs of ``tiles`` tiles through the tower (patch embedding, every used encoder layer: QKV, scores,
    attention x V, output, MLP) and the projector; LayerNorms, softmax and activations are not counted."""
    vc = config.vision
    g2, D, I = vc.grid * vc.grid, vc.hidden_size, vc.intermediate_size
    T = g2 + 1  # patches + CLS
    patch = 2 * g2 * (vc.num_channels * vc.patch_size**2) * D
    layer = 2 * T * D * 3 * D + 2 * 2 * T * T * D + 2 * T * D * D + 2 * 2 * T * D * I
    H = config.text.hidden_size
    projector = 2 * g2 * (D * H + H * H)
    return float(tiles * (patch + config.vision_layers_used * layer + projector))


def hf_peer(model: VisionOnly):
    """transformers' ``CLIPVisionModel`` and the projector on ``model``'s weights (the tower copied): a function
    ``pixel_values -> projected features [N, g*g, hidden]``."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    vc = model.config.vision
    device = model.image_newline.device
    config = CLIPVisionConfig(hidden_size=vc.hidden_size, intermediate_size=vc.intermediate_size,
                              num_hidden_layers=model.config.vision_layers_used,
                              num_attention_heads=vc.num_attention_heads, num_channels=vc.num_channels,
                              image_size=vc.image_size, patch_size=vc.patch_size, hidden_act=vc.hidden_act,
                              layer_norm_eps=vc.layer_norm_eps)
    clip = CLIPVisionModel(config).to(device=device, dtype=model.dtype).eval()
    # transformers 5 names the transformer's tensors without the released "vision_model." prefix
    state = model.vision_tower.vision_model.state_dict()
    missing, unexpected = clip.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("post_layernorm.") for k in missing):
        raise RuntimeError(f"CLIPVisionModel does not take our tower's weights: missing {missing}, "
                           f"unexpected {unexpected}")
    proj = model.multi_modal_projector
    act = nn.GELU() if model.config.projector_hidden_act == "gelu" else proj.act
    projector = nn.Sequential(proj.linear_1, act, proj.linear_2)
    layer = model.config.vision_feature_layer

    @torch.no_grad()
    def run(pixel_values):
        hidden = clip(pixel_values=pixel_values, output_hidden_states=True).hidden_states[layer]
        return projector(hidden[:, 1:])

    return run


def compile_vision(model: VisionOnly, max_tiles: int, workdir: Path):
    """The engine's vision program of ``model``, AOTInductor-compiled without weights and given ``model``'s."""
    from export import BuildSettings
    from export.exporting import VisionProgram, dynamic_shapes, example_inputs

    dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[model.dtype]
    device = model.image_newline.device
    settings = BuildSettings(device=device.type, dtype=dtype, max_tiles=max_tiles)
    with torch.no_grad():
        ep = torch.export.export(VisionProgram(model), example_inputs(model, settings, "vision"),
                                 dynamic_shapes=dynamic_shapes(0, 0, settings, "vision", vl_config=model.config))
    t0 = time.perf_counter()
    path = workdir / "vision.pt2"
    torch._inductor.aoti_compile_and_package(ep, package_path=str(path),
                                             inductor_configs={"aot_inductor.package_constants_in_so": False})
    compile_s = time.perf_counter() - t0
    fn = torch._inductor.aoti_load_package(str(path), run_single_threaded=True)
    weights = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    fn.load_constants({f: weights[f.removeprefix("model.")] for f in fn.get_constant_fqns()}, check_full_update=True,
                      user_managed=True)
    return fn, compile_s


def _timer(cuda: bool):
    if cuda:
        from benchmarks.common import time_ms

        return lambda fn: time_ms(fn, warmup=3, iters=10)

    def host_ms(fn):
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)

    return host_ms


def measure_tiles(model: VisionOnly, ours, peer, tile_counts: list[int], ceiling_tflops: float | None
                  ) -> list[dict[str, Any]]:
    config = model.config
    vc = config.vision
    device = model.image_newline.device
    timer = _timer(device.type == "cuda")
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for n in tile_counts:
        pixels = torch.randn(n, vc.num_channels, vc.image_size, vc.image_size, generator=g, device=device,
                             dtype=model.dtype)
        index = torch.arange(n * vc.grid * vc.grid, device=device)  # every tile's vectors in order (no crop)
        with torch.no_grad():
            ref = peer(pixels)
            flat = torch.cat((ref.flatten(0, 1), model.image_newline[None]))[index]
            got = ours(pixels, index)
        err = ((got.float() - flat.float()).norm() / flat.float().norm()).item()
        ours_ms, peer_ms = timer(lambda: ours(pixels, index)), timer(lambda: peer(pixels))
        flops = vision_flops(config, n)
        row = {"tiles": n, "ours_ms": ours_ms, "transformers_ms": peer_ms, "ours_tiles_per_s": n / ours_ms * 1e3,
               "transformers_tiles_per_s": n / peer_ms * 1e3, "speedup": peer_ms / ours_ms,
               "ours_tflops": flops / ours_ms / 1e9, "rel_err_vs_transformers": err}
        if ceiling_tflops:
            row["mfu"] = row["ours_tflops"] / ceiling_tflops
        rows.append(row)
        mfu = f", MFU {row['mfu']:.1%}" if "mfu" in row else ""
        print(f"  {n:3d} tiles: ours {ours_ms:8.3f} ms ({row['ours_tiles_per_s']:8.1f} tiles/s, "
              f"{row['ours_tflops']:.1f} TFLOP/s{mfu}) | transformers {peer_ms:8.3f} ms ({row['transformers_tiles_per_s']:8.1f} tiles/s) | "
              f"{row['speedup']:.2f}x | rel err {err:.2e}", flush=True)
    return rows


def measure_ttft(workdir: Path, text_tokens: int = 64) -> dict[str, Any]:
    """TTFT of one 1008x672 image + ``text_tokens`` through a 2-layer real-width VL engine (AOTInductor, bf16)."""
    from benchmarks.decode import build_aoti_engine, reduced_config
    from model.vl import MiniMaxVLConfig, MiniMaxVLForConditionalGeneration
    import dataclasses

    base = MiniMaxVLConfig.preset("minimax-vl-01")
    config = dataclasses.replace(base, text=reduced_config("minimax-text-01", 2))
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = MiniMaxVLForConditionalGeneration(config, dtype=torch.bfloat16)
    model = randomize(model.to_empty(device="cuda"))
    model.language_model.model.reset_buffers()
    model.eval()
    print(f"2-layer real-width VL model in {time.perf_counter() - t0:.1f}s", flush=True)
    layout = config.image_layout(672, 1008)
    length = layout.num_tokens + text_tokens
    engine, timings = build_aoti_engine(model, 1, 8192, length + 64, workdir, page_size=256,
                                        programs_to_build=("prefill", "decode", "vision"))
    print(f"engine built: {timings}", flush=True)
    g = torch.Generator().manual_seed(0)
    tiles = torch.randn(layout.num_tiles, 3, 336, 336, generator=g)
    prompt = [config.image_token_index] * layout.num_tokens + torch.randint(0, 1000, (text_tokens,), generator=g).tolist()
    text = torch.randint(0, 1000, (length,), generator=g).tolist()
    for _ in range(2):  # warm-up
        engine.generate([prompt], max_new_tokens=1, images=[[(tiles, (672, 1008))]])
        engine.generate([text], max_new_tokens=1)
    ttft, text_ttft, vision = [], [], []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.generate([prompt], max_new_tokens=1, images=[[(tiles, (672, 1008))]])
        torch.cuda.synchronize()
        ttft.append(1e3 * (time.perf_counter() - t0))
        vision.append(1e3 * engine.stats.vision_s)
        t0 = time.perf_counter()
        engine.generate([text], max_new_tokens=1)
        torch.cuda.synchronize()
        text_ttft.append(1e3 * (time.perf_counter() - t0))
    result = {"image": "1008x672 (7 tiles)", "image_tokens": layout.num_tokens, "text_tokens": text_tokens,
              "ttft_ms": statistics.median(ttft), "vision_ms": statistics.median(vision),
              "text_only_ttft_ms": statistics.median(text_ttft), "build": timings}
    print(f"TTFT image + text: {result['ttft_ms']:.1f} ms (vision {result['vision_ms']:.1f} ms); text-only prompt of "
          f"the same {length} tokens: {result['text_only_ttft_ms']:.1f} ms", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.vision", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiles", default="1,7,19", help="tiles per call (default 1,7,19)")
    p.add_argument("--tiny", action="store_true", help="the tiny VL config in fp32 on the CPU (a smoke run)")
    p.add_argument("--ttft", action="store_true", help="also the TTFT of a 2-layer real-width VL engine (GPU)")
    p.add_argument("--profile", action="store_true", help="CUDA time by kernel of both at the largest tile count")
    p.add_argument("--out", required=True, help="JSON results file")
    args = p.parse_args(argv)
    from model.vl import MiniMaxVLConfig

    cuda = not args.tiny
    if cuda and not torch.cuda.is_available():
        print("error: no GPU; use --tiny for a CPU smoke run", file=sys.stderr)
        return 2
    config = MiniMaxVLConfig.preset("tiny" if args.tiny else "minimax-vl-01")
    dtype, device = (torch.float32, "cpu") if args.tiny else (torch.bfloat16, "cuda")
    tile_counts = [int(t) for t in args.tiles.split(",")]
    payload: dict[str, Any] = {"environment": environment(), "config": "tiny" if args.tiny else "minimax-vl-01",
                               "dtype": str(dtype)}
    ceiling = None
    if cuda:
        from benchmarks.common import kernel_profile, measure_ceilings

        payload["ceilings"] = measure_ceilings()
        ceiling = payload["ceilings"]["matmul_bf16_tflops"]
    with torch.device("meta"):
        model = VisionOnly(config, dtype)
    model = randomize(model.to_empty(device=device)).eval()
    workdir = Path(tempfile.mkdtemp(prefix="vision_bench_"))
    ours, compile_s = compile_vision(model, max(tile_counts + [19]), workdir)
    payload["compile_s"] = compile_s
    print(f"vision program compiled in {compile_s:.1f}s", flush=True)
    peer = hf_peer(model)
    payload["tiles"] = measure_tiles(model, ours, peer, tile_counts, ceiling)
    if args.profile and cuda:
        n = max(tile_counts)
        pixels = torch.randn(n, config.vision.num_channels, config.vision.image_size, config.vision.image_size,
                             device=device, dtype=dtype)
        index = torch.arange(n * config.vision.grid ** 2, device=device)
        payload["profile"] = {"tiles": n, "ours": kernel_profile(lambda: ours(pixels, index), label=f"ours, {n} tiles"),
                              "transformers": kernel_profile(lambda: peer(pixels), label=f"transformers, {n} tiles")}
    if args.ttft and cuda:
        del ours, model
        torch.cuda.empty_cache()
        payload["ttft"] = measure_ttft(workdir)
    write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
