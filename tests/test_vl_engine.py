"""MiniMax-VL-01 engines: the packing gather, the vision program, the VL prefill program, ``build.py`` on a VL
checkpoint, and generation with images through the AOTInductor engine against the eager model.

The engine is built once (module fixture) with ``build.py --checkpoint`` from a released-layout checkpoint that
``tests/test_vl_model.py``'s helpers write from a random transformers LLaVA-NeXT model (2 text layers: one lightning,
one softmax, so that the CPU build stays short). The eager reference is ``MiniMaxVLForConditionalGeneration`` loaded
from the same checkpoint: ``forward`` / ``prefill`` / ``decode`` with ``pixel_values``, which pack the features with
``pack_image_features`` and ``masked_scatter`` (tested against transformers in test_vl_model.py), not with the
runtime's gather.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

import build
from export.engine_folder import EngineFolderError, read_manifest
from model.vl import MiniMaxVLForConditionalGeneration, pack_image_features, packing_index
from runtime.engine import Engine, RequestError, chunk_plan
from tests.conftest import hf_tiny_config
from tests.test_vl_model import IMAGE_TOKEN, PINPOINTS, VISION, _randomize, write_official
from tests.utils import logit_report, rel_err

# (height, width) in pixels: rows cropped, columns cropped, a float-truncation case, one tile (test_vl_model.py)
SIZES = [(20, 45), (44, 55), (50, 18), (16, 16)]
MAX_INPUT_LEN = 40  # prefill chunks cut the images' runs of placeholders
MAX_SEQ_LEN = 640


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _llava(seed: int = 0):
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    alpha = (2 * 2) ** 0.25
    text = hf_tiny_config(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
                          full_attn_alpha_factor=alpha, linear_attn_alpha_factor=alpha, mlp_alpha_factor=alpha)
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**VISION, hidden_act="gelu"), text_config=text,
        image_grid_pinpoints=PINPOINTS, image_token_index=IMAGE_TOKEN, vision_feature_layer=-1,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", multimodal_projector_bias=True,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).float().eval()
    _randomize(model, seed)
    return model


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    """(eager model, AOTInductor engine, checkpoint dir, engine dir): the engine built by build.py."""
    root = tmp_path_factory.mktemp("vl_engine")
    write_official(_llava(), root / "ckpt", root / "hf")
    out = root / "engine"
    assert build.main(["--checkpoint", str(root / "ckpt"), "--out", str(out), "--backend", "aoti", "--device", "cpu",
                       "--dtype", "fp32", "--max-batch", "2", "--max-input-len", str(MAX_INPUT_LEN),
                       "--max-seq-len", str(MAX_SEQ_LEN), "--page-size", "16"]) == 0
    model = MiniMaxVLForConditionalGeneration.from_pretrained(root / "ckpt", dtype=torch.float32)
    return model, Engine.load(out), root / "ckpt", out


def _tiles(config, sizes, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    layouts = [config.image_layout(h, w) for h, w in sizes]
    return [torch.randn(lay.num_tiles, 3, 16, 16, generator=generator) for lay in layouts], layouts


def _prompts(config, layouts, seed: int = 0):
    """Row 0: text, image 0, text, image 1, text. Row 1 (shorter: left padded): text, image 2, image 3, text."""
    rng = random.Random(seed)

    def text(n):
        return [rng.randrange(IMAGE_TOKEN) for _ in range(n)]

    def image(i):
        return [config.image_token_index] * layouts[i].num_tokens

    rows = [text(5) + image(0) + text(4) + image(1) + text(3)]
    if len(layouts) == 4:
        rows.append(text(2) + image(2) + image(3) + text(6))
    return rows


# ------------------------------------------------------------------------------------------- packing (pure)
def test_packing_index_is_pack_image_features_for_many_sizes():
    """The gather the vision program does equals ``pack_image_features`` (the packing tested against transformers)
    for every pinpoint shape and crop: random sizes, extreme aspect ratios, 1-pixel images; several images back to
    back (one index over their concatenated tiles)."""
    from model.vl import MiniMaxVLConfig

    config = MiniMaxVLConfig.preset("tiny")
    g = config.vision.grid
    rng = random.Random(0)
    sizes = [(1, 1), (1, 200), (200, 1), (16, 16), (17, 16), (33, 95)]
    sizes += [(rng.randint(1, 120), rng.randint(1, 120)) for _ in range(30)]
    generator = torch.Generator().manual_seed(0)
    for start in range(0, len(sizes), 4):
        layouts = [config.image_layout(h, w) for h, w in sizes[start:start + 4]]
        features = [torch.randn(lay.num_tiles, g * g, 8, generator=generator) for lay in layouts]
        newline = torch.randn(8, generator=generator)
        expected = torch.cat([pack_image_features(f, lay, newline) for f, lay in zip(features, layouts)])
        flat = torch.cat([torch.cat(features).flatten(0, 1), newline[None]])
        index = packing_index(layouts, g)
        assert index.dtype == torch.long and index.shape == (sum(lay.num_tokens for lay in layouts),)
        assert torch.equal(flat[index], expected), sizes[start:start + 4]


def test_packing_index_refuses_another_grid():
    from model.vl import MiniMaxVLConfig

    config = MiniMaxVLConfig.preset("tiny")
    with pytest.raises(ValueError, match="tokens per tile"):
        packing_index([config.image_layout(20, 20)], config.vision.grid + 1)


# ------------------------------------------------------------------------------------------- the engine
def test_vl_manifest_describes_three_programs(vl):
    _, engine, _, folder = vl
    manifest = read_manifest(folder)
    assert set(manifest["programs"]) == {"prefill", "decode", "vision"}
    assert manifest["vision"]["max_tiles"] == manifest["profiles"]["max_tiles"] == 19  # 1 + the 6x3 grid
    names = [e["name"] for e in manifest["programs"]["prefill"]["inputs"]]
    assert names[:3] == ["input_ids", "positions", "block_table"] and names[-1] == "image_embeds"
    assert [e["name"] for e in manifest["programs"]["vision"]["inputs"]] == ["pixel_values", "feature_index"]
    assert any(k.startswith("vision_tower.") for k in manifest["weights"]["tensors"])
    assert engine.vision["config"].image_token_index == IMAGE_TOKEN


def test_vision_program_equals_eager_features(vl):
    """The compiled vision program (tiles of several images in one call, and the largest image alone) against the
    eager model's packed features (``image_features``: tower, projector, ``pack_image_features``)."""
    model, engine, _, _ = vl
    for sizes in (SIZES, [(96, 48)]):  # 96 x 48 pixels: the 6 x 3 grid, 19 tiles
        tiles, layouts = _tiles(model.config, sizes, seed=len(sizes))
        with torch.no_grad():
            expected = torch.cat(model.image_features(torch.cat(tiles), sizes))
        got = engine.encode_images(tiles, layouts)
        assert got.shape == expected.shape
        assert rel_err(got, expected) < 1e-5, rel_err(got, expected)


def test_encode_images_splits_calls_at_max_tiles(vl):
    """Images whose tiles exceed max_tiles together go through several calls; the result is the same."""
    model, engine, _, _ = vl
    sizes = [(96, 48), (48, 96), (20, 45)]  # 19 + 19 + 7 tiles: three calls of <= 19
    tiles, layouts = _tiles(model.config, sizes, seed=3)
    assert sum(t.shape[0] for t in tiles) > engine.vision["max_tiles"]
    calls = []
    vision = engine.programs["vision"]
    engine.programs["vision"] = lambda p, i: (calls.append(p.shape[0]), vision(p, i))[1]
    try:
        got = engine.encode_images(tiles, layouts)
    finally:
        engine.programs["vision"] = vision
    assert calls == [19, 19, 7]
    with torch.no_grad():
        expected = torch.cat(model.image_features(torch.cat(tiles), sizes))
    assert rel_err(got, expected) < 1e-5


def test_prefill_chunks_and_decode_match_eager_logits(vl):
    """Engine prefill chunk by chunk (images cut by chunk boundaries) and decode steps against the eager model's
    logits at the same positions: max |dlogit|, KL, top-1 at every chunk end and step."""
    model, engine, _, _ = vl
    tiles, layouts = _tiles(model.config, SIZES[:2], seed=5)
    row = _prompts(model.config, layouts)[0]
    ids = torch.tensor([row])
    with torch.no_grad():
        ref = model(ids, torch.cat(tiles), SIZES[:2])[0]  # [T, V]
    features = engine.encode_images(tiles, layouts)
    source = torch.full((len(row),), -1, dtype=torch.long)
    is_image = ids[0] == IMAGE_TOKEN
    source[is_image] = torch.arange(int(is_image.sum()))
    engine.reset(1)
    ours, theirs = [], []
    chunks = chunk_plan(len(row), MAX_INPUT_LEN)
    for c0, c1 in chunks:
        embeds = features[source[c0:c1].clamp(min=0)][None]
        ours.append(engine.prefill(ids[:, c0:c1], torch.tensor([c0]), [c0], embeds)[0])
        theirs.append(ref[c1 - 1])
    assert len(ours) > 5 and any(source[c0] >= 0 and source[c0 - 1] >= 0 for c0, _ in chunks[1:])  # images cut
    state = model.new_state(1, MAX_SEQ_LEN, page_size=16)
    with torch.no_grad():
        logits, state = model.prefill(ids, state, torch.cat(tiles), SIZES[:2])
    token = logits[0, -1].argmax()
    for step in range(4):
        pos = len(row) + step
        ours.append(engine.decode(token.view(1, 1), torch.tensor([pos]), [pos])[0])
        with torch.no_grad():
            logits, state = model.decode(token.view(1, 1), torch.tensor([pos]), state)
        theirs.append(logits[0, -1])
        token = logits[0, -1].argmax()
    report = logit_report(torch.stack(ours), torch.stack(theirs))
    print(report)
    assert report["max_abs"] < 1e-4 and report["rel"] < 1e-5 and report["kl_max"] < 1e-9, report
    assert report["top1"] == 1.0, report


def _eager_greedy(model, row, tiles, sizes, n):
    state = model.new_state(1, MAX_SEQ_LEN, page_size=16)
    with torch.no_grad():
        logits, state = model.prefill(torch.tensor([row]), state, torch.cat(tiles) if tiles else None,
                                      sizes or None)
        out = [int(logits[0, -1].argmax())]
        for i in range(n - 1):
            logits, state = model.decode(torch.tensor([[out[-1]]]), torch.tensor([len(row) + i]), state)
            out.append(int(logits[0, -1].argmax()))
    return out


def test_generate_with_images_equals_eager_token_for_token(vl):
    """A ragged batch of two prompts holding 2 and 2 images of different sizes (left pads, chunks cutting
    images), greedy through the AOTInductor engine == the eager model row by row, token for token."""
    model, engine, _, _ = vl
    tiles, layouts = _tiles(model.config, SIZES, seed=7)
    rows = _prompts(model.config, layouts, seed=7)
    images = [[(tiles[0], SIZES[0]), (tiles[1], SIZES[1])], [(tiles[2], SIZES[2]), (tiles[3], SIZES[3])]]
    n = 8
    out = engine.generate(rows, max_new_tokens=n, images=images)
    assert engine.stats.images == 4 and engine.stats.image_tiles == sum(t.shape[0] for t in tiles)
    expected = [_eager_greedy(model, rows[0], tiles[:2], SIZES[:2], n),
                _eager_greedy(model, rows[1], tiles[2:], SIZES[2:], n)]
    assert out[:, -n:].tolist() == expected
    # the images matter: other pixels give other tokens
    other = [[(t + 1.0, s) for t, s in row] for row in images]
    assert engine.generate(rows, max_new_tokens=n, images=other)[:, -n:].tolist() != expected


def test_text_prompt_on_a_vl_engine_equals_the_text_model(vl):
    model, engine, _, _ = vl
    row = [3, 9, 27, 81, 2, 6, 18, 54]
    out = engine.generate([row], max_new_tokens=6)
    assert out[0, -6:].tolist() == _eager_greedy(model, row, [], [], 6)


# ------------------------------------------------------------------------------------------- refusals
@pytest.fixture(scope="module")
def eager(vl):
    model = vl[0]
    return Engine.from_model(model, max_batch=2, max_input_len=MAX_INPUT_LEN, max_seq_len=MAX_SEQ_LEN, page_size=16)


def test_eager_engine_is_the_same_interface(vl, eager):
    model, engine, _, _ = vl
    tiles, layouts = _tiles(model.config, SIZES, seed=9)
    rows = _prompts(model.config, layouts, seed=9)
    images = [[(tiles[0], SIZES[0]), (tiles[1], SIZES[1])], [(tiles[2], SIZES[2]), (tiles[3], SIZES[3])]]
    assert torch.equal(eager.generate(rows, max_new_tokens=5, images=images),
                       engine.generate(rows, max_new_tokens=5, images=images))


@pytest.mark.parametrize("case, match", [
    ("no images", r"prompt 0 holds \d+ image tokens \(id 130\) but no images"),
    ("one image short", r"prompt 0: \d+ image tokens beyond the 1 images"),
    ("wrong tile count", r"prompt 0, image 0: a 20x45 image takes 7 tiles .* holds 6"),
    ("bad tile shape", r"prompt 0, image 0: pixel_values must be a float tensor \[tiles, 3, 16, 16\]"),
    ("nan pixels", r"prompt 0, image 1: pixel_values hold NaN"),
    ("greyscale image", r"prompt 0, image 0: image 0: PIL image of mode 'L', expected 'RGB'"),
    ("lists per prompt", r"images: 1 lists for 2 prompts"),
])
def test_bad_images_are_refused_by_name(vl, eager, case, match):
    model = vl[0]
    tiles, layouts = _tiles(model.config, SIZES[:2], seed=1)
    row = _prompts(model.config, layouts)[0]
    rows, images = [row], [(tiles[0], SIZES[0]), (tiles[1], SIZES[1])]
    if case == "no images":
        images = None
    elif case == "one image short":
        images = images[:1]
    elif case == "wrong tile count":
        images[0] = (tiles[0][:-1], SIZES[0])
    elif case == "bad tile shape":
        images[0] = (tiles[0][:, :, :8], SIZES[0])
    elif case == "nan pixels":
        images[1] = (tiles[1].clone().fill_(float("nan")), SIZES[1])
    elif case == "greyscale image":
        from PIL import Image

        images[0] = Image.new("L", (45, 20))
    elif case == "lists per prompt":
        rows, images = [row, [1, 2, 3]], [images]
    with pytest.raises(RequestError, match=match):
        eager.generate(rows, max_new_tokens=2, images=images)
    eager.generate([[1, 2, 3]], max_new_tokens=2)  # still usable


def test_text_engine_refuses_images(tmp_path):
    from model import MiniMaxConfig, MiniMaxForCausalLM

    model = MiniMaxForCausalLM(MiniMaxConfig.preset("tiny")).init_random_weights()
    engine = Engine.from_model(model, max_batch=1, max_input_len=8, max_seq_len=32)
    with pytest.raises(RequestError, match="text engine: it takes no images"):
        engine.generate([[1, 2, 3]], max_new_tokens=1, images=[[(torch.zeros(1, 3, 16, 16), (16, 16))]])


def test_vl_builds_refuse_what_they_cannot_build(vl, tmp_path):
    _, _, ckpt, _ = vl
    common = ["--checkpoint", str(ckpt), "--device", "cpu", "--max-seq-len", "64"]
    assert build.main([*common, "--out", str(tmp_path / "a"), "--backend", "tensorrt"]) == 2  # no TensorRT here
    assert build.main([*common, "--out", str(tmp_path / "b"), "--max-tiles", "18"]) == 2  # < 19
    assert build.main([*common, "--out", str(tmp_path / "c"), "--max-input-len", "2"]) == 2  # chunks of >= 3
    assert build.main(["--preset", "tiny", "--out", str(tmp_path / "d"), "--max-tiles", "4"]) == 2  # text model
    assert not any(tmp_path.iterdir())


def test_a_vision_entry_that_disagrees_is_refused(vl, tmp_path):
    """``vision.config`` must hold the manifest's text config, and ``vision.max_tiles`` the profiles' (checked by
    the manifest validator, before the contract)."""
    import shutil

    from export.engine_folder import _validate

    folder = vl[3]
    manifest = json.loads((folder / "manifest.json").read_text())
    bad = json.loads(json.dumps(manifest))
    bad["vision"]["max_tiles"] = 40
    with pytest.raises(EngineFolderError, match="vision.max_tiles 40 is not profiles.max_tiles 19"):
        _validate(folder / "manifest.json", bad)
    bad = json.loads(json.dumps(manifest))
    bad["vision"]["config"]["text_config"]["vocab_size"] = 200
    with pytest.raises(EngineFolderError, match="text_config is not the manifest's model_config"):
        _validate(folder / "manifest.json", bad)
    copy = tmp_path / "engine"
    shutil.copytree(folder, copy)
    edited = json.loads((copy / "manifest.json").read_text())
    del edited["programs"]["vision"]
    (copy / "manifest.json").write_text(json.dumps(edited))
    with pytest.raises(EngineFolderError, match="no 'vision' program"):
        Engine.load(copy)


# ------------------------------------------------------------------------------------------- ONNX, TensorRT
ONNX_SETTINGS = dict(backend="onnx", device="cpu", dtype="float32", max_batch=2, max_input_len=MAX_INPUT_LEN,
                     max_seq_len=MAX_SEQ_LEN, page_size=16, max_tiles=19)


@pytest.fixture(scope="module")
def vl_onnx(vl, tmp_path_factory):
    """The same checkpoint through ``build.py --backend onnx``: (folder, manifest)."""
    pytest.importorskip("onnx", reason="the ONNX lowering needs onnx")
    pytest.importorskip("onnxscript", reason="the ONNX lowering needs onnxscript")
    out = tmp_path_factory.mktemp("vl_onnx") / "engine"
    assert build.main(["--checkpoint", str(vl[2]), "--out", str(out), "--backend", "onnx", "--device", "cpu",
                       "--dtype", "fp32", "--max-batch", "2", "--max-input-len", str(MAX_INPUT_LEN),
                       "--max-seq-len", str(MAX_SEQ_LEN), "--page-size", "16"]) == 0
    return out, read_manifest(out)


def test_onnx_vision_graph_equals_eager(vl, vl_onnx):
    """vision.onnx (standard ops only: TensorRT parses it without a plugin), evaluated by onnx.reference and by
    onnxruntime, against the eager packed features; its dims are the contract's N and L."""
    import onnx
    import onnxruntime

    from export.onnx_reference import reference_evaluator

    model = vl[0]
    folder, manifest = vl_onnx
    graph = onnx.load(folder / "vision.onnx")
    assert {n.domain for n in graph.graph.node} <= {""}
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input]
    assert dims == [["N", 3, 16, 16], ["L"]]
    tiles, layouts = _tiles(model.config, SIZES, seed=11)
    feeds = {"pixel_values": torch.cat(tiles).numpy(), "feature_index": packing_index(layouts, 4).numpy()}
    with torch.no_grad():
        expected = torch.cat(model.image_features(torch.cat(tiles), SIZES))
    for run in (reference_evaluator(folder / "vision.onnx").run,
                onnxruntime.InferenceSession(str(folder / "vision.onnx")).run):
        got = torch.from_numpy(run(None, feeds)[0])
        assert rel_err(got, expected) < 1e-5


@torch.no_grad()
def test_onnx_vl_prefill_and_decode_equal_eager(vl, vl_onnx):
    """prefill.onnx takes image_embeds after the state; with decode.onnx over a scattered paged state it gives the
    eager VL programs' logits and states (onnx.reference with the reference kernels)."""
    from export import BuildSettings
    from export.exporting import VLDecodeProgram, VLPrefillProgram
    from export.onnx_reference import OnnxReferenceProgram
    from runtime.backends import InPlaceProgram
    from tests.test_export import paged_state

    model = vl[0]
    folder, manifest = vl_onnx
    assert [e["name"] for e in manifest["programs"]["prefill"]["inputs"]][-1] == "image_embeds"
    tiles, layouts = _tiles(model.config, [(16, 16)], seed=13)  # one tile: 16 + 4 x 5 = 36 vectors
    features = torch.cat(model.image_features(torch.cat(tiles), [(16, 16)]))
    image = [IMAGE_TOKEN] * layouts[0].num_tokens
    ids = torch.tensor([[7, 8, *image, 9, 10], [11, *image, 12, 13, 14]])
    embeds = torch.zeros(2, ids.shape[1], features.shape[1])
    for b in range(2):
        embeds[b, ids[b] == IMAGE_TOKEN] = features
    settings = BuildSettings(**ONNX_SETTINGS)
    results = []
    for prefill, decode in ((OnnxReferenceProgram(folder / "prefill.onnx"), OnnxReferenceProgram(folder / "decode.onnx")),
                            (InPlaceProgram(VLPrefillProgram(model)), InPlaceProgram(VLDecodeProgram(model)))):
        table, state = paged_state(model.config.text, 2, settings)
        logits, state = prefill(ids, torch.zeros(2, dtype=torch.long), table, state, embeds)
        steps = [logits]
        token = logits.argmax(-1)
        for t in range(2):
            logits, state = decode(token, torch.full((2,), ids.shape[1] + t), table, state)
            steps.append(logits)
            token = logits.argmax(-1)
        results.append((torch.cat(steps, 1), state))
    report = logit_report(results[0][0], results[1][0])
    assert report["max_abs"] < 2e-5 and report["top1"] == 1.0, report
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)


def test_tensorrt_binding_of_a_vl_folder(vl_onnx):
    """The TensorRT runtime's manifest bindings (pure; TensorRT is not installed here) read a VL folder's functional
    programs: prefill's image_embeds is an input after the state, not a state; the vision program's N and L are
    bounded by the manifest; and the build profile covers both."""
    from export import BuildSettings
    from export.tensorrt_lowering import optimization_profile
    from runtime.tensorrt import ProgramBinding, VisionBinding

    _, manifest = vl_onnx
    prefill = ProgramBinding.from_manifest(manifest, "prefill")
    assert prefill.extra == 1 and [s.name for s in prefill.state_inputs][-1] == "value_cache.1"
    assert len(prefill.state_inputs) == len(prefill.state_outputs) == 3
    assert ProgramBinding.from_manifest(manifest, "decode").extra == 0
    B, T, D = 2, 5, 48
    shapes = prefill.shapes(B, T)
    call = [torch.zeros(shapes["input_ids"], dtype=torch.long), torch.zeros(B, dtype=torch.long),
            torch.zeros(shapes["block_table"], dtype=torch.int32),
            [torch.zeros(shapes[s.name], dtype=s.dtype) for s in prefill.state_inputs]]
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match=r"0 inputs after the state given, the engine takes 1 \(image_embeds\)"):
        prefill.check_call(*call, cpu)
    with pytest.raises(ValueError, match=r"image_embeds must be \[2, 5, 48\]"):
        prefill.check_call(*call, cpu, [torch.zeros(B, T + 1, D)])
    assert prefill.check_call(*call, cpu, [torch.zeros(B, T, D)]) == (B, T)

    vision = VisionBinding.from_manifest(manifest)
    assert (vision.max_tiles, vision.max_image_tokens) == (19, manifest["vision"]["max_image_tokens"])
    assert vision.check_call(torch.zeros(7, 3, 16, 16), torch.zeros(100, dtype=torch.long), cpu)["image_features"] == (100, D)
    with pytest.raises(ValueError, match=r"20 tiles, the engine takes \[1, max_tiles=19\]"):
        vision.check_call(torch.zeros(20, 3, 16, 16), torch.zeros(100, dtype=torch.long), cpu)
    with pytest.raises(ValueError, match="pixel_values must be"):
        vision.check_call(torch.zeros(7, 3, 8, 16), torch.zeros(100, dtype=torch.long), cpu)

    settings = BuildSettings(**{**ONNX_SETTINGS, "backend": "tensorrt", "device": "cuda"})
    inputs = [(e["name"], [-1 if isinstance(d, str) else d for d in e["shape"]])
              for e in manifest["programs"]["prefill"]["inputs"]]
    profile = optimization_profile(inputs, "prefill", settings)
    assert profile["image_embeds"] == ((1, 2, D), (1, MAX_INPUT_LEN, D), (2, MAX_INPUT_LEN, D))
    inputs = [(e["name"], [-1 if isinstance(d, str) else d for d in e["shape"]])
              for e in manifest["programs"]["vision"]["inputs"]]
    profile = optimization_profile(inputs, "vision", settings, max_image_tokens=vision.max_image_tokens)
    assert profile["pixel_values"] == ((1, 3, 16, 16), (19, 3, 16, 16), (19, 3, 16, 16))
    assert profile["feature_index"] == ((2,), (vision.max_image_tokens,), (vision.max_image_tokens,))
    with pytest.raises(EngineFolderError, match="needs max_tiles >= 1 and max_image_tokens"):
        optimization_profile(inputs, "vision", settings)


def test_build_streams_a_vl_checkpoint_and_refuses_a_broken_one_by_name(vl, tmp_path, caplog):
    """build.py (AOTInductor) converts a VL checkpoint tensor by tensor into the folder's weights (the module's
    engine, equal to eager above, was built so): the weights are the VL model's names with experts as parts; a
    checkpoint missing a vision tensor is refused before any work, naming it, and nothing is written."""
    import shutil

    from tests.test_vl_model import _edit_shard

    _, _, ckpt, folder = vl
    manifest = read_manifest(folder)
    assert manifest["weights"]["stacked"], "experts are written as parts (streamed), not stacked by a loaded model"
    assert "language_model.model.inv_freq" in manifest["weights"]["tensors"]
    broken = tmp_path / "ckpt"
    shutil.copytree(ckpt, broken)
    key = "multi_modal_projector.linear_2.weight"
    _edit_shard(broken, key, lambda tensors: tensors.pop(key))
    caplog.set_level("ERROR")
    assert build.main(["--checkpoint", str(broken), "--out", str(tmp_path / "e"), "--device", "cpu"]) == 2
    assert key in caplog.text
    assert not (tmp_path / "e").exists()



def _photo(height: int, width: int, seed: int):
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_raw_images_go_through_the_processor_of_the_engine_config(vl):
    """A PIL image / uint8 array is processed with the engine's tile size and grids
    (``MiniMaxVLImageProcessor.for_config``): the same tokens as its processed pair."""
    from model import MiniMaxVLImageProcessor

    model, engine, _, _ = vl
    photos = [_photo(20, 45, 0), _photo(50, 18, 1)]
    processed = MiniMaxVLImageProcessor.for_config(model.config)(photos)
    layouts = [model.config.image_layout(h, w) for h, w in processed.image_sizes.tolist()]
    assert processed.num_image_tokens == [lay.num_tokens for lay in layouts]
    assert [t.shape[0] for t in processed.pixel_values] == [lay.num_tiles for lay in layouts]
    row = _prompts(model.config, layouts)[0]
    pairs = [(t, tuple(s)) for t, s in zip(processed.pixel_values, processed.image_sizes.tolist())]
    out = engine.generate([row], max_new_tokens=5, images=[photos])
    assert torch.equal(out, engine.generate([row], max_new_tokens=5, images=[pairs]))
    assert out[0, -5:].tolist() == _eager_greedy(model, row, processed.pixel_values,
                                                  processed.image_sizes.tolist(), 5)


def test_cli_image_flag(vl, tmp_path, capsys):
    """``python -m runtime ENGINE --image PATH``: the image's placeholders go before the prompt, the image through
    the engine's processor: the ids printed are the engine's for that prompt; a missing file, an unreadable one
    and an image given to a text prompt's engine that has no vision are refused, exit 2."""
    from PIL import Image

    from runtime.__main__ import main

    model, engine, _, folder = vl
    photo = tmp_path / "photo.png"
    Image.fromarray(_photo(20, 45, 2)).save(photo)
    assert main([str(folder), "--prompt-ids", "1,2,3", "--image", str(photo), "--max-new-tokens", "4"]) == 0
    printed = [int(t) for t in capsys.readouterr().out.strip().split(",") if t]
    placeholders = [IMAGE_TOKEN] * model.config.image_layout(20, 45).num_tokens
    eos = engine.config.eos_token_id
    with Image.open(photo) as im:
        expected = engine.generate([placeholders + [1, 2, 3]], max_new_tokens=4, images=[[im.convert("RGB")]],
                                   eos_token_id=eos)[0, -4:].tolist()
    if eos in expected:  # the CLI stops at the end-of-sequence id and does not print it
        expected = expected[:expected.index(eos)]
    assert printed == expected
    assert main([str(folder), "--prompt-ids", "1,2,3", "--image", str(tmp_path / "none.png")]) == 2
    assert "none.png: file not found" in capsys.readouterr().err
    (tmp_path / "junk.png").write_bytes(b"not an image")
    assert main([str(folder), "--prompt-ids", "1,2,3", "--image", str(tmp_path / "junk.png")]) == 2
    assert "not an image PIL can read" in capsys.readouterr().err


def test_onnx_vision_graph_with_weights_inside_equals_the_skeleton_one(vl, vl_onnx, tmp_path):
    """The vision program of a model with its weights lowers to a graph with the weights inside (what a TensorRT
    build parses) that computes what the skeleton build's graph + converted external data compute."""
    from export import BuildSettings
    from export.exporting import export_programs
    from export.onnx_lowering import lower
    from export.onnx_reference import reference_evaluator

    model = vl[0]
    folder, manifest = vl_onnx
    assert manifest["programs"]["vision"]["external_data"] == "vision.weights.onnx.data"
    ep = export_programs(model, BuildSettings(**ONNX_SETTINGS))["vision"]
    entries = lower(ep, tmp_path, "vision", BuildSettings(**ONNX_SETTINGS))
    assert "weights_layout" not in entries and (tmp_path / "vision.onnx").is_file()
    tiles, layouts = _tiles(model.config, SIZES[:2], seed=17)
    feeds = {"pixel_values": torch.cat(tiles).numpy(), "feature_index": packing_index(layouts, 4).numpy()}
    a = reference_evaluator(tmp_path / "vision.onnx").run(None, feeds)[0]
    b = reference_evaluator(folder / "vision.onnx").run(None, feeds)[0]
    assert rel_err(torch.from_numpy(a), torch.from_numpy(b)) < 1e-6


def test_vl_engine_with_int8_experts_equals_the_eager_quantized_vl_model(vl, tmp_path):
    """``build.py --checkpoint <VL> --quantize experts-int8``: the language model's experts quantized while the
    checkpoint streams (the vision tower and projector as they are), the engine generating with images exactly what
    the eager VL model with the same quantization generates."""
    from export import read_manifest

    _, _, ckpt, _ = vl
    out = tmp_path / "int8"
    assert build.main(["--checkpoint", str(ckpt), "--out", str(out), "--backend", "aoti", "--device", "cpu",
                       "--dtype", "fp32", "--max-batch", "2", "--max-input-len", str(MAX_INPUT_LEN),
                       "--max-seq-len", str(MAX_SEQ_LEN), "--page-size", "16", "--quantize", "experts-int8"]) == 0
    manifest = read_manifest(out)
    assert manifest["quantization"] == "experts-int8"
    tensors = manifest["weights"]["tensors"]
    assert tensors["language_model.model.layers.0.block_sparse_moe.experts.w1.0"]["dtype"] == "int8"
    assert any(name.startswith("vision_tower.") and t["dtype"] == "float32" for name, t in tensors.items())
    model = MiniMaxVLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)
    model.language_model.quantize_experts_("experts-int8")
    engine = Engine.load(out)
    tiles, layouts = _tiles(model.config, SIZES[:2], seed=3)
    rows = _prompts(model.config, layouts, seed=3)
    images = [[(tiles[0], SIZES[0]), (tiles[1], SIZES[1])]]
    got = engine.generate(rows, max_new_tokens=6, images=images)
    eager = Engine.from_model(model, 2, MAX_INPUT_LEN, MAX_SEQ_LEN, page_size=16)
    assert torch.equal(got, eager.generate(rows, max_new_tokens=6, images=images))
