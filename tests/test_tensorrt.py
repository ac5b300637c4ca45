"""TensorRT backend: the engine-build decisions, the torch-tensorrt wiring, the runtime binding and the polygraphy
parity tooling are tested here without TensorRT; the tests marked ``tensorrt`` build and run a tiny engine and are
skipped where TensorRT is not importable (as on every machine of this project so far)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("polygraphy", reason="polygraphy (a dev dependency: pip install -e .[dev]) is not installed")

import build  # noqa: E402
from export import BuildSettings, EngineFolderError, export_programs
from export import tensorrt_lowering as trl
from export import torch_tensorrt_lowering as ttl
from export import trt_parity
from export.engine_folder import program_io, staged_folder, symbolic_state_layout
from export.exporting import DecodeProgram, PrefillProgram
from model import MiniMaxConfig, MiniMaxForCausalLM, MiniMaxState
from runtime import tensorrt as rt
from tests.utils import logit_report, rel_err

TRT_SKIP = "TensorRT is not installed (pip install .[tensorrt] from NVIDIA's index; see docs/tensorrt.md)"
SETTINGS = BuildSettings(backend="tensorrt", device="cuda", dtype="float32", max_batch=4, max_input_len=24,
                         max_seq_len=40, page_size=8)
CPU_SETTINGS = BuildSettings(backend="aoti", device="cpu", dtype="float32", max_batch=4, max_input_len=24,
                             max_seq_len=40, page_size=8)


@pytest.fixture(scope="module")
def tiny():
    return MiniMaxForCausalLM(MiniMaxConfig.preset("tiny")).init_random_weights(seed=2, std=0.1).eval()


@pytest.fixture(scope="module")
def manifest(tiny):
    """A manifest as ``build_engine`` writes it for SETTINGS (the parts the runtime and parity tools read)."""
    cfg = tiny.config.to_dict()
    layout = symbolic_state_layout(tiny.config, SETTINGS)
    return {"backend": "tensorrt", "model_config": cfg, "state_layout": layout,
            "profiles": {"max_batch": 4, "max_input_len": 24, "max_seq_len": 40}, "paged_kv": SETTINGS.paged_layout(),
            "programs": {p: program_io(cfg, layout, p, SETTINGS.paged_layout(), in_place=False)
                         for p in ("prefill", "decode")}}


@pytest.fixture(scope="module")
def programs(tiny):
    return export_programs(tiny, CPU_SETTINGS)


# ------------------------------------------------------------------------------------------ engine build decisions
def _contract_inputs(manifest, program):
    return [(t["name"], t["shape"]) for t in manifest["programs"][program]["inputs"]]


def test_profiles_cover_the_contract_ranges(manifest, tiny):
    prefill = trl.optimization_profile(_contract_inputs(manifest, "prefill"), "prefill", SETTINGS)
    decode = trl.optimization_profile(_contract_inputs(manifest, "decode"), "decode", SETTINGS)
    names = [t["name"] for t in manifest["programs"]["prefill"]["inputs"]]
    assert list(prefill) == names and list(decode) == names
    assert prefill["input_ids"] == ((1, 2), (1, 24), (4, 24))
    assert prefill["positions"] == ((1,), (1,), (4,))
    assert prefill["block_table"] == ((1, 5), (1, 5), (4, 5))
    assert decode["input_ids"] == ((1, 1), (1, 1), (4, 1))
    for entry in tiny.config.state_layout(4, 40, page_size=8):
        shape = tuple(entry["shape"])
        for profile in (prefill, decode):
            if entry["name"].startswith("lightning"):  # per row: the batch range
                assert profile[entry["name"]] == ((1, *shape[1:]), (1, *shape[1:]), (4, *shape[1:]))
            else:  # a KV page pool: every dim fixed
                assert profile[entry["name"]] == (shape, shape, shape) and shape[0] == 20
    custom = trl.optimization_profile(_contract_inputs(manifest, "prefill"), "prefill", SETTINGS, opt_batch=3,
                                      opt_input_len=7)
    assert custom["input_ids"][1] == (3, 7)


@pytest.mark.parametrize(
    "program, inputs, message",
    [
        ("prefill", [("input_ids", (4, -1))], "static B = 4"),
        ("prefill", [("input_ids", (-1, 24))], "static T = 24"),
        ("decode", [("input_ids", (-1, 2))], "static T = 2"),
        ("decode", [("key_cache.3", (20, 2, -1, 16))], "dynamic dim 2"),
        ("decode", [("value_cache.3", (-1, 2, 8, 16))], "dynamic dim 0"),
        ("decode", [("positions", ())], "scalar"),
        ("verify", [("input_ids", (-1, 1))], "not 'prefill' or 'decode'"),
    ],
)
def test_profile_refuses_shapes_outside_the_contract(program, inputs, message):
    with pytest.raises(EngineFolderError, match=message):
        trl.optimization_profile(inputs, program, SETTINGS)


def test_profile_refuses_opt_outside_range(manifest):
    with pytest.raises(EngineFolderError, match="opt batch 5"):
        trl.optimization_profile(_contract_inputs(manifest, "decode"), "decode", SETTINGS, opt_batch=5)
    with pytest.raises(EngineFolderError, match="opt input length 1"):
        trl.optimization_profile(_contract_inputs(manifest, "prefill"), "prefill", SETTINGS, opt_input_len=1)


def test_profile_of_the_onnx_graphs(programs, tmp_path, manifest):
    """The ONNX lowering's graph inputs (what the TensorRT parser sees) get the contract's profile."""
    onnx = pytest.importorskip("onnx")
    from export import onnx_lowering

    for name in ("prefill", "decode"):
        entries = onnx_lowering.lower(programs[name], tmp_path, name, SETTINGS)
        graph = onnx.load(str(tmp_path / entries["file"]), load_external_data=False).graph
        inputs = [(i.name, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]) for i in graph.input]
        profile = trl.optimization_profile(inputs, name, SETTINGS)
        assert profile == trl.optimization_profile(_contract_inputs(manifest, name), name, SETTINGS)


def test_parser_flags_only_override_on_name_clashes():
    from plugins.collectives import COLLECTIVES
    from plugins.spec import PLUGINS

    assert trl.registered_plugin_names() == sorted([*PLUGINS, *COLLECTIVES])
    assert trl.parser_flags(trl.registered_plugin_names()) == []  # our names are not ONNX operators
    assert trl.parser_flags(["moe_route", "RMSNormalization"]) == ["ENABLE_PLUGIN_OVERRIDE"]


@pytest.mark.parametrize(
    "total, weights, expected",
    [(80 << 30, 1 << 30, 8 << 30), (80 << 30, 38 << 30, 2 << 30), (16 << 30, 9 << 30, 256 << 20), (1 << 30, 0, 512 << 20)],
)
def test_workspace_limit(total, weights, expected):
    assert trl.workspace_limit(total, weights) == expected


def test_build_plan(monkeypatch):
    plan = trl.plan_build("prefill", SETTINGS, ["moe_route"], 80 << 30, 1 << 20)
    assert plan.network_flags == ("STRONGLY_TYPED", "PREFER_AOT_PYTHON_PLUGINS")
    assert not plan.tf32 and plan.parser_flags == () and plan.workspace_bytes == 8 << 30
    # weight-stripped by default: the plan holds no weights, they are refit at load from the folder's ONNX data
    assert plan.builder_flags == ("STRIP_PLAN", "REFIT_IDENTICAL") and plan.weights_stripped
    baked = trl.plan_build("prefill", SETTINGS, ["moe_route"], 80 << 30, 1 << 20, strip_weights=False)
    assert baked.builder_flags == () and not baked.weights_stripped
    bf16 = BuildSettings(**{**SETTINGS.__dict__, "dtype": "bfloat16"})
    assert trl.plan_build("decode", bf16, ["moe_route"], 80 << 30, 0).tf32
    with pytest.raises(EngineFolderError, match="GPU engines"):
        trl.plan_build("decode", BuildSettings(**{**SETTINGS.__dict__, "device": "cpu"}), [], 1 << 30, 0)


def test_stripped_plan_without_its_onnx_weights_is_refused_by_name(tmp_path):
    from runtime.tensorrt import refit_stripped_engine

    with pytest.raises(EngineFolderError, match=r"prefill.plan: weight-stripped plan, but prefill.onnx \(its weights\) "
                                                r"is missing"):
        refit_stripped_engine(None, None, tmp_path / "prefill.plan", tmp_path / "prefill.onnx")


def test_timing_cache_is_found_in_the_build_and_in_the_folder_it_replaces(tmp_path):
    dest = tmp_path / "engine"
    dest.mkdir()
    (dest / "manifest.json").write_text('{"format_version": 1, "backend": "tensorrt"}')  # an engine folder
    (dest / trl.TIMING_CACHE_NAME).write_bytes(b"old timings")
    with staged_folder(dest, overwrite=True) as staging:
        sources = trl.timing_cache_sources(staging)
        assert sources == [staging / "timing.cache", dest / "timing.cache"]
        assert [s.read_bytes() for s in sources if s.is_file()] == [b"old timings"]
        (staging / "timing.cache").write_bytes(b"new")
        assert [s for s in trl.timing_cache_sources(staging) if s.is_file()][0] == staging / "timing.cache"
    assert trl.timing_cache_sources(dest) == [dest / "timing.cache"]


def test_tensorrt_version_gate():
    trl.check_tensorrt_version("10.15.1.29")
    with pytest.raises(EngineFolderError, match="10.8.0 is too old"):
        trl.check_tensorrt_version("10.8.0")


@pytest.mark.skipif(__import__("importlib").util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_tensorrt_backend_refused_clearly_without_tensorrt(tmp_path, caplog):
    with pytest.raises(EngineFolderError, match="TensorRT is not installed.*docs/tensorrt.md"):
        trl.check_available(SETTINGS)
    with pytest.raises(EngineFolderError, match="builds GPU engines"):
        trl.check_available(BuildSettings(**{**SETTINGS.__dict__, "device": "cpu"}))
    assert build.main(["--preset", "tiny", "--out", str(tmp_path / "e"), "--backend", "tensorrt",
                       "--device", "cpu"]) == 2
    assert "builds GPU engines" in caplog.text and not (tmp_path / "e").exists()
    with pytest.raises(EngineFolderError, match="torch_tensorrt is not installed|tensorrt is not installed"):
        ttl.check_available(SETTINGS)


# ------------------------------------------------------------------------------------------ torch-tensorrt wiring
def _reference_emitter(calls):
    """``emit`` running the reference stage of each plugin (``kernels/moe/stages.py``, lightning ``naive.py``)."""
    from kernels.lightning_attention import naive as lightning
    from kernels.moe import stages

    def emit(plugin, inputs, attrs):
        calls.append((plugin, dict(attrs)))
        if plugin == "lightning_prefill":
            return lightning.lightning_attention_blockwise(*inputs, block_size=5)
        if plugin == "lightning_decode":
            return lightning.lightning_attention_decode_step(*inputs)
        out = getattr(stages, plugin)(*inputs, **attrs)
        return out if isinstance(out, tuple) else (out,)

    return ttl.checked_emitter(emit)


@pytest.mark.parametrize("path, block_m", [("grouped", 4), ("grouped", 1), ("decode", None)])
def test_moe_chain_wiring_equals_the_moe_op(path, block_m):
    from kernels.moe import naive

    g = torch.Generator().manual_seed(3)
    T, hidden, E, inter, top_k = 7, 24, 5, 12, 2
    x = torch.randn(T, hidden, generator=g)
    router, w1, w3 = torch.randn(E, hidden, generator=g), torch.randn(E, inter, hidden, generator=g) / 4, \
        torch.randn(E, inter, hidden, generator=g) / 4
    w2 = torch.randn(E, hidden, inter, generator=g) / 4
    calls = []
    y = ttl.moe_chain(_reference_emitter(calls), x, router, w1, w3, w2, top_k=top_k, num_experts=E,
                      plan={"path": path, "block_m": block_m})
    assert rel_err(y, naive.moe_forward(x, router, w1, w3, w2, top_k)) < 1e-6
    expected = (["moe_route", "moe_swiglu_decode", "moe_down_combine_decode"] if path == "decode" else
                ["moe_route", "moe_align", "moe_swiglu_grouped", "moe_down_grouped", "moe_combine"])
    assert [c[0] for c in calls] == expected
    if path == "grouped":
        assert calls[1][1] == {"num_experts": E, "block_m": block_m}
        assert calls[2][1] == {"top_k": top_k, "block_m": block_m}


def test_moe_chain_follows_the_onnx_plan():
    from export.onnx_lowering import moe_plan

    decode, prefill = moe_plan(SETTINGS, "decode", 2, 8), moe_plan(SETTINGS, "prefill", 2, 8)
    assert decode["path"] == "decode" and prefill["path"] == "grouped" and prefill["block_m"] >= 1


@pytest.mark.parametrize("op, T", [("lightning_prefill", 9), ("lightning_decode", 1)])
def test_lightning_wiring_equals_the_op(op, T):
    g = torch.Generator().manual_seed(4)
    B, H, D = 2, 3, 8
    q, k, v = (torch.randn(B, T, H, D, generator=g) for _ in range(3))
    s = torch.rand(H, generator=g)
    state = torch.randn(B, H, D, D, generator=g)
    o, new = ttl.lightning_call(_reference_emitter([]), op, q, k, v, s, state)
    ref_o, ref_state = getattr(torch.ops.minimax, op)(q, k, v, s, state)
    assert rel_err(o, ref_o) < 1e-5 and rel_err(new, ref_state) < 1e-5


def test_checked_emitter_enforces_the_contract():
    emit = ttl.checked_emitter(lambda plugin, inputs, attrs: (None,))
    with pytest.raises(ValueError, match="unknown plugin"):
        emit("moe_sort", [1], {})
    with pytest.raises(ValueError, match="moe_align: takes inputs"):
        emit("moe_align", [1], {"num_experts": 4})
    with pytest.raises(ValueError, match="gave 1 outputs"):
        emit("moe_route", [1, 2], {"top_k": 2})
    with pytest.raises(ValueError, match=r"paged_decode_split: takes inputs .* attributes \('split', 'scale'\)"):
        emit("paged_decode_split", [1, 2, 3, 4, 5], {"split": 256})


def test_paged_attention_wiring_equals_the_ops():
    """paged_kv_call / paged_attention_call with the reference plugins (the ONNX evaluator's) equal the model's
    ops: the write, the prefill, and decode as split -> merge with the GPU kernel's split."""
    from export.onnx_reference import _paged_kv_write
    from kernels.attention import naive

    g = torch.Generator().manual_seed(5)
    B, KVH, H, D, page, M = 2, 2, 4, 16, 8, 40  # capacity 320: decode split 256, two splits
    keys = torch.randn(B, KVH, 300, D, generator=g)
    k_cache, v_cache, table = naive.contiguous_to_paged(keys, torch.randn_like(keys), page, generator=g)
    k_cache, v_cache = (torch.cat([c, torch.zeros(B * M - c.shape[0], *c.shape[1:])]) for c in (k_cache, v_cache))
    table = torch.cat([table, torch.arange(table.shape[1] * B, B * M, dtype=torch.int32).view(B, -1)], 1)
    impl = {"paged_kv_write": _paged_kv_write, "paged_attention_prefill": naive.paged_attention,
            "paged_decode_split": naive.paged_decode_partials, "paged_decode_merge": naive.paged_decode_merge}
    calls = []

    def emit(plugin, inputs, attrs):
        calls.append((plugin, dict(attrs)))
        out = impl[plugin](*inputs, **attrs)
        return out if isinstance(out, tuple) else (out,)

    emit = ttl.checked_emitter(emit)
    k, v = torch.randn(B, 3, KVH, D, generator=g), torch.randn(B, 3, KVH, D, generator=g)
    positions = torch.tensor([297, 5])
    k_new, v_new = ttl.paged_kv_call(emit, k_cache, v_cache, k, v, table, positions)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    torch.ops.minimax.paged_kv_write(ref_k, ref_v, k, v, table, positions)
    assert torch.equal(k_new, ref_k) and torch.equal(v_new, ref_v)
    q = torch.randn(B, 3, H, D, generator=g)
    o = ttl.paged_attention_call(emit, "paged_attention_prefill", q, k_new, v_new, table, positions, 0.25,
                                 capacity=M * page, head_dim=D)
    assert rel_err(o, torch.ops.minimax.paged_attention_prefill(q, k_new, v_new, table, positions, 0.25)) < 1e-6
    q1, pos1 = q[:, :1].contiguous(), positions + 2
    o = ttl.paged_attention_call(emit, "paged_attention_decode", q1, k_new, v_new, table, pos1, 0.25,
                                 capacity=M * page, head_dim=D)
    assert rel_err(o, torch.ops.minimax.paged_attention_decode(q1, k_new, v_new, table, pos1, 0.25)) < 1e-6
    assert [c[0] for c in calls] == ["paged_kv_write", "paged_attention_prefill", "paged_decode_split",
                                     "paged_decode_merge"]
    assert calls[2][1] == {"split": 256, "scale": 0.25}


def test_torch_tensorrt_inputs_of_the_exported_programs(programs, manifest):
    for name in ("prefill", "decode"):
        inputs = ttl.program_inputs(programs[name], name, SETTINGS)
        assert [n for n, _ in inputs] == [t["name"] for t in manifest["programs"][name]["inputs"]]
        profile = dict(inputs)
        assert profile["positions"] == ((1,), (2,), (4,))  # opt 2: opt == min breaks torch-tensorrt (#4103)
        assert profile["block_table"] == ((1, 5), (2, 5), (4, 5))
        assert profile["input_ids"] == (((1, 2), (2, 24), (4, 24)) if name == "prefill" else ((1, 1), (2, 1), (4, 1)))


# ------------------------------------------------------------------------------------------ runtime binding
def test_dtype_table():
    class FakeDataType:  # what trt.DataType members look like to the table: a .name
        def __init__(self, name):
            self.name = name

    assert rt.torch_dtype(FakeDataType("BF16")) is torch.bfloat16 and rt.torch_dtype("INT64") is torch.int64
    assert rt.torch_dtype("DataType.FLOAT") is torch.float32
    with pytest.raises(EngineFolderError, match="INT4 has no torch equivalent"):
        rt.torch_dtype("INT4")
    assert set(rt.MANIFEST_DTYPES.values()) <= set(rt.TRT_TO_TORCH.values())


def test_binding_from_manifest(manifest, tiny):
    b = rt.ProgramBinding.from_manifest(manifest, "prefill")
    shapes = b.shapes(3, 7)
    assert shapes["input_ids"] == (3, 7) and shapes["logits"] == (3, 1, tiny.config.vocab_size)
    for entry in tiny.config.state_layout(3, 40, page_size=8, num_pages=20):
        assert shapes[entry["name"]] == shapes[entry["name"] + ".out"] == tuple(entry["shape"])
    assert shapes["block_table"] == (3, 5)
    assert [s.name + ".out" for s in b.state_inputs] == [s.name for s in b.state_outputs]
    broken = json.loads(json.dumps(manifest))
    broken["programs"]["decode"]["outputs"].pop()
    with pytest.raises(EngineFolderError, match="state inputs but"):
        rt.ProgramBinding.from_manifest(broken, "decode")


def _engine_io(binding):
    return [rt.EngineTensor(t.name, True, t.dtype) for t in binding.inputs] + \
        [rt.EngineTensor(t.name, False, t.dtype) for t in binding.outputs]


def test_engine_io_is_checked_against_the_manifest(manifest):
    b = rt.ProgramBinding.from_manifest(manifest, "decode")
    good = _engine_io(b)
    b.check_engine(good, "decode.plan")
    with pytest.raises(EngineFolderError, match=r"missing \['logits'\]"):
        b.check_engine([t for t in good if t.name != "logits"], "decode.plan")
    wrong = [rt.EngineTensor(t.name, t.is_input, torch.float16 if t.name == "logits" else t.dtype) for t in good]
    with pytest.raises(EngineFolderError, match="'logits' is an engine output of torch.float16"):
        b.check_engine(wrong, "decode.plan")
    flipped = [rt.EngineTensor(t.name, not t.is_input if t.name == "positions" else t.is_input, t.dtype) for t in good]
    with pytest.raises(EngineFolderError, match="'positions' is an engine output"):
        b.check_engine(flipped, "decode.plan")


def test_call_inputs_are_checked(manifest, tiny):
    from tests.test_export import paged_state

    b = rt.ProgramBinding.from_manifest(manifest, "prefill")
    table, state = paged_state(tiny.config, 2, SETTINGS)
    ids, pos = torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, dtype=torch.long)
    assert b.check_call(ids, pos, table, state, torch.device("cpu")) == (2, 5)
    cases = [
        ((torch.zeros(5, 5, dtype=torch.long), torch.zeros(5, dtype=torch.long), table, state), "batch 5 is outside"),
        ((torch.zeros(2, 25, dtype=torch.long), pos, table, state), "length 25 is outside"),
        ((torch.zeros(2, 1, dtype=torch.long), pos, table, state), "length 1 is outside"),
        ((ids.int(), pos, table, state), "input_ids must be"),
        ((ids, pos, table, state[:-1]), "state tensors given"),
        ((ids, pos, table, [*state[:-1], state[-1][:1]]), "value_cache.7 must be"),
        ((ids, pos.int(), table, state), "positions must be"),
        ((ids, pos, table.long(), state), "block_table must be"),
        ((ids, pos, table[:, :4], state), r"block_table must be \[2, 5\]"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            b.check_call(*args, torch.device("cpu"))
    with pytest.raises(ValueError, match="engine runs on meta"):
        b.check_call(ids, pos, table, state, torch.device("meta"))
    decode = rt.ProgramBinding.from_manifest(manifest, "decode")
    with pytest.raises(ValueError, match=r"must be \[B, 1\]"):
        decode.check_call(ids, pos, table, state, torch.device("cpu"))


def test_bindable_and_pingpong():
    base = torch.arange(256.0)
    first = next(i for i in range(64) if (base.data_ptr() + 4 * i) % rt.ADDRESS_ALIGNMENT == 0)
    t = base[first:first + 64].view(8, 8)  # contiguous and 256-byte aligned: bound in place
    assert rt.bindable(t) is t
    view = rt.bindable(t.t())
    assert view.is_contiguous() and torch.equal(view, t.t())
    offset = t.view(-1)[1:33]  # contiguous, 4 bytes past an aligned address
    copy = rt.bindable(offset)
    assert copy is not offset and copy.data_ptr() != offset.data_ptr() and torch.equal(copy, offset)
    sets = [[torch.zeros(2, 3), torch.zeros(4)], [torch.zeros(2, 3), torch.zeros(4)]]
    assert rt.pingpong_source(sets[1], sets) == 1 and rt.pingpong_source(list(sets[0]), sets) == 0
    assert rt.pingpong_source([sets[0][0], sets[1][1]], sets) is None
    assert rt.pingpong_source([sets[0][0].clone(), sets[0][1]], sets) is None


def test_runtime_refuses_a_cpu_device(tmp_path, manifest):
    with pytest.raises(EngineFolderError, match="runs on a CUDA GPU"):
        rt.load_programs(tmp_path, manifest, torch.device("cpu"))


# ------------------------------------------------------------------------------------------ polygraphy parity
def _steps_feeds(manifest, tiny, batch, prompt):
    """Prefill feeds (fresh state), and the decode feeds that follow them (eager state after the prompt)."""
    pre = trt_parity.make_feeds(manifest, "prefill", batch, prompt, seed=batch)
    state = [t.clone() for t in list(pre.values())[3:]]
    with torch.no_grad():
        PrefillProgram(tiny)(pre["input_ids"], pre["positions"], pre["block_table"], state)  # in place
    dec = trt_parity.make_feeds(manifest, "decode", batch, 1, seed=7, positions=torch.full((batch,), prompt),
                                state=state)
    return pre, dec


def _functional(program):
    """An in-place program (eager wrapper, an exported program's module) as ``(logits, state)``: the runtime form."""
    from runtime.backends import InPlaceProgram

    return InPlaceProgram(program)


def test_polygraphy_comparison_passes_for_equal_programs_and_fails_otherwise(programs, manifest, tiny):
    atol, rtol = trt_parity.tolerances("float32")
    feeds = [_steps_feeds(manifest, tiny, b, p) for b, p in ((1, 2), (3, 11))]
    for name, wrapper in (("prefill", PrefillProgram(tiny)), ("decode", DecodeProgram(tiny))):
        runners = [trt_parity.ProgramRunner(_functional(wrapper), manifest, name, name="eager"),
                   trt_parity.ProgramRunner(_functional(programs[name].module()), manifest, name, name="exported")]
        report = trt_parity.compare(runners, [f[name == "decode"] for f in feeds], atol, rtol)
        assert report.passed and report.top1 == 1.0 and report.max_abs["logits"] < 1e-4, report

    def drifting(ids, pos, table, state):  # one logit off by 2e-3: above the fp32 tolerance
        logits = DecodeProgram(tiny)(ids, pos, table, state)
        return logits + torch.where(torch.arange(logits.shape[-1]) == 3, 2e-3, 0.0), state

    def unwritten(ids, pos, table, state):  # an output element never written (NaN poison)
        logits = DecodeProgram(tiny)(ids, pos, table, state)
        new = list(state)
        new[0] = new[0].clone()
        new[0].view(-1)[5] = float("nan")
        return logits, new

    decode_feeds = [f[1] for f in feeds]
    for bad in (drifting, unwritten):
        runners = [trt_parity.ProgramRunner(_functional(DecodeProgram(tiny)), manifest, "decode", name="eager"),
                   trt_parity.ProgramRunner(bad, manifest, "decode", name=bad.__name__)]
        report = trt_parity.compare(runners, decode_feeds, atol, rtol)
        assert not report.passed, report


def test_polygraphy_onnx_reference_runner(programs, manifest, tiny, tmp_path):
    pytest.importorskip("onnx")
    from export import onnx_lowering

    entries = onnx_lowering.lower(programs["decode"], tmp_path, "decode", SETTINGS)
    atol, rtol = trt_parity.tolerances("float32")
    runners = [trt_parity.ProgramRunner(_functional(DecodeProgram(tiny)), manifest, "decode", name="eager"),
               trt_parity.OnnxReferenceRunner(tmp_path / entries["file"], manifest, "decode", name="onnx-reference")]
    report = trt_parity.compare(runners, [_steps_feeds(manifest, tiny, 2, 5)[1]], atol, rtol)
    assert report.passed and report.top1 == 1.0, report


def test_precomputed_results_enter_the_comparison():
    out = {"logits": torch.tensor([[[0.0, 1.0, 2.0]]])}
    same = trt_parity.results_from_outputs({"a": [out], "b": [{"logits": out["logits"].clone()}]})
    assert trt_parity.compare_results(same, {"": 1e-6}, {"": 1e-6}).passed
    off = trt_parity.results_from_outputs({"a": [out], "b": [{"logits": out["logits"] + 1e-3}]})
    report = trt_parity.compare_results(off, {"": 1e-6}, {"": 1e-6})
    assert not report.passed and abs(report.max_abs["logits"] - 1e-3) < 1e-7


# ------------------------------------------------------------------------------------------ TensorRT (gated)
@pytest.fixture(scope="module")
def trt_engine(tmp_path_factory):
    """A tiny fp32 TensorRT engine built with ``build.py --backend tensorrt --device cuda``, and the same model."""
    pytest.importorskip("tensorrt", reason=TRT_SKIP)
    if not torch.cuda.is_available():
        pytest.skip("TensorRT engines need a CUDA GPU")
    from export import read_manifest
    from export.engine_folder import weights_sha256

    out = tmp_path_factory.mktemp("trt") / "tiny"
    assert build.main(["--preset", "tiny", "--out", str(out), "--backend", "tensorrt", "--device", "cuda",
                       "--max-batch", "4", "--max-input-len", "24", "--max-seq-len", "40", "--page-size", "8"]) == 0
    manifest = read_manifest(out)
    with torch.device("cuda"):
        model = MiniMaxForCausalLM(MiniMaxConfig.preset("tiny")).init_random_weights(seed=0).eval()
    assert weights_sha256(model) == manifest["weights_sha256"]  # the eager model is the engine's model
    return out, manifest, model


def _run_steps(prefill, decode, ids, n_prompt, config):
    from tests.test_export import paged_state

    B, device = ids.shape[0], ids.device
    table, state = paged_state(config, B, SETTINGS, device)
    logits, state = prefill(ids[:, :n_prompt].contiguous(), torch.zeros(B, dtype=torch.long, device=device), table,
                            state)
    steps = [logits.clone()]
    for t in range(n_prompt, ids.shape[1]):
        logits, state = decode(ids[:, t:t + 1].contiguous(), torch.full((B,), t, dtype=torch.long, device=device),
                               table, state)
        steps.append(logits.clone())
    return torch.cat(steps, 1), [s.clone() for s in state]


@pytest.mark.tensorrt
def test_tensorrt_engine_folder(trt_engine):
    folder, manifest, _ = trt_engine
    assert manifest["backend"] == "tensorrt"
    files = set(manifest["files"])
    assert {"prefill.plan", "decode.plan", "prefill.onnx", "decode.onnx", "timing.cache"} <= files
    prefill = manifest["programs"]["prefill"]
    assert prefill["optimization_profile"]["input_ids"] == {"min": [1, 2], "opt": [1, 24], "max": [4, 24]}
    assert prefill["tensorrt"]["network_flags"][0] == "STRONGLY_TYPED" and not prefill["tensorrt"]["tf32"]
    # weight-stripped plans, refit from the ONNX graphs at load (the parity tests below run the refit engines)
    for name in ("prefill", "decode"):
        entry = manifest["programs"][name]
        assert entry["refit_from"] == f"{name}.onnx" and "STRIP_PLAN" in entry["tensorrt"]["builder_flags"]


@pytest.mark.tensorrt
@pytest.mark.parametrize("cuda_graph", [False, True])
@pytest.mark.parametrize("batch, prompt", [(1, 2), (3, 19)])
@torch.no_grad()
def test_tensorrt_engine_equals_eager_over_prefill_and_decode(trt_engine, batch, prompt, cuda_graph):
    folder, manifest, model = trt_engine
    fns = rt.load_programs(folder, manifest, torch.device("cuda"), cuda_graph=cuda_graph)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt + 6), generator=torch.Generator().manual_seed(1))
    ids = ids.cuda()
    ours = _run_steps(fns["prefill"], fns["decode"], ids, prompt, model.config)
    ref = _run_steps(_functional(PrefillProgram(model)), _functional(DecodeProgram(model)), ids, prompt, model.config)
    report = logit_report(ours[0], ref[0])
    print(f"TensorRT vs eager (cuda_graph={cuda_graph}), batch {batch}, prompt {prompt} + 6 decode steps: {report}")
    assert report["max_abs"] < 1e-3 and report["top1"] == 1.0, report
    for a, b in zip(ours[1], ref[1]):
        assert rel_err(a, b) < 1e-4


@pytest.mark.tensorrt
def test_tensorrt_engine_polygraphy_parity(trt_engine):
    folder, manifest, model = trt_engine
    atol, rtol = trt_parity.tolerances("float32")
    cpu_model = MiniMaxForCausalLM(MiniMaxConfig.preset("tiny")).init_random_weights(seed=0).eval()
    for name, wrapper in (("prefill", PrefillProgram(model)), ("decode", DecodeProgram(model))):
        feeds = [_steps_feeds(manifest, cpu_model, b, p)[name == "decode"] for b, p in ((1, 3), (4, 17))]
        feeds = [{k: v.cuda() for k, v in f.items()} for f in feeds]
        runners = [trt_parity.tensorrt_runner(Path(folder) / manifest["programs"][name]["file"]),
                   trt_parity.ProgramRunner(_functional(wrapper), manifest, name, name="eager", device="cuda")]
        report = trt_parity.compare(runners, feeds, atol, rtol)
        assert report.passed and report.top1 == 1.0, report


@pytest.mark.tensorrt
@torch.no_grad()
def test_torch_tensorrt_path_equals_eager(trt_engine):
    pytest.importorskip("torch_tensorrt", reason=TRT_SKIP)
    _, _, model = trt_engine
    eps = export_programs(model, SETTINGS)
    compiled = {n: ttl.compile_program(ep, n, SETTINGS) for n, ep in eps.items()}
    ids = torch.randint(0, model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(2)).cuda()
    ours = _run_steps(compiled["prefill"], compiled["decode"], ids, 7, model.config)
    ref = _run_steps(PrefillProgram(model), DecodeProgram(model), ids, 7, model.config)
    report = logit_report(ours[0], ref[0])
    assert report["max_abs"] < 1e-3 and report["top1"] == 1.0, report
