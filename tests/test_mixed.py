"""Mixed steps (issue 13): a decode step of some rows and a prefill chunk of others in one forward.

``MiniMaxForCausalLM.mixed_step`` == ``decode`` then ``prefill`` on the same rows (logits and state, plain and int8
experts); the scheduler's mixed path makes one program call per step where the separate path makes two, with the
same tokens; ``build.py --mixed-step`` compiles the ``mixed`` AOTInductor program, which equals the eager one at
sizes other than its example's and drives the scheduler; the places it does not apply are refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import build
from export.engine_folder import EngineFolderError, read_manifest, write_manifest
from model import MiniMaxConfig, MiniMaxForCausalLM, MiniMaxState
from runtime import Engine
from runtime.scheduler import Scheduler

FLAGS = ["--preset", "tiny", "--device", "cpu", "--dtype", "fp32", "--max-batch", "3", "--max-input-len", "8",
         "--max-seq-len", "48", "--page-size", "8"]


def _model(quantize: str = "none") -> MiniMaxForCausalLM:
    m = MiniMaxForCausalLM(MiniMaxConfig.preset("tiny")).init_random_weights(seed=0)
    return m.quantize_experts_(quantize).eval()


def _rows(state: MiniMaxState, a: int, b: int) -> MiniMaxState:
    """Rows a..b-1 of ``state``: their lightning states and block-table rows (views), the pools whole."""
    return MiniMaxState([t[a:b] for t in state.lightning], state.key_cache, state.value_cache, state.block_table[a:b])


def _setup(model, R: int, Bp: int, held: list[int], seed: int):
    """Two equal states of R + Bp rows, the first R rows holding ``held`` tokens each (one ragged prefill)."""
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    states = [model.new_state(R + Bp, 48, page_size=8) for _ in range(2)]
    T = max(held)
    ids = torch.randint(0, V, (R, T), generator=g)
    pos = torch.tensor([h - T for h in held])  # left pads at negative positions
    with torch.no_grad():
        for st in states:
            model.prefill(ids, _rows(st, 0, R), pos)
    return states, g


@pytest.mark.parametrize("quantize", ["none", "experts-int8"])
@pytest.mark.parametrize("R,Bp,Tp", [(3, 2, 5), (1, 1, 7), (2, 3, 2)])
def test_mixed_step_equals_decode_then_prefill(quantize, R, Bp, Tp):
    """Logits of the decode rows and of the prefill rows' last positions, and every state tensor after the step,
    against ``decode`` then ``prefill`` (last_logits_only) on the same rows; ragged rows on both sides (a decode
    row shorter than the others, a prefill row with left pads)."""
    model = _model(quantize)
    V = model.config.vocab_size
    held = [6 - (r % 2) for r in range(R)]
    (ref, ours), g = _setup(model, R, Bp, held, seed=R * 10 + Tp)
    dec_ids = torch.randint(0, V, (R, 1), generator=g)
    dec_pos = torch.tensor(held)
    pre_ids = torch.randint(0, V, (Bp, Tp), generator=g)
    pre_pos = torch.tensor([0] + [-(i % Tp) for i in range(1, Bp)])  # rows after the first: left pads
    with torch.no_grad():
        want_dec, _ = model.decode(dec_ids, dec_pos, _rows(ref, 0, R))
        want_pre, _ = model.prefill(pre_ids, _rows(ref, R, R + Bp), pre_pos, last_logits_only=True)
        got = model.mixed_step(dec_ids, dec_pos, _rows(ours, 0, R), pre_ids, pre_pos, _rows(ours, R, R + Bp))
    want = torch.cat([want_dec, want_pre])
    assert got.shape == (R + Bp, 1, V)
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 1e-5, rel
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    for i, (a, b) in enumerate(zip(ours.flatten(), ref.flatten())):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"state tensor {i}")


def test_mixed_step_refuses_a_second_set_of_pools():
    model = _model()
    a, b = model.new_state(1, 16, page_size=8), model.new_state(1, 16, page_size=8)
    with pytest.raises(ValueError, match="share one set of KV pools"):
        model.mixed_step(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long), a,
                         torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, dtype=torch.long), b)


class _Counted(dict):
    """``engine.programs`` with a count of the calls each step makes."""

    def __init__(self, programs):
        super().__init__()
        self.calls = []
        for name, fn in programs.items():
            self[name] = self._wrap(name, fn)

    def _wrap(self, name, fn):
        def call(*args):
            self.calls.append(name)
            return fn(*args)
        return call


@pytest.mark.parametrize("mixed", [False, True], ids=["separate", "mixed"])
def test_a_step_with_decodes_and_a_chunk_is_one_call(mixed):
    """A long prompt arriving while another request decodes: its four chunks ride with the decode steps (one
    ``mixed`` call per step) where the separate path makes two calls; both give each request's tokens alone."""
    model = _model()
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(3)
    short, long = torch.randint(2, V, (3,), generator=g).tolist(), torch.randint(2, V, (30,), generator=g).tolist()
    engine = Engine.from_model(model, 2, 8, 48, page_size=8, mixed_step=mixed)
    engine.programs = _Counted(engine.programs)
    sched = Scheduler(engine, token_budget=8)
    assert sched.mixed_step is mixed
    a = sched.submit(short, 16)
    per_step = []
    for i in range(40):
        if i == 2:
            b = sched.submit(long, 4)
        n = len(engine.programs.calls)
        if not sched.step():
            break
        per_step.append(engine.programs.calls[n:])
    overlap = [c for c in per_step if "mixed" in c or ("decode" in c and "prefill" in c)]
    if mixed:
        assert all(len(c) == 1 for c in per_step), per_step
        assert sched.mixed_calls == len(overlap) == 4  # 30 tokens in chunks of 8, 8, 8, 6
    else:
        # B's four chunks each beside a decode step, and A's own prompt beside its first decode
        assert sched.mixed_calls == 0 and len(overlap) == 5 and all(len(c) == 2 for c in overlap)
    alone = Engine.from_model(model, 1, 8, 48, page_size=8)
    for rid, p, n in ((a, short, 16), (b, long, 4)):
        assert sched.result(rid).tokens == alone.generate([p], max_new_tokens=n)[0, len(p):].tolist(), rid
    assert engine.pages.free_pages == engine.pages.num_pages


def test_scheduler_mixed_step_needs_the_program():
    engine = Engine.from_model(_model(), 2, 8, 48, page_size=8)
    with pytest.raises(ValueError, match="has no 'mixed' program"):
        Scheduler(engine, mixed_step=True)
    assert Scheduler(engine).mixed_step is False


@pytest.fixture(scope="module")
def mixed_engine(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mixed") / "engine"
    assert build.main([*FLAGS, "--out", str(out), "--mixed-step"]) == 0
    return out


def test_compiled_mixed_program_equals_eager(mixed_engine):
    """The AOTInductor ``mixed`` program (exported at R 3, B 2, T 4) at other sizes == the eager program on the
    same weights: logits and the state it writes in place."""
    from export.exporting import MixedProgram

    manifest = read_manifest(mixed_engine)
    assert [e["name"] for e in manifest["programs"]["mixed"]["inputs"][:6]] == [
        "decode_ids", "decode_positions", "decode_block_table", "prefill_ids", "prefill_positions",
        "prefill_block_table"]
    engine = Engine.load(mixed_engine)
    assert "mixed" in engine.programs
    model = _model()
    eager = MixedProgram(model)
    n_lin = len(model.config.lightning_layers)
    V = model.config.vocab_size
    for R, Bp, Tp in ((2, 1, 6), (1, 2, 8), (1, 1, 2)):
        g = torch.Generator().manual_seed(R + 7 * Tp)
        held = [5 + r for r in range(R)]
        (ref, ours), _ = _setup(model, R, Bp, held, seed=Tp)
        # the states at the engine's pool size: copy the prefilled pages into pools of the engine's shape
        pools = [torch.zeros_like(t) for t in engine._buffers[n_lin:]]
        table = torch.arange(R + Bp, dtype=torch.int32)[:, None] * 6 + torch.arange(6, dtype=torch.int32)
        dec_ids = torch.randint(0, V, (R, 1), generator=g)
        pre_ids = torch.randint(0, V, (Bp, Tp), generator=g)
        pre_pos = torch.tensor([-(i % 2) for i in range(Bp)])
        inputs = []
        for st in (ref, ours):
            lin = [t.clone() for t in st.lightning]
            kv = [p.clone() for p in pools]
            for p, src in zip(kv, [*st.key_cache, *st.value_cache]):
                p[: src.shape[0]] = src
            inputs.append((lin, kv))
        args = lambda lin, kv: (dec_ids, torch.tensor(held), table[:R].contiguous(), pre_ids, pre_pos,  # noqa: E731
                                table[R:].contiguous(), [t[:R].contiguous() for t in lin],
                                [t[R:].contiguous() for t in lin], kv)
        a_ref, a_ours = args(*inputs[0]), args(*inputs[1])
        with torch.no_grad():
            want = eager(*a_ref)
            got = engine.programs["mixed"](*a_ours)
        rel = ((got - want).norm() / want.norm()).item()
        assert got.shape == (R + Bp, 1, V) and rel < 1e-5, (R, Bp, Tp, rel)
        for x, y in zip([*a_ours[6], *a_ours[7], *a_ours[8]], [*a_ref[6], *a_ref[7], *a_ref[8]]):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_compiled_engine_schedules_mixed_steps(mixed_engine):
    """The scheduler over the loaded engine takes the mixed path by default; greedy tokens == each request alone
    on the eager model."""
    engine = Engine.load(mixed_engine)
    sched = Scheduler(engine, token_budget=8)
    assert sched.mixed_step
    g = torch.Generator().manual_seed(9)
    V = engine.vocab_size
    prompts = [torch.randint(2, V, (n,), generator=g).tolist() for n in (5, 19, 11, 3)]
    ids = [sched.submit(p, n) for p, n in zip(prompts, (9, 4, 6, 7))]
    sched.run_until_idle()
    assert sched.mixed_calls > 0
    alone = Engine.from_model(_model(), 1, 8, 48, page_size=8)
    for rid, p, n in zip(ids, prompts, (9, 4, 6, 7)):
        assert sched.result(rid).tokens == alone.generate([p], max_new_tokens=n)[0, len(p):].tolist(), rid
    assert engine.pages.free_pages == engine.pages.num_pages


@pytest.mark.parametrize("flags,message", [
    (["--backend", "onnx"], "--mixed-step: AOTInductor text engines on one rank with whole programs only (got "
                            "--backend onnx)"),
    (["--layer-programs"], "(got --layer-programs)"),
    (["--tensor-parallel", "2"], "(got --tensor-parallel)"),
    (["--max-batch", "1"], "--mixed-step: a mixed step holds a decode row and a prefill row, --max-batch 1 holds one"),
])
def test_mixed_step_refused_where_it_does_not_apply(flags, message, tmp_path, caplog):
    assert build.main([*FLAGS, "--out", str(tmp_path / "e"), "--mixed-step", *flags]) == 2
    assert message in caplog.text
    assert not (tmp_path / "e").exists()


def test_a_mixed_program_in_another_kind_of_folder_is_refused(mixed_engine, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(mixed_engine, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["parallel"] = {"world_size": 2, "rank": 0, "group_name": "g", "expert_parallel": False}
    manifest.pop("files")
    write_manifest(bad, manifest)  # consistent (contract and hashes), but a rank's folder with a mixed program
    with pytest.raises(EngineFolderError, match="'mixed' program belongs to AOTInductor text engines on one rank"):
        read_manifest(bad)


# ---------------------------------------------------------------------------------------------------- GPU


@pytest.fixture(scope="module")
def cuda_mixed(tmp_path_factory):
    """A CUDA AOTInductor engine with the mixed program (fp32, head_dim 64: the Triton kernels' sizes)."""
    import dataclasses

    from export import BuildSettings, build_engine

    config = dataclasses.replace(MiniMaxConfig.preset("tiny"), head_dim=64, rotary_dim=32)
    with torch.device("cuda"):
        model = MiniMaxForCausalLM(config).init_random_weights(seed=4, std=0.05).eval()
    settings = BuildSettings(backend="aoti", device="cuda", dtype="float32", max_batch=4, max_input_len=16,
                             max_seq_len=96, page_size=16)
    out = tmp_path_factory.mktemp("mixed_cuda") / "engine"
    build_engine(model, settings, out, mixed_step=True)
    return model, Engine.load(out)


@pytest.mark.parametrize("R,Bp,Tp", [(3, 1, 16), (1, 2, 5)])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_mixed_program_equals_its_decode_and_prefill(cuda_mixed, R, Bp, Tp):
    """The CUDA package's mixed call == its own decode then prefill calls on equal states (logits, state)."""
    model, engine = cuda_mixed
    V = engine.vocab_size
    g = torch.Generator().manual_seed(R * 100 + Tp)
    n_lin = len(engine.config.lightning_layers)
    engine.reset(R + Bp)
    engine.reserve([40] * (R + Bp))
    table = engine.block_table.clone()
    prompt = torch.randint(0, V, (R, 9), generator=g).cuda()
    dec_ids = torch.randint(0, V, (R, 1), generator=g).cuda()
    pre_ids = torch.randint(0, V, (Bp, Tp), generator=g).cuda()
    dec_pos = torch.full((R,), 9, dtype=torch.long, device="cuda")
    pre_pos = torch.tensor([-(i % 3) for i in range(Bp)], dtype=torch.long, device="cuda")
    results = []
    for mixed in (False, True):
        engine.reset(R + Bp)
        engine.reserve([40] * (R + Bp))
        assert torch.equal(engine.block_table, table)
        st = engine.state
        rows = lambda a, b: [t[a:b] if i < n_lin else t for i, t in enumerate(st)]  # noqa: E731
        with torch.no_grad():
            engine.programs["prefill"](prompt, torch.zeros(R, dtype=torch.long, device="cuda"), table[:R], rows(0, R))
            if mixed:
                logits = engine.programs["mixed"](dec_ids, dec_pos, table[:R], pre_ids, pre_pos, table[R:],
                                                  [t[:R] for t in st[:n_lin]], [t[R:] for t in st[:n_lin]],
                                                  st[n_lin:])
            else:
                a, _ = engine.programs["decode"](dec_ids, dec_pos, table[:R], rows(0, R))
                b, _ = engine.programs["prefill"](pre_ids, pre_pos, table[R:], rows(R, R + Bp))
                logits = torch.cat([a, b])
        results.append((logits.clone(), [t.clone() for t in st]))
    (want, ref), (got, ours) = results
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 1e-4, rel
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    for i, (x, y) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4, msg=f"state tensor {i}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_scheduler_mixed_steps_equal_separate(cuda_mixed):
    """The scheduler over the CUDA engine, mixed steps and separate calls: the same greedy tokens."""
    _, engine = cuda_mixed
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(2, engine.vocab_size, (n,), generator=g).tolist() for n in (40, 7, 23, 61, 3)]
    out = {}
    for mixed in (False, True):
        sched = Scheduler(engine, token_budget=16, mixed_step=mixed)
        ids = [sched.submit(p, 12) for p in prompts]
        sched.run_until_idle()
        out[mixed] = [sched.result(r).tokens for r in ids]
        assert (sched.mixed_calls > 0) == mixed
    assert out[True] == out[False]
