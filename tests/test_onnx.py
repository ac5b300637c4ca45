"""ONNX lowering (``export/onnx_lowering.py``): the graphs hold exactly the TensorRT-plugin nodes of the contract,
with contract names and dynamic dims, pass ``onnx.checker``, and evaluated on the CPU with ``onnx.reference``
(custom ops backed by the reference kernels, ``export/onnx_reference.py``) equal eager over prefill + decode.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the ONNX lowering needs onnx")
pytest.importorskip("onnxscript", reason="the ONNX lowering needs onnxscript")

from onnxscript import ir  # noqa: E402

from export import BuildSettings, EngineFolderError, build_engine, export_programs, read_manifest  # noqa: E402
from export import onnx_lowering  # noqa: E402
from export.engine_folder import program_io, symbolic_state_layout  # noqa: E402
from export.exporting import DecodeProgram, PrefillProgram  # noqa: E402
from export.onnx_reference import OnnxReferenceProgram, reference_evaluator  # noqa: E402
from runtime.backends import InPlaceProgram  # noqa: E402
from kernels.moe import stages  # noqa: E402
from model import MiniMaxConfig, MiniMaxForCausalLM, MiniMaxState  # noqa: E402
from tests.utils import logit_report  # noqa: E402

SETTINGS = BuildSettings(backend="onnx", device="cpu", dtype="float32", max_batch=4, max_input_len=24, max_seq_len=40,
                         page_size=8)
PLUGIN_ATTRS = {"plugin_namespace": "minimax", "plugin_version": "1", "aot": 1}
GROUPED = ["moe_route", "moe_align", "moe_swiglu_grouped", "moe_down_grouped", "moe_combine"]
DECODE = ["moe_route", "moe_swiglu_decode", "moe_down_combine_decode"]
ATTENTION = {"prefill": ["paged_kv_write", "paged_attention_prefill"],
             "decode": ["paged_kv_write", "paged_decode_split", "paged_decode_merge"]}


@pytest.fixture(scope="module")
def tiny():
    return MiniMaxForCausalLM(MiniMaxConfig.preset("tiny")).init_random_weights(seed=2, std=0.1).eval()


@pytest.fixture(scope="module")
def engine(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx_engines") / "tiny"
    manifest = build_engine(tiny, SETTINGS, out)
    return out, manifest


@pytest.fixture(scope="module")
def graphs(engine):
    folder, _ = engine
    return {name: ir.load(folder / f"{name}.onnx") for name in ("prefill", "decode")}


def _attrs(node) -> dict:
    return {k: a.value for k, a in node.attributes.items()}


def _plugin_nodes(model) -> list:
    return [n for n in model.graph if n.domain == "minimax"]


def _eval_dim(expr: str, **sizes) -> int:
    """Evaluate a symbolic dim such as ``ceil((B*T*2+60)/16)``."""
    assert re.fullmatch(r"[BT0-9*+()/ceil]+", expr), expr
    return int(eval(expr, {"ceil": math.ceil, **sizes}))  # noqa: S307  (checked: only B, T, digits, + * / ceil)


# ------------------------------------------------------------------------------------------------ the folder


def test_manifest_lists_the_onnx_graphs(engine):
    folder, manifest = engine
    assert read_manifest(folder)["backend"] == "onnx"
    assert set(manifest["files"]) == {"prefill.onnx", "decode.onnx", "exported/prefill.pt2", "exported/decode.pt2",
                                      "contract.json"}
    prefill, decode = manifest["programs"]["prefill"], manifest["programs"]["decode"]
    assert prefill["file"] == "prefill.onnx" and prefill["external_data"] is None
    # prefill: grouped chain, block_m of dispatch.default_config for 4 * 24 tokens (12 rows per expert -> 16)
    assert (prefill["moe_path"], prefill["moe_block_m"]) == ("grouped", 16)
    assert (decode["moe_path"], decode["moe_block_m"]) == ("decode", None)  # max_batch 4 <= 16 tokens
    assert prefill["plugin_namespace"] == "minimax" and prefill["plugin_version"] == "1" and prefill["opset"] == 18


@pytest.mark.parametrize("name", ["prefill", "decode"])
def test_checker_accepts_the_graphs_and_refuses_a_broken_plugin_node(engine, name, tmp_path):
    folder, _ = engine
    onnx_lowering.register_schemas()
    onnx.checker.check_model(str(folder / f"{name}.onnx"), full_check=True)
    proto = onnx.load(folder / f"{name}.onnx")
    node = next(n for n in proto.graph.node if n.domain == "minimax" and n.op_type == "moe_route")
    node.attribute.remove(next(a for a in node.attribute if a.name == "top_k"))
    with pytest.raises(onnx.checker.ValidationError, match="top_k"):
        onnx.checker.check_model(proto)


# ------------------------------------------------------------------------------------------------ structure


def test_plugin_table_is_the_plugin_spec():
    """The lowering's node table equals the TensorRT plugins' contract (``plugins/spec.py``)."""
    from plugins import spec

    assert (spec.NAMESPACE, spec.VERSION) == (onnx_lowering.DOMAIN, onnx_lowering.PLUGIN_VERSION)
    assert set(onnx_lowering.PLUGIN_OPS) == set(spec.PLUGINS)
    for op_type, (inputs, outputs, attrs) in onnx_lowering.PLUGIN_OPS.items():
        plugin = spec.PLUGINS[op_type]
        assert tuple(n for n, _ in inputs) == plugin.inputs and tuple(n for n, _ in outputs) == plugin.outputs
        assert tuple(attrs) == plugin.attrs, op_type
        assert tuple(onnx_lowering.FLOAT_ATTRIBUTES.get(op_type, ())) == plugin.float_attrs, op_type


_TORCH_DTYPES = {ir.DataType.FLOAT: torch.float32, ir.DataType.BFLOAT16: torch.bfloat16,
                 ir.DataType.FLOAT16: torch.float16, ir.DataType.INT32: torch.int32, ir.DataType.INT64: torch.int64}


def _check_against_spec(model, sizes: dict[str, int]) -> int:
    """Every plugin node: dtypes are a combination the plugin registers, and the symbolic output shapes in the graph
    equal the plugin's shape rule for concrete ``sizes`` of the dynamic dims. Returns the number of nodes checked."""
    from plugins import spec

    def dims(v):
        return tuple(d if isinstance(d, int) else _eval_dim(d.value, **sizes) for d in v.shape)

    nodes = _plugin_nodes(model)
    for node in nodes:
        plugin = spec.PLUGINS[node.op_type]
        in_dtypes = [_TORCH_DTYPES[v.dtype] for v in node.inputs]
        assert plugin.output_dtypes(in_dtypes) == tuple(_TORCH_DTYPES[v.dtype] for v in node.outputs), node.name
        attrs = {k: v for k, v in _attrs(node).items() if k in plugin.attrs + plugin.float_attrs}
        expected = plugin.output_shapes([dims(v) for v in node.inputs], attrs)
        assert tuple(dims(v) for v in node.outputs) == tuple(tuple(s) for s in expected), node.name
    return len(nodes)


@pytest.mark.parametrize("name", ["prefill", "decode"])
def test_graph_inputs_and_outputs_are_the_contract(tiny, graphs, name):
    model = graphs[name]
    io = program_io(tiny.config.to_dict(), symbolic_state_layout(tiny.config, SETTINGS), name,
                    SETTINGS.paged_layout(), in_place=False)
    dtypes = {"int64": ir.DataType.INT64, "float32": ir.DataType.FLOAT, "int32": ir.DataType.INT32}
    for values, specs in ((model.graph.inputs, io["inputs"]), (model.graph.outputs, io["outputs"])):
        assert [v.name for v in values] == [s["name"] for s in specs]
        for v, spec in zip(values, specs):
            assert v.dtype == dtypes[spec["dtype"]], v.name
            dims = [d if isinstance(d, int) else d.value for d in v.shape]
            assert dims == spec["shape"], (v.name, dims)  # "B" and "T" dynamic, everything else static
    assert dict(model.opset_imports) == {"": 18, "minimax": 1}


@pytest.mark.parametrize("name", ["prefill", "decode"])
def test_plugin_nodes_per_layer_kind(tiny, graphs, name):
    model = graphs[name]
    config = tiny.config
    assert {n.domain for n in model.graph} == {"", "minimax"}
    counts = Counter(n.op_type for n in _plugin_nodes(model))
    lightning = "lightning_prefill" if name == "prefill" else "lightning_decode"
    chain = GROUPED if name == "prefill" else DECODE
    assert counts == Counter({lightning: len(config.lightning_layers),
                              **{op: config.num_hidden_layers for op in chain},
                              **{op: len(config.softmax_layers) for op in ATTENTION[name]}})
    assert not any(n.op_type in ("moe", "ScaledDotProductAttention", "ScatterND", "Tile") for n in model.graph)
    split = 256  # decode_split of a capacity of 40 positions on the GPU (the smallest split)
    for node in _plugin_nodes(model):
        extra = {"moe_route": {"top_k": 2}, "moe_align": {"num_experts": 4, "block_m": 16},
                 "moe_swiglu_grouped": {"top_k": 2, "block_m": 16}, "moe_down_grouped": {"block_m": 16},
                 "moe_combine": {"top_k": 2}, "paged_attention_prefill": {"scale": 0.25},
                 "paged_decode_split": {"split": split, "scale": 0.25},
                 "paged_decode_merge": {"split": split}}.get(node.op_type, {})
        assert _attrs(node) == {**PLUGIN_ATTRS, **extra}, node.name
        inputs, outputs, _ = onnx_lowering.PLUGIN_OPS[node.op_type]
        assert len(node.inputs) == len(inputs) and len(node.outputs) == len(outputs), node.name


def test_kv_write_nodes_take_the_pools_and_return_them(tiny, graphs):
    """Each softmax layer: paged_kv_write reads the pool inputs and its outputs are the graph's ``<pool>.out``
    (aliased in TensorRT), and the attention nodes read the written pools and the block table."""
    for name, model in graphs.items():
        writes = [n for n in _plugin_nodes(model) if n.op_type == "paged_kv_write"]
        assert len(writes) == len(tiny.config.softmax_layers)
        for node, layer in zip(writes, tiny.config.softmax_layers):
            assert [v.name for v in node.inputs[:2]] == [f"key_cache.{layer}", f"value_cache.{layer}"]
            assert [v.name for v in node.outputs] == [f"key_cache.{layer}.out", f"value_cache.{layer}.out"]
            assert node.inputs[4].name == "block_table" and node.inputs[5].name == "positions"
            readers = {u.node.op_type for u in node.outputs[0].uses()}
            assert readers == {"paged_attention_prefill" if name == "prefill" else "paged_decode_split"}


def test_lightning_nodes_read_the_layer_decay_and_state(tiny, graphs):
    for name, model in graphs.items():
        nodes = [n for n in _plugin_nodes(model) if n.op_type.startswith("lightning")]
        for node, layer in zip(nodes, tiny.config.lightning_layers):
            s = node.inputs[3]
            assert s.const_value is not None and s.dtype == ir.DataType.FLOAT, node.name
            expected = tiny.model.layers[layer].self_attn.decay_rate
            assert torch.equal(torch.from_numpy(s.const_value.numpy().copy()), expected), (name, layer)
            assert node.inputs[4].name == f"lightning_state.{layer}"  # the state goes straight into the plugin
            assert [c.name for c in model.graph.outputs].count(node.outputs[1].name) == 1
            assert node.outputs[1].name == f"lightning_state.{layer}.out"


@pytest.mark.parametrize("name", ["prefill", "decode"])
def test_moe_chains_are_wired_as_the_contract(graphs, name):
    model = graphs[name]
    routes = [n for n in _plugin_nodes(model) if n.op_type == "moe_route"]
    for route in routes:
        topk_weights, topk_ids = route.outputs
        assert route.inputs[1].const_value is not None and route.inputs[1].dtype == ir.DataType.FLOAT  # router
        consumers = {use.node.op_type: use.node for use in topk_ids.uses()}
        if name == "decode":
            swiglu, down = consumers["moe_swiglu_decode"], consumers["moe_down_combine_decode"]
            assert swiglu.inputs[0] is route.inputs[0] and swiglu.inputs[3] is topk_ids
            assert list(down.inputs[2:]) == [topk_weights, topk_ids] and down.inputs[0] is swiglu.outputs[0]
            assert [w.const_value.shape[0] for w in (swiglu.inputs[1], swiglu.inputs[2], down.inputs[1])] == [4, 4, 4]
            continue
        align = consumers["moe_align"]
        sorted_slots, inv_perm, block_expert, _, _ = align.outputs
        (swiglu,) = [u.node for u in sorted_slots.uses() if u.node.op_type == "moe_swiglu_grouped"]
        (down,) = [u.node for u in sorted_slots.uses() if u.node.op_type == "moe_down_grouped"]
        (combine,) = [u.node for u in inv_perm.uses()]
        assert swiglu.inputs[0] is route.inputs[0]
        assert list(swiglu.inputs[3:]) == [sorted_slots, block_expert]
        assert down.inputs[0] is swiglu.outputs[0] and list(down.inputs[2:]) == [sorted_slots, block_expert, topk_weights]
        assert list(combine.inputs) == [down.outputs[0], inv_perm] and combine.op_type == "moe_combine"


@pytest.mark.parametrize("name", ["prefill", "decode"])
def test_plugin_nodes_match_the_plugin_shape_and_dtype_rules(graphs, name):
    n_nodes = 6 + 8 * len(GROUPED if name == "prefill" else DECODE) + 2 * len(ATTENTION[name])
    for B, T in ((1, 2), (3, 19)):
        assert _check_against_spec(graphs[name], {"B": B, "T": T if name == "prefill" else 1}) == n_nodes


def test_intermediate_shapes_are_the_static_bounds(graphs):
    """value_info of the grouped chain: R = S + E (block_m - 1), NB = cdiv(R, block_m), S = B T top_k."""
    align = next(n for n in _plugin_nodes(graphs["prefill"]) if n.op_type == "moe_align")
    h = next(u.node for u in align.outputs[0].uses() if u.node.op_type == "moe_swiglu_grouped").outputs[0]
    for B, T in ((1, 2), (3, 19), (4, 24)):
        R, NB = stages.align_sizes(B * T * 2, 4, 16)
        expected = [[R], [B * T * 2], [NB], [4], [5]]
        got = [[d if isinstance(d, int) else _eval_dim(d.value, B=B, T=T) for d in v.shape] for v in align.outputs]
        assert got == expected
        assert [_eval_dim(h.shape[0].value, B=B, T=T), h.shape[1]] == [R, 48]
        assert h.dtype == ir.DataType.FLOAT


# ------------------------------------------------------------------------------------------------ numerics


def _run_steps(prefill, decode, ids, n_prompt, config):
    """Prefill + decode steps on a scattered paged state; ``prefill``/``decode`` return ``(logits, new state)``."""
    from tests.test_export import paged_state

    B = ids.shape[0]
    table, state = paged_state(config, B, SETTINGS)
    logits, state = prefill(ids[:, :n_prompt].contiguous(), torch.zeros(B, dtype=torch.long), table, state)
    steps = [logits]
    for t in range(n_prompt, ids.shape[1]):
        logits, state = decode(ids[:, t : t + 1].contiguous(), torch.full((B,), t, dtype=torch.long), table, state)
        steps.append(logits)
    return torch.cat(steps, 1), state


@torch.no_grad()
@pytest.mark.parametrize("batch, prompt", [(2, 5), (3, 19), (1, 2)])
def test_onnx_reference_equals_eager_over_prefill_and_decode(tiny, engine, batch, prompt):
    folder, _ = engine
    prefill, decode = OnnxReferenceProgram(folder / "prefill.onnx"), OnnxReferenceProgram(folder / "decode.onnx")
    ids = torch.randint(0, tiny.config.vocab_size, (batch, prompt + 3), generator=torch.Generator().manual_seed(prompt))
    ours = _run_steps(prefill, decode, ids, prompt, tiny.config)
    ref = _run_steps(InPlaceProgram(PrefillProgram(tiny)), InPlaceProgram(DecodeProgram(tiny)), ids, prompt, tiny.config)
    report = logit_report(ours[0], ref[0])
    print(f"ONNX reference vs eager, batch {batch}, prompt {prompt} + 3 decode steps: {report}")
    assert report["max_abs"] < 2e-5 and report["top1"] == 1.0, report
    for a, b in zip(ours[1], ref[1]):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)


def test_evaluator_refuses_a_plugin_node_with_wrong_attributes(engine, tmp_path):
    folder, _ = engine
    proto = onnx.load(folder / "decode.onnx")
    node = next(n for n in proto.graph.node if n.op_type == "lightning_decode")
    next(a for a in node.attribute if a.name == "plugin_namespace").s = b"other"
    onnx.save(proto, tmp_path / "bad.onnx")
    session = reference_evaluator(tmp_path / "bad.onnx")
    from tests.test_export import paged_state

    table, state = paged_state(MiniMaxConfig.preset("tiny"), 1, SETTINGS)
    feeds = {"input_ids": torch.zeros(1, 1, dtype=torch.long).numpy(), "positions": torch.zeros(1, dtype=torch.long).numpy(),
             "block_table": table.numpy(), **{v.name: t.numpy() for v, t in zip(proto.graph.input[3:], state)}}
    with pytest.raises(ValueError, match="plugin attributes .*'plugin_namespace': 'other'"):
        session.run(None, feeds)


def test_large_weights_go_to_external_data(graphs, engine, tmp_path, monkeypatch):
    folder, _ = engine
    monkeypatch.setattr(onnx_lowering, "EXTERNAL_DATA_THRESHOLD", 1000)
    model = graphs["decode"]
    data = onnx_lowering.save_onnx(model, tmp_path / "decode.onnx")
    assert data == "decode.onnx.data" and (tmp_path / data).stat().st_size > 2_000_000
    proto = onnx.load(tmp_path / "decode.onnx", load_external_data=False)
    external = [i for i in proto.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) >= 8 * 4 and not [i.name for i in proto.graph.initializer if len(i.raw_data) > 1024]
    from tests.test_export import paged_state

    ids = torch.tensor([[5], [7]])
    table, state = paged_state(MiniMaxConfig.preset("tiny"), 2, SETTINGS)
    state = [torch.randn(t.shape, generator=torch.Generator().manual_seed(1)) for t in state]
    ours = OnnxReferenceProgram(tmp_path / "decode.onnx")(ids, torch.tensor([3, 9]), table, state)
    embedded = OnnxReferenceProgram(folder / "decode.onnx")(ids, torch.tensor([3, 9]), table, state)
    assert torch.equal(ours[0], embedded[0])


# ------------------------------------------------------------------------------------------------ bf16, refusals


def test_bf16_graph_feeds_the_plugins_bf16_activations_and_fp32_state(tmp_path):
    """bf16 build, max_batch 20 > 16 decode tokens: the decode program takes the grouped chain."""
    settings = BuildSettings(backend="onnx", dtype="bfloat16", max_batch=20, max_input_len=8, max_seq_len=16)
    model = MiniMaxForCausalLM(MiniMaxConfig.preset("tiny"), dtype=torch.bfloat16).init_random_weights(seed=1).eval()
    program = export_programs(model, settings)["decode"]
    graph, plan = onnx_lowering.to_onnx(program, "decode", settings)
    assert plan == {"path": "grouped", "block_m": 16, "tokens": 20}
    counts = Counter(n.op_type for n in _plugin_nodes(graph))
    assert counts == Counter({"lightning_decode": 6, **{op: 8 for op in GROUPED}, **{op: 2 for op in ATTENTION["decode"]}})
    bf16, f32, i32, i64 = ir.DataType.BFLOAT16, ir.DataType.FLOAT, ir.DataType.INT32, ir.DataType.INT64
    expected = {
        "lightning_decode": ([bf16, bf16, bf16, f32, f32], [bf16, f32]),
        "moe_route": ([bf16, f32], [f32, i32]),
        "moe_align": ([i32], [i32] * 5),
        "moe_swiglu_grouped": ([bf16, bf16, bf16, i32, i32], [bf16]),
        "moe_down_grouped": ([bf16, bf16, i32, i32, f32], [bf16]),
        "moe_combine": ([bf16, i32], [bf16]),
        "paged_kv_write": ([bf16, bf16, bf16, bf16, i32, i64], [bf16, bf16]),
        "paged_decode_split": ([bf16, bf16, bf16, i32, i64], [f32, f32, f32]),
        "paged_decode_merge": ([bf16, f32, f32, f32, i64], [bf16]),
    }
    for node in _plugin_nodes(graph):
        assert ([v.dtype for v in node.inputs], [v.dtype for v in node.outputs]) == expected[node.op_type], node.name
    assert _check_against_spec(graph, {"B": 20, "T": 1}) == 6 + 8 * len(GROUPED) + 2 * 3
    key_cache = next(v for v in graph.graph.inputs if v.name.startswith("key_cache"))
    assert key_cache.dtype == bf16 and graph.graph.outputs[0].dtype == f32  # logits fp32
    onnx_lowering.save_onnx(graph, tmp_path / "decode.onnx")  # passes the checker


def test_check_available_names_what_is_missing(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(EngineFolderError, match=r"backend 'onnx' needs onnxscript, which is not installed"):
        onnx_lowering.check_available(SETTINGS)


def test_weightless_skeleton_lowers_to_the_same_graph(graphs, tiny):
    """A model on the meta device (no weight in memory: how the full 80-layer configuration is lowered) exports to
    ONNX with the optimizer off; its decode graph has the same inputs, outputs, plugin nodes (op types and
    attributes, in order) as the real model's folder graph, and its initializers are exactly the model's tensors
    (names, shapes, dtypes): the graph a real-scale ONNX folder needs, without reading a weight."""
    from export.exporting import export_programs
    from export.onnx_lowering import to_onnx

    with torch.device("meta"):
        skeleton = MiniMaxForCausalLM(tiny.config, dtype=torch.float32)
    skeleton.eval()
    with torch.no_grad():
        program = export_programs(skeleton, SETTINGS)["decode"]
    model, _ = to_onnx(program, "decode", SETTINGS, optimize=False)
    ref = graphs["decode"]
    assert [v.name for v in model.graph.inputs] == [v.name for v in ref.graph.inputs]
    assert [v.name for v in model.graph.outputs] == [v.name for v in ref.graph.outputs]
    plugin = lambda g: [(n.op_type, sorted(_attrs(n).items())) for n in g.graph if n.domain == "minimax"]  # noqa: E731
    assert plugin(model) == plugin(ref) and plugin(ref)
    spec = lambda g: {n: (tuple(v.shape), v.dtype) for n, v in g.graph.initializers.items()  # noqa: E731
                      if n.startswith("inner.")}  # the model's tensors (the optimizer adds folded "val_*" constants)
    # every initializer is one of the model's tensors, by its name, shape and dtype (the real folder's optimized
    # graph holds some of them pre-transposed as folded constants instead)
    from export.weights import model_tensors

    want = {f"inner.model.{n}": (tuple(t.shape), ir.DataType.FLOAT) for n, t in model_tensors(tiny)}
    assert {n: (tuple(int(d) for d in shape), dt) for n, (shape, dt) in spec(model).items()} == want
